"""Pacing per address: `burst` at once, then `rate` a second; the others wait their turn.

A registration is the expensive moment of a connection: the user joins the lobby, every member
is told, it gets names and history, and when it goes everyone is told again. A client that
connects, says hello and resets a thousand times a second made every lobby member read two
thousand events a second and kept the loop busy (the review's finding 1 measured memory; the
soak measured everyone's latency). Refusing such connections would also refuse the honest
users behind the same address (a NAT, a restart that brings everyone back at once), so they
are *paced* instead: past its burst an address registers at `rate` a second, in arrival order.
A waiting connection costs its socket and buffers only (counted by the admission limits, and
ended by the handshake timeout like any connection that does not get in), and one that closes
while it waits leaves the queue at once, so a churner's dead connections never use a turn.

The arithmetic is GCRA (the "virtual scheduling" form of a token bucket): one float per
address, the time `tat` at which the address would be back to a full burst. An address's entry
is kept while anyone of it waits or while `tat` is in the future, so the table holds the
addresses that registered lately; past `max_addresses` the settled entries are swept, and if
none is settled a newcomer address is let through unpaced rather than refused.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer

log = logging.getLogger("selchat.server")

MAX_ADDRESSES = 16384  # about 5 MiB of table at most (~300 bytes an address)
SWEEP_FROM = 1024  # the table is swept of settled addresses when it reaches this, then 2x that


class Ticket:
    """A place in an address's queue; `cancel()` when the connection goes first."""

    __slots__ = ("gate", "go")

    def __init__(self, gate: "_Gate", go: Callable[[], None]) -> None:
        self.gate: Optional[_Gate] = gate
        self.go: Optional[Callable[[], None]] = go

    def cancel(self) -> None:
        gate, self.gate, self.go = self.gate, None, None
        if gate is not None:
            gate.waiting.pop(self, None)
            if not gate.waiting and gate.timer is not None:
                gate.timer.cancel()
                gate.timer = None


class _Gate:
    __slots__ = ("key", "tat", "waiting", "timer")

    def __init__(self, key: str, now: float) -> None:
        self.key = key
        self.tat = now
        self.waiting: Dict[Ticket, None] = {}  # in arrival order
        self.timer: Optional[Timer] = None


class Pacer:
    """Lets `go` callbacks through per key at `rate` a second after a `burst`."""

    __slots__ = ("reactor", "rate", "burst", "max_waiting", "max_addresses", "interval",
                 "tolerance", "_gates", "_sweep_at")

    def __init__(self, reactor: Reactor, rate: float, burst: int, max_waiting: int,
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.reactor = reactor
        self.rate = rate
        self.burst = max(1, burst)
        self.max_waiting = max_waiting
        self.max_addresses = max_addresses
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.tolerance = (self.burst - 1) * self.interval
        self._gates: Dict[str, _Gate] = {}
        self._sweep_at = min(SWEEP_FROM, max_addresses)  # sweep when the table grows to this

    def __len__(self) -> int:
        return len(self._gates)

    def waiting(self, key: str) -> int:
        gate = self._gates.get(key)
        return len(gate.waiting) if gate is not None else 0

    def request(self, key: str, go: Callable[[], None]) -> Optional[Ticket]:
        """Call `go` now and return None, or queue it and return its ticket.

        Raises `Full` when `max_waiting` of this key wait already: the caller refuses.
        """
        if self.rate <= 0:
            go()
            return None
        now = self.reactor.now
        gate = self._gates.get(key)
        if gate is None:
            if len(self._gates) >= self._sweep_at:
                # Amortised: the next sweep waits until the table has doubled again.
                self._sweep(now)
                self._sweep_at = min(max(SWEEP_FROM, 2 * len(self._gates)), self.max_addresses)
            if len(self._gates) >= self.max_addresses:
                go()  # a table full of busy addresses: let this one through unpaced
                return None
            gate = self._gates[key] = _Gate(key, now)
        if not gate.waiting and now >= gate.tat - self.tolerance:
            gate.tat = max(now, gate.tat) + self.interval
            go()
            return None
        if len(gate.waiting) >= self.max_waiting:
            raise Full(key)
        ticket = Ticket(gate, go)
        gate.waiting[ticket] = None
        self._arm(gate)
        return ticket

    def wait_for(self, key: str) -> float:
        """Seconds until the next of `key` may go (0 when one may go now)."""
        gate = self._gates.get(key)
        if gate is None or self.rate <= 0:
            return 0.0
        return max(0.0, gate.tat - self.tolerance - self.reactor.now)

    # --- inside -----------------------------------------------------------------------------

    def _arm(self, gate: _Gate) -> None:
        if gate.timer is None:
            when = max(gate.tat - self.tolerance, self.reactor.now + 0.0005)
            gate.timer = self.reactor.call_at(when, lambda _=None, g=gate: self._turn(g))

    def _turn(self, gate: _Gate) -> None:
        gate.timer = None
        now = self.reactor.now
        while gate.waiting and now >= gate.tat - self.tolerance:
            ticket = next(iter(gate.waiting))
            del gate.waiting[ticket]
            go = ticket.go
            ticket.gate = ticket.go = None
            gate.tat = max(now, gate.tat) + self.interval
            if go is not None:
                try:
                    go()
                except Exception:  # a bug of one session must not stop the others' turns
                    log.exception("registration of a paced connection failed")
        if gate.waiting:
            self._arm(gate)

    def _sweep(self, now: float) -> None:
        """Forget the addresses with nobody waiting and a full burst again."""
        settled = [key for key, gate in self._gates.items()
                   if not gate.waiting and gate.tat <= now]
        for key in settled:
            del self._gates[key]


class Full(Exception):
    """Too many connections of one address wait for their turn already."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


__all__ = ["Pacer", "Ticket", "Full", "MAX_ADDRESSES"]
