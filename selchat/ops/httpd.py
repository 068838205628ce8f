"""`GET /metrics` and `GET /healthz` on the metrics port, served by the server's own loop.

A small HTTP/1.1 server over the loop's transports, parsed by h11 as the web door is:
keep-alive (Prometheus keeps its connection), GET and HEAD only, requests small, a silent
connection closed after `IDLE` seconds, at most `MAX_CONNECTIONS` at once. It is meant for a
scraper on the same machine or network (the port listens on `--host`), not for the internet.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Dict, Optional

import h11
from prometheus_client import CONTENT_TYPE_LATEST

from selchat import SERVER_NAME
from selchat.loop.listener import Listener
from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer
from selchat.loop.transport import Transport, Writer

log = logging.getLogger("selchat.server")

MAX_CONNECTIONS = 16
IDLE = 30.0  # seconds a connection may stay silent (Prometheus scrapes every 15 s by default)
MAX_REQUEST = 8192  # bytes of a request head
OUTBUF = 1 << 22  # bytes queued for one scraper at most (the whole exposition, many times over)


class MetricsEndpoint:
    """The metrics port: a listener and its few connections, apart from the client doors."""

    def __init__(self, reactor: Reactor, writer: Writer, metrics: Any, sock: socket.socket) -> None:
        """`sock`: the metrics port, bound and listening (selchat.loop.listener.bind)."""
        self.reactor = reactor
        self.writer = writer
        self.metrics = metrics
        self.transports: Dict[int, Transport] = {}
        self.listener = Listener(reactor, sock, self._accept)
        self.address = self.listener.address

    def _accept(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        if len(self.transports) >= MAX_CONNECTIONS:
            sock.close()
            return
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        transport = Transport(self.reactor, self.writer, sock, peer, str(addr[0]), OUTBUF,
                              OUTBUF // 4, OUTBUF // 16)
        self.transports[transport.fd] = transport
        transport.on_closed = lambda t: self.transports.pop(t.fd, None)
        transport.start(MetricsSession(self))

    def close(self) -> None:
        self.listener.close()
        for transport in list(self.transports.values()):
            transport.abort("server stopped")


class MetricsSession:
    """One scraper's connection: requests in, the exposition or the health out."""

    __slots__ = ("endpoint", "transport", "conn", "request", "timer")

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: Optional[Transport] = None
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        self.request: Optional[h11.Request] = None
        self.timer: Optional[Timer] = None

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        self._arm()

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._arm()
        self._serve()

    def eof_received(self) -> None:
        self.conn.receive_data(b"")
        self._serve()

    def resume_serving(self) -> None:
        self._serve()

    def output_overflow(self) -> None:
        assert self.transport is not None
        self.transport.abort("metrics scraper does not read")

    def connection_lost(self, detail: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # --- serving ------------------------------------------------------------------------------

    def _arm(self) -> None:
        reactor = self.endpoint.reactor
        if self.timer is not None:
            self.timer.cancel()
        self.timer = reactor.call_later(IDLE, self._idle)

    def _idle(self, _: Any = None) -> None:
        self.timer = None
        if self.transport is not None and self.transport.open:
            self.transport.close("metrics connection idle")

    def _serve(self) -> None:
        transport = self.transport
        conn = self.conn
        while transport is not None and transport.open:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            if conn.our_state in (h11.MUST_CLOSE, h11.CLOSED):
                transport.close("metrics done")
                return
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._respond(exc.error_status_hint or 400, b"bad request\n", close=True)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if transport.eof:
                    transport.close("metrics peer closed")
                return
            kind = type(event)
            if kind is h11.Request:
                self.request = event  # type: ignore[assignment]
            elif kind is h11.EndOfMessage and self.request is not None:
                request, self.request = self.request, None
                self._answer(request)
            elif kind is h11.ConnectionClosed:
                transport.close("metrics peer closed")
                return

    def _answer(self, request: h11.Request) -> None:
        path = request.target.split(b"?", 1)[0]
        head = request.method == b"HEAD"
        if request.method not in (b"GET", b"HEAD"):
            self._respond(405, b"GET or HEAD\n", extra=[(b"allow", b"GET, HEAD")], head=head)
        elif path == b"/metrics":
            self._respond(200, self.endpoint.metrics.exposition(), CONTENT_TYPE_LATEST.encode(), head=head)
        elif path == b"/healthz":
            healthy, why = self.endpoint.metrics.health()
            self._respond(200 if healthy else 503, why.encode() + b"\n", head=head)
        else:
            self._respond(404, b"not found: try /metrics or /healthz\n", head=head)

    def _respond(self, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8",
                 extra: Any = (), head: bool = False, close: bool = False) -> None:
        transport = self.transport
        assert transport is not None
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), (b"server", SERVER_NAME.encode()), *extra]
        if close:
            headers.append((b"connection", b"close"))
        conn = self.conn
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if not head:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            transport.close("metrics protocol error")
            return
        transport.write(data)
        if close or conn.our_state is h11.MUST_CLOSE:
            transport.close("metrics done")
