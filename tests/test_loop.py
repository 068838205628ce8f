"""The reactor and its timer heap, driven pass by pass with a fake clock (no subprocess, no sleeps).

What is pinned here are the loop's promises that the rest of the server leans on: `call_soon`
means the next pass (so a callback re-queuing itself cannot starve I/O), before-sleep hooks run
in their fixed order, timers fire by deadline with ties in the order set, a cancelled timer
lets go of what it held at once, the heap stays bounded under churn, and signals reach their
handler inside a pass through the wake-up fd.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import weakref
from typing import Any, Iterator, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.loop.reactor import MAX_SLEEP, ORDER_COMMIT, ORDER_SETTLE, ORDER_WRITE, Reactor
from selchat.loop.timers import TimerHeap


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reactor(clock: FakeClock) -> Iterator[Reactor]:
    r = Reactor(clock=clock)
    yield r
    r.close()


# --- call_soon ------------------------------------------------------------------------------


def test_call_soon_runs_in_the_next_pass_not_at_once(reactor: Reactor) -> None:
    ran: List[int] = []
    reactor.call_soon(ran.append, 1)
    assert ran == []  # queuing never runs anything
    reactor.run_once(timeout=0)
    assert ran == [1]
    reactor.run_once(timeout=0)
    assert ran == [1]  # once only


def test_call_soon_from_a_soon_callback_waits_for_the_next_pass(reactor: Reactor) -> None:
    passes: List[int] = []

    def again() -> None:
        passes.append(reactor.passes)
        if len(passes) < 3:
            reactor.call_soon(again)

    reactor.call_soon(again)
    for _ in range(5):
        reactor.run_once(timeout=0)
    assert passes == [1, 2, 3]  # one run per pass, never twice in one


def test_call_soon_from_a_before_sleep_hook_runs_next_pass(reactor: Reactor) -> None:
    seen: List[Tuple[str, int]] = []
    armed = [False]

    def hook() -> None:
        seen.append(("hook", reactor.passes))
        if not armed[0]:
            armed[0] = True
            reactor.call_soon(lambda: seen.append(("soon", reactor.passes)))

    reactor.add_before_sleep(hook, ORDER_WRITE)
    reactor.run_once(timeout=0)
    reactor.run_once(timeout=0)
    assert seen == [("hook", 1), ("soon", 2), ("hook", 2)]


def test_call_soon_preserves_order_and_arguments(reactor: Reactor) -> None:
    got: List[Tuple[Any, ...]] = []
    for i in range(10):
        reactor.call_soon(lambda *a: got.append(a), i, str(i))
    reactor.run_once(timeout=0)
    assert got == [(i, str(i)) for i in range(10)]


def test_a_self_requeuing_callback_does_not_starve_io(reactor: Reactor) -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        spins = [0]
        received: List[bytes] = []

        def spin() -> None:
            spins[0] += 1
            reactor.call_soon(spin)

        reactor.register(a, selectors.EVENT_READ, lambda mask: received.append(a.recv(100)))
        reactor.call_soon(spin)
        for i in range(5):
            b.send(b"%d" % i)
            reactor.run_once(timeout=0)
            assert received[-1] == b"%d" % i  # the data of each pass is read in that pass
        assert spins[0] == 5
        reactor.unregister(a)
    finally:
        a.close()
        b.close()


def test_pending_soon_work_makes_the_wait_zero(reactor: Reactor) -> None:
    """With work queued, a pass never sleeps (even with no timeout and no files)."""
    reactor.call_soon(lambda: None)
    reactor.run_once()  # would block forever if the queue did not cap the wait at 0
    assert reactor.passes == 1


# --- before-sleep hooks ---------------------------------------------------------------------


def test_before_sleep_hooks_run_by_order_then_by_insertion(reactor: Reactor) -> None:
    ran: List[str] = []
    reactor.add_before_sleep(lambda: ran.append("write"), ORDER_WRITE)
    reactor.add_before_sleep(lambda: ran.append("commit"), ORDER_COMMIT)
    reactor.add_before_sleep(lambda: ran.append("settle-1"), ORDER_SETTLE)
    reactor.add_before_sleep(lambda: ran.append("settle-2"), ORDER_SETTLE)
    reactor.add_before_sleep(lambda: ran.append("first"), 0)
    reactor.run_once(timeout=0)
    assert ran == ["first", "settle-1", "settle-2", "commit", "write"]
    ran.clear()
    reactor.run_once(timeout=0)
    assert ran == ["first", "settle-1", "settle-2", "commit", "write"]  # every pass


def test_hooks_run_after_io_timers_and_soon(reactor: Reactor, clock: FakeClock) -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        ran: List[str] = []
        reactor.register(a, selectors.EVENT_READ, lambda mask: (a.recv(10), ran.append("io")))
        reactor.call_at(clock() + 1, lambda _: ran.append("timer"))
        reactor.call_soon(lambda: ran.append("soon"))
        reactor.add_before_sleep(lambda: ran.append("hook"), ORDER_SETTLE)
        b.send(b"x")
        clock.advance(1)
        reactor.run_once(timeout=0)
        assert ran == ["io", "timer", "soon", "hook"]
        reactor.unregister(a)
    finally:
        a.close()
        b.close()


# --- timers ---------------------------------------------------------------------------------


def test_timers_fire_in_deadline_order_with_ties_in_the_order_set(reactor: Reactor,
                                                                   clock: FakeClock) -> None:
    fired: List[str] = []
    now = clock()
    for name, when in [("c", 3), ("a1", 1), ("b", 2), ("a2", 1), ("a3", 1), ("d", 4)]:
        reactor.call_at(now + when, fired.append, name)
    clock.advance(2.5)
    reactor.run_once(timeout=0)
    assert fired == ["a1", "a2", "a3", "b"]
    clock.advance(10)
    reactor.run_once(timeout=0)
    assert fired == ["a1", "a2", "a3", "b", "c", "d"]


def test_a_timer_is_not_due_before_its_deadline(reactor: Reactor, clock: FakeClock) -> None:
    fired: List[Any] = []
    reactor.call_later(5.0, fired.append, "x")
    clock.advance(4.999)
    reactor.run_once(timeout=0)
    assert fired == []
    clock.advance(0.001)
    reactor.run_once(timeout=0)
    assert fired == ["x"]


def test_call_later_counts_from_the_pass_time(reactor: Reactor, clock: FakeClock) -> None:
    """`now` is the pass's time: a timer set between passes counts from the last pass."""
    reactor.run_once(timeout=0)
    clock.advance(3)
    timer = reactor.call_later(1.0, lambda _: None)
    assert timer.when == pytest.approx(clock() - 3 + 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.booleans()), min_size=1, max_size=40))
