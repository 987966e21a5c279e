"""Which soft-CE kernel runs: Triton on CUDA when Triton imports, else the torch path (one warning).

Decided once per process; `soft_ce_backend` is what `fused_loss` and `draft-trainer selftest` ask.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when the Triton soft-CE kernel imports, else why not."""
    try:
        import draft_trainer.model.kernels.soft_ce  # noqa: F401  (imports triton)
    except Exception as e:  # ImportError, or a broken triton install (driver / compiler missing)
        return f"{type(e).__name__}: {e}"
    return None


_warned: list[bool] = []


def soft_ce_backend(device: torch.device | str) -> str:
    """"triton" on CUDA with a working Triton, else "torch" (warns once when CUDA lacks Triton)."""
    if torch.device(device).type != "cuda":
        return "torch"
    err = triton_import_error()
    if err is None:
        return "triton"
    if not _warned:
        _warned.append(True)
        warnings.warn(f"Triton soft-CE kernel unavailable on CUDA ({err}); using the slower torch path. "
                      "Install it with `pip install 'specrelay[triton]'`.", RuntimeWarning, stacklevel=2)
    return "torch"
