"""A real HTTP server on 127.0.0.1 that plays the MegEngine hub in tests, plus the hub tests' fixtures.

`HubServer` serves `files` ({"/<NAME>/<file>": bytes}), honours `Range: bytes=N-` with 206 answers,
records every request (path + headers), counts the body bytes it sent, and can be told to fail:
`fail(path, 500)`, `fail(path, "cut")` (send half the body, then drop the connection),
`fail(path, "ignore-range")`, `fail(path, "endless")` (200 with no Content-Length and zeros
until the client hangs up), `fail(path, "overlong")` (Content-Length of the file, then the file
twice), plus `throttle(path, bytes_per_second)` (below 4096 B/s the body drips in writes of
`rate` bytes, at least 1). A watchdog shuts it down
after `lifetime` seconds so a hung test cannot leave it running.

The hub's models are 110M+ parameters, so `fake_hub` serves the tiny MegEngine fixture
(tests/fixtures/mge/hub_bert.pkl) twice: under a registered test name whose sha256s are known
(`hub.register`, the hook a user has for a mirror), and under the real name
`uncased_L-12_H-768_A-12` (alias `bert-base-uncased`), which exercises the real URL layout
`<NAME>/bert_<hash>_<NAME>.pkl` and names that need no registration in a child process.

`python -m tests.hub_server load MODEL_JSON OUT.npz` is the child process that multi-process,
SIGKILL and disk-full tests start (see `child_command`).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Deque, Dict, List, Optional, Union

import pytest

ROOT = Path(__file__).resolve().parents[1]
MGE = ROOT / "tests" / "fixtures" / "mge"
TEST_NAME = "tiny_L-2_H-32_A-4"
TEST_WEIGHTS = f"bert_0123abcd_{TEST_NAME}.pkl"
REAL_NAME = "uncased_L-12_H-768_A-12"
REAL_WEIGHTS = "bert_4f2157f7_uncased_L-12_H-768_A-12.pkl"
Action = Union[int, str]


class HubServer:
    def __init__(self, files: Dict[str, bytes], lifetime: float = 180.0) -> None:
        self.files = dict(files)
        self.requests: List[dict] = []
        self.sent: Dict[str, int] = collections.Counter()
        self._faults: Dict[str, Deque[Action]] = collections.defaultdict(collections.deque)
        self._rates: Dict[str, float] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._watchdog = threading.Timer(lifetime, self.stop)
        self._watchdog.daemon = True
        self._stopped = False

    def __enter__(self) -> "HubServer":
        self._thread.start()
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._watchdog.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail(self, path: str, *actions: Action) -> None:
        """Queue one-shot faults for the next requests of `path`: an HTTP status, "cut", "ignore-range"."""
        with self._lock:
            self._faults[path].extend(actions)

    def throttle(self, path: str, bytes_per_second: Optional[float]) -> None:
        with self._lock:
            if bytes_per_second is None:
                self._rates.pop(path, None)
            else:
                self._rates[path] = bytes_per_second

    def gets(self, path: Optional[str] = None) -> List[dict]:
        with self._lock:
            return [r for r in self.requests if path is None or r["path"] == path]

    def wait_sent(self, path: str, nbytes: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sent[path] < nbytes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: only {self.sent[path]} of {nbytes} bytes sent in {timeout}s")
            time.sleep(0.02)

    def _next_fault(self, path: str) -> Optional[Action]:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None


def _handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a cut is a closed socket

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            with server._lock:
                server.requests.append({"path": path, "headers": dict(self.headers)})
            fault = server._next_fault(path)
            body = server.files.get(path)
            if isinstance(fault, int):
                return self._send(fault, b"scripted failure\n")
            if fault == "endless":
                return self._endless(path)
            if body is None:
                return self._send(404, b"not found\n")
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m and fault != "ignore-range":
                start = int(m.group(1))
                if start >= len(body):
                    return self._send(416, b"range not satisfiable\n", {"Content-Range": f"bytes */{len(body)}"})
                headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
                self._send(206, body[start:], headers, path, cut=fault == "cut")
            else:
                self._send(200, body, {}, path, cut=fault == "cut", overlong=fault == "overlong")

        def _endless(self, path: str) -> None:
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body ends when the connection does
            chunk = b"\0" * 65536
            try:
                while not server._stopped:
                    self.wfile.write(chunk)
                    with server._lock:
                        server.sent[path] += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return

        def _send(self, status: int, body: bytes, headers: Optional[dict] = None, path: str = "",
                  cut: bool = False, overlong: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            payload = body[: len(body) // 2] if cut else body + body if overlong else body
            try:
                with server._lock:
                    rate = server._rates.get(path)
                step = 4096 if not rate or rate >= 4096 else max(1, int(rate))  # a slow drip: bytes, not pages
                for i in range(0, len(payload), step):
                    chunk = payload[i:i + step]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    with server._lock:
                        server.sent[path] += len(chunk)
                        rate = server._rates.get(path)
                    if rate:
                        time.sleep(len(chunk) / rate)
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler


# ------------------------------------------------------------------------------ fixture model


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fixture_bytes():
    """(weights, config, vocab) bytes of the MegEngine fixture, served as a hub model."""
    weights = (MGE / "hub_bert.pkl").read_bytes()
    config = (MGE / "bert_config.json").read_bytes()
    vocab = "".join(["[PAD]\n", "[UNK]\n", "[CLS]\n", "[SEP]\n", "[MASK]\n"] +
                    [f"tok{i}\n" for i in range(5, json.loads(config)["vocab_size"])]).encode()
    return weights, config, vocab


def hub_files(name: str, weights_name: str) -> Dict[str, bytes]:
    """The fixture's three files at the paths the MegEngine hub uses for model `name`."""
    weights, config, vocab = fixture_bytes()
    return {f"/{name}/{weights_name}": weights, f"/{name}/bert_config.json": config, f"/{name}/vocab.txt": vocab}


