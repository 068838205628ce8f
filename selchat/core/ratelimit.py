"""Flood control: a token bucket per connection, fed the time by its caller (no clock here).

Two questions a flood control must answer, and the answers this module gives:

*When did a request arrive?* Not when we got round to serving it. A server that stalls (a
slow pass, a paused process, a busy machine) finds, when it reads again, everything a client
sent during the stall in one read. Charged at the moment of serving, that backlog looks like a
burst, and a client well within its rate is refused and then disconnected for `excess flood`
because *we* were slow. So a request is charged at the moment its bytes may have arrived:
`TokenBucket.charge(start, end, fraction)`, where `[start, end]` is the interval in which the
bytes of one read can have arrived and `fraction` is where in that read the request ends (see
`charge` and `Arrivals`). A stall spreads the backlog over the stall; a real burst, whose
bytes came in a short interval, is still a burst.

*How much did it cost?* A `ping` and a `history` of 200 rows are not the same work. A request
takes one token to be admitted; what its answer cost beyond that (measured after it was
produced: bytes queued, rows read, see `answer_cost`) is billed with `TokenBucket.bill`, which
may leave the bucket in debt (tokens below zero). The next requests then wait until the debt
is paid back at `rate` tokens a second.

Refusing is one thing, disconnecting another. A client is disconnected only for *flooding*:
more than `burst` requests in a row refused by the count of its requests alone (one per
request, as if every request were cheap). Waiting out a debt the server billed for expensive
answers gets `rate_limited` refusals (or, better, a session that waits `ready_in` seconds
before serving), never `excess flood`, as long as the client's request count stays within
`rate` and `burst`.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Tuple

from selchat.defaults import BURST, RATE

# What `TokenBucket.take` and `TokenBucket.charge` answer.
ALLOW, REFUSE, DISCONNECT = range(3)

# The unit of cost (see `answer_cost`): one token is one request, or one request's worth of work.
OUTPUT_BYTES_PER_TOKEN = 16384  # a request's answer beyond the first token: 1 per 16 KiB queued
ROWS_PER_TOKEN = 50  # and 1 per 50 rows read from the store (history pages are up to 200 rows)


# A token, less what float arithmetic may lose over a refill: a debt repaid "exactly" at its
# due time must admit the request then, not ask for another wait of a picosecond.
_ONE = 1.0 - 1e-9


# Serving time beyond what a cheap request takes is billed too: one token per 2 ms of it, so a
# request that makes the loop work (a rooms list to sort, a mask to match against every user)
# costs what it costs everyone else.
CHEAP_SECONDS = 0.001
SECONDS_PER_TOKEN = 0.002


def cpu_cost(seconds: float) -> float:
    """The tokens `seconds` of CPU spent on one answer cost beyond its request's token."""
    return max(0.0, seconds - CHEAP_SECONDS) / SECONDS_PER_TOKEN


def answer_cost(output_bytes: int = 0, rows: int = 0) -> float:
    """The tokens an answer cost *beyond* the one its request took: for `TokenBucket.bill`.

    The unit is "one cheap request": a `say`, a `ping` or a small `who` answer costs nothing
    more; every 16 KiB of output queued for the requester (a long `rooms` list, a full
    `history` frame) and every 50 rows read from history cost one more token each. Fractions
    count, so many medium answers add up. Broadcasts are not billed to the sender: a `say` to
    a large room is the room's cost, bounded by the message rate.
    """
    return max(0, output_bytes) / OUTPUT_BYTES_PER_TOKEN + max(0, rows) / ROWS_PER_TOKEN


