"""EAGLE-3 as a draft method: three target layers in, one decoder layer, training-time test.

The model, the reference and fused TTT, the losses, the target-derived init and the SGLang
export live beside this file; this class is the only thing the trainer, export and eval see.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.contract import ModelInfo
from common.errors import ConfigError, ContractError
from common.features import FeatureSpec
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.methods.base import DraftMethod, Fetch
from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.losses import STEP_WEIGHT_DECAY
from draft_trainer.methods.eagle3.model import Eagle3Draft
from draft_trainer.methods.eagle3.step import make_teacher, step_counts, train_step
from draft_trainer.model.objective import Objective
from draft_trainer.model.precision import cast_frozen, compute_dtype


class Eagle3Method(DraftMethod):
    name = "eagle3"
    export_formats = ("sglang", "speculators")  # speculators: the layout vLLM reads (draft_trainer/formats)

    # ------------------------------------------------------------------ features
    def feature_spec(self, info: ModelInfo, teacher: str = "hidden", topk: int = 0) -> FeatureSpec:
        # model.feature_layers, else the server's advertised aux layers (its --aux-layers, EAGLE-3's default
        # [1, L/2-1, L-4]).
        return FeatureSpec(layer_ids=self.chosen_layers(info.aux_layer_ids), teacher=teacher, topk=topk)

    # ------------------------------------------------------------------ model
    def build_model(self, info: ModelInfo, vocab: VocabMapping, spec: FeatureSpec) -> Eagle3Draft:
        if len(spec.layer_ids) != 3:
            raise ConfigError(f"EAGLE-3 reads exactly three target layers, the feature spec has {list(spec.layer_ids)}")
        cfg = DraftConfig.from_model_info(info, vocab.draft_vocab_size)
        cfg.aux_layer_ids = list(spec.layer_ids)
        # EAGLE-3.1 = both of SGLang/vLLM's switches (a norm per aux layer before fc, normed output fed back).
        cfg.fc_norm = cfg.norm_output = getattr(self.cfg, "eagle_variant", "3") == "3.1"
        model = Eagle3Draft(cfg)
        model.set_vocab_mapping(vocab.d2t, vocab.t2d)
        return model

    def model_from_config(self, draft_config: dict) -> Eagle3Draft:
        return Eagle3Draft(DraftConfig.from_dict(draft_config))

    def init_from_target(self, model, how: str, info: ModelInfo, vocab: VocabMapping,
                         frozen: dict[str, torch.Tensor], fetch: Fetch | None, seed: int) -> None:
        from draft_trainer.methods.eagle3.init import init_draft

        with torch.no_grad():
            model.embed_tokens.weight.copy_(frozen["embed_tokens"].float())
        if how == "random":
            return
        if fetch is None:
            raise ConfigError(f"model.init={how} needs target servers to send the target's layers; "
                              "an offline feature cache has none (use model.init=random, or resume)")
        init_draft(model, how, info.num_layers, vocab.used, frozen["lm_head"], fetch, seed)

    def unsharded_params(self, model) -> list[torch.nn.Parameter]:
        return [model.embed_tokens.weight]

    # ------------------------------------------------------------------ objective
    def bind(self, model, frozen: dict[str, torch.Tensor], vocab: VocabMapping, device: torch.device) -> None:
        self.precision = self.cfg.precision
        self.ttt_steps = self.cfg.ttt_steps
        self.objective = Objective(getattr(self.cfg, "loss", "kl"), getattr(self.cfg, "lk_eta", 3.0))
        # Straight to the compute dtype: a bf16 lm_head from the server is used as it is, with no fp32
        # copy on the way (V x H x 4 bytes: 2 GB for a Llama-3-8B target). Same values either way.
        cdt = compute_dtype(self.precision, device)
        head_VH = frozen["lm_head"].to(device)
        self.target_head_VH = cast_frozen(model, head_VH if cdt in (torch.bfloat16, torch.float16) else head_VH.float(),
                                          cdt)
        self.used_Vd, self.t2d_V, self.t2d_index_V = (vocab.used.to(device), vocab.t2d.to(device),
                                                       vocab.target_to_draft.to(device))

    def prepare(self, batch):
        return make_teacher(batch, self.target_head_VH, self.used_Vd, self.t2d_V, self.t2d_index_V,
                            precision=self.precision)

    def loss_counts(self, targets) -> list[float]:
        return [float(n) for n in step_counts(targets, self.ttt_steps)]

    def loss(self, model, batch, targets, normalizers=None):
        return train_step(model, batch, self.target_head_VH, self.used_Vd, self.t2d_V, self.t2d_index_V,
                          self.ttt_steps, precision=self.precision, teacher=targets, normalizers=normalizers,
                          objective=self.objective)

    def num_positions(self) -> int:
        return self.cfg.ttt_steps

    def loss_weights(self, n_terms: int) -> list[float]:
        return [STEP_WEIGHT_DECAY ** k for k in range(n_terms)]

    # ------------------------------------------------------------------ serving
    def export(self, trained, output: Path, fmt: str) -> None:
        from draft_trainer.methods.eagle3.export import serving_tensors, sglang_config, write_sglang

        if fmt == "sglang":
            write_sglang(output, trained)
            return
        from draft_trainer.formats.eagle3 import sglang_to_speculators
        from draft_trainer.formats.store import write_files

        info = trained.model_info
        config, tensors = sglang_to_speculators(sglang_config(trained.cfg), serving_tensors(trained),
                                                verifier=info.get("model_name") or None,
                                                target_num_layers=info.get("num_layers") or None)
        write_files(output, config, tensors)

    def drafter(self, export_dir: Path, target, *, dtype: torch.dtype, untrained: bool = False, seed: int = 0):
        from draft_trainer.methods.eagle3.drafter import Eagle3Drafter
        from draft_trainer.methods.eagle3.export import load_exported

        draft = load_exported(export_dir, embed_tokens_VH=None, dtype=dtype).eval()
        emb = target.get_input_embeddings().weight.detach()
        tcfg = target.config
        if draft.cfg.vocab_size != emb.shape[0] or draft.cfg.target_hidden_size != tcfg.hidden_size:
            raise ContractError(f"draft {export_dir} was trained for V={draft.cfg.vocab_size}, "
                                f"H={draft.cfg.target_hidden_size}; the target has V={emb.shape[0]}, "
                                f"H={tcfg.hidden_size}")
        if draft.cfg.hidden_size != emb.shape[1]:
            raise ContractError(f"draft hidden size {draft.cfg.hidden_size} != target embedding width {emb.shape[1]}")
        if not draft.cfg.aux_layer_ids or max(draft.cfg.aux_layer_ids) >= tcfg.num_hidden_layers:
            raise ContractError(f"draft aux layer ids {draft.cfg.aux_layer_ids} do not fit the target's "
                                f"{tcfg.num_hidden_layers} layers")
        if untrained:  # same geometry, vocabulary mapping and frozen embedding; fresh weights
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                fresh = Eagle3Draft(draft.cfg)
            fresh.set_vocab_mapping(draft.d2t, draft.t2d)
            draft = fresh.to(dtype).eval()
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(emb)
        return Eagle3Drafter(draft.to(dtype))

    @classmethod
    def recognises(cls, export_config: dict) -> bool:
        return export_config.get("architectures") == ["LlamaForCausalLMEagle3"]
