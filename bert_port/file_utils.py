"""pytorch_pretrained_bert 0.6.2's `file_utils` names: the cache location, file names and `cached_path`.

The file names of a model directory are defined in `converters.files` and re-exported here.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union
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


__all__ = ["BERT_CONFIG_NAME", "CONFIG_NAME", "PYTORCH_PRETRAINED_BERT_CACHE", "SAFE_WEIGHTS_NAME", "TF_WEIGHTS_NAME",
           "WEIGHTS_NAME", "cached_path", "url_to_filename"]
