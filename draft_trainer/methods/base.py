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
from collections.abc import Sequence
from typing import Any, Callable, Protocol, runtime_checkable

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
    sglang_algorithm: str = "EAGLE3"   # what SGLang's --speculative-algorithm names for this method's export

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

    def chosen_layers(self, default) -> tuple[int, ...]:
        """The target layers to read: `model.feature_layers` when set, else the method's `default`."""
        return tuple(getattr(self.cfg, "feature_layers", None) or default)

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
    def drafter(self, export_dir: Path, target: torch.nn.Module, *, dtype: torch.dtype, untrained: bool = False,
                seed: int = 0) -> "Drafter":
        """A Drafter over an exported draft, for lossless evaluation; with `untrained`, the same
        geometry, vocabulary mapping and frozen embedding with freshly initialised weights (the
        baseline that says what training added). Raises ContractError when the draft does not fit
        `target`."""

    @classmethod
    def recognises(cls, export_config: dict) -> bool:
        """True when an exported config.json is this method's (eval picks the method from it)."""
        return False


# ----------------------------------------------------------------------------- the evaluator's seam
# The lossless evaluator (draft_trainer/evaluate) runs any method's drafter through one loop.
# The drafter seam of the lossless evaluator: what a draft method hands `speculative_decode`.
#
# Legend (shapes): S positions, F feature width (the chosen target layers' hidden states
# concatenated, e.g. 3H for EAGLE-3).
#
# The evaluator keeps the committed sequence x_0..x_n (x_n is the last token the target chose; it
# is not yet in the target's KV cache). Each round it asks the drafter for up to K tokens that
# continue the sequence, verifies them with one target forward over [x_n, d_1..d_k], and then
# commits the accepted drafts and the target's bonus token. Features always travel with the
# position they were computed at, and a committed token t_{p+1} is paired with the target's
# features at position p (the position whose output predicted it), as in training. So:
#
#   start(prompt, first, feats_SF):  commits prompt + [first]; feats_SF[p] = features of prompt
#                                    position p (S = len(prompt)), i.e. the position before
#                                    prompt[1:] + [first];
#   extend(tokens, feats_SF):        commits tokens (the a accepted drafts + the bonus token);
#                                    feats_SF[i] = features of the position before tokens[i]
#                                    (those of x_n, d_1..d_a: what the target just verified);
#   propose(k, min_confidence):      up to k tokens continuing the committed sequence (fewer, or
#                                    none, is allowed: the round then verifies fewer tokens). A
#                                    drafter that scores its tokens stops once the chain's
#                                    confidence (product of its top-1 probabilities) would fall
#                                    below min_confidence; one that does not (prompt lookup) ignores it.
#   propose_tree(k, width, min_confidence):  (optional) the same chain and, per chain position,
#                                    up to width - 1 other candidates for it (the draft's next-best
#                                    tokens there), verified beside the chain in the same forward.
#
# `feature_layers` names the decoder layers whose outputs make the features (in that order;
# `()` = the drafter needs none, and the target runs without capturing hidden states).


@runtime_checkable
class Drafter(Protocol):
    name: str
    feature_layers: tuple[int, ...]

    def start(self, prompt: Sequence[int], first_token: int, feats_SF: torch.Tensor | None) -> None:
        """A new sequence: forget the previous one, commit prompt + [first_token]."""
        ...

    def propose(self, max_tokens: int, min_confidence: float = 0.0) -> list[int]:
        """Up to max_tokens draft tokens (target vocabulary ids) continuing the committed sequence,
        stopping before the chain's confidence falls below min_confidence (0: always max_tokens)."""
        ...

    def extend(self, tokens: Sequence[int], feats_SF: torch.Tensor | None) -> None:
        """Commit `tokens` after a verification (see the module doc for the feature pairing)."""
        ...
