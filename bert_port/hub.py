"""Pretrained names: the MegEngine hub registry, downloading, and the converted-model cache.

`resolve(name)` turns a name such as `bert-base-uncased` into a local directory holding
`config.json`, `model.safetensors` and `vocab.txt`, downloading the MegEngine hub files and
converting them once; later calls (and other processes) reuse the cache without the network.

Settings are read from the environment at call time, so a test or a notebook can change them:
  BERT_PORT_HUB_URL      hub root (default: MegEngine's); layout <root>/<NAME>/<file>
  BERT_PORT_CACHE        cache root (default: ~/.cache/bert_port); `cache_dir=` overrides it
  BERT_PORT_OFFLINE=1    never touch the network; a model missing from the cache is an error
  BERT_PORT_QUIET=1      no progress bars
  BERT_PORT_RETRIES      retries after a failed attempt (default 5)
  BERT_PORT_RETRY_DELAY  first retry delay in seconds, doubled each time (default 1)
  BERT_PORT_DOWNLOAD_TIMEOUT  overall deadline of one file's download, retries included (default 3600 s)
  BERT_PORT_ALLOW_HTTP=1 allow a plain-http hub URL on a non-loopback host (refused by default:
                         no hub file has a published sha256, so only TLS authenticates it)
Cross-process locking uses fcntl.flock, so this module is POSIX only.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import urllib.parse
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import requests
import urllib3

from bert_port import cache
from converters import owned
from converters.atomic import atomic_write_json, temp_dir_beside
from converters.files import open_regular
from converters.output import copy_file

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DEFAULT_HUB_URL = "https://data.megengine.org.cn/models/weights/bert"
DEFAULT_CACHE = "~/.cache/bert_port"
CONFIG_FILE, VOCAB_FILE = "bert_config.json", "vocab.txt"
MAX_DELAY = 30.0
CHUNK = 1 << 16
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0
# Download size caps (SECURITY.md "Limits"). Weights: the float32 parameters the name's L/H imply
# with a vocabulary of up to MAX_VOCAB rows, pretraining heads included, x1.25 + 16 MiB slack.
MAX_VOCAB = 1 << 17  # the largest hub vocabulary (multilingual) has 119,547 rows
MAX_CONFIG_BYTES = 64 << 10
MAX_VOCAB_BYTES = 16 << 20  # multilingual vocab.txt: ~0.9 MiB
MAX_WEIGHTS_BYTES = 4 << 30  # names that say nothing of their architecture
_ARCH_RE = re.compile(r"(?:^|_)L-(\d{1,3})_H-(\d{1,5})(?:_|$)")


class HubError(OSError):
    """A pretrained model could not be fetched; the message names the model, URL or file.

    `resumable` is True when the network gave up part-way and a `.part` file was kept to resume.
    """

    resumable = False


@dataclass(frozen=True)
class HubModel:
    """One model on the hub. sha256 values are None when unknown (the real hub publishes none)."""

    name: str
    weights: str
    do_lower_case: bool
    weights_sha256: Optional[str] = None
    vocab_sha256: Optional[str] = None
    config_sha256: Optional[str] = None

    def __post_init__(self) -> None:
        # Names and file names become paths and URLs: refuse anything that could escape them.
        for value in (self.name, self.weights):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) or ".." in value:
                raise ValueError(f"{value!r}: not a valid hub model or file name")

    @property
    def max_weights_bytes(self) -> int:
        """Largest weights file accepted: what the L-<layers>_H-<hidden> in the name implies."""
        m = _ARCH_RE.search(self.name)
        if not m:
            return MAX_WEIGHTS_BYTES
        layers, hidden = int(m.group(1)), int(m.group(2))
        params = layers * (12 * hidden * hidden + 13 * hidden) + (MAX_VOCAB + 1024) * hidden + 3 * hidden * hidden + MAX_VOCAB
        return int(params * 4 * 1.25) + (16 << 20)

    def max_bytes(self, file_name: str) -> int:
        if file_name == CONFIG_FILE:
            return MAX_CONFIG_BYTES
        if file_name == VOCAB_FILE:
            return MAX_VOCAB_BYTES
        return self.max_weights_bytes

    @property
    def files(self) -> Tuple[Tuple[str, Optional[str]], ...]:
        """(file name, sha256) for each hub file, smallest first so a bad name fails fast."""
        return ((CONFIG_FILE, self.config_sha256), (VOCAB_FILE, self.vocab_sha256), (self.weights, self.weights_sha256))


_MODELS: Dict[str, HubModel] = {}
_KEYS: Dict[str, str] = {}  # normalised spelling -> canonical name
_ALIASES: Dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def register(model: HubModel, aliases: Iterable[str] = ()) -> HubModel:
    """Add a model (a mirror, a fine-tuned export, a test fixture) under its name and aliases."""
    for spelling in (model.name, *aliases):
        owner = _KEYS.get(_key(spelling))
        if owner is not None and owner != model.name:
            raise ValueError(f"{spelling}: already names {owner}")
    _MODELS[model.name] = model
    _KEYS[_key(model.name)] = model.name
    for alias in aliases:
        _KEYS[_key(alias)] = model.name
        _ALIASES[alias] = model.name
    return model


def unregister(name: str) -> None:
    canonical = canonical_name(name)
    del _MODELS[canonical]
    for table in (_KEYS, _ALIASES):
        for k in [k for k, v in table.items() if v == canonical]:
            del table[k]


for _name, _hash, _lower, _alias in [
    ("uncased_L-12_H-768_A-12", "4f2157f7", True, "bert-base-uncased"),
    ("cased_L-12_H-768_A-12", "b9727c2f", False, "bert-base-cased"),
    ("uncased_L-24_H-1024_A-16", "222f5012", True, "bert-large-uncased"),
    ("cased_L-24_H-1024_A-16", "01f2a65f", False, "bert-large-cased"),
    ("chinese_L-12_H-768_A-12", "ee91be1a", True, "bert-base-chinese"),
    ("multi_cased_L-12_H-768_A-12", "283ceec5", False, "bert-base-multilingual-cased"),
    ("wwm_uncased_L-24_H-1024_A-16", "e2780a6a", True, "bert-large-uncased-whole-word-masking"),
    ("wwm_cased_L-24_H-1024_A-16", "0a8f1389", False, "bert-large-cased-whole-word-masking"),
]:
    register(HubModel(_name, f"bert_{_hash}_{_name}.pkl", do_lower_case=_lower), aliases=[_alias])


def is_known_name(name: str) -> bool:
    return isinstance(name, str) and _key(name) in _KEYS


def canonical_name(name: str) -> str:
    try:
        return _KEYS[_key(name)]
    except KeyError:
        raise ValueError(f"{name}: not a known pretrained model name (known: {', '.join(known_names())})") from None


def known_names() -> List[str]:
    """Canonical names and their aliases."""
    return sorted(_MODELS) + sorted(_ALIASES)


def weights_url(name: str, hub_url: str = DEFAULT_HUB_URL) -> str:
    """Where the hub keeps a model's weight file."""
    model = get_model(name)
    return f"{hub_url.rstrip('/')}/{model.name}/{model.weights}"


