"""pytorch_pretrained_bert 0.6.2's `file_utils` names: the cache location, file names and `cached_path`.

The file names of a model directory are defined in `converters.files` and re-exported here.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Optional, Set, Tuple, Union
from urllib.parse import urlparse

from converters.files import BERT_CONFIG_NAME, CONFIG_NAME, SAFE_WEIGHTS_NAME, TF_WEIGHTS_NAME, WEIGHTS_NAME

# The reference's download cache (its value and environment override), for scripts that build
# `cache_dir` from it. bert_port's own model cache is BERT_PORT_CACHE (see bert_port.hub).
PYTORCH_PRETRAINED_BERT_CACHE = Path(os.getenv("PYTORCH_PRETRAINED_BERT_CACHE",
                                               Path.home() / ".pytorch_pretrained_bert"))


def url_to_filename(url: str, etag: Optional[str] = None) -> str:
    """The reference's cache file name for a URL: sha256(url), then "." + sha256(etag) if given."""
    name = hashlib.sha256(url.encode("utf-8")).hexdigest()
    return name + ("." + hashlib.sha256(etag.encode("utf-8")).hexdigest() if etag else "")


def cached_path(url_or_filename: Union[str, os.PathLike], cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """A local path for `url_or_filename`: an existing file as is; an http(s) URL downloaded once
    into `cache_dir` (default PYTORCH_PRETRAINED_BERT_CACHE) and reused after.

    Raises EnvironmentError for a missing local file and ValueError for anything else, as the reference.
    """
    from bert_port import hub

    name = str(url_or_filename)
    scheme = urlparse(name).scheme
    if scheme in ("http", "https"):
        root = Path(cache_dir if cache_dir is not None else PYTORCH_PRETRAINED_BERT_CACHE).expanduser()
        dest = root / url_to_filename(name)
        if not dest.is_file():
            hub.download(name, dest)
        return str(dest)
    if os.path.exists(name):
        return name
    if scheme == "":
        raise EnvironmentError(f"file {name} not found")
    raise ValueError(f"unable to parse {name} as a URL or as a local path")


def get_from_cache(url: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """The reference's name for the URL branch of `cached_path`: the cached copy of `url`, downloaded if missing."""
    return cached_path(url, cache_dir)


def http_get(url: str, temp_file: IO[bytes]) -> None:
    """Write the body of `url` into the open binary file `temp_file` (downloaded by `hub.download`)."""
    from bert_port import hub

    with tempfile.TemporaryDirectory() as tmp:
        with open(hub.download(url, Path(tmp) / "body"), "rb") as body:
            shutil.copyfileobj(body, temp_file)


def filename_to_url(filename: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Tuple[str, Optional[str]]:
    """(url, etag) of a file the reference cached in `cache_dir`, from the `.json` it writes next to it.

    bert_port's own downloads keep no such record; as in the reference, a missing one is EnvironmentError.
    """
    path = os.path.join(cache_dir if cache_dir is not None else PYTORCH_PRETRAINED_BERT_CACHE, filename)
    for needed in (path, path + ".json"):
        if not os.path.exists(needed):
            raise EnvironmentError(f"file {needed} not found")
    with open(path + ".json", encoding="utf-8") as meta:
        record = json.load(meta)
    return record["url"], record["etag"]


def split_s3_path(url: str) -> Tuple[str, str]:
    """("bucket", "key/path") of an s3:// URL; ValueError if either part is missing."""
    parsed = urlparse(url)
    if not parsed.netloc or not parsed.path:
        raise ValueError(f"bad s3 path {url}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_request(func: Callable) -> Callable:
    """The reference's decorator for S3 calls; bert_port reads no S3 URLs, so a decorated call raises."""
    @functools.wraps(func)
    def refuse(url: str, *args, **kwargs):
        raise NotImplementedError(f"{func.__name__}({url!r}): bert_port does not read s3:// URLs; "
                                  "download the file and pass its local path")
    return refuse


@s3_request
def s3_etag(url: str) -> Optional[str]:
    """The ETag of an S3 object (not supported: raises NotImplementedError)."""


@s3_request
def s3_get(url: str, temp_file: IO[bytes]) -> None:
    """Download an S3 object (not supported: raises NotImplementedError)."""


def read_set_from_file(filename: Union[str, os.PathLike]) -> Set[str]:
    """The distinct lines of a UTF-8 text file, trailing whitespace removed."""
    with open(filename, encoding="utf-8") as lines:
        return {line.rstrip() for line in lines}


def get_file_extension(path: str, dot: bool = True, lower: bool = True) -> str:
    """`path`'s extension, with or without its dot, lower-cased unless `lower=False`."""
    extension = os.path.splitext(path)[1][(0 if dot else 1):]
    return extension.lower() if lower else extension


__all__ = ["BERT_CONFIG_NAME", "CONFIG_NAME", "PYTORCH_PRETRAINED_BERT_CACHE", "SAFE_WEIGHTS_NAME", "TF_WEIGHTS_NAME",
           "WEIGHTS_NAME", "cached_path", "filename_to_url", "get_file_extension", "get_from_cache", "http_get",
           "read_set_from_file", "s3_etag", "s3_get", "s3_request", "split_s3_path", "url_to_filename"]
