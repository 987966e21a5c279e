"""The trainer side of the data plane, before and after FP8 zero-copy, side by side in one process:
Arrow record batches as the client receives them -> samples -> the padded fp32 training batch.

    python -m benchmarks.bench_fp8_collate --before 1082ed4      # H=1024, 4 x 256 tokens per batch

Paths (the same record batches, encoded once; rounds alternate; medians of process CPU time,
which a shared box disturbs less than wall time):
  bf16 before / after     decode (zero-copy views) + collate (bf16 cast-copied into fp32): the
                          default path must not get slower
  fp8 before              the earlier client: decode_batch upcasts e4m3 -> served dtype (a new
                          tensor), then collate copies that into the fp32 batch
  fp8 after               decode keeps Fp8Rows (views), collate upcasts straight into the batch
  fp8 after, staged       what collate builds for an accelerator: padded e4m3 bytes + scales (the
                          host-to-device copy and the device upcast are not run here: no GPU)
  fp8 encode before/after the server's side on CPU: encode_batch of the same rows as fp8 (the cast)
The "before" modules (common/fp8.py, common/features.py, draft_trainer/data/batch.py) are loaded
from git at --before. Network and server are out of this (bench_dataplane measures them).
Writes benchmarks/results/bench_fp8_collate.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from benchmarks.harness import load_module_at, markdown_table, median, write_results


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision of the earlier client code")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256, help="longest sample (others shorter: padding)")
    ap.add_argument("--samples", type=int, default=4, help="samples per batch")
    ap.add_argument("--batches", type=int, default=8, help="batches per round and path")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()[0]
    from common.features import FeatureSchema, FeatureSpec, SampleFeatures, decode_batch, encode_batch
    from draft_trainer.data.batch import PaddedRows, collate

    old_fp8 = load_module_at(a.before, "common/fp8.py", "before_fp8")
    old_features = load_module_at(a.before, "common/features.py", "before_features")
    old_features.dequantize_e4m3 = old_fp8.dequantize_e4m3   # its codec with its own cast and upcast
    old_features.quantize_e4m3 = old_fp8.quantize_e4m3
    old_batch = load_module_at(a.before, "draft_trainer/data/batch.py", "before_batch")

    H, S, T = a.hidden, a.samples, a.seq_len
    lengths = [T - (i * T) // (2 * S) for i in range(S)]      # ragged: T, then shorter
    g = torch.Generator().manual_seed(0)
    rows = [SampleFeatures(i, 0, n, (torch.randn(n, 3 * H, generator=g) * 3).to(torch.bfloat16),
                           torch.randn(n, H, generator=g).to(torch.bfloat16)) for i, n in enumerate(lengths)]
    spec8 = FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3", "teacher": "float8_e4m3"})
    b16 = [encode_batch(FeatureSchema.for_spec(FeatureSpec((0, 1, 2)), H, "bfloat16"), rows)] * a.batches
    schema8 = FeatureSchema.for_spec(spec8, H, "bfloat16")
    b8 = [encode_batch(schema8, rows)] * a.batches
    samples = [(i, np.zeros(n, np.int64), np.ones(n, np.float32)) for i, n in enumerate(lengths)]

    def staged(feats):
        for xs in ([f.aux_T3H for f in feats], [f.teacher_TH for f in feats]):
            pad = PaddedRows(len(feats), T, xs[0], torch.float32, fp8=True)
            for b, x in enumerate(xs):
                pad.put(b, x)

    paths = {
        "bf16_before": lambda rb: old_batch.collate(samples, old_features.decode_batch(rb)),
        "bf16_after": lambda rb: collate(samples, decode_batch(rb, keep_fp8=True)),
        "fp8_before": lambda rb: old_batch.collate(samples, old_features.decode_batch(rb)),
        "fp8_after": lambda rb: collate(samples, decode_batch(rb, keep_fp8=True)),
        "fp8_after_staged": lambda rb: staged(decode_batch(rb, keep_fp8=True)),
        "fp8_encode_before": lambda _: old_features.encode_batch(schema8, rows),
        "fp8_encode_after": lambda _: encode_batch(schema8, rows),
    }
    inputs = {k: (b8 if k.startswith("fp8") else b16) for k in paths}
    assert old_features.encode_batch(schema8, rows).equals(b8[0])   # the same bytes and scales
    # the batches agree before timing anything
    ref = collate(samples, decode_batch(b8[0]))
    assert torch.equal(paths["fp8_after"](b8[0]).aux_BT3H, ref.aux_BT3H)
    assert torch.equal(paths["fp8_before"](b8[0]).aux_BT3H, ref.aux_BT3H)
    assert torch.equal(paths["bf16_after"](b16[0]).aux_BT3H, paths["bf16_before"](b16[0]).aux_BT3H)
    cpu = {k: [] for k in paths}
    wall = {k: [] for k in paths}
    names = list(paths)
    for r in range(a.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            c0, w0 = time.process_time(), time.perf_counter()
            for rb in inputs[k]:
                paths[k](rb)
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    tokens = sum(lengths) * a.batches
    tps = {k: tokens / median(v) for k, v in cpu.items()}
    wire = {"bf16": b16[0].nbytes / sum(lengths), "fp8": b8[0].nbytes / sum(lengths)}
    rows_md = []
    for k in names:
        base = "bf16_before" if k.startswith("bf16") else "fp8_encode_before" if "encode" in k else "fp8_before"
        rows_md.append({"path": k.replace("_", " "), "tokens/s (CPU time)": f"{tps[k]:.0f}",
                        "Arrow bytes/token": f"{wire['bf16' if k.startswith('bf16') else 'fp8']:.0f}",
                        "vs before": f"{tps[k] / tps[base]:.2f}x", "vs bf16 after": "" if "encode" in k else f"{tps[k] / tps['bf16_after']:.2f}x"})
    desc = (f"H={H}, aux 3H + teacher H, served bf16, {S} samples per batch ({lengths} tokens, padded to {T}), "
            f"{a.batches} batches per round and path, {a.rounds} rounds alternating, {a.threads} thread(s), "
            f"median process CPU time; before = {a.before}. Load average at start {load_start:.1f}.")
    table = desc + "\n\n" + markdown_table(rows_md, ["path", "tokens/s (CPU time)", "Arrow bytes/token", "vs before",
                                                     "vs bf16 after"])
    data = {"config": vars(a), "cpu_s": cpu, "wall_s": wall, "tokens_per_cpu_s": tps, "bytes_per_token": wire,
            "ratios": {"bf16_after_vs_before": tps["bf16_after"] / tps["bf16_before"],
                       "fp8_after_vs_before": tps["fp8_after"] / tps["fp8_before"],
                       "fp8_after_vs_bf16_after": tps["fp8_after"] / tps["bf16_after"],
                       "fp8_staged_vs_bf16_after": tps["fp8_after_staged"] / tps["bf16_after"],
                       "fp8_encode_after_vs_before": tps["fp8_encode_after"] / tps["fp8_encode_before"]},
            "load_avg_start": load_start}
    write_results("bench_fp8_collate", data, table, a.out)
    return data


if __name__ == "__main__":
    main()
