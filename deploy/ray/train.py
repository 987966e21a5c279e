"""The trainer pool via Ray Train: each worker runs the trainer's public entry point.

Ray Train's TorchTrainer starts the workers (with their GPUs), sets RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR and initialises the process group (gloo on CPU, NCCL on GPU), which is
the environment torchrun would give; the trainer joins it as it would under torchrun.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray import train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from common.config import load_config
from draft_trainer.config import TrainConfig


def _worker(loop_cfg: dict) -> None:
    from draft_trainer.train.loop import Trainer

    cfg = load_config(TrainConfig, loop_cfg["config"] or None,
                      [*loop_cfg["overrides"], f"targets.endpoints={loop_cfg['endpoints']}"])
    summary = Trainer(cfg).run()
    # Every worker reports (a collective in Ray Train); the full summary is the run directory's summary.json.
    train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})


def run_trainer_pool(endpoints: list[str], *, config: str, overrides: list[str], num_workers: int,
                     gpus_per_worker: float, cpus_per_worker: float, storage_path: str, name: str) -> dict:
    """Train against `endpoints` on `num_workers` Ray Train workers; returns the run's summary.json."""
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config, "overrides": overrides, "endpoints": ",".join(endpoints)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_path, name=name),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    cfg = load_config(TrainConfig, config or None, [*overrides, f"targets.endpoints={','.join(endpoints)}"])
    return json.loads((Path(cfg.output_dir) / "summary.json").read_text())
