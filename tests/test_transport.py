"""The transport's state machine, driven pass by pass over socketpairs with a fake clock.

A small recording session stands in for a wire protocol, so what is checked is the transport's
own promise: one lifecycle (OPEN -> CLOSING -> LINGERING -> CLOSED, or straight to CLOSED),
`connection_lost` exactly once whatever the path, nothing held once closed, a hard cap on
queued bytes, backpressure between the water marks, writability asked for only while bytes
are pending, half-close, and pausing.
"""

from __future__ import annotations

import gc
import socket
import struct
import time
import weakref
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.defaults import LINGER_TIMEOUT
from selchat.loop.reactor import Reactor
from selchat.loop.transport import EVENT_READ, EVENT_WRITE, State, Transport, Writer

DEADLINE = 5.0  # seconds of real time any pumping loop may take before the test fails


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class RecordingSession:
    """Records every callback with the pass it came in; optional hooks let a test react."""

    def __init__(self) -> None:
        self.transport: Optional[Transport] = None
        self.calls: List[Tuple[str, Any]] = []
        self.data = bytearray()
        self.lost: List[str] = []
        self.on_data: Optional[Callable[[bytes], None]] = None
        self.on_eof: Optional[Callable[[], None]] = None

    def _passes(self) -> int:
        assert self.transport is not None
        return self.transport.reactor.passes

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self.calls.append(("made", None))

    def data_received(self, data: bytes) -> None:
        self.calls.append(("data", len(data)))
        self.data += data
        if self.on_data is not None:
            self.on_data(data)

    def eof_received(self) -> None:
        self.calls.append(("eof", self._passes()))
        if self.on_eof is not None:
            self.on_eof()

    def resume_serving(self) -> None:
        self.calls.append(("resume", self._passes()))

    def output_overflow(self) -> None:
        self.calls.append(("overflow", None))

    def connection_lost(self, detail: str) -> None:
        self.calls.append(("lost", detail))
        self.lost.append(detail)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)


class Rig:
    """A reactor with a fake clock, a writer, and transports over socketpairs to hand."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.reactor = Reactor(clock=self.clock)
        self.writer = Writer(self.reactor)
        self._peers: List[socket.socket] = []

    def transport(self, max_outbuf: int = 1 << 20, high_water: int = 1 << 16,
                  low_water: int = 1 << 14, grace: float = 0.0, tcp: bool = False,
                  sndbuf: Optional[int] = None) -> Tuple[Transport, RecordingSession, socket.socket]:
        ours, peer = _tcp_pair() if tcp else socket.socketpair()
        if sndbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        ours.setblocking(False)
        peer.setblocking(False)
        self._peers.append(peer)
        t = Transport(self.reactor, self.writer, ours, "peer:1", "peer", max_outbuf,
                      high_water, low_water, grace)
        session = RecordingSession()
        t.start(session)
        return t, session, peer

    def run(self, n: int = 1) -> None:
        for _ in range(n):
            self.reactor.run_once(timeout=0)

    def until(self, cond: Callable[[], bool], step: Optional[Callable[[], None]] = None) -> None:
        """Passes (and `step` between them) until `cond` holds, within a real-time deadline."""
        end = time.monotonic() + DEADLINE
        while not cond():
            if time.monotonic() > end:
                raise AssertionError("condition not reached before the deadline")
            if step is not None:
                step()
            self.reactor.run_once(timeout=0.01)

    def registered(self, t: Transport) -> Optional[int]:
        """The events the selector holds for `t`'s socket, or None when it holds none."""
        for key in self.reactor.selector.get_map().values():
            if key.fileobj is t.sock:
                return key.events
        return None

    def close(self) -> None:
        for peer in self._peers:
            peer.close()
        self.reactor.close()


