"""Log repeated events once with a count, so an attack or a full disk cannot flood the log.

A refused connection, a failed accept, a failed commit: each is worth a line, but not one per
occurrence. A client that reconnects in a loop wrote 203,000 warnings in 40 s; a full disk,
one error per loop pass. `RateLog.log(level, key, msg, *args)` logs the first occurrence of
`key` at once and counts the repeats that follow within `period` seconds; the next line for
that key (the next occurrence after the period, or the summary `flush` writes when the period
is over) says how many were left out:

    refusing 127.0.0.1:40512: too_many_connections
    refusing 127.0.0.1:40977: too_many_connections (2031 more like this in the last 10 s)

So a key costs at most one line per period however often it happens, and what a line says is
always one real occurrence (the latest), plus how many others it stands for. Keys should name a
*reason* (a few fixed strings), not a peer: per-peer keys would defeat the point, and at most
`max_keys` are tracked (the oldest window is summarised and forgotten beyond that).

Nothing here blocks or knows the loop: the clock is injected, and so is `schedule` (the
reactor's `call_later`), with which the log arms one timer per window that has something to
summarise, so a burst that stops is still summarised on time. `shared(logger)` is the one
instance per logger that the server's parts use, so that they share their windows.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Hashable, Optional

DEFAULT_PERIOD = 10.0

Schedule = Callable[[float, Callable[[Any], None]], Any]


class _Window:
    __slots__ = ("start", "left_out", "level", "text")

    def __init__(self, start: float) -> None:
        self.start = start
        self.left_out = 0  # occurrences counted but not logged
        self.level = logging.NOTSET  # and the latest of them, formatted
        self.text = ""


class RateLog:
    """One line per key per `period` at most; the lines left out are counted, never lost."""

    __slots__ = ("logger", "period", "clock", "schedule", "max_keys", "_windows", "_timer")

    def __init__(self, logger: logging.Logger, period: float = DEFAULT_PERIOD,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Optional[Schedule] = None, max_keys: int = 256) -> None:
        self.logger = logger
        self.period = period
        self.clock = clock
        self.schedule = schedule
        self.max_keys = max_keys
        self._windows: Dict[Hashable, _Window] = {}
        self._timer = False  # a flush is scheduled

    def attach(self, schedule: Schedule, clock: Optional[Callable[[], float]] = None) -> None:
        """Use the loop's timers (`reactor.call_later`) and, if given, its clock from now on.

        Windows opened under another clock are summarised now and forgotten: their times mean
        nothing to the new clock.
        """
        if clock is not None:
            self.flush(force=True)
            self._windows.clear()
            self.clock = clock
        self.schedule = schedule
        self._timer = False  # a timer of another loop will never fire

    def log(self, level: int, key: Hashable, msg: str, *args: Any) -> bool:
        """Log `msg % args` unless `key` was logged less than `period` ago; True when logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        windows = self._windows
        window = windows.get(key)
        if window is not None and 0.0 <= now - window.start < self.period:
            window.left_out += 1
            window.level = level
            window.text = msg % args if args else msg
            if not self._timer and self.schedule is not None:
                self._timer = True
                self.schedule(window.start + self.period - now, self._on_timer)
            return False
        text = msg % args if args else msg
        if window is not None and window.left_out:
            self._emit(level, text, window.left_out, now - window.start)
        else:
            self.logger.log(level, "%s", text)
        if window is None:
            if len(windows) >= self.max_keys:
                self._evict(now)
            window = windows[key] = _Window(now)
        else:
            window.start, window.left_out = now, 0
        return True

    def flush(self, force: bool = False) -> int:
        """Summarise every window whose period is over (every window, with `force`); lines written.

        A window with nothing left out is forgotten; one that summarised starts again, so a
        flood that goes on is still one line per period.
        """
        now = self.clock()
        written = 0
        for key, window in list(self._windows.items()):
            elapsed = now - window.start
            if not force and 0.0 <= elapsed < self.period:
                continue
            if window.left_out:
                self._emit(window.level, window.text, window.left_out - 1, elapsed)
                written += 1
                window.start, window.left_out = now, 0
            else:
                del self._windows[key]
        return written

    def pending(self) -> int:
        """Occurrences counted and not yet logged, over all keys (for tests and stats)."""
        return sum(w.left_out for w in self._windows.values())

    # --- inside -----------------------------------------------------------------------------

    def _on_timer(self, _: Any = None) -> None:
        self._timer = False
        self.flush()
        # Windows that counted repeats but whose period is not over yet: wake for the first.
        due = [w.start for w in self._windows.values() if w.left_out]
        if due and self.schedule is not None:
            self._timer = True
            self.schedule(max(0.0, min(due) + self.period - self.clock()), self._on_timer)

    def _emit(self, level: int, text: str, left_out: int, elapsed: float) -> None:
        if left_out:
            self.logger.log(level, "%s (%d more like this in the last %.0f s)", text, left_out,
                            max(elapsed, 0.0))
        else:
            self.logger.log(level, "%s", text)

    def _evict(self, now: float) -> None:
        oldest = next(iter(self._windows))
        window = self._windows.pop(oldest)
        if window.left_out:
            self._emit(window.level, window.text, window.left_out - 1, now - window.start)


_shared: Dict[str, RateLog] = {}


def shared(logger: logging.Logger) -> RateLog:
    """The one RateLog of `logger`, made on first use (parts of the server share its windows)."""
    found = _shared.get(logger.name)
    if found is None or found.logger is not logger:
        found = _shared[logger.name] = RateLog(logger)
    return found
