"""The web door: HTTP/1.1 for the page, a WebSocket at /ws for the chat (docs/web.md, "Server").

A connection starts as HTTP (`selchat.doors.web.http`, over h11): static files, errors, and at
most one upgrade. After the upgrade the h11 object is dropped and wsproto parses the client's
frames; each text message is one JSON object of the native protocol, served by the shared JSON
handling of `selchat.doors.jsonsession`, exactly as a framed payload is.

The wire format shared by every web session is "one unmasked WebSocket text frame holding the
JSON payload", so the fan-out encodes a room message once and queues the same bytes for every
web member, as it does for framed members.

Limits as the native door: a message over max_frame bytes closes the socket with status 1009
(as soon as that many bytes of it arrived, whatever the frames); a binary message gets `error`
`bad_json`; flood control counts every message and ping after `welcome`; a silent client is
pinged with a WebSocket ping frame (browsers answer it by themselves) and closed at the ping
timeout; one that never gets to `welcome` is closed at the handshake timeout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import FrameProtocol

from selchat.core import events
from selchat.core.events import Message
from selchat.doors.framed import codec
from selchat.doors.framed.protocol import Page, encode_event, message_frame
from selchat.doors.jsonsession import (
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    JsonDoor,
    JsonSession,
)
from selchat.doors.web.http import HttpConnection, Next, Site
from selchat.loop.transport import State, Transport

log = logging.getLogger("selchat.server")

__all__ = ["WebDoor", "WebSession", "WebWire"]

_SENDING = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class WebWire:
    """The web door's wire format: a JSON payload as one unmasked WebSocket text frame.

    The frames are made by wsproto's own `FrameProtocol`, one instance shared by every web
    session: on the server side and without extensions (we offer none, so no
    permessage-deflate), its output for a complete message depends on the payload alone (no
    mask, no compression context; the opcode it remembers for a fragmented message is reset
    by every final frame), so the same bytes are right for every connection. That is what lets
    the fan-out encode a room message once for all web members.
    """

    __slots__ = ("max_frame", "budget", "_proto")

    def __init__(self, max_frame: int, budget: Optional[int] = None) -> None:
        self.max_frame = max_frame
        # What one answer may take in all, as on the native port (a frame header here is at
        # most 10 bytes where a length prefix is 4: well inside the margin the budget keeps).
        self.budget = budget
        self._proto = FrameProtocol(client=False, extensions=[])

    def text_frame(self, payload: bytes) -> bytes:
        """One text frame holding `payload` (UTF-8 JSON)."""
        return bytes(self._proto.send_data(str(payload, "utf-8")))

    def _from_framed(self, framed: bytes) -> bytes:
        return self.text_frame(memoryview(framed)[codec.HEADER:])  # type: ignore[arg-type]

    def encode(self, event: events.Event) -> List[bytes]:
        return [self._from_framed(f) for f in encode_event(event, None, self.max_frame)]

    def message(self, msg: Message, ref: Any = None) -> bytes:
        return self._from_framed(message_frame(msg, self.max_frame, ref))

    def frames(self, event: events.Event, ref: Any, limits: Optional[Dict[str, Any]] = None) -> List[bytes]:
        """One session's own copy of `event`, with its `ref` (and the limits in a welcome)."""
        framed = encode_event(event, ref, self.max_frame, limits, self.budget)
        frames = [self._from_framed(f) for f in framed]
        return Page(frames, framed.rest) if type(framed) is Page else frames


@dataclass
class WebDoor(JsonDoor):
    """What every web session shares: the JSON door's rules, the site (files, origins), the wire."""

    site: Optional[Site] = None

    name = "web"

    def __post_init__(self) -> None:
        JsonDoor.__post_init__(self)
        if self.site is None:
            self.site = Site({})
        self.wire = WebWire(self.max_frame, self.answer_budget)

    def session(self, reject: Optional[str] = None) -> "WebSession":
        return WebSession(self, reject)


