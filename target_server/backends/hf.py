"""HF transformers backend: Llama/Qwen-family causal LMs from a local directory, CPU or one GPU.

Legend (shapes): B sequences, Tm longest sequence in the batch (right padding), T one
sequence, H hidden size, V vocab, K top-k.

One forward of the decoder stack per batch. Forward hooks keep only what EAGLE-3 needs: the
outputs of the three aux layers and the final norm's output (never all layers' states).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from common.contract import TEACHER_HIDDEN, TEACHER_TOPK, ModelInfo, parse_aux_layers, parse_tensor_name
from common.errors import AssetError, ConfigError, ContractError
from target_server.backends.base import Backend, Capture, Completion, topk_logprobs
from target_server.backends.hf_helpers import (MAX_TOPK, check_model_dir, eos_ids, hf_model_info, render_chat,
                                               resolve_dtype, sample_next)

log = logging.getLogger(__name__)


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.nn.Module]:
    """(decoder, its layers, its final norm) for Llama-style HF causal LMs."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if decoder is None or layers is None or norm is None:
        raise AssetError(
            f"{type(model).__name__} does not look like a Llama-style causal LM (model.model.layers / "
            "model.model.norm); supported families: Llama, Qwen2/3, Mistral"
        )
    return decoder, layers, norm


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "fp32",
                 aux_layers: str | list[int] = "auto", max_length: int | None = None,
                 max_topk: int = MAX_TOPK, batch_invariant: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a server log is not a terminal

        path = check_model_dir(model_path)
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"--device {device!r}: {e}; use cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is visible to this process; use --device cpu")
        self.dtype = resolve_dtype(dtype, str(self.device))
        # Everything checkable from the config is checked before the (slow) weight load.
        cfg = AutoConfig.from_pretrained(path)
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(cfg.vocab_size)
        self.aux_layer_ids = parse_aux_layers(aux_layers, self.num_layers)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 4096))
        self.max_topk = max_topk
        # Each sample's features computed alone (B=1, no padding): independent of its batch-mates,
        # so a resumed run gets bit-identical features; costs the batching (bench_batch_invariant).
        self.batch_invariant = batch_invariant
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.path = path
        self._decoder, layers, norm = decoder_parts(self.model)
        self._captured: dict[str, torch.Tensor] = {}
        self._capturing = False  # hooks keep states only during a feature forward, not while decoding
        self._lock = threading.Lock()  # hooks write shared state: one forward at a time
        # Hooks sit on the layers some feature spec has asked for (the aux layers from the start,
        # others added on first request); a forward keeps only its own spec's layers (`_want`,
        # set under the lock), never every layer's states.
        self._want: set[int] = set()
        self._hooked: set[int] = set()
        self._hook_layers(self.aux_layer_ids)
        norm.register_forward_hook(self._hook("final"))
        log.info("hf backend: %s, %d layers, H=%d, aux=%s, %s on %s", path.name, self.num_layers,
                 self.hidden_size, self.aux_layer_ids, self.dtype, self.device)

    @classmethod
    def from_config(cls, cfg) -> "HFBackend":
        return cls(cfg.model, device=cfg.device, dtype=cfg.dtype, aux_layers=cfg.aux_layers,
                   max_length=cfg.max_length or None, max_topk=cfg.max_topk, batch_invariant=cfg.batch_invariant)

    def _hook_layers(self, layer_ids) -> None:
        for lid in layer_ids:
            if lid not in self._hooked:
                self._decoder.layers[lid].register_forward_hook(self._hook(lid))
                self._hooked.add(lid)

    def _hook(self, key):
        def hook(_module, _inputs, output):
            if self._capturing and (key == "final" or key in self._want):
                self._captured[key] = output[0] if isinstance(output, tuple) else output
        return hook

    def model_info(self) -> ModelInfo:
        return hf_model_info(self.model.config, self.tokenizer, backend=self.name, model_name=self.path.name,
                             num_layers=self.num_layers, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                             aux_layer_ids=self.aux_layer_ids, dtype=self.dtype, max_length=self.max_length,
                             max_topk=min(self.max_topk, self.vocab_size), default_arch=type(self.model).__name__,
                             max_capture_layer=self.num_layers - 1)

    def forward(self, seqs: list[list[int]], teacher: str, topk: int = 0,
                layer_ids: tuple[int, ...] | None = None) -> list[Capture]:
        layer_ids = tuple(layer_ids or self.aux_layer_ids)
        if self.batch_invariant and len(seqs) > 1:
            return [c for s in seqs for c in self._forward([s], teacher, topk, layer_ids)]
        return self._forward(seqs, teacher, topk, layer_ids)

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], teacher: str, topk: int, layer_ids: tuple[int, ...]) -> list[Capture]:
        keys = list(layer_ids) + ["final"]
        lengths = [len(s) for s in seqs]
        B, Tm = len(seqs), max(lengths)
        ids_BT = torch.zeros(B, Tm, dtype=torch.long)
        mask_BT = torch.zeros(B, Tm, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BT[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask_BT[b, : len(s)] = 1
        with self._lock:
            self._captured.clear()
            self._hook_layers(layer_ids)
            self._want = set(layer_ids)
            self._capturing = True
            # A single unpadded sequence runs without a mask: the exact path transformers takes.
            try:
                self._decoder(input_ids=ids_BT.to(self.device),
                              attention_mask=None if B == 1 else mask_BT.to(self.device), use_cache=False)
            except torch.cuda.OutOfMemoryError:
                # Free the failed pass's blocks so the scheduler's one-sample-at-a-time retry can fit.
                self._captured.clear()
                torch.cuda.empty_cache()
                raise
            finally:
                self._capturing = False
            missing = [k for k in keys if k not in self._captured]
            if missing:
                raise RuntimeError(f"forward hooks did not fire for {missing}: unsupported model structure")
            # One device->host copy per batch, then per-sequence views.
            aux_BT3H = torch.cat([self._captured[lid] for lid in layer_ids], dim=-1).to("cpu")
            final_BTH = self._captured["final"]
            self._captured.clear()
        out = []
        if teacher == TEACHER_HIDDEN:
            final_BTH = final_BTH.to("cpu")
        for b, T in enumerate(lengths):
            cap = Capture(aux_T3H=aux_BT3H[b, :T])
            if teacher == TEACHER_HIDDEN:
                cap.teacher_TH = final_BTH[b, :T]
            elif teacher == TEACHER_TOPK:
                cap.topk_ids_TK, cap.topk_logprobs_TK = topk_logprobs(
                    final_BTH[b, :T], self.model.get_output_embeddings(), topk)
            out.append(cap)
        return out

    def decoder(self):
        from target_server.backends.hf_decode import HFDecoder, supports

        # Sliding-window / hybrid attention layers keep a different cache layout: one at a time there.
        return HFDecoder(self.model, self.device, self._lock) if supports(self.model) else None

    def chat_prompt(self, messages: list[dict], template_kwargs: dict) -> list[int]:
        return render_chat(self.tokenizer, messages, template_kwargs)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def eos_token_ids(self) -> list[int]:
        return eos_ids(self.model.generation_config, self.model.config)

    def frozen_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        table = {
            "embed_tokens": lambda: self.model.get_input_embeddings().weight,
            "lm_head": lambda: self.model.get_output_embeddings().weight,
            "final_norm": lambda: self._decoder.norm.weight,
        }
        out = {}
        for n in names:
            layer = parse_tensor_name(n, self.num_layers)
            if layer is None:
                w = table[n]()
            else:
                try:
                    w = self._decoder.layers[layer[0]].get_submodule(layer[1]).weight
                except AttributeError:
                    raise ContractError(f"tensor {n!r}: {type(self.model).__name__} has no module "
                                        f"model.layers.{layer[0]}.{layer[1]}") from None
            out[n] = w.detach().to("cpu").contiguous()
        return out

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop_token_ids: list[int]) -> list[Completion]:
        stops = set(stop_token_ids) or set(eos_ids(self.model.generation_config, self.model.config))
        gen = torch.Generator().manual_seed(seed)
        out = []
        with self._lock:
            for prompt in prompts:  # one at a time: exact, simple; batching is the scheduler's job
                ids = torch.as_tensor([prompt], dtype=torch.long, device=self.device)
                past = None
                new: list[int] = []
                reason = "length"
                step_ids = ids
                for _ in range(max_new_tokens):
                    o = self.model(input_ids=step_ids, past_key_values=past, use_cache=True)
                    past = o.past_key_values
                    tok = sample_next(o.logits[0, -1], temperature, top_p, gen)
                    new.append(tok)
                    if tok in stops:
                        reason = "stop"
                        break
                    step_ids = torch.tensor([[tok]], device=self.device)
                out.append(Completion(token_ids=new, finish_reason=reason))
        return out

