"""On-policy training data in one call: human chats -> the target's own answers -> a tokenized dataset.

    res = prepare_on_policy(PrepareConfig(model=DIR, inputs=[...], output=OUT, holdout=16, ...),
                            OnPolicyConfig(conversations=600, max_new_tokens=192))
    res.path                 # the dataset of regenerated conversations (train on it)
    res.heldout_prompts      # the held-out prompts of the human split (evaluate on them; never trained on)

`draft-trainer prepare-data --regenerate` and the demo call this. Steps:
1. `prepare-data` of the human chats (the held-out conversations are chosen here, before any
   regeneration, so evaluation prompts are never answered for training);
2. the first user turn of the first `conversations` kept conversations (or all turns with
   `first_turn_only=False`) answered again by the target through `draft-trainer regenerate`
   (batched generation on the servers; failover, accounting and resume are regenerate's);
3. `prepare-data` of the regenerated conversations, with the held-out prompts file copied in.

The answers are cached under the human split's cache key and the generation settings
(`<cache>/onpolicy/<key>/regenerated.jsonl`): a later run with the same data and settings pays
nothing, and an interrupted one resumes where it stopped (regenerate's own resume). Asking for
more conversations than a cached run answered starts from that run's answers: its prompts are the
first ones of the larger set, so only the new ones are generated. Without `targets`, local HF
servers on this machine generate (`servers` x `threads` cores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common.errors import ConfigError
from common.files import atomic_write_json, atomic_write_text
from common.hardware import pick_dtype
from draft_trainer.data.dataset import META_FILE
from draft_trainer.data.prepare import CONVERSATIONS_FILE, HELDOUT_PROMPTS_FILE, PrepareConfig, prepare_data

log = logging.getLogger(__name__)
SPEED_FILE = "regenerated.speed.json"
# The regeneration servers' batch budget. Their HF KV cache gives every row the longest row's columns,
# and the budget bounds rows x the longest (prompt + max new tokens): ~1.5 GB of fp32 KV for SmolLM2-135M
# (46 KB a token). On the demo's 250 prompts: 3.0 GB per server at 1.02x the tokens/s of the earlier 65536
# (4.5 GB); 16384 gave 2.2 GB at 0.84x (benchmarks/results/regen_memory_budget.md).
REGEN_MAX_BATCH_TOKENS = 32768


@dataclass
class OnPolicyConfig:
    conversations: int = 0          # how many kept conversations to answer again (0 = all)
    max_new_tokens: int = 256       # per answer; a longer answer is cut there (still a valid sample)
    first_turn_only: bool = True    # answer only the first user turn (later turns would need later answers)
    thinking: str = "auto"          # enable_thinking for templates that have it
    targets: tuple[str, ...] = ()   # host:port of running servers; empty = local HF servers
    dtype: str = "auto"             # local servers' dtype (the training features' dtype; auto: common.hardware)
    servers: int = 1                # local servers
    threads: int = 0                # torch threads per local server (0 = torch's default)
    batch_size: int = 32            # prompts per Generate request
    concurrency: int = 2            # requests in flight per server
    cache_dir: str = ""             # default: draft_trainer.assets.cache_dir()
    progress: bool = True

    def validate(self) -> None:
        if self.conversations < 0 or self.max_new_tokens < 1 or self.servers < 1 or self.threads < 0:
            raise ConfigError("on-policy data: conversations >= 0, max_new_tokens >= 1, servers >= 1, threads >= 0")
        if self.thinking not in ("auto", "on", "off"):
            raise ConfigError(f"on-policy data: thinking={self.thinking!r}, use auto, on or off")


@dataclass
class OnPolicyResult:
    path: Path                  # the regenerated dataset
    heldout_prompts: Path       # from the human split
    human: object               # PrepareResult of the human split
    answers: Path               # the regenerated conversations (JSONL, the cache)
    report: dict                # regenerate's report ({} when everything was cached)
    conversations: int = 0      # how many were asked for (prepare_on_policy_within picks it)


def first_turns(conversations: Path, n: int, out: Path, first_turn_only: bool = True) -> int:
    """Write the first `n` conversations (0 = all) cut after their first answered user turn (or whole)."""
    rows = []
    with conversations.open(encoding="utf-8") as f:  # by "\n": U+2028 may sit inside a message
        for line in f:
            if not line.strip():
                continue
            msgs = json.loads(line)["messages"]
            if first_turn_only:
                start = 1 if msgs and msgs[0]["role"] == "system" else 0
                if len(msgs) < start + 2 or msgs[start]["role"] != "user" or msgs[start + 1]["role"] != "assistant":
                    continue
                msgs = msgs[: start + 2]
            rows.append({"messages": msgs})
            if len(rows) == n:
                break
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def answers_key(human_key: str, cfg: OnPolicyConfig) -> str:
    """The cache key of the answers: the human split and every setting that changes an answer."""
    pinned = {k: v for k, v in asdict(cfg).items() if k in ("conversations", "max_new_tokens", "first_turn_only",
                                                            "thinking", "dtype")}
    return hashlib.sha256(json.dumps([human_key, pinned], sort_keys=True).encode()).hexdigest()[:20]


def prepare_on_policy(prep: PrepareConfig, cfg: OnPolicyConfig) -> OnPolicyResult:
    from draft_trainer import assets

    cfg.validate()
    # `auto` named before the cache key: answers regenerated in bf16 and in fp32 differ (near-ties)
    cfg = replace(cfg, dtype=pick_dtype(cfg.dtype))
    out = Path(prep.output)
    human = prepare_data(replace(prep, output=str(out / "human")))
    if not (human.path / HELDOUT_PROMPTS_FILE).is_file() and prep.holdout:
        raise ConfigError(f"{human.path} has no {HELDOUT_PROMPTS_FILE}")
    cache = Path(cfg.cache_dir) if cfg.cache_dir else assets.cache_dir() / "onpolicy"
    work = cache / answers_key(human.cache_key, cfg)
    work.mkdir(parents=True, exist_ok=True)
    answers = work / "regenerated.jsonl"
    first = work / "prompts.jsonl"
    if not (work / "prompts_ds" / CONVERSATIONS_FILE).is_file():
        n = first_turns(human.path / CONVERSATIONS_FILE, cfg.conversations, first, cfg.first_turn_only)
        if n == 0:
            raise ConfigError(f"{human.path}: no conversation starts with a user turn answered by the assistant")
        prepare_data(PrepareConfig(model=prep.model, inputs=[str(first)], output=str(work / "prompts_ds"),
                                   max_length=max(prep.max_length, 2048), min_supervised_tokens=1, skip_bad=True,
                                   system_prompt=prep.system_prompt), progress=False)
    _seed_from_smaller(cache, work, human.cache_key, cfg, answers)
    report = _regenerate(prep.model, work, answers, cfg)
    if report.get("written"):   # how fast this machine answered (prepare_on_policy_within sizes from it)
        atomic_write_json(work / SPEED_FILE, {k: report[k] for k in ("written", "wall_s", "tokens_generated",
                                                                     "tokens_per_s")})
    res = prepare_data(replace(prep, inputs=[str(answers)], output=str(out / "onpolicy"), holdout=0, max_samples=0))
    held = human.path / HELDOUT_PROMPTS_FILE
    if held.is_file():
        shutil.copyfile(held, res.path / HELDOUT_PROMPTS_FILE)
    return OnPolicyResult(path=res.path, heldout_prompts=res.path / HELDOUT_PROMPTS_FILE, human=human,
                          answers=answers, report=report, conversations=cfg.conversations)


def prepare_on_policy_within(prep: PrepareConfig, cfg: OnPolicyConfig, budget_s: float) -> OnPolicyResult:
    """`prepare_on_policy` with at most `cfg.conversations` answers: as many as this machine regenerates in
    about `budget_s` seconds (<= 0: all of them).

    A third of them first; then two thirds or all of them, the largest whose time at the speed measured
    on the first third fits the budget (only the new ones are generated: they start from the first
    third's answers). The speed is stored with the answers, so a later run with the same budget makes
    the same choice from the cache and generates nothing. Why: on a CPU without native bf16 the target
    regenerated 3.4x slower (115 vs 393 tokens/s; docs/notes/issue-20.md, sessions 14 and 18): 1,500
    answers took 23 minutes, and the embedded server then computed their features too slowly for the
    20-minute training to finish one epoch."""
    if budget_s <= 0 or cfg.conversations < 3:
        return prepare_on_policy(prep, cfg)
    sizes = sorted({cfg.conversations * k // 3 for k in (1, 2, 3)})
    first = prepare_on_policy(prep, replace(cfg, conversations=sizes[0]))
    speed = _stored_speed(first.answers)
    n = max([sizes[0]] + [k for k in sizes[1:] if speed is not None and k * speed <= budget_s])
    log.info("on-policy answers: %s s each when the first %d were regenerated; %d fit the %.1f-minute budget",
             "?" if speed is None else f"{speed:.2f}", sizes[0], n, budget_s / 60)
    if n == sizes[0]:
        return first
    more = prepare_on_policy(prep, replace(cfg, conversations=n))
    if first.report and more.report:   # one report for both runs of regenerate
        a, b = first.report, more.report
        tokens, wall = a["tokens_generated"] + b["tokens_generated"], a["wall_s"] + b["wall_s"]
        more.report = {**b, "written": a["written"] + b["written"], "tokens_generated": tokens, "wall_s": wall,
                       "tokens_per_s": round(tokens / max(wall, 1e-6), 1)}
    elif first.report:
        more.report = first.report
    return more


def _stored_speed(answers: Path) -> float | None:
    """Seconds per answer when `answers` were regenerated (None: cached by a version that did not store it)."""
    path = answers.with_name(SPEED_FILE)
    if not path.is_file():
        return None
    r = json.loads(path.read_text(encoding="utf-8"))
    return r["wall_s"] / max(r["written"], 1)


def _seed_from_smaller(cache: Path, work: Path, human_key: str, cfg: OnPolicyConfig, answers: Path) -> int:
    """Start a new answers file from the largest cached run that differs only in `conversations`.

    Its prompts are the first ones of ours (`first_turns` keeps the split's order); a record is
    copied only when its prompt conversation is identical here, so nothing stale can slip in.
    Regenerate then answers the rest (its resume pins the prompt set: the meta names ours)."""
    meta_path = answers.with_name(answers.name + ".meta.json")
    if answers.exists() or meta_path.exists() or not cfg.conversations:
        return 0
    mine = _conversations_by_id(work / "prompts_ds" / CONVERSATIONS_FILE)
    for n in range(cfg.conversations - 1, 0, -1):
        old = cache / answers_key(human_key, replace(cfg, conversations=n))
        old_meta = old / (answers.name + ".meta.json")
        if not (old / answers.name).is_file() or not old_meta.is_file():
            continue
        theirs = _conversations_by_id(old / "prompts_ds" / CONVERSATIONS_FILE)
        same = {i for i, msgs in theirs.items() if mine.get(i) == msgs}
        kept = {}
        for name in (answers.name, answers.name + ".skipped.jsonl"):
            src = old / name
            lines = src.read_text(encoding="utf-8").split("\n") if src.is_file() else []
            kept[name] = [x for x in lines if x.strip() and _record_id(x) in same]
        settings = json.loads(old_meta.read_text(encoding="utf-8"))["settings"]
        settings["dataset_cache_key"] = json.loads((work / "prompts_ds" / META_FILE).read_text())["cache_key"]
        # The meta first: a crash before the answers land leaves a valid, empty resume point.
        atomic_write_json(meta_path, {"settings": settings, "dataset": str((work / "prompts_ds").resolve()),
                                      "targets": [], "seeded_from": str(old)})
        for name, rows in kept.items():
            atomic_write_text(work / name, "".join(x + "\n" for x in rows))
        log.info("on-policy answers: %d answered and %d skipped reused from %s (%d conversations); %d to generate",
                 len(kept[answers.name]), len(kept[answers.name + ".skipped.jsonl"]), old, n,
                 len(mine) - sum(map(len, kept.values())))
        return len(kept[answers.name])
    return 0


def _conversations_by_id(path: Path) -> dict[int, list]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:  # by "\n": U+2028 may sit inside a message
        return {int(r["id"]): r["messages"] for r in map(json.loads, filter(str.strip, f))}


def _record_id(line: str) -> int | None:
    try:
        return int(json.loads(line)["id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # a torn line from an interrupted run: that sample is generated again


def _regenerate(model: str, work: Path, answers: Path, cfg: OnPolicyConfig) -> dict:
    from draft_trainer.client.local_server import LocalServer, start_all
    from draft_trainer.regenerate import RegenerateConfig, regenerate

    todo = len((work / "prompts_ds" / CONVERSATIONS_FILE).read_text(encoding="utf-8").split("\n")) - 1
    done = _count_done(answers)
    if done >= todo:
        log.info("on-policy answers: all %d cached in %s", done, answers)
        return {}
    servers = []
    try:
        targets = list(cfg.targets)
        if not targets:
            servers = start_all([LocalServer(["--model", model, "--backend", "hf", "--dtype", cfg.dtype,
                                              "--max-batch-tokens", str(REGEN_MAX_BATCH_TOKENS), "--max-length", "4096"],
                                             threads=cfg.threads) for _ in range(cfg.servers)])
            targets = [s.endpoint for s in servers]
        return regenerate(RegenerateConfig(
            targets=targets, input=str(work / "prompts_ds"), output=str(answers), model=model,
            max_new_tokens=cfg.max_new_tokens, thinking=cfg.thinking, batch_size=cfg.batch_size,
            concurrency=cfg.concurrency, progress=cfg.progress))
    finally:
        for s in servers:
            s.stop()


def _count_done(answers: Path) -> int:
    n = 0
    for p in (answers, answers.with_name(answers.name + ".skipped.jsonl")):
        if p.is_file():
            n += sum(1 for line in p.read_text(encoding="utf-8").split("\n") if line.strip())
    return n
