"""`draft-trainer regenerate`: answer every user turn again with the target model.

    report = regenerate(RegenerateConfig(targets=[...], input=DATASET_DIR, output=FILE))

A draft learns the distribution it is trained on; training on the target's own answers raises
acceptance. Input: the kept conversations of a prepared dataset (`conversations.jsonl`).
Each assistant turn without tool calls is replaced, in order, by what the target generates for
the conversation so far (later turns see the regenerated earlier ones). Tool-call turns and
tool results are kept: the results depend on those exact calls.

Work is batched (several prompts per Generate request) and spread over every server with
`concurrency` requests in flight per server; a failed request goes back in the queue (bounded
attempts). Output is append-only JSON Lines in OpenAI messages form (valid prepare-data input),
one line per finished conversation. A re-run with the same settings skips the ids already
written (a torn last line from a crash is cut off first), so a crash loses at most the
conversations in flight. `<output>.meta.json` pins the settings and holds the last report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.contract import check_compatible, tokenizer_fingerprint
from common.errors import ConfigError, ContractError, DataError, SpecRelayError, TargetUnavailableError
from draft_trainer.client.target import TargetClient
from draft_trainer.data.chat import ChatEncoder
from draft_trainer.data.dataset import META_FILE
from draft_trainer.data.formats import BadRecord, FileReport, normalize, read_records
from draft_trainer.data.prepare import CONVERSATIONS_FILE, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class RegenerateConfig:
    targets: list[str]
    input: str                     # dataset directory written by prepare-data
    output: str                    # JSONL, appended to
    model: str | None = None       # tokenizer directory; default: the dataset's
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    concurrency: int = 2           # requests in flight per server
    batch_size: int = 8            # prompts per Generate request
    seed: int = 0
    request_timeout_s: float = 600.0
    max_attempts: int = 5          # per conversation turn, across servers
    progress: bool = True

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("--targets: give at least one host:port")
        if self.max_new_tokens < 1 or self.concurrency < 1 or self.batch_size < 1 or self.max_attempts < 1:
            raise ConfigError("--max-new-tokens, --concurrency, --batch-size must be >= 1")
        if self.temperature < 0 or not 0 <= self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in [0, 1]")

    def pinned(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run that started the output file."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}


@dataclass
class _Job:
    sid: int
    record: dict[str, Any]
    messages: list[dict[str, Any]]
    turns: list[int]               # indices of the assistant messages to regenerate
    next: int = 0
    attempts: int = 0
    finish: list[str] = field(default_factory=list)
    cut: bool = False
    skip_reason: str | None = None


@dataclass
class _ServerStats:
    requests: int = 0
    prompts: int = 0
    tokens: int = 0
    errors: int = 0


class _Run:
    """Shared state of one regeneration: queues, counters, the failure that stops everyone."""

    def __init__(self, cfg: RegenerateConfig, encoder: ChatEncoder, max_length: int, total: int) -> None:
        self.cfg, self.encoder, self.max_length = cfg, encoder, max_length
        self.ready: queue.Queue[_Job] = queue.Queue()
        self.done: queue.Queue[_Job] = queue.Queue()
        self.stop = threading.Event()
        self.fatal: BaseException | None = None
        self.remaining = total
        self.lock = threading.Lock()
        self.servers: dict[str, _ServerStats] = {}
        self.last_progress = time.monotonic()

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.fatal is None:
                self.fatal = e
        self.stop.set()

    def _take(self) -> list[_Job]:
        try:
            batch = [self.ready.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < self.cfg.batch_size:
            try:
                batch.append(self.ready.get_nowait())
            except queue.Empty:
                break
        return batch

    def _prompt(self, job: _Job) -> list[int] | None:
        """Prompt ids for the job's next turn, or None when the job ends here (too long)."""
        i = job.turns[job.next]
        ids = self.encoder.prompt_ids(job.messages[:i], job.record.get("tools"))
        if len(ids) + self.cfg.max_new_tokens <= self.max_length:
            return ids
        if job.next == 0:
            job.skip_reason = "prompt_too_long"
        else:  # keep the turns regenerated so far
            job.messages = job.messages[: job.turns[job.next - 1] + 1]
            job.cut = True
        return None

    def worker(self, client: TargetClient) -> None:
        with self.lock:
            st = self.servers.setdefault(client.endpoint, _ServerStats())
        backoff = 0.5
        while not self.stop.is_set():
            batch = self._take()
            if not batch:
                continue
            prompts, live = [], []
            for job in batch:
                try:
                    ids = self._prompt(job)
                except Exception as e:  # noqa: BLE001 - a template error here is a bug in the data
                    self.fail(DataError(f"sample {job.sid}: cannot render the prompt: {e}"))
                    return
                if ids is None:
                    self.done.put(job)
                else:
                    prompts.append((str(job.sid), ids))
                    live.append(job)
            if not live:
                continue
            seed = int.from_bytes(hashlib.sha256(f"{self.cfg.seed}:{live[0].sid}:{live[0].next}".encode()).digest()[:8], "little")
            try:
                outs = client.generate(prompts, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                       top_p=self.cfg.top_p, seed=seed, stop_token_ids=self.encoder.eot_token_ids,
                                       timeout_s=self.cfg.request_timeout_s)
            except SpecRelayError as e:
                with self.lock:
                    st.errors += 1
                log.warning("Generate on %s failed (%s); re-queueing %d conversations", client.endpoint, e, len(live))
                for job in live:
                    job.attempts += 1
                    if job.attempts >= self.cfg.max_attempts:
                        self.fail(TargetUnavailableError(
                            f"sample {job.sid}: Generate failed {job.attempts} times (last: {e}); the output so far "
                            "is kept: re-run the same command to resume"))
                        return
                    self.ready.put(job)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            by_id = {cid: (tokens, reason) for cid, tokens, reason in outs}
            with self.lock:
                st.requests += 1
                st.prompts += len(live)
                st.tokens += sum(len(t) for t, _ in by_id.values())
            for job in live:
                tokens, reason = by_id[str(job.sid)]
                if reason == "stop" and tokens and tokens[-1] in self.encoder.eot_token_ids:
                    tokens = tokens[:-1]
                text = self.encoder.tokenizer.decode(tokens, skip_special_tokens=True)
                job.messages[job.turns[job.next]] = {"role": "assistant", "content": text}
                job.finish.append(reason)
                job.next += 1
                job.attempts = 0
                (self.done if job.next == len(job.turns) else self.ready).put(job)
            self.last_progress = time.monotonic()


