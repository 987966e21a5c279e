"""The reorder buffer hands results out strictly in sequence order, each exactly once."""

import random

from draft_trainer.client.reorder import ReorderBuffer


def test_out_of_order_arrivals_come_out_in_order():
    buf: ReorderBuffer[str] = ReorderBuffer(start=5)
    seqs = list(range(5, 105))
    random.Random(0).shuffle(seqs)
    out = []
    for s in seqs:
        assert buf.put(s, f"r{s}")
        while buf.ready():
            out.append(buf.pop())
    assert out == [f"r{s}" for s in range(5, 105)] and len(buf) == 0 and buf.next_seq == 105


def test_duplicates_and_already_taken_results_are_refused():
    buf: ReorderBuffer[int] = ReorderBuffer()
    assert not buf.ready()
    assert buf.put(1, 10) and not buf.put(1, 11)   # a second answer for a pending seq
    assert not buf.ready()                         # 0 is missing: 1 must wait
    assert buf.put(0, 0) and buf.pop() == 0 and buf.pop() == 10
    assert not buf.put(0, 99)                      # already handed out
