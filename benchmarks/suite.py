"""The benchmark suite: every benchmark's command, result file, time limit and headline figure.

`run_all` runs the entries with `in_make_bench`; `report` renders them all into docs/benchmarks.md.
A headline reads the fields it needs with `need`, so a result JSON missing one fails loudly,
naming the file and the key, instead of rendering a wrong or empty summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import SpecRelayError

SGLANG_CMD = ("PYTHONPATH=tests/sglang_lane/stubs:. SGLANG_USE_CPU_ENGINE=1 "
              ".venv-sglang/bin/python benchmarks/bench_sglang_backend.py")


class BenchmarkResultError(SpecRelayError):
    """A benchmark result file is missing a field the results page needs."""


@dataclass(frozen=True)
class Headline:
    figure: str
    target: str
    met: bool | None  # None: report-only (no target), or smoke figures


class Result:
    """One result JSON; `need("a.b")` returns a field or raises naming the file and the key."""

    def __init__(self, path: Path, data: dict, rerun: str) -> None:
        self.path, self.data, self.rerun = path, data, rerun

    def need(self, dotted: str, obj=None):
        cur = self.data if obj is None else obj
        for part in dotted.split("."):
            if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            elif isinstance(cur, dict) and part in cur:
                cur = cur[part]
            elif isinstance(cur, dict) and part.isdigit() and int(part) in cur:
                cur = cur[int(part)]
            else:
                raise BenchmarkResultError(
                    f"{self.path}: missing key '{dotted}' needed for the results page (written by an older or "
                    f"different version of the benchmark?); rerun it: {self.rerun}")
        return cur

    @property
    def smoke(self) -> bool:
        return bool(self.data.get("smoke") or self.data.get("config", {}).get("smoke")
                    or self.path.stem.endswith("_smoke"))


@dataclass(frozen=True)
class Bench:
    name: str                 # id for --only
    title: str
    module: str               # benchmarks.<module>
    result: str               # stem of the JSON (+ .md) a full run writes; smoke runs add "_smoke"
    measures: str
    headline: Callable[[Result], list[Headline]]
    args: tuple[str, ...] = ()
    out_flag: str = "--out"   # how the script takes the results directory
    out_is_file: bool = False  # the flag takes the JSON path instead of a directory
    timeout_s: float = 1800.0  # full run; run_all stops the script (and its children) after it
    expected_s: float = 0.0    # wall time of the full run seen so far (before run_all timed it)
    smoke_timeout_s: float = 300.0
    in_make_bench: bool = True
    reproduce: str = ""       # overrides the derived command (scripts outside make bench)
    # Variant runs shown in the section: (stem, command, also in the summary table?)
    extra: tuple[tuple[str, str, bool], ...] = field(default=())

    def stem(self, smoke: bool) -> str:
        return self.result + ("_smoke" if smoke else "")

    def command(self, out_dir: Path | None = None, smoke: bool = False) -> list[str]:
        cmd = ["python", "-m", f"benchmarks.{self.module}", *self.args]
        if smoke:
            cmd.append("--smoke")
        if out_dir is not None:
            target = Path(out_dir) / f"{self.stem(smoke)}.json" if self.out_is_file else Path(out_dir)
            cmd += [self.out_flag, str(target)]
        return cmd

    def reproduce_command(self) -> str:
        return self.reproduce or " ".join(self.command())


def _pct(x: float) -> str:
    return "<0.1%" if 0 < x < 0.001 else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------------- headlines

def serving(r: Result) -> list[Headline]:
    ratio, target = r.need("ratio"), r.need("target_ratio")
    return [Headline(f"wire / in-process tokens/s: **{ratio:.2f}x** (median of per-round ratios)",
                     f">= {target}", ratio >= target)]


def dataplane(r: Result) -> list[Headline]:
    raw, grpc = r.need("ratio_vs_raw_flight"), r.need("ratio_vs_grpc_bytes")
    t_raw, t_grpc = r.need("targets.vs_raw_flight"), r.need("targets.vs_grpc_bytes")
    inflight = r.need("config.inflight")
    return [Headline(f"{inflight} in flight: **{raw:.2f}x** of raw pyarrow.flight DoGet", f">= {t_raw}x", raw >= t_raw),
            Headline(f"{inflight} in flight: **{grpc:.2f}x** a gRPC stream of protobuf bytes", f">= {t_grpc}x",
                     grpc >= t_grpc)]


def overload(r: Result) -> list[Headline]:
    growth_mib = (r.need("peak_rss_kib") - r.need("idle_rss_kib")) / 1024
    queue_mib = r.need("config.queue_tokens") * 4 * r.need("config.hidden") * 2 / 2**20  # as the script's table
    errors, samples, expected = len(r.need("other_errors")), r.need("samples"), r.need("expected_samples")
    healthy, code, refused = r.need("healthy_at_end"), r.need("exit_status"), r.need("resource_exhausted")
    ok = errors == 0 and samples == expected and healthy and code == 0 and growth_mib <= queue_mib
    return [Headline(f"4x the queue budget offered: RSS **+{growth_mib:.0f} MiB** (one full queue of features "
                     f"{queue_mib:.0f} MiB), {refused} refusals, {errors} other errors, {samples}/{expected} samples, "
                     f"{'healthy' if healthy else 'NOT healthy'}, exit {code}",
                     "no crash, no errors, RSS growth < one queue", ok)]


def pool(r: Result) -> list[Headline]:
    scaling = {r.need("servers", row): row for row in r.need("scaling")}
    n = 4 if 4 in scaling else max(scaling, default=0)
    speedup = r.need(f"scaling.{n}.speedup", {"scaling": scaling})
    out = [Headline(f"**{speedup}x** delivered samples/s with {n} synthetic servers vs 1"
                    + (f" ({scaling[8]['speedup']}x with 8)" if 8 in scaling else ""),
                    ">= 3.5x at 4 servers", speedup >= 3.5 if n == 4 else None)]
    waits = {"simulated step": (r.need("overlap_sleep.pool.data_wait_fraction"),
                                r.need("overlap_sleep.sync.data_wait_fraction"))}
    if "overlap_real" in r.data or not r.smoke:
        waits["real loop"] = (r.need("overlap_real.pool.data_wait_fraction"),
                              r.need("overlap_real.one_sample_ahead.data_wait_fraction"))
    figure = "; ".join(f"{k} **{_pct(w)}** (without prefetch {_pct(nw)})" for k, (w, nw) in waits.items())
    out.append(Headline(f"trainer data-wait, supply ~1.2x demand: {figure}", "<= 5%",
                        all(w <= 0.05 for w, _ in waits.values())))
    return out


def prepare_data(r: Result) -> list[Headline]:
    cpu, wall = r.need("overhead_vs_tokenizer.cpu_s"), r.need("overhead_vs_tokenizer.wall_s")
    target = r.need("target_overhead")
    return [Headline(f"prepare-data vs the bare tokenizer, 2 workers: **{100 * cpu:+.1f}%** CPU time "
                     f"({100 * wall:+.1f}% wall), {r.need('samples_in')} records", f"< {100 * target:.0f}% overhead",
                     cpu < target)]


def train_step(r: Result) -> list[Headline]:
    rows = [x for x in r.need("results") if "error" not in x]
    by = {(r.need("impl", x), r.need("T", x)): x for x in rows}
    seqs = sorted({t for _, t in by})
    out = []
    baselines = [b for b in ("specforge-float32", "specforge-bfloat16") if any(k[0] == b for k in by)]
    if not baselines:  # smoke (ours only) or no SpecForge venv: compare to our reference path
        parts = [f"T={t}: {by['fused-auto', t]['tokens_per_s'] / by['reference-fp32', t]['tokens_per_s']:.2f}x"
                 for t in seqs if ("fused-auto", t) in by and ("reference-fp32", t) in by]
        return [Headline("fused-auto vs our reference path tokens/s: " + ", ".join(parts) + " (SpecForge not run)",
                         ">= 1.5x SpecForge tokens/s at <= 0.7x its peak RSS", None)]
    for base in baselines:
        parts, ok = [], True
        for t in seqs:
            if ("fused-auto", t) not in by or (base, t) not in by:
                continue
            ours, theirs = by["fused-auto", t], by[base, t]
            speed = r.need("tokens_per_s", ours) / r.need("tokens_per_s", theirs)
            per_cpu = r.need("tokens_per_cpu_s", ours) / r.need("tokens_per_cpu_s", theirs)
            mem = r.need("peak_rss_mb", ours) / r.need("peak_rss_mb", theirs)
            ok = ok and speed >= 1.5 and mem <= 0.7
            parts.append(f"T={t} **{speed:.2f}x** tokens/s ({per_cpu:.2f}x per CPU-s) at **{mem:.2f}x** RSS")
        out.append(Headline(f"fused-auto vs SpecForge 0.2.0 {base.split('-')[1]}: " + "; ".join(parts),
                            ">= 1.5x tokens/s at <= 0.7x peak RSS", ok if parts else None))
    return out


def trainer(r: Result) -> list[Headline]:
    rows = r.need("rows")
    get = {f"{r.need('ranks', x)} rank {r.need('features', x).split()[0]}": x for x in rows}
    live1, cache1, live2, cache2 = (r.need(k, get) for k in ("1 rank live", "1 rank feature", "2 rank live",
                                                              "2 rank feature"))
    fig = (f"2 vs 1 rank tokens/s: live **{live2['tokens_per_s'] / live1['tokens_per_s']:.2f}x**, cache "
           f"**{cache2['tokens_per_s'] / cache1['tokens_per_s']:.2f}x**; cache vs live (1 rank) "
           f"{cache1['tokens_per_s'] / live1['tokens_per_s']:.2f}x; data wait live {_pct(live1['data_wait_fraction'])}"
           f" / {_pct(live2['data_wait_fraction'])}, cache {_pct(cache1['data_wait_fraction'])} / "
           f"{_pct(cache2['data_wait_fraction'])} (1 / 2 ranks)")
    return [Headline(fig, "report (2 cores shared by both ranks)", None)]


def sglang(r: Result) -> list[Headline]:
    ratio = r.need("ratio_sglang_over_hf_tokens_per_s")
    hf, sg = r.need("results.hf"), r.need("results.sglang")
    return [Headline(f"{r.need('dtype')}: SGLang / HF tokens/s **{ratio:.2f}x**; start-up {sg['startup_s']:.0f} s vs "
                     f"{hf['startup_s']:.0f} s; peak RSS {sg['peak_rss_mb']:.0f} vs {hf['peak_rss_mb']:.0f} MiB",
                     "report (parity fine on CPU)", None)]


def parity(r: Result) -> list[Headline]:
    rat, res = r.need("ratios_specrelay_over_specforge"), r.need("results")
    ours, theirs = res["specrelay"], res["specforge"]
    return [Headline(f"held-out tau **{rat['tau']:.3f}x** SpecForge's ({ours['tau']:.2f} vs {theirs['tau']:.2f}; "
                     f"teacher-forced on held-out rows {rat['tf_tau_unseen']:.3f}x) after {ours['tokens']:,} tokens each",
                     ">= 1.0x at equal tokens", rat["tau"] >= 1.0),
            Headline(f"tau gain per CPU-minute **{rat['tau_gain_per_cpu_min']:.2f}x** (tokens per CPU-s "
                     f"{rat['tokens_per_cpu_s']:.2f}x, peak RSS {rat['peak_rss']:.2f}x)", ">= 2x",
                     rat["tau_gain_per_cpu_min"] >= 2.0)]


def replay(r: Result) -> list[Headline]:
    base, rep = r.need("rows")
    return [Headline(f"feature-cache replay: **{rep['tokens'] / base['tokens']:.2f}x** the training tokens in "
                     f"{r.need('minutes'):g} min ({rep['epochs']} vs {base['epochs']} epochs; the target computed "
                     f"{rep['target_samples']} vs {base['target_samples']} samples)", "report (the demo's recipe)",
                     None)]


def target_dtype(r: Result) -> list[Headline]:
    x = r.need("bf16_over_fp32")
    return [Headline(f"bf16 / fp32 time on this CPU (native bf16: {r.need('cpu_native_bf16')}): features "
                     f"**{x['features']:.2f}x**, regeneration **{x['regeneration']:.2f}x**, greedy token "
                     f"{x['greedy token']:.2f}x, 6-token verification {x['verification']:.2f}x; `--dtype auto` picks "
                     f"{r.need('auto_picks')}", "report (auto: bf16 only with AVX512-BF16 or AMX)", None)]


def allocator(r: Result) -> list[Headline]:
    first, second = r.need("rows")
    if str(r.data.get("compared", "")).startswith("jemalloc's"):   # --pages: jemalloc's two page policies
        return [Headline(f"{second['run']} vs {first['run']}: **{r.need('tokens_per_cpu_s_vs_first', second):.2f}x** "
                         f"tokens per CPU-second, peak RSS {r.need('peak_rss_mb', second) / r.need('peak_rss_mb', first):.2f}x, "
                         f"minor faults per step {r.need('minor_faults_per_step', first):.0f} -> "
                         f"{r.need('minor_faults_per_step', second):.0f} ({r.need('steps')} steps)",
                         "report (the trainer keeps large pages by default)", None)]
    glibc, jem = first, second
    q = lambda x: r.need("tokens_per_s_by_quarter", x)  # noqa: E731
    return [Headline(f"jemalloc vs glibc: **{r.need('tokens_per_cpu_s_vs_glibc', jem):.2f}x** tokens per CPU-second, "
                     f"peak RSS {r.need('peak_rss_mb', jem) / r.need('peak_rss_mb', glibc):.2f}x, largest loss "
                     f"difference {r.need('max_loss_diff'):.3g} ({r.need('steps')} steps; tokens/s first -> last "
                     f"quarter: glibc {q(glibc)[0]} -> {q(glibc)[-1]}, jemalloc {q(jem)[0]} -> {q(jem)[-1]})",
                     "report (the CLIs choose jemalloc when present)", None)]


# ---------------------------------------------------------------------------------- the suite

BENCHMARKS: tuple[Bench, ...] = (
    Bench("serving", "Serving overhead", "bench_serving", "serving_overhead",
          "tokens/s through the full Flight path (client in another process) vs the same HF backend forward "
          "in-process, same shapes and threads (SmolLM2-135M-shaped random Llama, fp32)", serving,
          timeout_s=1800, expected_s=300),
    Bench("dataplane", "Data plane vs raw Flight and gRPC", "bench_dataplane", "dataplane",
          "a synthetic H=4096 bf16 feature stream through SpecRelay vs a raw pyarrow.flight DoGet of the same "
          "record batches, and vs a gRPC stream of the same bytes as protobuf messages; one request open at a time",
          dataplane, timeout_s=900, expected_s=60),
    Bench("dataplane_inflight2", "Data plane, 2 requests in flight", "bench_dataplane", "dataplane_inflight2",
          "as above with 2 requests open at a time on each path (as a trainer's dispatcher runs it)", dataplane,
          args=("--inflight", "2"), timeout_s=900, expected_s=60),
    Bench("overload", "Overload", "bench_overload", "overload",
          "8 clients offering 4x the server's queue budget: idle vs peak RSS, RESOURCE_EXHAUSTED count, errors, "
          "health at the end", overload, timeout_s=600, expected_s=45),
    Bench("pool", "Target pool: scaling and pipeline overlap", "bench_pool", "pool",
          "delivered samples/s with N = 1, 2, 4, 8 synthetic servers (simulated cost per token); trainer data-wait "
          "fraction with supply ~1.2x demand (simulated step and the real loop), side by side with no prefetch",
          pool, timeout_s=1800, expected_s=330),
    Bench("prepare_data", "prepare-data overhead", "bench_prepare_data", "prepare_data",
          "prepare-data on the whole ShareGPT file (2 workers) vs the bare tokenizer on the same rendered text, "
          "alternating, best of 2", prepare_data, out_is_file=True, timeout_s=3600, expected_s=2100),
    Bench("train_step", "Training step vs SpecForge", "bench_train_step", "bench_train_step",
          "one EAGLE-3 step (K=7 TTT forward, loss, backward, clip, AdamW) for a SmolLM2-135M-sized draft, "
          "T = 512 and 1024: our reference and fused paths vs SpecForge 0.2.0 (its own venv, skipped if absent), "
          "each in a fresh process", train_step, out_flag="--out-dir", timeout_s=3600, expected_s=1500,
          extra=(("bench_train_step_T512_2thread",
                  "python -m benchmarks.bench_train_step --seq-lens 512 --name bench_train_step_T512_2thread", True),
                 ("bench_train_step_T512_1thread", "python -m benchmarks.bench_train_step --seq-lens 512 --threads 1 "
                                                   "--name bench_train_step_T512_1thread", False),
                 ("bench_train_step_T1024_1thread", "python -m benchmarks.bench_train_step --seq-lens 1024 "
                                                    "--threads 1 --name bench_train_step_T1024_1thread", False))),
    Bench("trainer", "Trainer: 1 vs 2 ranks, live vs cached features", "bench_trainer", "trainer",
          "`draft-trainer train` on a SmolLM2-sized draft (H=576, V=49152, Vd=32000, K=7): 1 vs 2 ranks (gloo, "
          "FSDP2) on the same 2 cores, features from a live synthetic server vs the feature cache", trainer,
          timeout_s=1800, expected_s=600),
    Bench("sglang_bf16", "SGLang backend vs HF backend (bf16)", "bench_sglang_backend", "bench_sglang_backend_bf16",
          "SGLang vs HF target backend on SmolLM2-135M-Instruct: tokens/s through the wire, start-up, peak RSS "
          "(needs the SGLang lane venv: `bash tests/sglang_lane/setup.sh`)", sglang, in_make_bench=False,
          reproduce=f"{SGLANG_CMD} --dtype bf16"),
    Bench("sglang_fp32", "SGLang backend vs HF backend (fp32)", "bench_sglang_backend", "bench_sglang_backend_fp32",
          "as above in fp32", sglang, in_make_bench=False, reproduce=f"{SGLANG_CMD} --dtype fp32"),
    Bench("replay", "Feature-cache replay in the demo's recipe", "bench_replay", "replay",
          "the demo's recipe (trainer 1 thread beside a 1-thread embedded bf16 SmolLM2 server) for the same wall "
          "time, later epochs recomputed by the target vs read back from the run's feature cache (trainer on 2 "
          "threads while the target idles)", replay, in_make_bench=False,
          reproduce="python -m benchmarks.bench_replay --data runs/demo/data/onpolicy --minutes 8"),
    Bench("target_dtype", "Target model: bf16 vs fp32 on this CPU", "bench_target_dtype", "target_dtype",
          "SmolLM2-135M-Instruct in both dtypes in one process, in the shapes SpecRelay runs it (a feature batch, "
          "batched generation, a greedy token, a K=5 verification): what `--dtype auto` decides",
          target_dtype, in_make_bench=False, reproduce="python -m benchmarks.bench_target_dtype"),
    Bench("allocator", "Trainer on jemalloc vs glibc", "bench_allocator", "allocator_demo",
          "`draft-trainer train` with the demo's recipe on a demo run's cached features, the same steps on glibc's "
          "malloc and on jemalloc (SPECRELAY_MALLOC), both at once with 1 thread each (needs libjemalloc2)",
          allocator, in_make_bench=False,
          reproduce="python -m benchmarks.bench_allocator --demo runs/demo --steps 1200",
          extra=(("allocator_demo_300", "MALLOC_CONF=dirty_decay_ms:-1 python -m benchmarks.bench_allocator --demo "
                  "runs/demo --steps 300 --name allocator_demo_300   # jemalloc never purging (opt-in)", True),
                 ("allocator_dflash", "MALLOC_CONF=dirty_decay_ms:-1 python -m benchmarks.bench_allocator --steps 16 "
                  "--set model.method=dflash --name allocator_dflash   # jemalloc never purging (opt-in)", True),
                 ("allocator_dflash_decay10s", "python -m benchmarks.bench_allocator --steps 40 --set "
                  "model.method=dflash --name allocator_dflash_decay10s   # jemalloc's own options (before the "
                  "method kept freed pages)", True),
                 ("allocator_dflash_kept", "python -m benchmarks.bench_allocator --steps 16 --set "
                  "model.method=dflash --name allocator_dflash_kept   # large pages kept (the default since "
                  "session 16)", True),
                 ("allocator_demo_pages_large", "python -m benchmarks.bench_allocator --demo runs/demo --steps 600 "
                  "--pages --name allocator_demo_pages_large   # jemalloc: large pages returned vs kept", True),
                 ("allocator_demo_pages", "python -m benchmarks.bench_allocator --demo runs/demo --steps 300 --pages "
                  "--name allocator_demo_pages   # every arena never purging (rejected: RSS grew to 20 GB by "
                  "step 1,000)", True))),
    Bench("parity", "Draft quality vs SpecForge at equal tokens", "bench_parity_specforge",
          "parity_specforge_300k_vocab32000",
          "SpecRelay's and SpecForge 0.2.0's EAGLE-3 training objects on the same cached features, batches, order "
          "and lr schedule (300k tokens each, 1 thread each, one side after the other, a 32,000-token draft "
          "vocabulary: prepare-data's default; the demo pins 8,192, the first variant run below), both drafts exported and decoded by one evaluator on the same held-out prompts (needs "
          "SpecForge's venv: `--setup-specforge`; ~85 min)", parity,
          in_make_bench=False, reproduce="python -m benchmarks.bench_parity_specforge --data DATASET --feature-cache "
                                         "CACHE --max-samples 700 --tokens 300000 --threads 1 --holdout-rows 64 "
                                         "--draft-vocab-size 32000 --setup-specforge --name parity_specforge_300k_vocab32000",
          extra=(("parity_specforge_300k_vocab8192_large_pages",
                  "python -m benchmarks.bench_parity_specforge --data DATASET --feature-cache CACHE --max-samples 700 "
                  "--tokens 300000 --threads 1 --holdout-rows 64 --draft-vocab-size 8192 --setup-specforge "
                  "--name parity_specforge_300k_vocab8192_large_pages   # session 16: large pages kept", True),
                 ("parity_specforge_300k_vocab8192_as_shipped",
                  "python -m benchmarks.bench_parity_specforge --data DATASET --feature-cache CACHE --max-samples 700 "
                  "--tokens 300000 --threads 1 --holdout-rows 64 --draft-vocab-size 8192 --setup-specforge "
                  "--name parity_specforge_300k_vocab8192_as_shipped", True),
                 ("parity_specforge_300k_sequential",
                  "python -m benchmarks.bench_parity_specforge --data DATASET --feature-cache CACHE --max-samples 700 "
                  "--tokens 300000 --threads 1 --holdout-rows 64 --draft-vocab-size 8192 --setup-specforge "
                  "--name parity_specforge_300k_sequential", True),
                 ("parity_specforge_300k",
                  "python -m benchmarks.bench_parity_specforge --data DATASET --tokens 300000 --threads 1 "
                  "--holdout-rows 64 --draft-vocab-size 8192 --parallel --setup-specforge", True))),
)


def select(only: str | None) -> list[Bench]:
    """The make-bench entries, or those named in a comma-separated --only list."""
    if not only:
        return [b for b in BENCHMARKS if b.in_make_bench]
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {b.name: b for b in BENCHMARKS if b.in_make_bench}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SpecRelayError(f"unknown benchmark(s) {', '.join(unknown)} in --only; choose from {', '.join(known)}")
    return [known[n] for n in names]
