"""DFlash's draft geometry and the facts it takes from the reference implementations.

Reference facts (read from the `dflash` 0.1.0 wheel's model.py, SGLang 0.5.23's
srt/models/dflash.py + srt/speculative/dflash_utils.py, SpecForge's specforge/core/dflash.py):
  * target layers: `build_target_layer_ids(num_target_layers, num_draft_layers)`: one target layer
    per draft layer, spread evenly over [1, L-3] (a 1-layer draft reads layer L//2); the features
    are the layers' *outputs* (HF hidden_states[i + 1]), concatenated in order;
  * the draft's hidden size is the target's (`fc` maps K*H -> H; SGLang builds it from
    config.hidden_size), it borrows the target's embedding and lm_head (no vocab of its own);
  * block_size 16 by default (SGLang: `dflash_config.block_size`, else 16); a block is
    [anchor token, mask x (block_size - 1)], position k of the block predicts token anchor + k;
  * training: up to 512 anchors per sample (SpecForge `num_anchors`), CE weighted by
    exp(-(k - 1) / gamma) (SpecForge `loss_decay_gamma`; the DFlash paper uses 7 for block 16).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.contract import ModelInfo
from common.errors import ConfigError

DRAFT_LAYERS = 5          # z-lab's published DFlash drafts: five draft layers, so five target layers
BLOCK_SIZE = 16
NUM_ANCHORS = 512
LOSS_DECAY_GAMMA = 7.0


def reference_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference's choice of target layers (dflash / SGLang `build_target_layer_ids`)."""
    if num_target_layers <= 0 or num_draft_layers <= 0:
        raise ConfigError(f"DFlash needs positive layer counts (target {num_target_layers}, draft {num_draft_layers})")
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    if end < start:
        raise ConfigError(f"DFlash reads target layers spread over [1, L-3]; a {num_target_layers}-layer target "
                          "has none (it needs at least 4 layers)")
    span = end - start
    return [int(round(start + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def target_layers_for(num_target_layers: int, num_draft_layers: int = DRAFT_LAYERS) -> tuple[int, list[int]]:
    """(draft layers, target layer ids) for a target of this depth.

    A shallow target (fewer than num_draft_layers distinct ids in [1, L-3]) gets fewer draft
    layers, so the ids stay distinct and the draft still reads one target layer per draft layer,
    as the reference pairs them."""
    n = num_draft_layers
    while n > 1:
        ids = reference_layer_ids(num_target_layers, n) if num_target_layers >= 4 else []
        if ids and len(set(ids)) == len(ids):
            return n, ids
        n -= 1
    return 1, reference_layer_ids(num_target_layers, 1)


@dataclass
class DFlashConfig:
    hidden_size: int
    num_hidden_layers: int             # draft decoder layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int                    # the target's (the draft borrows its embedding and head)
    draft_vocab_size: int = 0          # the run's draft vocabulary (carried for checkpoints; DFlash drafts all V)
    target_layer_ids: list[int] = field(default_factory=list)
    num_target_layers: int = 0
    block_size: int = BLOCK_SIZE
    mask_token_id: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    num_anchors: int = NUM_ANCHORS
    loss_decay_gamma: float = LOSS_DECAY_GAMMA

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"DFlash draft config has unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_model_info(cls, info: ModelInfo, layer_ids: list[int]) -> "DFlashConfig":
        """The reference's draft shape: the target's attention geometry and width (Qwen3-style
        layers with q/k norms), one draft layer per target layer read."""
        hf = info.hf_config
        heads = int(hf.get("num_attention_heads") or max(1, info.hidden_size // 64))
        head_dim = int(hf.get("head_dim") or info.hidden_size // heads)
        return cls(
            hidden_size=info.hidden_size, num_hidden_layers=len(layer_ids), num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
            intermediate_size=int(hf.get("intermediate_size") or 4 * info.hidden_size),
            vocab_size=info.vocab_size, target_layer_ids=list(layer_ids), num_target_layers=info.num_layers,
            mask_token_id=default_mask_token(hf, info.vocab_size), rms_norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
            max_position_embeddings=int(hf.get("max_position_embeddings") or info.max_length or 4096))


def default_mask_token(hf: dict, vocab_size: int) -> int:
    """The token the block's unknown positions read. The reference adds a `<|MASK|>` token to
    big-vocabulary targets (SGLang refuses an id outside the target's vocabulary); without one we
    take the pad token, else the last id: its (frozen) embedding is only a placeholder the draft
    learns to read, it never reaches the output."""
    pad = hf.get("pad_token_id")
    if isinstance(pad, int) and 0 <= pad < vocab_size:
        return pad
    return vocab_size - 1
