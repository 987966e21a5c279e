"""SGLang's own batch structures for one TP rank: extend and decode passes, KV slots freed per request.

Legend (shapes): N tokens of a packed extend batch, n sequences joining, B running sequences,
V vocab.

Every pass is built the way SGLang's scheduler builds it: `Req`s in a `ScheduleBatch`,
`prepare_for_extend` / `prepare_for_decode` (a request row from the req_to_token pool, token
slots from the token-to-KV allocator), `ForwardBatch.init_new`, `ModelRunner.forward`; running
generations join with `merge_batch` and leave with `filter_batch`. A request's row and slots go
back through SGLang's `release_kv_cache` against a disabled `UnifiedRadixCache` (the tree cache
SGLang itself builds under --disable-radix-cache: nothing shared, nothing kept). So a feature
pass and the running generations hold disjoint slots, and each frees only its own.

Runs in every rank's process, driven by the same programs in the same order (SPMD).
"""

from __future__ import annotations

import itertools
from array import array

import torch


class Passes:
    """Builds and runs SGLang batches on one rank's ModelRunner; gives requests' KV back."""

    def __init__(self, model_runner, vocab_size: int) -> None:
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
        from sglang.srt.runtime_context import get_schedule

        self.mr = model_runner
        self.vocab_size = vocab_size
        self.tree_cache = UnifiedRadixCache(CacheInitParams(
            disable=True, req_to_token_pool=self.mr.req_to_token_pool,
            token_to_kv_pool_allocator=self.mr.token_to_kv_pool_allocator, page_size=get_schedule().page_size,
            tree_components=(ComponentType.FULL,)))
        self._rid = itertools.count()  # unique request ids, identical on every rank (same program order)

    def free_slots(self) -> tuple[int, int]:
        """(free KV token slots, free request rows)."""
        return (self.mr.token_to_kv_pool_allocator.available_size(), self.mr.req_to_token_pool.available_size())

    def reqs(self, seqs: list[list[int]]):
        """One SGLang `Req` per sequence, whole (no prefix, no chunking), with a fresh request id."""
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        reqs = []
        for s in seqs:
            # Sampling happens in our DecodeLoop; SGLang's params only size its sampling info.
            r = Req(rid=f"specrelay-{next(self._rid)}", origin_input_text="", origin_input_ids=array("q", s),
                    sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
            r.full_untruncated_fill_ids = r.origin_input_ids
            r.logprob_start_len = -1
            r.extend_end = len(s)  # the whole prompt in one extend: no prefix, no chunking
            reqs.append(r)
        return reqs

    def extend(self, seqs: list[list[int]]):
        """One EXTEND pass over whole sequences: (batch, forward batch, logits output). The batch's
        requests hold their KV until `release`; on failure they are released before raising."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        batch = ScheduleBatch.init_new(
            reqs=self.reqs(seqs), req_to_token_pool=self.mr.req_to_token_pool,
            token_to_kv_pool_allocator=self.mr.token_to_kv_pool_allocator, tree_cache=self.tree_cache,
            model_config=self.mr.model_config, enable_overlap=False, spec_algorithm=SpeculativeAlgorithm.NONE)
        try:
            batch.prepare_for_extend()
            if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
                batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
                batch.prefill_input_ids_cpu = None
            fb = ForwardBatch.init_new(batch, self.mr, return_hidden_states_before_norm=False)
            return batch, fb, self.mr.forward(fb).logits_output
        except BaseException:
            self.release(batch.reqs)
            raise

    def decode(self, batch, tokens: list[int]):
        """One DECODE pass: `tokens[b]` is fed to row b (its KV slot allocated here)."""
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch

        batch.output_ids = torch.tensor(tokens, dtype=torch.int64, device=batch.device)
        batch.input_ids = batch.output_ids
        batch.prepare_for_decode()
        fb = ForwardBatch.init_new(batch, self.mr, return_hidden_states_before_norm=False)
        return self.mr.forward(fb).logits_output

    def release(self, reqs) -> None:
        from sglang.srt.mem_cache.common import release_kv_cache

        for r in reqs:
            if not r.kv.holds_kv:
                continue
            if r.kv.kv_allocated_len:
                release_kv_cache(r, self.tree_cache, checkpoint=False)
            else:  # a row was taken but the token allocation failed
                self.mr.req_to_token_pool.free(r)
                r.kv.mark_kv_released()

    def next_logits(self, logits_output) -> torch.Tensor:
        """[rows, V] next-token logits (fp32, a CPU copy: the output buffer may be reused)."""
        return logits_output.next_token_logits[:, : self.vocab_size].to("cpu", torch.float32, copy=True)


class RunningBatch:
    """Generations in flight on one rank: row b is the b-th sequence joined and kept (one
    `ScheduleBatch` in decode mode). Each sequence holds its own request row and KV slots."""

    def __init__(self, passes: Passes) -> None:
        self.passes = passes
        self.batch = None

    @property
    def rows(self) -> int:
        return 0 if self.batch is None else len(self.batch.reqs)

    def join(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill `prompts` as their own extend batch, then merge it in: [n, V] logits."""
        new, _, out = self.passes.extend(prompts)
        logits_nV = self.passes.next_logits(out)
        if self.batch is None:
            self.batch = new
        else:
            self.batch.merge_batch(new)
        return logits_nV

    def step(self, tokens: list[int]) -> torch.Tensor:
        if len(tokens) != self.rows:
            raise ValueError(f"step: {len(tokens)} tokens for {self.rows} rows")
        return self.passes.next_logits(self.passes.decode(self.batch, tokens))

    def keep(self, rows: list[int]) -> None:
        """Keep `rows` (ascending); every other sequence's row and KV slots are freed now."""
        if self.batch is None or len(rows) == self.rows:
            return
        kept = set(rows)
        self.passes.release([r for i, r in enumerate(self.batch.reqs) if i not in kept])
        if rows:
            self.batch.filter_batch(keep_indices=list(rows))
        else:
            self.batch = None
