"""The serving rules every door applies before a request, written once in DoorSession.

A door session here is a probe with fakes for its transport, hub and reactor (no sockets): the
rules are pure decisions over their state, and what they arrange (wait for the drain, pause
reading, go on in the next pass) is recorded by the fakes. The doors themselves are tested
end to end elsewhere (framed, web and IRC tests); this file pins the order of the rules and
the pass share's going on, which all three now share.
"""

from __future__ import annotations

from typing import Any, Callable, List

import pytest

from selchat.doors.base import DoorSession, password_matches
from selchat.loop.transport import State


class FakeTransport:
    def __init__(self) -> None:
        self.state = State.OPEN
        self.congested = False
        self.eof = False
        self.paused = False
        self.high_water = 1000
        self.calls: List[str] = []

    def wait_for_drain(self) -> None:
        self.calls.append("wait_for_drain")

    def pause_reading(self) -> None:
        self.paused = True
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.paused = False
        self.calls.append("resume_reading")

    def close(self, detail: str) -> None:
        self.state = State.CLOSING
        self.calls.append(f"close: {detail}")

    def _internal_error(self) -> None:  # pragma: no cover - the probe raises nothing
        raise AssertionError("internal error")


class FakeHub:
    def __init__(self, share: int) -> None:
        self.share = share  # requests this pass may still serve
        self.pacer = None

    def take_request(self) -> bool:
        self.share -= 1
        return self.share >= 0


class FakeReactor:
    def __init__(self) -> None:
        self.passes = 1
        self.now = 0.0
        self.soon: List[Callable[[], None]] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)


class FakeDoor:
    def __init__(self, share: int = 100) -> None:
        self.hub = FakeHub(share)
        self.reactor = FakeReactor()


class Probe(DoorSession):
    """A door whose flood policy is a flag and whose input is a count of requests."""

    __slots__ = ("door", "transport", "user", "bucket", "_handshake_timer", "_idle_timer",
                 "held_back", "reading_held", "served", "waiting")

    def __init__(self, door: FakeDoor) -> None:
        self.door = door
        self.transport = FakeTransport()
        self.user = None
        self.bucket = None
        self._handshake_timer = self._idle_timer = None
        self.held_back = False
        self.reading_held = False
        self.served = 0
        self.waiting = 0
        self._init_serving()

    def _held_back(self) -> bool:
        return self.held_back

    def _reading_held(self) -> bool:
        return self.reading_held

    def _waiting_input_cap(self) -> int:
        return 10

    def resume_serving(self) -> None:
        while self.waiting and self._may_serve(self.waiting):
            self.waiting -= 1
            self.served += 1


def probe(share: int = 100, waiting: int = 0) -> Probe:
    p = Probe(FakeDoor(share))
    p.waiting = waiting
    return p


def test_an_open_session_with_nothing_against_it_is_served() -> None:
    p = probe()
    assert p._may_serve(1)
    assert p.transport.calls == []


def test_a_condemned_session_is_served_nothing_whatever_else_holds() -> None:
    p = probe()
    p.doomed = True
    p.transport.congested = True
    assert not p._may_serve(1)
    assert p.transport.calls == []  # not even a wait for the drain


def test_a_closed_transport_is_served_nothing() -> None:
    p = probe()
    p.transport.state = State.CLOSING
    assert not p._may_serve(1)


def test_congestion_comes_before_the_flood_policy_and_waits_for_the_drain() -> None:
    p = probe()
    p.transport.congested = True
    p.held_back = True
    assert not p._may_serve(1)
    assert p.transport.calls == ["wait_for_drain"]


def test_the_flood_policy_comes_before_the_turn_and_the_share() -> None:
    p = probe(share=0)
    p.held_back = True
    p._turn = object()
    assert not p._may_serve(50)
    assert p.transport.calls == []  # the turn's cap was not judged, no share was taken
    assert p.door.hub.share == 0


def test_waiting_for_the_turn_reads_on_until_the_cap() -> None:
    p = probe()
    p._turn = object()
    assert not p._may_serve(10)
    assert not p.transport.paused
    assert not p._may_serve(11)
    assert p.transport.paused


def test_a_job_waits_as_a_turn_does() -> None:
    p = probe()
    p.wait_for_job()
    assert not p._may_serve(1)
    p.transport.eof = True
    assert not p._may_serve(1)
    assert p.transport.calls == ["close: peer closed while its request was being answered"]


def test_a_peer_that_closes_before_its_turn_is_closed() -> None:
    p = probe()
    p._turn = object()
    p.transport.eof = True
    assert not p._may_serve(0)
    assert p.transport.calls == ["close: peer closed before its turn to register"]


def test_the_pass_share_is_taken_only_when_a_request_is_ready() -> None:
    p = probe(share=5)
    assert p._may_serve(0, ready=False)
    assert p.door.hub.share == 5
    assert p._may_serve(1)
    assert p.door.hub.share == 4


def test_past_the_share_the_session_goes_on_in_the_next_pass() -> None:
    p = probe(share=2, waiting=10)
    p.resume_serving()
    assert p.served == 2 and p._next_pass and p.transport.paused
    assert len(p.door.reactor.soon) == 1
    assert not p._may_serve(1)  # waiting for the next pass already: no share is taken
    p.door.hub.share = 0  # the next pass is as full, but the quantum goes first
    p.transport.calls.clear()
    p.door.reactor.soon.pop()()
    assert p.served == 2 + DoorSession.PASS_QUANTUM
    # Read again, served the quantum, then past the share once more: the pass after next.
    assert p.transport.calls == ["resume_reading", "pause_reading"]
    assert p._next_pass and len(p.door.reactor.soon) == 1


def test_going_on_keeps_reading_off_while_the_flood_policy_says_so() -> None:
    p = probe(share=0, waiting=1)
    p.resume_serving()
    p.reading_held = True
    p.door.hub.share = 10
    p.door.reactor.soon.pop()()
    assert p.transport.paused and p.served == 1


def test_a_session_over_its_own_bytes_goes_on_next_pass_whatever_the_share() -> None:
    p = probe(share=100)
    p._count_request(999)
    assert p._may_serve(1)
    p._count_request(1)
    assert not p._may_serve(1)
    assert p._next_pass and p.door.hub.share == 99  # (no share taken for the second)
    p.door.reactor.passes += 1  # a new pass counts anew
    p._next_pass = False
    assert p._may_serve(1)


def test_job_done_goes_on_serving_once() -> None:
    p = probe(waiting=3)
    p.wait_for_job()
    p.resume_serving()
    assert p.served == 0
    p.job_done()
    assert p.served == 3
    p.waiting = 1
    p.job_done()  # no job: nothing happens
    assert p.served == 3


@pytest.mark.parametrize("given, ok", [("secret", True), ("secreT", False), ("", False),
                                       (None, False), ("sécret", False)])
def test_the_server_password(given: Any, ok: bool) -> None:
    assert password_matches(b"secret", given) is ok
