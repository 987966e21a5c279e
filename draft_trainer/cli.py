"""`draft-trainer <command>`: the trainer side's entry point (thin: each command lives in its module)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from common.errors import SpecRelayError


def _train(args: argparse.Namespace) -> int:
    from common.config import dump_yaml, load_config
    from common.memory import tune_malloc
    from draft_trainer.config import TrainConfig
    from draft_trainer.train.loop import Trainer

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg))
        return 0
    tune_malloc()  # feature batches are multi-MiB: reuse heap memory instead of page-faulting it in
    summary = Trainer(cfg).run()
    print(json.dumps(summary, indent=1))
    return 0


def _assets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from draft_trainer import assets

    if args.what == "fetch":
        model = assets.fetch_smollm2()
        data = assets.locate_sharegpt()
        print(json.dumps({"model": str(model), "sharegpt": str(data)}, indent=1))
    elif args.what == "tiny":
        out = Path(args.output or assets.cache_dir() / "models" / f"tiny-{args.family}")
        print(assets.build_tiny_model(out, args.family))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draft-trainer", description="SpecRelay EAGLE-3 draft trainer")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a draft against target servers (or an embedded local one)")
    t.add_argument("--config", help="YAML config file (see configs/)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4")
    t.set_defaults(func=_train)

    a = sub.add_parser("assets", help="fetch/convert the real model and data, or build a tiny model")
    a.add_argument("what", choices=["fetch", "tiny"])
    a.add_argument("--family", default="llama", choices=["llama", "qwen3"])
    a.add_argument("--output")
    a.set_defaults(func=_assets)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SpecRelayError as e:
        print(f"draft-trainer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
