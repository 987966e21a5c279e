"""DFlash as a draft method: a block-parallel drafter over about five target layers.

Model: model.py; objective (anchors, block mask, weighted CE): objective.py; geometry and the
reference facts: config.py; SGLang export: export.py; evaluator drafter: drafter.py.
Teacher: none (the reference trains on the sample's own next tokens: with on-policy data those
are the target's greedy outputs). The target's embedding and lm_head stay frozen outside the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from common.contract import ModelInfo
from common.cpu_linear import prepack_linears
from common.errors import ConfigError, ContractError
from common.features import FeatureSpec
from draft_trainer.data.vocab import VocabMapping
from draft_trainer.methods.base import DraftMethod
from draft_trainer.methods.dflash import objective as obj
from draft_trainer.methods.dflash.config import DFlashConfig, target_layers_for
from draft_trainer.methods.dflash.model import DFlashDraft
from draft_trainer.model.objective import Objective
from draft_trainer.model.precision import autocast, compute_dtype


class DFlashMethod(DraftMethod):
    name = "dflash"
    export_formats = ("sglang", "speculators")
    sglang_algorithm = "DFLASH"

    # ------------------------------------------------------------------ features
    def feature_spec(self, info: ModelInfo, teacher: str = "hidden", topk: int = 0) -> FeatureSpec:
        _, layer_ids = target_layers_for(info.num_layers)
        return FeatureSpec(layer_ids=self.chosen_layers(layer_ids), teacher="none")

    # ------------------------------------------------------------------ model
    def build_model(self, info: ModelInfo, vocab: VocabMapping, spec: FeatureSpec) -> DFlashDraft:
        cfg = DFlashConfig.from_model_info(info, list(spec.layer_ids))
        cfg.draft_vocab_size = vocab.draft_vocab_size
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError(f"DFlash draft: {cfg.num_attention_heads} heads do not group over "
                              f"{cfg.num_key_value_heads} key/value heads (from the target's config)")
        model = DFlashDraft(cfg)
        model.d2t.copy_(vocab.d2t)
        model.t2d.copy_(vocab.t2d)
        return model

    def model_from_config(self, draft_config: dict) -> DFlashDraft:
        return DFlashDraft(DFlashConfig.from_dict(draft_config))

    def init_from_target(self, model, how: str, info: ModelInfo, vocab: VocabMapping,
                         frozen: dict[str, torch.Tensor], fetch, seed: int) -> None:
        from draft_trainer.methods.dflash import init

        if how == "random":
            return
        if how != "target":
            raise ConfigError(f"model.init={how!r}: DFlash supports random or target")
        if fetch is None:
            raise ConfigError("model.init=target needs target servers to send the target's layers; an offline "
                              "feature cache has none (use model.init=random, or resume)")
        init.init_from_target(model, dict(fetch(init.tensor_names(model, info.num_layers))), info.num_layers)

    # ------------------------------------------------------------------ objective
    def bind(self, model, frozen: dict[str, torch.Tensor], vocab: VocabMapping, device: torch.device) -> None:
        self.cdt = compute_dtype(self.cfg.precision, device)
        self.embed_VH = frozen["embed_tokens"].to(device=device, dtype=self.cdt)
        self.head_VH = frozen["lm_head"].to(device=device, dtype=self.cdt)
        dcfg = (model.module if hasattr(model, "module") else model).cfg
        self.K, self.mask_id = dcfg.block_size, dcfg.mask_token_id
        self.num_anchors, self.gamma = dcfg.num_anchors, dcfg.loss_decay_gamma
        self.objective = Objective(getattr(self.cfg, "loss", "kl"), getattr(self.cfg, "lk_eta", 3.0))

    def prepare(self, batch) -> obj.BlockTargets:
        gen = obj.batch_generator(batch.sample_ids)
        anchors_BN, keep_BN = obj.sample_anchors(batch.loss_mask_BT, self.K, self.num_anchors, gen)
        return obj.block_targets(batch.input_ids_BT, batch.loss_mask_BT, anchors_BN, keep_BN, self.K,
                                 self.mask_id, self.gamma)

    def loss_counts(self, targets: obj.BlockTargets) -> list[float]:
        return [float(targets.weight_BNK.sum())]

    def loss(self, model, batch, targets: obj.BlockTargets, normalizers=None):
        B, T = batch.input_ids_BT.shape
        dev = batch.input_ids_BT.device
        noise_BQH = F.embedding(targets.noise_ids_BQ, self.embed_VH)
        visible_BQS = obj.context_visibility(targets.anchors_BN, batch.attention_mask_BT, self.K)
        pos_ctx_BS = torch.arange(T, device=dev)[None].expand(B, T)
        with autocast(dev, self.cdt):
            hidden_BQH = model(batch.aux_BT3H, noise_BQH, pos_ctx_BS, targets.pos_q_BQ, visible_BQS)
        return obj.block_loss(hidden_BQH, self.head_VH, targets, normalizers[0] if normalizers else None,
                              compute_dtype=self.cdt, objective=self.objective)

    def num_positions(self) -> int:
        return self.cfg_block_size() - 1

    def cfg_block_size(self) -> int:
        return getattr(self, "K", None) or DFlashConfig.__dataclass_fields__["block_size"].default

    def loss_weights(self, n_terms: int) -> list[float]:
        w = obj.decay_weights(n_terms + 1, getattr(self, "gamma", DFlashConfig.__dataclass_fields__[
            "loss_decay_gamma"].default))[1:]
        return [x / sum(w) for x in w]

    # ------------------------------------------------------------------ serving
    def export(self, trained, output: Path, fmt: str) -> None:
        from draft_trainer.methods.dflash.export import write_speculators, write_sglang

        if fmt == "speculators":
            write_speculators(output, trained.cfg, trained.state, trained.model_info or {})
        else:
            write_sglang(output, trained.cfg, trained.state)

    def drafter(self, export_dir: Path, target, *, dtype: torch.dtype, untrained: bool = False, seed: int = 0):
        from draft_trainer.methods.dflash.drafter import DFlashDrafter
        from draft_trainer.methods.dflash.export import load_exported

        draft = load_exported(export_dir, dtype).eval()
        emb = target.get_input_embeddings().weight.detach()
        head = target.get_output_embeddings().weight.detach()
        tcfg = target.config
        cfg = draft.cfg
        if cfg.vocab_size != emb.shape[0] or cfg.hidden_size != tcfg.hidden_size:
            raise ContractError(f"DFlash draft {export_dir} was trained for V={cfg.vocab_size}, H={cfg.hidden_size}; "
                                f"the target has V={emb.shape[0]}, H={tcfg.hidden_size}")
        if max(cfg.target_layer_ids) >= tcfg.num_hidden_layers:
            raise ContractError(f"DFlash draft reads target layers {cfg.target_layer_ids}; the target has "
                                f"{tcfg.num_hidden_layers}")
        if untrained:  # same geometry, fresh weights: what training added
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                draft = self.model_from_config(cfg.to_dict()).to(dtype).eval()
        if dtype == torch.float32:   # inference only: its linears packed once for oneDNN (common/cpu_linear.py)
            prepack_linears(draft)
        return DFlashDrafter(draft, emb.to(dtype), head.to(dtype))

    @classmethod
    def recognises(cls, export_config: dict) -> bool:
        return export_config.get("architectures") in (["DFlashDraftModel"], ["DFlashSpeculator"])
