"""`make demo`: the whole flow on the embedded default, end to end over the real wire.

Stage 0 (this version): a tiny Llama built offline, a small chat dataset, an embedded target
server on 127.0.0.1, a short training run, a checkpoint. The SmolLM2 + ShareGPT demo replaces
the tiny model once the data pipeline, export and evaluation land.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from common.config import load_config
from draft_trainer import assets
from draft_trainer.config import TrainConfig
from draft_trainer.train.loop import Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    model = assets.build_tiny_model(assets.cache_dir() / "models" / "tiny-llama", "llama")
    data = assets.build_tiny_dataset(model, out / "data")
    cfg = load_config(TrainConfig, None, [
        f"data.path={data}", f"targets.embedded_model={model}", f"output_dir={out / 'train'}",
        f"max_steps={args.steps}", "batch_size=4", "epochs=100", "optim.lr=3e-3", "optim.warmup_ratio=0.1",
        "model.ttt_steps=3", "log_every=10",
    ])
    summary = Trainer(cfg).run()
    first = json.loads((out / "train" / "metrics.jsonl").read_text().splitlines()[0])
    print(f"\nTTT step-0 loss {first['step_loss'][0]:.3f} -> {summary['final']['loss'][0]:.3f}, "
          f"simulated acceptance length {summary['final']['sim_accept_len']:.2f}, "
          f"{summary['steps']} steps in {summary['wall_s']:.1f}s, checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
