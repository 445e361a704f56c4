"""Run one hostile case in a child process under a wall-time limit and report its time and peak RSS.

`run_limited(body, setup=...)` executes `setup` (imports), then records VmHWM, caps the address
space at the current size + `as_extra` bytes (so an amplifying path ends in MemoryError instead of
swapping the shared machine), runs `body` and prints one JSON line: the exception it ended in (type,
base classes, message), seconds and peak-RSS growth in bytes. A body still running after `wall`
seconds is killed and the test fails; a child killed by a signal (SIGBUS) fails it too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

_TEMPLATE = '''
import json, os, resource, sys, time

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

{setup}
_base = _status("VmHWM")
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
_cap = _status("VmSize") + {as_extra}
resource.setrlimit(resource.RLIMIT_AS, (_cap if _hard == resource.RLIM_INFINITY else min(_cap, _hard), _hard))
_t = time.monotonic()
try:
{body}
    _out = {{"error": None, "bases": [], "message": ""}}
except BaseException as _e:
    _out = {{"error": type(_e).__name__, "bases": [c.__name__ for c in type(_e).__mro__],
             "message": str(_e)[:100000]}}
_out["seconds"] = time.monotonic() - _t
_out["peak_growth"] = max(0, _status("VmHWM") - _base)
sys.stdout.write("@@RESULT@@" + json.dumps(_out) + "\\n")
'''


def run_limited(body: str, *, setup: str = "", wall: float = 10.0, as_extra: int = 1 << 30,
                env: Optional[dict] = None) -> dict:
    script = _TEMPLATE.format(setup=textwrap.dedent(setup), as_extra=as_extra,
                              body=textwrap.indent(textwrap.dedent(body), "    "))
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), child_env.get("PYTHONPATH")]))
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        # wall covers the body; the interpreter start and imports get 20 s more on a loaded machine
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=wall + 20, env=child_env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hostile case still running after {wall + 20:.0f} s (budget {wall} s)")
    lines = [line for line in r.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if r.returncode != 0 or not lines:
        pytest.fail(f"child died (exit {r.returncode}); stderr tail: {r.stderr[-2000:]}")
    result = json.loads(lines[-1][len("@@RESULT@@"):])
    assert result["seconds"] < wall, f"took {result['seconds']:.1f} s (budget {wall} s): {result}"
    return result


def expect(result: dict, error: str, *, peak_mb: float, match: str = "") -> dict:
    """The child ended in `error` (a class name among the exception's bases) whose message holds
    `match`, with peak RSS growth under `peak_mb` MiB."""
    assert error in result["bases"], f"expected {error}, got {result['error']}: {result['message'][:500]}"
    assert match in result["message"], result["message"][:500]
    assert result["peak_growth"] < peak_mb * MiB, \
        f"peak RSS grew by {result['peak_growth'] / MiB:.0f} MiB (budget {peak_mb} MiB)"
    return result
