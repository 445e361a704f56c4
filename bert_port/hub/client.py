"""The download client: one hub file to disk, resumable, size- and time-capped, hash-checked.
Changes when the HTTP protocol handling changes (retries, ranges, timeouts, URL policy).

Retried: timeouts, 5xx/429 answers, a connection cut mid-body. Not retried: a host name that
does not resolve, a refused connection, 4xx answers: waiting would not change them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import re
import socket
import stat
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Optional

import requests
import urllib3

from bert_port.hub.settings import PathLike, Settings, settings
from converters import owned
from converters.errors import file_error
from converters.files import open_regular

logger = logging.getLogger("bert_port.hub")

MAX_DELAY = 30.0
CHUNK = 1 << 16


class HubError(OSError):
    """A pretrained model could not be fetched; the message names the model, URL or file.

    `resumable` is True when the network gave up part-way and a `.part` file was kept to resume.
    """

    resumable = False


HubError.__module__ = "bert_port.hub"  # where users import it from (tracebacks show this name)



def check_url(url: str, allow_http: bool = False) -> None:
    """https anywhere; plain http only to a loopback host (a local mirror, the tests) or when
    BERT_PORT_ALLOW_HTTP=1: no hub file has a published sha256, so TLS is all that authenticates it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme != "http":
        raise HubError(f"{url}: unsupported URL scheme {parts.scheme!r} (use https)")
    host = (parts.hostname or "").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not (loopback or allow_http):
        raise HubError(f"{url}: refusing plain http to {host or 'an empty host'}: nothing would authenticate the "
                       "files (the hub publishes no sha256s); use https, or set BERT_PORT_ALLOW_HTTP=1")


class _Transient(Exception):
    """A failure worth retrying: connection trouble, a timeout, a 5xx, a short body."""


class _Limits:
    """Size cap and overall deadline of one `download` call."""

    def __init__(self, url: str, max_bytes: Optional[int], deadline: float, deadline_s: float) -> None:
        self.url, self.max_bytes, self.deadline, self.deadline_s = url, max_bytes, deadline, deadline_s

    def check_time(self, part: "_Part") -> None:
        if time.monotonic() > self.deadline:
            kept = f"; {part.size} bytes kept in {part.path} to resume" if part.size else ""
            error = HubError(f"{self.url}: download not finished within {self.deadline_s:g} s "
                             f"(BERT_PORT_DOWNLOAD_TIMEOUT){kept}")
            error.resumable = True
            raise error

    def check_size(self, part: "_Part", size: int, what: str) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            part.reset()
            raise HubError(f"{self.url}: {what} {size} bytes, more than the {self.max_bytes}-byte limit for this "
                           "file; the download was deleted")

    def read_timeout(self, timeout):
        """(connect, read) timeouts, the read one cut to what is left of the deadline."""
        left = max(0.1, self.deadline - time.monotonic())
        if isinstance(timeout, tuple):
            return (min(timeout[0], left), min(timeout[1], left))
        return min(timeout, left) if timeout is not None else left


class _Part:
    """The `.part` file being filled, with the sha256 of the bytes it holds so far."""

    def __init__(self, path: Path, max_bytes: Optional[int] = None) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.size = 0
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes):
            self.reset()  # not something we wrote, or past the cap: start over
            return
        with open_regular(path, max_bytes) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                self.hasher.update(block)
                self.size += len(block)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher, self.size = hashlib.sha256(), 0


def download(url: str, dest: PathLike, *, sha256: Optional[str] = None, max_bytes: Optional[int] = None,
             session: Optional[requests.Session] = None, **policy) -> str:
    """Fetch `url` to `dest` atomically and return its sha256.

    Bytes go to `dest.part` (resumed with a Range request if one is left over) and are renamed
    to `dest` only once the length and, when given, the sha256 match. Timeouts, cuts and 5xx
    answers are retried with exponential backoff; 4xx answers, an unresolvable host name and a
    refused connection are not. A file larger than `max_bytes`, a body longer than its
    Content-Length, or a download unfinished after `download_timeout` seconds is a HubError.
    `policy` overrides the environment's settings for this call (`retries`, `retry_delay`,
    `timeout`, `quiet`, `download_timeout`: fields of `Settings`).
    """
    s = dataclasses.replace(settings(), **policy)
    check_url(url, s.allow_http)
    limits = _Limits(url, max_bytes, time.monotonic() + s.download_timeout, s.download_timeout)
    dest = Path(dest)
    try:
        owned.parent_dir(dest)
    except ValueError as e:  # owned's ConversionError: not a directory, cannot be created
        raise HubError(str(e)) from e
    part = _Part(dest.with_name(dest.name + ".part"), max_bytes)
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(requests.Session())
        _with_retries(session, url, part, s, limits)
    actual = part.hasher.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        part.reset()
        raise HubError(f"{url}: sha256 mismatch: expected {sha256}, got {actual}; the download was deleted")
    os.replace(part.path, dest)
    return actual


def _with_retries(session: requests.Session, url: str, part: "_Part", s: Settings, limits: _Limits) -> None:
    """`_fetch_once` until the part is whole; what a retry may cure is retried with backoff."""
    for attempt in range(s.retries + 1):
        try:
            limits.check_time(part)
            _fetch_once(session, url, part, s.timeout, s.quiet, limits)
            return
        except _Transient as e:
            if attempt == s.retries:
                kept = f"; {part.size} bytes kept in {part.path} to resume" if part.size else ""
                error = HubError(f"{url}: download failed after {s.retries + 1} attempt(s): {e}{kept}")
                error.resumable = True
                raise error from e
            delay = min(s.retry_delay * 2 ** attempt, MAX_DELAY, max(0.0, limits.deadline - time.monotonic()))
            logger.warning("%s: %s; retrying in %.1fs", url, e, delay)
            time.sleep(delay)


