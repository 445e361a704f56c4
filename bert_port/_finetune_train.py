"""Training loop of `bert_port.finetune` (one process or one torchrun rank).

The loss of an optimizer step is the summed cross-entropy of every labelled item (first word
piece, or example) in the step, divided by their number over all ranks and all --grad-accum
micro-batches. Each rank backpropagates sum_r * world_size / N; DDP averages gradients over
ranks (divides by world_size), so the update is the gradient of sum / N: exactly the mean loss of
one big batch. Hence N ranks x --batch-size B, one rank x batch N*B, and --grad-accum N with
batch B are the same computation, even when ranks see different numbers of tokens (a per-rank
mean averaged over ranks would weight tokens unequally). In one process without accumulation it
is the head's own loss (mean over active, labelled tokens).

Batches come from a DistributedSampler in every case (with one replica when not distributed):
its permutation depends only on --seed and the epoch, and rank r takes positions r, r+N, ... of
it, so the union of the ranks' k-th batches is the one-process k-th batch of size N*B. With N
ranks it repeats up to N-1 examples so that every rank gets the same number.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from bert_port import data as D
from bert_port._finetune_dist import DistContext
from bert_port._finetune_tasks import TASKS, Predicting
from bert_port.io import atomic_path, atomic_write_text
from bert_port.optimization import BertAdam, adamw_with_warmup, bert_param_groups

PLOT_NAME = "training.png"
METRICS_NAME = "metrics.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one fine-tuning run needs to know, fixed before it starts (the CLI flags of
    `tag` / `classify`, with --max-seq-length resolved against the model)."""

    task: str
    out: Path
    epochs: int
    batch_size: int
    grad_accum: int
    eval_batch_size: Optional[int]
    max_seq_length: int
    optimizer: str
    lr: float
    warmup_proportion: float
    weight_decay: float
    max_grad_norm: float
    fp16: bool
    bf16: bool
    seed: int
    checkpoint: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, **resolved: Any) -> "TrainConfig":
        """The run's settings from parsed flags; `resolved` overrides (the task name, the length)."""
        values = {f.name: resolved[f.name] if f.name in resolved else getattr(args, f.name) for f in fields(cls)}
        return cls(**{**values, "out": Path(values["out"])})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_context(args: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if args.fp16:
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.float16)
    if args.bf16:
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def progress(iterable, total: int, enabled: bool, desc: str):
    """A tqdm bar on an interactive stderr of rank 0; the bare iterable otherwise."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Model (config with the label map) + vocab.txt + tokenizer_config.json (the casing)."""
    model.save_pretrained(out)
    tokenizer.save_vocabulary(out)
    atomic_write_text(out / "tokenizer_config.json",
                      json.dumps({"do_lower_case": bool(tokenizer.do_lower_case)}, indent=2) + "\n")


def plot(history: "History", path: Path, log: Callable[[str], None]) -> None:
    """Loss per step and dev F1 per epoch as a PNG, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot written")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(range(1, len(history.step_loss) + 1), history.step_loss, lw=1)
    a.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    epochs = [e["epoch"] for e in history.epochs]
    b.plot(epochs, [e["dev"]["f1"] for e in history.epochs], "o-")
    b.set(xlabel="epoch", ylabel="dev F1", title="dev F1", ylim=(0, 1.02), xticks=epochs)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a link at `path` is replaced, never written through
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


@dataclass
class History:
    """What metrics.json holds (these fields, in this order): the run's shape, the loss of every
    optimizer step, each epoch's record and the best epoch's dev scores."""

    task: str
    world_size: int
    global_batch_size: int
    optimizer_steps: int
    labels: List[str]
    epochs: List[Dict[str, Any]] = field(default_factory=list)
    step_loss: List[float] = field(default_factory=list)
    best: Optional[Dict[str, Any]] = None
    f1: Optional[float] = None
    train_seconds: Optional[float] = None  # written once an epoch has ended

    def add_epoch(self, record: Dict[str, Any]) -> bool:
        """Append an epoch's record ({"epoch", "train_loss", "dev", "seconds"}); True if its dev F1 is the best yet."""
        self.epochs.append(record)
        scores = record["dev"]
        improved = self.best is None or scores["f1"] > self.best["f1"]
        if improved:
            self.best, self.f1 = {"epoch": record["epoch"], **scores}, scores["f1"]
        return improved

    def to_json(self) -> Dict[str, Any]:
        data = asdict(self)
        if data["train_seconds"] is None:
            del data["train_seconds"]
        return data


