"""Draft methods side by side (issue 15): EAGLE-3 and DFlash trained on the same synthetic token
stream for the same number of tokens, through the method interface the trainer uses.

Per method, in a fresh subprocess (honest peak RSS): step time (prepare + loss + backward + clip +
AdamW, median after warm-up), step tokens/s (batch tokens / step time), peak RSS. Each method gets
the feature width it asks for (EAGLE-3: its 3 aux layers, DFlash: 5 layers from the target's
depth): the features are random, so these runs measure cost, not quality.
`--tau` (smoke size only) adds quality: the tiny chats are regenerated greedily by the tiny 8-layer
target (on-policy data, as the issue asks of every method), each method trains through the CLI
on them (same data, steps and batch = same tokens), is exported, and `draft-trainer eval`
reports its lossless tau on the same prompts.

    python benchmarks/bench_methods.py --smoke            # tiny dims, seconds
    python benchmarks/bench_methods.py --smoke --tau      # + tau on the tiny target (minutes; --tau-steps N)
    python benchmarks/bench_methods.py                    # SmolLM2-135M-sized dims (do not run on a busy box)

Writes benchmarks/results/<name>.json and .md (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("eagle3", "dflash")
SMOLLM2 = dict(H=576, layers=30, heads=9, kv_heads=3, ffn=1536, V=49152, Vd=32000)
TINY = dict(H=64, layers=8, heads=4, kv_heads=2, ffn=128, V=512, Vd=256)


def run_method(s: dict) -> dict:
    """One method's measurement in this process (run in a fresh subprocess by `main`)."""
    import torch

    sys.path.insert(0, str(REPO))
    from common.contract import ModelInfo
    from draft_trainer.config import ModelConfig
    from draft_trainer.data.batch import Batch
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods import get_method

    torch.set_num_threads(s["threads"])
    d, B, T = s["dims"], s["batch"], s["seq"]
    hf = {"num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"], "intermediate_size": d["ffn"],
          "head_dim": d["H"] // d["heads"], "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    L = d["layers"]
    info = ModelInfo("LlamaForCausalLM", "llama", L, d["H"], d["V"], [1, L // 2 - 1, L - 4], "float32", 4096, "bench",
                     hf_config_json=json.dumps(hf), max_capture_layer=L - 1)
    method = get_method(s["method"], ModelConfig(method=s["method"], precision="fp32"))
    spec = method.feature_spec(info, teacher="hidden")
    g = torch.Generator().manual_seed(0)
    vocab = build_vocab_mapping(torch.randint(0, 50, (d["V"],), generator=g), d["Vd"])
    model = method.build_model(info, vocab, spec)
    frozen = {"embed_tokens": torch.randn(d["V"], d["H"], generator=g) * 0.02,
              "lm_head": torch.randn(d["V"], d["H"], generator=g) * 0.02}
    method.init_from_target(model, "random", info, vocab, frozen, None, 0)
    method.bind(model, frozen, vocab, torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, sim = [], []
    for step in range(s["warmup"] + s["steps"]):
        ids = torch.randint(0, d["V"], (B, T), generator=g)   # the same token stream for every method
        aux = torch.randn(B, T, len(spec.layer_ids) * d["H"], generator=g)
        teacher = torch.randn(B, T, d["H"], generator=g) if spec.teacher == "hidden" else None
        batch = Batch(list(range(step * B, step * B + B)), ids, torch.ones(B, T), torch.ones(B, T, dtype=torch.long),
                      aux, teacher)
        t0 = time.perf_counter()
        targets = method.prepare(batch)
        loss, stats = method.loss(model, batch, targets, normalizers=method.loss_counts(targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= s["warmup"]:
            times.append(time.perf_counter() - t0)
            sim.append(stats.sim_accept_len)
    step_s = statistics.median(times)
    return {"method": s["method"], "layers": list(spec.layer_ids), "teacher": spec.teacher,
            "params_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "step_s": step_s, "tokens_per_s": B * T / step_s, "peak_rss_mib": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": B * T * s["steps"]}


def tau_smoke(steps: int, tmp: Path) -> dict[str, dict]:
    """Train each method on the tiny 8-layer target for the same steps on the same on-policy data
    (the tiny chats' answers regenerated greedily by the target: DFlash, like its reference,
    trains on the data's own tokens), export, eval tau."""
    sys.path.insert(0, str(REPO))
    from benchmarks.harness import Server
    from draft_trainer.assets.tiny import build_tiny_dataset, build_tiny_model

    model = build_tiny_model(tmp / "tiny-8l", "llama", num_layers=8)
    data = build_tiny_dataset(model, tmp / "chat")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hello there", "tell me a story", "why"]))
    cli = [sys.executable, "-m", "draft_trainer"]

    def run(*args, timeout=1800):
        return subprocess.run([*cli, *args], check=True, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    out = {}
    srv = Server("--model", str(model), "--backend", "hf", "--dtype", "fp32")
    try:
        run("regenerate", "--targets", srv.endpoint, "--input", str(data), "--output", str(tmp / "regen.jsonl"),
            "--max-new-tokens", "48")
        run("prepare-data", "--model", str(model), "--input", str(tmp / "regen.jsonl"), "--output",
            str(tmp / "onpolicy"), "--draft-vocab-size", "256", "--workers", "1")
        for m in METHODS:
            runs = tmp / m
            run("train", f"model.method={m}", f"targets.endpoints={srv.endpoint}", f"data.path={tmp / 'onpolicy'}",
                f"output_dir={runs}", f"max_steps={steps}", "batch_size=4", "optim.lr=3e-3", "progress=false",
                "optim.warmup_ratio=0", "model.precision=fp32")
            run("export", "--checkpoint", str(runs), "--output", str(tmp / f"{m}-export"), timeout=600)
            res = run("eval", "--target-model", str(model), "--draft", str(tmp / f"{m}-export"), "--prompts",
                      str(prompts), "--num-steps", "7", "--max-new-tokens", "32", timeout=600)
            r = json.loads(res.stdout)
            out[m] = {"tau": r["tau"], "lossless": r["lossless"], "train_steps": steps, "data": "on-policy (greedy)"}
    finally:
        srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny dims, a few steps")
    ap.add_argument("--tau", action="store_true", help="also train on the tiny target and report eval tau")
    ap.add_argument("--tau-steps", type=int, default=8, help="training steps per method for --tau")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(run_method(json.loads(a._worker))))
        return
    sys.path.insert(0, str(REPO))
    from benchmarks.harness import markdown_table, write_results

    base = dict(dims=TINY, batch=2, seq=128, warmup=1, steps=3) if a.smoke else \
        dict(dims=SMOLLM2, batch=1, seq=1024, warmup=2, steps=5)
    rows = []
    for m in METHODS:
        s = {**base, "method": m, "threads": a.threads}
        res = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(s)], capture_output=True, text=True,
                             check=True, timeout=3600)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    if a.tau:
        with tempfile.TemporaryDirectory() as tmp:
            taus = tau_smoke(a.tau_steps, Path(tmp))
        for r in rows:
            r.update(taus[r["method"]])
    ref = rows[0]
    for r in rows:
        r["tokens_per_s_vs_eagle3"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["peak_rss_vs_eagle3"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
    cols = ["method", "layers", "teacher", "params_M", "tokens", "step_s", "tokens_per_s", "tokens_per_s_vs_eagle3",
            "peak_rss_mib", "peak_rss_vs_eagle3"] + (["tau", "lossless"] if a.tau else [])
    name = "bench_methods" + ("_smoke" if a.smoke else "") + (f"_tau{a.tau_steps}" if a.tau else "")
    write_results(name, {"settings": base, "rows": rows}, markdown_table(rows, cols))


if __name__ == "__main__":
    main()
