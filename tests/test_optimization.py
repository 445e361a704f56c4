"""BertAdam and the warmup schedules against pytorch_pretrained_bert 0.6.2 and hand-worked values."""
import math

import pytest
import torch

import bert_port as bp
from bert_port.optimization import (SCHEDULES, BertAdam, WarmupCosineWithHardRestartsSchedule, adamw_with_warmup,
                                    bert_param_groups)
from tests.conftest import TINY, scale_weights_

ppb = pytest.importorskip("pytorch_pretrained_bert")
ppb_opt = pytest.importorskip("pytorch_pretrained_bert.optimization")


@pytest.mark.parametrize("name", ["warmup_linear", "warmup_constant", "warmup_cosine", "none"])
def test_schedules_equal_the_reference(name):
    ours = SCHEDULES[name](warmup=0.1, t_total=50)
    theirs = ppb_opt.SCHEDULES[name](warmup=0.1, t_total=50)
    for step in range(0, 61):
        assert ours.get_lr(step) == theirs.get_lr(step, nowarn=True), step
    restarts = WarmupCosineWithHardRestartsSchedule(warmup=0.1, t_total=50, cycles=2.0)
    ref = ppb_opt.WarmupCosineWithHardRestartsSchedule(warmup=0.1, t_total=50, cycles=2.0)
    assert [restarts.get_lr(s) for s in range(51)] == [ref.get_lr(s, nowarn=True) for s in range(51)]


def test_warmup_linear_by_hand():
    s = SCHEDULES["warmup_linear"](warmup=0.2, t_total=10)
    # progress 0, .1 in warmup -> 0, .5; then (1 - p) / (1 - .2): p=.2 -> 1, p=.6 -> .5, p=1 -> 0
    assert [s.get_lr(k) for k in (0, 1, 2, 6, 10, 12)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    assert SCHEDULES[None](warmup=0.2, t_total=-1).get_lr(5) == 1.0


def test_one_step_by_hand():
    """No bias correction, eps outside the sqrt, decay added to the update, lr 1 at t_total=-1."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, 0.1])
    opt = BertAdam([p], lr=0.1, weight_decay=0.5, max_grad_norm=-1, e=1e-6)
    opt.step()
    # m = 0.1 g, v = 0.001 g^2 -> update = 0.1 g / (sqrt(0.001) |g| + 1e-6) + 0.5 p
    expected = []
    for w, g in ((1.0, 0.5), (-2.0, 0.1)):
        update = 0.1 * g / (math.sqrt(0.001) * abs(g) + 1e-6) + 0.5 * w
        expected.append(w - 0.1 * update)
    assert p.tolist() == pytest.approx(expected, rel=1e-6)


def test_first_step_of_warmup_has_lr_zero():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = BertAdam([p], lr=0.1, warmup=0.1, t_total=10)
    assert opt.get_lr() == [0]
    opt.step()
    assert p.tolist() == [1.0, 1.0, 1.0]  # the schedule is read at step 0 -> multiplier 0
    assert opt.get_lr() == pytest.approx([0.1 * 1 / 1.0])  # step 1: progress .1 = end of warmup


def test_clipping_is_per_tensor():
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    BertAdam([big, small], lr=0.0, max_grad_norm=1.0).step()
    assert big.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)  # scaled to norm 1 on its own
    assert small.grad.tolist() == pytest.approx([0.3, 0.4])  # untouched (a global norm would scale it)


def test_param_groups_exempt_bias_and_layernorm():
    model = bp.BertForTokenClassification(bp.BertConfig(**TINY), num_labels=3)
    decay, plain = bert_param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in plain["params"])
    assert not any("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_adamw_linear_warmup_lr_sequence():
    model = torch.nn.Linear(2, 2)
    opt, sched = adamw_with_warmup(model, lr=1.0, num_training_steps=10, warmup_proportion=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    # warmup 2 steps: 0, 1/2; then (10 - k) / 8 for k = 2..10
    assert lrs == pytest.approx([0, 0.5] + [(10 - k) / 8 for k in range(2, 11)])


def _ppb_recipe_groups(model, weight_decay):
    """The grouping of pytorch_pretrained_bert's examples (run_classifier.py), written out."""
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]


@pytest.fixture
def one_thread():
    """Fewer threads than cores: steady timing on a shared 2-core machine (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore:This overload of add_")  # ppb's BertAdam uses a deprecated torch overload
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.2])
def test_old_recipe_reproduces_the_loss_sequence(max_grad_norm, one_thread):
    """ppb model + ppb BertAdam vs ours, same weights and batches, dropout 0: 20 equal losses.

    With max_grad_norm 0.2 the per-tensor clipping hits the query/key/value tensors, which our
    encoder holds fused: they must still be clipped as three tensors.
    """
    cfg = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    theirs = ppb.BertForTokenClassification(ppb.BertConfig(**cfg), 5)
    scale_weights_(theirs, std=0.1)
    ours = bp.BertForTokenClassification(bp.BertConfig(**cfg), num_labels=5)
    # clone: loading assigns the given tensors, which would otherwise stay shared with ppb's parameters
    ours.load_pretrained_state_dict({k: v.clone() for k, v in theirs.state_dict().items()})
    assert not ours.missing_keys and not ours.unexpected_keys
    theirs.train()
    ours.train()
    kw = dict(lr=1e-3, warmup=0.1, t_total=20, schedule="warmup_linear", max_grad_norm=max_grad_norm)
    opt_theirs = ppb_opt.BertAdam(_ppb_recipe_groups(theirs, 0.01), **kw)
    opt_ours = BertAdam(bert_param_groups(ours, 0.01), **kw)
    g = torch.Generator().manual_seed(1)
    losses_theirs, losses_ours, clipped = [], [], set()
    for _ in range(20):
        ids = torch.randint(1, 99, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        mask[3, 5:] = 0
        labels = torch.randint(0, 5, (4, 12), generator=g)
        labels[:, 0] = labels[:, 3] = -100  # [CLS] and a later word piece
        for model, opt, out in ((theirs, opt_theirs, losses_theirs), (ours, opt_ours, losses_ours)):
            loss = model(ids, None, mask, labels)
            loss.backward()
            if model is theirs:
                clipped |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.norm() > max_grad_norm}
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
    diff = max(abs(a - b) for a, b in zip(losses_theirs, losses_ours))
    print(f"max_grad_norm {max_grad_norm}: loss-sequence max diff {diff:.3g}, {len(clipped)} tensors clipped")
    assert diff < 1e-5
    assert losses_theirs[-1] < losses_theirs[1] - 0.05  # it does learn
    assert any("classifier" in n for n in clipped)  # clipping really happened
    if max_grad_norm < 1:
        assert any("attention.self" in n for n in clipped)
