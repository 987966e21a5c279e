"""One SpecForge EAGLE-3 training-step measurement, run with SpecForge's own venv python.

Driven by bench_train_step.py as a subprocess (fresh process = honest peak RSS). Imports
SpecForge's model, TTT wrapper and training strategy and feeds them random features, as in
/work/shared/notes/specforge-cpu.md. Its Triton loss kernel has no CPU driver, so its own
pure-torch reference loss (`specforge.core.loss._compute_loss`, same math) is swapped in at run
time; no SpecForge file is modified. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="JSON: dims, B, T, K, steps, warmup, dtype, threads")
    s = json.loads(ap.parse_args().spec)
    import torch

    torch.set_num_threads(s["threads"])
    torch.manual_seed(0)
    from transformers import LlamaConfig

    import specforge.algorithms.eagle3.model as eagle_model_mod
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.core.loss import _compute_loss
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.strategies.base import Eagle3TrainStrategy

    class _TorchLoss:  # its Triton LogSoftmaxLoss has no CPU backend; same math in torch
        apply = staticmethod(_compute_loss)

    eagle_model_mod.LogSoftmaxLoss = _TorchLoss

    d = s["dims"]
    dtype = getattr(torch, s["dtype"])
    cfg = LlamaConfig(hidden_size=d["h"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
                      head_dim=d["head_dim"], intermediate_size=d["ffn"], vocab_size=d["V"], num_hidden_layers=1,
                      rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=False, hidden_act="silu")
    cfg.draft_vocab_size = d["Vd"]
    draft = LlamaForCausalLMEagle3(cfg, attention_backend="sdpa")
    draft.freeze_embedding()
    t2d = torch.zeros(d["V"], dtype=torch.bool)
    used = torch.randperm(d["V"])[: d["Vd"]].sort().values
    t2d[used] = True
    draft.t2d.copy_(t2d)
    draft.d2t.copy_(used - torch.arange(d["Vd"]))
    draft = draft.to(dtype)
    model = OnlineEagle3Model(draft, length=s["K"], attention_backend="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        head = TargetHead(tmp)
    head.fc.weight.data.normal_(0, 0.02)
    head.freeze_weights()
    strategy = Eagle3TrainStrategy(model, target_head=head)
    opt = BF16Optimizer(draft, lr=1e-4, max_grad_norm=0.5, total_steps=1000)

    B, T = s["B"], s["T"]
    g = torch.Generator().manual_seed(1)
    batch = TrainBatch(
        sample_ids=[str(i) for i in range(B)], strategy="eagle3",
        tensors={"input_ids": torch.randint(0, d["V"], (B, T), generator=g),
                 "attention_mask": torch.ones(B, T, dtype=torch.long),
                 "loss_mask": torch.ones(B, T, dtype=torch.long),
                 "hidden_state": torch.randn(B, T, 3 * d["H"], generator=g).to(dtype),
                 "target": torch.randn(B, T, d["H"], generator=g)},
        metadata={"target_repr": "hidden_state"})
    times, cpu = [], []
    warm_s = None
    t_all = time.perf_counter()
    for i in range(s["warmup"] + s["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        out = strategy.forward_loss(batch)
        out.loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i < s["warmup"]:
            continue
        times.append(dt)
        cpu.append(time.process_time() - c0)
        if warm_s is None:
            warm_s = t0 - t_all
    med = statistics.median(times)
    print(json.dumps({"impl": f"specforge-{s['dtype']}", "B": B, "T": T, "step_s": med, "step_s_all": times,
                      "tokens_per_s": B * T / med, "cpu_s": statistics.median(cpu),
                      "tokens_per_cpu_s": B * T / statistics.median(cpu), "warmup_s": warm_s, "loss": float(out.loss.detach()),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
