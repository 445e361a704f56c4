"""Optimizers for fine-tuning: pytorch_pretrained_bert 0.6.2's BertAdam, and torch AdamW + warmup.

BertAdam is kept so that old recipes reproduce exactly. Its semantics differ from torch's AdamW
in ways that change results, all kept here:
  * no bias correction: m and v start at 0 and are used as is (early steps are damped);
  * eps is added to sqrt(v) (not inside it), default 1e-6;
  * weight decay is added to the Adam update (decoupled, scaled by the scheduled lr);
  * the schedule multiplier is evaluated at the step count BEFORE the update, so with warmup
    the first update has lr 0;
  * gradient clipping happens inside `step`, PER PARAMETER TENSOR (each tensor's grad norm is
    clipped to max_grad_norm on its own), not over the global norm.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")  # the usual BERT recipe's exemptions


# --- schedules (multipliers of the base lr as a function of progress = step / t_total) -----------
class _LRSchedule:
    """A learning-rate multiplier schedule (the reference's base class); t_total < 0: constant 1."""

    warn_t_total = False  # schedules for which training beyond t_total is probably a mistake

    def __init__(self, warmup: float = 0.002, t_total: int = -1, **kwargs) -> None:
        if t_total < 0:
            logger.warning("t_total value of %s results in schedule not being applied", t_total)
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"Invalid warmup: {warmup} - should be in [0.0, 1.0[ or -1")
        self.warmup = max(float(warmup), 0.0)
        self.t_total = float(t_total)
        self.warned_for_t_total_at_progress = -1.0

    def get_lr(self, step: int, nowarn: bool = False) -> float:
        """The multiplier at `step` of t_total."""
        if self.t_total < 0:
            return 1.0
        progress = float(step) / self.t_total
        ret = self.get_lr_(progress)
        if not nowarn and self.warn_t_total and progress > 1.0 and progress > self.warned_for_t_total_at_progress:
            logger.warning("Training beyond specified 't_total'. Learning rate multiplier set to %s. "
                           "Please set 't_total' of %s correctly.", ret, type(self).__name__)
            self.warned_for_t_total_at_progress = progress
        return ret

    def get_lr_(self, progress: float) -> float:
        return 1.0


class ConstantLR(_LRSchedule):
    pass


class WarmupConstantSchedule(_LRSchedule):
    """Linear warmup 0 -> 1, then 1."""

    def get_lr_(self, progress: float) -> float:
        return progress / self.warmup if progress < self.warmup else 1.0


class WarmupLinearSchedule(_LRSchedule):
    """Linear warmup 0 -> 1, then linear decay to 0 at t_total (and 0 after)."""

    warn_t_total = True

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        return max((progress - 1.0) / (self.warmup - 1.0), 0.0)


class WarmupCosineSchedule(_LRSchedule):
    """Linear warmup, then cosine decay over `cycles` (0.5: from 1 at the end of warmup to 0)."""

    warn_t_total = True

    def __init__(self, warmup: float = 0.002, t_total: int = -1, cycles: float = 0.5, **kwargs) -> None:
        super().__init__(warmup, t_total, **kwargs)
        self.cycles = cycles

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        after = (progress - self.warmup) / (1.0 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * self.cycles * 2 * after))  # the reference's order: same bits


class WarmupCosineWithHardRestartsSchedule(WarmupCosineSchedule):
    """Linear warmup, then `cycles` cosine decays from 1 to 0, each restarting at 1."""

    def __init__(self, warmup: float = 0.002, t_total: int = -1, cycles: float = 1.0, **kwargs) -> None:
        if cycles < 1.0:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        super().__init__(warmup, t_total, cycles, **kwargs)

    def get_lr_(self, progress: float) -> float:
        if progress < self.warmup:
            return progress / self.warmup
        after = (progress - self.warmup) / (1.0 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * after) % 1.0)))


class WarmupCosineWithWarmupRestartsSchedule(WarmupCosineWithHardRestartsSchedule):
    """`cycles` equal parts, each a linear warmup (the first `warmup` of the part) and a cosine decay."""

    def __init__(self, warmup: float = 0.002, t_total: int = -1, cycles: float = 1.0, **kwargs) -> None:
        if not warmup * cycles < 1.0:
            raise ValueError(f"warmup * cycles must be < 1, got {warmup} * {cycles}")
        super().__init__(warmup * cycles if warmup >= 0 else warmup, t_total, cycles, **kwargs)

    def get_lr_(self, progress: float) -> float:
        progress = progress * self.cycles % 1.0
        if progress < self.warmup:
            return progress / self.warmup
        after = (progress - self.warmup) / (1 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * after))


