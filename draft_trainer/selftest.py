"""`draft-trainer selftest`: is this device's fast path right, and how fast is it? (about a minute)

On the user's device (CUDA when present, else CPU): the fused TTT attention against the
readable reference (forward and every parameter gradient), the soft-CE kernel the trainer picks
(Triton on CUDA) against the torch path and against autograd of the definition, and one real
training step (fused TTT + loss + backward + AdamW) with its tokens/s and peak memory. Prints a
table with PASS/FAIL per row; exit status 1 when any row fails.

Legend (shapes): B batch, T sequence length, N rows, V vocabulary.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

# Draft dims per size: "smollm2" is the SmolLM2-135M-sized draft of bench_train_step.py.
SIZES = {
    "tiny": dict(h=64, heads=4, kv=2, d=16, ffn=128, V=512, Vd=256, T=64),
    "small": dict(h=256, heads=4, kv=2, d=64, ffn=512, V=8192, Vd=4096, T=256),
    "smollm2": dict(h=576, heads=9, kv=3, d=64, ffn=1536, V=49152, Vd=32000, T=2048),
}


@dataclass
class Row:
    check: str
    status: str      # PASS | FAIL | SKIP
    value: str
    detail: str = ""


def _cfg(s: dict):
    from draft_trainer.methods.eagle3.config import DraftConfig

    return DraftConfig(hidden_size=s["h"], target_hidden_size=s["h"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["kv"], head_dim=s["d"], intermediate_size=s["ffn"], vocab_size=s["V"],
                       draft_vocab_size=s["Vd"], aux_layer_ids=[0, 1, 2], max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_ttt(device: torch.device, size: dict, tol: float = 1e-4, K: int = 3) -> list[Row]:
    """Fused vs reference TTT in fp32 on `device` (padded batch: one full row, one shorter)."""
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.methods.eagle3.ttt_fused import ttt_forward_fused
    from draft_trainer.model.kernels.flash import kernel_for

    torch.manual_seed(0)
    model = Eagle3Draft(_cfg(size)).to(device)
    T = min(size["T"], 256)
    g = torch.Generator().manual_seed(1)
    aux = torch.randn(2, T, 3 * size["h"], generator=g).to(device)
    ids = torch.randint(0, size["V"], (2, T), generator=g).to(device)
    am = torch.ones(2, T, dtype=torch.long, device=device)
    am[1, T // 2:] = 0
    res = {}
    for name, fn in (("reference", model.ttt_forward), ("fused", lambda *a: ttt_forward_fused(model, *a))):
        model.zero_grad(set_to_none=True)
        outs = fn(aux, ids, K, am)
        sum((o * am[..., None]).sin().sum() for o in outs).backward()
        res[name] = ([o.detach()[am.bool()] for o in outs],
                     {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    fwd = max(_rel(f, r) for f, r in zip(res["fused"][0], res["reference"][0]))
    ref_g, fus_g = res["reference"][1], res["fused"][1]
    same_keys = ref_g.keys() == fus_g.keys()
    grad = max(_rel(fus_g[n], ref_g[n]) for n in ref_g) if same_keys else float("inf")
    kern = kernel_for(aux.new_zeros(1, 1, 1, size["d"])).name
    where = f"B=2 T={T} K={K} fp32, kernel {kern}"
    return [Row("TTT fused vs reference: forward", "PASS" if fwd <= tol else "FAIL", f"rel err {fwd:.1e}", where),
            Row("TTT fused vs reference: gradients", "PASS" if grad <= tol else "FAIL", f"max rel err {grad:.1e}",
                f"{len(ref_g)} parameters" + ("" if same_keys else ", different parameter sets"))]


def check_soft_ce(device: torch.device, size: dict, tol: float = 1e-4) -> list[Row]:
    """The soft-CE backend this device uses, vs the torch path and vs autograd of the definition."""
    from draft_trainer.model.linear_ce import soft_ce_rows_torch
    from draft_trainer.model.kernels.select import soft_ce_backend, triton_import_error

    g = torch.Generator().manual_seed(2)
    N, V = 37, size["Vd"] + 3                      # ragged: not a multiple of any block
    z_NV = (torch.randn(N, V, generator=g) * 3).to(device)
    p_NV = torch.softmax(torch.randn(N, V, generator=g) * 2, -1).to(device)
    zz = z_NV.clone().requires_grad_()
    ce_def = -(p_NV * torch.log_softmax(zz, -1)).sum(-1)
    ce_def.sum().backward()
    z_t = z_NV.clone()
    ce_t, _, _ = soft_ce_rows_torch(z_t, p_NV)
    rows = [Row("soft-CE torch vs definition", "PASS" if max(_rel(ce_t, ce_def), _rel(z_t, zz.grad)) <= tol else "FAIL",
                f"rel err {max(_rel(ce_t, ce_def), _rel(z_t, zz.grad)):.1e}", f"N={N} V={V}")]
    backend = soft_ce_backend(device)
    if backend == "triton":
        from draft_trainer.model.kernels.soft_ce import soft_ce_rows_triton

        z_k = z_NV.clone()
        ce_k, _, _ = soft_ce_rows_triton(z_k, p_NV)
        err = max(_rel(ce_k, ce_t), _rel(z_k, z_t))
        rows.append(Row("soft-CE Triton vs torch", "PASS" if err <= tol else "FAIL", f"rel err {err:.1e}", "the kernel training uses"))
    elif device.type == "cuda":
        rows.append(Row("soft-CE Triton vs torch", "FAIL", "Triton unavailable", triton_import_error() or ""))
    else:
        rows.append(Row("soft-CE Triton vs torch", "SKIP", "-", f"{device.type}: training uses the torch path (checked above)"))
    return rows


def check_train_step(device: torch.device, size: dict, steps: int = 3, K: int = 7) -> list[Row]:
    """Real training steps (fused TTT + loss + backward + clip + AdamW) on random features."""
    from draft_trainer.data.batch import Batch
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.methods.eagle3.step import train_step
    from draft_trainer.model.precision import cast_frozen, compute_dtype

    torch.manual_seed(0)
    model = Eagle3Draft(_cfg(size)).to(device)
    vocab = build_vocab_mapping(torch.randint(0, 1000, (size["V"],)), size["Vd"])
    model.set_vocab_mapping(vocab.d2t.to(device), vocab.t2d.to(device))
    cdt = compute_dtype("auto", device)
    head_VH = cast_frozen(model, (torch.randn(size["V"], size["h"]) * 0.02).to(device), cdt)
    T = size["T"]
    g = torch.Generator().manual_seed(3)
    batch = Batch([0], torch.randint(0, size["V"], (1, T), generator=g), torch.ones(1, T), torch.ones(1, T, dtype=torch.long),
                  torch.randn(1, T, 3 * size["h"], generator=g), teacher_BTH=torch.randn(1, T, size["h"], generator=g)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    used, t2d, t2d_idx = (x.to(device) for x in (vocab.used, vocab.t2d, vocab.target_to_draft))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = train_step(model, batch, head_VH, used, t2d, t2d_idx, K)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        _sync(device)
        if i:                                         # the first step warms up (kernels, allocator)
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    tps = T / statistics.median(times)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB RSS (process)"
    ok = all(torch.isfinite(torch.tensor(losses))) and all(torch.isfinite(p).all() for p in params)
    where = f"T={T} K={K} {str(cdt).replace('torch.', '')}, median of {steps}"
    return [Row("train step: tokens/s", "PASS" if ok else "FAIL", f"{tps:.0f}", where + ("" if ok else ", non-finite loss")),
            Row("train step: peak memory", "PASS" if ok else "FAIL", peak, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_selftest(device: str = "auto", size: str = "auto", steps: int = 3) -> tuple[list[Row], dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if size == "auto":
        size = "smollm2" if dev.type == "cuda" else "small"
    s = SIZES[size]
    if dev.type == "cuda":   # exact fp32 comparisons: no TF32 in the TTT check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = check_ttt(dev, s) + check_soft_ce(dev, s) + check_train_step(dev, s, steps=steps)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return rows, {"device": name, "size": size, "torch": torch.__version__}


def format_table(rows: list[Row], meta: dict) -> str:
    out = [f"SpecRelay selftest on {meta['device']} (draft size {meta['size']}, torch {meta['torch']})", "",
           "| check | status | value | detail |", "|---|---|---|---|"]
    out += [f"| {r.check} | {r.status} | {r.value} | {r.detail} |" for r in rows]
    failed = [r.check for r in rows if r.status == "FAIL"]
    out += ["", "all checks passed" if not failed else f"FAILED: {', '.join(failed)}"]
    return "\n".join(out)


def main(args) -> int:
    rows, meta = run_selftest(args.device, args.size, args.steps)
    print(format_table(rows, meta))
    if args.json:
        from common.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
    return 1 if any(r.status == "FAIL" for r in rows) else 0
