"""Distributed set-up and FSDP2, applied to a model that knows nothing about distribution.

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
  gloo on CPU, NCCL on GPU; a single process with no environment runs without a process group.
- `apply_fsdp(model)` shards the trainable draft with `fully_shard` as one group (the draft is
  one decoder layer: one all-gather per step is cheaper than many small ones). The frozen
  target embedding is left out (`ignored_params`): replicated, never all-gathered.
  The draft is driven through methods other than `forward` (TTT, logits), so those methods are
  registered with FSDP to get its unshard hooks.
- `broadcast_tensors()` lets rank 0 fetch the frozen target tensors once and share them.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun set up (or run single-process without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined (%s, %s)", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker without interpreter finalization.

    With gloo (torch 2.13) a worker that has cleanly destroyed its process group can still abort
    while Python tears down ("terminate called without an active exception", SIGABRT; 5 of 12
    runs of tests/distributed/fsdp_worker.py here), which torchrun reports as a failed job.
    Everything is written and flushed by then, so skip the teardown.
    """
    destroy_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def apply_fsdp(model: nn.Module, frozen: list[nn.Parameter], methods: tuple[str, ...] = ("ttt_forward", "logits"),
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` over the default process group with FSDP2; `frozen` params stay replicated."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Root module: keep parameters gathered from forward to backward (no re-gather for backward).
    fully_shard(model, mp_policy=mp, ignored_params=set(frozen), reshard_after_forward=False)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, info: DistInfo) -> dict[str, torch.Tensor]:
    """Rank 0's tensors on every rank (names, shapes and dtypes travel as an object first)."""
    if not info.distributed:
        assert tensors is not None
        return tensors
    meta = [None]
    if info.is_main:
        meta = [{k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}]
    dist.broadcast_object_list(meta, src=0)
    out = {}
    for name, (shape, dtype) in meta[0].items():
        t = tensors[name].contiguous() if info.is_main else torch.empty(shape, dtype=dtype)
        dist.broadcast(t, src=0)
        out[name] = t
    return out


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(x: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """`x` reduced over all ranks with `op` (sum | max | min), as a new tensor on x's device; `x` itself on
    one rank. The collective runs on the rank's device: NCCL refuses the CPU scalars the loop agrees on."""
    if info.distributed:
        y = x.to(info.device, copy=True)
        dist.all_reduce(y, op=_REDUCE_OPS[op])
        return y.to(x.device)
    return x


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
