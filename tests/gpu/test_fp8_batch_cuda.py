"""FP8 features upcast on the accelerator: collate for a CUDA device moves the padded e4m3 bytes +
scales and upcasts there; the batch must equal the CPU-fused batch moved to CUDA, bit for bit.
Needs CUDA: reported as skipped (not run) elsewhere."""

import numpy as np
import pytest
import torch

from common.features import FeatureSchema, FeatureSpec, SampleFeatures, decode_batch, encode_batch
from common.fp8 import Fp8Rows
from draft_trainer.data.batch import collate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: not run on this machine")
H = 64


@pytest.mark.parametrize("served", ["bfloat16", "float32"])
def test_cuda_batch_from_fp8_rows_equals_the_cpu_batch(served):
    dt = torch.bfloat16 if served == "bfloat16" else torch.float32
    g = torch.Generator().manual_seed(0)
    lengths = (9, 3, 16)
    rows = [SampleFeatures(i, 0, n, (torch.randn(n, 3 * H, generator=g) * 50).to(dt), torch.randn(n, H, generator=g).to(dt))
            for i, n in enumerate(lengths)]
    spec = FeatureSpec((0, 1, 2), tensor_dtypes={"aux": "float8_e4m3", "teacher": "float8_e4m3"})
    kept = decode_batch(encode_batch(FeatureSchema.for_spec(spec, H, served), rows), keep_fp8=True)
    assert isinstance(kept[0].aux_T3H, Fp8Rows)
    samples = [(f.sample_id, np.arange(f.length), np.ones(f.length, np.float32)) for f in kept]
    on_cpu = collate(samples, kept)
    on_cuda = collate(samples, kept, device="cuda")
    assert on_cuda.aux_BT3H.device.type == "cuda" and on_cuda.teacher_BTH.device.type == "cuda"
    for a, b in ((on_cpu.aux_BT3H, on_cuda.aux_BT3H), (on_cpu.teacher_BTH, on_cuda.teacher_BTH)):
        assert torch.equal(a.view(torch.int32), b.cpu().view(torch.int32))
    assert torch.equal(on_cpu.attention_mask_BT, on_cuda.attention_mask_BT.cpu())
