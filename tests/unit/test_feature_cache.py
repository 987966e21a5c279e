"""Feature cache: write while training, read back zero-copy; limits, crash safety, contract."""

import json

import pytest
import torch

from common.contract import ModelInfo
from common.errors import ContractError, DataError
from common.features import FeatureSchema, SampleFeatures
from draft_trainer.data.feature_cache import FeatureCacheReader, FeatureCacheWriter, estimate_bytes

H = 8


def info(**kw):
    d = dict(architecture="LlamaForCausalLM", model_type="llama", num_layers=4, hidden_size=H, vocab_size=64,
             aux_layer_ids=[0, 1, 2], dtype="bfloat16", max_length=128, tokenizer_fingerprint="fp")
    d.update(kw)
    return ModelInfo(**d)


def sample(sid, t):
    g = torch.Generator().manual_seed(sid)
    return SampleFeatures(sid, 0, t, torch.randn(t, 3 * H, generator=g), torch.randn(t, H, generator=g))


def test_round_trip_across_shards(tmp_path):
    w = FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"), shard_bytes=1024)
    src = [sample(i, 5 + i) for i in range(10)]
    for i in range(0, 10, 2):
        assert w.add(src[i : i + 2])
    w.close()
    assert len(list(tmp_path.glob("shard-*.arrow"))) > 1  # small shard size forces several
    r = FeatureCacheReader(tmp_path)
    assert len(r) == 10 and 3 in r and 99 not in r
    for s in src:
        got = r.get(s.sample_id)
        assert torch.equal(got.aux_T3H, s.aux_T3H.to(torch.bfloat16))
        assert torch.equal(got.teacher_TH, s.teacher_TH.to(torch.bfloat16))
    assert r.get(99) is None
    assert r.info.hidden_size == H


def test_limit_stops_writing_and_counts(tmp_path):
    per_sample = estimate_bytes(6, info())
    w = FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"), limit_bytes=3 * per_sample + 200)
    results = [w.add([sample(i, 6)]) for i in range(6)]
    w.close()
    assert results[:3] == [True] * 3 and not any(results[3:])
    assert w.skipped_samples == 3 and len(FeatureCacheReader(tmp_path)) == 3


def test_unfinished_shard_is_invisible(tmp_path):
    w = FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"))
    w.add([sample(1, 4)])  # not closed: simulates a crash mid-shard
    assert len(FeatureCacheReader(tmp_path)) == 0
    w.close()
    assert len(FeatureCacheReader(tmp_path)) == 1


def test_other_model_cannot_share_a_cache(tmp_path):
    FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16")).close()
    with pytest.raises(ContractError, match="different model"):
        FeatureCacheWriter(tmp_path, info(tokenizer_fingerprint="other"), FeatureSchema(H, "bfloat16"))
    with pytest.raises(DataError, match="not a feature cache"):
        FeatureCacheReader(tmp_path / "nope")
    assert json.loads((tmp_path / "meta.json").read_text())["model_info"]["tokenizer_fingerprint"] == "fp"


def test_flush_makes_written_samples_readable_and_a_reopened_writer_skips_them(tmp_path):
    w = FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"), dataset_key="k1")
    assert w.add([sample(1, 4), sample(2, 5)])
    assert len(FeatureCacheReader(tmp_path)) == 0     # still in the open shard
    w.flush()
    assert len(FeatureCacheReader(tmp_path)) == 2     # what replay reads at an epoch's start
    assert w.add([sample(3, 4)])
    w.close()
    # A resumed run re-opens the cache: samples already on disk are not written a second time.
    w2 = FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"), dataset_key="k1")
    assert not w2.add([sample(2, 5)]) and w2.written_samples == 0
    assert w2.add([sample(4, 3)])
    w2.close()
    rows = sum(pa_rows(p) for p in tmp_path.glob("shard-*.arrow"))
    assert rows == 4 and len(FeatureCacheReader(tmp_path)) == 4
    assert FeatureCacheReader(tmp_path).dataset_key == "k1"


def test_another_dataset_cannot_share_a_cache(tmp_path):
    # Sample ids are the dataset's: a second dataset's sample 1 would read the first one's features.
    FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"), dataset_key="k1").close()
    with pytest.raises(ContractError, match="another dataset .cache key k1, this run's is k2.*new directory"):
        FeatureCacheWriter(tmp_path, info(), FeatureSchema(H, "bfloat16"), dataset_key="k2")


def pa_rows(path) -> int:
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().num_rows
