"""Synthetic backend: deterministic pseudo-features at a configurable cost per token.

For tests and scale simulations of many servers without model compute. Every value is a pure
function of (token id, previous token id, position in the sequence, layer): any server answers
any request identically, as real servers do. Producing a value costs two memory passes (a
hashed row of a fixed per-layer basis, times a hashed scale), so benchmarks of the data plane
measure the transport, not the stand-in. `cost_per_token_us` sleeps (releasing the GIL) to
simulate a GPU's prefill time.

Legend (shapes): T tokens, H hidden size, V vocab, K top-k.
"""

from __future__ import annotations

import json
import time

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK, ModelInfo, parse_aux_layers
from common.features import FEATURE_SCHEMA_VERSION, wire_dtype_name
from target_server.backends.base import Backend, Capture, Completion

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


_BASIS_ROWS = 256


def _mix(ids_T: torch.Tensor, layer: int, seed: int) -> torch.Tensor:
    """[T] int64 hash of (token, previous token, position, layer, seed); wraps deterministically."""
    T = ids_T.shape[0]
    prev = torch.cat([ids_T.new_full((1,), -1), ids_T[:-1]])
    pos = torch.arange(T, dtype=torch.int64)
    h = ids_T * 1000003 + prev * 999983 + pos * 7919 + (layer * 104729 + seed * 15485863)
    h = h ^ (h >> 13)
    h = h * 0x5BD1E995
    return h ^ (h >> 15)


class SyntheticBackend(Backend):
    name = "synthetic"

    def __init__(self, *, hidden_size: int = 64, num_layers: int = 8, vocab_size: int = 512, dtype: str = "fp32",
                 aux_layers: str = "auto", max_length: int = 4096, cost_per_token_us: float = 0.0,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, seed: int = 0, max_topk: int = 64) -> None:
        self.hidden_size, self.num_layers, self.vocab_size = hidden_size, num_layers, vocab_size
        self.dtype = _DTYPES[dtype]
        self.aux_layer_ids = parse_aux_layers(aux_layers, num_layers)
        self.max_length = max_length
        self.cost_per_token_us = cost_per_token_us
        self.heads, self.kv_heads = num_attention_heads, num_key_value_heads
        self.seed = seed
        self.max_topk = max_topk
        self._basis: dict[int, torch.Tensor] = {}
        g = torch.Generator().manual_seed(seed)
        self.embed_VH = (torch.randn(vocab_size, hidden_size, generator=g) * 0.5).to(self.dtype)
        self.lm_head_VH = (torch.randn(vocab_size, hidden_size, generator=g) * 0.5).to(self.dtype)
        self.norm_H = torch.ones(hidden_size, dtype=self.dtype)

    @classmethod
    def from_config(cls, cfg) -> "SyntheticBackend":
        return cls(hidden_size=cfg.synthetic_hidden_size, num_layers=cfg.synthetic_num_layers,
                   vocab_size=cfg.synthetic_vocab_size, dtype=cfg.dtype, aux_layers=cfg.aux_layers,
                   max_length=cfg.max_length or 4096, cost_per_token_us=cfg.synthetic_cost_per_token_us,
                   max_topk=cfg.max_topk)

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.hidden_size // self.heads,
            "intermediate_size": 2 * self.hidden_size, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_length, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_act": "silu",
        }

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            architecture="LlamaForCausalLM", model_type="llama", num_layers=self.num_layers,
            hidden_size=self.hidden_size, vocab_size=self.vocab_size, aux_layer_ids=list(self.aux_layer_ids),
            dtype=wire_dtype_name(self.dtype), max_length=self.max_length,
            tokenizer_fingerprint=f"synthetic-v{self.vocab_size}", chat_template="",
            teacher_modes=[TEACHER_HIDDEN, TEACHER_TOPK], max_topk=min(self.max_topk, self.vocab_size), hf_config_json=json.dumps(self.hf_config()),
            backend=self.name, model_name=f"synthetic-h{self.hidden_size}-l{self.num_layers}",
            feature_schema_version=FEATURE_SCHEMA_VERSION,
        )

    def _layer_basis(self, layer: int) -> torch.Tensor:
        """[P, H] fixed rows in [-1, 1) for one layer (seeded by layer and seed: same on every server)."""
        if layer not in self._basis:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
            self._basis[layer] = (torch.rand(_BASIS_ROWS, self.hidden_size, generator=g) * 2 - 1).to(self.dtype)
        return self._basis[layer]

    def _pseudo(self, ids_T: torch.Tensor, layer: int, out_TH: torch.Tensor) -> None:
        """out_TH <- basis row picked by the hash, times a hashed scale in [0.5, 1.5): two memory passes."""
        h_T = _mix(ids_T, layer, self.seed)
        scale_T = 0.5 + (h_T >> 8).remainder(1024).to(torch.float32) / 1024
        rows_TH = self._layer_basis(layer)[h_T.remainder(_BASIS_ROWS)]
        torch.mul(rows_TH, scale_T.to(self.dtype)[:, None], out=rows_TH)
        out_TH.copy_(rows_TH)

    def forward(self, seqs: list[list[int]], teacher: str, topk: int = 0) -> list[Capture]:
        t0 = time.perf_counter()
        out = []
        H = self.hidden_size
        for s in seqs:
            ids_T = torch.as_tensor(s, dtype=torch.long)
            aux_T3H = torch.empty(len(s), 3 * H, dtype=self.dtype)
            for j, lid in enumerate(self.aux_layer_ids):
                self._pseudo(ids_T, lid, aux_T3H[:, j * H : (j + 1) * H])
            final_TH = torch.empty(len(s), H, dtype=self.dtype)
            self._pseudo(ids_T, self.num_layers, final_TH)
            cap = Capture(aux_T3H=aux_T3H)
            if teacher == TEACHER_HIDDEN:
                cap.teacher_TH = final_TH
            else:
                logp_TV = torch.log_softmax(final_TH.float() @ self.lm_head_VH.float().T, dim=-1)
                v, i = logp_TV.topk(topk, dim=-1)
                cap.topk_ids_TK, cap.topk_logprobs_TK = i.to(torch.int32), v
            out.append(cap)
        # Simulated device time for the whole batch (a GPU computes it in one pass).
        budget = self.cost_per_token_us * 1e-6 * sum(len(s) for s in seqs) - (time.perf_counter() - t0)
        if budget > 0:
            time.sleep(budget)
        return out

    def frozen_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        table = {"embed_tokens": self.embed_VH, "lm_head": self.lm_head_VH, "final_norm": self.norm_H}
        return {n: table[n].clone() for n in names}

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, stop_token_ids) -> list[Completion]:
        # Deterministic: each next token is a hash of the sequence so far.
        out = []
        for p in prompts:
            seq = list(p)
            new = []
            for _ in range(max_new_tokens):
                tok = int(abs(hash((tuple(seq[-4:]), seed))) % self.vocab_size)
                new.append(tok)
                seq.append(tok)
                if tok in stop_token_ids:
                    return_reason = "stop"
                    break
            else:
                return_reason = "length"
            out.append(Completion(token_ids=new, finish_reason=return_reason))
        return out
