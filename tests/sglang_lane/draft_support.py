"""A random draft for the lane's SGLang checks, exported the product way.

`exported_random_draft` saves it with the trainer's own checkpoint writer
(tests/support/drafts.py) and exports that checkpoint with `draft_trainer.export.export_sglang`:
the lane checks what users ship, not a test-only copy of the format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from draft_trainer.data.vocab import VocabMapping
from draft_trainer.export import export_sglang
from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.model import Eagle3Draft
from tests.support.drafts import save_checkpoint
from tests.support.eagle3 import random_draft as random_weights


def random_draft(target_dir: Path, info, draft_vocab_size: int, seed: int = 0,
                 eagle31: bool = False) -> tuple[Eagle3Draft, VocabMapping]:
    """Eagle3Draft for the target `info` describes: random weights (norms not all-ones, so a
    dropped norm shows up), the target's embedding, a random pinned vocabulary mapping.
    `eagle31`: the EAGLE-3.1 variant (fc_norm + norm_output, as model.eagle_variant=3.1 builds it)."""
    from safetensors.torch import load_file

    cfg = DraftConfig.from_model_info(info, draft_vocab_size=draft_vocab_size)
    cfg.fc_norm = cfg.norm_output = eagle31
    draft = random_weights(cfg, seed=seed, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    vocab = VocabMapping(used=torch.randperm(info.vocab_size, generator=g)[:draft_vocab_size].sort().values,
                         vocab_size=info.vocab_size)
    with torch.no_grad():
        draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
        draft.embed_tokens.weight.copy_(load_file(target_dir / "model.safetensors")["model.embed_tokens.weight"])
    return draft, vocab


def export_via_checkpoint(draft: Eagle3Draft, vocab: VocabMapping, out: Path) -> Path:
    """Trainer checkpoint -> `export_sglang`: returns the export directory (out/export)."""
    return export_sglang(save_checkpoint(draft, vocab, out / "run"), out / "export")