@dataclass
class Examples:
    """The run's data: training and dev examples, and the label list (index = label id)."""

    train: Sequence[Any]
    dev: Sequence[Any]
    labels: List[str]


@dataclass
class Run:
    """Everything `build` sets up and the epochs use: the model (and its DDP wrapper `net`), the
    batches, the optimizer, and the history they fill."""

    args: TrainConfig
    ctx: DistContext
    task: Any
    model: torch.nn.Module
    net: torch.nn.Module
    tokenizer: Any
    data: Examples
    loader: DataLoader
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    amp: Callable[[], contextlib.AbstractContextManager]
    history: History
    log: Callable[[str], None]
    started: float = field(default_factory=time.time)

    @property
    def dev_shard(self) -> Sequence[Any]:
        return self.data.dev[self.ctx.rank::self.ctx.world_size]  # no padding: every dev example counted once


def train(args: TrainConfig, ctx: DistContext, tokenizer, model, data: Examples, log: Callable[[str], None]) -> History:
    """Fine-tune `model` in place; rank 0 writes checkpoints, metrics.json and the plot to args.out."""
    run = build(args, ctx, tokenizer, model, data, log)
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        end_epoch(run, epoch, run_epoch(run, epoch), t0)
    run.net = run.model  # a DDP wrapper must be gone before the process group is destroyed (see DistContext.close)
    if ctx.is_main:
        plot(run.history, args.out / PLOT_NAME, log)
    return run.history


