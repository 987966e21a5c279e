"""SpecForge 0.2.0's side of bench_parity_specforge.py, run with SpecForge's venv python.

    $SPECFORGE_VENV/bin/python benchmarks/specforge_parity_worker.py --spec '{"handoff": ..., "out": ..., ...}'

SpecForge's own objects, assembled the way its trainer assembles them (specforge/training/
assembly.py, backend.py, strategies/base.py; read in the 0.2.0 wheel):
- `LlamaForCausalLMEagle3(config, attention_backend="sdpa")` from a LlamaConfig of the same
  geometry (its `post_init` = HF's normal(0, initializer_range) init, under the run's seed); the
  embedding copied from the target (what `load_embedding` reads) and frozen (`freeze_embedding`);
  `t2d`/`d2t` from the handoff's draft vocabulary (the same mapping SpecRelay trains with);
  `norm_output` left at SpecForge's default (logits read norm(h), the next step reads h: EAGLE-3);
- `TargetHead` built from that config, its `fc` loaded with the target's lm_head, frozen, eval,
  bf16 (what `TargetHead.from_pretrained` does; from_pretrained itself needs an index.json and an
  untied lm_head key, which SmolLM2's single tied checkpoint has not);
- `OnlineEagle3Model(draft, length=ttt_steps)`, `Eagle3TrainStrategy(model, target_head=head)`
  (ploss_decay 0.8, target_repr "hidden_state": the head re-projects the stored final hidden);
- each sample through its offline normalizer (`normalize_offline_sample`: the last position
  unsupervised), then right-padded with zeros and concatenated: what its `DataCollatorWithPadding`
  does at sequence-parallel degree 1 (`collate` below; its module imports HF `datasets` at load,
  which the training objects do not need and the venv does not carry);
- `BF16Optimizer(draft, lr, weight_decay, max_grad_norm, total_steps, warmup_ratio,
  lr_scheduler="cosine")`: AdamW over fp32 masters, clip, `CosineAnnealingWarmupLR`.
  warmup_ratio is passed so that its int(ratio * total) equals the handoff's warmup_steps;
- the draft in bf16 by default ("dtype": its trainer computes in bf16 under FSDP
  MixedPrecision(param_dtype=bf16) with fp32 masters in BF16Optimizer; FSDP itself needs a
  process group and is left out for one CPU rank), or float32.
Two CPU stand-ins, no SpecForge file modified: its Triton loss kernel has no CPU driver, so its
pure-torch reference `_compute_loss` (same math) replaces `LogSoftmaxLoss` in the model module;
flex attention has no CPU backward, so the "sdpa" backend runs.

Saves the initial and final draft tensors (SGLang key names, fp32), the initial fp32 draft's logits
of every TTT step on batch 0 (the parent's model check), and prints one JSON line with the lr of
every step (read from its optimizer before each step).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# SpecRelay's serving keys (draft_trainer/methods/eagle3/export.py expected_shapes, EAGLE-3 without fc_norm).
SERVING_KEYS = ("fc.weight", "midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight",
                "midlayer.post_attention_layernorm.weight", "midlayer.self_attn.q_proj.weight",
                "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
                "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
                "midlayer.mlp.down_proj.weight", "norm.weight", "lm_head.weight", "d2t", "t2d")


def serving_state(draft) -> dict:
    sd = draft.state_dict()
    missing = [k for k in SERVING_KEYS if k not in sd]
    if missing:
        raise SystemExit(f"SpecForge's draft has no {missing}: its key names changed; update SERVING_KEYS")
    return {k: sd[k].detach().float().clone() if sd[k].is_floating_point() else sd[k].detach().clone()
            for k in SERVING_KEYS}


def collate(feats: list[dict]) -> dict:
    """DataCollatorWithPadding.__call__ at sp_degree 1: every [1, n, ...] tensor zero-padded on
    the right to the longest n and concatenated over the batch."""
    import torch

    T = max(f["input_ids"].shape[1] for f in feats)

    def pad(x):
        return torch.cat([x, x.new_zeros((x.shape[0], T - x.shape[1], *x.shape[2:]))], dim=1)

    return {k: torch.cat([pad(f[k]) for f in feats]) for k in feats[0]}


def llama_config(d: dict):
    from transformers import LlamaConfig

    if d.get("fc_norm") or d.get("norm_output"):
        raise SystemExit("the parity benchmark compares EAGLE-3 (not 3.1) drafts: fc_norm/norm_output must be off")
    cfg = LlamaConfig(hidden_size=d["hidden_size"], num_attention_heads=d["num_attention_heads"],
                      num_key_value_heads=d["num_key_value_heads"], head_dim=d["head_dim"],
                      intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"], num_hidden_layers=1,
                      rms_norm_eps=d["rms_norm_eps"], max_position_embeddings=d["max_position_embeddings"],
                      rope_parameters=dict(d["rope_parameters"]), tie_word_embeddings=False,
                      hidden_act=d["hidden_act"])
    cfg.draft_vocab_size = d["draft_vocab_size"]
    cfg.target_hidden_size = d["target_hidden_size"]
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON: handoff, out (directory), threads, dtype")
    s = json.loads(ap.parse_args().spec)
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(HERE.parent))   # common.memory (stdlib only): which malloc this process runs on
    import torch

    import specforge.algorithms.eagle3.model as eagle_model_mod
    from common.memory import active_allocator
    from parity_handoff import cpu_seconds, load_handoff, rss_mb, StepMeter, step_tokens
    from specforge.algorithms.eagle3.data import normalize_offline_sample
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.core.loss import _compute_loss
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.strategies.base import Eagle3TrainStrategy

    class _TorchLoss:  # its Triton LogSoftmaxLoss has no CPU backend; its pure-torch reference has the same math
        apply = staticmethod(_compute_loss)

    eagle_model_mod.LogSoftmaxLoss = _TorchLoss
    torch.set_num_threads(s["threads"])
    h = load_handoff(s["handoff"])
    loaded_rss_mb = rss_mb()
    sch, d = h["schedule"], h["draft_config"]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[s.get("dtype", "bfloat16")]
    cfg = llama_config(d)
    torch.manual_seed(sch["seed"])
    draft = LlamaForCausalLMEagle3(cfg, attention_backend="sdpa")
    used = h["used_Vd"]
    t2d = torch.zeros(d["vocab_size"], dtype=torch.bool)
    t2d[used] = True
    with torch.no_grad():
        draft.t2d.copy_(t2d)
        draft.d2t.copy_(used - torch.arange(used.numel()))
        draft.embed_tokens.weight.copy_(h["frozen"]["embed_tokens"].float())
    draft.freeze_embedding()
    out = Path(s["out"])
    torch.save({"state": serving_state(draft), "used": used}, out / "specforge-init.pt")
    model = OnlineEagle3Model(draft, length=sch["ttt_steps"], attention_backend="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        head = TargetHead(tmp)
    with torch.no_grad():
        head.fc.weight.copy_(h["frozen"]["lm_head"].float())
    head.freeze_weights()
    head = head.eval().to(torch.bfloat16)
    strategy = Eagle3TrainStrategy(model, target_head=head)

    def make_batch(step: int, aux_dtype) -> TrainBatch:
        feats = []
        for j in h["order"][step]:
            r = h["rows"][j]
            feats.append(normalize_offline_sample({"aux_hidden_state": r["aux_T3H"][None].to(aux_dtype),
                                                   "hidden_state": r["teacher_TH"][None].to(torch.bfloat16),
                                                   "input_ids": r["input_ids_T"], "loss_mask": r["loss_mask_T"].long()},
                                                  max_len=r["input_ids_T"].numel()))
        return TrainBatch(sample_ids=[str(j) for j in h["order"][step]], strategy="eagle3", tensors=collate(feats),
                          metadata={"target_repr": "hidden_state"})

    # The model check: SpecForge's per-TTT-step logits of the initial fp32 draft on batch 0, for the
    # parent to recompute with SpecRelay's Eagle3Draft loaded from specforge-init.pt (same weights).
    recorded = []
    compute_logits = draft.compute_logits
    draft.compute_logits = lambda hidden: recorded.append(compute_logits(hidden)) or recorded[-1]
    with torch.no_grad():
        strategy.forward_loss(make_batch(0, torch.float32))
    del draft.compute_logits
    torch.save({"logits_KBTV": torch.stack([x.float() for x in recorded])}, out / "specforge-check.pt")
    draft.to(dtype)  # in place: the TTT wrapper holds this module
    total, warm = sch["total_steps"], sch["warmup_steps"]
    opt = BF16Optimizer(draft, lr=sch["lr"], weight_decay=sch["weight_decay"], max_grad_norm=sch["grad_clip"],
                        total_steps=total, warmup_ratio=(warm + 0.5) / total, lr_scheduler="cosine")
    if s.get("betas"):   # --betas sets both sides; default: BF16Optimizer's AdamW defaults
        for g in opt.optimizer.param_groups:
            g["betas"] = tuple(s["betas"])
    if opt.scheduler.warmup_epochs != warm:
        raise SystemExit(f"BF16Optimizer warm-up {opt.scheduler.warmup_epochs} steps != planned {warm}")
    lrs, losses, supervised, first_step_s = [], [], 0, None
    t0, c0 = time.perf_counter(), cpu_seconds()
    meter = StepMeter()
    for step in range(total):
        batch = make_batch(step, dtype)
        lrs.append(opt.get_learning_rate())
        result = strategy.forward_loss(batch)
        result.loss.backward()
        opt.step()
        losses.append(float(result.loss.detach()))
        n, m = step_tokens(h, step)
        supervised += m
        meter.step(n)
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
    wall, cpu, tokens = time.perf_counter() - t0, cpu_seconds() - c0, sum(meter.tokens)
    torch.save({"state": serving_state(draft), "used": used}, out / "specforge-final.pt")
    from importlib.metadata import version

    print(json.dumps({
        "side": "specforge", "allocator": active_allocator(),
        "steps": len(lrs), "tokens": tokens, "supervised_tokens": supervised, "wall_s": wall,
        "cpu_s": cpu, "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "first_step_s": first_step_s,
        **meter.by_quarter(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": loaded_rss_mb,
        "lrs": lrs,
        "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "threads": s["threads"],
        "precision": f"draft {str(dtype).replace('torch.', '')}, fp32 masters (BF16Optimizer)",
        "betas": list(opt.optimizer.param_groups[0]["betas"]),
        "init": f"LlamaForCausalLMEagle3.post_init (normal, std {cfg.initializer_range}), seed {sch['seed']}",
        "specforge": version("specforge"), "torch": torch.__version__,
        "init_state": str(out / "specforge-init.pt"), "final_state": str(out / "specforge-final.pt"),
        "check_logits": str(out / "specforge-check.pt")}))


if __name__ == "__main__":
    main()
