"""Lossless speculative-decoding evaluation: a Drafter seam, the generic chain loop, drafters
(EAGLE-3, prompt lookup) and `draft-trainer eval` (runner.py). See draft_trainer/eval.py."""
