"""What every door's session does the same way: the serving rules and the end of a connection.

The serving rules, once for all doors (`_may_serve`): before each request a session asks, in
this order, whether it is condemned (`doomed`), whether its queue for the peer is congested
(backpressure), whether its door's flood policy holds it back (`_held_back`: a debt at the
JSON doors, fake lag and a streaming LIST at the IRC door), whether it waits for its turn to
register or for a job (`_waiting_turn`), and whether this pass has served its share
(`_pass_full`, going on in the next pass by `_serve_next_pass` and `_next_pass_came`). A door
says only how it frames its requests, how much input it holds unserved, and its flood policy.

A session leaves the chat once (`_leave`), is dropped between requests when the hub condemns
it (`drop`), is torn down once when its transport closes (`connection_lost`, with the door's
own `_release`), and at shutdown gets a notice, leaves without a quit storm, says its door's
last words (`_shutdown_words`) and closes after flushing, by the server's deadline. More
that every door does alike: the server password's check (`password_matches`), registering in
the address's turn (`_register_in_turn`, over the hub's pacer: `_ask_turn`, `_take_turn`,
`_cancel_turn`), going on from a timer or a later pass (`_serve_again`), and the idle timer
that pings a silent peer and lets it go at the ping timeout (`_idle_check`).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable, Optional

from selchat.loop.pacing import Full
from selchat.loop.transport import State

log = logging.getLogger("selchat.server")

_NOW = object()  # the pacer is deciding: if it calls back at once, nothing waited


def password_matches(expected: bytes, given: Optional[str]) -> bool:
    """The server password, at every door. Constant time, so the time taken says nothing
    about how much of a guess was right."""
    if given is None:
        return False
    return hmac.compare_digest(expected, given.encode("utf-8", "replace"))


class DoorSession:
    """Mixed into each door's session; it has `door` (with `hub` and `reactor`), `transport`,
    `user`, `name`, `bucket` and the `_handshake_timer` and `_idle_timer`."""

    __slots__ = ("doomed", "_turn", "_job", "_next_pass", "_quantum", "_pass_id", "_pass_bytes")

    door: Any
    transport: Any
    user: Any
    bucket: Any
    _handshake_timer: Any
    _idle_timer: Any
    SHUTDOWN_NOTICE = "server shutting down"
    # Requests a session going on from an earlier pass serves there past the pass's share.
    PASS_QUANTUM = 4

    @property
    def name(self) -> str:
        """The peer (and its nick once registered), for the logs."""
        peer = self.transport.peer if self.transport is not None else "?"
        return f"{peer} ({self.user.nick})" if self.user is not None else peer

    def _init_serving(self) -> None:
        """The serving rules' state of a new connection (called by each door's __init__)."""
        self.doomed = False  # condemned: nothing more is served
        # Waiting for the address's turn to register: its pacer ticket (`_ask_turn`).
        self._turn: Any = None
        # A password being checked or hashed off the loop (selchat.kdf), or a change the
        # cluster orders: nothing more of this connection is served until its answer
        # (`job_done`), so answers keep their order.
        self._job = False
        self._next_pass = False  # the pass's share of requests is served: going on in the next
        self._quantum = 0  # requests a held-over session may serve past the pass's share
        self._pass_id = -1  # the loop pass `_pass_bytes` counts for
        self._pass_bytes = 0  # request bytes served in that pass (`_count_request`)

    # --- the serving rules ----------------------------------------------------------------------

    def _may_serve(self, buffered: int, ready: bool = True) -> bool:
        """May the next request be served now? If not, what goes on later is arranged.

        `buffered` is the input read and not served yet; `ready` says a request may be waiting
        in it (False when the door cannot tell before it takes one: the share is then counted
        after each request instead of before).
        """
        transport = self.transport
        if self.doomed or transport.state is not State.OPEN:
            return False
        # The check between requests is the backpressure: one read can hold hundreds of
        # requests, and their answers must not pile up past max_outbuf before the client could
        # read any. What is left waits unread until the client has read its answers.
        if transport.congested:
            transport.wait_for_drain()
            return False
        if self._held_back():
            return False  # the door's flood policy: served again by its own timer
        if self._waiting_turn(buffered):
            return False  # the hello waits for its address's turn (or a job): served after
        if self._next_pass or (ready and self._pass_full()):
            return False  # the pass's share is served: this goes on in the next pass
        return True

    def _held_back(self) -> bool:  # pragma: no cover - every door has its own flood policy
        """The door's flood policy holds the next request back (it arranges going on)."""
        raise NotImplementedError

    def _reading_held(self) -> bool:
        """The door's flood policy keeps reading off until its own timer turns it back on."""
        return False

    def _waiting_input_cap(self) -> int:  # pragma: no cover - every door sets its own
        """Bytes a connection waiting for its turn (or a job) may have read unserved."""
        raise NotImplementedError

    def _waiting_turn(self, buffered: int) -> bool:
        """True while the registration waits for its turn, or a job runs: nothing is served.

        Reading goes on, so a peer that resets or closes while it waits is seen at once and
        leaves the queue (a churner's dead connections never take a turn); a peer that sends
        more than a little meanwhile is no longer read until its turn comes.
        """
        if self._turn is None and not self._job:
            return False
        transport = self.transport
        if transport.eof:
            transport.close("peer closed before its turn to register" if self._turn is not None
                            else "peer closed while its request was being answered")
        elif buffered > self._waiting_input_cap():
            transport.pause_reading()
        return True

    def wait_for_job(self) -> None:
        """A job of ours runs off the loop (a password check, a change the cluster orders):
        serve nothing until its `job_done`. They count: one IRC line may start several."""
        self._job += 1

    def job_done(self) -> None:
        """The hub (or SASL) answered what waited: a password's work, or a change the cluster
        ordered. Go on serving once the last one is answered."""
        if not self._job:
            return
        self._job -= 1
        if self._job:
            return  # (another of this line's changes is still on its way)
        if self._after_job():
            return  # the connection ends with it
        transport = self.transport
        if transport is not None and transport.state is State.OPEN:
            self._serve_again()

    def _after_job(self) -> bool:
        """The door's own end of a job; True when the connection ends with it."""
        return False

    def registered(self) -> None:
        """Registration is done: the handshake deadline no longer applies."""
        self.transport.noted = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _count_request(self, size: int) -> None:
        """A request of `size` bytes is being served: for this session's share of the pass."""
        passes = self.door.reactor.passes
        if self._pass_id != passes:
            self._pass_id, self._pass_bytes = passes, 0
        self._pass_bytes += size

    def _pass_full(self) -> bool:
        """This pass has served its share of requests (`Hub.take_request`), or this session's
        (its requests' bytes reached the high-water mark: the echoes of its messages wait in
        the room batch until the pass ends, and backpressure cannot see them): stop reading
        and serving until the next pass, which goes on where this one stopped."""
        if self._next_pass:
            return True  # waiting for the next pass already (a request is held, perhaps)
        mine = (self._pass_id == self.door.reactor.passes
                and self._pass_bytes >= self.transport.high_water)
        if not mine and self._quantum > 0:
            # Held over from an earlier pass: a few requests now whatever the share says, so
            # that fresh requests arriving every pass cannot push it back for ever.
            self._quantum -= 1
            return False
        if not mine and self.door.hub.take_request():
            return False
        self._serve_next_pass()
        return True

    def _serve_next_pass(self) -> None:
        """Go on in the next pass: read nothing until then."""
        if not self._next_pass:
            self._next_pass = True
            self.transport.pause_reading()
            self.door.reactor.call_soon(self._next_pass_came)

    def _next_pass_came(self) -> None:
        """Read again (unless the flood policy keeps reading off) and go on where the last
        pass stopped: a request held for this pass first, then what waits."""
        self._next_pass = False
        transport = self.transport
        if transport is None or transport.state is not State.OPEN:
            return
        if not self._reading_held():
            transport.resume_reading()
        try:
            if self._serve_held():
                return  # held again: its turn has not come yet
            self._quantum = self.PASS_QUANTUM
            self.resume_serving()
        except Exception:  # from the loop: a bug of ours loses this peer, never the server
            transport._internal_error()

    def _serve_held(self) -> bool:
        """Serve a request the door held for this pass; True when it is held again."""
        return False

    # --- what each door says its own way; the idle timer ------------------------------------------

    def notice(self, text: str) -> None:  # pragma: no cover - every door says it its own way
        raise NotImplementedError

    def _send_ping(self, token: str) -> None:  # pragma: no cover - every door pings its own way
        raise NotImplementedError

    def _ping_timed_out(self) -> None:  # pragma: no cover - and says goodbye its own way
        raise NotImplementedError

    def _idle_check(self, _: Any = None) -> None:
        """One timer per connection, re-armed from `last_seen`; no per-frame timer work."""
        self._idle_timer = None
        transport = self.transport
        if transport.state is not State.OPEN:
            return
        door = self.door
        now = door.reactor.now
        silence = now - self.last_seen  # type: ignore[attr-defined]
        if silence >= door.ping_timeout:
            self._ping_timed_out()
            return
        if silence >= door.ping_interval:
            if not self.pinged:  # type: ignore[has-type]
                self.pinged = True
                self._send_ping(f"{int(now * 1000)}")
            when = self.last_seen + door.ping_timeout  # type: ignore[attr-defined]
        else:
            when = self.last_seen + door.ping_interval  # type: ignore[attr-defined]
        self._idle_timer = door.reactor.call_at(when, self._idle_check)

    def resume_serving(self) -> None:  # pragma: no cover - every door serves its own way
        raise NotImplementedError

    def _serve_again(self, read: bool = True) -> None:
        """From a timer or a later pass: read again (unless `read` is False) and serve what
        waits. A bug of ours while serving loses this peer, never the server."""
        transport = self.transport
        if read:
            transport.resume_reading()
        try:
            self.resume_serving()
        except Exception:
            transport._internal_error()

    def _register_in_turn(self, register: Callable[[], None], refuse: Callable[[], None]) -> bool:
        """Registrations are paced per address: `register` now, or when the address's turn
        comes (True: it waits, and nothing behind it is served meanwhile); when too many of
        the address wait already, the refusal is logged and `refuse` says it the door's way."""
        if self.door.hub.pacer is None:
            register()
            return False

        def turn_came() -> None:
            queued = self._take_turn()
            if self.transport.state is not State.OPEN:
                return
            register()
            if queued and self.transport.state is State.OPEN:
                self._serve_again()  # from the pacer's timer: what came behind the registration

        went = self._ask_turn(turn_came)
        if went is None:
            self.door.hub.log_refusal(self.transport.peer, "too many waiting to register")
            refuse()
        return went is False

    def _ask_turn(self, go: Callable[[], None]) -> Optional[bool]:
        """Ask the hub's pacer for this address's turn to register (selchat.loop.pacing):
        True when `go` ran at once, False when it waits (the ticket is kept in `_turn`), None
        when too many of the address wait already (the caller refuses)."""
        self._turn = _NOW
        try:
            ticket = self.door.hub.pacer.request(self.transport.ip, go)
        except Full:
            self._turn = None
            return None
        if self._turn is _NOW:
            self._turn = ticket
            return False
        return True

    def _take_turn(self) -> bool:
        """In `go`: the turn is taken; True when it had waited (called by the pacer's timer)."""
        queued = self._turn is not _NOW
        self._turn = None
        return queued

    def _cancel_turn(self) -> None:
        """The connection is gone: it leaves the queue at once and never takes a turn."""
        turn, self._turn = self._turn, None
        if turn is not None and turn is not _NOW:
            turn.cancel()

    # --- the end of a connection ------------------------------------------------------------------

    def output_overflow(self) -> None:
        """Past max_outbuf: the queue is gone already; the session goes between requests."""
        if not self.doomed:
            self.doomed = True
            self.door.hub.condemn(self, "slow consumer")

    def connection_lost(self, detail: str) -> None:
        """Once, when the transport is closed for any reason: no timer fires after this, the
        turn is given up, the door frees what it kept, and the user leaves the chat."""
        for timer in (self._handshake_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._idle_timer = None
        self._cancel_turn()
        self._release()
        self.bucket = None
        self._leave("connection closed")

    def _release(self) -> None:
        """Free what the door keeps for the connection (its own timers, buffers, queues)."""

    def _shutdown_words(self) -> None:
        """The door's last words before its transport closes at shutdown (none by default)."""

    def _leave(self, quit_reason: Optional[str]) -> None:
        """Leave the chat, once; with a reason, those sharing a room see the user quit."""
        user, self.user = self.user, None
        if user is not None:
            self.door.hub.leave(user, quit_reason, self)

    def drop(self, reason: str) -> None:
        """Condemned: leave the chat with `reason` and close now."""
        name = self.name
        self.transport.log_info(f"dropping: {reason}", "dropping %s: %s", name, reason)
        self._leave(reason)
        self.transport.abort(reason)

    def shutdown(self, deadline: float) -> None:
        """The server is stopping: a notice, then close after flush, by `deadline` at the latest."""
        transport = self.transport
        if transport.state is State.HANDSHAKING:
            transport.abort("server shutting down during the TLS handshake")
            return
        if transport.state is not State.OPEN:
            return
        self.notice(self.SHUTDOWN_NOTICE)
        self._leave(None)  # everyone leaves at once: no quit storm for the last seconds
        self._shutdown_words()
        transport.close("server shutting down", deadline)
