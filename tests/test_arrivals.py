"""Requests are charged when their bytes may have arrived, also when the server was not reading.

Backpressure stops reading a client whose queue is above the high-water mark. What the client
sent meanwhile waits in the kernel; once the client has read its answers, one read takes it
all. Charging it as if it had all arrived in the last pass made a client within its rate look
like a burst (the soak run: well-behaved clients refused after every stall, because the stall
left each of them a backlog of output). In-process, with a fake clock the test moves: the
client sends 8 pings a second, well under the rate of 10, while it does not read.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from selchat.config import ServerConfig
from selchat.core.store import MemoryStore
from selchat.loop.reactor import Reactor
from selchat.server import Server


class Clock:
    def __init__(self) -> None:
        self.now = 7000.0

    def __call__(self) -> float:
        return self.now


def frame(obj: dict) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


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


def test_what_waited_behind_backpressure_is_charged_when_it_arrived() -> None:
    clock = Clock()
    reactor = Reactor(clock=clock)
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0, max_outbuf=262144),
                    MemoryStore(), reactor=reactor)
    sock = accepted(server, reactor, "reader", 4000)
    transport = next(iter(server.transports.values()))
    token = "t" * 8000  # every pong is 8 KB: a few fill the queue past the high-water mark
    sent = 0
    deadline = time.monotonic() + 10
    while not transport.throttled:  # 8 a second until the server stops reading
        assert time.monotonic() < deadline, "the queue never passed the high-water mark"
        sock.sendall(frame({"type": "ping", "token": f"{sent}{token}"}))
        sent += 1
        clock.now += 1 / 8
        reactor.run_once(0)
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
    server.request_stop()
    server._finish()
    sock.close()


@pytest.mark.xfail(strict=True, reason=(
    "Known hole (review of 2026-12-02): bytes are charged from when the socket was last "
    "emptied, so a client quiet for 50 s that sends 60 requests at once has them spread over "
    "its silence. Charging from the previous pass when reading was on all along fixes it, but "
    "brought back refusals of well-behaved clients after stalls in the soak run; not found yet"))
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
    sock.sendall(b"".join(frame({"type": "ping", "token": f"p{i}"}) for i in range(60)))
    received = bytearray()
    deadline = time.monotonic() + 10
    closed = False  # past burst refusals in a row it is disconnected (excess flood)
    while not closed and received.count(b'"type":"pong"') + received.count(b'"rate_limited"') < 60:
        assert time.monotonic() < deadline
        reactor.run_once(0)
        try:
            chunk = sock.recv(1 << 20)
            closed = not chunk
            received.extend(chunk)
        except BlockingIOError:
            pass
    assert received.count(b'"rate_limited"') > 0, "a burst of 60 after a silence was let through"
    assert received.count(b'"type":"pong"') <= 25
    server.request_stop()
    server._finish()
    sock.close()
