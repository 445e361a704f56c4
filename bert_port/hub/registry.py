"""The pretrained names bert_port knows: one `HubModel` per MegEngine hub model, with its aliases
and the size caps of its files. Changes when a model, an alias or a cap changes.

`register` is the hook for a mirror, a fine-tuned export or a test fixture.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

DEFAULT_HUB_URL = "https://data.megengine.org.cn/models/weights/bert"
CONFIG_FILE, VOCAB_FILE = "bert_config.json", "vocab.txt"
# Download size caps (SECURITY.md "Limits"). Weights: the float32 parameters the name's L/H imply
# with a vocabulary of up to MAX_VOCAB rows, pretraining heads included, x1.25 + 16 MiB slack.
MAX_VOCAB = 1 << 17  # the largest hub vocabulary (multilingual) has 119,547 rows
MAX_CONFIG_BYTES = 64 << 10
MAX_VOCAB_BYTES = 16 << 20  # multilingual vocab.txt: ~0.9 MiB
MAX_WEIGHTS_BYTES = 4 << 30  # names that say nothing of their architecture
_ARCH_RE = re.compile(r"(?:^|_)L-(\d{1,3})_H-(\d{1,5})(?:_|$)")


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
