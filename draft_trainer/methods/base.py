"""The draft-method interface: everything the trainer, export and evaluation know about a method.

A method is one folder under draft_trainer/methods/ (or any importable module, named as
`package.module:Class` in `model.method`) with a `DraftMethod` subclass. The trainer asks it:

  feature_spec(info)              which target features to stream (layer ids, teacher mode)
  build_model(info, vocab)        the trainable draft (an nn.Module), from the target's contract
  init_from_target(...)           optional start from the target's own weights (`model.init`)
  bind(frozen, vocab, device)     keep the frozen target tensors the loss needs (lm_head, ...)
  prepare(batch) -> targets       the no-grad targets of a batch (e.g. the teacher distribution)
  loss_counts(targets)            per-term supervised counts (normalised over micro-batches and ranks)
  loss(model, batch, targets, normalizers) -> (loss, StepStats)
  export(trained, out, fmt)       the serving format(s) (`export_formats`)
  drafter(export_dir, ...)        a Drafter for the lossless evaluator (`draft-trainer eval`)

The trainer never reaches into a method's model or targets; per-position metrics come back as
`draft_trainer.model.stats.StepStats`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable

import torch

from common.contract import ModelInfo
from common.features import FeatureSpec
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.model.stats import StepStats

Fetch = Callable[[list[str]], dict[str, torch.Tensor]]  # FetchTensors through the pool (rank 0, broadcast)


class DraftMethod(abc.ABC):
    """One draft method, configured by the run's `model` config section (`ModelConfig`)."""

    name: str = ""
    export_formats: tuple[str, ...] = ("sglang",)

    def __init__(self, model_cfg) -> None:
        self.cfg = model_cfg

    # ------------------------------------------------------------------ what the target sends
    @abc.abstractmethod
    def feature_spec(self, info: ModelInfo, teacher: str = "hidden", topk: int = 0) -> FeatureSpec:
        """The named features this method trains on, for a target described by `info`."""

    # ------------------------------------------------------------------ the model
    @abc.abstractmethod
    def build_model(self, info: ModelInfo, vocab: VocabMapping, spec: FeatureSpec) -> torch.nn.Module:
        """A freshly initialised draft (fp32, CPU); frozen parameters have requires_grad=False."""

    def draft_config(self, model: torch.nn.Module) -> dict:
        """What rebuilds the model's geometry (saved with checkpoints as draft_config.json)."""
        return model.cfg.to_dict()

    @abc.abstractmethod
    def model_from_config(self, draft_config: dict) -> torch.nn.Module:
        """The inverse of `draft_config`: an empty model of the same geometry (export, resume)."""

    def init_from_target(self, model: torch.nn.Module, how: str, info: ModelInfo, vocab: VocabMapping,
                         frozen: dict[str, torch.Tensor], fetch: Fetch | None, seed: int) -> None:
        """`model.init=how` on a fresh model; methods without target-derived inits accept only random."""
        if how != "random":
            from common.errors import ConfigError

            raise ConfigError(f"model.init={how}: method {self.name!r} only supports model.init=random")

    def frozen_tensor_names(self) -> list[str]:
        """FetchTensors names the method needs at every start (also kept in offline feature caches)."""
        return ["embed_tokens", "lm_head"]

    def unsharded_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Parameters FSDP must leave whole (frozen tables every rank reads in full)."""
        return []

    # ------------------------------------------------------------------ the objective
    @abc.abstractmethod
    def bind(self, model: torch.nn.Module, frozen: dict[str, torch.Tensor], vocab: VocabMapping,
             device: torch.device) -> None:
        """Keep what `prepare`/`loss` need from the frozen target tensors and the vocabulary."""

    @abc.abstractmethod
    def prepare(self, batch) -> Any:
        """No-grad targets of a batch (the teacher), computed once per micro-batch."""

    @abc.abstractmethod
    def loss_counts(self, targets: Any) -> list[float]:
        """Supervised positions per loss term; summed over micro-batches and ranks -> `normalizers`."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch, targets: Any,
             normalizers: list[float] | None = None) -> tuple[torch.Tensor, StepStats]:
        """The training loss (scalar, before backward) and per-position metrics."""

    def num_positions(self) -> int:
        """Draft positions the loss reports metrics for (TTT steps, block offsets)."""
        return 1

    def loss_weights(self, n_terms: int) -> list[float]:
        """How the per-term held-out losses combine into one number for logs (same as training)."""
        return [1.0] * n_terms

    # ------------------------------------------------------------------ serving
    @abc.abstractmethod
    def export(self, trained, output: Path, fmt: str) -> None:
        """Write serving format `fmt` of `trained` (draft_trainer.export.TrainedDraft: cfg, state,
        vocab, model_info, model) into the empty temporary directory `output`."""

    @abc.abstractmethod
    def drafter(self, export_dir: Path, target: torch.nn.Module, *, dtype: torch.dtype):
        """A Drafter (draft_trainer/evaluate) over an exported draft, for lossless evaluation."""

    @classmethod
    def recognises(cls, export_config: dict) -> bool:
        """True when an exported config.json is this method's (eval picks the method from it)."""
        return False


class Drafter(abc.ABC):
    """A draft model in the lossless evaluator's speculative-decoding loop (draft_trainer/eval.py).

    The loop owns the target and its KV cache; per round it asks `propose(k)` for up to k draft
    tokens, verifies them with one target forward, and calls `accept` with the committed tokens
    and the target's features at their positions (the layers of `layer_ids`, [n, L*H]), exactly
    as the server would have sent them in training.
    """

    layer_ids: tuple[int, ...] = ()

    @abc.abstractmethod
    def start(self, feats_SLH: torch.Tensor, tokens: list[int]) -> None:
        """Prefill: features of the prompt's S positions and the S tokens that follow them
        (prompt[1:] + the target's first token)."""

    @abc.abstractmethod
    def propose(self, k: int) -> list[int]:
        """Up to k draft tokens (target ids) continuing the committed sequence."""

    @abc.abstractmethod
    def accept(self, feats_nLH: torch.Tensor, tokens: list[int]) -> None:
        """The target committed `tokens` (accepted drafts + its own next token); `feats_nLH` are
        its features at the n positions that produced them (the last committed token before
        this round, then the accepted drafts)."""
