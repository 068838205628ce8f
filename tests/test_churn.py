"""Closed means freed: a churn of connections leaves nothing of them behind (in-process).

An outside review found that a client opening connections, sending `hello` and resetting them
grew the server without bound: each closed connection stayed reachable from its pending
handshake and idle timers (with its socket, buffers, decoder and bucket) until
`--ping-interval` passed. Here the server runs in this process with a fake clock, so the test
can look at what is still alive after the churn, without waiting a minute of real time.
"""

from __future__ import annotations

import gc
import json
import socket
import struct
import weakref
from typing import List

import pytest

from selchat.config import ServerConfig
from selchat.loop.ratelog import RateLog
from selchat.core.store import MemoryStore
from selchat.doors.framed.session import FramedSession
from selchat.loop.reactor import Reactor
from selchat.server import Server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def frame(obj: dict) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


def pump(reactor: Reactor, passes: int = 5) -> None:
    for _ in range(passes):
        reactor.run_once(timeout=0)


@pytest.mark.parametrize("register_rate", [0.0, 10.0], ids=["unpaced", "paced"])
def test_churned_connections_are_freed_with_their_timers(register_rate: float) -> None:
    """Paced too: past the burst most hellos wait for their turn (and some are refused), and a
    waiting connection that resets leaves the queue and frees everything at once."""
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    config = ServerConfig(port=0, db=":memory:", max_per_ip=0, rate=10.0, burst=20,
                          register_rate=register_rate)
    server = Server(config, MemoryStore(), reactor=reactor)
    server.listen()
    port = server.address[1]
    sessions: List[weakref.ref] = []
    for round_ in range(20):
        socks = []
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(frame({"type": "hello", "nick": f"c{round_}x{i}"}))
            socks.append(s)
        pump(reactor, 10)
        sessions.extend(weakref.ref(t.session) for t in server.transports.values() if t.session)
        for s in socks:  # reset, as the attacker did
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        pump(reactor, 10)
        clock.now += 0.01  # far less than any timeout: nothing may wait for a deadline to go
    pump(reactor, 10)
    assert len(sessions) >= 900, "the churn did not reach the server"
    assert not server.transports
    assert not server.hub.chat.users
    # (the log's own timer, which summarises refusals once a period, belongs to no connection)
    live = [t for _, _, t in reactor.timers._heap
            if t.active and not isinstance(getattr(t.callback, "__self__", None), RateLog)]
    assert not live, "a closed connection left a live timer"
    if register_rate:
        assert len(server.hub.pacer) <= 1 and server.hub.pacer.waiting("127.0.0.1") == 0
    assert reactor.timers.entries < 600, "cancelled timers pile up in the heap"
    gc.collect()
    alive = sum(1 for ref in sessions if ref() is not None)
    assert alive == 0, f"{alive} sessions of closed connections are still reachable"
    assert not [o for o in gc.get_objects() if isinstance(o, FramedSession)]
    server.request_stop()
    server._finish()
