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
- no radix/prefix cache exists on this path (nothing is shared between batches) and no chunked
  prefill (the whole batch is one extend): each capture is checked to have exactly as many rows
  as its sequence has tokens. A capture takes request rows and KV slots for its own sequences
  and gives exactly those back after the pass (batches.py), so it can run between the decode
  steps of generations in flight;
- generation is continuous batching through SGLang's own structures (`SGLangDecoder` below:
  sequences join with an extend batch merged into the running `ScheduleBatch`, leave with
  `filter_batch`, and free their own KV slots), driven step by step by our scheduler;
- `--batch-invariant`: one sample per feature pass (SGLang's deterministic-inference mode needs a
  CUDA/XPU/NPU device and a flashinfer/fa3/fa4/triton attention backend; it refuses CPU);
- tensor parallelism: rank 0 lives in the server process; ranks 1..tp-1 are worker processes
  that receive every batch over SGLang's CPU (gloo) group and run the same forward (SPMD).

SGLang is imported lazily (only when this backend is chosen); its version is checked first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import torch

from common.contract import ModelInfo, parse_aux_layers, parse_tensor_name
from common.errors import AssetError, ConfigError
from target_server.backends.base import Backend, Capture, Completion, Decoder
from target_server.backends.hf_helpers import (MAX_TOPK, check_model_dir, eos_ids, hf_model_info, render_chat,
                                               resolve_dtype)
from target_server.backends.sglang.preflight import (check_architecture, check_capturable, check_sglang_version,
                                                     check_tp)
from target_server.backends.sglang.runner import MAX_SEQS_PER_FORWARD, _Program, _Runner
from target_server.backends.sglang.workers import TPWorkers, _free_port, _rendezvous_file

log = logging.getLogger(__name__)

