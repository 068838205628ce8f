"""The native protocol's requests, whatever carries them: what the framed and the web door share.

Both doors speak the JSON objects of docs/protocol.md; they differ only in how an object
travels (a length prefix on a TCP stream, or one WebSocket text message) and in how a
connection ends (a web session says goodbye with a WebSocket close frame first). So a door
provides:

* a wire format (`frames(event, ref, limits)` for one session's own answers, `encode(event)`
  and `message(msg)` for the fan-out's shared copies), and
* a session subclass that cuts its input into payloads and hands each to `_on_payload`, and
  that may override `_goodbye` (last words before the transport closes) and `_send_ping`.

Everything else is here, once: `hello` and the password, flood control by token bucket, the
echo of `ref`, `ping`/`pong`/`quit`, the hub's requests and their error replies, the handshake
deadline and the idle timer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from selchat.core import events
from selchat.core.chat import ChatError, User
from selchat.core.events import Message
from selchat.core.requests import HistoryRequest, JoinRoom, ListRooms, Logout, Who
from selchat.core.ratelimit import (ALLOW, DISCONNECT, OUTPUT_BYTES_PER_TOKEN, Arrivals, TokenBucket,
                                    answer_cost, cpu_cost)
from selchat.doors.framed import codec
from selchat.doors.framed.protocol import (
    Hello,
    Page,
    Parser,
    PingRequest,
    PongReply,
    ProtocolError,
    QuitRequest,
    Ref,
    ref_limit,
)
from selchat.hub import Hub
from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer
from selchat.doors.base import DoorSession, password_matches
from selchat.loop.transport import State, Transport

log = logging.getLogger("selchat.server")

FREE_OUTPUT = 4096  # bytes of an answer that its request's token pays for
# The requests whose answers grow with the data (rooms, members, history) and are billed
# beyond their token; a say, a msg, a ping or a nick costs its token and nothing more.
BILLED = frozenset((ListRooms, HistoryRequest, Who, JoinRoom))

REFUSALS = {
    "server_full": "the server is full",
    "too_many_connections": "too many connections from your address",
}

# WebSocket close codes (RFC 6455, section 7.4.1), named here so the shared code can say why it
# closes; a door without close frames ignores them.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013


@dataclass
class JsonDoor:
    """What every session of one JSON door shares: the hub, the rules, the limits, the timeouts."""

    hub: Hub
    reactor: Reactor
    max_frame: int
    max_text: int
    rate: float
    burst: int
    handshake_timeout: float
    ping_interval: float
    ping_timeout: float
    password: Optional[bytes] = None
    answer_budget: Optional[int] = None  # bytes one answer may take in all (the high-water mark)

    name = "json"  # the door's name in the chat's user records and the logs
    rate_limited = 0  # requests refused by flood control so far (read by selchat.ops.metrics)

    def __post_init__(self) -> None:
        limits: Dict[str, Any] = {"max_frame": self.max_frame, "max_text": self.max_text}
        if self.rate:
            limits["rate"] = self.rate
            limits["burst"] = self.burst
        self.limits = limits
        self.parser = Parser(self.max_text, ref_limit(self.max_frame, self.max_text), self.max_frame)


class JsonSession(DoorSession):
    """One connection of a JSON door; subclasses feed `_on_payload` and may say goodbye."""

    __slots__ = ("door", "wire", "transport", "user", "bucket", "arrivals", "consumed",
                 "pings_owed", "_debt_timer", "not_before", "last_seen", "pinged", "reject",
                 "_handshake_timer", "_idle_timer", "_held", "_rest",
                 "_close_after_job", "_logged_out", "__weakref__")

    def __init__(self, door: JsonDoor, wire: Any, reject: Optional[str] = None) -> None:
        self.door = door
        self.wire = wire
        self.transport: Transport = None  # type: ignore[assignment]  # set by connection_made
        self.user: Optional[User] = None
        # Flood control from the first byte, before registration too: every frame is paid for.
        self.bucket: Optional[TokenBucket] = None
        self.arrivals: Optional[Arrivals] = None
        if door.rate > 0:
            self.bucket = TokenBucket(door.reactor.now, door.rate, door.burst)
            self.arrivals = Arrivals()
        self.consumed = 0  # input bytes served so far (framing counted as 4 bytes a payload)
        self.pings_owed = 0  # our pings not yet answered: their pongs are free
        self._debt_timer: Optional[Timer] = None
        self.not_before = float("-inf")  # requests are charged no earlier than this (a debt)
        self.last_seen = door.reactor.now
        self.pinged = False
        self.reject = reject  # the error word to refuse the connection with
        self._handshake_timer: Optional[Timer] = None
        self._idle_timer: Optional[Timer] = None
        self._init_serving()  # condemned, the turn, the job, the pass share (DoorSession)
        self._held: Optional[Tuple[Any, Ref]] = None  # an expensive request kept for a later pass
        self._close_after_job = False  # a `logout` the cluster orders: close once it is done
        self._logged_out = False  # ... and only if it was answered as done
        # The rest of an answer cut where our buffer for the client was full (a long `rooms`):
        # asked for once the client has read the part sent, before anything else is served.
        self._rest: Optional[Tuple[Any, Ref]] = None

    # --- for subclasses -----------------------------------------------------------------------

    def _start_handshake_timer(self) -> None:
        # Connections that never finish TLS or hello count against the limits until they time out.
        reactor = self.door.reactor
        self._handshake_timer = reactor.call_at(reactor.now + self.door.handshake_timeout,
                                                self._handshake_deadline)

    def _start_idle_timer(self) -> None:
        reactor = self.door.reactor
        self._idle_timer = reactor.call_at(reactor.now + self.door.ping_interval, self._idle_check)

    def _refuse(self) -> None:
        """Say why the connection is refused (admission), then close once that is sent."""
        assert self.reject is not None
        self.send_error(self.reject, REFUSALS.get(self.reject, self.reject), None)
        self._goodbye(CLOSE_TRY_AGAIN, self.reject)
        self.transport.close(self.reject)

    def _goodbye(self, code: int, reason: str) -> None:
        """Last words of this door before the transport closes (a WebSocket close frame)."""

    def _send_ping(self, token: str) -> None:
        """Ask a silent peer to prove it is alive."""
        self.pings_owed = 1
        self.reply(events.Ping(token), None)

    def _held_back(self) -> bool:
        """The JSON doors' flood policy holds a request back only for a debt (an early
        request is refused, `_admit`, not held)."""
        return self._in_debt()

    def _reading_held(self) -> bool:
        return self._debt_timer is not None  # (a debt keeps reading off until it is repaid)

    def _waiting_input_cap(self) -> int:
        return 2 * self.door.max_frame

    def _in_debt(self) -> bool:
        """Expensive answers left a debt: serve nothing more until it is repaid (then resume)."""
        bucket = self.bucket
        if bucket is None or bucket.tokens >= bucket.count:
            return False
        if self._debt_timer is not None:
            return True
        # Judged at the time the next request arrived (or, if it waited for a debt already,
        # when that debt was repaid), which is when its charge will be made.
        when = max(self._charge_time(self.consumed + 1), self.not_before)
        wait = bucket.debt_wait(when)
        if wait <= 0:
            return False
        self.not_before = when + wait
        self.transport.pause_reading()
        reactor = self.door.reactor
        # Never in the past: a timer due now would fire in this very pass, again and again.
        self._debt_timer = reactor.call_at(max(self.not_before, reactor.now + 0.001), self._debt_repaid)
        return True

    def _serve_held(self) -> bool:
        """The next pass came: an expensive request held for it is served first."""
        held, self._held = self._held, None
        if held is None:
            return False
        self._carry_out(*held)
        return self._next_pass  # held again: its turn has not come yet

    def _page_on(self, rest: Any, ref: Ref) -> None:
        """An answer stopped where the client's buffer is full: the rest (a request) is served
        once the client has read it (`_drained`), and nothing else before it, so answers stay
        in order and the answer still ends as docs/protocol.md says (`more: false`)."""
        self._rest = (rest, ref)
        self._next_pass = True  # the serving loops stop here; `_drained` takes over
        transport = self.transport
        transport.pause_reading()
        transport.wait_for_drain()

    def _drained(self) -> bool:
        """From `resume_serving`: the client read what was queued. Serve the rest of a cut
        answer first, if there is one (True), as a request held for this pass is served."""
        rest = self._rest
        if rest is None:
            return False
        if self.transport.throttled:
            return True  # (a debt repaid, not the drain): the transport says when it has drained
        self._rest = None
        self._held = rest
        self._next_pass_came()
        return True

    def _charge_time(self, offset: int) -> float:
        start, end, fraction = self.arrivals.at(offset)  # type: ignore[union-attr]
        return end if fraction >= 1.0 else start + (end - start) * fraction

    def _debt_repaid(self, _: Any = None) -> None:
        self._debt_timer = None
        if self.transport.state is State.OPEN:
            self._serve_again()

    def _arrived(self, n: int) -> None:
        """`n` bytes were read now: for flood control, when they may have arrived."""
        if self.arrivals is not None:
            transport = self.transport
            self.arrivals.read(n, transport.arrived_after, transport.read_at)

    def _release(self) -> None:
        if self._debt_timer is not None:
            self._debt_timer.cancel()
            self._debt_timer = None
        self.door.hub.unhold(self)  # a held request dies with its connection, not the queue
        self._held = None
        self._rest = None
        self._release_input()
        self.arrivals = None

    def _release_input(self) -> None:
        """Free what the subclass buffers; the connection is gone."""

    # --- for the hub and the fan-out ----------------------------------------------------------

    def reply(self, event: events.Event, ref: Any) -> None:
        if self._close_after_job and type(event) is events.AccountInfo and event.account is None:
            self._logged_out = True  # the answer to a `logout` the cluster ordered: it worked
        limits = self.door.limits if type(event) is events.Welcome else None
        send = self.door.hub.fanout.send
        frames = self.wire.frames(event, ref, limits)
        for data in frames:
            send(self.transport, data)
        if type(frames) is Page:
            self._page_on(ListRooms(frames.rest), ref)  # (only `rooms` answers are cut)

    def own_message(self, msg: Message, ref: Any, shared: bytes) -> bytes:
        if ref is None:
            return shared
        return self.wire.message(msg, ref)

    def send_error(self, code: str, message: str, ref: Ref) -> None:
        try:
            frames = self.wire.frames(events.Error(code, message), ref)
        except codec.EncodeError:
            # Only with a tiny --max-frame and a long ref: the code and ref matter, not the words.
            frames = self.wire.frames(events.Error(code, code), ref)
        send = self.door.hub.fanout.send
        for data in frames:
            send(self.transport, data)

    def notice(self, text: str) -> None:
        self.reply(events.Notice(text), None)

    def _shutdown_words(self) -> None:
        self._goodbye(CLOSE_GOING_AWAY, "server shutting down")

    # --- serving ------------------------------------------------------------------------------

    def _close(self, quit_reason: Optional[str], detail: str, code: int = CLOSE_NORMAL) -> None:
        """Leave the chat now; send what is queued (and our goodbye), then close."""
        self._leave(quit_reason)
        self._goodbye(code, detail)
        self.transport.close(detail)

    def _on_payload(self, payload: bytes) -> None:
        """Serve one JSON payload: flood control, decode, parse, then the request itself."""
        self.consumed += len(payload) + 4
        self._count_request(len(payload) + 4)
        if self.bucket is not None and not self._admit(payload):
            return
        door = self.door
        try:
            obj = codec.decode(payload)
        except codec.PayloadError as exc:
            self.send_error(exc.code, exc.message, None)
            return
        user = self.user
        if user is not None and obj["type"] == "say":
            say = door.parser.quick_say(obj)
            if say is not None:  # the busy case: straight to the hub (else `parse` says why not)
                try:
                    if door.hub.say(user, self, say[3], say[0], say[1], say[2]):
                        self._job = True  # ordered by the cluster: `job_done` goes on
                except ChatError as exc:
                    self.send_error(exc.code, exc.message, say[3])
                return
        try:
            request, ref = door.parser.parse(obj, registered=user is not None)
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message, exc.ref)
            return
        kind = type(request)
        if kind is PingRequest:
            self.reply(events.Pong(request.token), ref)  # type: ignore[union-attr]
            return
        if kind is QuitRequest:
            if user is None:
                self._close(None, "quit before registering")
            else:
                reason = request.reason or "quit"  # type: ignore[union-attr]
                self._close(reason, f"quit: {reason}")
            return
        if user is None:
            if kind is Hello:
                self._hello(request, ref)  # type: ignore[arg-type]
            return  # a pong before registering needs no answer
        if kind is Hello:
            self.send_error("already_registered", "you are registered already", ref)
            return
        if kind is PongReply:
            return  # the liveness it proves was noted when its bytes arrived
        self._carry_out(request, ref)

    def _carry_out(self, request: Any, ref: Ref) -> None:
        """A registered user's chat request: to the hub; an expensive one is billed, and waits
        for a later pass when this one has served its share of expensive answers."""
        door = self.door
        user = self.user
        if user is None:
            return
        kind = type(request)
        bucket = self.bucket
        billed = bucket is not None and kind in BILLED
        if billed and not door.hub.expensive_room(self):
            self._held = (request, ref)  # served in a later pass, in its turn
            door.hub.hold(self)
            self._serve_next_pass()
            return
        if billed:
            door.hub.unhold(self)  # its turn came (a no-op when nothing was held)
            before = self.transport.out.size
            started = time.thread_time()
        try:
            if door.hub.handle(user, request, ref, self):  # type: ignore[arg-type]
                self._job = True  # answered later: `job_done` goes on
                if kind is Logout:
                    self._close_after_job = True  # if it succeeds (see `reply`)
                    self._logged_out = False
                return
        except ChatError as exc:
            self.send_error(exc.code, exc.message, ref)
            return
        if kind is Logout:
            self._close("quit", "logged out")
            return
        if billed:
            # An expensive answer (a long room list, a page of history) costs what it
            # produced and the CPU time it took: a debt that the next requests wait out.
            # CPU time, not wall time: a pass that the machine or a SIGSTOP held up is no
            # one's doing. Messages are not billed: their echo is part of the request.
            spent = time.thread_time() - started
            door.hub.spent_expensive(spent)
            cost = (answer_cost(self.transport.out.size - before - FREE_OUTPUT)
                    + cpu_cost(spent))
            if cost > 0:
                bucket.bill(cost)  # type: ignore[union-attr]

    def _admit(self, payload: bytes) -> bool:
        """Flood control: may this request be served? Else it was refused (and perhaps the end).

        Every request after `welcome` counts, except a `pong`; a door may charge other input
        too (a WebSocket ping, a binary message) by passing b"".
        """
        bucket = self.bucket
        if bucket is None:
            return True
        if self.pings_owed and b'"pong"' in payload and _is_pong(payload):
            self.pings_owed = 0  # the answer to our own ping is never charged
            return True
        # Charged when it arrived, not when it is served (a stall must not turn a backlog
        # into a burst), and by its size: a large frame costs as many small ones.
        start, end, fraction = self.arrivals.at(self.consumed)  # type: ignore[union-attr]
        if self._charge_time(self.consumed) < self.not_before:
            start = end = self.not_before  # it waited for a debt: charged when that was repaid
            fraction = 1.0
        # (one more token per whole 16 KiB, so that small requests cost exactly one each)
        verdict = bucket.charge(start, end, fraction, 1.0 + len(payload) // OUTPUT_BYTES_PER_TOKEN)
        if verdict is ALLOW:
            return True
        if verdict is DISCONNECT:
            self.transport.log_info("excess flood", "excess flood from %s", self.name)
            self.send_error("rate_limited", "excess flood: disconnecting", self._ref_of(payload))
            self._close("excess flood", "excess flood", CLOSE_POLICY)
        else:
            self.door.rate_limited += 1  # (for the metrics: only refusals pay this)
            self.send_error("rate_limited", "too many requests: slow down", self._ref_of(payload))
        return False

    def _hello(self, request: Hello, ref: Ref) -> None:
        door = self.door
        if door.password is not None and not password_matches(door.password, request.password):
            self.transport.log_info("bad password", "bad password from %s", self.transport.peer)
            self.send_error("bad_password", "wrong or missing password", ref)
            self._close(None, "bad password", CLOSE_POLICY)
            return

        def refuse() -> None:
            self.send_error("too_many_connections", "too many new connections from your "
                            "address at once: try again in a few seconds", ref)
            self._close(None, "too many waiting to register", CLOSE_TRY_AGAIN)

        if self._register_in_turn(lambda: self._register(request, ref), refuse):
            log.debug("%s waits %.2f s for its turn to register", self.transport.peer,
                      door.hub.pacer.wait_for(self.transport.ip))

    def _after_job(self) -> bool:
        if self._close_after_job:  # a `logout` the cluster ordered is done
            self._close_after_job = False
            if self._logged_out:  # (refused, `unavailable` among the reasons: it stays)
                self._close("quit", "logged out")
                return True
        return False

    def _register(self, request: Hello, ref: Ref) -> None:
        login = request.login
        if login is None:
            self._registered(request, ref, None)
            return
        self._job = True  # the password is checked off the loop: nothing else meanwhile
        finished = False

        def proved(account: Optional[str], error: Optional[ChatError]) -> None:
            nonlocal finished
            finished = True
            transport = self.transport
            if transport is None or transport.state is not State.OPEN:
                return
            if account is None:
                self.send_error(error.code, error.message, ref)  # type: ignore[union-attr]
                log.info("login failed: %s as %s: %s", transport.peer, login.account,
                         error.code)  # type: ignore[union-attr]
            elif self._registered(request, ref, account):
                return  # ordered by the cluster: its answer goes on (`job_done`)
            if waited:
                self.job_done()
            else:
                self._job = False

        waited = False
        self.door.hub.authenticate(login.account, login.password, login.token,
                                   self.transport.ip, proved)
        waited = not finished

    def _registered(self, request: Hello, ref: Ref, account: Optional[str]) -> bool:
        """Register the user; True when the answer comes later (the cluster orders it)."""
        door = self.door
        details: Dict[str, Any] = {}
        if account is not None:
            details = {"account": account, "remember": bool(request.login and request.login.remember)}
        later = False

        def done(user: Optional[User], error: Optional[ChatError]) -> None:
            if self.transport is None or self.transport.state is not State.OPEN:
                return
            if user is None:
                self.send_error(error.code, error.message, ref)  # type: ignore[union-attr]
            else:
                self.user = user
                self._welcomed(account, request)
            if later:  # the cluster ordered it: go on with what came behind the hello
                self.job_done()

        # With the cluster the answer comes once Redis has ordered it: nothing else meanwhile.
        waiting = self._job  # (a login's password check, whose end serves on)
        self._job = True
        later = door.hub.admit(request.nick, self, ref, done, door=door.name,
                               origin=self.transport.ip, **details)
        if not later:
            self._job = waiting
        return later

    def _welcomed(self, account: Optional[str], request: Hello) -> None:
        door = self.door
        self.registered()
        if door.rate > 0:
            # A bucket of its own from here: what was spent getting in (hello, pings, bad
            # frames) is not taken from what the contract promises after welcome. Full from
            # when the hello arrived, not from now: requests sent behind it (during a stall,
            # or while it waited its turn) are charged when they came, as any others.
            self.bucket = TokenBucket(self._charge_time(self.consumed), door.rate, door.burst)
        log.info("registered: %s as %s%s (client %r)", self.transport.peer, self.user.nick,
                 f" (account {account})" if account else "", request.client)

    def _ref_of(self, payload: bytes) -> Ref:
        try:
            return self.door.parser.ref_of(codec.decode(payload))
        except codec.PayloadError:
            return None

    # --- timers -------------------------------------------------------------------------------

    def _handshake_deadline(self, _: Any = None) -> None:
        self._handshake_timer = None
        transport = self.transport
        if transport.state is State.HANDSHAKING or (transport.state is State.OPEN and self.user is None):
            transport.abort("handshake timeout")

    def _ping_timed_out(self) -> None:
        self._leave("ping timeout")
        self.transport.abort("ping timeout")


def _is_pong(payload: bytes) -> bool:
    """Pongs are exempt from flood control; only payloads that mention one are decoded here."""
    try:
        return codec.decode(payload).get("type") == "pong"
    except codec.PayloadError:
        return False


__all__ = ["JsonDoor", "JsonSession", "REFUSALS", "CLOSE_NORMAL", "CLOSE_GOING_AWAY",
           "CLOSE_PROTOCOL_ERROR", "CLOSE_POLICY", "CLOSE_TOO_BIG", "CLOSE_TRY_AGAIN"]
