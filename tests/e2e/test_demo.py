"""`make demo` in its --tiny mode: every stage of the real demo (prepare-data with a held-out
split, embedded server, time-budgeted training, export, lossless evaluation of the untrained
and trained drafts, report and plots) on a tiny offline model."""

import json

from tests.support.procs import run_cli


def test_tiny_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    stale = out / "train" / "checkpoints" / "step_99999999"  # a previous run's: must not be evaluated
    stale.mkdir(parents=True)
    (stale / "COMPLETE").write_text("")
    res = run_cli("draft_trainer.demo", "--tiny", "--output", str(out), "--curve-points", "1", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("[1/6] assets", "[2/6] data", "[3/6] train", "[4/6] export", "[5/6] eval", "[6/6] report"):
        assert stage in res.stdout
    held = (out / "data" / "heldout_prompts.jsonl").read_text().splitlines()
    assert len(held) == 4
    curve = json.loads((out / "tau_curve.json").read_text())
    # step 0 (untrained), intermediate checkpoint(s) every budget/2 seconds, the final one.
    assert len(curve) >= 3 and curve[0]["step"] == 0 and curve[0]["train_tokens"] == 0
    assert all(a["train_tokens"] < b["train_tokens"] for a, b in zip(curve, curve[1:]))
    assert all(c["step"] != 99999999 for c in curve) and not stale.exists()
    for c in curve:
        r = json.loads((out / "eval" / f"step_{c['step']:08d}.json").read_text())
        assert r["lossless"] and r["prompts"] == 4 and r["tau"] == c["tau"] >= 1.0
        assert sum(r["accepted_histogram"]) == r["target_forwards"]
        assert (out / "drafts" / f"step_{c['step']:08d}" / "config.json").is_file()
    report = (out / "report.md").read_text()
    assert "| acceptance length tau (K=5, greedy chain) |" in report
    for png in ("acceptance.png", "train/loss.png", "train/accuracy.png"):
        assert (out / png).stat().st_size > 1000, png
