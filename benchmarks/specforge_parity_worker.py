"""SpecForge 0.2.0's side of bench_parity_specforge.py (skeleton; run with .venv-specforge's python).

Reads the cached features, builds SpecForge's own `LlamaForCausalLMEagle3` with the same geometry,
`OnlineEagle3Model` (TTT) and `Eagle3TrainStrategy` (loss), as benchmarks/specforge_worker.py
does, loads the target's real lm_head into its TargetHead, trains over the samples in the same
order for the same supervised tokens with the same schedule, and saves the state (SGLang key
names) for the parent to export and evaluate. Prints one JSON line. Not yet run: its API use
follows specforge_worker.py, which was measured; the TargetHead weight load is unverified.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    s = json.loads(ap.parse_args().spec)
    import torch
    from transformers import LlamaConfig

    import specforge.algorithms.eagle3.model as eagle_model_mod
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.core.loss import _compute_loss
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.strategies.base import Eagle3TrainStrategy

    class _TorchLoss:  # its Triton loss has no CPU backend; its pure-torch reference has the same math
        apply = staticmethod(_compute_loss)

    eagle_model_mod.LogSoftmaxLoss = _TorchLoss
    torch.set_num_threads(s["threads"])
    torch.manual_seed(s["seed"])
    feats = torch.load(s["features"])
    d = s["draft_config"]
    cfg = LlamaConfig(hidden_size=d["hidden_size"], num_attention_heads=d["num_attention_heads"],
                      num_key_value_heads=d["num_key_value_heads"], head_dim=d["head_dim"],
                      intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"], num_hidden_layers=1,
                      rms_norm_eps=d["rms_norm_eps"], max_position_embeddings=d["max_position_embeddings"],
                      rope_theta=float(d["rope_parameters"].get("rope_theta", 10000.0)), tie_word_embeddings=False,
                      hidden_act="silu")
    cfg.draft_vocab_size = d["draft_vocab_size"]
    V = d["vocab_size"]
    counts = torch.zeros(V, dtype=torch.long)
    for r in feats["rows"]:
        counts += torch.bincount(r["input_ids"][r["loss_mask"] > 0], minlength=V)
    used = torch.argsort(counts, descending=True, stable=True)[: d["draft_vocab_size"]].sort().values
    draft = LlamaForCausalLMEagle3(cfg, attention_backend="sdpa")
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    draft.t2d.copy_(t2d)
    draft.d2t.copy_(used - torch.arange(d["draft_vocab_size"]))
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(feats["head_VH"])  # tied target (SmolLM2): embedding == head
    draft.freeze_embedding()
    model = OnlineEagle3Model(draft, length=s["ttt_steps"], attention_backend="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        head = TargetHead(tmp)
    head.fc.weight.data.copy_(feats["head_VH"])
    head.freeze_weights()
    strategy = Eagle3TrainStrategy(model, target_head=head)
    steps_total = s["steps_estimate"]
    opt = BF16Optimizer(draft, lr=s["lr"], max_grad_norm=0.5, warmup_ratio=s["warmup"] / steps_total,
                        total_steps=steps_total)
    rows = feats["rows"]
    tokens, step, t0 = 0, 0, time.perf_counter()
    while tokens < s["tokens"]:
        r = rows[step % len(rows)]
        T = r["input_ids"].numel()
        batch = TrainBatch(sample_ids=[str(step)], strategy="eagle3",
                           tensors={"input_ids": r["input_ids"][None], "attention_mask": torch.ones(1, T, dtype=torch.long),
                                    "loss_mask": r["loss_mask"][None].long(), "hidden_state": r["aux"][None].float(),
                                    "target": r["last"][None].float()},
                           metadata={"target_repr": "hidden_state"})
        out = strategy.forward_loss(batch)
        out.loss.backward()
        opt.step()
        tokens += int(r["loss_mask"].sum())
        step += 1
    wall = time.perf_counter() - t0
    state = {k: v.detach().float() for k, v in draft.state_dict().items() if not k.startswith("embed_tokens")}
    torch.save({"state": state, "used": used}, s["state_out"])
    print(json.dumps({"steps": step, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "schedule": f"BF16Optimizer warm-up + cosine ({math.ceil(steps_total)} steps)"}))


if __name__ == "__main__":
    main()
