"""What the sglang backend checks before SGLang is imported or started: version, aux ids, TP, architecture."""

from __future__ import annotations

from pathlib import Path

from common.errors import ConfigError

# Versions whose ModelRunner / ScheduleBatch / ForwardBatch internals this package was written
# against and tested with (the CPU lane pins the lower bound). Internals move between minors.
SUPPORTED_SGLANG = ("0.5.23", "0.6.0")  # [min, max)


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


def check_tp(tp: int, heads: int, kv_heads: int) -> None:
    if tp < 1:
        raise ConfigError(f"--tp {tp}: must be >= 1")
    if heads % tp or (kv_heads % tp and tp % kv_heads):
        raise ConfigError(f"--tp {tp}: must divide the attention heads ({heads}) and the KV heads ({kv_heads}) "
                          "or be a multiple of the KV heads")


def check_architecture(hf_config, path: Path) -> None:
    """SGLang has a model class for this architecture and it can capture EAGLE-3 aux states."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    from sglang.srt.models.registry import ModelRegistry

    try:
        cls, arch = ModelRegistry.resolve_model_cls(archs)
    except ValueError as e:
        raise ConfigError(f"--backend sglang: SGLang cannot run {path.name} ({archs}): {e}") from None
    if not hasattr(cls, "set_eagle3_layers_to_capture"):
        raise ConfigError(f"--backend sglang: SGLang's {cls.__name__} for {arch} cannot capture EAGLE-3 aux "
                          "hidden states; use --backend hf for this model")
