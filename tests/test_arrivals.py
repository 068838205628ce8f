"""Requests are charged when their bytes may have arrived, also when the server was not reading.

Backpressure stops reading a client whose queue is above the high-water mark. What the client
sent meanwhile waits in the kernel; once the client has read its answers, one read takes it
all. Charging it as if it had all arrived in the last pass made a client within its rate look
like a burst (the soak run: well-behaved clients refused after every stall, because the stall
left each of them a backlog of output). The same goes for a server stopped (SIGSTOP, a busy
machine) at an awkward moment: after `select` took its list from the kernel, or in the middle
of a pass. The other side: a burst is a burst, however long the client or the whole server
was quiet before it.

In-process, with a fake clock the test moves, and selectors that play the stop or the sleep:
the well-behaved client sends 8 pings a second, under the rate of 10.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import pytest


from selchat.config import ServerConfig
from selchat.core.store import MemoryStore
from selchat.loop.reactor import Reactor
from selchat.defaults import RECV_SIZE
from selchat.loop.listener import BACKLOG_CREDIT
from selchat.server import Server, make_tls_context
from wire import encode as frame


class Clock:
    def __init__(self) -> None:
        self.now = 7000.0

    def __call__(self) -> float:
        return self.now


def accepted(server: Server, reactor: Reactor, nick: str, port: int):
    """A socketpair handed to the server as if accepted, past its welcome. Its kernel buffers
    are small and fixed, so answers pile up in the server's queue after a few (loopback TCP
    autotunes to megabytes)."""
    sock, theirs = socket.socketpair()
    server._accept(server.framed, theirs, ("127.0.0.9", port))
    sock.setblocking(False)
    sock.sendall(frame({"type": "hello", "nick": nick}))
    for _ in range(5):
        reactor.run_once(0)
    return sock


def until_throttled(server: Server, clock: Clock, reactor: Reactor, sock: socket.socket,
                    every: float) -> Tuple[Any, int]:
    """Pings whose pongs are 8 KB, one every `every` s, until the server stops reading the
    client (its queue is past the high-water mark): (the transport, pings sent)."""
    transport = next(iter(server.transports.values()))
    sent = 0
    deadline = time.monotonic() + 10
    while not transport.throttled:
        assert time.monotonic() < deadline, "the queue never passed the high-water mark"
        sock.sendall(frame({"type": "ping", "token": f"{sent}" + "t" * 8000}))
        sent += 1
        clock.now += every
        reactor.run_once(0)
    return transport, sent


def test_what_waited_behind_backpressure_is_charged_when_it_arrived() -> None:
    clock = Clock()
    reactor = Reactor(clock=clock)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0, max_outbuf=262144),
                    MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "reader", 4000)
    transport, sent = until_throttled(server, clock, reactor, sock, 1 / 8)  # 8 a second
    for _ in range(40):  # five more seconds at 8 a second, none of it read by the server
        sock.sendall(frame({"type": "ping", "token": f"small{sent}"}))
        sent += 1
        clock.now += 1 / 8
        reactor.run_once(0)
    assert transport.throttled
    received = bytearray()
    deadline = time.monotonic() + 10
    while received.count(b'"type":"pong"') + received.count(b'"rate_limited"') < sent:
        assert time.monotonic() < deadline, f"{received.count(b'pong')} of {sent} answered"
        # (the client reads now; the server goes on once its queue has drained)
        reactor.run_once(0)
        try:
            received.extend(sock.recv(1 << 20))
        except BlockingIOError:
            pass
    assert received.count(b'"rate_limited"') == 0, "a client within its rate was refused"
    shut(server, sock)


def answers(reactor: Reactor, sock: socket.socket, n: int) -> Tuple[int, int]:
    """Serve and read until `n` pings are answered (pong or rate_limited) or the connection
    ends (past `burst` refusals in a row: excess flood); (pongs, refusals)."""
    received = bytearray()
    deadline = time.monotonic() + 10
    closed = False
    while not closed and received.count(b'"type":"pong"') + received.count(b'"rate_limited"') < n:
        assert time.monotonic() < deadline, f"{received.count(b'pong')} of {n} answered"
        reactor.run_once(0)
        try:
            chunk = sock.recv(1 << 20)
            closed = not chunk
            received.extend(chunk)
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
    return received.count(b'"type":"pong"'), received.count(b'"rate_limited"')


def pings(first: int, n: int) -> bytes:
    return b"".join(frame({"type": "ping", "token": f"p{i}"}) for i in range(first, first + n))


def shut(server: Server, sock: socket.socket) -> None:
    server.request_stop()
    server._finish()
    sock.close()


def at_8_a_second(sock: socket.socket, clock: Clock, first: int, n: int = 32) -> Callable[[], None]:
    """What the client does while the server is stopped: `n` pings, 8 a second."""
    def stop() -> None:
        for i in range(n):
            sock.sendall(pings(first + i, 1))
            clock.now += 1 / 8
    return stop


def steady(clock: Clock, reactor: Reactor, sock: socket.socket, seconds: float) -> None:
    """The well-behaved client at 8 a second, a pass between its pings; all answered."""
    n = int(seconds * 8)
    for i in range(n):
        sock.sendall(pings(i, 1))
        clock.now += 1 / 8
        reactor.run_once(0)
    assert answers(reactor, sock, n) == (n, 0)


def test_a_burst_after_a_silence_is_still_a_burst() -> None:
    """The other side of it: a client read every pass that was quiet for 50 s, then sends 60
    requests in one write, gets its burst (20) and then refusals; its silence is not taken for
    time over which the 60 could have arrived."""
    clock = Clock()
    reactor = Reactor(clock=clock)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "sleeper", 4001)
    for _ in range(50):  # 50 s of passes (another client keeps the loop turning)
        clock.now += 1.0
        reactor.run_once(0)
    sock.sendall(pings(0, 60))
    pongs, refused = answers(reactor, sock, 60)
    assert refused > 0, "a burst of 60 after a silence was let through"
    assert pongs <= 25
    shut(server, sock)


class Stopping(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """Never sleeps (the clock is the test's); runs `stop` once, at the moment a SIGSTOP would
    land, then returns the list as the real call would."""

    def __init__(self) -> None:
        super().__init__()
        self.stop: Optional[Callable[[], None]] = None
        self.mid_pass = False  # stop after select returned (and the pass took its time)

    def select(self, timeout: Optional[float] = None) -> Any:
        ready = super().select(0)
        stop, self.stop = self.stop, None
        if stop is None:
            return ready
        if self.mid_pass:  # a callback before everyone else's: the pass is under way
            return [(selectors.SelectorKey(None, -1, selectors.EVENT_READ, lambda _: stop()),
                     selectors.EVENT_READ)] + list(ready)
        stop()  # between the kernel's taking the list and select returning: the list is stale
        return ready


def stopped_server(selector: Stopping) -> Tuple[Clock, Reactor, Server, socket.socket]:
    clock = Clock()
    reactor = Reactor(clock=clock, selector=selector)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "steady", 4002)
    return clock, reactor, server, sock


def test_a_stop_after_the_kernel_gave_its_list_is_not_a_burst() -> None:
    """The soak's stalls: `select` returned with the list the kernel gave it before the stop,
    without the sockets that filled during the 4 s stop. Read in the next pass, their backlog
    was charged as if it had all come then: 32 pings at once, 12 refused."""
    selector = Stopping()
    clock, reactor, server, sock = stopped_server(selector)
    steady(clock, reactor, sock, 2.0)

    selector.stop = at_8_a_second(sock, clock, 100)  # 4 s stopped, the client goes on
    assert answers(reactor, sock, 32) == (32, 0), "a client within its rate was refused"
    shut(server, sock)


def test_a_stop_in_the_middle_of_a_pass_is_not_a_burst() -> None:
    """Stopped in the middle of a pass, before this client's read: the read takes what came
    during the stop too, and must not count it as having come before the pass's `now`."""
    selector = Stopping()
    selector.mid_pass = True
    clock, reactor, server, sock = stopped_server(selector)
    steady(clock, reactor, sock, 2.0)
    sock.sendall(pings(100, 1))  # readable when the list is taken, so read in that pass

    selector.stop = at_8_a_second(sock, clock, 101)
    assert answers(reactor, sock, 33) == (33, 0), "a client within its rate was refused"
    shut(server, sock)


class Sleeping(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """Sleeps as long as it is asked on the test's clock, unless something is readable; a
    `wake` due during a sleep happens then (the sleep ends there, as the kernel's would)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.wake: Optional[Tuple[float, Callable[[], None]]] = None

    def select(self, timeout: Optional[float] = None) -> Any:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        until = self.clock.now + (3600.0 if timeout is None else timeout)
        if self.wake is not None and self.wake[0] <= until:
            (self.clock.now, wake), self.wake = self.wake, None
            wake()
            return super().select(0)
        self.clock.now = until
        return ready


def test_a_burst_that_wakes_a_sleeping_server_is_still_a_burst() -> None:
    """Nobody else about: the server sleeps in `select` until a timer. A client quiet for 50 s
    that wakes it with 60 pings in one write gets its burst and refusals; it does not get
    its 60 spread over the server's sleep."""
    clock = Clock()
    selector = Sleeping(clock)
    reactor = Reactor(clock=clock, selector=selector)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "waker", 4003)
    start = clock.now
    selector.wake = (start + 50.0, lambda: sock.sendall(pings(0, 60)))
    for _ in range(100000):
        if selector.wake is None:
            break
        reactor.run_once()
    assert selector.wake is None and clock.now == start + 50.0
    pongs, refused = answers(reactor, sock, 60)
    assert refused > 0, "a burst of 60 that woke the server was let through"
    assert pongs <= 25
    shut(server, sock)


def test_a_client_once_held_back_and_then_quiet_gets_no_burst_over_its_silence() -> None:
    """Held back once (its answers backed up, so the server stopped reading it for a while),
    then quiet for 50 s: reading has been on again all that time, so its burst of 60 is a
    burst. (Until an emptying read, the hold used to last, and the 60 were spread over the
    silence.)"""
    clock = Clock()
    reactor = Reactor(clock=clock)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0, max_outbuf=262144),
                    MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "held", 4005)
    transport, sent = until_throttled(server, clock, reactor, sock, 1.0)  # one a second
    assert answers(reactor, sock, sent) == (sent, 0)  # it reads them: reading resumes
    for _ in range(50):
        clock.now += 1.0
        reactor.run_once(0)
    assert not transport.throttled and not transport.paused
    sock.sendall(pings(0, 60))
    pongs, refused = answers(reactor, sock, 60)
    assert refused > 0 and pongs <= 25, f"{pongs} of a burst of 60 let through"
    shut(server, sock)