def _load_conversations(dataset: Path) -> list[dict[str, Any]]:
    path = dataset / CONVERSATIONS_FILE
    if not path.is_file():
        raise DataError(f"{dataset} has no {CONVERSATIONS_FILE}: give a dataset directory written by "
                        "`draft-trainer prepare-data` (re-run it if the dataset is older)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                int(rec["id"]), rec["messages"]  # noqa: B018 - shape check
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise DataError(f"{path}:line {n}: not a prepare-data conversation record; re-run prepare-data") from None
            out.append(rec)
    return out


def _resume_state(output: Path, pinned: dict[str, Any]) -> set[int]:
    """Ids already in the output (cutting off a torn last line); checks the pinned settings."""
    meta_path = output.with_name(output.name + ".meta.json")
    if meta_path.is_file():
        old = json.loads(meta_path.read_text()).get("settings")
        if old != pinned:
            raise ConfigError(f"{output} was started with settings {old}, now {pinned}; use the same settings to "
                              "resume, or a new --output file")
    elif output.exists() and output.stat().st_size:
        raise ConfigError(f"{output} exists but was not written by `regenerate` (no {meta_path.name}); "
                          "choose a new --output file")
    done: set[int] = set()
    if not output.exists():
        return done
    with open(output, "rb+") as f:
        good = 0
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                done.add(int(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                break
            good += len(line)
        size = f.seek(0, os.SEEK_END)
        if good < size:
            log.warning("%s: cutting off %d bytes of a record torn by an interrupted run", output, size - good)
            f.truncate(good)
    return done


def _validate_output(output: Path) -> dict[str, Any]:
    """Read the output back as prepare-data would: every record must normalize."""
    rep = FileReport(str(output), "")
    valid, bad, ids = 0, 0, Counter()
    for rec in read_records(output, rep):
        try:
            normalize(rec)
            valid += 1
            ids[rec.raw.get("id")] += 1
        except BadRecord as e:
            bad += 1
            log.error("invalid output record %s", e)
    return {"records": rep.records, "valid": valid, "bad": bad, "duplicate_ids": sum(c - 1 for c in ids.values() if c > 1)}


def regenerate(cfg: RegenerateConfig) -> dict[str, Any]:
    cfg.validate()
    t0 = time.perf_counter()
    dataset, output = Path(cfg.input), Path(cfg.output)
    if not (dataset / META_FILE).is_file():
        raise DataError(f"--input {dataset}: not a prepared dataset directory (no {META_FILE})")
    meta = json.loads((dataset / META_FILE).read_text())
    model = cfg.model or meta.get("model")
    if not model:
        raise ConfigError("the dataset does not record its model; pass --model (the tokenizer directory)")
    tok = load_tokenizer(model)
    encoder = ChatEncoder(tok)
    fp = tokenizer_fingerprint(tok)
    if meta.get("tokenizer_fingerprint") and meta["tokenizer_fingerprint"] != fp:
        raise ContractError(f"tokenizer {model} differs from the one {dataset} was prepared with")
    pinned = {**cfg.pinned(), "dataset_cache_key": meta.get("cache_key"), "tokenizer_fingerprint": fp}
    records = _load_conversations(dataset)
    output.parent.mkdir(parents=True, exist_ok=True)
    done_ids = _resume_state(output, pinned)
    skipped_path = output.with_name(output.name + ".skipped.jsonl")
    skipped_before = Counter()
    if skipped_path.is_file():
        for line in skipped_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line: that sample is simply tried again
            done_ids.add(int(r["id"]))
            skipped_before[r["reason"]] += 1

    clients = [TargetClient(t, timeout_s=60.0) for t in cfg.targets]
    try:
        infos = []
        for c in clients:
            c.wait_ready(60.0)
            infos.append(c.model_info())
            if infos[-1].tokenizer_fingerprint != fp:
                raise ContractError(f"target {c.endpoint} serves a model with a different tokenizer than {model}; "
                                    "regenerate with the model the dataset is for")
        for c, info in zip(clients[1:], infos[1:]):
            check_compatible(infos[0], info, expected_name=clients[0].endpoint, actual_name=c.endpoint)
        max_length = min(i.max_length for i in infos)

        todo = []
        for rec in records:
            sid = int(rec["id"])
            if sid in done_ids:
                continue
            msgs = [dict(m) for m in rec["messages"]]
            turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and not m.get("tool_calls")
                     and k > 0 and msgs[k - 1]["role"] in ("user", "tool")]
            todo.append(_Job(sid, rec, msgs, turns))
        with open(output.with_name(output.name + ".meta.json.tmp"), "w") as f:
            json.dump({"settings": pinned, "dataset": str(dataset.resolve()), "targets": cfg.targets}, f, indent=1)
        os.replace(output.with_name(output.name + ".meta.json.tmp"), output.with_name(output.name + ".meta.json"))

        run = _Run(cfg, encoder, max_length, len(todo))
        report = _execute(run, clients, todo, output, skipped_path, len(records), len(done_ids))
    finally:
        for c in clients:
            c.close()
    report["skipped"] = dict(Counter(report["skipped"]) + skipped_before)
    report["output"] = _validate_output(output)
    report["wall_s"] = time.perf_counter() - t0
    meta_path = output.with_name(output.name + ".meta.json")
    m = json.loads(meta_path.read_text())
    m["report"] = report
    meta_path.with_suffix(".tmp").write_text(json.dumps(m, indent=1))
    os.replace(meta_path.with_suffix(".tmp"), meta_path)
    return report


def _execute(run: _Run, clients: list[TargetClient], todo: list[_Job], output: Path, skipped_path: Path,
             total: int, already: int) -> dict[str, Any]:
    stall_s = run.cfg.request_timeout_s * run.cfg.max_attempts + 60
    finish, skipped = Counter(), Counter()
    turns = cut = written = unchanged = 0
    for job in todo:
        if job.turns:
            run.ready.put(job)
        else:
            run.done.put(job)  # nothing to regenerate (e.g. only tool-call turns): kept as is
    threads = [threading.Thread(target=run.worker, args=(c,), daemon=True, name=f"regen-{c.endpoint}-{k}")
               for c in clients for k in range(run.cfg.concurrency)]
    for t in threads:
        t.start()
    bar = None
    if run.cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=already, unit=" conv", desc="regenerate", mininterval=1.0)
    last_sync = time.monotonic()
    try:
        with open(output, "a", encoding="utf-8") as out, open(skipped_path, "a", encoding="utf-8") as skip_f:
            while run.remaining > 0:
                if run.fatal is not None:
                    raise run.fatal
                if time.monotonic() - run.last_progress > stall_s:
                    raise TargetUnavailableError(f"no progress for {stall_s:.0f}s (are the target servers up?); "
                                                 "the output so far is kept: re-run the same command to resume")
                try:
                    job = run.done.get(timeout=0.5)
                except queue.Empty:
                    continue
                run.remaining -= 1
                if job.skip_reason:
                    skipped[job.skip_reason] += 1
                    skip_f.write(json.dumps({"id": job.sid, "reason": job.skip_reason}) + "\n")
                    skip_f.flush()
                else:
                    rec = {k: v for k, v in job.record.items() if k not in ("messages", "where")}
                    rec.update(messages=job.messages, regenerated_turns=job.next, finish_reasons=job.finish)
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    written += 1
                    turns += job.next
                    cut += job.cut
                    unchanged += job.next == 0
                    finish.update(job.finish)
                if time.monotonic() - last_sync > 1.0:  # survive an OS crash too, not only ours
                    os.fsync(out.fileno())
                    last_sync = time.monotonic()
                if bar is not None:
                    bar.update(1)
            os.fsync(out.fileno())
    except KeyboardInterrupt:
        raise SpecRelayError("interrupted; the output so far is kept: re-run the same command to resume") from None
    finally:
        run.stop.set()
        if bar is not None:
            bar.close()
        for t in threads:
            t.join(timeout=5.0)
    return {"samples": total, "already_done": already, "written": written, "unchanged": unchanged, "skipped": dict(skipped),
            "turns_regenerated": turns, "conversations_cut": cut, "finish_reasons": dict(finish),
            "tokens_generated": sum(s.tokens for s in run.servers.values()),
            "per_server": {k: asdict(v) for k, v in run.servers.items()}}
