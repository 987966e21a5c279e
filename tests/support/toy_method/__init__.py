"""A toy second draft method, added as one folder and chosen by its import path
(`model.method=tests.support.toy_method:ToyMethod`): nothing outside this folder changes.

A next-next-token head over one target layer: from the target's layer-(L-2) output at position t
(computed reading token t), predict token t+2. In speculative decoding that is one draft token
after the target's own next token. It exists to prove the seam (tests/integration/test_method_seam.py):
it trains, checkpoints, resumes, exports and evaluates through the same commands as EAGLE-3.

Legend (shapes): B batch, T sequence length, H target hidden, Vd draft vocab.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.features import FeatureSpec
from draft_trainer.methods.base import DraftMethod
from draft_trainer.model.layers import RMSNorm
from draft_trainer.model.stats import StepStats
from draft_trainer.model.tensors import shift_left

IMPORT_PATH = "tests.support.toy_method:ToyMethod"
WEIGHTS = "toy.safetensors"


@dataclass
class ToyConfig:
    hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    layer_id: int
    rms_norm_eps: float = 1e-6

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ToyHead(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    def forward(self, h_BTH: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h_BTH))

    def to_target(self, ids: torch.Tensor) -> torch.Tensor:
        return ids + self.d2t[ids]


class ToyMethod(DraftMethod):
    name = "toy-next-next"
    export_formats = ("toy",)

    def feature_spec(self, info, teacher="hidden", topk=0) -> FeatureSpec:
        return FeatureSpec((info.num_layers - 2,), teacher="none")

    def build_model(self, info, vocab, spec) -> ToyHead:
        m = ToyHead(ToyConfig(info.hidden_size, info.vocab_size, vocab.draft_vocab_size, spec.layer_ids[0]))
        m.d2t.copy_(vocab.d2t)
        m.t2d.copy_(vocab.t2d)
        return m

    def model_from_config(self, draft_config: dict) -> ToyHead:
        return ToyHead(ToyConfig(**draft_config))

    def bind(self, model, frozen, vocab, device) -> None:
        self.target_to_draft = vocab.target_to_draft.to(device)
        self.t2d = vocab.t2d.to(device)

    def prepare(self, batch):
        # Position t learns token t+2 where that token is supervised and inside the draft vocab.
        labels_BT = shift_left(batch.input_ids_BT, 2)
        mask_BT = shift_left(batch.loss_mask_BT, 2) * self.t2d[labels_BT].float()
        return self.target_to_draft[labels_BT], labels_BT, mask_BT

    def loss_counts(self, targets) -> list[float]:
        return [float(targets[2].sum())]

    def loss(self, model, batch, targets, normalizers=None):
        draft_labels_BT, labels_BT, mask_BT = targets
        logits_BTV = model(batch.aux_BT3H.float())
        ce_BT = F.cross_entropy(logits_BTV.transpose(1, 2), draft_labels_BT, reduction="none")
        n = float(mask_BT.sum())
        ce_sum = (ce_BT * mask_BT).sum()
        loss = ce_sum / max(normalizers[0] if normalizers else n, 1.0)
        with torch.no_grad():
            right = float(((model.to_target(logits_BTV.argmax(-1)) == labels_BT).float() * mask_BT).sum())
            ea = float((torch.softmax(logits_BTV, -1).gather(-1, draft_labels_BT[..., None])[..., 0] * mask_BT).sum())
        stats = StepStats()
        stats.add_step(n, float(ce_sum), right, right, n, ea)
        return loss, StepStats.from_sums(stats.sums)

    def export(self, trained, output: Path, fmt: str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trained.state.items()}, str(output / WEIGHTS))
        (output / "config.json").write_text(json.dumps({"specrelay": {"method": IMPORT_PATH},
                                                        "toy_config": trained.cfg.to_dict()}))

    def drafter(self, export_dir: Path, target, *, dtype, untrained: bool = False, seed: int = 0):
        from safetensors.torch import load_file

        cfg = json.loads((export_dir / "config.json").read_text())["toy_config"]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = ToyHead(ToyConfig(**cfg))
        state = load_file(str(export_dir / WEIGHTS))
        model.load_state_dict({k: v for k, v in state.items() if k in ("d2t", "t2d")} if untrained else state,
                              strict=not untrained)
        return ToyDrafter(model.to(dtype).eval())


class ToyDrafter:
    """One draft token per round: the head over the last verified position's layer output."""

    name = "toy-next-next"

    def __init__(self, model: ToyHead) -> None:
        self.model = model
        self.feature_layers = (model.cfg.layer_id,)
        self.last_H = None

    def start(self, prompt, first_token, feats_SF) -> None:
        self.last_H = feats_SF[-1]

    @torch.no_grad()
    def propose(self, max_tokens: int) -> list[int]:
        return [int(self.model.to_target(self.model(self.last_H[None].float()).argmax(-1))[0])][:max_tokens]

    def extend(self, tokens, feats_SF) -> None:
        self.last_H = feats_SF[-1]
