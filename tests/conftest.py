"""Session-scoped tiny models and datasets, built offline from configs (seconds, cached per session)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from draft_trainer.assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    from draft_trainer.assets import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_dataset(tiny_llama, tmp_path_factory):
    from draft_trainer.assets import build_tiny_dataset

    return build_tiny_dataset(tiny_llama, tmp_path_factory.mktemp("data") / "chat")
