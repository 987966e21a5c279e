"""`draft-trainer regenerate`: answer every user turn again with the target model, on the target pool.

    report = regenerate(RegenerateConfig(targets=[...], input=DATASET_DIR, output=FILE))

A draft learns the distribution it is trained on; training on the target's own answers raises
acceptance. Input: the kept conversations of a prepared dataset (`conversations.jsonl`).
Each assistant turn without tool calls is replaced, in order, by what the target generates for
the conversation so far (later turns see the regenerated earlier ones). Tool-call turns and
tool results are kept: the results depend on those exact calls.

The work goes through the trainer's own client: the pool (discovery, handshake and contract
check, auth/TLS, probes of down servers) and the dispatcher (balancing by measured speed,
windows, RESOURCE_EXHAUSTED back-off, failover of a dead server's prompts to the others, a
bounded number of attempts per prompt), with generation as its request kind (kinds.py) and
results taken as they arrive. There is no second retry engine here.

Every conversation is accounted for: written to the output, or listed in
`<output>.skipped.jsonl` with its reason (prompt_too_long, target_error after max_attempts).
Output is append-only JSON Lines in OpenAI messages form (valid prepare-data input), one line
per finished conversation. A re-run with the same settings skips the ids already written or
skipped (a torn last line from a crash is cut off first), so a kill -9 loses only the
conversations in flight and writes nothing twice. `<output>.meta.json` pins the settings and
holds the last report. Sampling seeds are per (seed, conversation, turn), so a sample does not
depend on which server or batch produced it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.contract import tokenizer_fingerprint
from common.errors import ConfigError, ContractError, DataError, SpecRelayError
from draft_trainer.client.config import PoolConfig, client_kwargs
from draft_trainer.client.discovery import EndpointSource
from draft_trainer.client.dispatcher import Dispatcher, Sample
from draft_trainer.client.kinds import GenerateKind
from draft_trainer.client.pool import TargetPool
from draft_trainer.data.chat import ChatEncoder
from draft_trainer.data.dataset import META_FILE
from draft_trainer.data.formats import BadRecord, FileReport, normalize, read_records
from draft_trainer.data.prepare import CONVERSATIONS_FILE, load_tokenizer

log = logging.getLogger(__name__)

REGEN_AUTH_HINT = ("Give regenerate the servers' token (--auth-token-file) and, for TLS, the root that signed their "
                   "certificate (--tls-root-cert).")


@dataclass
class RegenerateConfig:
    targets: list[str]             # host:port list (or one dns:NAME:PORT / file:PATH spec)
    input: str                     # dataset directory written by prepare-data
    output: str                    # JSONL, appended to
    model: str | None = None       # tokenizer directory; default: the dataset's
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    thinking: Literal["auto", "on", "off"] = "auto"  # enable_thinking for templates that have it; auto = theirs
    # 8 x 6 = 48 rows in flight per server: batched decoding is most efficient at 32-64 rows (SmolLM2,
    # 1 thread: 270-316 tok/s vs 102 at 8 rows), and 48 x (1024 + 256) tokens stays within a server's
    # default --max-queue-tokens 65536 (no RESOURCE_EXHAUSTED churn). docs/notes/issue-17.md, session 3.
    concurrency: int = 6           # full requests in flight per server (sizes the per-server window)
    batch_size: int = 8            # prompts per Generate request (at most)
    seed: int = 0
    request_timeout_s: float = 600.0
    max_attempts: int = 5          # failed requests carrying one prompt before it is given up (target_error)
    startup_timeout_s: float = 120.0
    unavailable_timeout_s: float = 300.0  # no server up this long: stop (re-run to resume)
    hedge_after_s: float = 0.0     # duplicate a prompt late on one server to another; 0 = off (doubles work)
    auth_token_file: str = ""
    tls_root_cert: str = ""
    tls_server_name: str = ""
    progress: bool = True

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("--targets: give at least one host:port")
        if self.max_new_tokens < 1 or self.concurrency < 1 or self.batch_size < 1 or self.max_attempts < 1:
            raise ConfigError("--max-new-tokens, --concurrency, --batch-size must be >= 1")
        if self.temperature < 0 or not 0 <= self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("--temperature must be >= 0, --top-p in [0, 1], --top-k >= 0")
        if self.thinking not in ("auto", "on", "off"):
            raise ConfigError(f"--thinking {self.thinking!r}: use auto, on or off")

    def pinned(self) -> dict[str, Any]:
        """Settings a resumed run must share with the run that started the output file."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "top_k": self.top_k, "thinking": self.thinking}

    def pool_config(self) -> PoolConfig:
        per_request = self.batch_size * (self.max_new_tokens + 256)  # prompts are budgeted at ~256 tokens
        return PoolConfig(
            endpoints=",".join(self.targets), request_timeout_s=self.request_timeout_s,
            startup_timeout_s=self.startup_timeout_s, unavailable_timeout_s=self.unavailable_timeout_s,
            request_tokens=per_request, max_endpoint_inflight_tokens=self.concurrency * per_request,
            slow_start=False,  # a round trip is a whole answer: start with the full batch on every server
            max_inflight_tokens=1 << 40, max_buffered_tokens=1 << 40,  # bounded per server, and by the dataset
            max_attempts=self.max_attempts, hedge_after_s=self.hedge_after_s, auth_token_file=self.auth_token_file,
            tls_root_cert=self.tls_root_cert, tls_server_name=self.tls_server_name)


