"""The README's code runs as written (with the pretrained name pointed at local real weights)."""
import re

import torch

from tests.conftest import ROOT


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_token_tagging_flow_runs(minilm_dir):
    (block,) = [b for b in python_blocks() if "BertForTokenTagging" in b]
    code = block.replace('"bert-base-uncased"', repr(str(minilm_dir)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["loss"].item() > 0 and scope["model"].classifier.weight.grad is not None
    assert scope["predicted"].shape == scope["input_ids"].shape
    assert torch.isfinite(scope["loss"])
