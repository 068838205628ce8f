"""Repeated log lines come once per period with a count: RateLog, and where the server uses it."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from selchat.defaults import ACCEPT_PER_PASS
from hypothesis import given
from hypothesis import strategies as st

from selchat.core.chat import Chat
from selchat.core.store import MemoryStore, StoreError
from selchat.hub import Hub
from selchat.loop import ratelog
from selchat.loop.listener import Admission, Listener
from selchat.loop.ratelog import RateLog
from selchat.loop.reactor import Reactor


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class Timers:
    """Stands in for `reactor.call_later`: the scheduled callbacks, run by hand."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.due: List[Tuple[float, Callable[[Any], None]]] = []

    def __call__(self, delay: float, callback: Callable[[Any], None]) -> None:
        self.due.append((self.clock.now + delay, callback))

    def run(self) -> None:
        ready = [entry for entry in self.due if entry[0] <= self.clock.now]
        self.due = [entry for entry in self.due if entry[0] > self.clock.now]
        for _, callback in ready:
            callback(None)


@pytest.fixture(autouse=True)
def fresh_shared_logs() -> Iterator[None]:
    """Each test starts with no windows open in the server's shared RateLog."""
    ratelog._shared.clear()
    yield
    ratelog._shared.clear()


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    lg = logging.getLogger("test.ratelog")
    lg.setLevel(logging.DEBUG)
    yield lg