def test_a_backlog_larger_than_one_read_is_spread_over_the_whole_stop() -> None:
    """32 pings of 6 KB at 8 a second during a 4 s stop: 200 KB, more than one read takes.
    Each read is its share of the stop, so the reads after the first are not a burst at
    the end of it."""
    selector = Stopping()
    clock, reactor, server, sock = stopped_server(selector)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

    def big(i: int) -> bytes:
        return frame({"type": "ping", "token": f"{i}" + "b" * 6000})
    for i in range(16):
        sock.sendall(big(i))
        clock.now += 1 / 8
        reactor.run_once(0)
    assert answers(reactor, sock, 16) == (16, 0)

    def stop() -> None:
        sock.setblocking(True)
        for i in range(32):
            sock.sendall(big(100 + i))
            clock.now += 1 / 8
        sock.setblocking(False)
    selector.stop = stop
    assert answers(reactor, sock, 32) == (32, 0), "a client within its rate was refused"
    shut(server, sock)


def test_what_a_client_sends_behind_its_hello_during_a_stop_is_not_a_burst() -> None:
    """Connected, hello and 32 pings at 8 a second, all while the server was stopped: the
    bucket that welcome starts is full from when the hello came, not from after the stop."""
    selector = Stopping()
    clock = Clock()
    reactor = Reactor(clock=clock, selector=selector)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(), reactor=reactor)
    reactor.run_once(0)
    sock, theirs = socket.socketpair()

    def stop() -> None:
        sock.sendall(frame({"type": "hello", "nick": "early"}))
        at_8_a_second(sock, clock, 0)()
        # accepted after the stop, as a listener would (what came before is the listener's
        # knowledge: before the stop)
        reactor.call_soon(server._accept, server.framed, theirs, ("127.0.0.9", 4006),
                          reactor.prev_listed_at)
    selector.stop = stop
    sock.setblocking(False)
    assert answers(reactor, sock, 32) == (32, 0), "a client within its rate was refused"
    shut(server, sock)


