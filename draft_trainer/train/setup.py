"""Setting up a run: from a TrainConfig to the objects the loop composes.

    run = build_run(cfg, dist, stack, metrics)   # metrics: the run's TrainerMetrics (the pool reports into it)

In order: the dataset and its held-out split (SampleStream), the resume point and its state,
the feature source (target pool handshake, or an offline feature cache), the contract checks
(tokenizer, the method's feature spec against what the servers capture, agreed limits), the
draft vocabulary, the method's model (+ `model.init`), FSDP2, the optimizer, and the restored
checkpoint. Each piece is built by one function here and owned by the `Run` afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from common.contract import ModelInfo, check_feature_spec
from common.errors import ConfigError, ContractError, DataError
from common.features import FeatureSchema, FeatureSpec
from common.memory import describe_allocator, keep_large_pages
from draft_trainer.client.config import client_kwargs
from draft_trainer.config import TrainConfig
from draft_trainer.data.dataset import TokenizedDataset
from draft_trainer.data.feature_cache import FeatureCacheReader, FeatureCacheWriter, estimate_bytes
from draft_trainer.data.vocab import VocabMapping, choose_vocab, count_supervised_tokens
from draft_trainer.methods import get_method
from draft_trainer.methods.base import DraftMethod
from draft_trainer.train import checkpoint as ckpt_io
from draft_trainer.train.optim import AdamW
from draft_trainer.train.parallel import DistInfo, apply_fsdp, broadcast_tensors
from draft_trainer.train.samples import SampleStream

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a training run is made of once set up (each field built once, in build_run)."""

    cfg: TrainConfig
    dist: DistInfo
    out: Path
    dataset: TokenizedDataset
    stream: SampleStream
    method: DraftMethod
    info: ModelInfo | None = None
    spec: FeatureSpec | None = None
    pool: object | None = None                      # draft_trainer.client.pool.TargetPool (online)
    cache_reader: FeatureCacheReader | None = None  # offline
    init_tensors: dict = field(default_factory=dict)  # target tensors fetched for model.init (kept in a feature cache)
    cache_writer: FeatureCacheWriter | None = None
    vocab: VocabMapping | None = None
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    resume: Path | None = None
    restored: dict = field(default_factory=dict)    # the checkpoint's trainer + rank state, when resuming