def test_timer_order_property(plan: List[Tuple[int, bool]]) -> None:
    """Whatever the deadlines and cancellations: live ones fire sorted by (deadline, order set)."""
    heap = TimerHeap()
    fired: List[int] = []
    timers = [heap.call_at(float(when), fired.append, i) for i, (when, _) in enumerate(plan)]
    for timer, (_, cancel) in zip(timers, plan):
        if cancel:
            timer.cancel()
    expected = sorted((when, i) for i, (when, cancel) in enumerate(plan) if not cancel)
    assert len(heap) == len(expected)
    heap.run_due(100.0)
    assert fired == [i for _, i in expected]
    assert len(heap) == 0


def test_cancelled_timer_never_fires(reactor: Reactor, clock: FakeClock) -> None:
    fired: List[str] = []
    keep = reactor.call_later(1, fired.append, "keep")
    drop = reactor.call_later(1, fired.append, "drop")
    drop.cancel()
    drop.cancel()  # idempotent
    assert not drop.active and keep.active
    clock.advance(5)
    reactor.run_once(timeout=0)
    assert fired == ["keep"]
    assert not keep.active  # a fired timer is spent
    keep.cancel()  # and cancelling it afterwards is harmless
    assert len(reactor.timers) == 0


def test_a_timer_cancelled_by_an_earlier_one_in_the_same_pass_does_not_fire(
        reactor: Reactor, clock: FakeClock) -> None:
    fired: List[str] = []
    later = reactor.call_later(2, fired.append, "later")
    reactor.call_later(1, lambda _: (fired.append("first"), later.cancel()))
    clock.advance(5)
    reactor.run_once(timeout=0)
    assert fired == ["first"]


