"""The prompt-lookup drafter proposes what standard prompt lookup decoding does: the tokens that
followed the most recent earlier occurrence of the longest matching suffix n-gram."""

import random

import pytest

from draft_trainer.methods.base import Drafter
from draft_trainer.evaluate.prompt_lookup import PromptLookupDrafter


def brute_force(ctx: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The definition, scanned directly: longest n first, latest earlier start first."""
    L = len(ctx)
    for n in range(min(max_n, L), min_n - 1, -1):
        suffix = ctx[L - n:]
        for start in range(L - n - 1, -1, -1):
            if ctx[start:start + n] == suffix:
                return ctx[start + n:start + n + k]
    return []


def test_examples():
    d = PromptLookupDrafter(max_ngram=3, min_ngram=1)
    assert isinstance(d, Drafter) and d.feature_layers == ()
    d.start([1, 2, 3, 4, 9, 9, 1, 2], 3, None)       # suffix 1 2 3 occurred at 0: 4 9 9 ... follow
    assert d.propose(2) == [4, 9]
    assert d.propose(10) == [4, 9, 9, 1, 2, 3]          # capped by the end of the sequence
    d.extend([7], None)                                  # ... 3 7: no 3-gram or 2-gram match; 7 is new
    assert d.propose(4) == []
    d.extend([8, 3], None)                               # 3 occurred twice before: the latest is followed by 7
    assert d.propose(3) == [7, 8, 3]
    d.extend([5, 5, 5], None)                            # overlapping matches: 5 5 at the end, latest earlier 5 5
    assert d.propose(2) == [5]


def test_min_ngram_excludes_short_matches():
    d = PromptLookupDrafter(max_ngram=4, min_ngram=2)
    d.start([1, 2, 6, 3], 2, None)                       # only the 1-gram "2" matches
    assert d.propose(3) == []
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_definition_on_random_sequences(seed):
    rng = random.Random(seed)
    max_n, min_n = rng.choice([(3, 1), (2, 1), (4, 2)])
    vocab = rng.choice([3, 6, 20])                       # small vocabularies repeat a lot
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
    first = rng.randrange(vocab)
    d = PromptLookupDrafter(max_ngram=max_n, min_ngram=min_n)
    d.start(prompt, first, None)
    ctx = prompt + [first]
    for _ in range(40):
        k = rng.randrange(1, 8)
        assert d.propose(k) == brute_force(ctx, k, max_n, min_n), (ctx, k)
        new = [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]
        d.extend(new, None)
        ctx += new
    d.start([5], 5, None)                                # a new sequence forgets the old one
    assert d.propose(3) == [5] and d.ctx == [5, 5]
