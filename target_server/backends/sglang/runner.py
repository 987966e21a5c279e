"""SGLang's ModelRunner for one TP rank, driven directly (no scheduler, tokenizer manager or HTTP).

Legend (shapes): N tokens of a packed batch (SGLang packs sequences, no padding), T tokens of
one sequence, H hidden size, V vocab, K top-k.

Runs in every rank's process: rank 0 in the server, ranks 1..tp-1 in workers (workers.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK
from target_server.backends.base import Capture, Completion, topk_logprobs
from target_server.backends.hf_helpers import sample_next
from target_server.backends.sglang.batches import Passes, RunningBatch
from target_server.generation import MAX_RUNNING_SEQS

# Sequences per feature pass. SGLang's request-to-token table (rows x context length) holds one
# feature pass and the running generations (generation.MAX_RUNNING_SEQS) at once.
MAX_SEQS_PER_FORWARD = 256


@dataclass
class _Program:
    """One unit of SPMD work every TP rank runs identically."""

    op: str  # "capture" | "generate" | "gen_join" | "gen_step" | "gen_keep" | "stop"
    seqs: list[list[int]] | None = None
    ints: list[int] | None = None  # gen_step: one token per row; gen_keep: the rows kept
    teacher: str = TEACHER_HIDDEN
    topk: int = 0
    layer_ids: tuple[int, ...] = ()   # the feature spec's layers (empty: the backend's aux layers)
    gen: dict | None = None


class _Runner:
    """SGLang's ModelRunner for one TP rank, plus the capture hook. Runs in every rank's process."""

    def __init__(self, spec: dict, tp_rank: int) -> None:
        if spec["device"] == "cpu":
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        from sglang.benchmark.one_batch import _init_process_global_configs
        from sglang.srt.arg_groups.overrides import resolving_view
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import bootstrap
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.runtime_context import SpawnRanks, get_device, publish, spawn_world_rank

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
        self._features = False  # the hooks keep states only during feature passes, not decode steps
        self.model.logits_processor.register_forward_pre_hook(self._pre_logits)
        # SGLang captures layer i as the input of layer i + 1, so the last layer's output never
        # exists as an aux state: it is the final norm's input (hidden + residual, fused there).
        self.num_layers = int(spec["num_layers"])
        self.model.model.norm.register_forward_pre_hook(self._pre_norm, with_kwargs=True)
        self.vocab_size = int(spec["vocab_size"])
        self.passes = Passes(self.mr, self.vocab_size)
        self.running = RunningBatch(self.passes)  # the scheduler's generations (the backend's decoder)

    def _pre_norm(self, _module, args, kwargs) -> None:
        if self._features and self._want_last:
            h = args[0] if args else kwargs["x"]
            r = args[1] if len(args) > 1 else kwargs.get("residual")
            self._seen["last_NH"] = h if r is None else h + r

    def _pre_logits(self, _module, args) -> None:
        # LlamaForCausalLM & co call logits_processor(input_ids, hidden_states, lm_head, forward_batch, aux).
        if not self._features:
            return
        self._seen["final_NH"] = args[1]
        self._seen["aux"] = args[4] if len(args) > 4 else None

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
        self._seen.clear()
        self._features = True
        batch = None
        try:
            batch, fb, _ = self.passes.extend(seqs)
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
            self._features = False
            self._seen.clear()
            if batch is not None:  # this pass's own rows and slots; running generations keep theirs
                self.passes.release(batch.reqs)

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> list[Completion]:
        """Prefill + decode steps, one prompt at a time, each in its own batch beside the running ones."""
        stops = set(stop_token_ids)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for prompt in prompts:
            new: list[int] = []
            reason = "length"
            one = RunningBatch(self.passes)
            try:
                logits_V = one.join([prompt])[0]
                for step in range(max_new_tokens):
                    tok = sample_next(logits_V, temperature, top_p, gen)
                    new.append(tok)
                    if tok in stops:
                        reason = "stop"
                        break
                    if step + 1 == max_new_tokens:
                        break
                    logits_V = one.step([tok])[0]
            finally:
                one.keep([])
            out.append(Completion(token_ids=new, finish_reason=reason))
        return out

    def run(self, prog: _Program):
        if prog.op == "capture":
            return self.capture(prog.seqs, prog.teacher, prog.topk, prog.layer_ids)
        if prog.op == "generate":
            return self.generate(**prog.gen)
        with torch.inference_mode():
            if prog.op == "gen_join":
                return self.running.join(prog.seqs)
            if prog.op == "gen_step":
                return self.running.step(prog.ints)
            if prog.op == "gen_keep":
                return self.running.keep(prog.ints)
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
        # The KV pool holds one feature pass beside the running generations (backend.py sizes it).
        max_total_tokens=spec["kv_tokens"], max_running_requests=MAX_SEQS_PER_FORWARD + MAX_RUNNING_SEQS,
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
