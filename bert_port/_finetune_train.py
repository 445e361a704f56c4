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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from bert_port import data as D
from bert_port._finetune_dist import DistContext
from bert_port._finetune_tasks import TASKS
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


def plot(history: Dict, path: Path, log: Callable[[str], None]) -> None:
    """Loss per step and dev F1 per epoch as a PNG, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot written")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(range(1, len(history["step_loss"]) + 1), history["step_loss"], lw=1)
    a.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    epochs = [e["epoch"] for e in history["epochs"]]
    b.plot(epochs, [e["dev"]["f1"] for e in history["epochs"]], "o-")
    b.set(xlabel="epoch", ylabel="dev F1", title="dev F1", ylim=(0, 1.02), xticks=epochs)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a link at `path` is replaced, never written through
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def train(args: TrainConfig, ctx: DistContext, tokenizer, model, train_examples, dev_examples, labels: List[str],
          log: Callable[[str], None]) -> Dict:
    """Fine-tune `model` in place; rank 0 writes checkpoints, metrics.json and the plot to args.out."""
    task = TASKS[args.task]
    out = args.out
    label2id = {lab: i for i, lab in enumerate(labels)}
    D.attach_label_map(model.config, labels)
    task.prepare(model)
    model.to(ctx.device).train()
    torch.manual_seed(args.seed + ctx.rank)  # dropout masks: one stream per rank

    feats, truncated = task.train_features(train_examples, tokenizer, label2id, args.max_seq_length)
    if truncated:
        log(f"{truncated} of {len(feats)} training examples longer than --max-seq-length {args.max_seq_length}: "
            "truncated (tagging keeps whole words)")
    sampler = DistributedSampler(feats, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(feats, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=functools.partial(D.pad_batch, pad_id=D.pad_id_of(tokenizer)))
    steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs

    scheduler = None
    if args.optimizer == "bertadam":
        optimizer = BertAdam(bert_param_groups(model, args.weight_decay), lr=args.lr, warmup=args.warmup_proportion,
                             t_total=total_steps, max_grad_norm=args.max_grad_norm)
    else:
        optimizer, scheduler = adamw_with_warmup(model, args.lr, total_steps, args.warmup_proportion,
                                                 args.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type) if args.fp16 else None
    amp = amp_context(args, ctx.device)
    net = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    dev_shard = dev_examples[ctx.rank::ctx.world_size]  # no padding: every dev example counted once
    history: Dict = {"task": task.name, "world_size": ctx.world_size,
                     "global_batch_size": args.batch_size * ctx.world_size * args.grad_accum,
                     "optimizer_steps": total_steps, "labels": labels, "epochs": [], "step_loss": [],
                     "best": None, "f1": None}
    bar_on = ctx.is_main and sys.stderr.isatty()
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        sampler.set_epoch(epoch)
        batches = iter(loader)
        epoch_sum = epoch_n = 0.0
        bar = progress(range(steps_per_epoch), steps_per_epoch, bar_on, f"epoch {epoch}/{args.epochs}")
        for _ in bar:
            micro = [b for _, b in zip(range(args.grad_accum), batches)]
            n_local = sum(task.count(b) for b in micro)
            (n_global,) = ctx.all_sum([n_local])
            local_sum = 0.0
            for j, batch in enumerate(micro):
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                sync = contextlib.nullcontext() if j == len(micro) - 1 or not ctx.distributed else net.no_sync()
                with sync:
                    with amp():
                        loss_sum, _ = task.loss_sum(net, batch)
                    loss = loss_sum * (ctx.world_size / max(n_global, 1.0))
                    (scaler.scale(loss) if scaler else loss).backward()
                local_sum += float(loss_sum.detach())
            _optimizer_step(args, model, optimizer, scheduler, scaler)
            (step_sum,) = ctx.all_sum([local_sum])
            epoch_sum += step_sum
            epoch_n += n_global
            step_loss = step_sum / max(n_global, 1.0)
            history["step_loss"].append(step_loss)
            if bar_on:
                bar.set_postfix(loss=f"{step_loss:.4f}")
        scores = evaluate(task, model, dev_shard, tokenizer, labels, args, ctx, amp)
        record = {"epoch": epoch, "train_loss": epoch_sum / max(epoch_n, 1.0), "dev": scores,
                  "seconds": round(time.time() - t0, 2)}
        history["epochs"].append(record)
        improved = history["best"] is None or scores["f1"] > history["best"]["f1"]
        if improved:
            history["best"] = {"epoch": epoch, **scores}
            history["f1"] = scores["f1"]
        log(f"epoch {epoch}/{args.epochs}: train loss {record['train_loss']:.4f}, dev {task.summary(scores)}"
            f"{' (best)' if improved else ''}, {record['seconds']:.1f}s")
        if ctx.is_main:
            if improved and args.checkpoint == "best" or args.checkpoint == "last" and epoch == args.epochs:
                save_checkpoint(model, tokenizer, out)
            history["train_seconds"] = round(time.time() - started, 2)
            atomic_write_text(out / METRICS_NAME, json.dumps(history, indent=2) + "\n")
    del net  # a DDP wrapper must be gone before the process group is destroyed (see DistContext.close)
    if ctx.is_main:
        plot(history, out / PLOT_NAME, log)
    return history


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


def evaluate(task, model, dev_shard, tokenizer, labels, args: TrainConfig, ctx: DistContext, amp) -> Dict:
    """Dev scores over all ranks: each predicts its shard, the additive counts are gathered and summed."""
    counts = task.zero(labels)
    if dev_shard:
        predicted = task.predict(model, dev_shard, tokenizer, labels, args.max_seq_length,
                                 args.eval_batch_size or args.batch_size, ctx.device, amp)
        counts = task.score(dev_shard, predicted, labels)
    total = task.zero(labels)
    for c in ctx.gather(counts):
        total = total + c
    return total.scores()