SCHEDULES = {
    None: ConstantLR,
    "none": ConstantLR,
    "warmup_constant": WarmupConstantSchedule,
    "warmup_linear": WarmupLinearSchedule,
    "warmup_cosine": WarmupCosineSchedule,
}


class BertAdam(Optimizer):
    """pytorch_pretrained_bert 0.6.2's BertAdam (see the module docstring for how it differs from AdamW).

    schedule: a name in SCHEDULES (with `warmup` as a fraction of `t_total` steps) or any object
    with `get_lr(step)`. max_grad_norm <= 0 disables the per-tensor clipping.
    """

    def __init__(self, params, lr: float, warmup: float = -1, t_total: int = -1,
                 schedule: Union[str, None, _LRSchedule] = "warmup_linear", b1: float = 0.9, b2: float = 0.999,
                 e: float = 1e-6, weight_decay: float = 0.01, max_grad_norm: float = 1.0) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
            raise ValueError(f"Invalid betas: b1={b1}, b2={b2} - each should be in [0.0, 1.0)")
        if e < 0.0:
            raise ValueError(f"Invalid epsilon value: {e} - should be >= 0.0")
        if not hasattr(schedule, "get_lr"):
            if schedule not in SCHEDULES:
                raise ValueError(f"Invalid schedule {schedule!r}; use one of {[k for k in SCHEDULES if k]}")
            schedule = SCHEDULES[schedule](warmup=warmup, t_total=t_total)
        defaults = dict(lr=lr, schedule=schedule, b1=b1, b2=b2, e=e, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    def get_lr(self) -> List[float]:
        """The scheduled lr of every parameter ([0] before the first step, as the reference)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    return [0]
                out.append(group["lr"] * group["schedule"].get_lr(state["step"]))
        return out

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, eps, wd = group["b1"], group["b2"], group["e"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                if group["max_grad_norm"] > 0:
                    _clip_(grad, group["max_grad_norm"])
                m, v = state["next_m"], state["next_v"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = m / (v.sqrt() + eps)
                if wd > 0.0:
                    update += wd * p
                lr = group["lr"] * group["schedule"].get_lr(state["step"])
                p.add_(-(lr * update))
                state["step"] += 1
        return loss


def _clip_(grad: torch.Tensor, max_norm: float) -> None:
    """Scale `grad` to norm <= max_norm in place (torch's clip_grad_norm_ formula, one tensor)."""
    coef = max_norm / (torch.linalg.vector_norm(grad, 2.0) + 1e-6)
    grad.mul_(torch.clamp(coef, max=1.0))


def bert_param_groups(model: nn.Module, weight_decay: float = 0.01,
                      no_decay: Iterable[str] = NO_DECAY) -> List[Dict]:
    """Two groups: weight decay on weights, none on biases and LayerNorm (the BERT recipe).

    """
    no_decay = tuple(no_decay)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if any(nd in name for nd in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def linear_warmup_lambda(num_training_steps: int, num_warmup_steps: int) -> Callable[[int], float]:
    """Multiplier for LambdaLR: 0 -> 1 linearly over the warmup steps, then linearly down to 0."""
    def f(step: int) -> float:
        if step < num_warmup_steps:
            return step / max(1, num_warmup_steps)
        return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))
    return f


def adamw_with_warmup(model: nn.Module, lr: float, num_training_steps: int, warmup_proportion: float = 0.1,
                      weight_decay: float = 0.01) -> Tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """torch AdamW (bias-corrected; betas (0.9, 0.999), eps 1e-8 as BERT's) on `bert_param_groups` +
    linear warmup/decay; call `scheduler.step()` after each `optimizer.step()`. Clip gradients
    yourself (global norm)."""
    betas, eps = (0.9, 0.999), 1e-8
    if not 0.0 <= warmup_proportion < 1.0:
        raise ValueError(f"warmup_proportion must be in [0, 1), got {warmup_proportion}")
    groups = bert_param_groups(model, weight_decay)
    try:  # the fused kernel is ~10x faster than the per-tensor loop torch uses on CPU by default
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    warmup = int(round(warmup_proportion * num_training_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_lambda(num_training_steps, warmup))
    return optimizer, scheduler
