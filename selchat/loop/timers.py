"""Deadlines in a heap, with handles that can be cancelled.

A cancelled timer lets go of its callback and argument at once (so a closed connection is not
kept alive by the timers it had armed), and its heap entry is dropped when it reaches the top.
When cancelled entries come to outnumber live ones the heap is rebuilt, so a churn of short-lived
connections with long timers cannot grow the heap without bound either.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, List, Optional, Tuple

Callback = Callable[[Any], None]

_COMPACT_MIN = 256  # cancelled entries tolerated before a rebuild is considered


class Timer:
    """One deadline. `cancel()` is cheap and idempotent; a fired timer is spent."""

    __slots__ = ("when", "callback", "arg", "_heap")

    def __init__(self, when: float, callback: Callback, arg: Any, heap: "TimerHeap") -> None:
        self.when = when
        self.callback: Optional[Callback] = callback
        self.arg = arg
        self._heap: Optional[TimerHeap] = heap

    @property
    def active(self) -> bool:
        return self.callback is not None

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.arg = None
            heap = self._heap
            self._heap = None
            if heap is not None:
                heap._cancelled_one()


class TimerHeap:
    __slots__ = ("_heap", "_seq", "_cancelled")

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int, Timer]] = []
        self._seq = 0  # ties fire in the order they were set
        self._cancelled = 0

    def __len__(self) -> int:
        """Live timers (cancelled ones not counted)."""
        return len(self._heap) - self._cancelled

    @property
    def entries(self) -> int:
        """Heap entries, cancelled ones included: what the heap costs in memory."""
        return len(self._heap)

    def call_at(self, when: float, callback: Callback, arg: Any = None) -> Timer:
        timer = Timer(when, callback, arg, self)
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))
        return timer

    def next_deadline(self) -> Optional[float]:
        heap = self._heap
        while heap and heap[0][2].callback is None:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> int:
        """Run every live callback whose deadline is at or before `now`; return how many ran."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            callback = timer.callback
            if callback is None:
                self._cancelled -= 1
                continue
            arg = timer.arg
            timer.callback = None
            timer.arg = None
            timer._heap = None
            callback(arg)
            ran += 1
        return ran

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            # In place: `run_due` may be walking this very list (a callback cancelling timers).
            heap = self._heap
            heap[:] = [entry for entry in heap if entry[2].callback is not None]
            heapq.heapify(heap)
            self._cancelled = 0
