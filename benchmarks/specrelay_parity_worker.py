"""SpecRelay's side of bench_parity_specforge.py: the trainer's own EAGLE-3 objects over the handoff.

Run in a fresh process (honest peak RSS and CPU time) by the benchmark:

    python benchmarks/specrelay_parity_worker.py --spec '{"handoff": ..., "out": ..., "threads": 1}'

What the Trainer does for one rank, step by step (draft_trainer/train/setup.py, loop.py): the
method from the registry (`model.method=eagle3`, precision auto, `model.init=random` with the
run's seed), its `bind` / `prepare` / `loss_counts` / `loss`, AdamW (fused, OptimConfig's betas and
weight decay), `LRSchedule` (schedule=steps: linear warm-up + cosine to 0), clip to grad_clip.
Under jemalloc the pages of large allocations are kept as the trainer keeps them (`keep_large_pages`).
Only the data source differs: batches come from the handoff in its planned order instead of the
sample stream. Saves the initial and final draft tensors (SGLang key names, fp32) and prints one
JSON line with the lr of every step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def serving_state(model) -> dict:
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items() if not k.startswith(("embed_tokens.", "rotary."))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON: handoff, out (directory), threads")
    s = json.loads(ap.parse_args().spec)
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.parity_handoff import batch_at, cpu_seconds, load_handoff, rss_mb, StepMeter, step_tokens
    from common.contract import ModelInfo
    from common.memory import active_allocator, keep_large_pages
    from common.features import FeatureSpec
    from draft_trainer.config import ModelConfig, OptimConfig, TrainConfig
    from draft_trainer.data.batch import Batch
    from draft_trainer.data.vocab import VocabMapping
    from draft_trainer.methods import get_method
    from draft_trainer.model.precision import compute_dtype
    from draft_trainer.train.schedule import LRSchedule

    torch.set_num_threads(s["threads"])
    h = load_handoff(s["handoff"])
    loaded_rss_mb = rss_mb()
    sch = h["schedule"]
    info = ModelInfo(**h["model_info"])
    vocab = VocabMapping(used=h["used_Vd"], vocab_size=info.vocab_size)
    method = get_method("eagle3", ModelConfig(method="eagle3", ttt_steps=sch["ttt_steps"], precision="auto"))
    torch.manual_seed(sch["seed"])  # as setup.build_model: the initial draft from the run's seed
    model = method.build_model(info, vocab, FeatureSpec(layer_ids=tuple(h["draft_config"]["aux_layer_ids"])))
    frozen = {k: v.float() for k, v in h["frozen"].items()}
    method.init_from_target(model, "random", info, vocab, frozen, None, sch["seed"])
    method.bind(model, frozen, vocab, torch.device("cpu"))
    pages_kept = TrainConfig.keep_large_pages and keep_large_pages()   # as train/setup.py does by default
    out = Path(s["out"])
    torch.save({"state": serving_state(model), "used": vocab.used}, out / "specrelay-init.pt")
    params = [p for p in model.parameters() if p.requires_grad]
    o = OptimConfig(lr=sch["lr"], warmup_ratio=(sch["warmup_steps"] + 0.5) / sch["total_steps"], schedule="steps",
                    weight_decay=sch["weight_decay"], grad_clip=sch["grad_clip"])
    betas = tuple(s.get("betas") or o.betas)   # --betas sets both sides; default: the trainer's own
    opt = torch.optim.AdamW(params, lr=o.lr, betas=betas, weight_decay=o.weight_decay, fused=True)
    schedule = LRSchedule(o, sch["total_steps"], 0.0)
    lrs, losses, supervised, first_step_s = [], [], 0, None
    t0, c0 = time.perf_counter(), cpu_seconds()
    meter = StepMeter()
    for step in range(sch["total_steps"]):
        b = batch_at(h, step)
        batch = Batch(list(h["order"][step]), b["input_ids_BT"], b["loss_mask_BT"], b["attention_mask_BT"],
                      b["aux_BT3H"].float(), teacher_BTH=b["teacher_BTH"].float())  # collate()'s fp32
        lr = schedule.lr(step, 0.0)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        targets = method.prepare(batch)
        loss, _ = method.loss(model, batch, targets, normalizers=method.loss_counts(targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        lrs.append(lr)
        losses.append(float(loss.detach()))
        n, m = step_tokens(h, step)
        supervised += m
        meter.step(n)
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
    wall, cpu, tokens = time.perf_counter() - t0, cpu_seconds() - c0, sum(meter.tokens)
    torch.save({"state": serving_state(model), "used": vocab.used}, out / "specrelay-final.pt")
    print(json.dumps({
        "side": "specrelay", "allocator": active_allocator() + (" (large pages kept)" if pages_kept else ""),
        "steps": len(lrs), "tokens": tokens, "supervised_tokens": supervised, "wall_s": wall,
        "cpu_s": cpu, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "first_step_s": first_step_s,
        **meter.by_quarter(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": loaded_rss_mb,
        "lrs": lrs,
        "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "threads": s["threads"],
        "precision": f"auto: compute {compute_dtype('auto', 'cpu')}, fp32 master weights", "betas": list(betas),
        "init": "model.init=random (PyTorch default init), seed " + str(sch["seed"]),
        "init_state": str(out / "specrelay-init.pt"), "final_state": str(out / "specrelay-final.pt")}))


if __name__ == "__main__":
    main()