def build_run(cfg: TrainConfig, dist: DistInfo, stack: contextlib.ExitStack, metrics, stop=None) -> Run:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = TokenizedDataset(cfg.data.path)
    if len(dataset) == 0:
        raise DataError(f"dataset {cfg.data.path} has no samples")
    if dist.is_main:
        ckpt_io.clean_stale_temps(out / "checkpoints")
    resume = resolve_resume(cfg, out)
    if resume is None and not cfg.resume_from:
        refuse_existing_run(out)
    run = Run(cfg=cfg, dist=dist, out=out, dataset=dataset, stream=None, method=get_method(cfg.model.method, cfg.model),
              resume=resume)
    state = json.loads((resume / ckpt_io.TRAINER_STATE).read_text()) if resume else None
    if cfg.feature_cache.offline:
        run.cache_reader = FeatureCacheReader(cfg.feature_cache.dir)
        run.info = run.cache_reader.info
        frozen = run.cache_reader.frozen_tensors() if dist.is_main else None
    else:
        run.pool = start_pool(cfg, dist, stack, out, resume, metrics, stop)
        run.info = run.pool.info
        names = run.method.frozen_tensor_names()
        frozen = run.pool.call_any(lambda c: c.fetch_tensors(names), "FetchTensors") if dist.is_main else None
    max_length = agreed_max_length(cfg, run.info)
    if cfg.eval.holdout >= len(dataset):
        log.warning("eval.holdout=%d is not smaller than the dataset (%d samples): only one sample is left to "
                    "train on", cfg.eval.holdout, len(dataset))
    run.stream = SampleStream(dataset, seed=cfg.seed, rank=dist.rank, world=dist.world_size,
                              holdout=cfg.eval.holdout, max_length=max_length, epochs=cfg.epochs,
                              supervise=cfg.data.supervise)
    if state:
        check_resume_state(cfg, dist, resume, state, len(dataset), len(run.stream.eval_indices))
    check_dataset_contract(cfg, dataset, run.info)
    run.spec = run.method.feature_spec(run.info, cfg.targets.teacher, cfg.targets.topk)
    check_feature_spec(run.info, run.spec, where="the target" if run.pool else f"feature cache {cfg.feature_cache.dir}")
    if run.cache_reader is not None:
        run.cache_reader.check_spec(run.spec)
        key = dataset.meta.get("cache_key", "")
        if run.cache_reader.dataset_key and key and run.cache_reader.dataset_key != key:
            raise ContractError(f"feature cache {cfg.feature_cache.dir} holds the features of another dataset (cache key "
                                f"{run.cache_reader.dataset_key}) than data.path={cfg.data.path} ({key}): sample ids "
                                "would pair features with the wrong tokens; point data.path at the dataset it was built from")
    if run.pool is not None:
        if cfg.targets.wire_dtypes:   # how the servers send it (e.g. aux as fp8); decoded to the served dtype
            run.spec = replace(run.spec, tensor_dtypes=cfg.targets.wire_dtypes)
        run.pool.feature_spec = run.spec
    # Rank 0 fetched the frozen target tensors once; every rank gets a copy.
    frozen = broadcast_tensors(frozen, dist)

    run.vocab = VocabMapping.load(resume / "vocab.json") if resume else vocab_mapping(cfg, dataset, run.stream,
                                                                                      run.info.vocab_size)
    build_model(run, frozen, init=not resume)
    if resume:
        check_resume_model(run, resume)
        run.restored = ckpt_io.load_checkpoint(resume, run.model, run.optimizer, dist)
    if cfg.feature_cache.dir and not cfg.feature_cache.offline:
        run.cache_writer = open_cache(run, {**frozen, **run.init_tensors})
        stack.callback(run.cache_writer.close)
    return run


def resolve_resume(cfg: TrainConfig, out: Path) -> Path | None:
    r = cfg.resume_from
    if not r:
        return None
    if r == "auto":
        found = ckpt_io.latest_checkpoint(out / "checkpoints")
        if found is None:
            log.info("resume_from=auto: no checkpoint in %s, starting fresh", out / "checkpoints")
        return found
    p = Path(r)
    if p.is_dir() and not (p / ckpt_io.COMPLETE).is_file() and (p / "checkpoints").is_dir():
        p = ckpt_io.latest_checkpoint(p / "checkpoints") or p  # a run directory
    if not (p / ckpt_io.COMPLETE).is_file():
        raise ConfigError(f"resume_from={r}: not a complete checkpoint (no {ckpt_io.COMPLETE} marker); point it at "
                          f"a checkpoints/step_N directory, `latest`, or use resume_from=auto")
    return p.resolve()


def refuse_existing_run(out: Path) -> None:
    """A fresh run into a directory that holds one would mix both in metrics.jsonl and the plots."""
    held = [n for n in ("metrics.jsonl", "summary.json") if (out / n).is_file()]
    if ckpt_io.list_checkpoints(out / "checkpoints"):
        held.append("checkpoints/")
    if held:
        raise ConfigError(f"output_dir {out} already holds a run ({', '.join(held)}); continue it with "
                          f"resume_from=auto, or start a new one with another output_dir=...")


def check_resume_state(cfg: TrainConfig, dist: DistInfo, path: Path, state: dict, n_samples: int,
                       n_heldout: int) -> None:
    mine = {"seed": cfg.seed, "dataset_samples": n_samples, "eval_holdout": n_heldout,
            "batch_size": cfg.batch_size, "world_size": dist.world_size}
    for k, v in mine.items():
        if state.get(k) != v:
            raise ConfigError(f"resume_from={path}: the checkpoint's {k} is {state.get(k)!r} but this run has {v!r}; "
                              "the data cursors only mean something for the same sample order")


