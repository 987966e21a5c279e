"""`draft-trainer prepare-data`: chat files -> tokenized dataset + stats + draft vocabulary.

    result = prepare_data(PrepareConfig(model=..., inputs=[...], output=...))

Pipeline: read records (formats.py) in input order, number them (sample_id = ordinal over all
inputs), encode chunks in worker processes (chat.py), write in order (dataset.py), count every
record as kept or dropped-with-reason. The output directory holds
  samples.arrow, meta.json     the dataset the trainer memory-maps (meta has the cache key)
  stats.json                   the report printed at the end
  vocab.json, token_counts.npy the draft vocabulary (d2t/t2d) and the counts it was chosen from
  conversations.jsonl          the kept conversations exactly as rendered (id = sample_id);
                               `draft-trainer regenerate` reads them
  heldout.jsonl,               with --holdout N: the first N usable conversations, never trained on,
  heldout_prompts.jsonl        and their first user turn as evaluation prompts (`draft-trainer eval
                               --prompts`). Training records from the same conversation (ShareGPT
                               `<id>_<part>`) or with the same first user turn are dropped
                               (reason heldout_overlap).
It is keyed by a content hash of the inputs, tokenizer, template and options: an unchanged
re-run reuses it, any change rebuilds it, and it is swapped in atomically.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.files import atomic_write_text, sha256_file
from common.contract import tokenizer_fingerprint
from common.errors import ConfigError, DataError
from draft_trainer.data.chat import DROP_REASONS, ChatEncoder, ChatOptions, Drop
from draft_trainer.data.dataset import META_FILE, SAMPLES_FILE, DatasetWriter
from draft_trainer.data.formats import BadRecord, FileReport, Record, normalize, read_records
from draft_trainer.data.holdout import HeldOut, take_heldout
from draft_trainer.data.vocab import build_vocab_mapping, count_supervised_tokens

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when the same inputs + options would produce different samples
STATS_FILE = "stats.json"
VOCAB_FILE = "vocab.json"
COUNTS_FILE = "token_counts.npy"
CONVERSATIONS_FILE = "conversations.jsonl"
HELDOUT_FILE = "heldout.jsonl"
HELDOUT_PROMPTS_FILE = "heldout_prompts.jsonl"
CHUNK = 64                      # conversations per worker task
COVERAGE_SIZES = (1024, 2048, 4096, 8192, 16384, 32000, 65536)
EXAMPLES_PER_REASON = 5


@dataclass
class PrepareConfig:
    model: str                        # model (or tokenizer) directory: tokenizer + chat template
    inputs: list[str]
    output: str
    max_length: int = 0               # 0 = the model's own maximum (config.json), else DEFAULT_MAX_LENGTH
    last_turn_only: bool = False
    min_supervised_tokens: int = 1
    system_prompt: str | None = None
    drop_reasoning: bool = False
    workers: int = 1
    skip_bad: bool = False
    draft_vocab_size: int = 32000
    holdout: int = 0                  # conversations held out for evaluation (see the module doc)
    max_samples: int = 0              # read at most this many training records (after the held-out ones); 0 = all

    def chat_options(self) -> ChatOptions:
        return ChatOptions(max_length=self.max_length, last_turn_only=self.last_turn_only,
                           min_supervised_tokens=self.min_supervised_tokens, system_prompt=self.system_prompt,
                           drop_reasoning=self.drop_reasoning)

    def validate(self) -> None:
        if not self.inputs:
            raise ConfigError("give at least one --input file")
        if self.max_length != 0 and self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length}: must be >= 2 (or 0: the model's own maximum)")
        if self.min_supervised_tokens < 1:
            raise ConfigError("--min-supervised-tokens must be >= 1")
        if self.workers < 1:
            raise ConfigError("--workers must be >= 1")
        if self.draft_vocab_size < 1:
            raise ConfigError("--draft-vocab-size must be >= 1")
        if self.holdout < 0 or self.max_samples < 0:
            raise ConfigError("--holdout and --max-samples must be >= 0")
        for p in self.inputs:
            if not Path(p).is_file():
                raise DataError(f"input {p} does not exist or is not a file")


@dataclass
class PrepareStats:
    files: list[dict[str, Any]] = field(default_factory=list)
    samples_in: int = 0
    kept: int = 0
    heldout: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    truncated: int = 0
    events: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    supervised_tokens: int = 0
    supervised_fraction: float = 0.0
    length_histogram: dict[str, int] = field(default_factory=dict)
    length_quantiles: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    vocab: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    samples_per_s: float = 0.0

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES_PER_REASON:
            ex.append(f"{where}: {detail}" if detail else where)

    def check(self) -> None:
        """Every record is accounted for: kept or dropped with a reason."""
        if self.samples_in != self.kept + self.heldout + sum(self.dropped.values()):
            raise AssertionError(f"accounting bug: {self.samples_in} in != {self.kept} kept + {self.heldout} held out "
                                 f"+ {self.dropped}")

    def format(self) -> str:
        held = f"held out {self.heldout}, " if self.heldout else ""
        lines = [f"samples in {self.samples_in}: kept {self.kept}, {held}dropped {sum(self.dropped.values())} "
                 f"({', '.join(f'{k} {v}' for k, v in self.dropped.items() if v) or 'none'}); "
                 f"{self.truncated} truncated to the maximum length"]
        for f in self.files:
            lost = f" — {f['note']}" if f.get("note") else ""
            lines.append(f"  {f['path']}: {f['records']} records ({f['format']}){lost}")
        if self.events:
            lines.append("  turn edits: " + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items())))
        lines.append(f"tokens {self.tokens:,}, supervised {self.supervised_tokens:,} "
                     f"({100 * self.supervised_fraction:.1f}%); length p50 {self.length_quantiles.get('p50', 0)} "
                     f"p90 {self.length_quantiles.get('p90', 0)} p99 {self.length_quantiles.get('p99', 0)} "
                     f"max {self.length_quantiles.get('max', 0)} (before truncation)")
        peak = max(self.length_histogram.values(), default=0) or 1
        for k, v in self.length_histogram.items():
            lines.append(f"  {k:>13} {v:>8} {'#' * round(40 * v / peak)}")
        if self.vocab:
            v = self.vocab
            lines.append(f"draft vocabulary Vd={v['draft_vocab_size']} of V={v['vocab_size']}: coverage "
                         f"{100 * v['coverage']:.2f}% of supervised tokens ({v['distinct_supervised']} distinct ids seen)")
        lines.append(f"{self.wall_s:.1f}s, {self.samples_per_s:.0f} samples/s")
        return "\n".join(lines)


@dataclass
class PrepareResult:
    path: Path
    stats: PrepareStats
    reused: bool
    cache_key: str


# ----------------------------------------------------------------------------- helpers

def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    path = Path(model)
    if not path.is_dir():
        raise DataError(f"--model {model}: not a directory (give a model or tokenizer directory with tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise DataError(f"cannot load a tokenizer from {model}: {e}") from None


DEFAULT_MAX_LENGTH = 2048  # a tokenizer-only directory says nothing about the model's context


def model_max_length(model: str) -> int:
    """The target's context length (config.json max_position_embeddings): what its servers accept,
    so samples prepared to it are never refused mid-run."""
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        n = d.get("max_position_embeddings") or (d.get("text_config") or {}).get("max_position_embeddings")
        if n:
            return int(n)
    return DEFAULT_MAX_LENGTH


def target_vocab_size(model: str, tokenizer: Any) -> int:
    """V of the target: config.json's vocab_size when present (may exceed the tokenizer's size)."""
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        d = json.loads(cfg.read_text())
        v = d.get("vocab_size") or (d.get("text_config") or {}).get("vocab_size")
        if v:
            return max(int(v), len(tokenizer))
    return len(tokenizer)


def cache_key(cfg: PrepareConfig, input_digests: list[str], tok_fp: str, template: str) -> str:
    opts = asdict(cfg.chat_options())
    opts["skip_bad"] = cfg.skip_bad
    if cfg.holdout or cfg.max_samples:  # only when set: keys of existing datasets stay valid
        opts["holdout"], opts["max_samples"] = cfg.holdout, cfg.max_samples
    blob = json.dumps({"version": PIPELINE_VERSION, "inputs": input_digests, "tokenizer": tok_fp,
                       "template": template, "options": opts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _histogram(lengths: np.ndarray, max_length: int) -> dict[str, int]:
    edges = [0]
    while edges[-1] < max_length:
        edges.append(min(max(64, edges[-1] * 2), max_length))
    out = {}
    for a, b in zip(edges[:-1], edges[1:]):
        out[f"{a}-{b - 1}"] = int(((lengths >= a) & (lengths < b)).sum())
    out[f">={max_length}"] = int((lengths >= max_length).sum())
    return out


# ----------------------------------------------------------------------------- workers

_ENCODER: ChatEncoder | None = None
_HELDOUT: HeldOut | None = None


def _encode_chunk(chunk: list[tuple[int, Record]]) -> list[tuple]:
    """Encode records; each result is ("ok", sid, ids, mask, full_len, events, line) or ("drop", ...)."""
    out = []
    for sid, rec in chunk:
        try:
            conv = normalize(rec)
            if _HELDOUT is not None and (why := _HELDOUT.overlap(conv)):
                out.append(("drop", sid, "heldout_overlap", why, rec.where, None))
                continue
            e = _ENCODER.encode(conv)
        except BadRecord as b:
            out.append(("drop", sid, "malformed", b.reason, rec.where, None))
            continue
        except Drop as d:
            out.append(("drop", sid, d.reason, d.detail, rec.where, None))
            continue
        line = json.dumps({"id": sid, "source_id": conv.source_id, "where": rec.where, "messages": e.messages,
                           **({"tools": conv.tools} if conv.tools else {})}, ensure_ascii=False)
        out.append(("ok", sid, e.input_ids, e.loss_mask, e.full_length, dict(+e.events), line))
    return out


def _ordered_results(chunks: Iterator[list[tuple[int, Record]]], workers: int) -> Iterator[list[tuple]]:
    """Encode chunks in order; with workers > 1, a bounded window of tasks in flight (backpressure)."""
    if workers <= 1:
        for c in chunks:
            yield _encode_chunk(c)
        return
    # fork: workers inherit the loaded tokenizer and encoder instead of re-loading it.
    pool = mp.get_context("fork").Pool(workers)
    try:
        window: deque = deque()
        for c in chunks:
            window.append(pool.apply_async(_encode_chunk, (c,)))
            if len(window) >= 4 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _numbered_records(paths: list[str], reports: list[FileReport]) -> Iterator[tuple[int, Record]]:
    """(sample_id, record) over all inputs in order; sample_id = ordinal over all inputs."""
    sid = 0
    for p in paths:
        rep = FileReport(str(p), "")
        reports.append(rep)
        for rec in read_records(p, rep):
            yield sid, rec
            sid += 1


def _chunks(records: Iterator[tuple[int, Record]]) -> Iterator[list[tuple[int, Record]]]:
    chunk: list[tuple[int, Record]] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- pipeline

def prepare_data(cfg: PrepareConfig, progress: bool = True) -> PrepareResult:
    global _ENCODER, _HELDOUT
    cfg.validate()
    if cfg.max_length == 0:
        cfg.max_length = model_max_length(cfg.model)
        log.info("--max-length: the model's own maximum, %d tokens", cfg.max_length)
    if os.environ.get("TOKENIZERS_PARALLELISM") is None:
        # We parallelise with processes; the Rust pool inside forked workers can deadlock.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(cfg.model)
    encoder = ChatEncoder(tok, cfg.chat_options())
    fp = tokenizer_fingerprint(tok)
    V = target_vocab_size(cfg.model, tok)
    out = Path(cfg.output)
    key = cache_key(cfg, [sha256_file(Path(p)) for p in cfg.inputs], fp, encoder.template)
    Vd = min(cfg.draft_vocab_size, V)

    meta = _read_json(out / META_FILE) if (out / SAMPLES_FILE).is_file() else None
    if meta is not None:
        stats_d = _read_json(out / STATS_FILE)
        if meta.get("cache_key") == key and stats_d is not None and (out / COUNTS_FILE).is_file():
            stats = PrepareStats(**stats_d)
            if stats.vocab.get("draft_vocab_size") != Vd:
                stats.vocab = _write_vocab(out, np.load(out / COUNTS_FILE), Vd)
                _atomic_write(out / STATS_FILE, json.dumps(asdict(stats), indent=1))
            log.info("%s is up to date (cache key %s…); nothing to do", out, key[:12])
            return PrepareResult(out, stats, True, key)
        log.info("%s was built from other inputs/options (cache key %s… != %s…): rebuilding",
                 out, str(meta.get("cache_key"))[:12], key[:12])

    t0 = time.perf_counter()
    stats = PrepareStats()
    events: Counter = Counter()
    counts = np.zeros(V, dtype=np.int64)
    full_lengths: list[int] = []
    reports: list[FileReport] = []
    _ENCODER = encoder
    bar = _progress_bar(progress)
    with DatasetWriter(out) as writer:
        records = _numbered_records(cfg.inputs, reports)
        # Held-out conversations are chosen before any worker starts: workers inherit the overlap set.
        _HELDOUT, passed = take_heldout(records, cfg.holdout, encoder, cfg.max_length) if cfg.holdout \
            else (None, [])
        if _HELDOUT is not None:
            stats.samples_in = stats.heldout = len(_HELDOUT.prompts)
            _write_jsonl(writer.tmp / HELDOUT_FILE, _HELDOUT.conversations)
            _write_jsonl(writer.tmp / HELDOUT_PROMPTS_FILE, _HELDOUT.prompts)
        train_records = itertools.chain(passed, records)
        if cfg.max_samples:
            train_records = itertools.islice(train_records, cfg.max_samples)
        conv_f = open(writer.tmp / CONVERSATIONS_FILE, "w", encoding="utf-8")
        sup_ids: list[np.ndarray] = []
        sup_masks: list[np.ndarray] = []
        for results in _ordered_results(_chunks(train_records), cfg.workers):
            for r in results:
                stats.samples_in += 1
                if r[0] == "drop":
                    _, sid, reason, detail, where, _ = r
                    if reason == "malformed" and not cfg.skip_bad:
                        raise DataError(f"{where}: {detail}. Fix or remove this record, or pass --skip-bad "
                                        "to skip bad records and count them")
                    stats.drop(reason, where, detail)
                    continue
                _, sid, ids, mask, full_len, ev, line = r
                writer.add(sid, ids, mask)
                conv_f.write(line + "\n")
                stats.kept += 1
                stats.truncated += full_len > len(ids)
                stats.tokens += len(ids)
                full_lengths.append(full_len)
                events.update(ev)
                sup_ids.append(ids)
                sup_masks.append(mask)
            counts += count_supervised_tokens(sup_ids, sup_masks, V)
            sup_ids.clear()
            sup_masks.clear()
            if bar is not None:
                bar.update(len(results))
        if bar is not None:
            bar.close()
        conv_f.close()
        stats.files = [asdict(r) for r in reports]
        if stats.kept == 0:
            raise DataError(f"no usable samples in {cfg.inputs}: dropped {({k: v for k, v in stats.dropped.items() if v})}; "
                            f"examples: {stats.examples}")
        stats.events = dict(sorted(events.items()))
        stats.supervised_tokens = int(counts.sum())
        stats.supervised_fraction = stats.supervised_tokens / max(1, stats.tokens)
        lengths = np.asarray(full_lengths)
        stats.length_histogram = _histogram(lengths, cfg.max_length)
        stats.length_quantiles = {q: int(np.quantile(lengths, p)) for q, p in
                                  (("p50", .5), ("p90", .9), ("p99", .99))} | {"max": int(lengths.max())}
        np.save(writer.tmp / COUNTS_FILE, counts)
        stats.vocab = _write_vocab(writer.tmp, counts, Vd)
        stats.wall_s = time.perf_counter() - t0
        stats.samples_per_s = stats.samples_in / max(stats.wall_s, 1e-9)
        stats.check()
        (writer.tmp / STATS_FILE).write_text(json.dumps(asdict(stats), indent=1))
        writer.commit({
            "format_version": 1, "cache_key": key, "pipeline_version": PIPELINE_VERSION,
            "tokenizer_fingerprint": fp, "model": str(Path(cfg.model).resolve()), "vocab_size": V,
            "chat_template_sha256": hashlib.sha256(encoder.template.encode()).hexdigest(),
            "end_of_turn": encoder.eot, "options": asdict(cfg.chat_options()),
            "inputs": [str(Path(p).resolve()) for p in cfg.inputs],
        })
    dropped = sum(stats.dropped.values())
    if dropped:
        log.warning("dropped %d of %d samples: %s (examples in %s)", dropped, stats.samples_in,
                    {k: v for k, v in stats.dropped.items() if v}, out / STATS_FILE)
    return PrepareResult(out, stats, False, key)


def _write_vocab(directory: Path, counts: np.ndarray, Vd: int) -> dict[str, Any]:
    mapping = build_vocab_mapping(counts, Vd)
    mapping.save(directory / VOCAB_FILE)
    total = max(1, int(counts.sum()))
    order = np.sort(counts)[::-1]
    curve = {str(n): float(order[:n].sum() / total) for n in COVERAGE_SIZES if n < len(counts)}
    return {"draft_vocab_size": mapping.draft_vocab_size, "vocab_size": mapping.vocab_size,
            "coverage": mapping.coverage, "distinct_supervised": int((counts > 0).sum()),
            "coverage_by_size": curve, "fingerprint": mapping.fingerprint()}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_atomic_write = atomic_write_text


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" samples", desc="prepare-data", disable=None, mininterval=1.0)
