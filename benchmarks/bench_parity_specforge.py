"""Quality parity with SpecForge (skeleton, issue 20): the same cached features, the same token
budget and schedule, trained by SpecRelay's EAGLE-3 step and by SpecForge 0.2.0's own objects,
both exported in SGLang's format and evaluated by the same lossless evaluator on the same
held-out prompts.

    python -m benchmarks.bench_parity_specforge --data DATASET_DIR [--tokens 300000] [--out DIR]
    python -m benchmarks.bench_parity_specforge --smoke --out runs/bench-smoke      # tiny, seconds

Stages:
  1. features  the target's aux hidden states and final hidden state of every training sample
               (HF target, fp32), written once to <out>/features.pt and reused when the inputs match;
  2. train     each side in its own process (honest peak RSS), over the samples in the same order
               until `--tokens` supervised tokens, AdamW with linear warm-up + cosine decay;
               SpecForge runs in .venv-specforge (benchmarks/specforge_setup.sh sets it up,
               cached; `--setup-specforge` runs it) through benchmarks/specforge_parity_worker.py;
  3. export    both states through draft_trainer.export's serving checks (same vocabulary mapping);
  4. eval      draft_trainer.evaluate.runner.evaluate on the held-out prompts (K, tokens as set).
Reports tau of both and their ratio, training tokens/s and peak RSS. Not run at full size yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import REPO, markdown_table, write_results

SPECFORGE_WORKER = REPO / "benchmarks" / "specforge_parity_worker.py"


# ----------------------------------------------------------------------------- stage 1: features

def _samples(data: Path | None, model_dir: str, max_samples: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, loss mask) per training sample: a prepare-data dataset, or the tiny chats."""
    if data is None:
        from transformers import AutoTokenizer

        from draft_trainer.assets import TINY_CHATS

        tok = AutoTokenizer.from_pretrained(model_dir)
        out = []
        for q, a in TINY_CHATS:
            p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            ids_p = tok(p, add_special_tokens=False)["input_ids"]
            ids_a = tok(a + tok.eos_token, add_special_tokens=False)["input_ids"]
            out.append((ids_p + ids_a, [0] * len(ids_p) + [1] * len(ids_a)))
        return out[:max_samples]
    from draft_trainer.data.dataset import TokenizedDataset  # prepare-data's reader

    ds = TokenizedDataset(data)
    return [(ds[i][1].tolist(), [int(m) for m in ds[i][2].tolist()]) for i in range(min(len(ds), max_samples))]


def features(model_dir: str, samples, aux_ids: list[int], out: Path) -> Path:
    key = hashlib.sha256(json.dumps([model_dir, aux_ids, samples]).encode()).hexdigest()[:16]
    path = out / f"features-{key}.pt"
    if path.is_file():
        return path
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for ids, mask in samples:
            hs = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
            rows.append({"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask, dtype=torch.float32),
                         "aux": torch.cat([hs[i + 1][0] for i in aux_ids], -1).to(torch.bfloat16),
                         "last": hs[-1][0].to(torch.bfloat16)})
    head = target.get_output_embeddings().weight.detach().clone()
    tmp = path.with_suffix(".tmp")
    torch.save({"rows": rows, "head_VH": head, "aux_ids": aux_ids}, tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- stage 2: SpecRelay side

def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))


