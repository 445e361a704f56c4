"""Process-group plumbing for `bert_port.finetune` under torchrun (one process = one rank).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with
WORLD_SIZE=1) everything here is a no-op, so the same code path serves one process and many.
Backend: nccl when CUDA is available (one GPU per local rank), else gloo (CPU).
"""
from __future__ import annotations

import gc
from dataclasses import astuple, dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist

from converters.runner import dist_env


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Tear the group down while the interpreter is fully alive. The DDP wrapper (kept alive by
        reference cycles) holds the group too: collect it first, or gloo's threads may outlive the
        group and abort the process at exit ("terminate called without an active exception")."""
        if self.distributed and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


def setup(want_cuda: bool = True) -> DistContext:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world, rank, local = astuple(dist_env())
    cuda = want_cuda and torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if cuda else {}
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://", **kwargs)
    return DistContext(rank=rank, world_size=world, device=device)
