"""`draft-trainer convert`: an EAGLE-3 draft from one serving layout to the other.

    draft-trainer convert --to speculators --input drafts/x --output drafts/x-vllm --target-model DIR
    draft-trainer convert --to sglang --input downloaded-speculators-draft --output drafts/y

The input's layout is detected from its config.json. `--target-model` (the target's HF directory)
checks the aux layer ids against the target's depth, checks an `embed_tokens` table in the input
against the target's, and names the verifier in the speculators config. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser("convert", help="convert an EAGLE-3 draft between the SGLang and speculators layouts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--to", required=True, choices=["sglang", "speculators"], help="layout to write")
    c.add_argument("--input", required=True, help="draft directory (config.json + model.safetensors)")
    c.add_argument("--output", required=True, help="directory to write (must not exist or be empty)")
    c.add_argument("--target-model", default=None, help="the target's HF model directory (recommended)")
    c.add_argument("--speculative-tokens", type=int, default=3,
                   help="speculators only: draft tokens per step vLLM uses by default (num_speculative_tokens)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.set_defaults(func=main)
    return c


def main(args: argparse.Namespace) -> int:
    from draft_trainer.formats.store import convert_dir

    out = convert_dir(args.input, args.output, args.to, target_model=args.target_model, overwrite=args.overwrite,
                      speculative_tokens=args.speculative_tokens)
    print(json.dumps({"converted": str(out), "format": args.to}))
    return 0
