"""Registrations are paced per address: a burst at once, then a rate; the others wait their turn.

The unit tests drive `selchat.loop.pacing.Pacer` with a fake clock; the property test checks
the promise for any arrivals and cancellations (never more than burst + rate x window go in a
window; those who wait go in arrival order; nobody still waiting is skipped). The end-to-end
tests hold the real server to it: a churner that says hello and resets in a loop costs the
lobby's members at most the paced number of join/quit events, a newcomer from the churner's
address still gets in, and past the queue's cap a hello is refused with
`too_many_connections`.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ServerProcess, unique_nick
from selchat.loop.pacing import Full, Pacer
from selchat.loop.reactor import Reactor
from wire import Client, encode


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def advance(reactor: Reactor, clock: FakeClock, seconds: float, step: float = 0.01) -> None:
    end = clock.now + seconds
    while clock.now < end:
        clock.now = min(end, clock.now + step)
        reactor.run_once(timeout=0)


def test_a_burst_goes_at_once_then_the_rate_in_arrival_order() -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    pacer = Pacer(reactor, rate=4.0, burst=3, max_waiting=10)
    went: List[str] = []
    tickets = [pacer.request("a", lambda i=i: went.append(f"a{i}")) for i in range(6)]
    assert went == ["a0", "a1", "a2"] and tickets[:3] == [None, None, None]
    assert pacer.request("b", lambda: went.append("b0")) is None  # another address: its own burst
    advance(reactor, clock, 0.2)
    assert went[-1] == "b0" and len(went) == 4  # 1/4 s not yet passed
    advance(reactor, clock, 0.6)
    assert went[4:] == ["a3", "a4", "a5"]
    assert pacer.waiting("a") == 0


def test_a_cancelled_wait_takes_no_turn_and_the_queue_has_a_cap() -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    pacer = Pacer(reactor, rate=2.0, burst=1, max_waiting=2)
    went: List[str] = []
    pacer.request("a", lambda: went.append("first"))
    dead = pacer.request("a", lambda: went.append("dead"))
    alive = pacer.request("a", lambda: went.append("alive"))
    with pytest.raises(Full):
        pacer.request("a", lambda: went.append("too many"))
    assert dead is not None and alive is not None
    dead.cancel()  # the churner reset while it waited
    advance(reactor, clock, 0.55)
    assert went == ["first", "alive"], "the dead connection took a turn or the live one waited two"
    alive.cancel()  # cancelling after the turn is harmless
    assert len(reactor.timers) == 0


def test_settled_addresses_are_forgotten_when_the_table_is_full() -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    pacer = Pacer(reactor, rate=10.0, burst=2, max_waiting=2, max_addresses=100)
    for i in range(100):
        pacer.request(f"10.0.0.{i}", lambda: None)
    assert len(pacer) == 100
    advance(reactor, clock, 1.0)  # every address is back to a full burst
    pacer.request("10.0.1.1", lambda: None)
    assert len(pacer) == 1


@settings(max_examples=80, deadline=None)
@given(
    rate=st.sampled_from([1.0, 3.0, 10.0]),
    burst=st.integers(1, 5),
    arrivals=st.lists(st.tuples(st.floats(0, 3), st.booleans(), st.floats(0, 1)), max_size=40),
)
def test_never_more_than_the_promise_and_fifo_for_any_arrivals(rate: float, burst: int,
                                                               arrivals: List[Any]) -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    pacer = Pacer(reactor, rate=rate, burst=burst, max_waiting=1000)
    start = clock.now
    went: List[tuple] = []  # (time, position in the order of requests)
    cancels: List[tuple] = []  # (time, ticket, position) still to make
    cancelled: List[tuple] = []  # (ticket, position) of every cancellation planned
    events = sorted((at, i, cancel, after) for i, (at, cancel, after) in enumerate(arrivals))
    for i, (at, _, cancel, after) in enumerate(events):
        advance(reactor, clock, max(0.0, start + at - clock.now), step=0.005)
        while cancels and cancels[0][0] <= clock.now:
            cancels.pop(0)[1].cancel()
        ticket = pacer.request("k", lambda i=i: went.append((clock.now, i)))
        if cancel and ticket is not None:
            cancels.append((clock.now + after, ticket, i))
            cancelled.append((ticket, i))
            cancels.sort(key=lambda c: c[0])
    for when, ticket, _ in cancels:
        advance(reactor, clock, max(0.0, when - clock.now), step=0.005)
        ticket.cancel()
    advance(reactor, clock, 1 + len(arrivals) / rate, step=0.005)
    times = [t for t, _ in went]
    for j, t in enumerate(times):  # any window [t, t + w] holds at most burst + rate * w
        for k in range(j, len(times)):
            assert k - j + 1 <= burst + rate * (times[k] - t) + 1e-6
    order = [i for _, i in went]
    assert order == sorted(order), "those who waited did not go in arrival order"
    cancelled_early = {i for ticket, i in cancelled if i not in order}
    assert set(order) | cancelled_early == set(range(len(arrivals))), "someone never went"
    assert pacer.waiting("k") == 0


# --- the real server --------------------------------------------------------------------------

def hello_and_reset(port: int, nick: str) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(encode({"type": "hello", "nick": nick}))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_a_churner_costs_the_lobby_only_the_paced_joins(start_server) -> None:
    srv: ServerProcess = start_server("--max-per-ip", "0", "--register-rate", "2",
                                      "--register-burst", "3")
    watcher = srv.registered()
    started = time.monotonic()
    for i in range(200):
        hello_and_reset(srv.port, f"churn{i}")
    newcomer = srv.client()
    newcomer.send(type="hello", nick=unique_nick())
    newcomer.expect("welcome", timeout=9.0)  # waits its turn behind the churn, is not refused
    got = watcher.barrier()
    elapsed = time.monotonic() - started
    joins = [e for e in got if e.get("type") == "join" and e.get("nick", "").startswith("churn")]
    # The watcher's own registration took one of the burst; a few in-flight resets can still
    # take a turn, but never more than the pace allows.
    assert len(joins) <= 3 + 2 * elapsed + 1, (len(joins), elapsed)
    assert len(joins) < 100, "the churn was not paced"


def test_a_hello_that_waits_past_the_handshake_timeout_is_closed(start_server) -> None:
    srv: ServerProcess = start_server("--max-per-ip", "0", "--register-rate", "0.1",
                                      "--register-burst", "1", "--handshake-timeout", "1")
    first = srv.registered()  # the burst
    late = srv.client()
    port = late.sock.getsockname()[1]
    late.send(type="hello", nick=unique_nick())  # its turn would come in 10 s
    late.assert_closed(timeout=5.0)
    srv.wait_log(r"closed: 127\.0\.0\.1:%d: handshake timeout" % port)
    assert first.is_open_now()


def test_pacing_off_lets_every_hello_in_at_once(start_server) -> None:
    srv: ServerProcess = start_server("--max-per-ip", "0", "--register-rate", "0")
    clients = []
    for _ in range(60):
        c = srv.client()
        c.send(type="hello", nick=unique_nick())
        clients.append(c)
    for c in clients:
        c.expect("welcome", timeout=5.0)


def test_irc_registrations_are_paced_and_wait_rather_than_fail(start_server) -> None:
    from ircwire import IrcClient, irc_port

    srv: ServerProcess = start_server("--max-per-ip", "0", "--irc-port", "0",
                                      "--register-rate", "1", "--register-burst", "1")
    port = irc_port(srv)
    srv.registered()  # takes the address's burst: the next turn is a second away
    for i in range(20):  # IRC clients that register and vanish while they wait
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"NICK ircchurn{i}\r\nUSER u 0 * :u\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    client = IrcClient(port, label="paced")
    client.send(f"NICK {unique_nick()}")
    client.send("USER u 0 * :Paced")
    # Not welcomed at once (its turn is about a second away; a slow machine only delays it
    # more), then welcomed: it waits, it is not refused, and the vanished ones took no turn.
    early = []
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        try:
            early.append(client.recv_line(timeout=max(0.01, deadline - time.monotonic())))
        except AssertionError:
            break
    assert not [line for line in early if line.command == "001"], "registered without waiting"
    client.expect("001", timeout=9.0)
    client.close()
