"""`draft-trainer export`: a training checkpoint -> a serving directory, through the run's method.

    draft-trainer export --checkpoint runs/x/checkpoints/latest --output drafts/x [--format sglang]

`load_trained_draft` is the one place that reads a training checkpoint for export and eval: the
method recorded in the checkpoint (`config.json` -> model.method) rebuilds an empty model from
`draft_config.json`, the weights come from the checkpoint, and the vocabulary mapping stored
with the weights must equal the pinned `vocab.json` beside them (and, on resume, the run's own).
The method writes its format into a temporary directory that is published by one rename, with
`specrelay_export.json` (provenance: checkpoint, target, tokenizer, vocabulary; engines ignore it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import ContractError, ExportError
from common.files import replace_dir
from draft_trainer.data.vocab import VocabMapping, check_same_vocab
from draft_trainer.methods import method_class
from draft_trainer.train import checkpoint as ckpt_io

PROVENANCE_FILE = "specrelay_export.json"
DEFAULT_METHOD = "eagle3"  # checkpoints written before model.method existed


@dataclass
class TrainedDraft:
    """What a training checkpoint holds that export and eval need."""

    cfg: object                              # the method's draft config (e.g. eagle3's DraftConfig)
    state: dict[str, torch.Tensor]           # draft tensors (no embed_tokens), incl. vocabulary buffers
    vocab: VocabMapping
    model_info: dict = field(default_factory=dict)
    path: Path | None = None
    method: str = DEFAULT_METHOD
    model: torch.nn.Module | None = None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, a `latest`/`best` link, or a run directory (-> its checkpoints/latest)."""
    p = Path(path)
    for cand in (p, p / "checkpoints" / "latest"):
        if (cand / ckpt_io.COMPLETE).is_file():
            return cand.resolve()
    raise ExportError(f"{path} is not a complete draft checkpoint (no {ckpt_io.COMPLETE} marker); pass a run's "
                      "checkpoints/step_N (or latest, best) directory")


def checkpoint_method(d: Path) -> str:
    run_cfg = d / "config.json"
    if not run_cfg.is_file():
        return DEFAULT_METHOD
    return (json.loads(run_cfg.read_text()).get("model") or {}).get("method", DEFAULT_METHOD)


def load_trained_draft(ckpt_dir: str | Path, expected_vocab: VocabMapping | None = None) -> TrainedDraft:
    """Read a training checkpoint and check its vocabulary mapping (see the module doc)."""
    d = resolve_checkpoint(ckpt_dir)
    name = checkpoint_method(d)
    method = method_class(name)(None)
    try:
        model = method.model_from_config(json.loads((d / "draft_config.json").read_text()))
        ckpt_io.load_model_state(d, model)
    except (OSError, ValueError, TypeError, RuntimeError, ckpt_io.CheckpointError) as e:
        raise ExportError(f"cannot read checkpoint {d}: {e}") from None
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embed_tokens")}
    if not (d / "vocab.json").is_file():
        raise ExportError(f"checkpoint {d} has no vocab.json: the draft vocabulary mapping is missing")
    vocab = VocabMapping.load(d / "vocab.json")
    info_path = d / "model_info.json"
    model_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if "d2t" not in state or "t2d" not in state:
        raise ExportError(f"checkpoint {d} carries no d2t/t2d buffers")
    from_buffers = VocabMapping.from_buffers(state["d2t"], state["t2d"])
    check_same_vocab(vocab, from_buffers, f"{d}/vocab.json", f"the d2t/t2d buffers in {d}")
    if expected_vocab is not None:
        check_same_vocab(expected_vocab, vocab, "this run's draft vocabulary", f"checkpoint {d}", error=ContractError)
    cfg = model.cfg
    if (vocab.vocab_size, vocab.draft_vocab_size) != (cfg.vocab_size, cfg.draft_vocab_size):
        raise ExportError(f"checkpoint {d}: vocab.json is V={vocab.vocab_size}, Vd={vocab.draft_vocab_size} but "
                          f"draft_config.json says V={cfg.vocab_size}, Vd={cfg.draft_vocab_size}")
    return TrainedDraft(cfg=cfg, state=state, vocab=vocab, model_info=model_info, path=d, method=name, model=model)


def export_draft(checkpoint: str | Path, output: str | Path, fmt: str = "sglang", overwrite: bool = False) -> Path:
    """Write `checkpoint`'s draft in serving format `fmt` to `output` (atomically)."""
    td = load_trained_draft(checkpoint)
    method = method_class(td.method)(None)
    if fmt not in method.export_formats:
        raise ExportError(f"--format {fmt}: method {td.method!r} exports {', '.join(method.export_formats)}")
    out = Path(output)
    provenance = {
        "method": td.method, "format": fmt, "source_checkpoint": str(td.path),
        "vocab_fingerprint": td.vocab.fingerprint(), "vocab_coverage": td.vocab.coverage,
        "target_model": td.model_info.get("model_name", ""),
        "target_tokenizer_fingerprint": td.model_info.get("tokenizer_fingerprint", ""),
        "draft_config": method.draft_config(td.model),
    }
    # A temp dir beside `out`, swapped in only on success; a user's directory is never replaced.
    with replace_dir(out, "export", overwrite=overwrite, replace_own=False, error=ExportError,
                     hint="pass --overwrite or choose another --output") as tmp:
        method.export(td, tmp, fmt)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1))
    return out


def export_sglang(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    return export_draft(checkpoint, output, "sglang", overwrite)
