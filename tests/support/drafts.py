"""Write real training checkpoints (through Trainer.save_checkpoint) without running a server."""

from __future__ import annotations

from pathlib import Path

import torch

from common.contract import ModelInfo
from draft_trainer.config import TrainConfig
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.model.draft import Eagle3Draft
from draft_trainer.train.loop import Trainer


def save_checkpoint(model: Eagle3Draft, vocab: VocabMapping, out: Path, step: int = 1) -> Path:
    """The trainer's own checkpoint writer, on a model built by the caller."""
    cfg = TrainConfig(output_dir=str(out))
    tr = Trainer(cfg)
    tr.out.mkdir(parents=True, exist_ok=True)
    tr.model = model
    tr.vocab = vocab
    tr.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    c = model.cfg
    tr.info = ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=c.target_hidden_size,
                        vocab_size=c.vocab_size, aux_layer_ids=list(c.aux_layer_ids), dtype="fp32", max_length=1024,
                        tokenizer_fingerprint="test", model_name="test-target")
    return tr.save_checkpoint(step)