def _tcp_pair() -> Tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (ours is the accepted end, as the server's would be)."""
    lsock = socket.socket()
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        peer = socket.create_connection(lsock.getsockname(), timeout=DEADLINE)
        ours, _ = lsock.accept()
    finally:
        lsock.close()
    return ours, peer


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def read_all(sock: socket.socket, into: bytearray) -> bool:
    """Read what is there without blocking; True once the peer's EOF was seen."""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return False
        if not chunk:
            return True
        into += chunk


def assert_released(rig: Rig, t: Transport) -> None:
    """A closed transport holds no buffer, no timer, no selector registration, no list place."""
    assert t.state is State.CLOSED
    assert t.out.size == 0 and not t.out.chunks and t.out.offset == 0
    assert t._linger_timer is None  # noqa: SLF001
    assert len(rig.reactor.timers) == 0
    assert t.mask == 0
    assert rig.registered(t) is None
    assert all(key.data != t.on_ready for key in rig.reactor.selector.get_map().values())
    assert not t.accepting
    assert t.sock.fileno() == -1
    rig.run()  # the writer drops it from its list by the end of the pass at the latest
    assert t not in rig.writer.dirty


def pattern(n: int) -> bytes:
    """Bytes whose order can be checked: a running counter."""
    return b"".join(struct.pack(">I", i) for i in range((n + 3) // 4))[:n]


# --- the graceful close -----------------------------------------------------------------------


def test_close_goes_open_closing_lingering_closed(rig: Rig) -> None:
    t, session, peer = rig.transport()
    payload = pattern(300_000)  # more than one send: the close must wait for the rest
    assert t.state is State.OPEN
    t.write(payload)
    t.close("bye")
    assert t.state is State.CLOSING
    assert t.open is False
    states = [t.state]
    got = bytearray()
    eof = [False]

    def step() -> None:
        eof[0] = eof[0] or read_all(peer, got)
        if states[-1] is not t.state:
            states.append(t.state)

    rig.until(lambda: t.state is State.LINGERING, step)
    rig.until(lambda: eof[0], step)  # the peer reads everything, then our EOF
    assert bytes(got) == payload
    assert t.state is State.LINGERING  # still draining until the peer closes too
    peer.shutdown(socket.SHUT_WR)
    rig.until(lambda: t.state is State.CLOSED, step)
    step()
    assert states == [State.CLOSING, State.LINGERING, State.CLOSED]
    assert session.lost == ["bye"]
    assert_released(rig, t)


def test_close_discards_input_while_closing(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.write(b"last words")
    t.close("bye")
    peer.send(b"ignored")
    got = bytearray()
    rig.until(lambda: t.state is State.LINGERING, lambda: read_all(peer, got))
    peer.send(b"also ignored")
    rig.run(2)
    assert session.count("data") == 0  # a closing connection is never served
    assert read_all(peer, got) and bytes(got) == b"last words"
    peer.close()  # (with unread bytes in its queue this would be a reset instead)
    rig.until(lambda: t.state is State.CLOSED)
    assert session.lost == ["bye"]


def test_close_with_nothing_queued_still_shuts_our_side(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.close("nothing to say")
    rig.run()
    assert t.state is State.LINGERING
    got = bytearray()
    rig.until(lambda: read_all(peer, got))
    assert got == b""
    peer.close()
    rig.until(lambda: t.state is State.CLOSED)
    assert session.lost == ["nothing to say"]


def test_close_twice_and_close_after_abort_are_harmless(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.close("first")
    t.close("second")
    assert t.close_detail == "first"
    t.abort("abort")
    t.close("third")
    t.abort("again")
    rig.run(2)
    assert session.lost == ["abort"]


# --- abort and the other ways out: connection_lost once ---------------------------------------


def test_abort_closes_at_once_and_drops_queued_output(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.write(b"never sent")
    assert t.dirty
    t.abort("gone")
    assert t.state is State.CLOSED
    assert session.lost == ["gone"]
    got = bytearray()
    rig.until(lambda: read_all(peer, got))
    assert got == b""  # the queue went with it
    t.write(b"after close")  # ignored
    assert t.out.size == 0
    assert_released(rig, t)
    assert session.count("lost") == 1


def test_write_error_closes_once(rig: Rig) -> None:
    t, session, peer = rig.transport()
    peer.close()
    t.write(b"x" * 1000)
    rig.until(lambda: t.state is State.CLOSED)
    assert len(session.lost) == 1
    assert session.lost[0].startswith(("write failed", "read failed", "closed", "peer"))
    assert_released(rig, t)
    rig.run(3)
    assert session.count("lost") == 1


def test_peer_reset_closes_once(rig: Rig) -> None:
    t, session, peer = rig.transport(tcp=True)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # an RST, not a FIN
    rig.until(lambda: t.state is State.CLOSED)
    assert len(session.lost) == 1 and session.lost[0].startswith("read failed")
    assert session.count("eof") == 0
    assert_released(rig, t)


def test_peer_reset_while_closing_closes_once(rig: Rig) -> None:
    t, session, peer = rig.transport(tcp=True)
    t.write(b"y" * 10)
    t.close("closing")
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    rig.until(lambda: t.state is State.CLOSED)
    assert session.count("lost") == 1
    assert_released(rig, t)


def test_linger_deadline_closes_a_peer_that_never_closes(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.write(b"short")
    t.close("lingered")
    rig.run()
    assert t.state is State.LINGERING
    rig.clock.advance(LINGER_TIMEOUT - 0.01)
    rig.run()
    assert t.state is State.LINGERING
    rig.clock.advance(0.02)
    rig.run()
    assert t.state is State.CLOSED
    assert session.lost == ["lingered"]
    assert_released(rig, t)


def test_close_deadline_bounds_a_peer_that_never_reads(rig: Rig) -> None:
    """The whole close, flush included, takes until the deadline at the latest."""
    t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=1 << 23)
    t.write(b"z" * (4 << 20))  # far more than the kernel takes
    t.close("stuck", deadline=rig.reactor.now + 3.0)
    rig.run(3)
    assert t.state is State.CLOSING
    rig.clock.advance(3.0)
    rig.run()
    assert t.state is State.CLOSED
    assert session.lost == ["stuck"]
    assert_released(rig, t)


def test_default_close_deadline_includes_the_grace(rig: Rig) -> None:
    t, session, peer = rig.transport(sndbuf=4096, grace=5.0)
    t.write(b"z" * 500_000)
    t.close("graceful")
    rig.run()
    assert t.state is State.CLOSING
    rig.clock.advance(LINGER_TIMEOUT + 4.9)
    rig.run()
    assert t.state is State.CLOSING
    rig.clock.advance(0.2)
    rig.run()
    assert t.state is State.CLOSED
    assert session.count("lost") == 1


def test_an_exception_in_the_session_loses_that_peer_only(rig: Rig) -> None:
    t, session, peer = rig.transport()
    other, other_session, other_peer = rig.transport()

    def boom(data: bytes) -> None:
        raise RuntimeError("bug")

    session.on_data = boom
    peer.send(b"hello")
    other_peer.send(b"fine")
    rig.until(lambda: t.state is State.CLOSED and bytes(other_session.data) == b"fine")
    assert session.lost == ["internal error"]
    assert other.state is State.OPEN


def test_closed_transport_is_freed_by_refcounting(rig: Rig) -> None:
    """Nothing of the loop keeps a closed transport (or its session) alive."""
    t, session, peer = rig.transport()
    t.write(b"abc")
    t.close("bye")
    rig.run()
    peer.close()
    rig.until(lambda: t.state is State.CLOSED)
    rig.run()
    tref, sref = weakref.ref(t), weakref.ref(session)
    del t, session
    gc.collect()
    assert tref() is None
    assert sref() is None


# --- the cap on queued bytes ------------------------------------------------------------------


def test_write_past_max_outbuf_overflows_once_and_queues_nothing_more(rig: Rig) -> None:
    t, session, peer = rig.transport(max_outbuf=1000, high_water=500, low_water=100)
    t.write(b"a" * 600)
    assert session.count("overflow") == 0
    t.write(b"b" * 600)
    assert session.count("overflow") == 1
    assert t.out.size == 0 and not t.out.chunks
    assert not t.accepting
    for _ in range(5):
        t.write(b"c" * 2000)
    assert session.count("overflow") == 1
    assert t.out.size == 0
    rig.run(2)
    got = bytearray()
    read_all(peer, got)
    assert got == b""  # what was queued before the overflow went too
    assert t.mask & EVENT_WRITE == 0
    assert t.state is State.OPEN  # the session decides when to go (between requests)
    t.abort("slow consumer")
    assert session.lost == ["slow consumer"]


def test_exactly_max_outbuf_is_allowed(rig: Rig) -> None:
    t, session, peer = rig.transport(max_outbuf=1000, high_water=500, low_water=100)
    t.write(b"a" * 1000)
    assert session.count("overflow") == 0 and t.out.size == 1000


# --- interest, backpressure -------------------------------------------------------------------


def test_write_interest_only_while_bytes_are_pending(rig: Rig) -> None:
    t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=1 << 23,
                                     low_water=1 << 20)
    assert t.mask == EVENT_READ and rig.registered(t) == EVENT_READ
    t.write(b"small")
    rig.run()
    assert t.mask == EVENT_READ and rig.registered(t) == EVENT_READ  # sent at once
    t.write(b"q" * 1_000_000)
    rig.run()
    assert t.out.size > 0
    assert t.mask == EVENT_READ | EVENT_WRITE
    assert rig.registered(t) == EVENT_READ | EVENT_WRITE
    got = bytearray()
    rig.until(lambda: t.out.size == 0, lambda: read_all(peer, got))
    rig.run()
    assert t.mask == EVENT_READ and rig.registered(t) == EVENT_READ
    read_all(peer, got)
    assert len(got) == 1_000_005


def test_backpressure_between_the_water_marks(rig: Rig) -> None:
    high, low = 64 * 1024, 16 * 1024
    t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=high,
                                     low_water=low)
    # Fill the kernel and then our queue past the high-water mark while the peer reads nothing.
    rig.until(lambda: t.out.size > high, lambda: t.write(b"w" * 32768))
    assert t.congested
    t.wait_for_drain()  # what a session does when it sees `congested`
    assert t.throttled
    assert t.mask & EVENT_READ == 0 and rig.registered(t) == EVENT_WRITE
    peer.send(b"request while throttled")
    rig.run(3)
    assert session.count("data") == 0  # its input waits
    assert session.count("resume") == 0
    # The peer drains; watch the pass in which the queue went below the low-water mark.
    got = bytearray()
    unthrottled_at: List[int] = []

    def step() -> None:
        read_all(peer, got)
        if not t.throttled and not unthrottled_at:
            unthrottled_at.append(rig.reactor.passes)

    rig.until(lambda: session.count("resume") == 1, step)
    resume_pass = [p for name, p in session.calls if name == "resume"][0]
    assert unthrottled_at and resume_pass > unthrottled_at[0]  # a later pass, never the same
    assert t.out.size <= low
    assert t.mask & EVENT_READ
    rig.until(lambda: bytes(session.data) == b"request while throttled",
              lambda: read_all(peer, got))


def test_flush_throttles_by_itself_past_the_high_water_mark(rig: Rig) -> None:
    """Even a session that never asks: once our queue passes the mark, its input waits."""
    high, low = 32 * 1024, 8 * 1024
    t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=high,
                                     low_water=low)
    t.write(b"v" * (4 * high + 600_000))
    rig.run()
    assert t.throttled and t.mask == EVENT_WRITE
    got = bytearray()
    rig.until(lambda: session.count("resume") == 1, lambda: read_all(peer, got))
    assert not t.throttled


def test_wait_for_drain_is_ignored_unless_open(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.close("bye")
    t.wait_for_drain()
    assert not t.throttled
    assert t.mask & EVENT_READ  # closing keeps draining input so the close never resets


def test_close_while_throttled_reads_again_to_drain(rig: Rig) -> None:
    t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=16384,
                                     low_water=4096)
    rig.until(lambda: t.out.size > 16384, lambda: t.write(b"w" * 32768))
    t.wait_for_drain()
    t.close("bye")
    assert not t.throttled
    assert t.mask == EVENT_READ | EVENT_WRITE


# --- half-close -------------------------------------------------------------------------------


def test_half_close_gives_eof_and_queued_output_still_goes(rig: Rig) -> None:
    t, session, peer = rig.transport()
    def answer() -> None:
        assert t.eof
        t.write(b"answer to " + bytes(session.data))
        t.close("peer closed")

    session.on_eof = answer
    peer.send(b"question")
    peer.shutdown(socket.SHUT_WR)
    got = bytearray()
    eof = [False]
    rig.until(lambda: eof[0], lambda: eof.__setitem__(0, eof[0] or read_all(peer, got)))
    assert bytes(got) == b"answer to question"
    assert session.count("eof") == 1
    assert t.state is State.CLOSED  # the peer's EOF came first: nothing to linger for
    assert session.lost == ["peer closed"]
    assert_released(rig, t)


def test_half_closed_transport_stops_reading_but_keeps_writing(rig: Rig) -> None:
    t, session, peer = rig.transport()
    peer.shutdown(socket.SHUT_WR)
    rig.until(lambda: t.eof)
    assert session.count("eof") == 1
    assert t.state is State.OPEN
    assert t.mask & EVENT_READ == 0  # nothing more will come
    t.write(b"late")
    rig.run()
    got = bytearray()
    rig.until(lambda: bytes(got) == b"late", lambda: read_all(peer, got))
    rig.run(3)
    assert session.count("eof") == 1  # once


# --- pausing ----------------------------------------------------------------------------------


def test_pause_and_resume_reading(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.pause_reading()
    t.pause_reading()
    assert t.mask & EVENT_READ == 0
    peer.send(b"held")
    rig.run(3)
    assert session.count("data") == 0
    t.resume_reading()
    assert t.mask & EVENT_READ
    rig.until(lambda: bytes(session.data) == b"held")
    t.resume_reading()  # idempotent
    assert rig.registered(t) == EVENT_READ


def test_resume_reading_respects_backpressure(rig: Rig) -> None:
    t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=16384,
                                     low_water=4096)
    t.pause_reading()
    rig.until(lambda: t.out.size > 16384, lambda: t.write(b"w" * 32768))
    t.wait_for_drain()
    t.resume_reading()
    assert t.mask & EVENT_READ == 0  # still throttled


def test_resume_reading_after_close_is_a_no_op(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.pause_reading()
    t.abort("gone")
    t.resume_reading()
    assert rig.registered(t) is None


def test_pause_reading_after_close_is_a_no_op(rig: Rig) -> None:
    t, session, peer = rig.transport()
    t.abort("gone")
    t.pause_reading()
    assert rig.registered(t) is None and t.mask == 0


# --- order ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(chunks=st.lists(st.integers(1, 40_000), min_size=1, max_size=30),
       reads=st.lists(st.integers(64, 50_000), min_size=1, max_size=10))
def test_bytes_leave_in_the_order_queued(chunks: List[int], reads: List[int]) -> None:
    rig = Rig()
    try:
        t, session, peer = rig.transport(sndbuf=4096, max_outbuf=1 << 24, high_water=1 << 23,
                                         low_water=1 << 20)
        expected = pattern(sum(chunks))
        pos = 0
        for n in chunks:
            t.write(expected[pos:pos + n])
            pos += n
            if n % 3 == 0:
                rig.run()  # some writes land between passes, some in the same one
        got = bytearray()
        i = [0]

        def step() -> None:
            while True:  # reads of the sizes drawn, until the socket is empty
                want = reads[i[0] % len(reads)]
                i[0] += 1
                try:
                    got.extend(peer.recv(want))
                except BlockingIOError:
                    return

        rig.until(lambda: len(got) >= len(expected), step)
        assert bytes(got) == expected
    finally:
        rig.close()
