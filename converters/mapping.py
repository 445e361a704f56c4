"""The one name/layout table between source namings and bert_port's canonical state-dict keys.

Canonical keys are HF `BertForPreTraining`'s: `bert.` + the encoder's module path, then the heads
(`cls.predictions.*`, `cls.seq_relationship.*`, `classifier.*`, `qa_outputs.*`). Every converter, in
both directions, goes through `RULES`; nothing else in the package spells a TF variable name.

A rule is (TF1 name, canonical name, layout, torch shape). `{i}` is a layer index. Layouts:
  "T"  TF `kernel` [in, out] <-> torch `weight` [out, in] (transpose)
  ""   same layout (embedding tables [rows, H], biases, LayerNorm, and
       `cls/seq_relationship/output_weights`, which Google already stores as [2, H])
Shapes are written in config symbols: V vocab, P max positions, T token types, H hidden,
I intermediate, N labels (ints stand for themselves). The same table therefore gives the key set
and every shape of each architecture (`canonical_shapes`), and HEADS says which keys each has.
MegEngine Models' keys ARE the canonical keys (its BertModel has no `bert.` prefix).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

# The first component of every canonical key: the encoder's, then each head's.
CANONICAL_PREFIXES = ("bert.", "cls.", "classifier.", "qa_outputs.")

# Keys that alias another tensor and are never stored: the MLM decoder is the word embedding matrix
# (HF also exposes the MLM bias as decoder.bias).
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

_LAYER = "bert/encoder/layer_{i}/"
_TORCH_LAYER = "bert.encoder.layer.{i}."


Rule = Tuple[str, str, str, Tuple]


def _dense(tf: str, torch: str, n_out="H", n_in="H") -> List[Rule]:
    return [(f"{tf}/kernel", f"{torch}.weight", "T", (n_out, n_in)), (f"{tf}/bias", f"{torch}.bias", "", (n_out,))]


def _layer_norm(tf: str, torch: str) -> List[Rule]:
    return [(f"{tf}/gamma", f"{torch}.weight", "", ("H",)), (f"{tf}/beta", f"{torch}.bias", "", ("H",))]


RULES: List[Rule] = [
    ("bert/embeddings/word_embeddings", "bert.embeddings.word_embeddings.weight", "", ("V", "H")),
    ("bert/embeddings/position_embeddings", "bert.embeddings.position_embeddings.weight", "", ("P", "H")),
    ("bert/embeddings/token_type_embeddings", "bert.embeddings.token_type_embeddings.weight", "", ("T", "H")),
    *_layer_norm("bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm"),
    *_dense(_LAYER + "attention/self/query", _TORCH_LAYER + "attention.self.query"),
    *_dense(_LAYER + "attention/self/key", _TORCH_LAYER + "attention.self.key"),
    *_dense(_LAYER + "attention/self/value", _TORCH_LAYER + "attention.self.value"),
    *_dense(_LAYER + "attention/output/dense", _TORCH_LAYER + "attention.output.dense"),
    *_layer_norm(_LAYER + "attention/output/LayerNorm", _TORCH_LAYER + "attention.output.LayerNorm"),
    *_dense(_LAYER + "intermediate/dense", _TORCH_LAYER + "intermediate.dense", "I", "H"),
    *_dense(_LAYER + "output/dense", _TORCH_LAYER + "output.dense", "H", "I"),
    *_layer_norm(_LAYER + "output/LayerNorm", _TORCH_LAYER + "output.LayerNorm"),
    *_dense("bert/pooler/dense", "bert.pooler.dense"),
    # Pretraining heads (run_pretraining.py). The MLM decoder is tied to word_embeddings.
    *_dense("cls/predictions/transform/dense", "cls.predictions.transform.dense"),
    *_layer_norm("cls/predictions/transform/LayerNorm", "cls.predictions.transform.LayerNorm"),
    ("cls/predictions/output_bias", "cls.predictions.bias", "", ("V",)),
    ("cls/seq_relationship/output_weights", "cls.seq_relationship.weight", "", (2, "H")),  # [2, H]: no transpose
    ("cls/seq_relationship/output_bias", "cls.seq_relationship.bias", "", (2,)),
    # Fine-tuned heads: run_classifier.py ([num_labels, H], used with transpose_b) and run_squad.py.
    ("output_weights", "classifier.weight", "", ("N", "H")),
    ("output_bias", "classifier.bias", "", ("N",)),
    ("cls/squad/output_weights", "qa_outputs.weight", "", (2, "H")),
    ("cls/squad/output_bias", "qa_outputs.bias", "", (2,)),
]

# The head keys (canonical prefixes) of each architecture, most specific first: `architecture_of`
# returns the first whose heads are all present, `canonical_shapes` keeps `bert.` + these.
HEADS: Dict[str, Tuple[str, ...]] = {
    "BertForPreTraining": ("cls.predictions.", "cls.seq_relationship."),
    "BertForMaskedLM": ("cls.predictions.",),
    "BertForNextSentencePrediction": ("cls.seq_relationship.",),
    "BertForQuestionAnswering": ("qa_outputs.",),
    "BertForSequenceClassification": ("classifier.",),
    "BertForTokenClassification": ("classifier.",),  # same keys: only a source config can say so
    "BertModel": (),
}


# tensorflow/models' TF2 BertEncoder (`tf.train.Checkpoint(encoder=...)`): Keras tracks layers as
# `layer_with_weights-K`: 0 word, 1 position, 2 token type, 3 embedding LayerNorm, 4..L+3 the
# transformer layers, L+4 the pooler. Layer rules are relative to `layer_with_weights-{4+i}/`.
# Extra layouts: "qkv" kernel [H, A, D] -> [H, H]^T, bias [A, D] -> [H]; "out" kernel [A, D, H] -> [H, H]^T.
ENCODER_EMBEDDINGS = {
    "layer_with_weights-0/embeddings": "bert.embeddings.word_embeddings.weight",
    "layer_with_weights-1/embeddings": "bert.embeddings.position_embeddings.weight",
    "layer_with_weights-2/embeddings": "bert.embeddings.token_type_embeddings.weight",
    "layer_with_weights-3/gamma": "bert.embeddings.LayerNorm.weight",
    "layer_with_weights-3/beta": "bert.embeddings.LayerNorm.bias",
}
ENCODER_LAYER_RULES: List[Rule] = [
    *[(f"_attention_layer/_{p}_dense/{v}", f"attention.self.{p}.{w}", "qkv", ())
      for p in ("query", "key", "value") for v, w in (("kernel", "weight"), ("bias", "bias"))],
    ("_attention_output_dense/kernel", "attention.output.dense.weight", "out", ()),
    ("_attention_output_dense/bias", "attention.output.dense.bias", "", ()),
    ("_attention_layer/_output_dense/kernel", "attention.output.dense.weight", "out", ()),  # newer Keras MHA
    ("_attention_layer/_output_dense/bias", "attention.output.dense.bias", "", ()),
    *_layer_norm("_attention_layer_norm", "attention.output.LayerNorm"),
    *_dense("_intermediate_dense", "intermediate.dense"),
    *_dense("_output_dense", "output.dense"),
    *_layer_norm("_output_layer_norm", "output.LayerNorm"),
]
_ENCODER_NAME = re.compile(r"^(?:.*/)?(layer_with_weights-(\d+))/(.+)$")


def encoder_rule(path: str, num_layers: Optional[int]) -> Optional[Tuple[str, str]]:
    """Map one tensorflow/models encoder path (prefix such as `encoder/` ignored)."""
    m = _ENCODER_NAME.match(path)
    if m is None or num_layers is None:
        return None
    short, k, rest = m.group(1) + "/" + m.group(3), int(m.group(2)), m.group(3)
    if short in ENCODER_EMBEDDINGS:
        return ENCODER_EMBEDDINGS[short], ""
    if 4 <= k < 4 + num_layers:
        for source, target, layout, _ in ENCODER_LAYER_RULES:
            if rest == source:
                return f"bert.encoder.layer.{k - 4}.{target}", layout
    if k == 4 + num_layers and rest in ("kernel", "bias"):
        return f"bert.pooler.dense.{'weight' if rest == 'kernel' else 'bias'}", "T" if rest == "kernel" else ""
    return None


# Source names that are training state or bookkeeping, not weights: skipped and counted.
_SKIP_PARTS = {"adam_m", "adam_v", "AdamWeightDecayOptimizer", "AdamWeightDecayOptimizer_1",
               "global_step", "save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH", ".OPTIMIZER_SLOT"}

# TF2 `tf.train.Checkpoint` object paths end in this; strip it to get the variable's path.
_TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_TF_TO_TORCH = [(_compile(tf), torch, layout) for tf, torch, layout, _ in RULES]
_TORCH_TO_TF = [(_compile(torch), tf, layout) for tf, torch, layout, _ in RULES]


def _apply(rules, name: str) -> Optional[Tuple[str, str]]:
    for pattern, target, layout in rules:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group("i")) if "{i}" in target else target, layout
    return None


def to_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """Apply a rule's layout change: source layout -> torch layout ("T" is its own inverse)."""
    if layout == "T":
        return transpose(array)
    if layout == "qkv":  # kernel [H, A, D] -> weight [A*D, H]; bias [A, D] -> [A*D]
        return transpose(array.reshape(array.shape[0], -1)) if array.ndim == 3 else array.reshape(-1)
    if layout == "out":  # kernel [A, D, H] -> weight [H, A*D]
        return transpose(array.reshape(-1, array.shape[-1]))
    return array