@dataclass
class _Job:
    sid: int
    record: dict[str, Any]
    messages: list[dict[str, Any]]
    turns: list[int]               # indices of the assistant messages to regenerate
    next: int = 0
    finish: list[str] = field(default_factory=list)
    cut: bool = False
    skip_reason: str | None = None


class _Feed:
    """The dispatcher's source: prompts as they become known. Yields None for "nothing now" (a
    conversation's next turn waits for its previous answer) and ends once closed and empty."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Sample] = queue.SimpleQueue()
        self._closed = threading.Event()

    def put(self, s: Sample) -> None:
        self._q.put(s)

    def close(self) -> None:
        self._closed.set()

    def __iter__(self):
        return self

    def __next__(self) -> Sample | None:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            if self._closed.is_set():
                raise StopIteration from None
            return None


class _Counted(GenerateKind):
    """GenerateKind that also counts, per server, the prompts answered and the tokens generated."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.per_server: dict[str, Counter] = {}
        self._lock = threading.Lock()

    def send(self, client, works, deadline_s):
        for seq, (tokens, reason) in super().send(client, works, deadline_s):
            with self._lock:
                c = self.per_server.setdefault(client.endpoint, Counter())
                c["prompts"] += 1
                c["tokens"] += len(tokens)
            yield seq, (tokens, reason)


class _Prompts:
    """Token ids of a conversation's next prompt, with the thinking switch applied."""

    def __init__(self, encoder: ChatEncoder, thinking: str) -> None:
        self.encoder, self.thinking = encoder, thinking

    def __call__(self, msgs: list[dict[str, Any]], tools) -> list[int]:
        if self.thinking == "auto":
            return self.encoder.prompt_ids(msgs, tools)
        enc = self.encoder
        text = enc.tokenizer.apply_chat_template(
            enc.for_template(msgs), tools=tools if enc.supports_tools_schema else None, tokenize=False,
            add_generation_prompt=True, chat_template=enc.template, enable_thinking=self.thinking == "on")
        return list(enc.tokenizer(text, add_special_tokens=False)["input_ids"])


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
        for line in skipped_path.read_text(encoding="utf-8").split("\n"):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line: that sample is simply tried again
            done_ids.add(int(r["id"]))
            skipped_before[r["reason"]] += 1

    pool_cfg = cfg.pool_config()
    pool = TargetPool(EndpointSource(pool_cfg.endpoints), pool_cfg, client_kwargs=client_kwargs(pool_cfg),
                      expected_name=f"the tokenizer {model}", auth_hint=REGEN_AUTH_HINT,
                      tls_hint="this server speaks TLS: pass --tls-root-cert (the PEM root that signed its certificate)")
    try:
        info = pool.start()
        if info.tokenizer_fingerprint != fp:
            raise ContractError(f"the target servers serve a model with a different tokenizer than {model}; "
                                "regenerate with the model the dataset is for")
        todo = []
        for rec in records:
            sid = int(rec["id"])
            if sid in done_ids:
                continue
            msgs = [dict(m) for m in rec["messages"]]
            turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and not m.get("tool_calls")
                     and k > 0 and msgs[k - 1]["role"] in ("user", "tool")]
            todo.append(_Job(sid, rec, msgs, turns))
        tmp = output.with_name(output.name + ".meta.json.tmp")
        tmp.write_text(json.dumps({"settings": pinned, "dataset": str(dataset.resolve()), "targets": cfg.targets},
                                  indent=1))
        os.replace(tmp, output.with_name(output.name + ".meta.json"))
        report = _Run(cfg, pool, _Prompts(encoder, cfg.thinking), encoder.eot_token_ids, tok, info.max_length).execute(
            todo, output, skipped_path, len(records), len(done_ids))
    finally:
        pool.close()
    report["skipped"] = dict(Counter(report["skipped"]) + skipped_before)
    report["output"] = _validate_output(output)
    report["wall_s"] = time.perf_counter() - t0
    meta_path = output.with_name(output.name + ".meta.json")
    m = json.loads(meta_path.read_text())
    m["report"] = report
    meta_path.with_suffix(".tmp").write_text(json.dumps(m, indent=1))
    os.replace(meta_path.with_suffix(".tmp"), meta_path)
    return report


