"""`draft-trainer train --dry-run`: the resolved config and what the run will do, before doing it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from draft_trainer.config import TrainConfig


def _hidden_size(cfg: TrainConfig) -> tuple[int | None, str]:
    """The target's hidden size without starting anything: a local model's config, the feature
    cache's contract, or one quick GetModelInfo (None when no server answers)."""
    if cfg.feature_cache.offline:
        meta = Path(cfg.feature_cache.dir) / "meta.json"
        if meta.is_file():
            return json.loads(meta.read_text())["model_info"]["hidden_size"], f"feature cache {cfg.feature_cache.dir}"
    if not cfg.targets.endpoints and cfg.targets.embedded_model:
        c = Path(cfg.targets.embedded_model) / "config.json"
        if c.is_file():
            return json.loads(c.read_text()).get("hidden_size"), f"{c}"
    first = cfg.targets.endpoints.split(",")[0] if cfg.targets.endpoints else ""
    if first and not first.startswith(("dns:", "file:")):
        try:
            from draft_trainer.client.target import TargetClient

            c = TargetClient(first, timeout_s=3.0)
            try:
                return c.model_info().hidden_size, f"server {first}"
            finally:
                c.close()
        except Exception as e:  # a plan must not fail because a server is down
            return None, f"server {first} not reachable ({type(e).__name__})"
    return None, "unknown (no local model or reachable server)"


def plan(cfg: TrainConfig, world_size: int | None = None) -> dict:
    from draft_trainer.data.dataset import TokenizedDataset

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    ds = TokenizedDataset(cfg.data.path)
    lengths = np.minimum(ds.lengths, cfg.data.max_length) if len(ds) else np.zeros(1)
    # samples that cannot train (too short, nothing supervised) are counted as usable here
    mean_len = float(lengths.mean())
    H, h_source = _hidden_size(cfg)
    tokens_per_step = mean_len * cfg.batch_size
    # bf16 on the wire by default: aux 3H + teacher H values of 2 bytes per token.
    bytes_per_token = 8 * H if H else None
    held = min(cfg.eval.holdout, max(len(ds) - 1, 0))  # the trainer keeps at least one training sample
    train_samples = max(0, len(ds) - held)
    steps_per_epoch = train_samples // cfg.batch_size
    warnings = []
    if cfg.eval.holdout >= len(ds):
        warnings.append(f"eval.holdout={cfg.eval.holdout} is not smaller than the dataset ({len(ds)} samples): "
                        f"only {train_samples} sample(s) left to train on")
    if not cfg.time_budget_s and steps_per_epoch * cfg.epochs < cfg.max_steps:
        warnings.append(f"max_steps={cfg.max_steps} needs more data than {cfg.epochs} epoch(s) of {train_samples} "
                        f"samples give (about {steps_per_epoch * cfg.epochs} steps): the run will stop when the "
                        f"data runs out; raise epochs or lower max_steps")
    return {
        "world_size": world,
        "batch_size (global samples/step)": cfg.batch_size,
        "per rank": cfg.batch_size // max(world, 1),
        "micro-batch per rank": max(1, cfg.batch_size // max(world, 1) // cfg.grad_accum),
        "grad_accum": cfg.grad_accum,
        "dataset": f"{cfg.data.path}: {len(ds)} samples, mean {mean_len:.0f} tokens (after max_length "
                   f"{cfg.data.max_length}), {cfg.eval.holdout} held out",
        "tokens per step (est.)": round(tokens_per_step),
        "steps": f"{cfg.max_steps} (about {steps_per_epoch} per epoch x {cfg.epochs} epoch(s))"
                 + (f", time budget {cfg.time_budget_s:.0f}s" if cfg.time_budget_s else ""),
        "targets": ("offline: feature cache " + cfg.feature_cache.dir) if cfg.feature_cache.offline else
                   (cfg.targets.endpoints or f"embedded server for {cfg.targets.embedded_model} on 127.0.0.1"),
        "target hidden size": f"{H} ({h_source})" if H else h_source,
        "feature bandwidth per step (est.)": f"{tokens_per_step * bytes_per_token / 1e6:.1f} MB "
                                             f"({bytes_per_token} B/token, bf16)" if H else "unknown",
        "feature cache": cfg.feature_cache.dir or "off",
        "checkpoints": f"{Path(cfg.output_dir) / 'checkpoints'} (every {cfg.save_every or 'end'}, keep "
                       f"{cfg.keep_last}), resume_from={cfg.resume_from or 'none'}",
        **({"WARNING": "; ".join(warnings)} if warnings else {}),
    }


def format_plan(p: dict) -> str:
    width = max(len(k) for k in p)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in p.items())