class TokenBucket:
    """`rate` requests a second on average, `burst` at once; refusals in a row past `burst` end it.

    Refusing without ever disconnecting would let a client flood us with refusals, which cost
    us almost as much as serving; disconnecting at the first refusal would punish a client that
    merely pasted a few lines too fast. The protocol's middle way: a further `burst` refused
    requests in a row, then the connection goes.

    Two levels are kept. `tokens` is what admits a request: one per request plus whatever
    `bill` charged for expensive answers, so it may be negative (a debt, at most `max_debt`).
    `count` is the same bucket counting requests only; its refusals in a row (`refused`) are
    what disconnects. Without billing the two are equal and this is the classic token bucket.
    """

    __slots__ = ("rate", "burst", "max_debt", "tokens", "count", "stamp", "refused")

    def __init__(self, now: float, rate: float = RATE, burst: int = BURST,
                 max_debt: float = -1.0) -> None:
        self.rate = rate
        self.burst = burst
        # An answer can put a client at most this far below zero: bounded waiting, even when a
        # measurement is huge. By default one burst, i.e. at most burst/rate seconds to repay.
        self.max_debt = float(burst) if max_debt < 0 else max_debt
        self.tokens = float(burst)
        self.count = float(burst)
        self.stamp = now  # the arrival time up to which both levels have been refilled
        self.refused = 0  # requests in a row refused by the count of requests

    def _refill(self, when: float) -> None:
        elapsed = when - self.stamp
        if elapsed > 0:
            burst = float(self.burst)
            gained = elapsed * self.rate
            self.tokens = min(burst, self.tokens + gained)
            self.count = min(burst, self.count + gained)
            self.stamp = when

    def take(self, now: float) -> int:
        """Charge one request that arrived at `now`: ALLOW, REFUSE or DISCONNECT."""
        return self.charge(now, now)

    def charge(self, start: float, end: float, fraction: float = 1.0, cost: float = 1.0) -> int:
        """Charge one request whose bytes arrived between `start` and `end`, at `fraction` of them.

        The caller (a session) knows, for each read, the interval in which its bytes may have
        arrived: after the later of (its own previous read, the moment the previous pass asked
        the kernel for readable sockets: bytes there before that would have been read then)
        and before `end`, the moment this read was made. A request whose last byte is at offset
        `k` of the `n` bytes read is charged at `start + (end - start) * k / n`: the bytes are
        assumed to have come in evenly over the interval. After a stall of s seconds the
        backlog is spread over those s seconds, and a client that sent within its rate finds
        tokens enough; a burst read soon after the previous read is spread over almost
        nothing, and is refused as before. (`Arrivals` does the bookkeeping.)

        What a client gains is bounded: charge times never go backwards (a time before the
        last one charged counts as the last one) and never pass `end`, so over any stretch of
        time no more than `burst + rate * stretch` requests are admitted. For a client read
        all along, the stretch a read is spread over begins at the previous pass, however long
        the client was quiet; an idle server sleeps at most `reactor.MAX_SLEEP` at a time, so
        a burst that wakes it gains at most two such sleeps' worth of requests.

        `cost` is the tokens the request takes when admitted (1 for a request; more if its
        cost is known up front). It is admitted when at least one token is there, and may
        leave a debt of up to `max_debt`.
        """
        when = end if fraction >= 1.0 else start + (end - start) * max(0.0, fraction)
        if when > end:
            when = end
        self._refill(when)
        if self.count >= _ONE:
            self.count -= 1.0
            self.refused = 0
        else:
            self.refused += 1
            return DISCONNECT if self.refused > self.burst else REFUSE
        if self.tokens >= _ONE:
            self.tokens = max(-self.max_debt, self.tokens - cost)
            return ALLOW
        return REFUSE  # in debt for expensive answers, but not flooding: refused, never dropped

    def bill(self, cost: float) -> None:
        """Charge `cost` more tokens for an answer already given (see `answer_cost`).

        Measured after the answer was produced, so it cannot refuse that answer; it leaves a
        debt that the following requests wait out. The debt is capped at `max_debt`.
        """
        if cost > 0:
            self.tokens = max(-self.max_debt, self.tokens - cost)

    def debt_wait(self, now: float) -> float:
        """Seconds to wait before serving more, when expensive answers (not the request count)
        left a debt; 0 when the next request may be charged as usual.

        A session waits this long instead of refusing: the contract's rate counts requests, so
        a client within it is never refused for what its answers cost, only served later.
        """
        if self.rate <= 0 or self.tokens >= self.count:
            return 0.0  # no bill outstanding: the request count decides, as usual
        # Projected to `now` without refilling: charges are made at arrival times, which may
        # be earlier than now, and refilling here would lose what they are owed.
        gained = max(0.0, now - self.stamp) * self.rate
        burst = float(self.burst)
        tokens = min(burst, self.tokens + gained)
        if tokens >= _ONE or min(burst, self.count + gained) < _ONE:
            return 0.0
        return (1.0 - tokens) / self.rate

    def ready_in(self, now: float) -> float:
        """Seconds from `now` until a request would be admitted (0 when it would be now).

        For a session that prefers to wait (stop reading or serving) rather than refuse.
        """
        elapsed = max(0.0, now - self.stamp)
        lacking = 1.0 - min(self.tokens, self.count) - elapsed * self.rate
        if lacking <= 0 or self.rate <= 0:
            return 0.0
        return lacking / self.rate


class Arrivals:
    """Where each byte of a connection's input arrived in time, for `TokenBucket.charge`.

    A session feeds it every read (`read(n, start, end)`) and asks, for each request it
    serves, when its last byte came (`at(offset)`, `offset` counting every byte consumed so
    far on the connection, the request's own included). Requests served long after their read
    (the session stopped serving because the client's output was backed up) are still charged
    at their arrival, not at the moment they were served. It holds one entry per read not yet
    fully consumed, so it is bounded by the session's input buffer.
    """

    __slots__ = ("_reads", "received", "_last_end")

    def __init__(self) -> None:
        # (offset of the read's first byte, its length, start, end)
        self._reads: Deque[Tuple[int, int, float, float]] = deque()
        self.received = 0  # bytes fed so far
        self._last_end = float("-inf")  # when the previous read was made

    def read(self, n: int, start: float, end: float) -> None:
        """`n` bytes were read at `end`; none of them was there before `start`.

        `start` is what the transport knows (`Transport.arrived_after`); the previous read
        of this connection is taken into account here.
        """
        if n <= 0:
            return
        start = max(start, self._last_end)
        if start > end:
            start = end
        self._reads.append((self.received, n, start, end))
        self.received += n
        self._last_end = end

    def at(self, offset: int) -> Tuple[float, float, float]:
        """`(start, end, fraction)` for the byte ending at `offset` (1-based): `charge`'s arguments.

        Reads wholly before `offset` are forgotten, so offsets must not go backwards.
        """
        reads = self._reads
        while reads and reads[0][0] + reads[0][1] < offset:
            reads.popleft()
        if not reads:
            return (self._last_end, self._last_end, 1.0)
        first, n, start, end = reads[0]
        return (start, end, min(1.0, max(0.0, (offset - first) / n)))
