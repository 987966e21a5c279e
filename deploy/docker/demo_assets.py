#!/usr/bin/env python3
"""Bake the CPU demo's assets into an image: a tiny Llama and a small tokenized chat dataset.

    python deploy/docker/demo_assets.py --output /opt/specrelay/demo   # -> model/ and data/

Built offline from configs (no hub), seconds on a CPU. Prints the two paths as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="directory to create model/ and data/ in")
    p.add_argument("--samples", type=int, default=256, help="chat samples in the dataset")
    args = p.parse_args(argv)
    from draft_trainer.assets import tiny as assets

    out = Path(args.output)
    model = assets.build_tiny_model(out / "model", "llama")
    data = assets.build_tiny_dataset(Path(model), out / "data", num_samples=args.samples)
    print(json.dumps({"model": str(model), "data": str(data)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
