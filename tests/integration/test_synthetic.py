"""The synthetic backend through the real wire: deterministic features any server reproduces."""

import torch

from draft_trainer.client.target import TargetClient
from tests.support.procs import start_server


def test_two_synthetic_servers_answer_identically(tmp_path):
    args = ["--backend", "synthetic", "--synthetic-hidden-size", "32", "--dtype", "bf16"]
    a = start_server(tmp_path, *args, name="a")
    b = start_server(tmp_path, *args, name="b")
    try:
        ca, cb = TargetClient(a.endpoint), TargetClient(b.endpoint)
        seqs = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3]]
        fa = list(ca.features([1, 2], seqs))
        fb = list(cb.features([2, 1], seqs[::-1]))
        by_id = {f.sample_id: f for f in fb}
        for f in fa:
            assert f.aux_T3H.shape == (len(seqs[f.sample_id - 1]), 96) and f.aux_T3H.dtype == torch.bfloat16
            assert torch.equal(f.aux_T3H, by_id[f.sample_id].aux_T3H)
            assert torch.equal(f.teacher_TH, by_id[f.sample_id].teacher_TH)
        # Different token ids give different features.
        assert not torch.equal(fa[0].aux_T3H[1], fa[1].aux_T3H[1])
        info = ca.model_info()
        assert info.backend == "synthetic" and info.hidden_size == 32
        ca.close()
        cb.close()
    finally:
        a.stop()
        b.stop()
