"""Listening sockets: accept without starving anyone, pause when out of file descriptors.

Also the admission count shared by every door: connections in all and per address; and the
gate a connection from a trusted proxy passes first, where its PROXY protocol header (if it
sends one) is read to learn the client's own address.

Whatever repeats at the rate of connection attempts (failed accepts, refusals) is logged once
per period with a count (`selchat.loop.ratelog`): an attacker must not be able to fill the log.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
from typing import Any, Callable, Dict, Optional, Tuple

from selchat.defaults import ACCEPT_PAUSE, ACCEPT_PER_PASS, LISTEN_BACKLOG
from selchat.loop import proxyproto, ratelog
from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer

log = logging.getLogger("selchat.server")

_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def bind(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket; raises OSError with the system's reason."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# What a connection sent before it was accepted is taken to have come at most this long ago
# (a stall's backlog, as the soak's 4 s stops make, is still spread over the stall).
BACKLOG_CREDIT = 10.0


class Listener:
    """Accepts up to ACCEPT_PER_PASS connections a pass and hands each to `on_accept`."""

    __slots__ = ("reactor", "sock", "address", "on_accept", "_registered", "_short", "_closed",
                 "ratelog", "empty_since", "_held", "arrived_after")

    def __init__(self, reactor: Reactor, sock: socket.socket,
                 on_accept: Callable[[socket.socket, Any], None]) -> None:
        self.reactor = reactor
        self.sock = sock
        self.address: Tuple[str, int] = sock.getsockname()[:2]
        self.on_accept = on_accept
        self._registered = False
        self._short = False  # out of descriptors: one warning per shortage, not per retry
        self._closed = False
        self.ratelog = ratelog.shared(log)
        self.ratelog.attach(reactor.call_later, lambda: reactor.now)
        # For flood control, what a transport's `unread_since` is when it starts: the
        # connection being handed over (and what its peer sent) came after `arrived_after`.
        # As for a transport: after the accept queue was last found empty (`empty_since`),
        # and after the previous pass's ready list unless the queue was left with more
        # (a pass's share of accepts taken, or accepts paused).
        self.empty_since = reactor.now
        self._held = False
        self.arrived_after = reactor.now
        self._register()

    def _register(self) -> None:
        if not self._registered and not self._closed:
            self.reactor.register(self.sock, selectors.EVENT_READ, self._on_ready)
            self._registered = True

    def _on_ready(self, mask: int) -> None:
        reactor = self.reactor
        since = self.empty_since if self._held else max(self.empty_since, reactor.prev_listed_at)
        # But no more than BACKLOG_CREDIT back: after a long shortage of descriptors (accepts
        # paused) the queue was last empty long ago, and a connection's first read would be
        # spread over all of it.
        self.arrived_after = max(since, reactor.now - BACKLOG_CREDIT)
        self._held = True  # unless the queue is found empty below
        for _ in range(ACCEPT_PER_PASS):
            before = reactor.clock()
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.empty_since = before
                self._held = False
                return
            except OSError as exc:
                if exc.errno in _SHORTAGE:
                    # One warning per shortage, and shortages that come and go as fast as
                    # connections close are one warning per period.
                    if self._short:
                        log.debug("accept failed (%s): still short", exc.strerror)
                    else:
                        self.ratelog.log(logging.WARNING, "accept short",
                                         "accept failed (%s): pausing accepts for %.1fs",
                                         exc.strerror, ACCEPT_PAUSE)
                    self._short = True
                    self._pause()
                    return
                # e.g. the peer gave up before we got to it
                self.ratelog.log(logging.INFO, ("accept failed", exc.errno), "accept failed: %s", exc)
                continue
            if self._short:
                self._short = False
                self.ratelog.log(logging.WARNING, "accepting again", "accepting again")
            self.on_accept(sock, addr)

    def _pause(self) -> None:
        self._held = True
        if self._registered:
            self.reactor.unregister(self.sock)
            self._registered = False
            self.reactor.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self, _: Any = None) -> None:
        self._register()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._registered:
            self.reactor.unregister(self.sock)
            self._registered = False
        self.sock.close()


class ProxyGate:
    """A new connection from a trusted proxy, until its PROXY header has been read.

    The header is taken off the socket and nothing more: the bytes are looked at with
    MSG_PEEK, and only those known to be header are read (all of a header's start, which
    cannot hold a client's byte, or exactly the header once it is whole), so that what the
    client sent behind it, TLS included, is still in the kernel for the transport to read.
    A connection that sends something else first has no header (a trusted address may also
    connect directly); a start read then is handed on as `initial` bytes (only a plain
    stream can start that way: a TLS ClientHello never begins like a header).

    `done(sock, source, initial)` gets the client's address (None: the connection's own);
    `failed(sock, why)` a connection that broke the header, closed, or took too long.
    """

    __slots__ = ("reactor", "sock", "done", "failed", "buffer", "timer", "finished")

    def __init__(self, reactor: Reactor, sock: socket.socket, timeout: float,
                 done: Callable[[socket.socket, Optional[Tuple[str, int]], bytes], None],
                 failed: Callable[[socket.socket, str], None]) -> None:
        self.reactor = reactor
        self.sock = sock
        self.done = done
        self.failed = failed
        self.buffer = b""
        self.finished = False
        self.timer: Optional[Timer] = reactor.call_later(timeout, self._too_late)
        reactor.register(sock, selectors.EVENT_READ, self._on_ready)

    def _on_ready(self, mask: int) -> None:
        sock = self.sock
        try:
            peeked = sock.recv(proxyproto.HEADER_MAX - len(self.buffer), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(f"read failed: {exc.strerror or exc}")
            return
        if not peeked:
            self._fail("closed before its PROXY header")
            return
        data = self.buffer + peeked
        try:
            result = proxyproto.parse(data)
        except proxyproto.ProxyError as exc:
            self._fail(str(exc))
            return
        try:
            if result is proxyproto.NEED_MORE:
                if len(data) >= proxyproto.HEADER_MAX:
                    self._fail("PROXY header too long")
                    return
                self.buffer += sock.recv(len(peeked))  # all of it is the header's start
                return
            if result is proxyproto.NOT_PROXY:
                self._finish(None, self.buffer)
                return
            assert isinstance(result, proxyproto.ProxyHeader)
            rest = result.length - len(self.buffer)
            taken = sock.recv(rest) if rest > 0 else b""
        except OSError as exc:
            self._fail(f"read failed: {exc.strerror or exc}")
            return
        if len(taken) != rest:  # (the kernel had them a moment ago)
            self._fail("PROXY header cut short")
            return
        self._finish(result.source, b"")

    def _stop(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            self.reactor.unregister(self.sock)
        except (KeyError, ValueError):
            pass

    def _finish(self, source: Optional[Tuple[str, int]], initial: bytes) -> None:
        self._stop()
        self.done(self.sock, source, initial)

    def _fail(self, why: str) -> None:
        self._stop()
        self.failed(self.sock, why)

    def _too_late(self, _: Any = None) -> None:
        self.timer = None
        if not self.finished:
            self._fail("no PROXY header in time")

    def close(self) -> None:
        """The server stops: the connection goes without a word."""
        if not self.finished:
            self._stop()
            self.sock.close()


class Admission:
    """Counts connections against --max-clients and --max-per-ip, for every door at once.

    A connection through a trusted proxy whose client is not known yet (the web door learns
    it from each request's forwarded headers) is counted in all at once (`admit(None)`) and
    against its client's address once that is known (`claim`, and `unclaim` when a later
    request names another).
    """

    __slots__ = ("max_clients", "max_per_ip", "count", "per_ip")

    def __init__(self, max_clients: int, max_per_ip: int) -> None:
        self.max_clients = max_clients
        self.max_per_ip = max_per_ip
        self.count = 0
        self.per_ip: Dict[str, int] = {}

    def log_refusal(self, peer: str, reason: str) -> None:
        """Say that `peer` was refused for `reason`: once per reason and period, with a count."""
        ratelog.shared(log).log(logging.WARNING, ("refusing", reason), "refusing %s: %s",
                                peer, reason)

    def admit(self, ip: Optional[str]) -> Optional[str]:
        """None and the connection is counted, or the reason it is refused."""
        if self.count >= self.max_clients:
            return "server_full"
        if ip is not None:
            refused = self.claim(ip)
            if refused is not None:
                return refused
        self.count += 1
        return None

    def claim(self, ip: str) -> Optional[str]:
        """Count a connection admitted already against its client's address `ip` (None), or
        the reason it is refused (not counted)."""
        if self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
            return "too_many_connections"
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def unclaim(self, ip: str) -> None:
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]

    def release(self, ip: Optional[str]) -> None:
        """A counted connection is gone (`ip`: the address it was claimed for, if any)."""
        self.count -= 1
        if ip is not None:
            self.unclaim(ip)