def _frame_header(payload: int) -> int:
    """Bytes of a client frame's header, its mask included, for a payload of that many bytes."""
    return 6 if payload < 126 else 8 if payload < 65536 else 14


def _control_frame(event: Any) -> int:
    """Bytes on the wire of a client's ping or pong (a control frame: 125 bytes at most)."""
    return 6 + len(event.payload)


class WebSession(JsonSession):
    """HTTP until the upgrade (`http`), then a WebSocket (`ws`); never both."""

    __slots__ = ("http", "ws", "parts", "size", "binary", "raw", "frame")

    def __init__(self, door: WebDoor, reject: Optional[str] = None) -> None:
        JsonSession.__init__(self, door, door.wire, reject)
        assert door.site is not None
        self.http: Optional[HttpConnection] = HttpConnection(door.site, reject)
        self.ws: Optional[Connection] = None
        self.parts: Optional[List[bytes]] = None  # a text message arriving in pieces
        self.size = 0  # bytes of the message arriving
        self.binary = False  # the message arriving is binary (its bytes are only counted)
        # Flood control finds when a request came by its offset in the bytes read (`consumed`,
        # `Arrivals`): here the bytes on the wire, headers and masks included, not the
        # payloads (counted short, a request would be charged at an earlier read's time).
        self.raw = 0  # bytes on the wire of the message arriving
        self.frame = 0  # payload bytes of the frame arriving

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        if self.http is not None:
            self.http.via = transport.via  # from a trusted proxy: each request names its client
        self._start_handshake_timer()  # the page, the upgrade and hello: all before it fires

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.door.reactor.now
        self.pinged = False
        self._arrived(len(data))
        ws = self.ws
        if ws is not None:
            ws.receive_data(data)
        else:
            assert self.http is not None
            self.http.receive(data)
        self._serve()

    def eof_received(self) -> None:
        ws = self.ws
        if ws is not None:
            if ws.state is not ConnectionState.CLOSED:
                ws.receive_data(None)  # wsproto's own word for it: a close with 1006
        elif self.http is not None:
            self.http.receive(b"")
        self._serve()

    def resume_serving(self) -> None:
        if not self._drained():  # (the rest of a cut answer first; it serves the others after)
            self._serve()

    def _release_input(self) -> None:
        self.http = None
        self.ws = None
        self.parts = None

    # --- the JSON session's hooks -------------------------------------------------------------

    def _goodbye(self, code: int, reason: str) -> None:
        ws = self.ws
        if ws is not None and ws.state in _SENDING:
            self.door.hub.fanout.send(self.transport, ws.send(CloseConnection(code, reason)))

    def _send_ping(self, token: str) -> None:
        ws = self.ws
        if ws is not None and ws.state is ConnectionState.OPEN:
            self.door.hub.fanout.send(self.transport, ws.send(Ping(token.encode("ascii"))))

    # --- serving ------------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.ws is None:
            self._serve_http()
        if self.ws is not None:
            self._serve_ws()

    def _serve_http(self) -> None:
        transport = self.transport
        http = self.http
        send = self.door.hub.fanout.send
        while http is not None and transport.state is State.OPEN:
            if transport.congested:
                transport.wait_for_drain()
                return
            step = http.step()
            if step.data:
                send(transport, step.data)
            if step.status >= 400:
                transport.log_info(f"http {step.status}: {step.detail}", "http %d to %s: %s",
                                   step.status, transport.peer, step.detail)
            kind = step.next
            if kind is Next.AGAIN:
                continue
            if kind is Next.NEED_DATA:
                if transport.eof:
                    transport.close("peer closed")
                return
            if kind is Next.CLOSE:
                transport.close(step.detail or "http done")
                return
            if self.reject is None:
                self.reject = http.refusal  # (a proxied client's address, refused at its request)
            self._upgraded(step.trailing)
            return

    def _upgraded(self, trailing: bytes) -> None:
        """The 101 is queued: from here on the bytes are WebSocket frames."""
        self.http = None  # its buffers and state machine are no longer needed
        self.ws = Connection(ConnectionType.SERVER)
        if self.arrivals is not None:
            self.consumed = self.arrivals.received - len(trailing)  # the upgrade's request
        log.debug("websocket open: %s", self.transport.peer)
        if self.reject is not None:
            self._refuse()
            return
        self._start_idle_timer()
        if trailing:
            self.ws.receive_data(trailing)
        if self.transport.eof:
            self.ws.receive_data(None)

    def _serve_ws(self) -> None:
        """Serve the messages buffered, in order, until our output is too full.

        Leaving wsproto's event generator half-way loses nothing: the frame parser lives on in
        the connection, and the next call takes up where this one stopped.
        """
        ws = self.ws
        transport = self.transport
        # wsproto cannot say whether a message waits without taking it: the pass's share is
        # counted after each message (for the next one), not before the first.
        if ws is None or not self._may_serve(self._unserved(), ready=False):
            return
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                self._on_data(event)  # type: ignore[arg-type]
            elif kind is Ping:
                self.consumed += _control_frame(event)
                if self._admit(b""):
                    self.door.hub.fanout.send(transport, ws.send(event.response()))  # type: ignore[union-attr]
            elif kind is Pong:  # (free: its bytes proved the peer alive when they arrived)
                self.consumed += _control_frame(event)
            elif kind is CloseConnection:
                self._on_close(event)  # type: ignore[arg-type]
            if not self._may_serve(self._unserved()):
                return  # wsproto keeps the rest (until welcome, the drain, the next pass...)

    def _unserved(self) -> int:
        """Bytes read and not served yet (wsproto holds them), as far as flood control's count
        tells; without flood control, more than a registration waiting its turn may hold."""
        if self.arrivals is None:
            return 3 * self.door.max_frame
        return self.arrivals.received - self.consumed

    def _on_data(self, event: Any) -> None:
        data = event.data
        if type(event) is TextMessage:
            chunk = data.encode("utf-8")  # wsproto checked it is UTF-8 and gives it as text
            self.frame += len(chunk)
        else:
            chunk = b""
            self.binary = True
            self.frame += len(data)
        if event.frame_finished:
            self.raw += _frame_header(self.frame) + self.frame
            self.frame = 0
        self.size += len(data) if self.binary else len(chunk)
        max_frame = self.door.max_frame
        if self.size > max_frame:
            self.transport.log_info("message over max_frame", "message over max_frame from %s", self.name)
            self._close("protocol error", f"message over max_frame ({max_frame} bytes)", CLOSE_TOO_BIG)
            return
        if not event.message_finished:
            if not self.binary:
                if self.parts is None:
                    self.parts = []
                self.parts.append(chunk)
            return
        parts, self.parts = self.parts, None
        binary, self.binary = self.binary, False
        self.size = 0
        raw, self.raw = self.raw, 0
        if binary:
            self.consumed += raw
            if self._admit(b""):
                self.send_error("bad_json", "binary message: send each JSON object as a text message", None)
            return
        if parts:
            parts.append(chunk)
            chunk = b"".join(parts)
        self.consumed += raw - len(chunk) - 4  # (`_on_payload` counts the payload and 4)
        self._on_payload(chunk)

    def _on_close(self, event: CloseConnection) -> None:
        ws = self.ws
        assert ws is not None
        if ws.state is ConnectionState.OPEN:
            # Not the peer's close: wsproto found a broken frame and names the code to close with.
            self.transport.log_info(f"websocket protocol error: {event.reason}",
                                    "websocket protocol error from %s: %s", self.name, event.reason)
            self._close("protocol error", event.reason or "protocol error",
                        event.code or CLOSE_PROTOCOL_ERROR)
            return
        if ws.state is ConnectionState.REMOTE_CLOSING:
            self.door.hub.fanout.send(self.transport, ws.send(event.response()))
        # The peer closed (or its stream ended: 1006): it is gone for the others too.
        self._leave("connection closed")
        self.transport.close("peer closed")
