"""The tokenized dataset on disk: what prepare-data writes and the trainer reads.

A directory holding
  samples.arrow   Arrow IPC file, memory-mapped: sample_id int64, input_ids list<int32>,
                  loss_mask list<uint8> (1 = supervised token: assistant content + end of turn)
  meta.json       tokenizer fingerprint, vocab size, options, statistics
Written to a temporary directory and renamed into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.errors import DataError

SAMPLES_FILE = "samples.arrow"
META_FILE = "meta.json"

SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("loss_mask", pa.list_(pa.uint8()), nullable=False),
])


def write_tokenized_dataset(path: str | Path, rows: Iterable[tuple[int, Any, Any]], meta: dict[str, Any],
                            rows_per_batch: int = 1024) -> Path:
    """Write (sample_id, input_ids, loss_mask) rows atomically; returns the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        n = 0
        with pa.OSFile(str(tmp / SAMPLES_FILE), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            buf: list[tuple[int, Any, Any]] = []

            def flush():
                writer.write_batch(pa.RecordBatch.from_arrays([
                    pa.array([r[0] for r in buf], pa.int64()),
                    pa.array([np.asarray(r[1], dtype=np.int32) for r in buf], pa.list_(pa.int32())),
                    pa.array([np.asarray(r[2], dtype=np.uint8) for r in buf], pa.list_(pa.uint8())),
                ], schema=SCHEMA))
                buf.clear()

            for row in rows:
                if len(row[1]) != len(row[2]):
                    raise DataError(f"sample {row[0]}: {len(row[1])} tokens but {len(row[2])} mask values")
                buf.append(row)
                n += 1
                if len(buf) >= rows_per_batch:
                    flush()
            if buf:
                flush()
        (tmp / META_FILE).write_text(json.dumps({**meta, "num_samples": n}, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class TokenizedDataset:
    """Random access to a tokenized dataset (memory-mapped; rows are numpy views)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        f = self.path / SAMPLES_FILE
        if not f.is_file():
            raise DataError(f"{self.path} is not a tokenized dataset (no {SAMPLES_FILE}); run `draft-trainer prepare-data`")
        self.meta: dict[str, Any] = json.loads((self.path / META_FILE).read_text()) if (self.path / META_FILE).is_file() else {}
        self._table = pa.ipc.open_file(pa.memory_map(str(f), "r")).read_all()
        if not self._table.schema.equals(SCHEMA, check_metadata=False):
            raise DataError(f"{f} has schema {self._table.schema}, expected {SCHEMA}")
        self._table = self._table.combine_chunks()
        ids_col = self._table.column("input_ids").chunk(0) if self._table.num_rows else None
        mask_col = self._table.column("loss_mask").chunk(0) if self._table.num_rows else None
        if ids_col is not None:
            self._offsets = ids_col.offsets.to_numpy()
            self._ids = ids_col.values.to_numpy()
            self._mask = mask_col.values.to_numpy()
        else:
            self._offsets = np.zeros(1, dtype=np.int32)
            self._ids = np.zeros(0, dtype=np.int32)
            self._mask = np.zeros(0, dtype=np.uint8)
        self.sample_ids = self._table.column("sample_id").to_numpy()

    def __len__(self) -> int:
        return self._table.num_rows

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        a, b = self._offsets[i], self._offsets[i + 1]
        return int(self.sample_ids[i]), self._ids[a:b], self._mask[a:b]

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.meta.get("tokenizer_fingerprint")