def tls_server(certificate: Dict[str, Path], selector: Optional[selectors.BaseSelector] = None,
               **options: Any) -> Tuple[Clock, Reactor, Server]:
    clock = Clock()
    reactor = Reactor(clock=clock, selector=selector)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0, **options), MemoryStore(),
                    make_tls_context(str(certificate["cert"]), str(certificate["key"])),
                    reactor=reactor)
    return clock, reactor, server


def tls_client(server: Server, reactor: Reactor, port: int, finish: bool = True,
               server_sndbuf: int = 0) -> ssl.SSLSocket:
    """A TLS client over a socketpair handed to the server as if accepted. With `finish`, the
    handshake is driven to its end; without, the client has the server's flight but has not
    sent its Finished yet (its next `do_handshake` does). `server_sndbuf` (bytes) makes the
    server's side of the pair small, so that its answers back up at once."""
    mine, theirs = socket.socketpair()
    if server_sndbuf:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    server._accept(server.framed, theirs, ("127.0.0.9", port))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = context.wrap_socket(mine, do_handshake_on_connect=False)
    sock.setblocking(False)
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, "no TLS handshake"
        try:
            sock.do_handshake()  # (the first call sends the ClientHello)
            return sock
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            for _ in range(3):
                reactor.run_once(0)
            if not finish:
                return sock


