"""Tiny test fixtures built offline in seconds (`draft-trainer assets tiny`, tests, CI, the quick demo).

- `build_tiny_model()`: a tiny random Llama / Qwen3 with a tiny ChatML byte-level BPE tokenizer,
  plus `chats.jsonl` (a few conversations in OpenAI messages form) so that
  `draft-trainer prepare-data --input <dir>/chats.jsonl` works with no file to invent.
- `build_tiny_dataset()`: those chats through the real prepare-data pipeline.
- `build_synthetic_dataset()`: random token ids for the synthetic target backend.

Directories are written through common/files.py:replace_dir: a directory that is not a previous
output of `assets tiny` is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common.errors import AssetError
from common.files import OUTPUT_MARKER, atomic_write_text, replace_dir

TINY_KIND = "assets tiny"  # the output marker of a tiny model directory
CHATS_FILE = "chats.jsonl"
NUM_CHATS = 64

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. A speculative decoder drafts tokens cheaply and the
target model verifies them in one forward pass. Training a draft model needs hidden states from
the target. User: What is the capital of France? Assistant: The capital of France is Paris.
User: Write a short poem about the sea. Assistant: Waves roll in, the tide runs out, gulls cry.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Code: def add(a, b): return a + b
"""


def build_tiny_tokenizer(dest: Path, vocab_size: int = 512):
    """Byte-level BPE with ChatML specials and a ChatML chat template, trained on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [_TINY_CORPUS] * 4 + [mod.__doc__ or "" for mod in (json, os, shutil, subprocess, tempfile, hashlib)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(dest)
    return fast


def build_tiny_model(dest: Path, family: str = "llama", *, num_layers: int = 4, hidden_size: int = 64,
                     seed: int = 0, vocab_size: int = 512) -> Path:
    """A tiny random Llama or Qwen3 causal LM plus the tiny tokenizer, saved as an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    if _reusable(dest):
        return dest
    with replace_dir(dest, TINY_KIND, hint="choose a new or empty --output directory") as tmp:
        tok = build_tiny_tokenizer(tmp, vocab_size)
        common = dict(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        if family == "llama":
            cfg = LlamaConfig(**common, rope_theta=10000.0)
        elif family == "qwen3":
            cfg = Qwen3Config(**common, head_dim=hidden_size // 4, rope_theta=10000.0)
        else:
            raise AssetError(f"unknown tiny model family {family!r}; use llama or qwen3")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # Larger-than-default init so the tiny model's next-token distributions are peaked, like a
        # real LM's (the default init gives near-uniform outputs a draft cannot learn much from).
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.08)
            model.get_output_embeddings().weight.normal_(0.0, 0.5)
        model.save_pretrained(tmp)
        write_tiny_chats(tmp / CHATS_FILE)
    return dest


def _reusable(dest: Path) -> bool:
    """A complete tiny model already there. Directories from before output markers (no marker at
    all) are reused as they are, never rewritten."""
    if not (dest / "config.json").is_file():
        return False
    marker = dest / OUTPUT_MARKER
    if not marker.is_file():
        return True
    return marker.read_text().strip() == TINY_KIND and (dest / CHATS_FILE).is_file()


def write_tiny_chats(path: Path, num_samples: int = NUM_CHATS, seed: int = 0) -> Path:
    """The tiny chats as JSONL (one {"id", "messages"} per line), the input prepare-data reads."""
    atomic_write_text(path, "".join(json.dumps(c) + "\n" for c in tiny_conversations(num_samples, seed)))
    return path


TINY_CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a short poem about the sea.", "Waves roll in, the tide runs out, gulls cry over the sea."),
    ("Add two numbers in Python.", "def add(a, b): return a + b"),
    ("Count to five.", "1 2 3 4 5"),
    ("What does a speculative decoder do?", "It drafts tokens cheaply and the target model verifies them."),
    ("Name a lazy animal.", "The lazy dog, over which the quick brown fox jumps."),
]


def tiny_conversations(num_samples: int = 48, seed: int = 0) -> list[dict]:
    """Small multi-turn chats in OpenAI messages form, drawn from TINY_CHATS."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_samples):
        turns = [TINY_CHATS[j] for j in rng.integers(0, len(TINY_CHATS), size=int(rng.integers(1, 4)))]
        out.append({"id": f"tiny-{i}", "messages": [m for u, a in turns for m in (
            {"role": "user", "content": u}, {"role": "assistant", "content": a})]})
    return out


def build_tiny_dataset(model_dir: Path, out: Path, num_samples: int = 48, seed: int = 0) -> Path:
    """A small tokenized chat dataset for the tiny model (tests, quick demo), made by the real
    prepare-data pipeline (chat template rendering, assistant loss masks, vocab.json)."""
    from draft_trainer.data.prepare import PrepareConfig, prepare_data

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / f".{out.name}.source.jsonl"
    write_tiny_chats(src, num_samples, seed)
    try:
        prepare_data(PrepareConfig(model=str(model_dir), inputs=[str(src)], output=str(out), max_length=1024,
                                   draft_vocab_size=1 << 30), progress=False)
    finally:
        src.unlink(missing_ok=True)
    return out


def build_synthetic_dataset(out: Path, num_samples: int = 64, *, vocab_size: int = 512, min_len: int = 16,
                            max_len: int = 96, seed: int = 0) -> Path:
    """Random token ids for the synthetic target backend (pool tests and benchmarks).

    The tokenizer fingerprint is the synthetic backend's (`synthetic-v<vocab>`), so the trainer's
    dataset check passes against synthetic servers of that vocabulary and fails against others.
    The second half of each sample is supervised.
    """
    import numpy as np

    from draft_trainer.data.dataset import write_tokenized_dataset

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_samples):
        n = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(0, vocab_size, size=n).astype(np.int32)
        mask = np.zeros(n, dtype=np.uint8)
        mask[n // 2:] = 1
        rows.append((i, ids, mask))
    return write_tokenized_dataset(out, rows, {"tokenizer_fingerprint": f"synthetic-v{vocab_size}"})