def test_cancel_releases_callback_and_argument_at_once(reactor: Reactor) -> None:
    class Owner:
        def fire(self, arg: Any) -> None:  # pragma: no cover - never fires
            raise AssertionError("cancelled timer fired")

    class Payload:
        pass

    owner, payload = Owner(), Payload()
    owner_ref, payload_ref = weakref.ref(owner), weakref.ref(payload)
    timer = reactor.call_later(1000, owner.fire, payload)
    del owner, payload
    gc.collect()
    assert owner_ref() is not None and payload_ref() is not None  # the armed timer holds them
    timer.cancel()
    # Refcounting alone must free them: no collection pass needed, no pass of the loop either.
    assert owner_ref() is None
    assert payload_ref() is None
    assert reactor.timers.entries == 1  # the heap entry is dropped lazily...
    assert len(reactor.timers) == 0  # ...but it no longer counts as live


def test_fired_timer_releases_callback_and_argument(reactor: Reactor, clock: FakeClock) -> None:
    class Payload:
        pass

    payload = Payload()
    ref = weakref.ref(payload)
    timer = reactor.call_later(1, lambda _: None, payload)
    del payload
    clock.advance(1)
    reactor.run_once(timeout=0)
    assert ref() is None
    assert timer.callback is None and timer.arg is None


def test_heap_is_compacted_under_arm_and_cancel_churn() -> None:
    heap = TimerHeap()
    live = [heap.call_at(float(i), lambda _: None) for i in range(10)]
    peak = 0
    for i in range(100_000):
        heap.call_at(1e9 + i, lambda _: None).cancel()
        peak = max(peak, heap.entries)
    assert len(heap) == len(live)
    # Cancelled entries are dropped once they dominate: a few hundred at most, never 100k.
    assert peak <= 2 * 256 + 2 * len(live) + 2
    assert heap.entries <= 2 * 256 + 2 * len(live) + 2


def test_heap_churn_with_many_live_timers_stays_proportional() -> None:
    heap = TimerHeap()
    live = [heap.call_at(float(i), lambda _: None) for i in range(2000)]
    peak = 0
    for i in range(20_000):
        heap.call_at(1e9 + i, lambda _: None).cancel()
        peak = max(peak, heap.entries)
    assert len(heap) == 2000
    assert peak <= 2 * 2000 + 2


def test_next_deadline_skips_cancelled_entries() -> None:
    heap = TimerHeap()
    first = heap.call_at(1.0, lambda _: None)
    heap.call_at(2.0, lambda _: None)
    first.cancel()
    assert heap.next_deadline() == 2.0
    assert heap.entries == 1 and len(heap) == 1


def test_mass_cancel_inside_a_timer_callback_keeps_the_count_exact() -> None:
    heap = TimerHeap()
    victims: List[Any] = []
    heap.call_at(1.0, lambda _: [v.cancel() for v in victims])
    victims.extend(heap.call_at(1.0, lambda _: None) for _ in range(300))
    assert heap.run_due(1.0) == 1
    assert len(heap) == 0  # nothing is live any more
    heap.next_deadline()
    assert heap._cancelled >= 0  # noqa: SLF001 - the invariant behind the compaction bound


# --- waiting ----------------------------------------------------------------------------------


