"""The event loop as a small library: one selector, a timer heap, a next-pass queue, hooks.

It knows nothing of chat, of wire formats or of connections beyond "a file object with a
callback". One pass (`run_once`):

  1. wait in `select` until a file is ready, the nearest timer is due, or (timeout 0) the
     next-pass queue holds work;
  2. call the ready files' callbacks with their event mask;
  3. run the due timers, then the callbacks queued with `call_soon` before this step began
     (during this pass's I/O or timers, or in an earlier pass); one queued by a soon-callback
     or a before-sleep hook waits for the next pass, so a callback that re-queues itself
     cannot starve the selector;
  4. run the before-sleep hooks in their fixed order (lowest `order` first): the owner of the
     chat commits what the pass said, then the writer sends what the pass queued.

The clock is injected (`clock=`), and so is the selector, so tests can drive passes by hand
over socketpairs with a fake clock.
"""

from __future__ import annotations

import gc
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from selchat.loop.timers import Timer, TimerHeap

log = logging.getLogger(__name__)

ReadyCallback = Callable[[int], None]

# Orders of the before-sleep hooks the server installs; smaller runs first.
ORDER_SETTLE = 10  # the chat's owner: condemned connections removed
ORDER_COMMIT = 20  # the pass's messages made durable
ORDER_DELIVER = 80  # the chat's owner: batched broadcasts out, sent at once where nothing waits
ORDER_WRITE = 90  # queued bytes written (nothing is sent before it is stored)
ORDER_AFTER_WRITE = 95  # upkeep that may pause a while (a store checkpoint): after the sends


# The longest sleep in `select`, even with nothing to do. Flood control can only tell that the
# bytes a sleeping server wakes up to came during its last two sleeps (see `_pass`): a burst
# that wakes it is spread over them, which this keeps short (two requests more at the default
# rate, not one per second of silence). Ten empty passes a second cost nothing to speak of.
MAX_SLEEP = 0.1


