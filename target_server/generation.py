"""Generation as a scheduler request kind: sequences, sampling, stop rules, one decode step.

Legend (shapes): B running sequences (rows of the backend's decoder), V vocab size.

A `GenRequest` (one Generate RPC) holds prompts; each prompt becomes a `GenSeq`. The scheduler
queues sequences per client, admits them into the running batch between decode steps
(continuous batching: a sequence joins with its own prefill, and leaves, freeing its KV rows,
the step it finishes), and calls `DecodeLoop.step` for one iteration. Backends without a
batched decoder (`Backend.decoder()` is None) run a whole request through `Backend.generate`.

Sampling is per sequence: greedy at temperature 0, else temperature, then top-k, then top-p
(nucleus), drawn with the sequence's own generator seeded from (request seed, prompt key: the id the
caller gave it, else its index), so a sample does not depend on what it was batched with or
which request carried it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from target_server.backends.base import Completion

MAX_RUNNING_SEQS = 256  # rows of one decode batch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def seq_generator(seed: int, key: str) -> torch.Generator:
    """The generator of the prompt named `key` in a request with `seed` (independent of batching)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_rows(logits_BV: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]) -> list[int]:
    """One token per row: greedy rows by argmax (batched), sampled rows with their own generator."""
    logits_BV = logits_BV.float()
    out = logits_BV.argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if not p.greedy:
            out[b] = sample_one(logits_BV[b], p, gens[b])
    return out


def sample_one(logits_V: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits_V = logits_V.float().cpu() / p.temperature
    if 0 < p.top_k < logits_V.shape[0]:
        kth = logits_V.topk(p.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if 0 < p.top_p < 1:
        sp, si = probs_V.sort(descending=True)
        keep = sp.cumsum(0) - sp < p.top_p  # the smallest prefix whose mass reaches top_p
        probs_V = torch.zeros_like(probs_V).scatter_(0, si[keep], sp[keep])
    return int(torch.multinomial(probs_V, 1, generator=gen))


class RequestLifecycle:
    """Deadline and terminal failure of a scheduler request (feature or generation): the request
    has `deadline` (unix seconds, 0 = none), `cancelled` (an Event) and `results` (a Queue)."""

    def expired(self, now: float | None = None) -> bool:
        return self.deadline > 0 and (now or time.time()) > self.deadline

    def fail(self, exc: BaseException) -> None:
        """Deliver a terminal error once and stop any further work for this request."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.results.put(exc)


@dataclass(eq=False)
class GenRequest(RequestLifecycle):
    """One Generate call: prompts with shared settings; results arrive per prompt index."""

    request_id: str
    client_id: str
    prompts: list[list[int]]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    stop_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    deadline: float = 0.0  # unix seconds; 0 = none
    keys: tuple[str, ...] = ()  # the prompts' ids (sampling seeds); empty = their indices
    results: "queue.Queue[tuple[int, Completion] | BaseException]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = 0.0  # monotonic

    def __post_init__(self) -> None:
        # What the request may cost: every prompt plus its whole answer (the queue bound's unit).
        self.tokens = sum(len(p) + self.max_new_tokens for p in self.prompts)



@dataclass(eq=False)
class GenSeq:
    """One prompt of a GenRequest, queued or running."""

    request: GenRequest
    index: int
    tokens: list[int] = field(default_factory=list)  # generated so far
    first_token_at: float = 0.0  # monotonic
    finish_reason: str = ""
    gen: torch.Generator | None = None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompts[self.index]

    @property
    def key(self) -> str:
        return self.request.keys[self.index] if self.request.keys else str(self.index)

    @property
    def reserve(self) -> int:
        """KV tokens this sequence may grow to: its share of the batch token budget."""
        return len(self.prompt) + self.request.max_new_tokens

    @property
    def dead(self) -> bool:
        return self.request.cancelled.is_set() or self.request.expired()

    def append(self, tok: int, detokenize) -> bool:
        """Add a token; True when the sequence is finished (eos / stop string / length)."""
        now = time.monotonic()
        if not self.tokens:
            self.first_token_at = now
        self.tokens.append(tok)
        if tok in self.request.stop_token_ids:
            self.finish_reason = "stop"
        elif self.request.stop_strings and _hits_stop(self.tokens, self.request.stop_strings, detokenize):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.request.max_new_tokens:
            self.finish_reason = "length"
        return bool(self.finish_reason)


def _hits_stop(tokens: list[int], stops: tuple[str, ...], detokenize) -> bool:
    # Only the tail can complete a stop string: decode enough tokens to cover the longest one.
    tail = detokenize(tokens[-(max(map(len, stops)) + 8):])
    return any(s in tail for s in stops)


class DecodeLoop:
    """The running batch: sequences aligned with the backend decoder's rows."""

    def __init__(self, backend, metrics=None) -> None:
        self.backend = backend
        self.decoder = backend.decoder()
        self.metrics = metrics
        self.running: list[GenSeq] = []
        self.reserved = 0  # sum of running sequences' reserve

    @property
    def batched(self) -> bool:
        return self.decoder is not None

    @property
    def padded_rows(self) -> bool:
        return self.batched and self.decoder.padded_rows

    def step(self, admitted: list[GenSeq]) -> tuple[list[GenSeq], int]:
        """Prefill `admitted`, then one decode step for every running sequence.

        Returns (finished sequences, tokens computed). Dead (cancelled / expired) sequences leave
        first; finished ones leave at once, so their rows are free for the next admission.
        """
        finished: list[GenSeq] = []
        computed = 0
        self._leave([s for s in self.running if s.dead])
        admitted = [s for s in admitted if not s.dead]
        if admitted:
            logits_BV = self.decoder.prefill([s.prompt for s in admitted])
            computed += sum(len(s.prompt) for s in admitted)
            for s in admitted:
                s.gen = None if s.request.params.greedy else seq_generator(s.request.params.seed, s.key)
            toks = sample_rows(logits_BV, [s.request.params for s in admitted], [s.gen for s in admitted])
            self.running += admitted
            self.reserved += sum(s.reserve for s in admitted)
            for s, t in zip(admitted, toks):
                if s.append(t, self.backend.detokenize):
                    finished.append(s)
            self._leave(finished)
        # The just-admitted rows take their next step with the others.
        if self.running:
            t0 = time.perf_counter()
            logits_BV = self.decoder.step([s.tokens[-1] for s in self.running])
            computed += len(self.running)
            if self.metrics is not None:
                self.metrics.gen_batch_size.observe(len(self.running))
                self.metrics.gen_step_seconds.observe(time.perf_counter() - t0)
                self.metrics.gen_kv_bytes.set(self.decoder.kv_bytes)
            toks = sample_rows(logits_BV, [s.request.params for s in self.running], [s.gen for s in self.running])
            done = [s for s, t in zip(self.running, toks) if s.append(t, self.backend.detokenize)]
            self._leave(done)
            finished += done
        return finished, computed

    def _leave(self, seqs: list[GenSeq]) -> None:
        if not seqs:
            return
        gone = set(map(id, seqs))
        keep = [i for i, s in enumerate(self.running) if id(s) not in gone]
        if len(keep) < len(self.running):
            self.reserved -= sum(s.reserve for s in self.running if id(s) in gone)
            self.running = [self.running[i] for i in keep]
            self.decoder.keep(keep)
            if self.metrics is not None and not self.running:
                self.metrics.gen_kv_bytes.set(self.decoder.kv_bytes)  # released with the batch

    def clear(self) -> None:
        if self.running:
            self._leave(list(self.running))
