"""The backend interface: one batched, prefill-only forward that returns EAGLE-3 features.

Legend (shapes): B sequences in a forward batch, T tokens of one sequence, H hidden size,
K top-k width, V vocab size.

A backend owns the model (HF transformers, SGLang's model runner, or the synthetic stand-in);
the scheduler owns batching and the services own the wire. Backends never see Arrow or gRPC.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from common.contract import ModelInfo


@dataclass
class Capture:
    """Features of one sequence. `teacher_TH` for teacher=hidden, `topk_*` for teacher=topk."""

    aux_T3H: torch.Tensor
    teacher_TH: torch.Tensor | None = None
    topk_ids_TK: torch.Tensor | None = None
    topk_logprobs_TK: torch.Tensor | None = None


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"


class Backend(abc.ABC):
    """What the scheduler and services need from a model."""

    name: str = "base"

    @abc.abstractmethod
    def model_info(self) -> ModelInfo:
        """The contract (without server-side fields like ports, which the server fills in)."""

    @abc.abstractmethod
    def forward(self, seqs: list[list[int]], teacher: str, topk: int = 0,
                layer_ids: tuple[int, ...] | None = None) -> list[Capture]:
        """One batched prefill over `seqs`; returns one Capture per sequence (CPU tensors): the
        outputs of decoder layers `layer_ids` (default: the backend's aux layers) concatenated in
        that order, and the teacher (none / final normed hidden / top-k)."""

    @abc.abstractmethod
    def frozen_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Canonical names (common.contract): embed_tokens [V,H], lm_head [V,H], final_norm [H], and
        decoder-layer weights `layers.<i>.<suffix>` (HF shapes: [out, in] for projections)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop_token_ids: list[int]) -> list[Completion]:
        raise NotImplementedError(f"backend {self.name!r} does not support generation")

    def decoder(self) -> "Decoder | None":
        """A batched decoder for continuous-batching generation, or None (then `generate` serves
        one prompt at a time)."""
        return None

    def generation_kv_budget(self) -> int | None:
        """KV tokens the decoder's running sequences may hold at once, if the backend's cache is
        bounded below `--max-batch-tokens` (None: no bound of its own)."""
        return None

    def eos_token_ids(self) -> list[int]:
        """Where generation stops when a request names no stop tokens."""
        return []

    def chat_prompt(self, messages: list[dict], template_kwargs: dict) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template and a generation prompt."""
        raise NotImplementedError(f"backend {self.name!r} has no chat template: send token_ids")

    def detokenize(self, token_ids: list[int]) -> str:
        """Text of `token_ids` (for stop strings)."""
        raise NotImplementedError(f"backend {self.name!r} has no tokenizer: stop strings are not supported")

    def close(self) -> None:
        pass


class Decoder(abc.ABC):
    """KV-cached decode state of the running sequences: row b is the b-th sequence added and kept.

    Driven by one thread (the scheduler's worker) between feature forward passes.
    """

    # True where every row holds as many KV columns as the longest one (one rectangular cache):
    # the batch's KV is then rows x longest, not the sum of the rows, and admission must bound that.
    padded_rows: bool = False

    @abc.abstractmethod
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Append one row per prompt (its KV cache filled); returns the next-token logits [n, V]."""

    @abc.abstractmethod
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row (in row order); returns the next-token logits [B, V]."""

    @abc.abstractmethod
    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (ascending), in that order; their KV entries stay, the others are freed."""

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache held now (for the server's metrics; 0 where the decoder does not know)."""
        return 0



def topk_logprobs(final_TH: torch.Tensor, logits_fn, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k full-vocabulary log-probs (int32 ids [T,K], fp32 values [T,K], on CPU).

    `logits_fn` maps final normed hidden states [t,H] to logits [t,V]; chunked over tokens so
    the [T,V] logits never exist at once.
    """
    ids, lps = [], []
    for s in range(0, final_TH.shape[0], chunk):
        logp_tV = torch.log_softmax(logits_fn(final_TH[s : s + chunk]).float(), dim=-1)
        v, i = logp_tV.topk(k, dim=-1)
        ids.append(i.to(torch.int32).cpu())
        lps.append(v.cpu())
    return torch.cat(ids), torch.cat(lps)
