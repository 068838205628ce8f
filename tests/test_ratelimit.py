from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.core.ratelimit import ALLOW, DISCONNECT, REFUSE, Arrivals, TokenBucket, answer_cost


def test_burst_then_refusals_then_disconnect() -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [ALLOW] * 3
    assert [bucket.take(0.0) for _ in range(3)] == [REFUSE] * 3
    assert bucket.take(0.0) == DISCONNECT


def test_tokens_come_back_at_the_rate_and_reset_the_refusals() -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=2)
    bucket.take(0.0), bucket.take(0.0)
    assert bucket.take(0.0) == REFUSE
    assert bucket.take(0.1) == ALLOW  # one token after a tenth of a second
    assert bucket.refused == 0
    assert bucket.take(0.1) == REFUSE
    assert bucket.take(100.0) == ALLOW
    assert bucket.tokens <= 2  # never more than the burst


@given(st.lists(st.floats(0, 0.5), max_size=200))
def test_allowed_requests_never_exceed_burst_plus_rate_times_time(gaps: list) -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=5)
    now, allowed = 0.0, 0
    for gap in gaps:
        now += gap
        allowed += bucket.take(now) == ALLOW
    assert allowed <= 5 + 10 * now + 1e-6


# --- charging at arrival (a stall must not turn a good client into a flooder) -----------------


def serve_reads(bucket: TokenBucket, sends: List[float], reads: List[float],
                size: int = 30) -> List[int]:
    """Play a client's sends (times) against server reads (times), as a session would.

    Every request is `size` bytes; a read gets every byte sent since the previous read; the
    previous `select` returned at the previous read (one pass per read, as in a stall).
    """
    arrivals = Arrivals()
    verdicts: List[int] = []
    consumed = 0
    prev_pass = 0.0
    i = 0
    for now in reads:
        batch = 0
        while i < len(sends) and sends[i] <= now:
            batch += 1
            i += 1
        if batch:
            arrivals.read(batch * size, prev_pass, now)
            for _ in range(batch):
                consumed += size
                verdicts.append(bucket.charge(*arrivals.at(consumed)))
        prev_pass = now
    return verdicts


def test_a_stall_spreads_the_backlog_over_the_stall() -> None:
    # 9 requests a second, and the server reads nothing for 5 s: 45 requests in one read.
    sends = [0.5 + k / 9 for k in range(45)]
    stalled = TokenBucket(now=0.0, rate=10, burst=20)
    assert set(serve_reads(stalled, sends, [0.5, 5.5])) == {ALLOW}
    # What the old charging (at the moment of serving) did with the same backlog:
    old = TokenBucket(now=0.0, rate=10, burst=20)
    verdicts = [old.take(0.5)] + [old.take(5.5) for _ in sends[1:]]
    assert REFUSE in verdicts and DISCONNECT in verdicts


def test_a_real_burst_is_still_a_burst() -> None:
    # 100 requests sent within 10 ms, read 10 ms after the previous pass.
    bucket = TokenBucket(now=0.0, rate=10, burst=20)
    sends = [5.0 + k / 10000 for k in range(100)]
    verdicts = serve_reads(bucket, sends, [4.995, 5.01])
    assert verdicts[:20] == [ALLOW] * 20
    assert DISCONNECT in verdicts
    assert verdicts.count(ALLOW) <= 21


@settings(max_examples=300, deadline=None)
@given(st.floats(1 / 9.5, 2.0), st.lists(st.floats(0.0, 0.5), min_size=1, max_size=80),
       st.lists(st.floats(0.001, 5.0), min_size=1, max_size=40))
def test_a_client_within_its_rate_is_never_refused_however_the_server_stalls(
        spacing: float, extra: List[float], read_gaps: List[float]) -> None:
    sends, t = [], 0.0
    for gap in extra:
        t += spacing + gap
        sends.append(t)
    reads, t = [], 0.0
    for gap in read_gaps:
        t += gap
        reads.append(t)
    reads.append(sends[-1] + 5.0)  # a last read gets whatever is left
    bucket = TokenBucket(now=0.0, rate=10, burst=20)
    assert set(serve_reads(bucket, sends, reads)) <= {ALLOW}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.integers(0, 60)), min_size=1, max_size=40))
def test_spreading_never_admits_more_than_burst_plus_rate_times_time(
        reads: List[Tuple[float, int]]) -> None:
    """Whatever a client sends and however reads fall, admissions stay within the bucket's bound."""
    bucket = TokenBucket(now=0.0, rate=10, burst=5)
    arrivals = Arrivals()
    now, consumed, allowed = 0.0, 0, 0
    for gap, requests in reads:
        start, now = now, now + gap
        arrivals.read(requests * 7, start, now)
        for _ in range(requests):
            consumed += 7
            allowed += bucket.charge(*arrivals.at(consumed)) == ALLOW
    assert allowed <= 5 + 10 * now + 1e-6


