"""The hub: the one owner of the chat state and the store, which every door talks to.

Doors turn their wire into requests and call `register`, `handle` and `leave`; the hub runs
them against the chat state and hands the deliveries to the fan-out. It also keeps the loop's
promises that belong to the chat rather than to bytes:

* no teardown in the middle of a broadcast: a session that must go (a slow consumer) is
  *condemned*, and removed between requests, when the chat state is consistent;
* nothing is sent before it is stored: the pass's messages are committed in one transaction
  by a before-sleep hook that runs before the writer's (see `selchat.loop.reactor`);
* a message that was delivered but could not be stored is reported to its sender.

While the disk refuses writes, every pass fails its commit; the log gets that once per period
with a count (`selchat.loop.ratelog`), not once per pass.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from selchat.core.chat import Chat, ChatError, User
from selchat.core.requests import Request, Say
from selchat.defaults import REQUESTS_PER_PASS
from selchat.fanout import Fanout
from selchat.loop import ratelog
from selchat.loop.pacing import Pacer
from selchat.loop.reactor import ORDER_COMMIT, ORDER_SETTLE, Reactor

log = logging.getLogger("selchat.server")

EXPENSIVE_PER_PASS = 0.002  # CPU seconds of deferred expensive answers one loop pass may serve

__all__ = ["Hub", "ChatError"]


class Hub:
    __slots__ = ("chat", "store", "reactor", "fanout", "wall_ms", "_condemned", "_said",
                 "_drop_queued", "commits", "ratelog", "pacer", "_expensive_pass",
                 "_expensive_spent", "_served_pass", "_served", "_held")

    def __init__(self, chat: Chat, reactor: Reactor,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.chat = chat
        self.store = chat.store
        self.reactor = reactor
        self.fanout = Fanout()
        self.wall_ms = wall_ms
        self._condemned: List[Tuple[Any, str]] = []
        self._said: List[Tuple[Any, Any, int]] = []  # (session, ref, id) of the pass's messages
        self._drop_queued = False
        self.commits = 0
        self.ratelog = ratelog.shared(log)
        self.ratelog.attach(reactor.call_later, lambda: reactor.now)
        # Registrations per address, paced (selchat.loop.pacing); None: every door registers
        # at once. Set by whoever assembles the server.
        self.pacer: Optional[Pacer] = None
        # Sessions holding an expensive request for a later pass, oldest first: they are served
        # in this order, and a fresh expensive request waits behind them (no one starves).
        self._held: Dict[Any, None] = {}
        self._served_pass = -1  # the pass `_served` counts requests of
        self._served = 0
        self._expensive_pass = -1  # the pass `_expensive_spent` counts for
        self._expensive_spent = 0.0  # CPU seconds of expensive answers served in that pass
        chat.before_change = self.fanout.flush
        reactor.add_before_sleep(self._settle, ORDER_SETTLE)
        reactor.add_before_sleep(self._commit, ORDER_COMMIT)

    # --- for doors ----------------------------------------------------------------------------

    def register(self, nick: str, session: Any, ref: Any = None, **details: Any) -> User:
        """Register `session` as `nick`; raises ChatError (nick_taken) when it cannot be."""
        user, deliveries = self.chat.register(nick, session, now_ms=self.wall_ms(), **details)
        self.fanout.deliver(deliveries, ref)
        return user

    def handle(self, user: User, request: Request, ref: Any = None) -> None:
        """Carry out a request; raises ChatError for the door to put in its own words."""
        deliveries = self.chat.handle(user, request, self.wall_ms())
        self.fanout.deliver(deliveries, ref)
        if type(request) is Say:
            self._said.append((user.session, ref, deliveries[0].event.id))  # type: ignore[union-attr]

    def leave(self, user: User, reason: Optional[str]) -> None:
        """The user leaves the chat; with a reason, those sharing a room see it `quit`."""
        deliveries = self.chat.disconnect(user, reason or "")
        if reason is not None:
            self.fanout.deliver(deliveries, None)

    def take_request(self) -> bool:
        """May a session serve one more request in this pass? A pass serves REQUESTS_PER_PASS
        in all: however many connections have much to ask at once (a stall's backlog, a
        hundred clients sending their bursts), the pass stays short, and whoever was not
        served goes on in the next one, so a bystander's message waits a short pass, not a
        long one."""
        passes = self.reactor.passes
        if self._served_pass != passes:
            self._served_pass, self._served = passes, 0
        self._served += 1
        return self._served <= REQUESTS_PER_PASS

    def spent_expensive(self, seconds: float) -> None:
        """An expensive answer (rooms, history, who, join) took `seconds` of this pass."""
        passes = self.reactor.passes
        if self._expensive_pass != passes:
            self._expensive_pass, self._expensive_spent = passes, 0.0
        self._expensive_spent += seconds

    def expensive_room(self, session: Any) -> bool:
        """May `session` have an expensive answer served now? One pass serves at most
        EXPENSIVE_PER_PASS seconds of them, so a pass stays short however many fall due; and
        those held over from earlier passes go first, oldest first, so fresh ones arriving
        every pass cannot push them back for ever."""
        held = self._held
        if held and next(iter(held)) is not session:
            return False
        return self._expensive_pass != self.reactor.passes or self._expensive_spent < EXPENSIVE_PER_PASS

    def hold(self, session: Any) -> None:
        """`session` keeps an expensive request for a later pass: it queues for its turn."""
        self._held[session] = None

    def unhold(self, session: Any) -> None:
        """`session`'s held request was served, or the session is gone."""
        self._held.pop(session, None)

    def log_refusal(self, peer: str, reason: str) -> None:
        """One line per reason and period, with a count (an attacker must not fill the log)."""
        self.ratelog.log(logging.WARNING, ("refusing", reason), "refusing %s: %s", peer, reason)

    def condemn(self, session: Any, reason: str) -> None:
        """Remove `session` between requests, never in the middle of a broadcast."""
        self._condemned.append((session, reason))
        if not self._drop_queued:
            self._drop_queued = True
            self.reactor.call_soon(self._drop_condemned)

    # --- before sleep -------------------------------------------------------------------------

    def _drop_condemned(self) -> None:
        self._drop_queued = False
        self.fanout.flush()
        while self._condemned:
            condemned, self._condemned = self._condemned, []
            for session, reason in condemned:
                session.drop(reason)
            self.fanout.flush()

    def _settle(self) -> None:
        self.fanout.flush()
        if self._condemned:
            self._drop_condemned()

    def _commit(self) -> None:
        said, self._said = self._said, []
        try:
            stored = self.store.commit()
        except Exception as exc:  # StoreError, or anything else the disk throws at us
            # Keep serving: the messages were queued already and go out, but their senders
            # learn that history will not have them.
            self.ratelog.log(logging.ERROR, "history write failed",
                             "history write failed, %d message(s) not stored: %s", len(said), exc)
            for session, ref, message_id in said:
                session.send_error("not_stored", f"message {message_id} was delivered "
                                   "but could not be stored in history", ref)
            self.fanout.flush()
            return
        if stored:
            self.commits += 1