def test_wait_is_capped_by_the_nearest_timer() -> None:
    """Without a timeout, a pass sleeps until the nearest deadline (here: already due), and
    never longer than MAX_SLEEP (flood control's sense of when a sleeping server's input came)."""
    clock = FakeClock()
    waits: List[Any] = []

    class RecordingSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
        def select(self, timeout: Any = None) -> Any:
            waits.append(timeout)
            return super().select(0)

    r = Reactor(clock=clock, selector=RecordingSelector())
    try:
        r.run_once()  # nothing to wait for
        r.call_at(clock() + 7.5, lambda _: None)
        r.run_once()
        r.call_at(clock() + MAX_SLEEP / 2, lambda _: None)
        r.run_once()
        r.run_once(timeout=MAX_SLEEP / 5)
        clock.advance(10)
        r.run_once()
        assert waits == pytest.approx([MAX_SLEEP, MAX_SLEEP, MAX_SLEEP / 2, MAX_SLEEP / 5, 0.0])
    finally:
        r.close()


# --- stopping and signals -------------------------------------------------------------------


def test_stop_leaves_run_at_the_end_of_the_pass(reactor: Reactor) -> None:
    after: List[int] = []
    reactor.call_soon(reactor.stop)
    reactor.add_before_sleep(lambda: after.append(reactor.passes), ORDER_WRITE)
    reactor.run()
    assert reactor.stopping
    assert after == [1]  # the pass that asked to stop still ran its hooks


def _restore(saved: dict) -> None:
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_signal_reaches_its_handler_inside_a_pass(clock: FakeClock) -> None:
    saved = {signal.SIGUSR1: signal.getsignal(signal.SIGUSR1)}
    r = Reactor(clock=clock)
    got: List[Tuple[int, int]] = []
    try:
        r.install_signal_handlers(lambda signum: got.append((signum, r.passes)),
                                  (signal.SIGUSR1,))
        r.run_once(timeout=0)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert got == []  # the C handler only wrote to the wake-up fd
        r.run_once(timeout=0)
        assert got == [(signal.SIGUSR1, 2)]
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        r.run_once(timeout=0)
        assert [s for s, _ in got] == [signal.SIGUSR1] * 3
        r.close()
        assert r._wakeup_r is None  # noqa: SLF001
        # The wake-up fd is given back: Python no longer writes signal numbers anywhere.
        assert signal.set_wakeup_fd(-1) == -1
    finally:
        signal.set_wakeup_fd(-1)
        _restore(saved)


def test_signal_wakes_a_blocking_pass(clock: FakeClock) -> None:
    """A pass with no timers and no files would sleep forever; the signal's byte wakes it."""
    saved = {signal.SIGUSR1: signal.getsignal(signal.SIGUSR1)}
    r = Reactor(clock=clock)
    got: List[int] = []
    try:
        r.install_signal_handlers(got.append, (signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        r.run_once(timeout=5.0)  # returns at once: the wake-up fd is readable
        assert got == [signal.SIGUSR1]
    finally:
        r.close()
        signal.set_wakeup_fd(-1)
        _restore(saved)


def test_close_restores_the_previous_signal_handlers(clock: FakeClock) -> None:
    def previous(signum: int, frame: Any) -> None:  # pragma: no cover - never called
        pass

    saved = {signal.SIGUSR1: signal.getsignal(signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGUSR1, previous)
        r = Reactor(clock=clock)
        r.install_signal_handlers(lambda s: None, (signal.SIGUSR1,))
        r.close()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.set_wakeup_fd(-1)
        _restore(saved)


def test_close_closes_the_selector_and_the_wakeup_pair(clock: FakeClock) -> None:
    saved = {signal.SIGUSR1: signal.getsignal(signal.SIGUSR1)}
    r = Reactor(clock=clock)
    try:
        r.install_signal_handlers(lambda s: None, (signal.SIGUSR1,))
        wake_r = r._wakeup_r  # noqa: SLF001
        assert wake_r is not None
        assert any(key.fileobj is wake_r for key in r.selector.get_map().values())
        r.close()
        assert wake_r.fileno() == -1
        assert r.selector.get_map() is None  # a closed selector has no map
    finally:
        signal.set_wakeup_fd(-1)
        _restore(saved)
