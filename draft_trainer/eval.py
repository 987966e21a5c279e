"""`draft-trainer eval`: acceptance by real speculative decoding (greedy chain drafting), checked lossless.

    draft-trainer eval --target-model DIR --draft EXPORT_DIR --prompts prompts.jsonl \
        [--num-steps 7] [--max-new-tokens 128] [--speed-rounds 3] [--untrained] [--output result.json]

The evaluator lives in draft_trainer/evaluate/: the Drafter seam (drafter.py), the generic loop
(decode.py), EAGLE-3's drafter (eagle3_drafter.py), the prompt-lookup baseline
(prompt_lookup.py) and the command (runner.py). This module keeps the names callers import.
"""

from __future__ import annotations

from draft_trainer.evaluate.decode import SpecStats, TargetVerifier, eos_set, greedy_decode
from draft_trainer.evaluate.decode import speculative_decode as _speculative_decode
from draft_trainer.evaluate.drafter import Drafter
from draft_trainer.evaluate.prompts import load_prompts
from draft_trainer.evaluate.runner import evaluate

_eos_set = eos_set  # the name tests/support/drafts.py imports

__all__ = ["Drafter", "SpecStats", "TargetVerifier", "evaluate", "greedy_decode", "load_prompts",
           "speculative_decode"]


def speculative_decode(target, draft, prompt: list[int], num_steps: int, max_new_tokens: int, eos: set[int],
                       **kw) -> tuple[list[int], SpecStats]:
    """decode.speculative_decode with a Drafter, or an Eagle3Draft (wrapped in its drafter)."""
    if not isinstance(draft, Drafter):
        from draft_trainer.evaluate.eagle3_drafter import Eagle3Drafter

        draft = Eagle3Drafter(draft)
    return _speculative_decode(target, draft, prompt, num_steps, max_new_tokens, eos, **kw)
