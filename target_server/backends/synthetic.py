"""Synthetic backend: deterministic pseudo-features at a configurable cost per token.

For tests and scale simulations of many servers without model compute. Features are a pure
function of the sequence's token ids and the layer, so any server answers any request
identically, as real servers do. Producing them costs nothing: each layer has a fixed pool of
rows (seeded by layer and block, grown on demand, identical on every server), and a sequence's
features are a *view* of `T` consecutive rows starting at an offset hashed from its token ids.
So a data-plane benchmark measures the transport, not the stand-in, and many simulated servers
fit on a few cores. `cost_per_token_us` sleeps (releasing the GIL) to simulate a GPU's prefill.

Legend (shapes): T tokens, N pool rows, H hidden size, V vocab, K top-k.
"""

from __future__ import annotations

import json
import time

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK, ModelInfo, parse_aux_layers
from common.errors import ContractError
from common.features import FEATURE_SCHEMA_VERSION, wire_dtype_name
from common.hardware import pick_dtype
from target_server.backends.base import Backend, Capture, Completion, Decoder

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BLOCK = 256      # pool rows are generated in seeded blocks of this many rows
_OFFSETS = 512    # distinct start rows: two sequences share features with probability 1/_OFFSETS


def _offset(ids: list[int], seed: int) -> int:
    """Deterministic start row for a sequence (FNV-1a over the ids; not Python's salted hash)."""
    h = 0xCBF29CE484222325 ^ seed
    for t in ids:
        h = ((h ^ (t & 0xFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % _OFFSETS


class SyntheticBackend(Backend):
    name = "synthetic"

    def __init__(self, *, hidden_size: int = 64, num_layers: int = 8, vocab_size: int = 512, dtype: str = "fp32",
                 aux_layers: str = "auto", max_length: int = 4096, cost_per_token_us: float = 0.0,
                 num_attention_heads: int = 4, num_key_value_heads: int = 2, seed: int = 0, max_topk: int = 64) -> None:
        self.hidden_size, self.num_layers, self.vocab_size = hidden_size, num_layers, vocab_size
        self.dtype = _DTYPES[pick_dtype(dtype)]   # synthetic features are made on the CPU
        self.aux_layer_ids = parse_aux_layers(aux_layers, num_layers)
        self.max_length = max_length
        self.cost_per_token_us = cost_per_token_us
        self.heads, self.kv_heads = num_attention_heads, num_key_value_heads
        self.seed = seed
        self.max_topk = max_topk
        # Per feature spec, [N, L*H]: the spec's layers' rows side by side; [N, H]: the teacher's.
        # Requests get views of these pools (no per-request copy).
        self._aux_pools: dict[tuple[int, ...], torch.Tensor] = {}
        self._final_pool_NH = torch.empty(0, hidden_size, dtype=self.dtype)
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
            teacher_modes=[TEACHER_HIDDEN, TEACHER_TOPK], max_capture_layer=self.num_layers - 1,
            max_topk=min(self.max_topk, self.vocab_size), hf_config_json=json.dumps(self.hf_config()),
            backend=self.name, model_name=f"synthetic-h{self.hidden_size}-l{self.num_layers}",
            feature_schema_version=FEATURE_SCHEMA_VERSION,
        )

    def _block(self, layer: int, block: int) -> torch.Tensor:
        """[_BLOCK, H] rows in [-1, 1), seeded by (seed, layer, block): the same on every server."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + layer) * 1_000_033 + block)
        return (torch.rand(_BLOCK, self.hidden_size, generator=g) * 2 - 1).to(self.dtype)

    @property
    def _aux_pool_N3H(self) -> torch.Tensor:
        """The pool of the default spec (the server's aux layers)."""
        ids = tuple(self.aux_layer_ids)
        return self._aux_pools.get(ids, torch.empty(0, len(ids) * self.hidden_size, dtype=self.dtype))

    def _pools(self, rows: int, layer_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pools with at least `rows` rows (grown by whole blocks; views handed out stay valid)."""
        H = self.hidden_size
        aux_NLH = self._aux_pools.get(layer_ids, torch.empty(0, len(layer_ids) * H, dtype=self.dtype))
        have = aux_NLH.shape[0]
        if have < rows:
            new = range(have // _BLOCK, -(-rows // _BLOCK))
            aux = [torch.cat([self._block(lid, b) for lid in layer_ids], dim=-1) for b in new]
            aux_NLH = self._aux_pools[layer_ids] = torch.cat([aux_NLH, *aux])
        have = self._final_pool_NH.shape[0]
        if have < rows:
            fin = [self._block(self.num_layers, b) for b in range(have // _BLOCK, -(-rows // _BLOCK))]
            self._final_pool_NH = torch.cat([self._final_pool_NH, *fin])
        return aux_NLH, self._final_pool_NH

    def forward(self, seqs: list[list[int]], teacher: str, topk: int = 0,
                layer_ids: tuple[int, ...] | None = None) -> list[Capture]:
        t0 = time.perf_counter()
        out = []
        aux_pool_N3H, final_pool_NH = self._pools(_OFFSETS + max(map(len, seqs)), tuple(layer_ids or self.aux_layer_ids))
        for s in seqs:
            o = _offset(s, self.seed)
            aux_T3H, final_TH = aux_pool_N3H[o : o + len(s)], final_pool_NH[o : o + len(s)]
            cap = Capture(aux_T3H=aux_T3H)
            if teacher == TEACHER_HIDDEN:
                cap.teacher_TH = final_TH
            elif teacher == TEACHER_TOPK:
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
        layers = [n for n in names if n not in table]
        if layers:
            raise ContractError(f"the synthetic backend has no decoder layers to send ({layers}); "
                                "use model.init=random with synthetic servers")
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

    def decoder(self) -> "SyntheticDecoder":
        return SyntheticDecoder(self.vocab_size, self.cost_per_token_us)


def next_token(seq: list[int], vocab_size: int, seed: int = 0) -> int:
    """The synthetic model's next token: a hash of the last four (Python's int-tuple hash is unsalted)."""
    return int(abs(hash((tuple(seq[-4:]), seed))) % vocab_size)


class SyntheticDecoder(Decoder):
    """Rows are token histories; logits put all mass on `next_token` (greedy = the old `generate`)."""

    def __init__(self, vocab_size: int, cost_per_token_us: float) -> None:
        self.vocab_size, self.cost_per_token_us = vocab_size, cost_per_token_us
        self.rows: list[list[int]] = []

    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        logits_BV = torch.full((len(rows), self.vocab_size), -30.0)
        for b, r in enumerate(rows):
            logits_BV[b, next_token(r, self.vocab_size)] = 30.0
        if self.cost_per_token_us > 0:
            time.sleep(self.cost_per_token_us * 1e-6 * len(rows))
        return logits_BV

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        new = [list(p) for p in prompts]
        self.rows += new
        return self._logits(new)

    def step(self, tokens: list[int]) -> torch.Tensor:
        for r, t in zip(self.rows, tokens, strict=True):
            r.append(t)
        return self._logits(self.rows)

    def keep(self, rows: list[int]) -> None:
        self.rows = [self.rows[i] for i in rows]