def test_a_tls_backlog_is_read_whole(certificate) -> None:
    """TLS hands over one record per read. Taken for an emptied socket, the first record of
    a backlog left the others to the next pass, charged as if they had come then: the stop
    above over TLS, each ping its own record."""
    selector = Stopping()
    clock, reactor, server = tls_server(certificate, selector)
    sock = tls_client(server, reactor, 4004)
    sock.sendall(frame({"type": "hello", "nick": "sealed"}))
    steady(clock, reactor, sock, 2.0)

    selector.stop = at_8_a_second(sock, clock, 100)
    assert answers(reactor, sock, 32) == (32, 0), "a client within its rate was refused"
    shut(server, sock)


def test_what_a_tls_client_sends_behind_its_finished_during_a_stop_is_not_a_burst(certificate) -> None:
    """The handshake reads up to the client's Finished; what the client sent behind it waits
    in the kernel, here since before a 4 s stop, and must be charged from then."""
    selector = Stopping()
    clock, reactor, server = tls_server(certificate, selector)
    sock = tls_client(server, reactor, 4007, finish=False)

    def stop() -> None:
        sock.do_handshake()  # the Finished, then the hello and the pings behind it
        sock.sendall(frame({"type": "hello", "nick": "piper"}))
        at_8_a_second(sock, clock, 0)()
    selector.stop = stop
    assert answers(reactor, sock, 32) == (32, 0), "a client within its rate was refused"
    shut(server, sock)


@pytest.mark.parametrize("end", ["close_notify", "fin"])
def test_a_tls_peer_that_ends_right_after_a_request_gets_its_answer_and_is_closed(certificate, end: str) -> None:
    """A ping and then the end of the stream (TLS's close_notify with TCP left open, or a
    bare FIN) in the same read: the pong is sent, then the connection is closed. Reading on
    to empty the socket must not swallow the end (left open for ever) or break the answer."""
    clock, reactor, server = tls_server(certificate)
    sock = tls_client(server, reactor, 4008)
    sock.sendall(frame({"type": "hello", "nick": "leaver"}))
    for _ in range(5):
        reactor.run_once(0)
    received = bytearray()

    def read() -> bool:
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return True
                received.extend(chunk)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except (ssl.SSLError, OSError):
            return True
    read()
    received.clear()
    sock.sendall(frame({"type": "ping", "token": "last"}))
    if end == "close_notify":
        try:
            sock.unwrap()
        except ssl.SSLWantReadError:
            pass
    else:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    deadline = time.monotonic() + 10
    while server.transports:
        assert time.monotonic() < deadline, "the server never saw the end of the stream"
        reactor.run_once(0)
        if end == "fin":
            read()
    if end == "fin":
        assert b'"last"' in received, "the answer was lost"
    shut(server, sock)