class Reactor:
    __slots__ = (
        "selector", "timers", "clock", "now", "listed_at", "prev_listed_at", "_soon", "_hooks",
        "_stopping", "_wakeup_r", "_wakeup_w", "_signal_handlers", "passes", "_slow_pass",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 selector: Optional[selectors.BaseSelector] = None) -> None:
        self.selector = selector if selector is not None else selectors.DefaultSelector()
        self.timers = TimerHeap()
        self.clock = clock
        self.now = clock()  # when this pass's `select` returned: the pass's time for timers
        # For flood control, which charges a request when its bytes may have arrived: no later
        # than the moment this pass's ready list was taken from the kernel, and the previous
        # pass's. A socket watched for reading through the previous pass and emptied then had
        # nothing in that list, so what it has now came after `prev_listed_at`.
        self.listed_at = self.now
        self.prev_listed_at = self.now
        self._soon: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self._hooks: List[Tuple[int, int, Callable[[], Any]]] = []
        self._stopping = False
        self._wakeup_r: Optional[socket.socket] = None
        self._wakeup_w: Optional[socket.socket] = None
        self._signal_handlers: dict = {}
        self.passes = 0
        # A developer's tool: SELCHAT_SLOW_PASS_MS=N logs every pass longer than N ms with its
        # slowest callbacks (and garbage collections), at a cost only while it is set.
        self._slow_pass = float(os.environ.get("SELCHAT_SLOW_PASS_MS", "0") or 0) / 1000
        if self._slow_pass > 0 and _gc_timer not in gc.callbacks:
            gc.callbacks.append(_gc_timer)

    # --- files --------------------------------------------------------------------------------

    def register(self, fileobj: Any, events: int, callback: ReadyCallback) -> None:
        self.selector.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: ReadyCallback) -> None:
        self.selector.modify(fileobj, events, callback)

    def unregister(self, fileobj: Any) -> None:
        self.selector.unregister(fileobj)

    # --- time ---------------------------------------------------------------------------------

    def call_at(self, when: float, callback: Callable[[Any], None], arg: Any = None) -> Timer:
        return self.timers.call_at(when, callback, arg)

    def call_later(self, delay: float, callback: Callable[[Any], None], arg: Any = None) -> Timer:
        return self.timers.call_at(self.now + delay, callback, arg)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` after the I/O and timers of a pass: this one if queued during
        them, else the next (from a soon-callback or a before-sleep hook)."""
        self._soon.append((callback, args))

    # --- hooks and stopping ---------------------------------------------------------------------

    def add_before_sleep(self, hook: Callable[[], Any], order: int) -> None:
        """`hook()` runs at the end of every pass; hooks run by `order`, ties in the order added."""
        self._hooks.append((order, len(self._hooks), hook))
        self._hooks.sort(key=lambda entry: entry[:2])

    def stop(self) -> None:
        """Leave `run` at the end of the current pass."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def install_signal_handlers(self, handler: Callable[[int], None],
                                signals: Tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """`handler(signum)` runs inside the loop (never between two bytecodes of a pass).

        The C-level handler only writes to a socketpair (`set_wakeup_fd`), which wakes `select`;
        the loop reads the signal numbers from it and calls `handler` in a consistent state.
        """
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._on_wakeup)
        for signum in signals:
            self._signal_handlers[signum] = (handler, signal.getsignal(signum))
            signal.signal(signum, lambda *_: None)  # the wake-up fd carries the number

    def _on_wakeup(self, mask: int) -> None:
        assert self._wakeup_r is not None
        try:
            data = self._wakeup_r.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            entry = self._signal_handlers.get(signum)
            if entry is not None:
                entry[0](signum)

    # --- running ------------------------------------------------------------------------------

    def run(self) -> None:
        while not self._stopping:
            self.run_once()

    def run_once(self, timeout: Optional[float] = None) -> None:
        """One pass. `timeout` caps the wait (tests pass 0 to never block)."""
        if self._slow_pass:
            self._timed_pass(self._slow_pass, timeout)
        else:
            self._pass(timeout)

    def _timed_pass(self, slow: float, timeout: Optional[float]) -> None:
        """A pass that logs itself when it took longer than `slow` seconds, with its slowest
        callbacks: a developer's tool (SELCHAT_SLOW_PASS_MS), off the normal path."""
        clock = time.perf_counter
        spent: List[Tuple[float, str]] = []

        def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(*args: Any) -> Any:
                t0 = clock()
                try:
                    return fn(*args)
                finally:
                    spent.append((clock() - t0, _describe(fn)))
            return run

        selector = self.selector
        real_select = selector.select

        def select(timeout: Optional[float] = None) -> Any:
            ready = real_select(timeout)
            due = self.clock()
            for when, _, timer in self.timers._heap:  # the timers this pass will run
                if when <= due and timer.callback is not None:
                    timer.callback = timed(timer.callback)
            wrapped = [(_Key(timed(key.data)), mask) for key, mask in ready]
            nonlocal started
            started = clock()
            return wrapped

        started = clock()
        selector.select = select  # type: ignore[method-assign]
        saved_soon = list(self._soon)
        self._soon.clear()
        self._soon.extend((timed(cb), args) for cb, args in saved_soon)
        hooks = self._hooks
        self._hooks = [(o, n, timed(h)) for o, n, h in hooks]
        try:
            self._pass(timeout)
        finally:
            del selector.select
            self._hooks = hooks
        total = clock() - started
        spent.append((total - sum(t for t, _ in spent), "timers and the rest"))
        spent.extend(_gc_spent)
        _gc_spent.clear()
        if total >= slow:
            spent.sort(reverse=True)
            worst = ", ".join(f"{name} {t * 1000:.1f}" for t, name in spent[:4])
            log.warning("slow pass: %.1f ms over %d callbacks; slowest (ms): %s",
                        total * 1000, len(spent), worst)

    def _pass(self, timeout: Optional[float]) -> None:
        clock = self.clock
        before = clock()
        if self._soon:
            wait: Optional[float] = 0.0
        else:
            deadline = self.timers.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - before)
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        if wait is None or wait > MAX_SLEEP:
            wait = MAX_SLEEP
        ready = self.selector.select(wait)
        # The list was taken from the kernel after `before`, but perhaps long before `now`: a
        # process stopped (SIGSTOP, a busy machine) between the two comes back with a list
        # from before the stop, without the sockets that filled during it. Read in the next
        # pass, their backlog came after `before`, not after `now`.
        self.prev_listed_at = self.listed_at
        self.listed_at = before
        self.now = clock()
        self.passes += 1
        for key, mask in ready:
            try:
                key.data(mask)
            except Exception:
                log.exception("internal error in a ready callback; the loop goes on")
        try:
            self.timers.run_due(self.now)
        except Exception:
            # The heap is consistent (the timer was popped before its callback ran): the
            # remaining due timers run in the next pass.
            log.exception("internal error in a timer; the loop goes on")
        soon = self._soon
        for _ in range(len(soon)):
            callback, args = soon.popleft()
            try:
                callback(*args)
            except Exception:
                log.exception("internal error in a next-pass callback; the loop goes on")
        for _, _, hook in self._hooks:
            hook()

    def close(self) -> None:
        if self._wakeup_r is not None:
            signal.set_wakeup_fd(-1)
            for signum, (_, previous) in self._signal_handlers.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            self._signal_handlers.clear()
            self._wakeup_r.close()
            assert self._wakeup_w is not None
            self._wakeup_w.close()
            self._wakeup_r = self._wakeup_w = None
        self.selector.close()


_gc_spent: List[Tuple[float, str]] = []
_gc_started = [0.0]


def _gc_timer(phase: str, info: Any) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _gc_spent.append((time.perf_counter() - _gc_started[0], f"gc gen{info['generation']}"))


class _Key:
    __slots__ = ("data",)

    def __init__(self, data: Callable[[int], None]) -> None:
        self.data = data


def _describe(fn: Any) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", repr(fn))
    session = getattr(owner, "session", owner)
    who = getattr(session, "name", None)
    if isinstance(who, str):
        return f"{name}[{who}]"
    return name
