"""Registration and CAP negotiation of one IRC connection, as a state machine with no I/O.

Like h11's `_state.py`: the states are an Enum, every allowed move is one row of a table, and
anything else is our own bug (`StateError`), never the peer's: what a peer may send in each
state is decided by the command table and the handlers, which only *report* what happened
here. The session does the talking (numerics, the pacer's turn, the hub's `register`); this
module only says where the connection stands and when it may register.

    GREETING --CAP_STARTED--> NEGOTIATING --AUTH_STARTED--> AUTHENTICATING
        |                        |    ^                        |
        |                   CAP_ENDED  `------AUTH_ENDED-------'
        |                        v
        `--(NICK and USER known)--> READY --TURN_ASKED--> WAITING
                                      |                      |
                                      `----REGISTERED--------+--> REGISTERED

A NICK that the hub refuses at the last moment (taken meanwhile) sends READY or WAITING back
to GREETING with the nick forgotten (NICK_REFUSED).
"""

from __future__ import annotations

import enum
from typing import Dict, Optional, Tuple


class Phase(enum.Enum):
    GREETING = enum.auto()  # connected; NICK and USER not both known, no CAP negotiation open
    NEGOTIATING = enum.auto()  # CAP LS/REQ before registration: registration waits for CAP END
    AUTHENTICATING = enum.auto()  # an AUTHENTICATE exchange (SASL) is open inside negotiation
    READY = enum.auto()  # NICK and USER known, nothing open: the session registers now
    WAITING = enum.auto()  # waiting for this address's turn to register (the hub's pacer)
    REGISTERED = enum.auto()  # the hub knows the user: the registered commands apply


class Step(enum.Enum):
    CAP_STARTED = enum.auto()  # CAP LS or CAP REQ before registration
    CAP_ENDED = enum.auto()  # CAP END before registration
    AUTH_STARTED = enum.auto()  # AUTHENTICATE <mechanism> accepted
    AUTH_ENDED = enum.auto()  # the exchange finished, failed or was aborted
    IDENTIFIED = enum.auto()  # NICK and USER are both known now (settled by `_settle`)
    TURN_ASKED = enum.auto()  # the pacer keeps us waiting for the address's turn
    REGISTERED = enum.auto()  # the hub registered the user
    NICK_REFUSED = enum.auto()  # the hub refused the nick (taken meanwhile): ask for another


class StateError(Exception):
    """A move the table does not allow: a bug of the door, not something a peer did."""


_MOVES: Dict[Tuple[Phase, Step], Phase] = {
    (Phase.GREETING, Step.CAP_STARTED): Phase.NEGOTIATING,
    (Phase.GREETING, Step.IDENTIFIED): Phase.READY,
    (Phase.NEGOTIATING, Step.CAP_STARTED): Phase.NEGOTIATING,
    (Phase.NEGOTIATING, Step.CAP_ENDED): Phase.GREETING,  # then READY if identified
    (Phase.NEGOTIATING, Step.AUTH_STARTED): Phase.AUTHENTICATING,
    (Phase.AUTHENTICATING, Step.AUTH_ENDED): Phase.NEGOTIATING,
    (Phase.AUTHENTICATING, Step.CAP_STARTED): Phase.AUTHENTICATING,
    (Phase.AUTHENTICATING, Step.CAP_ENDED): Phase.GREETING,  # CAP END aborts the exchange
    (Phase.READY, Step.CAP_STARTED): Phase.NEGOTIATING,
    (Phase.READY, Step.TURN_ASKED): Phase.WAITING,
    (Phase.READY, Step.REGISTERED): Phase.REGISTERED,
    (Phase.READY, Step.NICK_REFUSED): Phase.GREETING,
    (Phase.WAITING, Step.REGISTERED): Phase.REGISTERED,
    (Phase.WAITING, Step.NICK_REFUSED): Phase.GREETING,
}


class Registration:
    """Where one connection stands, and what it said about itself before registering."""

    __slots__ = ("phase", "nick", "ident", "realname", "password", "cap_version")

    def __init__(self) -> None:
        self.phase = Phase.GREETING
        self.nick: Optional[str] = None  # asked for before registration
        self.ident: Optional[str] = None
        self.realname = ""
        self.password: Optional[str] = None  # PASS
        self.cap_version = 0  # the highest CAP LS version asked for (302 enables cap-notify)

    def _move(self, step: Step) -> None:
        try:
            self.phase = _MOVES[(self.phase, step)]
        except KeyError:
            raise StateError(f"{step.name} in {self.phase.name}") from None

    def _settle(self) -> None:
        if self.phase is Phase.GREETING and self.nick is not None and self.ident is not None:
            self._move(Step.IDENTIFIED)

    @property
    def registered(self) -> bool:
        return self.phase is Phase.REGISTERED

    @property
    def ready(self) -> bool:
        """NICK and USER known and nothing open: the session should register now."""
        return self.phase is Phase.READY

    @property
    def negotiating(self) -> bool:
        return self.phase in (Phase.NEGOTIATING, Phase.AUTHENTICATING)

    # --- what the handlers report ---------------------------------------------------------------

    def cap_started(self, version: int = 0) -> None:
        """CAP LS (with its version) or CAP REQ. After registration only the version counts."""
        self.cap_version = max(self.cap_version, version)
        if self.phase is not Phase.REGISTERED and self.phase is not Phase.WAITING:
            self._move(Step.CAP_STARTED)

    def cap_ended(self) -> None:
        """CAP END: a no-op unless negotiating (servers ignore a stray one)."""
        if self.negotiating:
            self._move(Step.CAP_ENDED)
            self._settle()

    def auth_started(self) -> None:
        self._move(Step.AUTH_STARTED)

    def auth_ended(self) -> None:
        if self.phase is Phase.AUTHENTICATING:
            self._move(Step.AUTH_ENDED)

    def nick_given(self, nick: str) -> None:
        self.nick = nick
        self._settle()

    def user_given(self, ident: str, realname: str) -> None:
        self.ident = ident
        self.realname = realname
        self._settle()

    def turn_asked(self) -> None:
        self._move(Step.TURN_ASKED)

    def registered_now(self) -> None:
        self._move(Step.REGISTERED)

    def nick_refused(self) -> None:
        """The hub refused the nick at the last moment: registration waits for another NICK."""
        self._move(Step.NICK_REFUSED)
        self.nick = None
