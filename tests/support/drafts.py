"""Write real training checkpoints (through the trainer's checkpoint writer) without running a server."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from common.contract import ModelInfo
from draft_trainer.config import TrainConfig
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.methods.eagle3.model import Eagle3Draft
from draft_trainer.methods import get_method
from draft_trainer.train.loop import save_run_checkpoint
from draft_trainer.train.parallel import DistInfo
from draft_trainer.train.reporter import RunCounters
from draft_trainer.train.setup import Run


class one_thread:
    """Tiny models: one thread is much faster than two fighting over a busy machine."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False


def save_checkpoint(model: Eagle3Draft, vocab: VocabMapping, out: Path, step: int = 1, target_name: str = "") -> Path:
    """The trainer's own checkpoint writer, on a model built by the caller. `target_name` is recorded as the
    target's name (empty: unknown, so `eval` checks only shapes)."""
    cfg = TrainConfig(output_dir=str(out))
    c = model.cfg
    info = ModelInfo(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=c.target_hidden_size,
                     vocab_size=c.vocab_size, aux_layer_ids=list(c.aux_layer_ids), dtype="fp32", max_length=1024,
                     tokenizer_fingerprint="", model_name=target_name)
    Path(out).mkdir(parents=True, exist_ok=True)
    run = Run(cfg=cfg, dist=DistInfo(), out=Path(out), dataset=[], stream=SimpleNamespace(eval_indices=[]),
              method=get_method("eagle3", cfg.model), info=info, vocab=vocab, model=model,
              optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    return save_run_checkpoint(cfg, run, run.dist, step, (0, 0), RunCounters(), None)


def train_tiny_draft(target_dir: Path, prompts: list[list[int]], steps: int, max_new_tokens: int = 48,
                     ttt_steps: int = 4, lr: float = 3e-3, seed: int = 0):
    """Train a draft in-process (the real `train_step`) on the target's own greedy continuations.

    Returns (draft, vocab). Features come straight from the HF model (hidden_states), which the
    served features equal exactly in fp32 (tests/integration/test_thin_path.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.contract import default_aux_layers
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.eval import _eos_set, greedy_decode
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.data.batch import Batch
    from draft_trainer.methods.eagle3.step import train_step

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    eos = _eos_set(target, tok)
    seqs = [(p, greedy_decode(target, p, max_new_tokens, eos)[0]) for p in prompts]
    c = target.config
    V = c.vocab_size
    cfg = DraftConfig(hidden_size=c.hidden_size, target_hidden_size=c.hidden_size,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      head_dim=c.hidden_size // c.num_attention_heads, intermediate_size=c.intermediate_size,
                      vocab_size=V, draft_vocab_size=V // 2, aux_layer_ids=default_aux_layers(c.num_hidden_layers),
                      rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                      rope_parameters=dict(c.rope_parameters), bos_token_id=c.bos_token_id,
                      eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    counts = torch.zeros(V, dtype=torch.long)
    for _, out in seqs:
        counts += torch.bincount(torch.tensor(out), minlength=V)
    vocab = build_vocab_mapping(counts, cfg.draft_vocab_size)
    draft = Eagle3Draft(cfg)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
    head = target.get_output_embeddings().weight.detach()
    batches = []
    for p, out in seqs:
        ids = torch.tensor([p + out])
        with torch.no_grad():
            hs = target(ids, output_hidden_states=True).hidden_states
        mask = torch.zeros(ids.shape)
        mask[0, len(p):] = 1.0                       # supervise the continuation only
        batches.append(Batch([0], ids, mask, torch.ones_like(ids),
                             torch.cat([hs[i + 1] for i in cfg.aux_layer_ids], -1), teacher_BTH=hs[-1]))
    opt = torch.optim.AdamW([q for q in draft.parameters() if q.requires_grad], lr=lr)
    for step in range(steps):
        loss, _ = train_step(draft, batches[step % len(batches)], head, vocab.used, vocab.t2d,
                             vocab.target_to_draft, ttt_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return draft.eval(), vocab