_SGLANG_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class SGLangBackend(Backend):
    name = "sglang"

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "fp32", tp: int = 1,
                 aux_layers: str | list[int] = "auto", max_length: int | None = None, max_batch_tokens: int = 8192,
                 max_topk: int = MAX_TOPK, mem_fraction_static: float = 0.0, batch_invariant: bool = False) -> None:
        from transformers import AutoConfig, AutoTokenizer

        path = check_model_dir(model_path)
        dtype_ = resolve_dtype(dtype, device)
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
        check_tp(tp, heads, kv_heads)
        model_max = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
        self.max_length = int(max_length or model_max or 4096)
        if model_max and self.max_length > model_max:
            raise ConfigError(f"--max-length {self.max_length} exceeds the model's max_position_embeddings ({model_max}); "
                              "SGLang refuses it")
        self.max_topk = max_topk
        self.batch_invariant = batch_invariant
        self.dtype = dtype_
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        check_architecture(self.hf_config, path)

        self.tp = tp
        self.spec = {
            "model": str(path), "device": device, "dtype": _SGLANG_DTYPES[self.dtype], "tp": tp,
            "aux_layer_ids": list(self.aux_layer_ids), "vocab_size": self.vocab_size, "num_layers": self.num_layers,
            # One feature pass (a full batch or the longest sequence) beside the running generations
            # (the scheduler keeps their reservations within the same bound), plus slack.
            "kv_tokens": 2 * max(max_batch_tokens, self.max_length) + 64,
            "context_length": self.max_length if self.max_length != model_max else None,
            "dist_port": _free_port(), "mem_fraction_static": mem_fraction_static,
            "dist_init_method": f"file://{_rendezvous_file()}",
        }
        self._lock = threading.Lock()
        self._decoder: SGLangDecoder | None = None
        self._workers = TPWorkers(self.spec, tp)
        self._workers.start()
        self._runner = _Runner(self.spec, 0)
        failure = self._workers.wait_ready()
        if failure is not None:
            self.close()
            raise RuntimeError(f"SGLang tensor-parallel worker failed to start: {failure}")
        # SGLang caps the pool at what its memory profile allows (on CPU: a share of free RAM).
        self.kv_pool_tokens = int(self._runner.mr.token_to_kv_pool_allocator.size)
        self._feature_room = max(max_batch_tokens, self.max_length)
        if self.kv_pool_tokens < self.spec["kv_tokens"]:
            log.warning("SGLang's KV pool holds %d tokens (its memory profile), fewer than the %d wanted for a feature "
                        "pass of max(--max-batch-tokens, --max-length) = %d beside running generations: generations "
                        "get at most %d; give SGLang more memory or lower --max-batch-tokens / --max-length",
                        self.kv_pool_tokens, self.spec["kv_tokens"], self._feature_room, self.generation_kv_budget())
        log.info("sglang backend %s: %s, %d layers, H=%d, aux=%s, %s on %s, tp=%d", self.sglang_version, path.name,
                 self.num_layers, self.hidden_size, self.aux_layer_ids, self.dtype, device, tp)

    @classmethod
    def from_config(cls, cfg) -> "SGLangBackend":
        return cls(cfg.model, device=cfg.device, dtype=cfg.dtype, tp=cfg.tp, aux_layers=cfg.aux_layers,
                   max_length=cfg.max_length or None, max_batch_tokens=cfg.max_batch_tokens, max_topk=cfg.max_topk,
                   batch_invariant=cfg.batch_invariant)

    def _run(self, prog: _Program):
        with self._lock:  # one SPMD program at a time, the same order on every rank
            self._workers.send(prog)
            return self._runner.run(prog)

    # ------------------------------------------------------------------ Backend
    def model_info(self) -> ModelInfo:
        cfg = self.hf_config
        cfg.dtype = self.dtype  # what transformers records when it loads at this dtype (as the hf backend does)
        return hf_model_info(cfg, self.tokenizer, backend=self.name, model_name=self.path.name,
                             num_layers=self.num_layers, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                             aux_layer_ids=self.aux_layer_ids, dtype=self.dtype, max_length=self.max_length,
                             max_topk=min(self.max_topk, self.vocab_size), default_arch="unknown",
                             max_capture_layer=self.num_layers - 1)

    def forward(self, seqs: list[list[int]], teacher: str, topk: int = 0,
                layer_ids: tuple[int, ...] | None = None) -> list[Capture]:
        out: list[Capture] = []
        # A batch of more sequences than SGLang's request table holds runs as several passes;
        # batch-invariant: one sample per pass (a CPU GEMM's rows depend on how many it computes).
        per_pass = 1 if self.batch_invariant else MAX_SEQS_PER_FORWARD
        for s in range(0, len(seqs), per_pass):
            out += self._run(_Program("capture", seqs=seqs[s : s + per_pass], teacher=teacher, topk=topk,
                                      layer_ids=tuple(layer_ids or ())))
        return out

    def frozen_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        return read_frozen_tensors(self.path, names, self.dtype, tied=bool(getattr(self.hf_config, "tie_word_embeddings", False)),
                                   num_layers=self.num_layers)

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> list[Completion]:
        kv = self.spec["kv_tokens"]
        for p in prompts:
            if len(p) + max_new_tokens > kv:
                raise ConfigError(f"generate: {len(p)} prompt tokens + {max_new_tokens} new exceed the KV pool ({kv})")
        stops = list(stop_token_ids) or eos_ids(self.hf_config)
        return self._run(_Program("generate", gen=dict(prompts=prompts, max_new_tokens=max_new_tokens,
                                                       temperature=temperature, top_p=top_p, seed=seed,
                                                       stop_token_ids=stops)))

    def decoder(self) -> "SGLangDecoder":
        # One running batch per backend (every rank keeps it): the scheduler's DecodeLoop owns it.
        if self._decoder is None:
            self._decoder = SGLangDecoder(self._run)
        return self._decoder

    def generation_kv_budget(self) -> int:
        # What a feature pass may need stays free; if the pool is smaller than both, half each.
        return max(self.kv_pool_tokens - self._feature_room, self.kv_pool_tokens // 2)

    def free_kv(self) -> tuple[int, int]:
        """(free KV token slots, free request rows) on rank 0 (every rank runs the same programs)."""
        with self._lock:
            return self._runner.passes.free_slots()

    def eos_token_ids(self) -> list[int]:
        return eos_ids(self.hf_config)

    def chat_prompt(self, messages: list[dict], template_kwargs: dict) -> list[int]:
        return render_chat(self.tokenizer, messages, template_kwargs)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def close(self) -> None:
        store = self.spec["dist_init_method"].removeprefix("file://")
        if os.path.exists(store):
            try:
                os.remove(store)
            except OSError:
                pass
        with self._lock:
            self._workers.stop()


class SGLangDecoder(Decoder):
    """The scheduler's running generations, as programs every TP rank runs on its `RunningBatch`
    (batches.py): the same joins, steps and departures in the same order on every rank."""

    def __init__(self, run) -> None:
        self._run = run

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        return self._run(_Program("gen_join", seqs=prompts))

    def step(self, tokens: list[int]) -> torch.Tensor:
        return self._run(_Program("gen_step", ints=list(tokens)))

    def keep(self, rows: list[int]) -> None:
        self._run(_Program("gen_keep", ints=list(rows)))


# Checkpoint names of the frozen tensors the trainer fetches (Llama/Qwen-family layouts).
_CHECKPOINT_KEYS = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
                    "final_norm": "model.norm.weight"}


def read_frozen_tensors(path: Path, names: list[str], dtype: torch.dtype, *, tied: bool,
                        num_layers: int) -> dict[str, torch.Tensor]:
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
        layer = parse_tensor_name(n, num_layers)
        key = f"model.layers.{layer[0]}.{layer[1]}.weight" if layer else _CHECKPOINT_KEYS[n]
        if n == "lm_head" and (tied or key not in weight_map):
            key = _CHECKPOINT_KEYS["embed_tokens"]
        if key not in weight_map:
            raise AssetError(f"{path}: checkpoint has no {key!r} (needed for {n})")
        with safe_open(path / weight_map[key], "pt") as f:
            out[n] = f.get_tensor(key).to(dtype).contiguous()
    return out
