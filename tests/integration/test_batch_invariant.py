"""--batch-invariant on the HF backend (real tiny Llama): a sample's features are bit-identical
whatever it is batched with, so a resumed training run sees exactly the features it saw before."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from target_server.backends.hf import HFBackend
from target_server.server import ServerConfig

X = [5, 17, 42, 99, 3, 250, 7, 8, 300, 11, 12, 13]
MATES = [list(range(3, 120)), [1, 2, 3], [(i * 37 + 11) % 500 + 2 for i in range(64)]]


def _features(backend, batch):
    return backend.forward(batch, "hidden")[0]


def test_features_do_not_depend_on_batch_mates(tiny_llama):
    be = HFBackend(tiny_llama, batch_invariant=True)
    alone = _features(be, [X])
    for mates in ([MATES[0]], MATES, [MATES[1], MATES[2]]):
        got = _features(be, [X, *mates])
        assert torch.equal(got.aux_T3H, alone.aux_T3H) and torch.equal(got.teacher_TH, alone.teacher_TH)
    # The plain path pads X to its longest batch-mate: same values within float error, not bit-exact.
    plain = HFBackend(tiny_llama)
    padded = _features(plain, [X, MATES[0]])
    torch.testing.assert_close(padded.aux_T3H, alone.aux_T3H, rtol=0, atol=1e-4)
    assert not torch.equal(padded.aux_T3H, alone.aux_T3H)


def test_the_flag_belongs_to_the_hf_and_sglang_backends():
    with pytest.raises(ConfigError, match="--batch-invariant True needs --backend hf or sglang"):
        ServerConfig(backend="synthetic", batch_invariant=True).validate()
