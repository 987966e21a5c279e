"""`draft-trainer eval`: acceptance by real speculative decoding (greedy chain drafting), checked lossless.

    draft-trainer eval --target-model DIR --draft EXPORT_DIR --prompts prompts.jsonl \
        [--num-steps 7] [--max-new-tokens 128] [--speed-rounds 3] [--untrained] [--output result.json]

The evaluator lives in draft_trainer/evaluate/: the generic loop (decode.py), the prompt-lookup
baseline (prompt_lookup.py) and the command (runner.py). The draft's own drafter comes from its
method (`DraftMethod.drafter`, the `Drafter` protocol in draft_trainer/methods/base.py; EAGLE-3's
is methods/eagle3/drafter.py). This module keeps the names callers import.
"""

from __future__ import annotations

from draft_trainer.evaluate.decode import SpecStats, TargetVerifier, eos_set, greedy_decode, speculative_decode
from draft_trainer.evaluate.prompts import load_prompts
from draft_trainer.evaluate.runner import check_draft_target, evaluate
from draft_trainer.methods.base import Drafter

_eos_set = eos_set  # the name tests/support/drafts.py imports

__all__ = ["Drafter", "SpecStats", "TargetVerifier", "check_draft_target", "evaluate", "greedy_decode",
           "load_prompts", "speculative_decode"]
