"""The framed-JSON door: one session per connection, over a transport (docs/protocol.md).

The session turns frames into requests for the hub, and the hub's events into frames. It owns
what is particular to this door: `hello` and the password, flood control by token bucket, the
echo of `ref`, pings and their deadlines, and how a refusal or a protocol error is said.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from selchat.core import events
from selchat.core.chat import ChatError, User
from selchat.core.events import Message
from selchat.core.ratelimit import ALLOW, DISCONNECT, TokenBucket
from selchat.doors.framed import codec
from selchat.doors.framed.protocol import (
    Hello,
    Parser,
    PingRequest,
    PongReply,
    ProtocolError,
    QuitRequest,
    Ref,
    encode_event,
    message_object,
    ref_limit,
)
from selchat.hub import Hub
from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer
from selchat.loop.transport import State, Transport

log = logging.getLogger("selchat.server")

REFUSALS = {
    "server_full": "the server is full",
    "too_many_connections": "too many connections from your address",
}


class FramedWire:
    """The framed door's wire format: every framed session shares this one instance."""

    __slots__ = ("max_frame", "limits")

    def __init__(self, max_frame: int, limits: Dict[str, Any]) -> None:
        self.max_frame = max_frame
        self.limits = limits

    def encode(self, event: events.Event) -> List[bytes]:
        return encode_event(event, None, self.max_frame)

    def message(self, msg: Message) -> bytes:
        return codec.encode(message_object(msg), self.max_frame)


@dataclass
class FramedDoor:
    """What every framed session shares: the hub, the rules, the limits and the timeouts."""

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

    def __post_init__(self) -> None:
        limits: Dict[str, Any] = {"max_frame": self.max_frame, "max_text": self.max_text}
        if self.rate:
            limits["rate"] = self.rate
            limits["burst"] = self.burst
        self.wire = FramedWire(self.max_frame, limits)
        self.parser = Parser(self.max_text, ref_limit(self.max_frame, self.max_text), self.max_frame)

    def session(self, reject: Optional[str] = None) -> "FramedSession":
        return FramedSession(self, reject)


def _password_matches(expected: bytes, given: Optional[str]) -> bool:
    """Constant time, so the time taken says nothing about how much of a guess was right."""
    if given is None:
        return False
    return hmac.compare_digest(expected, given.encode("utf-8"))