def model_fields() -> dict:
    """HubModel(**model_fields()) is the registered test model, with the fixture's sha256s."""
    weights, config, vocab = fixture_bytes()
    return dict(name=TEST_NAME, weights=TEST_WEIGHTS, do_lower_case=True,
                weights_sha256=sha(weights), config_sha256=sha(config), vocab_sha256=sha(vocab))


def hub_env(url: str, cache: Path, **extra: str) -> Dict[str, str]:
    """Environment for the code under test: this server, this cache, fast retries, no proxy."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith("BERT_PORT_")}
    env.update(BERT_PORT_HUB_URL=url, BERT_PORT_CACHE=str(cache), BERT_PORT_QUIET="1",
               BERT_PORT_RETRY_DELAY="0.01", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _isolate_env(monkeypatch, env: Dict[str, str]) -> None:
    """This process sees only our BERT_PORT_* settings and no proxy (children get `env` whole)."""
    for k in [k for k in os.environ if k.startswith("BERT_PORT_") or k.lower().endswith("_proxy")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("BERT_PORT_") or k.lower() == "no_proxy":
            monkeypatch.setenv(k, v)


class Hub:
    """What `fake_hub` yields: the running server, the cache dir, the registered test model."""

    weights_path = f"/{TEST_NAME}/{TEST_WEIGHTS}"
    real_weights_path = f"/{REAL_NAME}/{REAL_WEIGHTS}"

    def __init__(self, server: HubServer, cache_dir: Path, model) -> None:
        self.server, self.cache, self.model = server, cache_dir, model

    def env(self, **extra: str) -> Dict[str, str]:
        return hub_env(self.server.url, self.cache, **extra)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server with no files yet, for the download layer alone."""
    with HubServer({}) as s:
        _isolate_env(monkeypatch, hub_env(s.url, tmp_path / "cache"))
        yield s


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    from bert_port import hub

    model = hub.register(hub.HubModel(**model_fields()), aliases=["bert-tiny-test"])
    try:
        with HubServer({**hub_files(TEST_NAME, TEST_WEIGHTS), **hub_files(REAL_NAME, REAL_WEIGHTS)}) as s:
            h = Hub(s, tmp_path / "cache", model)
            _isolate_env(monkeypatch, h.env())
            yield h
    finally:
        hub.unregister(TEST_NAME)


def forward(net) -> Dict[str, "np.ndarray"]:  # noqa: F821
    """`net` (a BertModel) on the MegEngine fixture's inputs, named as in outputs.npz."""
    import numpy as np
    import torch

    inputs = np.load(MGE / "outputs.npz")
    ids, types, mask = (torch.from_numpy(inputs[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
    with torch.no_grad():
        layers, pooled = net(ids.long(), types.long(), mask)
    out = {f"encoded_layer_{i}": t.numpy() for i, t in enumerate(layers)}
    out["pooled_output"] = pooled.numpy()
    return out


def run_model(directory_or_name, **kw) -> Dict[str, "np.ndarray"]:  # noqa: F821
    from bert_port import BertModel

    return forward(BertModel.from_pretrained(directory_or_name, **kw).eval())


def assert_matches_megengine(outputs) -> None:
    """Every encoder layer at every position (padding included) and the pooler."""
    import numpy as np

    ref = np.load(MGE / "outputs.npz")
    for i in range(int(ref["num_layers"])):
        name = f"encoded_layer_{i}"
        np.testing.assert_allclose(outputs[name], ref[name], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(outputs["pooled_output"], ref["pooled_output"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ child process


def child_command(out: Path, *, hang_after_convert: Optional[Path] = None, fsize_limit: Optional[int] = None,
                  name: str = TEST_NAME) -> List[str]:
    """argv of a child that registers the test model, loads `name` with BertModel.from_pretrained
    and saves its outputs on the fixture inputs to `out` (.npz). Errors: one line, exit 1."""
    cmd = [sys.executable, "-m", "tests.hub_server", "load", name, str(out)]
    if hang_after_convert:
        cmd += ["--hang-after-convert", str(hang_after_convert)]
    if fsize_limit:
        cmd += ["--fsize-limit", str(fsize_limit)]
    return cmd


def _child(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.hub_server load")
    p.add_argument("name")
    p.add_argument("out")
    p.add_argument("--hang-after-convert")
    p.add_argument("--fsize-limit", type=int)
    args = p.parse_args(argv)
    if args.fsize_limit:
        import resource
        import signal

        # A real write error from the kernel: writes past the limit fail with EFBIG (SIGXFSZ ignored).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
    import numpy as np

    from bert_port import hub

    hub.register(hub.HubModel(**model_fields()))
    if args.hang_after_convert:
        # Test instrument, not a stand-in: the real converter runs, then this process waits to be
        # SIGKILLed while the converted files exist only in the staging dir.
        import converters.convert as library

        real = library.convert_file

        def convert_then_hang(*a, **kw):
            result = real(*a, **kw)
            Path(args.hang_after_convert).write_text("converted")
            time.sleep(120)
            return result

        library.convert_file = convert_then_hang
    try:
        outputs = run_model(args.name)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    np.savez(args.out, **outputs)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["load"]:
        sys.exit("usage: python -m tests.hub_server load NAME OUT.npz [--hang-after-convert MARKER] [--fsize-limit N]")
    sys.exit(_child(sys.argv[2:]))