def layout_shape(shape: Tuple[int, ...], layout: str) -> Tuple[int, ...]:
    """The shape `to_layout` gives an array of `shape`, computed without any array: a conversion
    checks every planned shape against the config before it reads or allocates anything."""
    shape = tuple(shape)
    if layout == "T":
        return shape[::-1] if len(shape) == 2 else shape
    if layout == "qkv":
        return (_product(shape[1:]), shape[0]) if len(shape) == 3 else (_product(shape),)
    if layout == "out" and shape:
        return (shape[-1], _product(shape[:-1]))
    return shape


def _product(dims: Tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def transpose(matrix: np.ndarray, rows: int = 64) -> np.ndarray:
    """A contiguous transpose, copied in row blocks: ~3x faster than np.ascontiguousarray(m.T),
    whose column-order reads miss the cache on BERT-sized matrices."""
    out = np.empty(matrix.shape[::-1], dtype=matrix.dtype)
    for start in range(0, matrix.shape[0], rows):
        out[:, start:start + rows] = matrix[start:start + rows].T
    return out


@dataclass
class Plan:
    """What a conversion will do, decided from names alone (before any tensor is read)."""

    renames: Dict[str, Tuple[str, str]] = field(default_factory=dict)  # source -> (target, layout)
    skipped: List[str] = field(default_factory=list)  # optimizer state / bookkeeping
    unknown: List[str] = field(default_factory=list)  # not understood: reported, not converted


def is_training_state(name: str) -> bool:
    parts = set(name.split("/"))
    return bool(parts & _SKIP_PARTS) or "optimizer" in name.lower()


def tf_variable_path(name: str) -> str:
    """`bert/…` for a TF1 name; a TF2 object path loses `.ATTRIBUTES/VARIABLE_VALUE` and a leading
    `model/` (HF's TF2 converter does the same)."""
    if name.endswith(_TF2_SUFFIX):
        name = name[: -len(_TF2_SUFFIX)]
    return name[len("model/"):] if name.startswith("model/") else name


def plan_from_tf(names: Iterable[str], encoder_layers: Optional[int] = None) -> Plan:
    """Map TF1 names, TF2 object paths and the tensorflow/models encoder naming."""
    plan = Plan()
    for name in names:
        if is_training_state(name):
            plan.skipped.append(name)
            continue
        path = tf_variable_path(name)
        hit = _apply(_TF_TO_TORCH, path) or encoder_rule(path, encoder_layers)
        if hit is None:
            plan.unknown.append(name)
        else:
            plan.renames[name] = hit
    return plan


def canonical_key(name: str) -> str:
    """A bert_port/HF state-dict key as a canonical one: BertModel's keys gain the `bert.` prefix."""
    return name if name.startswith(CANONICAL_PREFIXES) else "bert." + name


def plan_from_canonical(names: Iterable[str]) -> Plan:
    """canonical -> TF1 Google names (for torch2tf). The tied decoder and position_ids are dropped."""
    plan = Plan()
    for name in names:
        hit = _apply(_TORCH_TO_TF, name)
        if hit is not None:
            plan.renames[name] = hit
        elif name in TIED_KEYS or name.endswith("position_ids"):
            plan.skipped.append(name)
        else:
            plan.unknown.append(name)
    return plan


def canonical_from_mge(names: Iterable[str]) -> Plan:
    """MegEngine Models: BertModel keys (no prefix) or `bert.` + `classifier.` keys."""
    plan = Plan()
    for name in names:
        target = name if name.startswith(("bert.", "classifier.")) else "bert." + name
        if _apply(_TORCH_TO_TF, target) is None:
            plan.unknown.append(name)
        else:
            plan.renames[name] = (target, "")
    return plan


def canonical_from_torch(names: Iterable[str]) -> Plan:
    """A bert_port/HF/pytorch_pretrained_bert state dict: with or without `bert.`, old gamma/beta
    LayerNorm names; the tied decoder and position_ids are skipped."""
    plan = Plan()
    for name in names:
        renamed = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        target = canonical_key(renamed)
        if target in TIED_KEYS or name.endswith("position_ids"):
            plan.skipped.append(name)
        elif _apply(_TORCH_TO_TF, target) is None:
            plan.unknown.append(name)
        else:
            plan.renames[name] = (target, "")
    return plan


def mge_from_canonical(names: Iterable[str]) -> Plan:
    """canonical -> MegEngine Models keys: hub form (no prefix) unless there is a classifier."""
    names = list(names)
    has_classifier = any(n.startswith("classifier.") for n in names)
    plan = Plan()
    for name in names:
        if name.startswith("bert.") and _apply(_TORCH_TO_TF, name) is not None:
            plan.renames[name] = (name if has_classifier else name[len("bert."):], "")
        elif name.startswith("classifier."):
            plan.renames[name] = (name, "")
        else:  # MegEngine Models has no pretraining or QA heads
            plan.skipped.append(name)
    return plan


def canonical_shapes(config, architecture: str, num_labels: int = 2) -> Dict[str, Tuple[int, ...]]:
    """Shape of every stored tensor of `architecture` built from `config`, read off RULES without
    building a model (so converting needs no torch). tests/test_converters.py checks it against the
    real models."""
    size = {"V": config.vocab_size, "P": config.max_position_embeddings, "T": config.type_vocab_size,
            "H": config.hidden_size, "I": config.intermediate_size, "N": num_labels}
    heads = HEADS[architecture]
    shapes: Dict[str, Tuple[int, ...]] = {}
    for _, name, _, shape in RULES:
        if not (name.startswith("bert.") or name.startswith(heads)):
            continue
        dims = tuple(size[d] if isinstance(d, str) else d for d in shape)
        for i in range(config.num_hidden_layers) if "{i}" in name else (None,):
            shapes[name if i is None else name.replace("{i}", str(i))] = dims
    return shapes


def shape_mismatches(shapes: Dict[str, Tuple[int, ...]], config) -> List[str]:
    """Checkpoint tensors (any of our namings) whose shape differs from what `config` implies, as
    'name: checkpoint (..) vs config (..)'. Heads whose size the config does not fix (a classifier's
    labels) are left to the model. Used before a model is built, from the file's header alone."""
    expected = {**canonical_shapes(config, "BertForPreTraining"), **canonical_shapes(config, "BertForQuestionAnswering")}
    plan = canonical_from_torch(shapes)
    return [f"{name}: checkpoint {tuple(shapes[name])} vs model {expected[target]}"
            for name, (target, _) in plan.renames.items()
            if target in expected and tuple(shapes[name]) != expected[target]]


def architecture_of(canonical_names: Iterable[str]) -> str:
    """The HF/bert_port class whose keys these are: the first in HEADS whose heads are all present."""
    names = list(canonical_names)
    for architecture, heads in HEADS.items():
        if all(any(n.startswith(h) for n in names) for h in heads):
            return architecture
    return "BertModel"
