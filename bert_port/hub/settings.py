"""Settings of the hub and the cache, read from environment variables at call time (not at import),
so that a test or a notebook can change them. Changes when a setting is added.

  BERT_PORT_HUB_URL      hub root (default: MegEngine's); layout <root>/<NAME>/<file>
  BERT_PORT_CACHE        cache root (default: ~/.cache/bert_port); `cache_dir=` overrides it
  BERT_PORT_OFFLINE=1    never touch the network; a model missing from the cache is an error
  BERT_PORT_QUIET=1      no progress bars
  BERT_PORT_RETRIES      retries after a timeout or a 5xx answer (default 5)
  BERT_PORT_RETRY_DELAY  first retry delay in seconds, doubled each time (default 1)
  BERT_PORT_DOWNLOAD_TIMEOUT  overall deadline of one file's download, retries included (default 3600 s)
  BERT_PORT_ALLOW_HTTP=1 allow a plain-http hub URL on a non-loopback host (refused by default:
                         no hub file has a published sha256, so only TLS authenticates it)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

from bert_port.hub.registry import DEFAULT_HUB_URL

PathLike = Union[str, os.PathLike]
DEFAULT_CACHE = "~/.cache/bert_port"
DEFAULT_DOWNLOAD_TIMEOUT = 3600.0


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
