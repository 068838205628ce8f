"""The framed-JSON door: one session per connection, over a transport (docs/protocol.md).

The session cuts the stream into length-prefixed frames and hands each payload to the shared
JSON handling of `selchat.doors.jsonsession` (hello, password, flood control, ref echo, pings,
quit, the hub's requests). What is left here is the framing: a bad length prefix is a protocol
error that closes the connection, and a peer that closes mid-frame is simply gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from selchat.core import events
from selchat.core.events import Message
from selchat.doors.framed import codec
from selchat.doors.framed.protocol import encode_event, message_frame
from selchat.doors.jsonsession import REFUSALS, JsonDoor, JsonSession
from selchat.loop.transport import Transport

log = logging.getLogger("selchat.server")

__all__ = ["FramedDoor", "FramedSession", "FramedWire", "REFUSALS"]


class FramedWire:
    """The framed door's wire format: every framed session shares this one instance."""

    __slots__ = ("max_frame", "limits", "budget")

    def __init__(self, max_frame: int, limits: Dict[str, Any], budget: Optional[int] = None) -> None:
        self.max_frame = max_frame
        self.limits = limits
        self.budget = budget  # what one answer may take in all: it never drops a reading client

    def encode(self, event: events.Event) -> List[bytes]:
        return encode_event(event, None, self.max_frame)

    def message(self, msg: Message, ref: Any = None) -> bytes:
        return message_frame(msg, self.max_frame, ref)

    def frames(self, event: events.Event, ref: Any, limits: Optional[Dict[str, Any]] = None) -> List[bytes]:
        """One session's own copy of `event` (with its `ref`, and the limits in a welcome)."""
        return encode_event(event, ref, self.max_frame, limits, self.budget)


@dataclass
class FramedDoor(JsonDoor):
    """What every framed session shares."""

    name = "framed"

    def __post_init__(self) -> None:
        JsonDoor.__post_init__(self)
        self.wire = FramedWire(self.max_frame, self.limits, self.answer_budget)

    def session(self, reject: Optional[str] = None) -> "FramedSession":
        return FramedSession(self, reject)


class FramedSession(JsonSession):
    __slots__ = ("decoder",)

    def __init__(self, door: FramedDoor, reject: Optional[str] = None) -> None:
        JsonSession.__init__(self, door, door.wire, reject)
        self.decoder = codec.FrameDecoder(door.max_frame)

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self._start_handshake_timer()
        if self.reject is not None:
            # With TLS the words wait in the queue until the handshake is done.
            self._refuse()
            return
        self._start_idle_timer()

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.door.reactor.now
        self.pinged = False
        self._arrived(len(data))
        self.decoder.feed(data)
        self._serve()

    def eof_received(self) -> None:
        self._serve()

    def resume_serving(self) -> None:
        if self._drained():
            return  # (it serves what is buffered too, once the rest of an answer is sent)
        if self.decoder.buffered or self.transport.eof:
            self._serve()

    def _release_input(self) -> None:
        self.decoder.clear()

    # --- serving ------------------------------------------------------------------------------

    def _serve(self) -> None:
        """Serve the complete frames buffered, in order, while the serving rules allow
        (`DoorSession._may_serve`); what is left waits in the decoder."""
        decoder = self.decoder
        transport = self.transport
        while self._may_serve(decoder.buffered, decoder.ready):
            try:
                payload = decoder.next_frame()
            except codec.FrameError as exc:
                transport.log_info(f"protocol error: {exc.message}", "protocol error from %s: %s",
                                   self.name, exc.message)
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
            self._on_payload(payload)