def check_resume_model(run: Run, path: Path) -> None:
    """The draft this run builds must be the checkpoint's: otherwise the load fails deep in DCP (or, for a
    setting that changes no shape, continues as another model). Names the settings to resume with."""
    saved = json.loads((path / "draft_config.json").read_text())
    mine = json.loads(json.dumps(run.method.draft_config(run.model)))
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if not diff:
        return
    then = json.loads((path / "config.json").read_text()).get("model", {})
    now = json.loads(json.dumps(asdict(run.cfg.model)))
    hint = ", ".join(f"model.{k}={then[k]}" for k in sorted(then) if then.get(k) != now.get(k)) or \
        "the model settings in its config.json"
    raise ConfigError(f"resume_from={path}: the checkpoint's draft differs from the one this run builds "
                      f"({'; '.join(f'{k}: {saved.get(k)!r} there, {mine.get(k)!r} here' for k in diff)}); "
                      f"resume with {hint}")


def start_pool(cfg: TrainConfig, dist: DistInfo, stack: contextlib.ExitStack, out: Path, resume: Path | None,
               metrics, stop=None):
    from draft_trainer.client.discovery import EndpointSource
    from draft_trainer.client.local_server import LocalServer, start_all
    from draft_trainer.client.pool import TargetPool

    endpoint = cfg.targets.endpoints
    if not endpoint:
        # The embedded default: rank 0 starts the local servers (targets.embedded_servers); every rank uses them.
        if dist.is_main:
            t = cfg.targets
            servers = [LocalServer(["--model", t.embedded_model, "--backend", "hf", "--dtype", t.embedded_dtype],
                                   log_path=out / ("embedded_server.log" if i == 0 else f"embedded_server_{i}.log"),
                                   threads=t.embedded_threads, startup_timeout_s=t.startup_timeout_s)
                       for i in range(t.embedded_servers)]
            for server in start_all(servers):
                stack.callback(server.stop)
            endpoints = [server.endpoint for server in servers]
            endpoint = ",".join(endpoints)
            log.info("embedded target server%s at %s", "s" if len(endpoints) > 1 else "", endpoint)
        if dist.distributed:
            import torch.distributed as tdist

            box = [endpoint]
            tdist.broadcast_object_list(box, src=0)
            endpoint = box[0]
    expected = ModelInfo(**json.loads((resume / "model_info.json").read_text())) if resume else None
    pool = TargetPool(EndpointSource(endpoint), cfg.targets, metrics=metrics,
                      client_kwargs=client_kwargs(cfg.targets), expected=expected,
                      expected_name=f"checkpoint {resume}" if resume else "the run")
    stack.callback(pool.close)
    pool.info = pool.start(stop)  # the wait for servers ends early when `stop` is set
    return pool


def agreed_max_length(cfg: TrainConfig, info: ModelInfo) -> int:
    """Samples are cut to the smaller of data.max_length and what the servers accept, agreed
    before training instead of discovered as refusals mid-run."""
    server_max = int(info.max_length or 0)
    if server_max and server_max < cfg.data.max_length:
        log.info("data.max_length %d > the target's max length %d: samples are truncated to %d",
                 cfg.data.max_length, server_max, server_max)
        return server_max
    return cfg.data.max_length


def check_dataset_contract(cfg: TrainConfig, dataset: TokenizedDataset, info: ModelInfo) -> None:
    fp = dataset.tokenizer_fingerprint
    if fp and fp != info.tokenizer_fingerprint:
        raise ContractError(
            f"tokenizer mismatch: dataset {cfg.data.path} was tokenized with tokenizer {fp[:12]}… but the "
            f"target uses {info.tokenizer_fingerprint[:12]}…; re-run prepare-data with the served model"
        )