def vocab_url(name: str, hub_url: str = DEFAULT_HUB_URL) -> str:
    return f"{hub_url.rstrip('/')}/{get_model(name).name}/{VOCAB_FILE}"


def get_model(name: str) -> HubModel:
    return _MODELS[canonical_name(name)]


def do_lower_case_for(name: str) -> bool:
    """The tokenizer casing the model was trained with (Google's README: chinese is lower-cased)."""
    return get_model(name).do_lower_case


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    hub_url: str
    cache_dir: Path
    offline: bool
    quiet: bool
    retries: int
    retry_delay: float
    timeout: Tuple[float, float] = (10.0, 60.0)  # (connect, read) seconds
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT  # one file, all attempts
    allow_http: bool = False


def _env_flag(var: str) -> bool:
    value = os.environ.get(var, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{var}={os.environ[var]!r}: expected 1/0 (or true/false, yes/no, on/off)")


def _env_number(var: str, default: float, kind: type) -> float:
    raw = os.environ.get(var, "").strip()
    try:
        value = kind(raw) if raw else default
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected a {kind.__name__}") from None
    if value < 0:
        raise ValueError(f"{var}={raw!r}: must not be negative")
    return value


def settings(cache_dir: Optional[PathLike] = None) -> Settings:
    """The current settings, read from the environment now (not at import)."""
    root = cache_dir if cache_dir is not None else (os.environ.get("BERT_PORT_CACHE") or DEFAULT_CACHE)
    return Settings(
        hub_url=(os.environ.get("BERT_PORT_HUB_URL") or DEFAULT_HUB_URL).rstrip("/"),
        cache_dir=Path(root).expanduser(),
        offline=_env_flag("BERT_PORT_OFFLINE"),
        quiet=_env_flag("BERT_PORT_QUIET"),
        retries=int(_env_number("BERT_PORT_RETRIES", 5, int)),
        retry_delay=_env_number("BERT_PORT_RETRY_DELAY", 1.0, float),
        download_timeout=_env_number("BERT_PORT_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT, float),
        allow_http=_env_flag("BERT_PORT_ALLOW_HTTP"),
    )


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


# ---------------------------------------------------------------------------------- download


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


def download(
    url: str,
    dest: PathLike,
    *,
    sha256: Optional[str] = None,
    retries: Optional[int] = None,
    retry_delay: Optional[float] = None,
    timeout: Optional[Tuple[float, float]] = None,
    quiet: Optional[bool] = None,
    session: Optional[requests.Session] = None,
    max_bytes: Optional[int] = None,
    deadline_s: Optional[float] = None,
) -> str:
    """Fetch `url` to `dest` atomically and return its sha256.

    Bytes go to `dest.part` (resumed with a Range request if one is left over) and are renamed
    to `dest` only once the length and, when given, the sha256 match. Connection errors,
    timeouts and 5xx answers are retried with exponential backoff; 4xx answers are not.
    A file larger than `max_bytes`, a body longer than its Content-Length, or a download still
    unfinished `deadline_s` seconds (default BERT_PORT_DOWNLOAD_TIMEOUT) after the call is a HubError.
    """
    s = settings()
    check_url(url, s.allow_http)
    retries = s.retries if retries is None else retries
    retry_delay = s.retry_delay if retry_delay is None else retry_delay
    deadline_s = s.download_timeout if deadline_s is None else deadline_s
    limits = _Limits(url, max_bytes, time.monotonic() + deadline_s, deadline_s)
    dest = Path(dest)
    try:
        owned.parent_dir(dest)
    except ValueError as e:  # owned's ConversionError: not a directory, cannot be created
        raise HubError(str(e)) from e
    part = _Part(dest.with_name(dest.name + ".part"), max_bytes)
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(requests.Session())
        for attempt in range(retries + 1):
            try:
                limits.check_time(part)
                _fetch_once(session, url, part, timeout or s.timeout, s.quiet if quiet is None else quiet, limits)
                break
            except _Transient as e:
                if attempt == retries:
                    kept = f"; {part.size} bytes kept in {part.path} to resume" if part.size else ""
                    error = HubError(f"{url}: download failed after {retries + 1} attempt(s): {e}{kept}")
                    error.resumable = True
                    raise error from e
                delay = min(retry_delay * 2 ** attempt, MAX_DELAY, max(0.0, limits.deadline - time.monotonic()))
                logger.warning("%s: %s; retrying in %.1fs", url, e, delay)
                time.sleep(delay)
    actual = part.hasher.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        part.reset()
        raise HubError(f"{url}: sha256 mismatch: expected {sha256}, got {actual}; the download was deleted")
    os.replace(part.path, dest)
    return actual


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
        raise _Transient(f"{type(e).__name__}: {_first_line(e)}") from e
    except requests.RequestException as e:
        raise HubError(f"{url}: {_first_line(e)}") from e
    except OSError as e:  # local: disk full, permissions. Free the space; no retry.
        part.reset()
        raise HubError(f"{part.path}: cannot write while downloading {url}: {e.strerror or e}") from e
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------- resolve


def resolve(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """The cache directory of `name`'s converted model, downloading and converting it if needed."""
    model = get_model(name)
    s = settings(cache_dir)
    entry = s.cache_dir / model.name
    problems = cache.check_entry(entry)
    if not problems:
        return entry
    if s.offline:
        raise HubError(_offline_message(model.name, entry, problems))
    if problems != ["missing"]:
        logger.warning("%s: cached copy in %s is unusable (%s); fetching it again", model.name, entry, problems[0])
    with _cache_errors(model, s), cache.lock(s.cache_dir / f"{model.name}.lock", model.name):
        if not cache.check_entry(entry):  # another process finished it while we waited
            return entry
        cache.sweep_temp_dirs(s.cache_dir, model.name)
        _fill(model, s, entry)
    return entry


@contextlib.contextmanager
def _cache_errors(model: HubModel, s: Settings) -> Iterator[None]:
    """Turn a bare OSError from the cache itself (disk full, permissions) into one naming it."""
    try:
        yield
    except HubError:
        raise
    except OSError as e:
        raise HubError(f"{model.name}: cannot write to the cache {s.cache_dir}: {e.strerror or e}") from e
    except (owned.UnsafePath, owned.WriteFailed) as e:  # a link inside the cache root, a full disk
        raise HubError(f"{model.name}: cache {s.cache_dir}: {e}") from e


def _fill(model: HubModel, s: Settings, entry: Path) -> None:
    """Download and convert under the lock. Downloads are kept only to resume a broken connection."""
    downloads = s.cache_dir / cache.DOWNLOADS / model.name
    existed = downloads.exists()
    owned.make_dirs(s.cache_dir, downloads)  # never through a link: `downloads` may not lead outside the root
    try:
        fetched = _fetch_all(model, s, downloads)
        _convert_into(model, s, downloads, fetched, entry)
    except Exception as e:
        if not existed and not getattr(e, "resumable", False):
            _remove_downloads(s.cache_dir, downloads)  # leave the cache as it was
        raise
    _remove_downloads(s.cache_dir, downloads)


def _remove_downloads(root: Path, downloads: Path) -> None:
    cache.remove_tree(root, downloads)
    with contextlib.suppress(OSError, ValueError):
        owned.contained(root, downloads.parent).rmdir()  # only if no other model is mid-download


def resolve_vocab(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """`name`'s vocab.txt, fetching only that file when the model itself is not cached.

    A `tokenizer_config.json` with the model's casing sits beside the returned file either way.
    """
    model = get_model(name)
    s = settings(cache_dir)
    entry = s.cache_dir / model.name
    vocab = s.cache_dir / cache.DOWNLOADS / model.name / VOCAB_FILE
    tokenizer_config = vocab.parent / "tokenizer_config.json"
    if not cache.check_entry(entry):
        return entry / VOCAB_FILE
    if vocab.is_file() and tokenizer_config.is_file():
        return vocab
    if s.offline and not vocab.is_file():
        raise HubError(_offline_message(model.name, entry))
    with _cache_errors(model, s), cache.lock(s.cache_dir / f"{model.name}.lock", model.name):
        if not cache.check_entry(entry):
            return entry / VOCAB_FILE
        owned.make_dirs(s.cache_dir, vocab.parent)  # never through a link below the cache root
        if not vocab.is_file():
            download(f"{s.hub_url}/{model.name}/{VOCAB_FILE}", vocab, sha256=model.vocab_sha256,
                     max_bytes=model.max_bytes(VOCAB_FILE))
        atomic_write_json(tokenizer_config, {"do_lower_case": model.do_lower_case})
    return vocab


def _offline_message(name: str, entry: Path, problems: Sequence[str] = ("missing",)) -> str:
    where = f"not in the cache ({entry})" if list(problems) == ["missing"] else \
        f"the cached copy in {entry} is unusable ({problems[0]})"
    return (
        f"{name}: {where} and BERT_PORT_OFFLINE=1 forbids downloading; "
        f"fill the cache once with network access (unset BERT_PORT_OFFLINE, or run "
        f"`python -m bert_port.cache fetch {name}`), or point BERT_PORT_CACHE at a cache that holds it"
    )


def _fetch_all(model: HubModel, s: Settings, downloads: Path) -> Dict[str, Dict[str, object]]:
    """Download the hub files (reusing completed ones from an interrupted run); return their records."""
    records: Dict[str, Dict[str, object]] = {}
    with requests.Session() as session:
        for file_name, sha in model.files:
            url, dest = f"{s.hub_url}/{model.name}/{file_name}", downloads / file_name
            cap = model.max_bytes(file_name)
            kept = dest.is_file() and not dest.is_symlink() and dest.stat().st_size <= cap
            digest = cache.sha256_file(dest) if kept else None
            if digest is None or (sha is not None and digest != sha.lower()):
                logger.info("downloading %s", url)
                digest = download(url, dest, sha256=sha, session=session, max_bytes=cap)
            records[file_name] = {"url": url, "size": dest.stat().st_size, "sha256": digest}
    return records


def _convert_into(model: HubModel, s: Settings, downloads: Path, fetched: Dict[str, Dict[str, object]],
                  entry: Path) -> None:
    """Convert in a temp dir, write the manifest last, then rename the whole dir into place."""
    try:
        from converters.convert import ConvertOptions, convert_file
    except ImportError as e:
        raise HubError(f"{model.name}: the MegEngine converter is unavailable ({e})") from e
    staging = temp_dir_beside(s.cache_dir / model.name)
    try:
        out = staging / model.name
        try:
            options = ConvertOptions(downloads / CONFIG_FILE, out, vocab=downloads / VOCAB_FILE, force=True)
            convert_file("megengine", downloads / model.weights, options)
        except owned.WriteFailed:  # a full disk, not bad hub bytes: reported as a cache write error
            raise
        except ValueError as e:  # ConversionError: the downloaded bytes are bad; fetch afresh next time
            _remove_downloads(s.cache_dir, downloads)
            raise HubError(f"{model.name}: cannot convert the hub files from {s.hub_url}/{model.name}/: {e}") from e
        if not (out / VOCAB_FILE).is_file():
            copy_file(downloads / VOCAB_FILE, out / VOCAB_FILE, "vocab", MAX_VOCAB_BYTES)
        if not (out / "tokenizer_config.json").is_file():  # lets HF tokenizers load the dir with the right casing
            atomic_write_json(out / "tokenizer_config.json", {"do_lower_case": model.do_lower_case})
        cache.write_manifest(out, model.name, {"hub_url": s.hub_url, "files": fetched})
        cache.install_dir(out, entry)
    finally:
        cache.remove_tree(s.cache_dir, staging)
