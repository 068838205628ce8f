"""selchat.kdf: the server's hashing interface, in-process and through real worker children.

Both implementations are held to the same promises: answers only through `done`, from the
loop, never from inside the call; bad input of every kind is a False (or a None for a hash),
never an exception; a full queue is refused; a dead worker is a None, and the next job works.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Iterator, List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selchat import kdf as kdf_module
from selchat.core import passwords as pw
from selchat.kdf import InlineKdf, ProcessKdf, make_kdf
from selchat.loop.reactor import Reactor

DEADLINE = 20.0


def run_until(reactor: Reactor, cond: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        reactor.run_once(timeout=0.05)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


@pytest.fixture(params=["inline", "process"])
def kdf(request: pytest.FixtureRequest, reactor: Reactor) -> Iterator[Any]:
    k = InlineKdf(reactor) if request.param == "inline" else ProcessKdf(reactor, workers=1)
    yield k
    k.close()


def call(reactor: Reactor, start: Callable[[Callable[[Any], None]], bool]) -> Any:
    """Start one job, check it is answered later and once, and return its answer."""
    got: List[Any] = []
    assert start(got.append)
    assert got == []  # never from inside the call
    run_until(reactor, lambda: bool(got))
    reactor.run_once(timeout=0)
    assert len(got) == 1
    return got[0]


def test_hash_then_verify(reactor: Reactor, kdf: Any) -> None:
    verifier = call(reactor, lambda done: kdf.hash("correct horse", done))
    assert isinstance(verifier, str) and pw.verifier_ok(verifier)
    assert pw.scram_credentials(verifier) is not None
    assert call(reactor, lambda done: kdf.verify("correct horse", verifier, done)) is True
    assert call(reactor, lambda done: kdf.verify("correct horsE", verifier, done)) is False


@pytest.mark.parametrize("password", ["", "short", "x" * 257, "abcdefgh\ud800", None, 12345678])
def test_hash_of_a_password_the_rule_refuses_is_none(reactor: Reactor, kdf: Any, password: Any) -> None:
    assert call(reactor, lambda done: kdf.hash(password, done)) is None


@pytest.mark.parametrize("verifier", [None, "", "garbage", "$scrypt$n=16,r=1,p=1$AAAA$AAAA", 42,
                                      pw.UNKNOWN_VERIFIER])
def test_a_verifier_that_does_not_parse_is_a_failed_verification(reactor: Reactor, kdf: Any, verifier: Any) -> None:
    assert call(reactor, lambda done: kdf.verify("correct horse", verifier, done)) is False


@pytest.mark.parametrize("password", ["x" * 257, "abcdefgh\ud800", None, b"correct horse", ""])
def test_a_password_no_account_can_have_is_a_failed_verification(reactor: Reactor, kdf: Any, password: Any) -> None:
    verifier = pw.make_verifier("correct horse", n=16, r=1, p=1, iterations=4096)
    assert call(reactor, lambda done: kdf.verify(password, verifier, done)) is False


def test_records_made_by_one_implementation_are_read_by_the_other(reactor: Reactor) -> None:
    inline, process = InlineKdf(reactor), ProcessKdf(reactor)
    try:
        a = call(reactor, lambda done: inline.hash("pässwörd-1", done))
        b = call(reactor, lambda done: process.hash("pässwörd-2", done))
        assert call(reactor, lambda done: process.verify("pässwörd-1", a, done)) is True
        assert call(reactor, lambda done: inline.verify("pässwörd-2", b, done)) is True
    finally:
        process.close()


def test_a_record_at_another_cost_is_verified_at_its_own(reactor: Reactor, kdf: Any) -> None:
    old = pw.make_verifier("an older password", n=1024, r=8, p=1, iterations=4096)
    assert call(reactor, lambda done: kdf.verify("an older password", old, done)) is True


def test_a_full_queue_returns_false(reactor: Reactor) -> None:
    k = ProcessKdf(reactor, workers=1, max_pending=2)
    try:
        got: List[Optional[bool]] = []
        verifier = pw.UNKNOWN_VERIFIER
        assert k.verify("correct horse", verifier, got.append)
        assert k.verify("correct horse", verifier, got.append)
        refused: List[Optional[bool]] = []
        assert not k.verify("correct horse", verifier, refused.append)
        assert not k.hash("correct horse", refused.append)
        run_until(reactor, lambda: len(got) == 2)
        assert got == [False, False] and refused == []
        assert k.pending == 0
    finally:
        k.close()


def test_a_worker_killed_mid_job_answers_none_and_the_next_job_works(reactor: Reactor) -> None:
    k = ProcessKdf(reactor, workers=1)
    try:
        verifier = call(reactor, lambda done: k.hash("correct horse", done))
        [pid] = k.pids()
        got: List[Optional[bool]] = []
        for _ in range(5):
            assert k.verify("correct horse", verifier, got.append)
        reactor.run_once(timeout=0)
        os.kill(pid, signal.SIGKILL)
        run_until(reactor, lambda: len(got) == 5)
        assert None in got  # what the dead worker held failed; nothing was lost unanswered
        assert call(reactor, lambda done: k.verify("correct horse", verifier, done)) is True
        assert k.pids() and k.pids() != [pid]
    finally:
        k.close()


def test_close_leaves_no_worker(reactor: Reactor) -> None:
    k = ProcessKdf(reactor, workers=2)
    call(reactor, lambda done: k.verify("correct horse", None, done))
    pids = k.pids()
    assert len(pids) == 2
    got: List[Optional[bool]] = []
    k.verify("correct horse", None, got.append)
    k.close()
    assert got == [None]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_make_kdf_chooses_by_worker_count(reactor: Reactor) -> None:
    assert isinstance(make_kdf(reactor, 0), InlineKdf)
    k = make_kdf(reactor, 1)
    try:
        assert isinstance(k, ProcessKdf)
    finally:
        k.close()


@pytest.mark.parametrize("request_", [b"", b"[]", b"{}", b'["hash"]', b'["hash", "short"]', b'["nope", "x"]',
                                      b'["verify", "a", 1]', b"\xff", b'"text"'])
def test_the_child_refuses_requests_it_does_not_know(request_: bytes) -> None:
    with pytest.raises(ValueError):  # the worker answers such a job None
        kdf_module.handle(request_)


def test_the_child_answers_its_two_requests() -> None:
    verifier = kdf_module.handle(kdf_module._request("hash", "correct horse")).decode()
    assert pw.check_password("correct horse", verifier)
    assert kdf_module.handle(kdf_module._request("verify", "correct horse", verifier)) == b"1"
    assert kdf_module.handle(kdf_module._request("verify", "wrong horse", verifier)) == b"0"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(password=st.one_of(st.text(max_size=300), st.none(), st.integers()),
       verifier=st.one_of(st.text(max_size=300), st.none(), st.binary(max_size=50),
                          st.sampled_from(["$scrypt$n=16,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=="])))
def test_inline_verify_of_anything_answers_a_bool(reactor: Reactor, password: Any, verifier: Any) -> None:
    got: List[Optional[bool]] = []
    assert InlineKdf(reactor).verify(password, verifier, got.append)
    reactor.run_once(timeout=0)
    assert got in ([True], [False])
