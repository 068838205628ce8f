"""Flood control: a token bucket per connection, fed the time by its caller (no clock here)."""

from __future__ import annotations

from selchat.defaults import RATE, BURST

# What `TokenBucket.take` answers.
ALLOW, REFUSE, DISCONNECT = range(3)


class TokenBucket:
    """`rate` requests a second on average, `burst` at once; refusals in a row past `burst` end it.

    Refusing without ever disconnecting would let a client flood us with refusals, which cost
    us almost as much as serving; disconnecting at the first refusal would punish a client that
    merely pasted a few lines too fast. The protocol's middle way: a further `burst` refused
    requests in a row, then the connection goes.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused")

    def __init__(self, now: float, rate: float = RATE, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now
        self.refused = 0  # refused requests in a row

    def take(self, now: float) -> int:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.refused = 0
            return ALLOW
        self.refused += 1
        return DISCONNECT if self.refused > self.burst else REFUSE