def test_a_read_of_exactly_one_buffer_is_still_an_emptying_read() -> None:
    """8 pings that add up to exactly RECV_SIZE bytes fill one read: that read emptied the
    socket all the same (nothing was left), so a quiet 50 s after it, a burst is a burst."""
    clock = Clock()
    reactor = Reactor(clock=clock)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "exact", 4010)
    base = len(frame({"type": "ping", "token": ""}))
    sizes = [RECV_SIZE // 8] * 7 + [RECV_SIZE - 7 * (RECV_SIZE // 8)]
    blob = b"".join(frame({"type": "ping", "token": "x" * (size - base)}) for size in sizes)
    assert len(blob) == RECV_SIZE
    sock.setblocking(True)
    sock.sendall(blob)
    sock.setblocking(False)
    clock.now += 1.0
    assert answers(reactor, sock, 8) == (8, 0)
    for _ in range(50):
        clock.now += 1.0
        reactor.run_once(0)
    sock.sendall(pings(100, 60))
    pongs, refused = answers(reactor, sock, 60)
    assert refused > 0 and pongs <= 25, f"{pongs} of a burst of 60 let through"
    shut(server, sock)


def test_a_burst_after_a_quiet_tls_handshake_is_a_burst(certificate) -> None:
    """TLS done, then 9 s of nothing (within the handshake timeout), then hello and 60 pings in
    one write: a burst, as on a plain connection; the quiet time after the handshake is not
    taken for time over which they came."""
    clock, reactor, server = tls_server(certificate)
    sock = tls_client(server, reactor, 4011)
    for _ in range(9):
        clock.now += 1.0
        reactor.run_once(0)
    sock.sendall(frame({"type": "hello", "nick": "quietly"}) + pings(0, 60))
    pongs, refused = answers(reactor, sock, 60)
    assert refused > 0 and pongs <= 25, f"{pongs} of a burst of 60 let through"
    shut(server, sock)


def test_what_tls_holds_while_a_client_is_throttled_is_served_when_it_drains(certificate) -> None:
    """A read stops at RECV_SIZE in the middle of a TLS record: the rest is decrypted and held
    by TLS, and the kernel has nothing to report. If the client is throttled just then, what
    TLS holds must still be read once its queue drains (select will never say so)."""
    clock, reactor, server = tls_server(certificate, max_outbuf=131072)
    sock = tls_client(server, reactor, 4012, server_sndbuf=4096)  # answers back up at once
    sock.sendall(frame({"type": "hello", "nick": "stranded"}))
    for _ in range(5):
        reactor.run_once(0)
    answers(reactor, sock, 0)
    sock.setblocking(True)
    for i in range(11):  # 66 KB in 11 records: one read stops inside the last
        sock.sendall(frame({"type": "ping", "token": f"{i:03d}" + "t" * 6000}))
    sock.setblocking(False)
    for _ in range(3):  # the client reads nothing meanwhile: it is throttled
        clock.now += 0.2
        reactor.run_once(0)
    assert answers(reactor, sock, 11) == (11, 0)
    shut(server, sock)


def test_the_listener_spreads_what_came_during_a_stop_and_no_further_than_its_credit() -> None:
    """Through the real listener: a client that connects during a 4 s stop and sends hello
    and 32 pings at 8 a second is within its rate. One that connected at the start of a 60 s
    stop and wrote hello and 300 pings at its end is a burst: what a connection sent before
    it was accepted is taken to have come at most BACKLOG_CREDIT ago."""
    for seconds, count, within in ((4.0, 32, True), (60.0, 300, False)):
        selector = Stopping()
        clock = Clock()
        reactor = Reactor(clock=clock, selector=selector)
        server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(),
                        reactor=reactor)
        server.listen()
        for _ in range(3):
            clock.now += 1.0
            reactor.run_once(0)
        sock = socket.create_connection(server.address[:2])

        def stop() -> None:
            sock.sendall(frame({"type": "hello", "nick": "caller"}))
            if within:
                at_8_a_second(sock, clock, 0, count)()
            else:
                clock.now += seconds
                sock.sendall(pings(0, count))
        selector.stop = stop
        sock.setblocking(False)
        pongs, refused = answers(reactor, sock, count)
        if within:
            assert (pongs, refused) == (count, 0), "a client within its rate was refused"
        else:
            assert refused > 0 and pongs <= 20 + 10 * BACKLOG_CREDIT + 5, (pongs, refused)
        shut(server, sock)