def lines(caplog: pytest.LogCaptureFixture, name: str = "test.ratelog") -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_the_first_is_logged_repeats_are_counted_and_the_next_says_how_many(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rl = RateLog(logger, period=10.0, clock=clock)
    assert rl.log(logging.WARNING, "full", "refusing %s: %s", "a:1", "server_full")
    for n in range(1000):
        clock.now += 0.001
        assert not rl.log(logging.WARNING, "full", "refusing %s: %s", f"a:{n}", "server_full")
    assert lines(caplog) == ["refusing a:1: server_full"]
    assert rl.pending() == 1000
    clock.now = 1010.0
    assert rl.log(logging.WARNING, "full", "refusing %s: %s", "b:2", "server_full")
    assert lines(caplog)[1] == "refusing b:2: server_full (1000 more like this in the last 10 s)"
    assert caplog.records[-1].levelno == logging.WARNING


def test_keys_are_counted_apart(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rl = RateLog(logger, clock=clock)
    for _ in range(3):
        rl.log(logging.WARNING, "a", "reason a")
        rl.log(logging.WARNING, "b", "reason b")
    assert lines(caplog) == ["reason a", "reason b"]


def test_flush_summarises_a_burst_that_stopped(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rl = RateLog(logger, period=10.0, clock=clock)
    for n in range(50):
        rl.log(logging.ERROR, "disk", "write failed: %d", n)
    assert rl.flush() == 0  # the period is not over
    clock.now += 10.0
    assert rl.flush() == 1
    # The line is the latest occurrence; the 48 before it (after the first) are counted.
    assert lines(caplog) == ["write failed: 0", "write failed: 49 (48 more like this in the last 10 s)"]
    clock.now += 10.0
    assert rl.flush() == 0 and rl.pending() == 0
    assert rl.log(logging.ERROR, "disk", "write failed: again")  # a fresh window logs at once
    assert lines(caplog)[-1] == "write failed: again"


def test_a_single_repeat_is_flushed_without_a_count(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rl = RateLog(logger, clock=clock)
    rl.log(logging.INFO, "k", "one")
    rl.log(logging.INFO, "k", "two")
    assert rl.flush(force=True) == 1
    assert lines(caplog) == ["one", "two"]


def test_a_schedule_summarises_on_time_without_anyone_calling_flush(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    timers = Timers(clock)
    rl = RateLog(logger, period=10.0, clock=clock, schedule=timers)
    rl.log(logging.WARNING, "k", "x")
    assert timers.due == []  # nothing to summarise yet, no timer
    for _ in range(5):
        rl.log(logging.WARNING, "k", "x")
    assert len(timers.due) == 1  # one timer, not one per repeat
    clock.now += 9.9
    timers.run()
    assert lines(caplog) == ["x"]
    clock.now += 0.1
    timers.run()
    assert lines(caplog) == ["x", "x (4 more like this in the last 10 s)"]
    assert timers.due == [] and rl.pending() == 0


def test_a_flood_that_goes_on_is_one_line_per_period(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    timers = Timers(clock)
    rl = RateLog(logger, period=10.0, clock=clock, schedule=timers)
    for _ in range(60 * 100):  # 100 a second for a minute
        clock.now += 0.01
        rl.log(logging.WARNING, "k", "refused")
        timers.run()
    got = lines(caplog)
    assert 6 <= len(got) <= 7
    counted = len(got) + sum(int(line.split("(")[1].split()[0]) for line in got if "(" in line)
    assert counted + rl.pending() == 6000  # nothing is lost


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 30)), max_size=200))
def test_every_occurrence_is_either_logged_or_counted(events: List[Tuple[str, float]]) -> None:
    logged: List[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    lg = logging.getLogger("test.ratelog.property")
    lg.propagate = False
    lg.setLevel(logging.INFO)
    sink = Sink()
    lg.addHandler(sink)
    try:
        clock = FakeClock()
        rl = RateLog(lg, period=10.0, clock=clock, max_keys=2)
        for key, gap in events:
            clock.now += gap
            rl.log(logging.INFO, key, key)
        rl.flush(force=True)
        counted = len(logged) + sum(int(m.split("(")[1].split()[0]) for m in logged if "(" in m)
        assert counted == len(events)
    finally:
        lg.removeHandler(sink)


def test_disabled_levels_cost_nothing(logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    logger.setLevel(logging.WARNING)
    rl = RateLog(logger)
    assert not rl.log(logging.DEBUG, "k", "%s", object())
    assert rl.pending() == 0 and lines(caplog) == []


def test_a_message_with_a_percent_and_no_args_is_kept_as_it_is(
        logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rl = RateLog(logger, clock=clock)
    rl.log(logging.INFO, "k", "100% full")
    rl.log(logging.INFO, "k", "100% full")
    clock.now += 11
    rl.log(logging.INFO, "k", "100% full")
    assert lines(caplog) == ["100% full", "100% full (1 more like this in the last 11 s)"]


# --- where the server uses it --------------------------------------------------------------------

class BrokenStore(MemoryStore):
    def commit(self) -> int:
        raise StoreError("database or disk is full")


def test_a_full_disk_is_one_error_per_period_not_one_per_pass(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    try:
        hub = Hub(Chat(BrokenStore()), reactor)
        caplog.set_level(logging.INFO, logger="selchat.server")
        for _ in range(5000):  # five thousand passes of a loop in 5 s
            clock.now += 0.001
            reactor.run_once(timeout=0)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == ["history write failed, 0 message(s) not stored: database or disk is full"]
        clock.now += 6.0  # the period is over: the reactor's timer writes the summary
        reactor.run_once(timeout=0)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2 and "(4998 more like this in the last 11 s)" in errors[1]
        assert hub.ratelog is ratelog.shared(logging.getLogger("selchat.server"))
    finally:
        reactor.close()


class FailingSocket:
    """A listening socket whose accepts fail with `error` (and one that works, on request)."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.real = socket.socket()
        self.real.bind(("127.0.0.1", 0))
        self.real.listen()
        self.real.setblocking(False)

    def fileno(self) -> int:
        return self.real.fileno()

    def getsockname(self) -> Any:
        return self.real.getsockname()

    def accept(self) -> Any:
        raise OSError(self.error, "simulated")

    def close(self) -> None:
        self.real.close()


def test_failed_accepts_are_counted_not_logged_one_by_one(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    sock = FailingSocket(errno.ECONNABORTED)
    try:
        listener = Listener(reactor, sock, lambda s, a: None)  # type: ignore[arg-type]
        caplog.set_level(logging.INFO, logger="selchat.server")
        for _ in range(20):
            listener._on_ready(1)  # ACCEPT_PER_PASS failed accepts a pass
        got = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
        assert got == ["accept failed: [Errno %d] simulated" % errno.ECONNABORTED]
        clock.now += 10.0
        reactor.run_once(timeout=0)
        got = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
        assert len(got) == 2 and f"({20 * ACCEPT_PER_PASS - 2} more like this in the last 10 s)" in got[1]
        listener.close()
    finally:
        reactor.close()


def test_a_flapping_descriptor_shortage_warns_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    sock = FailingSocket(errno.EMFILE)
    try:
        listener = Listener(reactor, sock, lambda s, a: None)  # type: ignore[arg-type]
        caplog.set_level(logging.INFO, logger="selchat.server")
        for _ in range(100):  # short, then one accept gets through, short again, ...
            listener._on_ready(1)
            listener._short = False  # as if an accept had succeeded in between
            listener._resume()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "pausing accepts" in warnings[0].getMessage()
        listener.close()
    finally:
        reactor.close()


def test_refusals_are_one_warning_per_reason_and_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    sock = FailingSocket(errno.ECONNABORTED)
    try:
        Listener(reactor, sock, lambda s, a: None).close()  # type: ignore[arg-type]  # attaches the clock
        admission = Admission(1, 1)
        caplog.set_level(logging.INFO, logger="selchat.server")
        for n in range(1000):
            admission.log_refusal(f"127.0.0.1:{n}", "too_many_connections")
            admission.log_refusal(f"127.0.0.2:{n}", "server_full")
        got = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert got == ["refusing 127.0.0.1:0: too_many_connections", "refusing 127.0.0.2:0: server_full"]
        clock.now += 10.0
        reactor.run_once(timeout=0)
        got = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert got[2:] == [
            "refusing 127.0.0.1:999: too_many_connections (998 more like this in the last 10 s)",
            "refusing 127.0.0.2:999: server_full (998 more like this in the last 10 s)"]
    finally:
        reactor.close()


def test_ends_worded_by_the_peer_are_still_one_line_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """Connections that never register, each ending with words or numbers of its own choosing:
    a frame length, a QUIT text, a bad HTTP request line, an Origin refused. Keyed by the whole text, each was a
    new kind and got its line (the soak: 592 lines for 592 garbage senders)."""
    import struct

    from selchat.config import ServerConfig
    from selchat.doors.web.http import WS_PATH
    from selchat.server import Server

    clock = FakeClock()
    reactor = Reactor(clock=clock)
    server = Server(ServerConfig(port=0, irc_port=0, web_port=0, db=":memory:", max_per_ip=0,
                                 register_rate=0), MemoryStore(), reactor=reactor)
    caplog.set_level(logging.INFO, logger="selchat.server")
    ours = []
    try:
        for i in range(40):
            upgrade = (b"GET " + WS_PATH + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       + f"Origin: https://{chr(97 + i % 26)}{chr(97 + i // 26)}.example\r\n\r\n".encode())
            for door, words in ((server.framed, struct.pack(">I", 70000 + i)),
                                (server.irc, f"QUIT :gone for {i} days\r\n".encode()),
                                (server.web, f"GET /x{i} HTTP/1.1\r\nBad{i} header\r\n\r\n".encode()),
                                (server.web, upgrade)):
                mine, theirs = socket.socketpair()
                server._accept(door, theirs, ("127.0.0.5", 5000 + len(ours)))
                mine.sendall(words)
                mine.setblocking(False)
                ours.append(mine)
        ended = set()
        for _ in range(200):
            reactor.run_once(0)
            for k, s in enumerate(ours):
                try:
                    while s.recv(65536):
                        pass
                    ended.add(k)
                except BlockingIOError:
                    pass
                except OSError:
                    ended.add(k)
            if len(ended) == len(ours):
                break
        assert len(ended) == len(ours), "not every connection was closed by the server"
        for s in ours:
            s.close()  # the server lingers until it sees our end
        for _ in range(5):
            reactor.run_once(0)
        assert not server.transports
        lines = [r.getMessage() for r in caplog.records if r.name == "selchat.server"]
        for what in ("frame length", "quit: gone for", "http 400", "http 403"):
            assert any(what in line for line in lines), f"no line about {what!r}: {lines}"
        assert len(lines) <= 12, "\n".join(lines)
    finally:
        for s in ours:
            s.close()
        server.request_stop()
        server._finish()