class _Run:
    """One regeneration: feeds prompts to the dispatcher, applies answers, writes finished conversations."""

    def __init__(self, cfg: RegenerateConfig, pool: TargetPool, prompts: _Prompts, eot_ids: list[int], tok,
                 max_length: int) -> None:
        self.cfg, self.pool, self.prompts, self.eot_ids, self.tok = cfg, pool, prompts, list(eot_ids), tok
        self.max_length = max_length
        self.kind = _Counted(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k, seed=cfg.seed, stop_token_ids=self.eot_ids)
        self.feed = _Feed()

    def _next_prompt(self, job: _Job) -> Sample | None:
        """The job's next turn as a dispatcher item, or None when the job ends here (too long)."""
        i = job.turns[job.next]
        try:
            ids = self.prompts(job.messages[:i], job.record.get("tools"))
        except Exception as e:  # noqa: BLE001 - a template error here is a bug in the data
            raise DataError(f"sample {job.sid}: cannot render the prompt: {e}") from None
        if len(ids) + self.cfg.max_new_tokens <= self.max_length:
            return Sample(cursor=(job.next, job.sid), sample_id=job.sid, token_ids=ids,
                          data={"key": f"{job.sid}.{job.next}", "job": job})
        if job.next == 0:
            job.skip_reason = "prompt_too_long"
        else:  # keep the turns regenerated so far
            job.messages = job.messages[: job.turns[job.next - 1] + 1]
            job.cut = True
        return None

    def _apply(self, job: _Job, tokens: list[int], reason: str) -> None:
        if reason == "stop" and tokens and tokens[-1] in self.eot_ids:
            tokens = tokens[:-1]
        text = self.tok.decode(tokens, skip_special_tokens=True)
        job.messages[job.turns[job.next]] = {"role": "assistant", "content": text}
        job.finish.append(reason)
        job.next += 1

    def execute(self, todo: list[_Job], output: Path, skipped_path: Path, total: int,
                already: int) -> dict[str, Any]:
        finish, skipped = Counter(), Counter()
        turns = cut = written = unchanged = tokens = 0
        finished: list[_Job] = []
        outstanding = 0
        for job in todo:
            item = self._next_prompt(job) if job.turns else None
            if item is None:
                finished.append(job)  # nothing to regenerate (e.g. only tool-call turns), or too long
            else:
                self.feed.put(item)
                outstanding += 1
        if not outstanding:
            self.feed.close()
        stream = Dispatcher(self.pool, self.feed, self.cfg.pool_config(), kind=self.kind, ordered=False).start()
        bar = None
        if self.cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=already, unit=" conv", desc="regenerate", mininterval=1.0)
        t0, last_sync = time.monotonic(), time.monotonic()
        try:
            with open(output, "a", encoding="utf-8") as out, open(skipped_path, "a", encoding="utf-8") as skip_f:
                it = iter(stream)
                while True:
                    for job in finished:
                        if job.skip_reason:
                            skipped[job.skip_reason.split(":")[0]] += 1
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
                        if bar is not None:
                            bar.update(1)
                    finished = []
                    if time.monotonic() - last_sync > 1.0:  # survive an OS crash too, not only ours
                        os.fsync(out.fileno())
                        last_sync = time.monotonic()
                    if not outstanding:
                        break
                    d = next(it)
                    outstanding -= 1
                    job = d.sample.data["job"]
                    if d.drop_reason:
                        job.skip_reason = f"{d.drop_reason}: turn {job.next + 1} failed on every attempt"
                        log.error("conversation %d: %s", job.sid, job.skip_reason)
                        finished.append(job)
                    else:
                        self._apply(job, *d.result)
                        tokens += len(d.result[0])
                        item = self._next_prompt(job) if job.next < len(job.turns) else None
                        if item is None:
                            finished.append(job)
                        else:
                            self.feed.put(item)
                            outstanding += 1
                    if not outstanding:
                        self.feed.close()
                    if bar is not None:
                        bar.set_postfix_str(f"{tokens / max(time.monotonic() - t0, 1e-6):.0f} tok/s", refresh=False)
                os.fsync(out.fileno())
        except KeyboardInterrupt:
            raise SpecRelayError("interrupted; the output so far is kept: re-run the same command to resume") from None
        except SpecRelayError:
            log.error("regenerate stopped; the output so far is kept: re-run the same command to resume")
            raise
        finally:
            stream.close()
            if bar is not None:
                bar.close()
        wall = max(time.monotonic() - t0, 1e-6)
        per_server = {a: {"requests": ep.requests, "prompts": self.kind.per_server.get(a, Counter())["prompts"],
                          "tokens": self.kind.per_server.get(a, Counter())["tokens"], "errors": ep.errors,
                          "state": ep.state, "idle_share": round(ep.idle_total_s / wall, 3)}
                      for a, ep in sorted(self.pool.endpoints.items())}
        return {"samples": total, "already_done": already, "written": written, "unchanged": unchanged,
                "skipped": dict(skipped), "turns_regenerated": turns, "conversations_cut": cut,
                "finish_reasons": dict(finish), "tokens_generated": tokens,
                "tokens_per_s": round(tokens / max(time.monotonic() - t0, 1e-6), 1),
                "dispatch": stream.summary(), "per_server": per_server}
