"""Pretrained names: the MegEngine hub registry, its settings, the download client, and filling
the converted-model cache. One module per reason to change:

  registry   which names exist (HubModel, register, aliases, size caps of their files)
  settings   BERT_PORT_* environment variables, read at call time
  client     downloading one file (resume, retries, caps, URL policy)
  resolve    name -> cache directory (lock, download, convert, manifest)

Every public name is importable from `bert_port.hub` itself.
"""
from __future__ import annotations

import hashlib  # noqa: F401  (kept importable: tests hash with hub.hashlib)

from bert_port.hub.client import CHUNK, MAX_DELAY, HubError, check_url, download
from bert_port.hub.registry import (CONFIG_FILE, DEFAULT_HUB_URL, MAX_CONFIG_BYTES, MAX_VOCAB, MAX_VOCAB_BYTES,
                                    MAX_WEIGHTS_BYTES, VOCAB_FILE, HubModel, canonical_name, do_lower_case_for,
                                    get_model, is_known_name, known_names, register, unregister, vocab_url,
                                    weights_url)
from bert_port.hub.resolve import resolve, resolve_vocab
from bert_port.hub.settings import DEFAULT_CACHE, DEFAULT_DOWNLOAD_TIMEOUT, Settings, settings

__all__ = [
    "CHUNK", "CONFIG_FILE", "DEFAULT_CACHE", "DEFAULT_DOWNLOAD_TIMEOUT", "DEFAULT_HUB_URL", "HubError", "HubModel",
    "MAX_CONFIG_BYTES", "MAX_DELAY", "MAX_VOCAB", "MAX_VOCAB_BYTES", "MAX_WEIGHTS_BYTES", "Settings", "VOCAB_FILE",
    "canonical_name", "check_url", "do_lower_case_for", "download", "get_model", "is_known_name", "known_names",
    "register", "resolve", "resolve_vocab", "settings", "unregister", "vocab_url", "weights_url",
]