def test_charge_times_never_go_backwards_or_past_the_end() -> None:
    bucket = TokenBucket(now=10.0, rate=8, burst=5)
    assert [bucket.charge(10.0, 10.0) for _ in range(5)] == [ALLOW] * 5
    # An interval wholly in the past is charged at the last time charged: no tokens gained.
    assert bucket.charge(0.0, 5.0, 0.5) == REFUSE
    # A fraction above 1 is the end, not the future.
    assert bucket.charge(10.0, 10.0625, 3.0) == REFUSE
    assert bucket.stamp == 10.0625
    assert bucket.charge(10.0, 10.125, 1.0) == ALLOW


def test_take_is_charge_at_one_instant() -> None:
    a, b = TokenBucket(0.0, 10, 3), TokenBucket(0.0, 10, 3)
    times = [0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 2.0]
    assert [a.take(t) for t in times] == [b.charge(t, t, 0.3) for t in times]


# --- Arrivals: byte offsets to arrival times ---------------------------------------------------

def test_arrivals_interpolate_within_the_read_that_completed_a_request() -> None:
    arrivals = Arrivals()
    arrivals.read(100, 0.0, 4.0)
    assert arrivals.at(25) == (0.0, 4.0, 0.25)
    assert arrivals.at(100) == (0.0, 4.0, 1.0)
    # The next read starts no earlier than the previous read, whatever the loop says.
    arrivals.read(50, 1.0, 6.0)
    assert arrivals.at(110) == (4.0, 6.0, 0.2)  # a request spanning both reads ends in the second
    assert arrivals.at(150) == (4.0, 6.0, 1.0)
    assert arrivals.at(400) == (6.0, 6.0, 1.0)  # beyond what was read: the last read's moment


def test_arrivals_keep_the_time_of_requests_served_late() -> None:
    """A backlog held back by backpressure is charged at its arrival, not when it is served."""
    arrivals = Arrivals()
    arrivals.read(10, 0.0, 1.0)
    arrivals.read(10, 1.0, 2.0)
    arrivals.read(10, 2.0, 3.0)
    assert arrivals.at(5) == (0.0, 1.0, 0.5)
    assert arrivals.at(15) == (1.0, 2.0, 0.5)
    assert len(arrivals._reads) == 2  # what is consumed is let go
    assert arrivals.at(30) == (2.0, 3.0, 1.0)


def test_arrivals_ignore_empty_reads_and_a_start_after_the_end() -> None:
    arrivals = Arrivals()
    arrivals.read(0, 0.0, 1.0)
    assert arrivals.received == 0
    arrivals.read(4, 5.0, 3.0)
    assert arrivals.at(4) == (3.0, 3.0, 1.0)


# --- cost: expensive answers leave a debt that the next requests wait out -----------------------

def test_answer_cost_units() -> None:
    assert answer_cost() == 0
    assert answer_cost(output_bytes=16384) == 1.0
    assert answer_cost(rows=200) == 4.0
    assert answer_cost(output_bytes=-5, rows=-1) == 0


def test_a_billed_answer_makes_the_next_requests_wait() -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=20)
    assert bucket.take(0.0) == ALLOW
    bucket.bill(24.0)  # e.g. a 384 KiB `rooms` list
    assert bucket.tokens == -5.0
    assert bucket.take(0.0) == REFUSE
    assert bucket.ready_in(0.0) == pytest.approx(0.6)  # from -5 to 1 token: 6 tokens at 10 a second
    assert bucket.take(0.55) == REFUSE
    assert bucket.take(0.61) == ALLOW
    assert bucket.ready_in(0.61) > 0


def test_debt_never_disconnects_a_client_within_its_rate() -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=20)
    bucket.bill(1000.0)
    assert bucket.tokens == -20.0  # capped at max_debt (one burst)
    verdicts = [bucket.take(k / 9.5) for k in range(100)]  # 9.5 a second for ~10 s
    assert DISCONNECT not in verdicts
    assert verdicts[-1] == ALLOW
    assert verdicts.index(ALLOW) > 0


def test_flooding_while_in_debt_still_disconnects() -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=3)
    bucket.bill(10.0)
    verdicts = [bucket.take(0.0) for _ in range(10)]
    assert verdicts[:3] == [REFUSE] * 3  # in debt: refused, the request count is still fine
    assert verdicts[-1] == DISCONNECT


def test_cost_up_front_and_max_debt() -> None:
    bucket = TokenBucket(now=0.0, rate=1, burst=4, max_debt=2)
    assert bucket.charge(0.0, 0.0, cost=10.0) == ALLOW  # admitted with one token, debt capped
    assert bucket.tokens == -2.0
    assert bucket.ready_in(0.0) == pytest.approx(3.0)
    assert bucket.take(2.9) == REFUSE
    assert bucket.take(3.0) == ALLOW
    bucket.bill(0)
    bucket.bill(-3)
    assert bucket.tokens == 0.0


def test_ready_in_is_zero_when_a_token_is_there() -> None:
    bucket = TokenBucket(now=0.0, rate=10, burst=2)
    assert bucket.ready_in(0.0) == 0.0
    bucket.take(0.0), bucket.take(0.0)
    assert bucket.ready_in(0.0) == pytest.approx(0.1)
    assert bucket.ready_in(0.2) == 0.0
