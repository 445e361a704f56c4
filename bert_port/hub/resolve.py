"""Filling the cache: a pretrained name -> a local directory of the converted model.
Changes when the cache-filling policy changes (locking, what is kept, how hub files are converted).

`resolve(name)` returns `<cache>/<NAME>/` holding `config.json`, `model.safetensors` and
`vocab.txt`, downloading the hub files and converting them once; later calls (and other
processes) reuse the cache without the network. The one call into the converter is
`_convert_into` below. Cross-process locking uses fcntl.flock, so this is POSIX only.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import requests

from bert_port import cache
from bert_port.hub.client import HubError, download
from bert_port.hub.registry import CONFIG_FILE, VOCAB_FILE, HubModel, get_model
from bert_port.hub.settings import PathLike, Settings, settings
from converters.atomic import atomic_write_json, temp_dir_beside
from converters import owned
from converters.errors import file_error
from converters.files import MAX_VOCAB_BYTES
from converters.output import copy_file

logger = logging.getLogger("bert_port.hub")


def resolve(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """The cache directory of `name`'s converted model, downloading and converting it if needed.

    A model that cannot be fetched (offline, no network, hub unreachable) is a HubError whose one
    line names the reason and the ways out (see `cannot_fetch`)."""
    model = get_model(name)
    s = settings(cache_dir)
    entry = s.cache_dir / model.name
    problems = cache.check_entry(entry)
    if not problems:
        return entry
    if s.offline:
        raise cannot_fetch(model.name, _offline_reason(entry, problems), s)
    if problems != ["missing"]:
        logger.warning("%s: cached copy in %s is unusable (%s); fetching it again", model.name, entry, problems[0])
    try:
        with _cache_errors(model, s), cache.lock(s.cache_dir / f"{model.name}.lock", model.name):
            if not cache.check_entry(entry):  # another process finished it while we waited
                return entry
            cache.sweep_temp_dirs(s.cache_dir, model.name)
            _fill(model, s, entry)
    except HubError as e:
        if not getattr(e, "fetching", False):
            raise
        raise cannot_fetch(model.name, str(e), s, e) from None  # the reason is in the message already
    return entry


def cannot_fetch(name: str, reason: str, s: Settings, cause: Optional[HubError] = None) -> HubError:
    """`reason` plus the three ways to a model without the hub, as one line; `.reason` keeps the
    reason alone (for `python -m bert_port.cache fetch`, where the advice would be circular)."""
    reason = reason if reason.startswith(f"{name}:") else f"{name}: {reason}"
    error = HubError(
        f"{reason}. Without the hub: set BERT_PORT_OFFLINE=1 with BERT_PORT_CACHE at a cache that holds "
        f"{name} (now {s.cache_dir}), or pass a local model directory instead of the name, or run "
        f"`python -m bert_port.cache fetch {name}` on a connected machine and copy its cache here")
    error.reason = reason
    error.resumable = getattr(cause, "resumable", False)
    return error


@contextlib.contextmanager
def _cache_errors(model: HubModel, s: Settings) -> Iterator[None]:
    """Turn a bare OSError from the cache itself (disk full, permissions) into one naming it."""
    try:
        yield
    except HubError:
        raise
    except OSError as e:
        raise file_error(model.name, e, f"write to the cache {s.cache_dir}", HubError) from e
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
        raise cannot_fetch(model.name, _offline_reason(entry), s)
    try:
        with _cache_errors(model, s), cache.lock(s.cache_dir / f"{model.name}.lock", model.name):
            if not cache.check_entry(entry):
                return entry / VOCAB_FILE
            owned.make_dirs(s.cache_dir, vocab.parent)  # never through a link below the cache root
            if not vocab.is_file():
                _download(f"{s.hub_url}/{model.name}/{VOCAB_FILE}", vocab, sha256=model.vocab_sha256,
                          max_bytes=model.max_bytes(VOCAB_FILE))
            atomic_write_json(tokenizer_config, {"do_lower_case": model.do_lower_case})
    except HubError as e:
        if not getattr(e, "fetching", False):
            raise
        raise cannot_fetch(model.name, str(e), s, e) from None
    return vocab


def _download(url: str, dest: Path, **kwargs) -> str:
    """`download`, its errors marked as failures to fetch (which `resolve` explains)."""
    try:
        return download(url, dest, **kwargs)
    except HubError as e:
        e.fetching = True
        raise


def _offline_reason(entry: Path, problems: Sequence[str] = ("missing",)) -> str:
    where = f"not in the cache ({entry})" if list(problems) == ["missing"] else \
        f"the cached copy in {entry} is unusable ({problems[0]})"
    return f"{entry.name}: {where} and BERT_PORT_OFFLINE=1 forbids downloading"


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
                digest = _download(url, dest, sha256=sha, session=session, max_bytes=cap)
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
