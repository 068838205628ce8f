"""The client's socket: open it, send requests, receive events. Nothing about chat here.

`connect` is the one place a connection is opened. With TLS (--tls, --ca, --insecure) the app
builds one `ssl.SSLContext` (`security.make_tls_context`) and passes it in; the server's name is
checked against --host here. Everything above works on frames and does not care what carries them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Dict, Optional, Tuple

from selchat.doors.framed.codec import FrameDecoder, FrameError, PayloadError, decode, encode
from selchat.client.security import redact
from selchat.client.session import Pacer
from selchat.defaults import MAX_FRAME, RECV_SIZE

__all__ = ["Connection", "ConnectionClosed", "connect", "CONNECT_TIMEOUT"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds for TCP and TLS setup before we call it a failure


class ConnectionClosed(Exception):
    """The server closed the connection, or broke the framing so badly we had to."""


class Connection:
    """One framed connection over asyncio streams; the app keeps at most one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(MAX_FRAME)
        self.closed = False
        self.pacer = Pacer()  # the server's flood limit is per connection, so is our pacing

    def set_max_frame(self, max_frame: Any) -> None:
        """Follow the server's announced `limits.max_frame` (it may allow bigger frames)."""
        if isinstance(max_frame, int) and not isinstance(max_frame, bool) and max_frame >= MAX_FRAME:
            self._decoder.max_frame = max_frame

    def send(self, request: Dict[str, Any]) -> None:
        """Queue one request; `drain` waits until the kernel has taken it."""
        if self.closed:
            raise ConnectionClosed("connection is closed")
        log.debug("send %r", redact(request))  # never a password in the log
        self._writer.write(encode(request))

    async def send_paced(self, request: Dict[str, Any]) -> None:
        """Send a request once the flood limit allows it, and wait until the kernel has it.

        Everything but `pong` counts against the server's limit; pongs go through `send`.
        """
        delay = self.pacer.reserve(time.monotonic())
        if delay > 0:
            log.debug("pacing: %.3f s before the next request", delay)
            await asyncio.sleep(delay)
        self.send(request)
        await self.drain()

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self.closed = True
            raise ConnectionClosed(str(exc)) from exc

    async def recv(self) -> Tuple[Dict[str, Any], bytes]:
        """The next event and its raw payload; raises ConnectionClosed at the end of the stream.

        A payload that is not a JSON object is logged and skipped (the frame boundary still
        holds); a broken length prefix ends the connection, as the stream cannot be trusted.
        """
        while True:
            try:
                payload = self._decoder.next_frame()
            except FrameError as exc:
                log.warning("server broke the framing: %s", exc.message)
                await self.close()
                raise ConnectionClosed(f"server broke the framing ({exc.code})") from exc
            if payload is not None:
                try:
                    event = decode(payload)
                except PayloadError as exc:
                    log.warning("skipping a bad frame from the server: %s", exc.message)
                    continue
                log.debug("recv %r", event)
                return event, payload
            if self.closed:
                raise ConnectionClosed("connection is closed")
            try:
                data = await self._reader.read(RECV_SIZE)
            except (ConnectionError, OSError) as exc:
                self.closed = True
                raise ConnectionClosed(str(exc) or type(exc).__name__) from exc
            if not data:
                self.closed = True
                if self._decoder.buffered:
                    raise ConnectionClosed("connection closed in the middle of a frame")
                raise ConnectionClosed("connection closed")
            self._decoder.feed(data)

    async def close(self) -> None:
        self.closed = True
        try:
            self._writer.close()
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass


async def connect(
    host: str,
    port: int,
    *,
    ssl_context: Optional[ssl.SSLContext] = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Connection:
    """Open a connection; raises OSError (refused, unreachable, timed out) for the caller to
    report in one line.

    With `ssl_context` the TLS handshake happens here too, and the certificate must be valid for
    `host` (a name, or an IP address matched against the certificate's IP subjectAltName; an
    --insecure context checks nothing). A failed verification raises
    `ssl.SSLCertVerificationError`, any other TLS failure `ssl.SSLError`: both are OSErrors.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=ssl_context, server_hostname=host if ssl_context else None
            ),
            timeout,
        )
    except asyncio.TimeoutError:
        raise OSError(f"timed out after {timeout:g} s") from None
    return Connection(reader, writer)