class FramedSession:
    __slots__ = ("door", "wire", "transport", "decoder", "user", "bucket", "last_seen", "pinged",
                 "doomed", "reject", "_handshake_timer", "_idle_timer", "__weakref__")

    def __init__(self, door: FramedDoor, reject: Optional[str] = None) -> None:
        self.door = door
        self.wire = door.wire
        self.transport: Transport = None  # type: ignore[assignment]  # set by connection_made
        self.decoder = codec.FrameDecoder(door.max_frame)
        self.user: Optional[User] = None
        self.bucket: Optional[TokenBucket] = None  # made at registration: flood control
        self.last_seen = door.reactor.now
        self.pinged = False
        self.doomed = False  # condemned: nothing more is served
        self.reject = reject  # the error word to refuse the connection with
        self._handshake_timer: Optional[Timer] = None
        self._idle_timer: Optional[Timer] = None

    @property
    def name(self) -> str:
        peer = self.transport.peer if self.transport is not None else "?"
        return f"{peer} ({self.user.nick})" if self.user is not None else peer

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        door = self.door
        now = door.reactor.now
        # Connections that never finish TLS or hello count against the limits until they time out.
        self._handshake_timer = door.reactor.call_at(now + door.handshake_timeout, self._handshake_deadline)
        if self.reject is not None:
            # With TLS the words wait in the queue until the handshake is done.
            self.send_error(self.reject, REFUSALS.get(self.reject, self.reject), None)
            transport.close(self.reject)
            return
        self._idle_timer = door.reactor.call_at(now + door.ping_interval, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.door.reactor.now
        self.pinged = False
        self.decoder.feed(data)
        self._serve()

    def eof_received(self) -> None:
        self._serve()

    def resume_serving(self) -> None:
        if self.decoder.buffered or self.transport.eof:
            self._serve()

    def output_overflow(self) -> None:
        """Past max_outbuf: the queue is gone already; the session goes between requests."""
        if not self.doomed:
            self.doomed = True
            self.door.hub.condemn(self, "slow consumer")

    def connection_lost(self, detail: str) -> None:
        for timer in (self._handshake_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._idle_timer = None
        self.decoder.clear()
        self.bucket = None
        user, self.user = self.user, None
        if user is not None:
            self.door.hub.leave(user, "connection closed")

    # --- for the hub and the fan-out ----------------------------------------------------------

    def reply(self, event: events.Event, ref: Any) -> None:
        door = self.door
        limits = door.wire.limits if type(event) is events.Welcome else None
        send = door.hub.fanout.send
        for data in encode_event(event, ref, door.max_frame, limits):
            send(self.transport, data)

    def own_message(self, msg: Message, ref: Any, shared: bytes) -> bytes:
        if ref is None:
            return shared
        return encode_event(msg, ref, self.door.max_frame)[0]

    def send_error(self, code: str, message: str, ref: Ref) -> None:
        max_frame = self.door.max_frame
        try:
            frames = encode_event(events.Error(code, message), ref, max_frame)
        except codec.EncodeError:
            # Only with a tiny --max-frame and a long ref: the code and ref matter, not the words.
            frames = encode_event(events.Error(code, code), ref, max_frame)
        send = self.door.hub.fanout.send
        for data in frames:
            send(self.transport, data)

    def notice(self, text: str) -> None:
        self.reply(events.Notice(text), None)

    def drop(self, reason: str) -> None:
        """Condemned: leave the chat with `reason` and close now."""
        log.info("dropping %s: %s", self.name, reason)
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
        self.notice("server shutting down")
        self._leave(None)  # everyone leaves at once: no quit storm for the last seconds
        transport.close("server shutting down", deadline)

    # --- serving ------------------------------------------------------------------------------

    def _leave(self, quit_reason: Optional[str]) -> None:
        user, self.user = self.user, None
        if user is not None:
            self.door.hub.leave(user, quit_reason)

    def _close(self, quit_reason: Optional[str], detail: str) -> None:
        """Leave the chat now; send what is queued, then close."""
        self._leave(quit_reason)
        self.transport.close(detail)

    def _serve(self) -> None:
        """Serve the complete frames buffered, in order, until our output is too full.

        The check between requests is the backpressure: one read can hold hundreds of requests,
        and their answers must not pile up past max_outbuf before the client could read any.
        What is left waits in the decoder until the client has read its answers.
        """
        decoder = self.decoder
        transport = self.transport
        while transport.state is State.OPEN:
            if self.doomed:
                return
            if transport.congested:
                transport.wait_for_drain()
                return
            try:
                payload = decoder.next_frame()
            except codec.FrameError as exc:
                log.info("protocol error from %s: %s", self.name, exc.message)
                self.send_error(exc.code, exc.message, None)
                self._close("protocol error", exc.message)
                return
            if payload is None:
                if transport.eof:  # the peer has closed its side: nothing more will come
                    if decoder.buffered:
                        self._leave("connection closed")
                        transport.abort("peer closed mid-frame")
                    else:
                        self._close("connection closed", "peer closed")
                return
            self._on_frame(payload)

    def _on_frame(self, payload: bytes) -> None:
        door = self.door
        bucket = self.bucket
        if bucket is not None and (b'"pong"' not in payload or not _is_pong(payload)):
            verdict = bucket.take(door.reactor.now)
            if verdict is not ALLOW:
                if verdict is DISCONNECT:
                    log.info("excess flood from %s", self.name)
                    self.send_error("rate_limited", "excess flood: disconnecting", self._ref_of(payload))
                    self._close("excess flood", "excess flood")
                else:
                    self.send_error("rate_limited", "too many requests: slow down", self._ref_of(payload))
                return
        try:
            obj = codec.decode(payload)
        except codec.PayloadError as exc:
            self.send_error(exc.code, exc.message, None)
            return
        try:
            request, ref = door.parser.parse(obj, registered=self.user is not None)
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message, exc.ref)
            return
        user = self.user
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
        try:
            door.hub.handle(user, request, ref)  # type: ignore[arg-type]
        except ChatError as exc:
            self.send_error(exc.code, exc.message, ref)

    def _hello(self, request: Hello, ref: Ref) -> None:
        door = self.door
        if door.password is not None and not _password_matches(door.password, request.password):
            log.info("bad password from %s", self.transport.peer)
            self.send_error("bad_password", "wrong or missing password", ref)
            self._close(None, "bad password")
            return
        try:
            self.user = door.hub.register(request.nick, self, ref, door="framed")
        except ChatError as exc:
            self.send_error(exc.code, exc.message, ref)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if door.rate > 0:
            self.bucket = TokenBucket(door.reactor.now, door.rate, door.burst)
        log.info("registered: %s as %s (client %r)", self.transport.peer, request.nick, request.client)

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

    def _idle_check(self, _: Any = None) -> None:
        """One timer per connection, re-armed from `last_seen`; no per-frame timer work."""
        self._idle_timer = None
        transport = self.transport
        if transport.state is not State.OPEN:
            return
        door = self.door
        now = door.reactor.now
        silence = now - self.last_seen
        if silence >= door.ping_timeout:
            self._leave("ping timeout")
            transport.abort("ping timeout")
            return
        if silence >= door.ping_interval:
            if not self.pinged:
                self.pinged = True
                self.reply(events.Ping(f"{int(now * 1000)}"), None)
            when = self.last_seen + door.ping_timeout
        else:
            when = self.last_seen + door.ping_interval
        self._idle_timer = door.reactor.call_at(when, self._idle_check)


def _is_pong(payload: bytes) -> bool:
    """Pongs are exempt from flood control; only frames that mention one are decoded here."""
    try:
        return codec.decode(payload).get("type") == "pong"
    except codec.PayloadError:
        return False