def vocab_mapping(cfg: TrainConfig, dataset: TokenizedDataset, stream: SampleStream, vocab_size: int) -> VocabMapping:
    def counts_V():
        ids = [dataset[int(i)][1] for i in stream.train_indices]
        masks = [dataset[int(i)][2] for i in stream.train_indices]
        return count_supervised_tokens(ids, masks, vocab_size)

    pinned = Path(cfg.data.vocab_path or Path(cfg.data.path) / "vocab.json")
    return choose_vocab(cfg.data.draft_vocab_size, pinned, vocab_size, counts_V, pinned_by_user=bool(cfg.data.vocab_path))


def build_model(run: Run, frozen: dict[str, torch.Tensor], init: bool) -> None:
    cfg, dist, method = run.cfg, run.dist, run.method
    torch.manual_seed(cfg.seed)  # the same initial draft on every rank
    model = method.build_model(run.info, run.vocab, run.spec)
    fetch = None
    if run.pool is not None:
        def fetch(names: list[str]) -> dict[str, torch.Tensor]:
            # rank 0 fetches target tensors once, every rank applies the same start; a feature cache written
            # by this run keeps them, so an offline run can start the same way.
            got = broadcast_tensors(run.pool.call_any(lambda c: c.fetch_tensors(names), "FetchTensors")
                                    if dist.is_main else None, dist)
            run.init_tensors.update(got)
            return got
    elif run.cache_reader is not None:
        def fetch(names: list[str]) -> dict[str, torch.Tensor]:
            missing = [n for n in names if n not in frozen]
            if missing:
                raise ConfigError(f"model.init={cfg.model.init}: feature cache {cfg.feature_cache.dir} does not hold "
                                  f"the target tensors {missing} (it was written by a run with another init); use "
                                  "model.init=random, or write the cache with a run that uses this init")
            return {n: frozen[n] for n in names}
    method.init_from_target(model, cfg.model.init if init else "random", run.info, run.vocab, frozen, fetch, cfg.seed)
    model = model.to(dist.device)
    method.bind(model, frozen, run.vocab, dist.device)
    if dist.distributed:
        apply_fsdp(model, method.unsharded_params(model))
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    # fused: one pass per parameter (~8x less optimizer time on CPU than the per-tensor loop);
    # sharded (DTensor) parameters take the foreach implementation. train/optim.py: torch's AdamW
    # without the ~160 MB torch._dynamo import.
    run.optimizer = AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                          **({} if dist.distributed else {"fused": True}))
    run.model = model
    malloc = describe_allocator()
    if cfg.keep_large_pages and keep_large_pages():
        malloc += ", large pages kept"
    log.info("draft (%s): %d trainable params, Vd=%d (coverage %.3f), features %s, %d rank(s); malloc: %s",
             method.name, sum(p.numel() for p in params), run.vocab.draft_vocab_size, run.vocab.coverage, run.spec,
             dist.world_size, malloc)


def open_cache(run: Run, frozen: dict[str, torch.Tensor]) -> FeatureCacheWriter:
    fc = run.cfg.feature_cache
    # The cache keeps the decoded features in the served dtype (re-quantizing fp8 would round twice).
    schema = FeatureSchema.for_spec(replace(run.spec, tensor_dtypes=()), run.info.hidden_size, run.info.dtype)
    tokens = run.stream.usable_train_tokens()
    est = estimate_bytes(tokens, run.info, run.spec)
    limit = int(fc.limit_gb * 1e9)
    log.info("feature cache %s: about %.2f GB for this rank's samples (one epoch); limit %s", fc.dir, est / 1e9,
             f"{fc.limit_gb:g} GB" if limit else "none")
    return FeatureCacheWriter(fc.dir, run.info, schema, rank=run.dist.rank, limit_bytes=limit,
                              frozen=frozen if run.dist.is_main else None,
                              dataset_key=run.dataset.meta.get("cache_key", ""))

