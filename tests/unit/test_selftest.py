"""`draft-trainer selftest` on CPU: the table, its JSON, and that a wrong kernel makes it fail."""

import json

import torch

from draft_trainer.cli import main
from draft_trainer.model.kernels.flash import CpuFlash
from draft_trainer.selftest import SIZES, check_ttt


def test_selftest_runs_on_cpu_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    rc = main(["selftest", "--device", "cpu", "--size", "tiny", "--steps", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| TTT fused vs reference: gradients | PASS |" in text and "all checks passed" in text
    data = json.loads(out.read_text())
    by = {r["check"]: r for r in data["rows"]}
    assert by["soft-CE Triton vs torch"]["status"] == "SKIP"       # CPU: the torch path is what trains
    assert by["train step: tokens/s"]["status"] == "PASS" and float(by["train step: tokens/s"]["value"]) > 0
    assert len(data["rows"]) == 6 and data["size"] == "tiny"


def test_a_wrong_flash_kernel_fails_the_ttt_rows(monkeypatch):
    real = CpuFlash.fwd

    def off_by_scale(self, q, k, v, mask, causal, scale):   # a kernel that ignores the requested scale
        return real(self, q, k, v, mask, causal, scale * 1.01)

    monkeypatch.setattr(CpuFlash, "fwd", off_by_scale)
    rows = check_ttt(torch.device("cpu"), SIZES["tiny"])
    assert [r.status for r in rows] == ["FAIL", "FAIL"], rows
