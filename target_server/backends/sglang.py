"""SGLang backend: SGLang's own model code, weight loading, tensor parallelism and kernels, in-process.

Legend (shapes): N tokens of a packed batch (SGLang packs sequences, no padding), T tokens of
one sequence, H hidden size, V vocab, K top-k.

We drive SGLang's `ModelRunner` directly (no scheduler, no tokenizer manager, no HTTP):
- one `ModelRunner.forward` (an EXTEND batch holding every sequence in full) per scheduler batch;
- the model is told to capture the three aux layers (`set_eagle3_layers_to_capture`), and a
  forward pre-hook on its `logits_processor` reads, in that same pass, the post-final-norm hidden
  states and the aux states it is handed. Both arrive as packed [N, H] tensors; nothing becomes
  a Python list. (SGLang's own aux mode returns aux *instead of* the final state; the hook
  gets both.)
- no radix/prefix cache exists on this path (nothing is shared between batches; the KV pool is
  cleared after every batch) and no chunked prefill (the whole batch is one extend): each
  capture is checked to have exactly as many rows as its sequence has tokens.
- tensor parallelism: rank 0 lives in the server process; ranks 1..tp-1 are worker processes
  that receive every batch over SGLang's CPU (gloo) group and run the same forward (SPMD).

SGLang is imported lazily (only when this backend is chosen); its version is checked first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK, ModelInfo, parse_aux_layers
from common.errors import AssetError, ConfigError
from target_server.backends.base import Backend, Capture, Completion, topk_logprobs
from target_server.backends.hf import DTYPES, MAX_TOPK, hf_model_info, sample_next

log = logging.getLogger(__name__)

# Versions whose ModelRunner / ScheduleBatch / ForwardBatch internals this module was written
# against and tested with (the CPU lane pins the lower bound). Internals move between minors.
SUPPORTED_SGLANG = ("0.5.23", "0.6.0")  # [min, max)
_SGLANG_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Sequences per forward pass: sizes SGLang's request-to-token table (rows x context length).
MAX_SEQS_PER_FORWARD = 256


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_sglang_version() -> str:
    """The installed SGLang version, or a ConfigError saying what to install."""
    from importlib.metadata import PackageNotFoundError, version

    lo, hi = SUPPORTED_SGLANG
    try:
        v = version("sglang")
    except PackageNotFoundError:
        raise ConfigError(
            f"--backend sglang: SGLang is not installed. Install sglang>={lo},<{hi} (GPU: the pinned "
            "image in deploy/docker; CPU: tests/sglang_lane/setup.sh), or use --backend hf"
        ) from None
    if not _version_tuple(lo) <= _version_tuple(v) < _version_tuple(hi):
        raise ConfigError(
            f"--backend sglang: installed SGLang {v} is outside the supported range [{lo}, {hi}); "
            f"install sglang=={lo} (this backend drives SGLang's ModelRunner internals, which change "
            "between releases)"
        )
    return v


def check_capturable(model_path: Path, aux_layer_ids: list[int], num_layers: int) -> None:
    """Reject aux ids SGLang cannot capture, before any engine starts.

    SGLang captures aux id i as the *input* of decoder layer i + 1 (the residual stream after
    layer i), so the last layer's output (i = L - 1) never exists as an aux state: asking for it
    crashes the engine on its first forward.
    """
    bad = [i for i in aux_layer_ids if not 0 <= i + 1 < num_layers]
    if bad:
        raise ConfigError(
            f"--aux-layers: SGLang cannot capture layer(s) {bad} of this {num_layers}-layer model "
            f"({model_path.name}); it captures layer i as the input of layer i+1, so use ids in "
            f"0..{num_layers - 2}"
        )


@dataclass
class _Program:
    """One unit of SPMD work every TP rank runs identically."""

    op: str  # "capture" | "generate" | "stop"
    seqs: list[list[int]] | None = None
    teacher: str = TEACHER_HIDDEN
    topk: int = 0
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
        self.model.set_eagle3_layers_to_capture(list(spec["aux_layer_ids"]))
        self._seen: dict = {}
        self.model.logits_processor.register_forward_pre_hook(self._pre_logits)
        self._tree_cache = TreeCacheNamespace(page_size=get_schedule().page_size, device=self.mr.device,
                                              token_to_kv_pool_allocator=self.mr.token_to_kv_pool_allocator)
        self.vocab_size = int(spec["vocab_size"])

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
    def capture(self, seqs: list[list[int]], teacher: str, topk: int) -> list[Capture]:
        try:
            _, fb, _ = self._extend(seqs)
            if "final_NH" not in self._seen or not self._seen.get("aux"):
                raise RuntimeError(
                    f"SGLang model {type(self.model).__name__} did not hand its final hidden state and aux states "
                    "to logits_processor; this architecture is not supported by the sglang backend")
            final_NH = self._seen["final_NH"]
            aux = self._seen["aux"]
            aux_N3H = aux if isinstance(aux, torch.Tensor) else torch.cat(list(aux), dim=-1)
            lengths = [len(s) for s in seqs]
            got = [int(x) for x in fb.extend_seq_lens_cpu] if fb.extend_seq_lens_cpu is not None else None
            # Guards against the prefix-cache / chunked-prefill truncation traps (notes/sglang.md).
            if got != lengths or final_NH.shape[0] != sum(lengths) or aux_N3H.shape[0] != sum(lengths):
                raise RuntimeError(f"SGLang returned {final_NH.shape[0]} rows (per sequence {got}) for sequences of "
                                   f"lengths {lengths}: a capture was truncated or split")
            H = final_NH.shape[-1]
            if aux_N3H.shape[-1] != 3 * H:
                raise RuntimeError(f"SGLang captured aux width {aux_N3H.shape[-1]}, expected 3 x {H}")
            topk_all = None
            if teacher == TEACHER_TOPK:
                topk_all = topk_logprobs(final_NH, self.full_logits, topk)
            out, start = [], 0
            for T in lengths:
                cap = Capture(aux_T3H=aux_N3H[start : start + T].to("cpu"))
                if teacher == TEACHER_HIDDEN:
                    cap.teacher_TH = final_NH[start : start + T].to("cpu")
                else:
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
            return self.capture(prog.seqs, prog.teacher, prog.topk)
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


def _worker_main(spec: dict, tp_rank: int, ready) -> None:
    """TP rank > 0: build the same runner, then run every program rank 0 broadcasts."""
    runner = None
    try:
        runner = _Runner(spec, tp_rank)
        ready.put(("ok", tp_rank))
    except BaseException as e:  # tell rank 0 instead of hanging it
        ready.put(("error", f"tp rank {tp_rank}: {type(e).__name__}: {e}"))
        raise
    while True:
        prog = _broadcast(None)
        if prog.op == "stop":
            return
        try:
            runner.run(prog)
        except Exception:
            log.exception("tp rank %d: program %s failed", tp_rank, prog.op)


def _broadcast(prog: _Program | None) -> _Program:
    import torch.distributed as dist
    from sglang.srt.distributed import get_tp_group

    box = [prog]
    dist.broadcast_object_list(box, src=get_tp_group().ranks[0], group=get_tp_group().cpu_group)
    return box[0]


class SGLangBackend(Backend):
    name = "sglang"

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "fp32", tp: int = 1,
                 aux_layers: str | list[int] = "auto", max_length: int | None = None, max_batch_tokens: int = 8192,
                 max_topk: int = MAX_TOPK, mem_fraction_static: float = 0.0) -> None:
        from transformers import AutoConfig, AutoTokenizer

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise AssetError(f"--model {path}: no config.json there; point at a local HF model directory")
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype {dtype!r}: use one of bf16, fp16, fp32")
        if tp < 1:
            raise ConfigError(f"--tp {tp}: must be >= 1")
        # Everything that can be wrong is checked here, before SGLang is imported or started.
        self.sglang_version = check_sglang_version()
        if device == "cpu":  # must precede the first sglang import (else it loads GPU-only ops)
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        self.hf_config = AutoConfig.from_pretrained(path)
        text_cfg = getattr(self.hf_config, "text_config", None) or self.hf_config
        self.path = path
        self.num_layers = int(text_cfg.num_hidden_layers)
        self.hidden_size = int(text_cfg.hidden_size)
        self.vocab_size = int(text_cfg.vocab_size)
        self.aux_layer_ids = parse_aux_layers(aux_layers, self.num_layers)
        check_capturable(path, self.aux_layer_ids, self.num_layers)
        heads = int(text_cfg.num_attention_heads)
        kv_heads = int(getattr(text_cfg, "num_key_value_heads", heads) or heads)
        if heads % tp or (kv_heads % tp and tp % kv_heads):
            raise ConfigError(f"--tp {tp}: must divide the attention heads ({heads}) and the KV heads ({kv_heads}) "
                              "or be a multiple of the KV heads")
        model_max = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self.max_length = int(max_length or model_max or 4096)
        if model_max and self.max_length > model_max:
            raise ConfigError(f"--max-length {self.max_length} exceeds the model's max_position_embeddings ({model_max}); "
                              "SGLang refuses it")
        self.max_topk = max_topk
        self.dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._check_architecture()

        self.tp = tp
        self.spec = {
            "model": str(path), "device": device, "dtype": _SGLANG_DTYPES[self.dtype], "tp": tp,
            "aux_layer_ids": list(self.aux_layer_ids), "vocab_size": self.vocab_size,
            # The longest single sequence, or a full batch, plus one page of slack.
            "kv_tokens": max(max_batch_tokens, self.max_length) + 64,
            "context_length": self.max_length if self.max_length != model_max else None,
            "dist_port": _free_port(), "mem_fraction_static": mem_fraction_static,
            "dist_init_method": f"file://{_rendezvous_file()}",
        }
        self._lock = threading.Lock()
        self._workers = []
        self._start_workers()
        self._runner = _Runner(self.spec, 0)
        self._wait_workers()
        log.info("sglang backend %s: %s, %d layers, H=%d, aux=%s, %s on %s, tp=%d", self.sglang_version, path.name,
                 self.num_layers, self.hidden_size, self.aux_layer_ids, self.dtype, device, tp)

    @classmethod
    def from_config(cls, cfg) -> "SGLangBackend":
        return cls(cfg.model, device=cfg.device, dtype=cfg.dtype, tp=cfg.tp, aux_layers=cfg.aux_layers,
                   max_length=cfg.max_length or None, max_batch_tokens=cfg.max_batch_tokens)

    def _check_architecture(self) -> None:
        archs = list(getattr(self.hf_config, "architectures", None) or [])
        from sglang.srt.models.registry import ModelRegistry

        try:
            cls, arch = ModelRegistry.resolve_model_cls(archs)
        except ValueError as e:
            raise ConfigError(f"--backend sglang: SGLang cannot run {self.path.name} ({archs}): {e}") from None
        if not hasattr(cls, "set_eagle3_layers_to_capture"):
            raise ConfigError(f"--backend sglang: SGLang's {cls.__name__} for {arch} cannot capture EAGLE-3 aux "
                              "hidden states; use --backend hf for this model")

    # ------------------------------------------------------------------ TP workers
    def _start_workers(self) -> None:
        if self.tp == 1:
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        for rank in range(1, self.tp):
            p = ctx.Process(target=_worker_main, args=(self.spec, rank, self._ready), daemon=True,
                            name=f"sglang-tp{rank}")
            p.start()
            self._workers.append(p)

    def _wait_workers(self, timeout: float = 600.0) -> None:
        for _ in self._workers:
            status, msg = self._ready.get(timeout=timeout)
            if status != "ok":
                self.close()
                raise RuntimeError(f"SGLang tensor-parallel worker failed to start: {msg}")

    def _run(self, prog: _Program):
        with self._lock:  # one SPMD program at a time, the same order on every rank
            if self.tp > 1:
                _broadcast(prog)
            return self._runner.run(prog)

    # ------------------------------------------------------------------ Backend
    def model_info(self) -> ModelInfo:
        cfg = self.hf_config
        cfg.dtype = self.dtype  # what transformers records when it loads at this dtype (as the hf backend does)
        return hf_model_info(cfg, self.tokenizer, backend=self.name, model_name=self.path.name,
                             num_layers=self.num_layers, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                             aux_layer_ids=self.aux_layer_ids, dtype=self.dtype, max_length=self.max_length,
                             max_topk=self.max_topk, default_arch="unknown")

    def forward(self, seqs: list[list[int]], teacher: str, topk: int = 0) -> list[Capture]:
        out: list[Capture] = []
        # A batch of more sequences than SGLang's request table holds runs as several passes.
        for s in range(0, len(seqs), MAX_SEQS_PER_FORWARD):
            out += self._run(_Program("capture", seqs=seqs[s : s + MAX_SEQS_PER_FORWARD], teacher=teacher, topk=topk))
        return out

    def frozen_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return read_frozen_tensors(self.path, names, self.dtype, tied=bool(getattr(self.hf_config, "tie_word_embeddings", False)))

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> list[Completion]:
        kv = self.spec["kv_tokens"]
        for p in prompts:
            if len(p) + max_new_tokens > kv:
                raise ConfigError(f"generate: {len(p)} prompt tokens + {max_new_tokens} new exceed the KV pool ({kv})")
        stops = list(stop_token_ids) or _eos_ids(self.hf_config)
        return self._run(_Program("generate", gen=dict(prompts=prompts, max_new_tokens=max_new_tokens,
                                                       temperature=temperature, top_p=top_p, seed=seed,
                                                       stop_token_ids=stops)))

    def close(self) -> None:
        store = self.spec["dist_init_method"].removeprefix("file://")
        if os.path.exists(store):
            try:
                os.remove(store)
            except OSError:
                pass
        if self.tp > 1 and self._workers:
            try:
                with self._lock:
                    _broadcast(_Program("stop"))
            except Exception:
                pass
            for p in self._workers:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
            self._workers = []


# Checkpoint names of the frozen tensors the trainer fetches (Llama/Qwen-family layouts).
_CHECKPOINT_KEYS = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
                    "final_norm": "model.norm.weight"}


def read_frozen_tensors(path: Path, names: list[str], dtype: torch.dtype, *, tied: bool) -> dict[str, torch.Tensor]:
    """The frozen tensors straight from the checkpoint (the same bytes SGLang loaded, at any TP)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        single = path / "model.safetensors"
        if not single.is_file():
            raise AssetError(f"{path}: no model.safetensors(.index.json); the sglang backend reads frozen tensors "
                             "from safetensors checkpoints")
        with safe_open(single, "pt") as f:
            weight_map = {k: single.name for k in f.keys()}
    out = {}
    for n in names:
        key = _CHECKPOINT_KEYS[n]
        if n == "lm_head" and (tied or key not in weight_map):
            key = _CHECKPOINT_KEYS["embed_tokens"]
        if key not in weight_map:
            raise AssetError(f"{path}: checkpoint has no {key!r} (needed for {n})")
        with safe_open(path / weight_map[key], "pt") as f:
            out[n] = f.get_tensor(key).to(dtype).contiguous()
    return out


def _eos_ids(hf_config) -> list[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _rendezvous_file() -> str:
    import tempfile
    import uuid

    return os.path.join(tempfile.gettempdir(), f"specrelay-sglang-{os.getpid()}-{uuid.uuid4().hex[:8]}.store")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
