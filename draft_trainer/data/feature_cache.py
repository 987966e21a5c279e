"""Feature cache: keep the features a run received, train from them later without any server.

Hybrid online/offline training: `--feature-cache DIR` appends every feature set the trainer
receives to Arrow IPC shards (the same record-batch schema as the wire, common/features.py);
`--offline` trains from the cache alone. Hidden states are large (4.5 KiB/token at H=576,
32 KiB/token at H=4096), so the expected size is estimated and logged before anything is
written, and writing stops (with a warning, counted) at `limit_bytes`.

Layout: `<dir>/meta.json` (the ModelInfo contract + wire schema, and the tokenized dataset's cache
key: sample ids are the dataset's, so a cache holds one dataset's features), `<dir>/frozen.safetensors`
(the target's embedding and lm_head, so offline training needs no server at all) and
`<dir>/shard-r<rank>-<n>.arrow` (IPC files, renamed into place when complete; a crash loses at
most the shard being written, never corrupts the cache). Reads are memory-mapped, so cached
tensors are zero-copy views of the page cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_write_json, check_output_dir
from common.contract import ModelInfo
from common.errors import ContractError, DataError
from common.features import FeatureSpec, FeatureSchema, SampleFeatures, decode_batch, encode_batch

log = logging.getLogger(__name__)

META = "meta.json"
FROZEN = "frozen.safetensors"


def feature_bytes_per_token(info: ModelInfo, spec: FeatureSpec | None = None) -> int:
    """Bytes of one token's features (default spec: the server's aux layers + hidden teacher)."""
    spec = spec or FeatureSpec(tuple(info.aux_layer_ids))
    item = 4 if info.dtype == "float32" else 2
    per = len(spec.layer_ids) * info.hidden_size * item
    per += {"hidden": info.hidden_size * item, "topk": spec.topk * 8, "none": 0}[spec.teacher]
    return per


def estimate_bytes(num_tokens: int, info: ModelInfo, spec: FeatureSpec | None = None) -> int:
    return num_tokens * feature_bytes_per_token(info, spec)


class FeatureCacheWriter:
    def __init__(self, path: str | Path, info: ModelInfo, schema: FeatureSchema, *, rank: int = 0,
                 limit_bytes: int = 0, shard_bytes: int = 256 << 20,
                 frozen: dict[str, torch.Tensor] | None = None, dataset_key: str = "") -> None:
        # Rank 0 checks (it writes meta.json, which the others' check would race with).
        self.path = check_output_dir(path, "feature cache", recognize=(META,), what="a feature cache",
                                     hint="give feature_cache.dir a new directory") if rank == 0 else Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rank = rank
        self.limit_bytes = limit_bytes
        self.shard_bytes = shard_bytes
        self.written_bytes = 0
        self.written_samples = 0
        self.skipped_samples = 0  # over the limit
        self._shard_index = len(list(self.path.glob(f"shard-r{rank}-*.arrow")))
        self._writer = None
        self._sink = None
        self._tmp: Path | None = None
        self._shard_written = 0
        # Samples already cached (a resumed run, a run reading its cache back) are not written twice.
        self._ids: set[int] = {sid for _, ids in _scan(self.path) for sid in ids.tolist()}
        meta = json.loads(json.dumps({"model_info": asdict(info), "schema": asdict(schema)}))  # tuples as JSON lists
        if dataset_key:
            meta["dataset_key"] = dataset_key
        meta_path = self.path / META
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old.get("dataset_key", "") != meta.get("dataset_key", ""):
                raise ContractError(f"feature cache {self.path} holds features of another dataset (cache key "
                                    f"{old.get('dataset_key') or 'unknown'}, this run's is {dataset_key or 'unknown'}); "
                                    "sample ids would collide: give feature_cache.dir a new directory")
            if old != meta:
                raise ContractError(f"feature cache {self.path} holds features of a different model or schema; "
                                    "use a new directory")
        elif rank == 0:
            atomic_write_json(meta_path, meta)
        if frozen is not None and not (self.path / FROZEN).is_file():
            tmp = self.path / f".{FROZEN}.tmp"
            save_file({k: v.contiguous() for k, v in frozen.items()}, str(tmp))
            os.replace(tmp, self.path / FROZEN)

    def _open(self) -> None:
        name = f"shard-r{self.rank}-{self._shard_index:05d}.arrow"
        self._tmp = self.path / f".{name}.tmp"
        self._final = self.path / name
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema.arrow())
        self._shard_written = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        os.replace(self._tmp, self._final)
        self._writer = None
        self._shard_index += 1

    def add(self, rows: list[SampleFeatures]) -> bool:
        """Append complete samples; False (and counted) once the size limit is reached, False (not
        counted) for samples this writer already holds (a later epoch, a held-out sample evaluated again)."""
        rows = [r for r in rows if r.sample_id not in self._ids]
        if not rows:
            return False
        batch = encode_batch(self.schema, rows)
        if self.limit_bytes and self.written_bytes + batch.nbytes > self.limit_bytes:
            if self.skipped_samples == 0:
                log.warning("feature cache %s reached its limit of %.2f GB; further features are not cached",
                            self.path, self.limit_bytes / 1e9)
            self.skipped_samples += len(rows)
            return False
        if self._writer is None:
            self._open()
        self._writer.write_batch(batch)
        self.written_bytes += batch.nbytes
        self.written_samples += len(rows)
        self._ids.update(r.sample_id for r in rows)
        self._shard_written += batch.nbytes
        if self._shard_written >= self.shard_bytes:
            self._close_shard()
        return True

    def flush(self) -> None:
        """Close the shard being written, so that a reader opened now sees every sample added so far."""
        self._close_shard()

    def close(self) -> None:
        self._close_shard()


def _scan(path: Path):
    """(record batch, its sample ids) of every complete shard (an unfinished one is a hidden .tmp file)."""
    for shard in sorted(path.glob("shard-*.arrow")):
        reader = pa.ipc.open_file(pa.memory_map(str(shard), "r"))
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            yield batch, batch.column("sample_id").to_numpy()


class FeatureCacheReader:
    """Random access by sample id over every complete shard (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not a feature cache (no {META}); train online with --feature-cache first")
        meta = json.loads(meta_path.read_text())
        self.info = ModelInfo(**meta["model_info"])
        sch = meta["schema"]
        self.schema = FeatureSchema(**{**sch, "layer_ids": tuple(sch.get("layer_ids") or ())})
        self.dataset_key: str = meta.get("dataset_key", "")  # "" in caches written before it was recorded
        self._batches: list[pa.RecordBatch] = []
        self._index: dict[int, tuple[int, int]] = {}
        for batch, ids in _scan(self.path):
            for row, sid in enumerate(ids.tolist()):
                self._index[sid] = (len(self._batches), row)
            self._batches.append(batch)

    def __len__(self) -> int:
        return len(self._index)

    def check_spec(self, spec: FeatureSpec) -> None:
        """The cache must hold exactly the features the run's method asks for."""
        have = self.schema.layer_ids or tuple(self.info.aux_layer_ids)  # caches from before feature specs
        if tuple(have) != tuple(spec.layer_ids) or self.schema.teacher != spec.teacher or \
                (spec.teacher == "topk" and self.schema.topk != spec.topk):
            raise ContractError(f"feature cache {self.path} holds layers {list(have)}, teacher {self.schema.teacher} "
                                f"but the run's method asks for {spec}; train online to build a cache for it")

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        path = self.path / FROZEN
        if not path.is_file():
            raise DataError(f"feature cache {self.path} has no {FROZEN} (the target's embedding and lm_head); "
                            "re-create it with an online run")
        return load_file(str(path))

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._index

    def get(self, sample_id: int) -> SampleFeatures | None:
        where = self._index.get(sample_id)
        if where is None:
            return None
        b, row = where
        return decode_batch(self._batches[b].slice(row, 1))[0]