def _fetch_once(session: requests.Session, url: str, part: _Part, timeout, quiet: bool, limits: _Limits) -> None:
    # identity: Content-Length must count the bytes we store; close: the body ends where the
    # connection does, so a body longer than its Content-Length is seen, not silently cut
    headers = {"Accept-Encoding": "identity", "Connection": "close"}
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
    try:
        with session.get(url, headers=headers, stream=True, timeout=limits.read_timeout(timeout)) as r:
            total = _check_response(r, url, part)
            if total is not None:
                limits.check_size(part, total, "the server announces")
            if r.status_code != 416:  # 416 here: the part was already whole
                _stream(r, part, total, quiet, url, limits)
    except (HubError, _Transient):
        raise
    except (urllib3.exceptions.ProtocolError, requests.exceptions.ChunkedEncodingError) as e:
        raise _Transient(f"connection broken after {part.size} bytes") from e
    except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as e:
        why = _unreachable(e, url)
        if why:  # waiting would not change it: fail now, in one line, without the library's chain
            raise HubError(f"{url}: {why}") from None
        raise _Transient(f"{type(e).__name__}: {_first_line(e)}") from e
    except requests.RequestException as e:
        raise HubError(f"{url}: {_first_line(e)}") from e
    except OSError as e:  # local: disk full, permissions. Free the space; no retry.
        part.reset()
        raise file_error(part.path, e, f"write while downloading {url}", HubError) from e
    if total is not None and part.size != total:
        if part.size > total:
            part.reset()
        raise _Transient(f"connection closed after {part.size} of {total} bytes")


def _check_response(r: requests.Response, url: str, part: _Part) -> Optional[int]:
    """Validate the status; return the expected full length if the server says it."""
    if r.status_code == 416 and part.size:
        if r.headers.get("Content-Range", "").strip() == f"bytes */{part.size}":
            return part.size  # the part is already whole (killed before the rename)
        part.reset()  # stale: start over
        raise _Transient("server refused the resume range; restarting")
    if r.status_code >= 500 or r.status_code == 429:
        raise _Transient(f"HTTP {r.status_code} {r.reason}")
    if r.status_code not in (200, 206):
        hint = " (no such file on the hub: check the name and BERT_PORT_HUB_URL)" if r.status_code == 404 else ""
        raise HubError(f"{url}: HTTP {r.status_code} {r.reason}{hint}")
    encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # we asked for identity: lengths and ranges count raw bytes
        raise HubError(f"{url}: server sent Content-Encoding {encoding!r}, expected the file as is")
    length = r.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if r.status_code == 200:
        if part.size:  # the server ignored Range: take the whole body
            logger.info("%s: server does not resume; downloading from the start", url)
            part.reset()
        return length
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", "").strip())
    if not m or int(m.group(1)) != part.size:
        part.reset()
        raise _Transient(f"server resumed at the wrong offset ({r.headers.get('Content-Range')!r})")
    if m.group(3) != "*":
        return int(m.group(3))
    return part.size + length if length is not None else None


def _read_to_close(r: requests.Response) -> bool:
    """Make the response read until the server closes the connection instead of stopping at
    Content-Length, so that extra bytes are seen (and refused) rather than dropped. Only when the
    server said it closes (HTTP/1.0 or `Connection: close`); a kept-alive connection is read to
    Content-Length as before."""
    fp = getattr(r.raw, "_fp", None)  # urllib3 HTTPResponse -> http.client.HTTPResponse
    if fp is None or not getattr(fp, "will_close", False) or getattr(fp, "chunked", False) \
            or not hasattr(r.raw, "length_remaining") or not hasattr(fp, "length"):
        return False
    fp.length = None
    r.raw.length_remaining = None
    return True


def _stream(r: requests.Response, part: _Part, total: Optional[int], quiet: bool, url: str, limits: _Limits) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=part.size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=url.rsplit("/", 1)[-1], disable=quiet or not sys.stderr.isatty(), leave=False)
    # read1 (urllib3 >= 2) hands over what has arrived, so a cut loses none of it; iter_content
    # would drop the partly filled last chunk.
    read1 = getattr(r.raw, "read1", None)
    if read1 and total is not None:
        _read_to_close(r)
    chunks = iter(lambda: read1(CHUNK), b"") if read1 else r.iter_content(CHUNK)
    # O_NOFOLLOW: a link planted at the .part name is refused, never appended through
    fd = os.open(part.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with bar, open(fd, "ab") as f:
        for chunk in chunks:
            if total is not None and part.size + len(chunk) > total:
                part.reset()
                raise HubError(f"{url}: the server sent more than the {total} bytes its Content-Length "
                               "announced; the download was deleted")
            limits.check_size(part, part.size + len(chunk), "the body exceeds")
            limits.check_time(part)
            f.write(chunk)
            part.hasher.update(chunk)
            part.size += len(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())


def _unreachable(error: BaseException, url: str) -> Optional[str]:
    """Why the hub cannot be reached at all (a name that does not resolve, a refused connection),
    or None for what a retry may cure (timeouts, resets). Looks through requests' and urllib3's
    wrappers down to the socket error."""
    seen, stack = [], [error]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseException) and all(e is not s for s in seen):
            seen.append(e)
            stack += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    host = urllib.parse.urlsplit(url).hostname
    if any(isinstance(e, (socket.gaierror, urllib3.exceptions.NameResolutionError)) for e in seen):
        return f"cannot resolve the host name {host!r} (no network, or no DNS)"
    if any(isinstance(e, ConnectionRefusedError) for e in seen):
        return f"connection refused by {host} (nothing listens there)"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