def build(args: TrainConfig, ctx: DistContext, tokenizer, model, data: Examples, log: Callable[[str], None]) -> Run:
    """Label map, device, dropout stream, batches, optimizer (+ schedule), AMP and DDP: a Run ready for epoch 1."""
    task = TASKS[args.task]
    D.attach_label_map(model.config, data.labels)
    task.prepare(model)
    model.to(ctx.device).train()
    torch.manual_seed(args.seed + ctx.rank)  # dropout masks: one stream per rank
    label2id = {lab: i for i, lab in enumerate(data.labels)}
    feats, truncated = task.train_features(data.train, tokenizer, label2id, args.max_seq_length)
    if truncated:
        log(f"{truncated} of {len(feats)} training examples longer than --max-seq-length {args.max_seq_length}: "
            "truncated (tagging keeps whole words)")
    sampler = DistributedSampler(feats, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(feats, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=functools.partial(D.pad_batch, pad_id=D.pad_id_of(tokenizer)))
    steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    optimizer, scheduler = _optimizer(args, model, total_steps)
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    history = History(task.name, ctx.world_size, args.batch_size * ctx.world_size * args.grad_accum, total_steps,
                      list(data.labels))
    return Run(args, ctx, task, model, net, tokenizer, data, loader, steps_per_epoch, optimizer, scheduler,
               torch.amp.GradScaler(ctx.device.type) if args.fp16 else None, amp_context(args, ctx.device),
               history, log)


def _optimizer(args: TrainConfig, model, total_steps: int):
    """BertAdam (its own warmup schedule) or AdamW with a LambdaLR warmup: (optimizer, scheduler or None)."""
    if args.optimizer == "bertadam":
        return BertAdam(bert_param_groups(model, args.weight_decay), lr=args.lr, warmup=args.warmup_proportion,
                        t_total=total_steps, max_grad_norm=args.max_grad_norm), None
    return adamw_with_warmup(model, args.lr, total_steps, args.warmup_proportion, args.weight_decay)


def run_epoch(run: Run, epoch: int) -> float:
    """One pass over the training data (epoch numbers from 1 fix the shuffle); each optimizer step's
    loss goes to run.history.step_loss. Returns the epoch's mean training loss over all ranks."""
    run.loader.sampler.set_epoch(epoch)
    batches = iter(run.loader)
    bar_on = run.ctx.is_main and sys.stderr.isatty()
    bar = progress(range(run.steps_per_epoch), run.steps_per_epoch, bar_on, f"epoch {epoch}/{run.args.epochs}")
    epoch_sum = epoch_n = 0.0
    for _ in bar:
        step_sum, n_global = _step(run, [b for _, b in zip(range(run.args.grad_accum), batches)])
        epoch_sum += step_sum
        epoch_n += n_global
        run.history.step_loss.append(step_sum / max(n_global, 1.0))
        if bar_on:
            bar.set_postfix(loss=f"{run.history.step_loss[-1]:.4f}")
    return epoch_sum / max(epoch_n, 1.0)


def _step(run: Run, micro: List[Dict[str, torch.Tensor]]) -> Tuple[float, float]:
    """One optimizer step over --grad-accum micro-batches (see the module docstring for the loss scale).
    Returns the summed loss and the number of labelled items, both over all ranks."""
    ctx = run.ctx
    (n_global,) = ctx.all_sum([sum(run.task.count(b) for b in micro)])
    local_sum = 0.0
    for j, batch in enumerate(micro):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        sync = contextlib.nullcontext() if j == len(micro) - 1 or not ctx.distributed else run.net.no_sync()
        with sync:
            with run.amp():
                loss_sum, _ = run.task.loss_sum(run.net, batch)
            loss = loss_sum * (ctx.world_size / max(n_global, 1.0))
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        local_sum += float(loss_sum.detach())
    _optimizer_step(run.args, run.model, run.optimizer, run.scheduler, run.scaler)
    (step_sum,) = ctx.all_sum([local_sum])
    return step_sum, n_global


def end_epoch(run: Run, epoch: int, train_loss: float, epoch_started: float) -> bool:
    """Dev scores, the epoch's record (its seconds since `epoch_started`, a time.time(), evaluation
    included), the log line; on rank 0 the checkpoint (per --checkpoint) and metrics.json.
    Returns True if this epoch is the best so far."""
    args, ctx = run.args, run.ctx
    scores = evaluate(run)
    record = {"epoch": epoch, "train_loss": train_loss, "dev": scores, "seconds": round(time.time() - epoch_started, 2)}
    improved = run.history.add_epoch(record)
    run.log(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f}, dev {run.task.summary(scores)}"
            f"{' (best)' if improved else ''}, {record['seconds']:.1f}s")
    if ctx.is_main:
        if improved and args.checkpoint == "best" or args.checkpoint == "last" and epoch == args.epochs:
            save_checkpoint(run.model, run.tokenizer, args.out)
        run.history.train_seconds = round(time.time() - run.started, 2)
        atomic_write_text(args.out / METRICS_NAME, json.dumps(run.history.to_json(), indent=2) + "\n")
    return improved


def _optimizer_step(args: TrainConfig, model, optimizer, scheduler, scaler) -> None:
    """One update. BertAdam clips per tensor inside step(); AdamW clips the global norm here."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if args.optimizer == "adamw" and args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], args.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def evaluate(run: Run) -> Dict:
    """Dev scores over all ranks: each predicts its shard, the additive counts are gathered and summed."""
    task, labels, args = run.task, run.data.labels, run.args
    counts = task.zero(labels)
    if run.dev_shard:
        how = Predicting(run.tokenizer, labels, args.max_seq_length, args.eval_batch_size or args.batch_size,
                         run.ctx.device, run.amp)
        predicted = task.predict(run.model, run.dev_shard, how)
        counts = task.score(run.dev_shard, predicted, labels)
    total = task.zero(labels)
    for c in run.ctx.gather(counts):
        total = total + c
    return total.scores()
