"""Listening sockets: accept without starving anyone, pause when out of file descriptors.

Also the admission count shared by every door: connections in all and per address.

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
from selchat.loop import ratelog
from selchat.loop.reactor import Reactor

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


class Admission:
    """Counts connections against --max-clients and --max-per-ip, for every door at once."""

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

    def admit(self, ip: str) -> Optional[str]:
        """None and the connection is counted, or the reason it is refused."""
        if self.count >= self.max_clients:
            return "server_full"
        if self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
            return "too_many_connections"
        self.count += 1
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return None

    def release(self, ip: str) -> None:
        self.count -= 1
        left = self.per_ip[ip] - 1
        if left:
            self.per_ip[ip] = left
        else:
            del self.per_ip[ip]
