"""Probe (not a suite entry): the HF target backend's two jobs on glibc vs jemalloc, to decide whether
`target-server` should choose jemalloc as `draft-trainer` does (common/memory.py). One process per allocator
(`common.memory.allocator_env`), both at once with 1 torch thread each on 2 cores, the same work in each:

  features   `HFBackend.forward` over a dataset's samples, B per call, in the dataset's order (the live
             training path: aux hidden states + the teacher's final hidden state per token);
  generate   the batched decoder (`HFBackend.decoder`: prefill + greedy steps, the regeneration path) over
             prompts cut from the same samples.

    python -m benchmarks.probe_server_allocator --data runs/d2h/data/onpolicy --samples 160 --batch 4
    python -m benchmarks.probe_server_allocator --smoke      # tiny model, seconds

Prints and writes benchmarks/results/probe_server_allocator.json (per allocator: tokens per CPU-second and per
second for each job, peak RSS, and a checksum of the outputs, which must be equal: the allocator changes no number).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def read_samples(data: Path, n: int) -> list[list[int]]:
    import pyarrow as pa

    with pa.memory_map(str(data / "samples.arrow")) as src:
        ids = pa.ipc.open_file(src).read_all().column("input_ids").to_pylist()
    return ids[:n]


def worker(spec: dict) -> dict:
    import torch

    from benchmarks.parity_handoff import cpu_seconds
    from common.memory import active_allocator
    from target_server.backends.hf import HFBackend

    torch.set_num_threads(1)
    backend = HFBackend(spec["model"], dtype=spec["dtype"])
    seqs = read_samples(Path(spec["data"]), spec["samples"]) if spec["data"] else spec["seqs"]
    B = spec["batch"]
    out: dict = {"allocator": active_allocator()}
    check = 0.0
    t0, c0, tokens = time.perf_counter(), cpu_seconds(), 0
    for i in range(0, len(seqs), B):
        for cap in backend.forward(seqs[i : i + B], teacher="hidden"):
            check += float(cap.teacher_TH.float().sum()) + float(cap.aux_T3H[-1].float().sum())
        tokens += sum(len(s) for s in seqs[i : i + B])
    out["features"] = {"tokens": tokens, "tokens_per_cpu_s": tokens / (cpu_seconds() - c0),
                       "tokens_per_s": tokens / (time.perf_counter() - t0)}
    prompts = [s[: spec["prompt_len"]] for s in seqs[: spec["gen_prompts"]]]
    dec = backend.decoder()
    t0, c0, new = time.perf_counter(), cpu_seconds(), 0
    for i in range(0, len(prompts), spec["gen_batch"]):
        logits_BV = dec.prefill(prompts[i : i + spec["gen_batch"]])
        for _ in range(spec["new_tokens"]):
            nxt = logits_BV.float().argmax(-1).tolist()
            check += sum(nxt)
            new += len(nxt)
            logits_BV = dec.step(nxt)
        dec.keep([])   # the next batch starts from an empty cache
    out["generate"] = {"tokens": new, "tokens_per_cpu_s": new / (cpu_seconds() - c0),
                       "tokens_per_s": new / (time.perf_counter() - t0)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["checksum"] = check
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a prepare-data dataset directory (its samples.arrow)")
    ap.add_argument("--model", help="default: cached SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="bf16", help="the target's dtype (the demo's servers: bf16)")
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--batch", type=int, default=4, help="samples per features call")
    ap.add_argument("--gen-prompts", type=int, default=32)
    ap.add_argument("--gen-batch", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    from common.memory import allocator_env, find_jemalloc

    if find_jemalloc() is None:
        raise SystemExit("probe_server_allocator: libjemalloc.so.2 not found (apt-get install libjemalloc2)")
    spec = {k: getattr(a, k) for k in ("dtype", "samples", "batch", "gen_prompts", "gen_batch", "prompt_len",
                                       "new_tokens")}
    if a.smoke:
        import random
        import tempfile

        from draft_trainer.assets import build_tiny_model

        spec.update(model=str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama")), data=None,
                    dtype="fp32", gen_prompts=4, gen_batch=2, new_tokens=4, prompt_len=8)
        rng = random.Random(0)
        spec["seqs"] = [[rng.randrange(1, 500) for _ in range(rng.randrange(16, 40))] for _ in range(8)]
    else:
        from draft_trainer import assets

        if not a.data:
            ap.error("--data DATASET_DIR is required (or --smoke)")
        spec.update(model=a.model or str(assets.fetch_smollm2(install=False)), data=str(Path(a.data).resolve()))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = {m: subprocess.Popen([sys.executable, "-m", "benchmarks.probe_server_allocator", "--worker",
                                  json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=REPO, env=allocator_env(m, env))
             for m in ("glibc", "jemalloc")}
    res = {}
    for m, p in procs.items():
        stdout, stderr = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise SystemExit(f"{m} worker failed: {stderr[-2000:]}")
        res[m] = json.loads(stdout.strip().splitlines()[-1])
    g, j = res["glibc"], res["jemalloc"]
    res["ratios_jemalloc_over_glibc"] = {k: j[k]["tokens_per_cpu_s"] / g[k]["tokens_per_cpu_s"]
                                         for k in ("features", "generate")}
    res["same_outputs"] = g["checksum"] == j["checksum"]
    res["config"] = {k: v for k, v in spec.items() if k != "seqs"}
    text = json.dumps(res, indent=1)
    print(text)
    if not a.smoke:
        (REPO / "benchmarks" / "results" / "probe_server_allocator.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
