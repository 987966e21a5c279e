"""Checkpoints: torch.distributed.checkpoint for model + optimizer, JSON for everything else.

Layout (`<run>/checkpoints/`):
    step_00000100/
        .metadata, __*_*.distcp    DCP: {"model": ..., "optim": ...} (sharded, any world size)
        trainer.json               step, scheduler, counters, config, per-rank data cursors
        rng_rank{r}.pt             each rank's torch/numpy/python RNG state
        vocab.json                 the pinned draft vocabulary
        draft_config.json, model_info.json
        COMPLETE                   written last: a directory without it is not a checkpoint
    latest -> step_00000100

Atomicity: every rank writes into `.tmp-step_N/`; after a barrier rank 0 writes COMPLETE and
renames the directory into place, then repoints `latest`. A kill at any moment leaves either
the previous checkpoint or the new one, never half of one. Multi-node runs need a shared
filesystem for the run directory (a PVC on Kubernetes).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from common.files import atomic_write_json, swap_in
from common.errors import SpecRelayError
from draft_trainer.train.parallel import DistInfo, barrier

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"


class CheckpointError(SpecRelayError):
    pass


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def clean_stale_temps(root: Path) -> list[Path]:
    """Remove `.tmp-step_*` directories a killed save left behind (never complete checkpoints:
    those are renamed into place only when whole). Rank 0, before training starts."""
    removed = []
    if root.is_dir():
        for p in sorted(root.glob(".tmp-step_*")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info("removed %d unfinished checkpoint save(s) in %s: %s", len(removed), root,
                 ", ".join(p.name for p in removed))
    return removed


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


_write_json = atomic_write_json


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    info: DistInfo, state: dict[str, Any], rank_state: dict[str, Any], files: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Collective: every rank calls it.

    `state` is global (rank 0's copy is written), `rank_state` is this rank's (e.g. its data
    cursor; all ranks' are gathered into trainer.json), `files` maps file name -> JSON object.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # one process: intended
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"rng": rng_state()}, tmp / f"rng_rank{info.rank}.pt")
    ranks = _gather_objects(rank_state, info)
    barrier(info)
    if info.is_main:
        _write_json(tmp / TRAINER_STATE, {**state, "step": step, "world_size": info.world_size,
                                          "ranks": {str(r): v for r, v in ranks.items()}})
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        (tmp / COMPLETE).write_text(str(step))
        swap_in(tmp, final)  # a re-saved step: the old copy goes only once the new one is in place
        link_tmp = root / ".latest.tmp"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(final.name)
        os.replace(link_tmp, root / "latest")
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            if old.name not in _protected(root):
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    barrier(info)
    return final


def _protected(root: Path) -> set[str]:
    """Checkpoints kept regardless of keep_last (e.g. `best` points at one)."""
    out = set()
    for name in ("best",):
        link = root / name
        if link.is_symlink():
            out.add(os.readlink(link))
    return out


def mark(root: Path, name: str, ckpt: Path) -> None:
    """Point `root/name` (e.g. best) at a checkpoint, atomically."""
    tmp = root / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(ckpt.name)
    os.replace(tmp, root / name)


def _gather_objects(obj: Any, info: DistInfo) -> dict[int, Any]:
    if not info.distributed:
        return {0: obj}
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return {r: o for r, o in enumerate(out)}


def load_model_state(path: Path, model: torch.nn.Module) -> None:
    """Weights only, into a plain (unsharded) model in one process: export, eval, inspection."""
    load_checkpoint(path, model, None, DistInfo())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    info: DistInfo) -> dict[str, Any]:
    """Restore model/optimizer in place and this rank's RNG.

    Returns trainer.json's content, with this rank's own entry as `rank_state`.
    """
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    state = json.loads((path / TRAINER_STATE).read_text())
    if optimizer is not None and state.get("world_size", 1) != info.world_size:
        raise CheckpointError(
            f"{path} was written by {state.get('world_size')} ranks; resuming with {info.world_size} would change "
            "every rank's data order. Resume with the same world size (or start a new run from its weights)."
        )
    model_sd, optim_sd = get_state_dict(model, optimizer or [], options=StateDictOptions(ignore_frozen_params=True))
    to_load: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        to_load["optim"] = optim_sd
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(to_load, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"cannot load {path} into this draft: {e}") from None
    set_state_dict(model, optimizer or [], model_state_dict=to_load["model"],
                   optim_state_dict=to_load.get("optim", {}), options=StateDictOptions(ignore_frozen_params=True,
                                                                                        strict=False))
    rng_file = path / f"rng_rank{info.rank}.pt"
    if optimizer is not None and rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=False)["rng"])
        except (pickle.UnpicklingError, KeyError) as e:
            raise CheckpointError(f"{rng_file} is unreadable: {e}") from None
    state["rank_state"] = state.get("ranks", {}).get(str(info.rank))
    return state
