"""SGLang's ModelRunner for one TP rank, driven directly (no scheduler, tokenizer manager or HTTP).

Legend (shapes): N tokens of a packed batch (SGLang packs sequences, no padding), T tokens of
one sequence, H hidden size, V vocab, K top-k.

Runs in every rank's process: rank 0 in the server, ranks 1..tp-1 in workers (workers.py).
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK
from target_server.backends.base import Capture, Completion, topk_logprobs
from target_server.backends.hf_helpers import sample_next

# Sequences per forward pass: sizes SGLang's request-to-token table (rows x context length).
MAX_SEQS_PER_FORWARD = 256


@dataclass
class _Program:
    """One unit of SPMD work every TP rank runs identically."""

    op: str  # "capture" | "generate" | "stop"
    seqs: list[list[int]] | None = None
    teacher: str = TEACHER_HIDDEN
    topk: int = 0
    layer_ids: tuple[int, ...] = ()   # the feature spec's layers (empty: the backend's aux layers)
    gen: dict | None = None


class _Runner:
    """SGLang's ModelRunner for one TP rank, plus the capture hook. Runs in every rank's process."""

    def __init__(self, spec: dict, tp_rank: int) -> None:
        if spec["device"] == "cpu":
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        from sglang.benchmark.one_batch import TreeCacheNamespace, _init_process_global_configs
        from sglang.srt.arg_groups.overrides import resolving_view
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import bootstrap
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.runtime_context import SpawnRanks, get_device, get_schedule, publish, spawn_world_rank

        self.spec = spec
        self.tp_rank = tp_rank
        sa = _server_args(spec)
        cfg = resolving_view(sa)
        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=spawn_world_rank(sa, tp_rank=tp_rank, pp_rank=0),
                                                      gpu_id=tp_rank))
        _init_process_global_configs()
        model_config = ModelConfig.from_server_args(sa)
        # A file-based rendezvous: SGLang's default TCP store listens on every interface, and the
        # server must listen only where it was told to (all ranks share one host).
        os.environ["SGLANG_DISTRIBUTED_INIT_METHOD_OVERRIDE"] = spec["dist_init_method"]
        bootstrap.init_parallel_runtime(server_args=sa, device=get_device().device, dist_port=spec["dist_port"])
        bootstrap.init_layer_runtime(model_config=model_config)
        self.mr = ModelRunner(model_config=model_config, mem_fraction_static=cfg.mem_fraction_static, gpu_id=tp_rank,
                              nccl_port=spec["dist_port"], server_args=sa)
        self.mr.alloc_memory_pool()
        self.mr.init_attention_backends()
        self.mr.init_cuda_graphs()  # with graphs disabled: installs the eager runners
        self.model = self.mr.model
        self._capturing = sorted(spec["aux_layer_ids"])
        self.model.set_eagle3_layers_to_capture(list(self._capturing))
        self._seen: dict = {}
        self._want_last = False
        self.model.logits_processor.register_forward_pre_hook(self._pre_logits)
        # SGLang captures layer i as the input of layer i + 1, so the last layer's output never
        # exists as an aux state: it is the final norm's input (hidden + residual, fused there).
        self.num_layers = int(spec["num_layers"])
        self.model.model.norm.register_forward_pre_hook(self._pre_norm, with_kwargs=True)
        self._tree_cache = TreeCacheNamespace(page_size=get_schedule().page_size, device=self.mr.device,
                                              token_to_kv_pool_allocator=self.mr.token_to_kv_pool_allocator)
        self.vocab_size = int(spec["vocab_size"])

    def _pre_norm(self, _module, args, kwargs) -> None:
        if self._want_last:
            h = args[0] if args else kwargs["x"]
            r = args[1] if len(args) > 1 else kwargs.get("residual")
            self._seen["last_NH"] = h if r is None else h + r

    def _pre_logits(self, _module, args) -> None:
        # LlamaForCausalLM & co call logits_processor(input_ids, hidden_states, lm_head, forward_batch, aux).
        self._seen["final_NH"] = args[1]
        self._seen["aux"] = args[4] if len(args) > 4 else None

    # ------------------------------------------------------------------ batches
    def _reqs(self, seqs: list[list[int]], max_new_tokens: int = 1):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        reqs = []
        for i, s in enumerate(seqs):
            r = Req(rid=f"specrelay-{i}", origin_input_text="", origin_input_ids=array("q", s),
                    sampling_params=SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
            r.full_untruncated_fill_ids = r.origin_input_ids
            r.logprob_start_len = -1
            r.extend_end = len(s)
            reqs.append(r)
        return reqs

    def _extend(self, seqs: list[list[int]]):
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        batch = ScheduleBatch.init_new(
            reqs=self._reqs(seqs), req_to_token_pool=self.mr.req_to_token_pool,
            token_to_kv_pool_allocator=self.mr.token_to_kv_pool_allocator, tree_cache=self._tree_cache,
            model_config=self.mr.model_config, enable_overlap=False, spec_algorithm=SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        if batch.input_ids is None and getattr(batch, "prefill_input_ids_cpu", None) is not None:
            batch.input_ids = batch.prefill_input_ids_cpu.to(batch.device)
            batch.prefill_input_ids_cpu = None
        fb = ForwardBatch.init_new(batch, self.mr, return_hidden_states_before_norm=False)
        self._seen.clear()
        out = self.mr.forward(fb).logits_output
        return batch, fb, out

    def _clear_kv(self) -> None:
        self.mr.req_to_token_pool.clear()
        self.mr.token_to_kv_pool_allocator.clear()

    def full_logits(self, h_NH: torch.Tensor) -> torch.Tensor:
        """[N, V] logits with SGLang's lm_head weights (vocab-sharded under TP: gathered)."""
        logits = torch.nn.functional.linear(h_NH, self.model.lm_head.weight)
        if self.spec["tp"] > 1:
            from sglang.srt.distributed import tensor_model_parallel_all_gather

            logits = tensor_model_parallel_all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]

    @torch.inference_mode()
    def capture(self, seqs: list[list[int]], teacher: str, topk: int, layer_ids: tuple[int, ...] = ()) -> list[Capture]:
        ids = list(layer_ids or self.spec["aux_layer_ids"])
        last = self.num_layers - 1
        self._want_last = last in ids
        mid = sorted(i for i in ids if i != last)
        if mid != self._capturing:
            # SGLang keeps one capture list on the model (read at every forward); it hands the
            # states back in layer order, reordered to the request's order below.
            self._capturing = mid
            self.model.set_eagle3_layers_to_capture(list(self._capturing))
        try:
            _, fb, _ = self._extend(seqs)
            if "final_NH" not in self._seen or (self._capturing and not self._seen.get("aux")) or \
                    (self._want_last and "last_NH" not in self._seen):
                raise RuntimeError(
                    f"SGLang model {type(self.model).__name__} did not hand its final hidden state and aux states "
                    "to logits_processor; this architecture is not supported by the sglang backend")
            final_NH = self._seen["final_NH"]
            aux = self._seen.get("aux")
            parts = ([aux] if isinstance(aux, torch.Tensor) else list(aux)) if self._capturing else []
            order = list(self._capturing)
            if self._want_last:
                parts.append(self._seen["last_NH"])
                order.append(last)
            aux_N3H = torch.cat(parts, dim=-1)
            lengths = [len(s) for s in seqs]
            got = [int(x) for x in fb.extend_seq_lens_cpu] if fb.extend_seq_lens_cpu is not None else None
            # Guards against the prefix-cache / chunked-prefill truncation traps (notes/sglang.md).
            if got != lengths or final_NH.shape[0] != sum(lengths) or aux_N3H.shape[0] != sum(lengths):
                raise RuntimeError(f"SGLang returned {final_NH.shape[0]} rows (per sequence {got}) for sequences of "
                                   f"lengths {lengths}: a capture was truncated or split")
            H = final_NH.shape[-1]
            if aux_N3H.shape[-1] != len(ids) * H:
                raise RuntimeError(f"SGLang captured aux width {aux_N3H.shape[-1]}, expected {len(ids)} x {H}")
            if ids != order:
                blocks = aux_N3H.split(H, dim=-1)
                aux_N3H = torch.cat([blocks[order.index(i)] for i in ids], dim=-1)
            topk_all = None
            if teacher == TEACHER_TOPK:
                topk_all = topk_logprobs(final_NH, self.full_logits, topk)
            out, start = [], 0
            for T in lengths:
                cap = Capture(aux_T3H=aux_N3H[start : start + T].to("cpu"))
                if teacher == TEACHER_HIDDEN:
                    cap.teacher_TH = final_NH[start : start + T].to("cpu")
                elif teacher == TEACHER_TOPK:
                    cap.topk_ids_TK = topk_all[0][start : start + T]
                    cap.topk_logprobs_TK = topk_all[1][start : start + T]
                out.append(cap)
                start += T
            return out
        finally:
            self._seen.clear()
            self._clear_kv()

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> list[Completion]:
        """Prefill + decode steps through the same ModelRunner, one prompt at a time."""
        stops = set(stop_token_ids)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for prompt in prompts:
            new: list[int] = []
            reason = "length"
            try:
                batch, fb, lo = self._extend([prompt])
                for step in range(max_new_tokens):
                    tok = sample_next(lo.next_token_logits[0, : self.vocab_size], temperature, top_p, gen)
                    new.append(tok)
                    if tok in stops:
                        reason = "stop"
                        break
                    if step + 1 == max_new_tokens:
                        break
                    lo = self._decode(batch, tok)
            finally:
                self._seen.clear()
                self._clear_kv()
            out.append(Completion(token_ids=new, finish_reason=reason))
        return out

    def _decode(self, batch, tok: int):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch

        batch.output_ids = torch.tensor([tok], dtype=torch.int64, device=batch.device)
        batch.input_ids = batch.output_ids
        batch.prepare_for_decode()
        fb = ForwardBatch.init_new(batch, self.mr, return_hidden_states_before_norm=False)
        return self.mr.forward(fb).logits_output

    def run(self, prog: _Program):
        if prog.op == "capture":
            return self.capture(prog.seqs, prog.teacher, prog.topk, prog.layer_ids)
        if prog.op == "generate":
            return self.generate(**prog.gen)
        raise ValueError(prog.op)


def _server_args(spec: dict):
    from sglang.srt.server_args import ServerArgs

    on_cpu = spec["device"] == "cpu"
    kwargs = dict(
        model_path=spec["model"], tokenizer_path=spec["model"], skip_tokenizer_init=True, dtype=spec["dtype"],
        device=spec["device"], tp_size=spec["tp"], random_seed=0,
        # A capture is one extend of whole sequences: no prefix sharing, no chunking, no graphs
        # (the capture hook must run eagerly).
        disable_radix_cache=True, chunked_prefill_size=-1, disable_cuda_graph=True,
        # The KV pool only ever holds one forward batch (cleared after it).
        max_total_tokens=spec["kv_tokens"], max_running_requests=MAX_SEQS_PER_FORWARD,
        context_length=spec["context_length"], log_level=spec.get("log_level", "warning"),
    )
    if on_cpu:
        # CPUs without AMX have no SGLang CPU attention kernels; torch_native runs anywhere.
        kwargs.update(attention_backend="torch_native", mem_fraction_static=0.05)
    if spec.get("mem_fraction_static"):
        kwargs["mem_fraction_static"] = spec["mem_fraction_static"]
    sa = ServerArgs(**kwargs)
    sa.resolve_once()
    return sa
