"""The reorder buffer: results arrive in any order, the trainer takes them in sequence order.

Sequence numbers are the positions of a rank's samples in its deterministic epoch order, as
numbered by the dispatcher (0, 1, 2, ...). Every number is eventually put exactly once (features
or a drop); `pop()` hands out the next one only when it is there, so what the trainer sees does
not depend on which server answered first. Not thread-safe: the dispatcher's lock guards it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    def __init__(self, start: int = 0) -> None:
        self.next_seq = start
        self._items: dict[int, T] = {}

    def put(self, seq: int, item: T) -> bool:
        """Store the result for `seq`; False (and nothing stored) if it was already put or taken."""
        if seq < self.next_seq or seq in self._items:
            return False
        self._items[seq] = item
        return True

    def ready(self) -> bool:
        return self.next_seq in self._items

    def pop(self) -> T:
        """The result for `next_seq` (call only when `ready()`)."""
        item = self._items.pop(self.next_seq)
        self.next_seq += 1
        return item

    def __len__(self) -> int:
        return len(self._items)


class ArrivalBuffer(Generic[T]):
    """The unordered counterpart (same interface): results are handed out as they arrive, for
    consumers that key results themselves (regenerate) and must not wait behind a slow one."""

    def __init__(self) -> None:
        self._items: dict[int, T] = {}
        self._taken: set[int] = set()

    def put(self, seq: int, item: T) -> bool:
        if seq in self._items or seq in self._taken:
            return False
        self._items[seq] = item
        return True

    def ready(self) -> bool:
        return bool(self._items)

    def pop(self) -> T:
        seq = next(iter(self._items))  # dicts keep arrival order
        self._taken.add(seq)
        return self._items.pop(seq)

    def __len__(self) -> int:
        return len(self._items)
