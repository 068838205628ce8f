"""The rooms in the two orders their lists use, kept up to date at each change.

A `rooms` answer lists the largest rooms first; IRC's LIST goes by name. Sorting 10,000 rooms
for every request after a membership change cost 36 ms a time under churn (the review's finding
4), so the orders are kept instead: a join or a leave moves one entry (a binary search and one
C-level memmove of the list), and a page of the list costs the page.

Entries are keys (the folded room names); the chat owns the rooms. Both lists are plain sorted
Python lists searched with `bisect`: with at most `max_rooms` entries the memmove of an insert
or a delete is a few microseconds, less than any balanced tree written in Python would cost.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from typing import List, Tuple


class RoomIndex:
    """Room keys by size (largest first, then by key) and by key alone."""

    __slots__ = ("_by_size", "_by_key")

    def __init__(self) -> None:
        self._by_size: List[Tuple[int, str]] = []  # (-members, key), ascending
        self._by_key: List[str] = []

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, key: str, members: int = 0) -> None:
        insort(self._by_size, (-members, key))
        insort(self._by_key, key)

    def remove(self, key: str, members: int) -> None:
        self._drop(self._by_size, (-members, key))
        self._drop(self._by_key, key)

    def resize(self, key: str, old: int, new: int) -> None:
        """The room `key` went from `old` members to `new`."""
        if old != new:
            self._drop(self._by_size, (-old, key))
            insort(self._by_size, (-new, key))

    def by_size(self, offset: int, count: int) -> List[str]:
        """Keys from position `offset` of the largest-first order, at most `count` of them."""
        offset = max(0, offset)
        return [key for _, key in self._by_size[offset: offset + count]]

    def key_at(self, position: int) -> str:
        """The key at `position` of the largest-first order (0 <= position < len)."""
        return self._by_size[position][1]

    def by_key(self, after: str, count: int) -> List[str]:
        """Keys greater than `after` in key order, at most `count` of them ("" is before all)."""
        start = bisect_right(self._by_key, after)
        return self._by_key[start: start + count]

    @staticmethod
    def _drop(items: list, entry: object) -> None:
        i = bisect_left(items, entry)
        if i == len(items) or items[i] != entry:
            raise KeyError(entry)  # the index and the rooms disagree: a bug of the chat's
        del items[i]
