"""Which draft vocabulary a run trains with (draft_trainer/data/vocab.py `choose_vocab`): the size the
config asks for is the size trained, the dataset's pinned vocab.json is used when it has that size
(or when the config leaves the size to the dataset), and a conflict the user set up is an error.

Before this rule the trainer used a dataset's vocab.json whatever data.draft_vocab_size said: the
demo (prepare pins 8,192) trained 8,192 tokens while its config read 32,000."""

from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError, ContractError
from draft_trainer.data.vocab import DEFAULT_DRAFT_VOCAB_SIZE, build_vocab_mapping, choose_vocab

V = 64


def _counts(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=V)


def _pin(tmp_path: Path, size: int, seed: int = 1) -> Path:
    """A pinned file whose tokens differ from what _counts(0) would choose."""
    path = tmp_path / "vocab.json"
    build_vocab_mapping(_counts(seed), size).save(path)
    return path


def _never():
    raise AssertionError("counted the training split although the pinned vocabulary fits")


def test_zero_takes_the_pinned_vocabulary_and_the_default_without_one(tmp_path):
    pinned = _pin(tmp_path, 16)
    m = choose_vocab(0, pinned, V, _never)
    assert m.draft_vocab_size == 16 and m.used.tolist() == build_vocab_mapping(_counts(1), 16).used.tolist()
    # no file: the default size, capped at the target vocabulary, from the counts
    m = choose_vocab(0, tmp_path / "missing.json", V, lambda: _counts(0))
    assert m.draft_vocab_size == min(DEFAULT_DRAFT_VOCAB_SIZE, V)


def test_an_asked_size_is_the_size_trained(tmp_path):
    pinned = _pin(tmp_path, 16)
    assert choose_vocab(16, pinned, V, _never).used.tolist() == build_vocab_mapping(_counts(1), 16).used.tolist()
    m = choose_vocab(8, pinned, V, lambda: _counts(0))   # the dataset pins 16: 8 from the training split's counts
    assert m.used.tolist() == build_vocab_mapping(_counts(0), 8).used.tolist()
    assert choose_vocab(10_000, pinned, V, lambda: _counts(0)).draft_vocab_size == V   # capped at V


def test_conflicts_are_errors_that_say_what_to_change(tmp_path):
    pinned = _pin(tmp_path, 16)
    with pytest.raises(ConfigError, match="data.draft_vocab_size=0"):
        choose_vocab(8, pinned, V, lambda: _counts(0), pinned_by_user=True)
    with pytest.raises(Exception, match="cannot read the draft vocabulary"):   # a named file must exist
        choose_vocab(0, tmp_path / "missing.json", V, lambda: _counts(0), pinned_by_user=True)
    with pytest.raises(ContractError, match="V=64, target has V=128"):
        choose_vocab(0, pinned, 2 * V, _never)