def train_ours(spec: dict) -> dict:
    """Runs in a fresh process: SpecRelay's train_step over the cached features."""
    from draft_trainer.data.vocab import build_vocab_mapping
    from draft_trainer.methods.eagle3.config import DraftConfig
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.train.batch import Batch
    from draft_trainer.methods.eagle3.step import train_step

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    feats = torch.load(spec["features"])
    cfg = DraftConfig.from_dict(spec["draft_config"])
    counts = torch.zeros(cfg.vocab_size, dtype=torch.long)
    for r in feats["rows"]:
        counts += torch.bincount(r["input_ids"][r["loss_mask"] > 0], minlength=cfg.vocab_size)
    vocab = build_vocab_mapping(counts, cfg.draft_vocab_size)
    model = Eagle3Draft(cfg)
    model.set_vocab_mapping(vocab.d2t, vocab.t2d)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(feats["head_VH"] if spec["tied"] else spec_embed(spec))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.95))
    tokens, step, t0 = 0, 0, time.perf_counter()
    rows = feats["rows"]
    while tokens < spec["tokens"]:
        r = rows[step % len(rows)]
        ids = r["input_ids"][None]
        batch = Batch([step], ids, r["loss_mask"][None], torch.ones_like(ids), r["aux"][None].float(),
                      teacher_BTH=r["last"][None].float())
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec["steps_estimate"], spec["lr"], spec["warmup"])
        loss, _ = train_step(model, batch, feats["head_VH"], vocab.used, vocab.t2d, vocab.target_to_draft,
                             spec["ttt_steps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        tokens += int(r["loss_mask"].sum())
        step += 1
    wall = time.perf_counter() - t0
    state = {k: v.detach() for k, v in model.state_dict().items()}
    torch.save({"state": state, "used": vocab.used}, spec["state_out"])
    return {"steps": step, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spec_embed(spec: dict) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec["model_dir"]).get_input_embeddings().weight.detach()


def _spawn(cmd: list[str], timeout: float) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- stages 3-4

def export_state(state_path: Path, cfg, out: Path) -> Path:
    from safetensors.torch import save_file

    from draft_trainer.data.vocab import VocabMapping
    from draft_trainer.export import TrainedDraft
    from draft_trainer.methods.eagle3.export import WEIGHT_FILE, load_exported, serving_tensors, sglang_config

    saved = torch.load(state_path)
    vocab = VocabMapping(used=saved["used"], vocab_size=cfg.vocab_size)
    tensors = serving_tensors(TrainedDraft(cfg=cfg, state=saved["state"], vocab=vocab, path=state_path))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHT_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(sglang_config(cfg), indent=2))
    load_exported(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help="a prepare-data dataset directory (its heldout_prompts.jsonl is evaluated)")
    p.add_argument("--target-model", help="default: cached SmolLM2-135M-Instruct (draft-trainer assets fetch)")
    p.add_argument("--tokens", type=int, default=300_000, help="supervised training tokens per side")
    p.add_argument("--max-samples", type=int, default=4000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ttt-steps", type=int, default=5)
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--num-steps", type=int, default=5, help="K in the evaluation")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--setup-specforge", action="store_true", help="run benchmarks/specforge_setup.sh first")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", help="work and results directory")
    p.add_argument("--timeout", type=float, default=6 * 3600)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(train_ours(json.loads(args.worker))))
        return 0
    from common.contract import ModelInfo, default_aux_layers
    from draft_trainer.evaluate.runner import evaluate
    from draft_trainer.methods.eagle3.config import DraftConfig

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-parity-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from draft_trainer.assets import TINY_CHATS, build_tiny_model

        model_dir = str(build_tiny_model(out / "tiny-llama", "llama"))
        args.tokens, args.max_new_tokens, args.draft_vocab_size, args.threads = 400, 12, 256, 1
        prompts = out / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in TINY_CHATS[:3]))
        data = None
    else:
        if not args.data:
            p.error("--data DATASET_DIR is required (or --smoke)")
        from draft_trainer import assets

        model_dir = args.target_model or str(assets.fetch_smollm2(install=False))
        data = Path(args.data)
        prompts = data / "heldout_prompts.jsonl"
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_dir)
    aux = default_aux_layers(hf.num_hidden_layers)
    info = ModelInfo(architecture="LlamaForCausalLM", model_type=hf.model_type, num_layers=hf.num_hidden_layers,
                     hidden_size=hf.hidden_size, vocab_size=hf.vocab_size, aux_layer_ids=aux, dtype="fp32",
                     max_length=hf.max_position_embeddings, tokenizer_fingerprint="", model_name=model_dir,
                     hf_config_json=hf.to_json_string())
    cfg = DraftConfig.from_model_info(info, draft_vocab_size=min(args.draft_vocab_size, hf.vocab_size))
    t0 = time.perf_counter()
    feat_path = features(model_dir, _samples(data, model_dir, args.max_samples), aux, out)
    feat_s = time.perf_counter() - t0
    mean_len = 64  # steps_estimate only shapes the cosine; both sides get the same value
    spec = {"features": str(feat_path), "draft_config": cfg.to_dict(), "tokens": args.tokens, "lr": args.lr,
            "warmup": 10, "steps_estimate": max(args.tokens // mean_len, 20), "ttt_steps": args.ttt_steps,
            "threads": args.threads, "seed": 0, "tied": bool(getattr(hf, "tie_word_embeddings", False)),
            "model_dir": model_dir}
    results = {}
    sides = {"specrelay": [sys.executable, "-m", "benchmarks.bench_parity_specforge", "--worker"]}
    sf_python = REPO / ".venv-specforge" / "bin" / "python"
    if args.setup_specforge:
        subprocess.run([str(REPO / "benchmarks" / "specforge_setup.sh")], check=True, cwd=REPO)
    if sf_python.is_file():
        sides["specforge"] = [str(sf_python), str(SPECFORGE_WORKER), "--spec"]
    else:
        results["specforge"] = {"skipped": "no .venv-specforge: run benchmarks/specforge_setup.sh "
                                           "(or pass --setup-specforge)"}
    for name, cmd in sides.items():
        s = dict(spec, state_out=str(out / f"{name}-state.pt"))
        r = _spawn(cmd + [json.dumps(s)], args.timeout)
        if "error" not in r:
            d = export_state(out / f"{name}-state.pt", cfg, out / f"{name}-export")
            ev = evaluate(model_dir, d, prompts, num_steps=args.num_steps, max_new_tokens=args.max_new_tokens)
            r.update(tau=ev["tau"], lossless=ev["lossless"], accept_rate_per_position=ev["accept_rate_per_position"],
                     prompt_lookup_tau=ev["prompt_lookup"]["tau"])
        results[name] = r
    ours, theirs = results.get("specrelay", {}), results.get("specforge", {})
    ratio = ours["tau"] / theirs["tau"] if "tau" in ours and "tau" in theirs else None
    rows = [{"side": k, "tau": v.get("tau", v.get("error") or v.get("skipped")), "tokens": v.get("tokens", ""),
             "tokens/s": v.get("tokens_per_s", ""), "peak RSS MB": v.get("peak_rss_mb", ""), "steps": v.get("steps", "")}
            for k, v in results.items()]
    data_out = {"config": {**{k: v for k, v in spec.items() if k != "draft_config"}, "smoke": args.smoke,
                           "prompts": str(prompts), "features_s": feat_s},
                "results": results, "tau_ratio_specrelay_over_specforge": ratio}
    write_results("parity_specforge" + ("_smoke" if args.smoke else ""), data_out,
                  markdown_table(rows, list(rows[0])) + f"\n\ntau ratio (SpecRelay / SpecForge): {ratio}",
                  out if args.smoke else None)
    return 1 if "error" in ours else 0


if __name__ == "__main__":
    sys.exit(main())
