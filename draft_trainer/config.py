"""The trainer's typed configuration (YAML file + `key.sub=value` overrides; see common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.errors import ConfigError, SchemaError
from common.features import FeatureSpec
from common.hardware import pick_dtype


@dataclass
class DataConfig:
    path: str = ""                   # tokenized dataset directory (draft-trainer prepare-data)
    max_length: int = 2048           # longer samples are truncated (counted in the summary)
    # Draft vocabulary (data/vocab.py `choose_vocab`): 0 = the dataset's pinned one (prepare-data
    # --draft-vocab-size, 32,000 by default), else 32,000; N = N tokens (capped at the target vocabulary),
    # taken from the training split's counts when the dataset pins another size.
    draft_vocab_size: int = 0
    vocab_path: str = ""             # a pinned draft vocabulary file (default: <path>/vocab.json)
    # Which positions train: "assistant" = the dataset's loss mask (assistant content); "all" = every
    # position (prompts and template too). The labels are the target's own distribution at each position
    # (the teacher), so prompt positions are valid examples; held-out evaluation keeps the assistant mask.
    supervise: Literal["assistant", "all"] = "assistant"


@dataclass
class TargetsConfig:
    endpoints: str = ""              # host:port,host:port | dns:NAME:PORT | file:PATH; empty = embedded server
    embedded_model: str = ""         # model directory for the embedded local server (HF backend)
    embedded_dtype: str = "fp32"     # dtype of the embedded server's target model (as target-server --dtype; auto too)
    embedded_threads: int = 0        # torch threads of the embedded server (OMP_NUM_THREADS); 0 = torch's default
    embedded_servers: int = 1        # how many embedded servers (each with embedded_threads): single-threaded
                                     # processes share cores by time slices, where one wider server's OpenMP stalls
    teacher: Literal["hidden", "topk"] = "hidden"  # the teacher signal (methods that read one): final hidden or top-k
    topk: int = 0                    # for teacher=topk
    wire_dtypes: str = ""            # per-tensor wire dtypes, e.g. "aux=float8_e4m3,teacher=float8_e4m3": e4m3 + per-token scale, half of bf16's bytes, decoded to the served dtype; empty = as served
    request_timeout_s: float = 120.0  # per-request deadline; a request past it is re-issued elsewhere
    startup_timeout_s: float = 300.0  # wait this long for the first server at start-up
    # The pool (draft_trainer/client): discovery, windows, failover. Tokens bound memory: one token
    # costs about 8*H bytes in flight (bf16 aux 3H + teacher H), 32 KiB at H=4096.
    refresh_interval_s: float = 10.0       # re-resolve dns:/file: endpoints this often
    unavailable_timeout_s: float = 300.0   # no server reachable this long -> stop (with a checkpoint)
    request_tokens: int = 4096             # target size of one Flight request (at least one sample)
    max_inflight_tokens: int = 65536       # requested, not yet received (all servers)
    max_endpoint_inflight_tokens: int = 16384  # requested, not yet received (one server)
    slow_start: bool = True                # a (re)joined server's window starts at one sample and doubles per round trip
    max_buffered_tokens: int = 131072      # dispatched, not yet consumed by the trainer (memory bound)
    max_attempts: int = 5                  # failures of one sample before it is dropped (reason target_error)
    hedge_after_s: float = 2.0             # a request blocking the trainer longer than max(this, 4x typical)
                                           # is also sent to another server; <= 0 disables
    probe_max_backoff_s: float = 10.0      # probes of a down server back off up to this interval
    auth_token_file: str = ""        # the servers' bearer token (same file as their --auth-token-file)
    tls_root_cert: str = ""          # PEM root that signed the servers' --tls-cert; enables TLS
    tls_server_name: str = ""        # name to verify when the certificate does not name the dialled address


@dataclass
class ModelConfig:
    method: str = "eagle3"           # the draft method (draft_trainer/methods); or `package.module:Class`
    ttt_steps: int = 7               # EAGLE-3: training-time-test steps, draft positions unrolled per sample
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # compute dtype; auto = bf16 where supported
    init: Literal["random", "target"] = "random"  # target: start from the target's lm_head/final norm and the
                                                  # decoder layer after the last aux layer (methods/eagle3/init.py)
    eagle_variant: str = "3"         # EAGLE-3: "3" or "3.1" (adds fc_norm, an RMSNorm per aux layer before fc, and
                                     # norm_output, the next TTT step reads the normed output; SGLang/vLLM serve both)
    loss: Literal["kl", "lk_alpha", "lk_lambda"] = "kl"  # training objective per draft position (model/objective.py):
                                     # kl = soft cross-entropy to the target; LK losses (arXiv 2602.23881) train the
                                     # acceptance rate a = sum min(p, q): lk_alpha = -log a, lk_lambda = l*KL + (1-l)*(1-a)
    lk_eta: float = 3.0              # lk_lambda: l = exp(-lk_eta * a) (a not differentiated); the paper's best is 3
    feature_layers: list[int] = field(default_factory=list)  # target layers the draft reads (e.g. [1,14,29]; the
                                     # last layer = the final norm's input); empty = the method's default (EAGLE-3:
                                     # the servers' aux layers). Exported as the serving config's layer ids

    def validate(self) -> None:
        if self.eagle_variant not in EAGLE_VARIANTS:
            raise ConfigError(f"model.eagle_variant: {self.eagle_variant!r} is not one of {list(EAGLE_VARIANTS)}")
        if self.eagle_variant != "3" and self.method != "eagle3":
            raise ConfigError(f"model.eagle_variant={self.eagle_variant} is an EAGLE-3 variant; "
                              f"model.method is {self.method!r} (use model.method=eagle3, or model.eagle_variant=3 "
                              "to switch a 3.1 recipe to another method)")
        if not self.lk_eta > 0:
            raise ConfigError(f"model.lk_eta: must be > 0, got {self.lk_eta}")
        if self.feature_layers and (sorted(set(self.feature_layers)) != list(self.feature_layers)
                                    or min(self.feature_layers) < 0):
            raise ConfigError(f"model.feature_layers: {self.feature_layers} must be distinct layer ids >= 0 in "
                              "increasing order, e.g. [1,14,29]")


EAGLE_VARIANTS = ("3", "3.1")


@dataclass
class OptimConfig:
    lr: float = 1e-4                 # peak learning rate (AdamW)
    warmup_ratio: float = 0.015      # fraction of the schedule spent warming up linearly
    min_lr_ratio: float = 0.0        # the cosine decays to lr * this
    schedule: Literal["steps", "time"] = "steps"  # what the warm-up + cosine runs over: max_steps, or the
                                                  # run's time_budget_s (the budget, not the steps, ends the run)
    weight_decay: float = 0.0        # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    grad_clip: float = 0.5           # clip the global gradient norm to this


@dataclass
class FeatureCacheConfig:
    dir: str = ""                    # write received features here (Arrow IPC shards) while training
    limit_gb: float = 50.0           # stop caching (warn, count) past this size; 0 = no limit
    offline: bool = False            # train from `dir` alone, with no target server
    replay: bool = False             # online, but later epochs read back what `dir` holds: the targets compute
                                     # each sample once per run instead of once per epoch
    replay_threads: int = 0          # torch threads while an epoch needs no target (its cores are free); 0 = `threads`


@dataclass
class EvalConfig:
    holdout: int = 0                 # samples held out of training (a fixed, seed-independent choice)
    every_steps: int = 0             # evaluate every N optimizer steps (and at the end); 0 = only at the end
    keep_best: bool = True           # checkpoint the best held-out simulated acceptance length as `best`


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/draft"   # checkpoints, metrics.jsonl, summary.json, plots
    device: str = "auto"             # auto = cuda when available (one GPU per rank), else cpu
    seed: int = 0                    # draft init, data order (a resumed run must keep it)
    batch_size: int = 1              # samples per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1              # micro-batches per optimizer step (per rank)
    max_steps: int = 100             # stop after this many optimizer steps (or when epochs run out)
    time_budget_s: float = 0.0       # stop (with a checkpoint) at the first step boundary past this many seconds
                                     # of training, counted over the whole run (a resumed run continues it); 0 = none
    epochs: int = 1                  # passes over the dataset at most
    threads: int = 0                 # torch threads of each trainer rank; 0 = torch's default (all cores)
    keep_large_pages: bool = True    # under jemalloc: keep the pages of freed allocations over 8 MiB for the next
                                     # step instead of returning them to the system (docs/training.md, allocator)
    log_every: int = 1               # metrics.jsonl / progress line every N steps
    save_every: int = 0              # 0 = only at the end (and on SIGTERM/SIGINT)
    save_every_s: float = 0.0        # also checkpoint every N seconds of training (time-budgeted runs); 0 = off
    save_initial: bool = False       # also checkpoint the starting draft (step 0): the untrained baseline
    keep_last: int = 3               # complete checkpoints kept (plus `best`)
    resume_from: str = ""            # "auto" (latest checkpoint of output_dir, if any) or a checkpoint directory:
                                     # model, optimizer, RNG, step and per-rank data cursors; samples past the
                                     # cursor are fetched again
    progress: bool = True            # progress bar with ETA on rank 0
    tensorboard_dir: str = ""        # also log scalars for TensorBoard (needs the tensorboard package)
    metrics_host: str = "127.0.0.1"  # Prometheus /metrics bind address
    metrics_port: int = -1           # -1 = off, 0 = any free port; rank r of a host listens on port + local rank

    def validate(self) -> None:
        import os

        for obj, name in ((self.data, "path"), (self.data, "vocab_path"), (self.targets, "embedded_model"),
                          (self.feature_cache, "dir"), (self, "output_dir"), (self, "tensorboard_dir")):
            setattr(obj, name, os.path.expanduser(getattr(obj, name)))
        from draft_trainer.methods import method_class

        method_class(self.model.method)  # an unknown method is refused before anything starts
        self.model.validate()
        if self.data.draft_vocab_size < 0:
            raise ConfigError(f"data.draft_vocab_size={self.data.draft_vocab_size}: give a token count, or 0 for "
                              "the dataset's own vocabulary")
        if not self.data.path:
            raise ConfigError("data.path: required (a tokenized dataset from `draft-trainer prepare-data`)")
        if self.feature_cache.offline:
            if not self.feature_cache.dir:
                raise ConfigError("feature_cache.offline=true needs feature_cache.dir (a cache written by an online run)")
            if self.feature_cache.replay:
                raise ConfigError("feature_cache.replay reads back what an online run caches; an offline run reads "
                                  "the cache anyway: drop one of feature_cache.replay / feature_cache.offline")
        elif self.feature_cache.replay and not self.feature_cache.dir:
            raise ConfigError("feature_cache.replay=true needs feature_cache.dir (where the run caches its features)")
        elif not self.targets.endpoints and not self.targets.embedded_model:
            raise ConfigError("give targets.endpoints (running target servers) or targets.embedded_model "
                              "(a model directory to serve from a local embedded server)")
        pick_dtype(self.targets.embedded_dtype, setting="targets.embedded_dtype")   # refuses a bad name
        if self.batch_size <= 0 or self.max_steps <= 0 or self.model.ttt_steps <= 0 or self.grad_accum <= 0:
            raise ConfigError("batch_size, grad_accum, max_steps and model.ttt_steps must be > 0")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}")
        if self.eval.holdout < 0 or self.eval.every_steps < 0 or self.keep_last < 1:
            raise ConfigError("eval.holdout and eval.every_steps must be >= 0, keep_last >= 1")
        if self.optim.schedule == "time" and self.time_budget_s <= 0:
            raise ConfigError("optim.schedule=time runs the learning-rate schedule over time_budget_s: set time_budget_s > 0")
        if self.targets.teacher == "topk" and self.targets.topk <= 0:
            raise ConfigError("targets.topk must be > 0 when targets.teacher=topk")
        try:
            FeatureSpec((0,), self.targets.teacher, max(self.targets.topk, 1), self.targets.wire_dtypes)
        except SchemaError as e:
            raise ConfigError(f"targets.wire_dtypes={self.targets.wire_dtypes!r}: {e}") from None
        t = self.targets
        for name in ("request_tokens", "max_inflight_tokens", "max_endpoint_inflight_tokens", "max_buffered_tokens",
                     "max_attempts", "embedded_servers"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"targets.{name} must be > 0, got {getattr(t, name)}")
        for name in ("refresh_interval_s", "unavailable_timeout_s", "request_timeout_s", "startup_timeout_s",
                     "probe_max_backoff_s"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"targets.{name} must be > 0 seconds, got {getattr(t, name)}")
