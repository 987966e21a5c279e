"""Read and write EAGLE-3 draft directories (config.json + model.safetensors), and convert them.

    to_speculators(sglang_dir, out_dir)      # what `draft-trainer export --format speculators` needs
    to_sglang(speculators_dir, out_dir)
    convert_dir(input, output, to="sglang"|"speculators", target_model=DIR)

Writes are atomic (temp dir renamed onto the output only after the result was read back and
validated) and refuse a non-empty output unless `overwrite`. Other files of the input directory
(provenance, README) are copied unchanged.

Legend (shapes): V target vocabulary, H the embedding width (the draft's hidden size, equal to
the target's for SpecRelay drafts).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import ExportError
from common.files import OUTPUT_MARKER, replace_dir
import draft_trainer.formats.eagle3 as eagle3

CONFIG_FILE = "config.json"
WEIGHT_FILE = "model.safetensors"
FORMATS = ("sglang", "speculators")


@dataclass
class DraftFiles:
    config: dict
    tensors: dict[str, torch.Tensor]
    other_files: list[Path]     # copied through unchanged

    @property
    def format(self) -> str:
        return eagle3.detect(self.config)


@dataclass
class TargetFacts:
    """What conversion needs from the target: its depth (to check ids) and embedding (to check a draft's)."""

    num_layers: int | None = None
    embed_VH: torch.Tensor | None = None
    name_or_path: str | None = None
    architectures: list[str] | None = None


def read_draft(path: str | Path) -> DraftFiles:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHT_FILE).is_file():
        raise ExportError(f"{p} is not a draft directory (needs {CONFIG_FILE} and {WEIGHT_FILE}; sharded weights "
                          "are not supported)")
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
        tensors = load_file(str(p / WEIGHT_FILE))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read draft {p}: {e}") from None
    # The output marker says which command wrote the directory, not what the draft is: not carried.
    others = [f for f in sorted(p.iterdir()) if f.name not in (CONFIG_FILE, WEIGHT_FILE, OUTPUT_MARKER) and f.is_file()]
    return DraftFiles(config=config, tensors=tensors, other_files=others)


def read_target(path: str | Path) -> TargetFacts:
    """Depth, embedding table and architectures of an HF target model directory (safetensors)."""
    from safetensors import safe_open

    p = Path(path)
    try:
        top = json.loads((p / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"--target-model {p}: cannot read {CONFIG_FILE}: {e}") from None
    cfg = top.get("text_config", top)
    embed = None
    for f in sorted(p.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in ("model.embed_tokens.weight", "embed_tokens.weight", "model.language_model.embed_tokens.weight"):
                if name in st.keys():
                    embed = st.get_tensor(name)
                    break
        if embed is not None:
            break
    return TargetFacts(num_layers=cfg.get("num_hidden_layers"), embed_VH=embed, name_or_path=str(p),
                       architectures=list(top.get("architectures") or []))


def write_files(tmp: Path, config: dict, tensors: dict[str, torch.Tensor], other_files: list[Path] = ()) -> None:
    """Write a draft into the empty directory `tmp` and read it back (export and convert publish it)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHT_FILE), metadata={"format": "pt"})
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    for f in other_files:
        shutil.copy2(f, tmp / f.name)
    back = read_draft(tmp)   # read back before publishing
    if back.config != config or set(back.tensors) != set(tensors):
        raise ExportError(f"{tmp}: the written draft does not read back identically")


def write_draft(out: str | Path, config: dict, tensors: dict[str, torch.Tensor], other_files: list[Path] = (),
                overwrite: bool = False) -> Path:
    out = Path(out)
    # Built beside `out` and swapped in whole; a directory of the user's is never replaced.
    with replace_dir(out, "export", overwrite=overwrite, replace_own=False, error=ExportError,
                     hint="pass --overwrite or choose another --output") as tmp:
        write_files(tmp, config, tensors, other_files)
    return out


def convert(src: DraftFiles, to: str, target: TargetFacts | None = None,
            speculative_tokens: int = 3) -> tuple[dict, dict[str, torch.Tensor]]:
    """Convert in memory; converting to the format the draft is already in is an error (nothing to do)."""
    if to not in FORMATS:
        raise ExportError(f"unknown format {to!r}; use one of {list(FORMATS)}")
    t = target or TargetFacts()
    if src.format == to:
        raise ExportError(f"the draft is already in the {to} format")
    if to == "speculators":
        verifier = t.name_or_path
        if verifier is None:   # our export's provenance names the target it was trained for
            verifier = _provenance(src).get("target_model") or None
        return eagle3.sglang_to_speculators(src.config, src.tensors, verifier=verifier,
                                            verifier_architectures=t.architectures,
                                            speculative_tokens=speculative_tokens, target_num_layers=t.num_layers,
                                            target_embed_VH=t.embed_VH)
    return eagle3.speculators_to_sglang(src.config, src.tensors, target_num_layers=t.num_layers,
                                        target_embed_VH=t.embed_VH)


def _provenance(src: DraftFiles) -> dict:
    for f in src.other_files:
        if f.name == "specrelay_export.json":
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
    return {}


def convert_dir(input: str | Path, output: str | Path, to: str, target_model: str | Path | None = None,
                overwrite: bool = False, speculative_tokens: int = 3) -> Path:
    src = read_draft(input)
    target = read_target(target_model) if target_model is not None else None
    config, tensors = convert(src, to, target, speculative_tokens)
    return write_draft(output, config, tensors, src.other_files, overwrite=overwrite)


def to_speculators(sglang_dir: str | Path, out_dir: str | Path, target_model: str | Path | None = None,
                   overwrite: bool = False, speculative_tokens: int = 3) -> Path:
    return convert_dir(sglang_dir, out_dir, "speculators", target_model, overwrite, speculative_tokens)


def to_sglang(speculators_dir: str | Path, out_dir: str | Path, target_model: str | Path | None = None,
              overwrite: bool = False) -> Path:
    return convert_dir(speculators_dir, out_dir, "sglang", target_model, overwrite)
