"""The hostile-input harness: run many cases in a worker child, each bounded and checked.

A case is a JSON dict with an `id`, its own `sandbox` directory under `<root>/box` (which holds its
input files and outputs) and either
  {"kind": "call", "target": "module:function", "args": [...]}   a public reader, or
  {"kind": "cli", "module": "converters.mge2torch", "argv": [...]}  a command run as `python -m`.
The worker (`python -m tests.security.harness CASES START`) runs the cases in order. For each it
resets the peak RSS (/proc/self/clear_refs), caps the address space at the current size +
`MEM_LIMIT` + slack, arms a wall-clock timer that raises `CaseTimeout` (a BaseException, so a
command's `except Exception` cannot swallow it), snapshots the harness root outside the sandbox,
runs the case, and prints one `@@DONE` JSON line: how it ended, seconds, peak RSS growth, captured
stdout/stderr and what changed outside the sandbox. A case that hangs in C past the timer, or kills
the worker, is recorded by the parent, which restarts the worker after it.

`check(case, result)` then says what is wrong with a result, or None: it must end within
`WALL_LIMIT` s and `MEM_LIMIT` bytes of growth, touch nothing outside its sandbox, and end in the
right result or a clean error: for a reader a ValueError (ConversionError) or an OSError other than
ENOMEM (never MemoryError, RecursionError, TypeError, KeyError ...); for a command exit 1 or 2 with
exactly one stderr line and no traceback. No output line may carry a raw control character or more
than 200 characters of one planted untrusted string (`MARK`).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
WALL_LIMIT = 10.0
MEM_LIMIT = 256 << 20
_AS_SLACK = 64 << 20  # allocator arenas and stacks the interpreter maps on its own
MARK = "Q"  # planted untrusted strings are runs of this letter; no output may carry 201 of them
CLEAN_ERRORS = ("ValueError", "OSError")
_START_TIMEOUT = 120.0  # importing torch on a loaded 2-core machine


class CaseTimeout(BaseException):
    pass


# ------------------------------------------------------------------------------ worker side
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def snapshot(root: Path, skip: Path) -> Dict[str, Tuple]:
    """(kind, size, mtime) of everything under `root` except `skip`, links not followed. (One lstat per
    entry: it runs twice per case over every case's files, ~900 entries in the default run.)"""
    out, skip_path, pending = {}, str(skip), [str(root)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:  # unreadable or gone: as os.walk, skip it
            continue
        for entry in entries:
            if entry.path == skip_path:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            out[entry.path] = (st.st_mode >> 12, 0 if is_dir else st.st_size, st.st_mtime_ns)
            if is_dir:
                pending.append(entry.path)
    return out


def _call(case: dict) -> Optional[str]:
    import importlib

    module, _, name = case["target"].partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    value = fn(*case.get("args", []))
    return None if value is None else _digest(value)


def _digest(value) -> str:
    """A stable text for a reader's result: tensors by name, shape, dtype and bytes' sha256."""
    import hashlib

    if not hasattr(value, "keys"):
        return type(value).__name__
    parts = []
    for k in sorted(value.keys()):
        v = value[k]
        if hasattr(v, "detach"):  # a torch tensor (bfloat16 has no numpy twin): its bytes
            shape, dtype = tuple(v.shape), str(v.dtype).replace("torch.", "")
            raw = v.detach().contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes()
        else:
            import numpy as np

            arr = np.ascontiguousarray(v)
            shape, dtype, raw = arr.shape, str(arr.dtype), arr.tobytes()
        parts.append(f"{k}:{shape}:{dtype}:{hashlib.sha256(raw).hexdigest()[:16]}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cli(case: dict) -> int:
    import runpy

    sys.argv = [case["module"], *case["argv"]]
    try:
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run_one(case: dict, root: Path) -> dict:
    sandbox = Path(case["sandbox"])
    before = snapshot(root, sandbox)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status("VmSize") + MEM_LIMIT + _AS_SLACK
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.setitimer(signal.ITIMER_REAL, case.get("wall", WALL_LIMIT))
    result: dict = {"id": case["id"]}
    t = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if case["kind"] == "call":
                result.update(outcome="returned", value=_call(case))
            else:
                result.update(outcome="exit", code=_cli(case))
    except BaseException as e:  # noqa: BLE001 - every ending is recorded and judged by the parent
        result.update(outcome="raised", error=type(e).__name__, bases=[c.__name__ for c in type(e).__mro__],
                      errno=getattr(e, "errno", None), message=str(e)[:2000])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    result["seconds"] = time.monotonic() - t
    result["peak_growth"] = max(0, _status("VmHWM") - base)
    result["stdout"], result["stderr"] = out.getvalue()[-20000:], err.getvalue()[-20000:]
    after = snapshot(root, sandbox)
    result["outside_changes"] = sorted(set(before.items()) ^ set(after.items()))[:10]
    return result


def _on_alarm(signum, frame):
    raise CaseTimeout(f"still running after {WALL_LIMIT} s")


def worker(cases_file: str, start: int) -> None:
    cases = json.loads(Path(cases_file).read_text())
    root = Path(cases_file).parent / "box"
    signal.signal(signal.SIGALRM, _on_alarm)
    import torch  # noqa: F401  (the interpreter's own baseline: imported before any case is measured)

    import bert_port  # noqa: F401
    real_stdout = sys.stdout
    for i in range(start, len(cases)):
        real_stdout.write(f"@@START {i}\n")
        real_stdout.flush()
        result = run_one(cases[i], root)
        real_stdout.write(f"@@DONE {i} {json.dumps(result, default=str)}\n")
        real_stdout.flush()


# ------------------------------------------------------------------------------ parent side
class _Reader:
    """Lines of the worker's stdout with a timeout: the line, "" at EOF, None when none came in time."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.fd, self.buf = proc.stdout.fileno(), b""

    def line(self, timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")


def _run_worker(cases_file: Path, start: int, env: dict, results: Dict[int, dict], cases: List[dict]) -> int:
    """Run cases from `start` until the worker ends; returns the index to restart from."""
    with open(cases_file.parent / "worker.stderr", "w+b") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "tests.security.harness", str(cases_file), str(start)],
                                stdout=subprocess.PIPE, stderr=errf, cwd=ROOT, env=env)
        reader, current, timeout = _Reader(proc), None, _START_TIMEOUT
        while True:
            line = reader.line(timeout)
            if not line:
                break
            if line.startswith("@@START "):
                current, timeout = int(line.split()[1]), WALL_LIMIT + 10
            elif line.startswith("@@DONE "):
                _, i, payload = line.split(" ", 2)
                results[int(i)], timeout = json.loads(payload), _START_TIMEOUT
        proc.kill()
        proc.wait()
        errf.seek(0)
        stderr = errf.read().decode("utf-8", "replace")[-2000:]
    if current is None:
        raise RuntimeError(f"the harness worker did not start: {stderr}")
    if current not in results:
        results[current] = {"id": cases[current]["id"], "outcome": "hung" if line is None else "killed",
                            "stderr": stderr}
    return current + 1


def run_cases(cases: List[dict], root: Path) -> List[dict]:
    """Run every case in a worker child; a case that hangs or kills the worker is recorded as such."""
    cases_file = root / "cases.json"
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "BERT_PORT_OFFLINE": "1", "BERT_PORT_CACHE": str(root / "cache"),
           "BERT_PORT_QUIET": "1", "TQDM_DISABLE": "1"}
    results: Dict[int, dict] = {}
    start = 0
    while start < len(cases):
        start = _run_worker(cases_file, start, env, results, cases)
    return [results[i] for i in range(len(cases))]


def check(case: dict, r: dict) -> Optional[str]:
    """What is wrong with a case's result, or None."""
    if r["outcome"] in ("hung", "killed"):
        return f"{r['outcome']} (wall {WALL_LIMIT} s): {r.get('stderr', '')[-300:]}"
    if r["seconds"] > case.get("wall", WALL_LIMIT):
        return f"took {r['seconds']:.1f} s"
    if r["peak_growth"] > MEM_LIMIT:
        return f"peak RSS grew by {r['peak_growth'] >> 20} MiB"
    if r["outside_changes"]:
        return f"changed outside its sandbox: {r['outside_changes'][:3]}"
    for stream in ("stdout", "stderr", "message"):  # what a command prints, and what an error would
        text = r.get(stream, "")
        if MARK * 201 in text:
            return f"{stream} echoes more than 200 characters of an untrusted string"
        if any(ch in text for ch in "\x1b\x00\x07\x08\r"):
            return f"{stream} carries a raw control character: {text[:300]!r}"
    if r["outcome"] == "raised":
        if "CaseTimeout" in r["bases"]:
            return f"still running after {WALL_LIMIT} s"
        clean = any(b in r["bases"] for b in CLEAN_ERRORS) and r.get("errno") != errno.ENOMEM \
            and not {"MemoryError", "RecursionError"} & set(r["bases"])
        if case["kind"] == "cli" and r["error"] != "KeyboardInterrupt":
            return f"command raised {r['error']}: {r['message'][:300]}"
        if not clean:
            return f"{r['error']}: {r['message'][:300]}"
        if "\n" in r["message"].strip() or len(r["message"]) > 2000:
            return f"error message is not one short line: {r['message'][:300]!r}"
        return None
    if r["outcome"] == "returned":
        want = case.get("expect_digest")
        if want is not None and r["value"] != want:
            return f"read different values than the reference reader ({r['value']} != {want})"
        if case.get("must_fail"):
            return "accepted an input that must be refused"
        return None
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    if case.get("report") and r["code"] == 1 and not lines:
        return None  # `cache verify`: a report on stdout, exit 1 for a bad entry
    if r["code"] == 0:
        return "exit 0 on an input that must fail" if case.get("must_fail", True) else None
    if r["code"] not in (1, 2):
        return f"exit {r['code']}"
    if len(lines) != 1 or "Traceback" in r["stderr"]:
        return f"stderr is not one line: {r['stderr'][-600:]!r}"
    return None


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
