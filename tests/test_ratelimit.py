from hypothesis import given
from hypothesis import strategies as st

from selchat.core.ratelimit import ALLOW, DISCONNECT, REFUSE, TokenBucket


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
