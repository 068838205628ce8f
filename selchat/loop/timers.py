"""Timers in a heap: the loop asks for the nearest deadline and pops what is due.

Entries are never removed early; a fired entry whose owner has moved on is checked and
dropped by its handler (lazy deletion), which keeps every operation O(log n) and never scans
all connections.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, List, Optional, Tuple

Callback = Callable[[Any], None]


class TimerHeap:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Callback, Any]] = []
        self._seq = itertools.count()  # ties fire in the order they were set

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, when: float, callback: Callback, arg: Any = None) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), callback, arg))

    def next_deadline(self) -> Optional[float]:
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> int:
        """Run every callback whose deadline is at or before `now`; return how many ran."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            _, _, callback, arg = heapq.heappop(heap)
            callback(arg)
            ran += 1
        return ran
