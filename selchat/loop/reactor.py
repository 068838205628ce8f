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

import logging
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
ORDER_SETTLE = 10  # the chat's owner: batched broadcasts out, condemned connections removed
ORDER_COMMIT = 20  # the pass's messages made durable
ORDER_WRITE = 90  # queued bytes written (nothing is sent before it is stored)


class Reactor:
    __slots__ = (
        "selector", "timers", "clock", "now", "prev_now", "_soon", "_hooks", "_stopping",
        "_wakeup_r", "_wakeup_w", "_signal_handlers", "passes",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 selector: Optional[selectors.BaseSelector] = None) -> None:
        self.selector = selector if selector is not None else selectors.DefaultSelector()
        self.timers = TimerHeap()
        self.clock = clock
        self.now = clock()
        # When the previous `select` returned: bytes read in this pass arrived after it (else
        # they would have been read then), which is what flood control needs after a stall.
        self.prev_now = self.now
        self._soon: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self._hooks: List[Tuple[int, int, Callable[[], Any]]] = []
        self._stopping = False
        self._wakeup_r: Optional[socket.socket] = None
        self._wakeup_w: Optional[socket.socket] = None
        self._signal_handlers: dict = {}
        self.passes = 0

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
        if self._soon:
            wait: Optional[float] = 0.0
        else:
            deadline = self.timers.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - self.clock())
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        ready = self.selector.select(wait)
        self.prev_now = self.now
        self.now = self.clock()
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
