"""`auto` dtype: bf16 only where the CPU computes it natively, and every consumer picks the same.

On a CPU without AVX512-BF16/AMX torch runs bf16 matmuls through conversions (a 4x512 prefill of
SmolLM2-135M 5.8x slower than fp32 on an AVX2 box), so `auto` must not mean bf16 there.
"""

from __future__ import annotations

import pytest
import torch

import common.hardware as hw
from common.config import load_config
from common.errors import ConfigError
from draft_trainer.config import TrainConfig
from draft_trainer.model.precision import compute_dtype


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor : 0\nflags : fpu sse2 avx2 fma f16c\n")
    assert hw.cpu_has_bf16(str(amx)) is True
    assert hw.cpu_has_bf16(str(avx2)) is False
    assert hw.cpu_has_bf16(str(tmp_path / "missing")) is False   # unreadable: the safe fp32


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_hardware_everywhere(monkeypatch, native, expected):
    monkeypatch.setattr(hw, "cpu_has_bf16", lambda *a: native)
    assert hw.pick_dtype("auto") == expected
    assert hw.pick_dtype("fp32") == "fp32" and hw.pick_dtype("bf16") == "bf16"   # a named dtype is kept
    # the draft trainer's precision and the target server's dtype take the same answer
    assert compute_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    from target_server.backends.hf_helpers import resolve_dtype
    assert resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)


def test_a_bad_dtype_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="auto, bf16, fp16, fp32"):
        hw.pick_dtype("bfloat")
    with pytest.raises(ConfigError, match="targets.embedded_dtype 'bfloat'.*auto"):
        load_config(TrainConfig, None, ["data.path=/x", "targets.embedded_model=/m", "targets.embedded_dtype=bfloat"])


def test_the_hf_server_serves_the_dtype_auto_picked(monkeypatch, tiny_llama):
    from target_server.backends.hf import HFBackend

    for native, wire in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(hw, "cpu_has_bf16", lambda *a, n=native: n)
        be = HFBackend(tiny_llama, dtype="auto", max_length=32)
        assert be.model_info().dtype == wire                    # what the trainer is told it receives
        assert next(be.model.parameters()).dtype == be.dtype
