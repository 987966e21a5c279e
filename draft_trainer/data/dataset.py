"""The tokenized dataset on disk: what prepare-data writes and the trainer reads.

A directory holding
  samples.arrow   Arrow IPC file, memory-mapped: sample_id int64, input_ids list<int32>,
                  loss_mask list<uint8> (1 = supervised token: assistant content + end of turn)
  meta.json       tokenizer fingerprint, vocab size, options, cache key
plus what prepare-data adds (stats.json, vocab.json, conversations.jsonl; see data/prepare.py).
Written to a temporary directory and renamed into place, so a reader never sees half a dataset.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.errors import DataError
from common.files import OUTPUT_MARKER, check_output_dir, new_temp_dir, swap_in

SAMPLES_FILE = "samples.arrow"
META_FILE = "meta.json"
DATASET_KIND = "prepare-data"  # the marker a tokenized dataset carries (common/files.py:OUTPUT_MARKER)

SCHEMA = pa.schema([
    pa.field("sample_id", pa.int64(), nullable=False),
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("loss_mask", pa.list_(pa.uint8()), nullable=False),
])


def _arrow(a: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A numpy array as an Arrow array without a copy (and without pa.array's pandas import)."""
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(type_, len(a), [None, pa.py_buffer(a)])


class DatasetWriter:
    """Builds a dataset in a temporary directory beside `path`; `commit()` swaps it into place.

    Rows are streamed to disk in record batches; extra files (stats, vocabulary, ...) go into
    `self.tmp` before the commit. Leaving the context without a commit removes everything.
    """

    def __init__(self, path: str | Path, rows_per_batch: int = 1024) -> None:
        self.path = check_output_dir(path, DATASET_KIND, recognize=(SAMPLES_FILE,), what="a tokenized dataset",
                                     error=DataError)
        self.tmp = new_temp_dir(self.path)
        self.rows_per_batch = rows_per_batch
        self.num_samples = 0
        self._buf: list[tuple[int, Any, Any]] = []
        self._sink = pa.OSFile(str(self.tmp / SAMPLES_FILE), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)

    def add(self, sample_id: int, input_ids: Any, loss_mask: Any) -> None:
        if len(input_ids) != len(loss_mask):
            raise DataError(f"sample {sample_id}: {len(input_ids)} tokens but {len(loss_mask)} mask values")
        self._buf.append((sample_id, input_ids, loss_mask))
        self.num_samples += 1
        if len(self._buf) >= self.rows_per_batch:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        n = len(self._buf)
        lengths = np.fromiter((len(r[1]) for r in self._buf), dtype=np.int64, count=n)
        offsets = _arrow(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
        ids = np.concatenate([np.asarray(r[1], dtype=np.int32) for r in self._buf])
        mask = np.concatenate([np.asarray(r[2], dtype=np.uint8) for r in self._buf])
        self._writer.write_batch(pa.RecordBatch.from_arrays([
            _arrow(np.fromiter((r[0] for r in self._buf), dtype=np.int64, count=n), pa.int64()),
            pa.ListArray.from_arrays(offsets, _arrow(ids, pa.int32())),
            pa.ListArray.from_arrays(offsets, _arrow(mask, pa.uint8())),
        ], schema=SCHEMA))
        self._buf.clear()

    def commit(self, meta: dict[str, Any]) -> Path:
        """Finish the samples file, write meta.json, and atomically replace `path`."""
        self._flush()
        self._writer.close()
        self._sink.close()
        (self.tmp / META_FILE).write_text(json.dumps({**meta, "num_samples": self.num_samples}, indent=1))
        (self.tmp / OUTPUT_MARKER).write_text(DATASET_KIND + "\n")
        swap_in(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # noqa: BLE001 - best effort; the directory goes anyway
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.tmp.exists():
            self.abort()


def write_tokenized_dataset(path: str | Path, rows: Iterable[tuple[int, Any, Any]], meta: dict[str, Any],
                            rows_per_batch: int = 1024) -> Path:
    """Write (sample_id, input_ids, loss_mask) rows atomically; returns the directory."""
    with DatasetWriter(path, rows_per_batch) as w:
        for sid, ids, mask in rows:
            w.add(sid, ids, mask)
        return w.commit(meta)


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
        # One view per record batch into the memory map (combine_chunks would copy everything).
        self._chunk_ids, self._chunk_mask, self._chunk_offsets = [], [], []
        for ids_col, mask_col in zip(self._table.column("input_ids").chunks, self._table.column("loss_mask").chunks):
            if len(ids_col) == 0:
                continue
            off = ids_col.offsets.to_numpy()
            self._chunk_offsets.append(off)
            self._chunk_ids.append(ids_col.values.to_numpy())
            self._chunk_mask.append(mask_col.values.to_numpy())
        self._chunk_starts = np.cumsum([0] + [len(o) - 1 for o in self._chunk_offsets])
        self.sample_ids = self._table.column("sample_id").to_numpy()

    def __len__(self) -> int:
        return self._table.num_rows

    @property
    def lengths(self) -> np.ndarray:
        if not self._chunk_offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self._chunk_offsets]).astype(np.int64)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        i %= len(self)
        c = int(np.searchsorted(self._chunk_starts, i, side="right")) - 1
        j = i - self._chunk_starts[c]
        a, b = self._chunk_offsets[c][j], self._chunk_offsets[c][j + 1]
        return int(self.sample_ids[i]), self._chunk_ids[c][a:b], self._chunk_mask[c][a:b]

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.meta.get("tokenizer_fingerprint")
