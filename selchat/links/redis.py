"""A link to one Redis server, living in the reactor like any socket: no thread, no blocking call.

Two TCP connections, both non-blocking and watched by the reactor's selector:

  * the command connection: commands are pipelined (every command queued during a pass goes
    out in one send at the end of the pass) and each reply goes to its command's callback, in
    the order sent, because Redis answers one connection in order;
  * the pub/sub connection: SUBSCRIBE/PSUBSCRIBE, and the messages that follow, to
    `on_message(channel, data, pattern)`.

States (`state`, `on_state(state)`, and one log line per change):

    CONNECTING --both handshakes answered--> UP --any failure--> DOWN --backoff--> CONNECTING
    any state --close()--> CLOSED

A handshake is, on the command connection, AUTH (when the URL has a password), SELECT (when
it names a database) and SCRIPT LOAD of every script added; on the pub/sub connection, AUTH
and the subscription of every channel and pattern wanted. `on_up()` runs only once all of
them are answered: a follower that reads what it missed from inside `on_up` is already
subscribed, so nothing published meanwhile can fall between the read and the live messages
(it may come twice, once each way: the follower drops what it has by offset).

Every callback is called exactly once, from the loop, never from inside `execute`:
  * with the reply (bytes, int, None, a list; an error reply is a `ReplyError` value);
  * with `Unavailable` (a `ReplyError` too), at once (the next next-pass step) when the link is
    not UP, when the outgoing buffer would pass `max_outbuf` bytes or `max_pending` commands
    are unanswered (the buffer's fate when full: refuse the newcomer, keep what was accepted);
  * with `Unavailable` when the connection drops with the command unanswered, every pending
    command in sending order. `sent` says whether its bytes had reached the kernel: if not,
    Redis certainly never ran it; if so, it may have run (a reply lost with the connection).
A connection drops on a socket error, on EOF, on bytes that are not RESP, when the oldest
unanswered command has waited `reply_timeout` seconds (a stalled Redis), or when a handshake
command fails. An idle connection sends PING every `ping_interval` seconds so a stall is seen
even when nothing is asked. Reconnection waits a capped exponential backoff with jitter
(`backoff_min` doubling up to `backoff_max`, each wait drawn from its upper half), reset when
the link is UP again.

The host name of the URL is resolved once, when the link is made (at start-up): a reconnect
never waits on DNS.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import ipaddress
import logging
import random
import selectors
import socket
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Sequence, Set, Tuple
from urllib.parse import unquote, urlsplit

from selchat.links.resp import Arg, ReplyError, ReplyReader, RespProtocolError, encode_command
from selchat.loop.reactor import ORDER_WRITE, Reactor
from selchat.loop.timers import Timer

log = logging.getLogger(__name__)

Callback = Callable[[Any], None]
MessageCallback = Callable[[bytes, bytes, Optional[bytes]], None]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE
READ_SIZE = 65536
READS_PER_PASS = 4  # reads of one connection per readiness, so one busy link cannot hog a pass


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # sockets connecting or handshakes under way; commands refused
    UP = "up"  # both handshakes answered: commands flow, subscriptions confirmed
    DOWN = "down"  # no connection; a reconnect is timed
    CLOSED = "closed"  # close() was called; nothing more will happen


class Unavailable(ReplyError):
    """The link could not carry a command: refused at once, or lost with a connection.

    `sent` is False when Redis never got the command (it certainly did not run), True when its
    bytes had left for Redis before the connection dropped (it may have run)."""

    def __init__(self, reason: str, sent: bool = False) -> None:
        super().__init__(f"unavailable: {reason}")
        self.reason = reason
        self.sent = sent


class RedisAddress:
    """What a `redis://[[user]:password@]host[:port][/db]` URL says."""

    __slots__ = ("host", "port", "db", "username", "password", "family", "sockaddr")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"a Redis URL starts with redis:// (not {parts.scheme or url!r})")
        if parts.query or parts.fragment:
            raise ValueError("a Redis URL has no query or fragment here")
        if not parts.hostname:
            raise ValueError("a Redis URL names a host")
        self.host = parts.hostname
        self.port = parts.port or 6379
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a Redis URL is a number, not {path!r}")
        self.db = int(path) if path else 0
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        if self.password is None and self.username is not None:  # redis://secret@host
            self.password, self.username = self.username, None
        self.family, self.sockaddr = _resolve(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.db}"


def _resolve(host: str, port: int) -> Tuple[int, Tuple[Any, ...]]:
    """Once, at start-up: a literal address as it is, a name through the resolver."""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:  # (socket.gaierror: no such name, no resolver)
            raise ValueError(f"the host {host!r} does not resolve: {exc.strerror or exc}") from None
        if not infos:
            raise ValueError(f"the host {host!r} does not resolve") from None
        return infos[0][0], infos[0][4]
    if ip.version == 6:
        return socket.AF_INET6, (str(ip), port, 0, 0)
    return socket.AF_INET, (str(ip), port)


class _Conn:
    """One socket to Redis: a non-blocking connect, bytes out in order, replies in order."""

    __slots__ = ("link", "pubsub", "sock", "reader", "out", "queued", "written", "pending",
                 "head_since", "connecting", "mask", "dirty", "ready")

    def __init__(self, link: "RedisLink", pubsub: bool) -> None:
        self.link = link
        self.pubsub = pubsub
        self.sock: Optional[socket.socket] = None
        self.reader = ReplyReader(link.max_reply)
        self.out = bytearray()  # queued, not yet taken by the kernel
        self.queued = 0  # bytes ever queued on this connection
        self.written = 0  # bytes ever taken by the kernel
        # Unanswered commands in sending order: (callback, `queued` after its bytes).
        self.pending: Deque[Tuple[Optional[Callback], int]] = deque()
        self.head_since = link.reactor.now  # last reply, or when `pending` stopped being empty
        self.connecting = True
        self.mask = 0
        self.dirty = False
        self.ready = False  # the handshake is answered

    def open(self) -> None:
        link = self.link
        sock = socket.socket(link.address.family, socket.SOCK_STREAM)
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        err = sock.connect_ex(link.address.sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(err, errno.errorcode.get(err, str(err)))
        self.mask = EVENT_WRITE
        link.reactor.register(sock, EVENT_WRITE, self.on_ready)

    def shut(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            self.link.reactor.unregister(sock)
        except (KeyError, ValueError, OSError, RuntimeError):  # selector closed at shutdown
            pass
        sock.close()
        self.out = bytearray()

    def queue(self, data: bytes, done: Optional[Callback]) -> None:
        if not self.pending:
            self.head_since = self.link.reactor.now
        self.out += data
        self.queued += len(data)
        self.pending.append((done, self.queued))
        if not self.dirty:
            self.dirty = True
            self.link._dirty.append(self)

    def on_ready(self, mask: int) -> None:
        if self.sock is None:
            return
        if self.connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.link._drop(f"cannot connect ({errno.errorcode.get(err, err)})")
                return
            self.connecting = False
            self.flush()
            return
        if mask & EVENT_READ:
            self.link._read(self)
        if mask & EVENT_WRITE and self.sock is not None:
            self.flush()

    def flush(self) -> None:
        """Hand the kernel what it takes; watch for writability only while bytes wait."""
        self.dirty = False
        sock = self.sock
        if sock is None or self.connecting:
            return
        if self.out:
            try:
                sent = sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.link._drop(f"write failed ({exc.strerror or exc})")
                return
            del self.out[:sent]
            self.written += sent
        mask = EVENT_READ | EVENT_WRITE if self.out else EVENT_READ
        if mask != self.mask:
            self.mask = mask
            self.link.reactor.modify(sock, mask, self.on_ready)


class RedisLink:
    """Commands and subscriptions to the Redis at `url`, from the reactor's loop."""

    def __init__(self, reactor: Reactor, url: str, *,
                 on_state: Optional[Callable[[LinkState], None]] = None,
                 on_up: Optional[Callable[[], None]] = None,
                 on_message: Optional[MessageCallback] = None,
                 max_outbuf: int = 1 << 20, max_pending: int = 10000,
                 max_reply: int = 64 << 20, reply_timeout: float = 5.0,
                 ping_interval: float = 1.0, backoff_min: float = 0.05,
                 backoff_max: float = 5.0, name: str = "redis") -> None:
        if max_outbuf < 1 or max_pending < 1 or reply_timeout <= 0 or ping_interval <= 0:
            raise ValueError("max_outbuf, max_pending, reply_timeout and ping_interval are positive")
        if not 0 < backoff_min <= backoff_max:
            raise ValueError("0 < backoff_min <= backoff_max")
        self.reactor = reactor
        self.address = RedisAddress(url)
        self.db = self.address.db
        self.on_state = on_state
        self.on_up = on_up
        self.on_message = on_message
        self.max_outbuf = max_outbuf
        self.max_pending = max_pending
        self.max_reply = max_reply
        self.reply_timeout = reply_timeout
        self.ping_interval = ping_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.name = f"{name} {self.address}"
        self.state = LinkState.DOWN
        self.channels: Set[bytes] = set()  # wanted; confirmed ones are in `subscribed`
        self.patterns: Set[bytes] = set()
        self.subscribed: Set[bytes] = set()  # channels and patterns Redis confirmed
        self.scripts: List[bytes] = []  # Lua sources loaded at every connection
        self.failures = 0  # connections lost or refused in a row (the backoff's exponent)
        self.attempts = 0  # connections tried, in all
        self.refused = 0  # commands answered Unavailable, in all
        self._cmd: Optional[_Conn] = None
        self._sub: Optional[_Conn] = None
        self._dirty: List[_Conn] = []
        self._retry: Optional[Timer] = None
        self._tick: Optional[Timer] = None
        self._random = random.Random()
        reactor.add_before_sleep(self._flush, ORDER_WRITE)
        self._retry = reactor.call_later(0, self._connect)  # from the loop, after construction

    # --- the caller's side ------------------------------------------------------------------

    def execute(self, *args: Arg, done: Optional[Callback] = None) -> bool:
        """Send one command; `done(reply)` later. False when refused (then `done` gets
        `Unavailable` in this pass's next-pass step)."""
        data = encode_command(*args)
        conn = self._cmd
        why = ""
        if self.state is not LinkState.UP or conn is None:
            why = f"link {self.state.value}"
        elif len(conn.pending) >= self.max_pending:
            why = f"{self.max_pending} commands unanswered"
        elif len(conn.out) + len(data) > self.max_outbuf:
            why = f"outgoing buffer full ({self.max_outbuf} bytes)"
        if why:
            if done is not None:
                self.reactor.call_soon(self._answer, done, Unavailable(why))
            return False
        assert conn is not None
        conn.queue(data, done)
        return True

    def add_script(self, source: bytes) -> str:
        """Load a Lua script at every connection, before UP; returns its SHA1 for EVALSHA."""
        if source not in self.scripts:
            self.scripts.append(source)
            if self._cmd is not None:  # connecting or up: loaded before any later EVALSHA
                self._cmd.queue(encode_command("SCRIPT", "LOAD", source), None)
        return hashlib.sha1(source).hexdigest()

    def subscribe(self, *channels: Arg) -> None:
        self._subscribe(b"SUBSCRIBE", self.channels, channels)

    def psubscribe(self, *patterns: Arg) -> None:
        self._subscribe(b"PSUBSCRIBE", self.patterns, patterns)

    def unsubscribe(self, *channels: Arg) -> None:
        self._subscribe(b"UNSUBSCRIBE", self.channels, channels, drop=True)

    def punsubscribe(self, *patterns: Arg) -> None:
        self._subscribe(b"PUNSUBSCRIBE", self.patterns, patterns, drop=True)

    @property
    def pending(self) -> int:
        """Commands accepted and not yet answered."""
        return len(self._cmd.pending) if self._cmd is not None else 0

    def flush_now(self) -> None:
        """Send what is queued at once (a server stopping sends its last commands before
        `close`; best effort: what the kernel does not take now is not sent)."""
        self._flush()

    def close(self) -> None:
        """Fail what is unanswered (Unavailable, at once), close both sockets, stop timers.
        (The before-sleep hook stays in the reactor, which has no removal; it does nothing.)"""
        if self.state is LinkState.CLOSED:
            return
        lost = self._shut_both()
        self._set_state(LinkState.CLOSED, "closed")
        self._fail(lost, "link closed")

    # --- connections ------------------------------------------------------------------------

    def _connect(self, _: Any = None) -> None:
        self._retry = None
        if self.state is LinkState.CLOSED:
            return
        self.attempts += 1
        word = "connecting" if self.attempts == 1 else f"reconnecting (attempt {self.attempts})"
        self._set_state(LinkState.CONNECTING, word)
        cmd, sub = _Conn(self, pubsub=False), _Conn(self, pubsub=True)
        self._cmd, self._sub = cmd, sub
        address = self.address
        setup: List[Sequence[Arg]] = []
        if address.password is not None:
            setup.append(("AUTH", address.password) if address.username is None
                         else ("AUTH", address.username, address.password))
        for args in setup:
            cmd.queue(encode_command(*args), self._handshake(cmd, "AUTH"))
            sub.queue(encode_command(*args), self._handshake(sub, "AUTH"))
        if address.db:
            cmd.queue(encode_command("SELECT", address.db), self._handshake(cmd, f"SELECT {address.db}"))
        for source in self.scripts:
            cmd.queue(encode_command("SCRIPT", "LOAD", source), self._handshake(cmd, "SCRIPT LOAD"))
        cmd.queue(encode_command("PING"), self._handshake(cmd, "PING", last=True))
        for verb, names in ((b"SUBSCRIBE", self.channels), (b"PSUBSCRIBE", self.patterns)):
            if names:
                ordered = sorted(names)
                sub.queue(encode_command(verb, *ordered), self._confirm)
                for _ in ordered[1:]:  # one confirmation a name; the first took the entry above
                    sub.pending.append((self._confirm, sub.queued))
        sub.queue(encode_command("PING"), self._handshake(sub, "PING", last=True))
        try:
            cmd.open()
            sub.open()
        except OSError as exc:
            self._drop(f"cannot connect ({exc.strerror or exc})")
            return
        self._arm_tick()

    def _handshake(self, conn: _Conn, what: str, last: bool = False) -> Callback:
        def done(reply: Any) -> None:
            if isinstance(reply, ReplyError):
                self._drop(f"{what} refused: {reply}")
            elif last:
                conn.ready = True
                self._maybe_up()
        done._internal = True  # type: ignore[attr-defined]
        return done

    def _maybe_up(self) -> None:
        """UP once both handshakes are answered and no subscription waits for its
        confirmation (those asked for while connecting included)."""
        sub = self._sub
        if (self.state is LinkState.CONNECTING and self._cmd is not None and self._cmd.ready
                and sub is not None and sub.ready
                and not any(done == self._confirm for done, _ in sub.pending)):
            self.failures = 0
            self._set_state(LinkState.UP, f"up ({len(self.subscribed)} subscription(s) confirmed)")
            if self.on_up is not None and self.state is LinkState.UP:
                try:
                    self.on_up()
                except Exception:
                    log.exception("%s: on_up failed; the link goes on", self.name)

    def _subscribe(self, verb: bytes, wanted: Set[bytes], names: Sequence[Arg], drop: bool = False) -> None:
        if not names:
            raise ValueError("name at least one channel or pattern")
        raw = [n if isinstance(n, bytes) else str(n).encode() for n in names]
        for name in raw:
            (wanted.discard if drop else wanted.add)(name)
        sub = self._sub
        if sub is not None and sub.sock is not None:
            sub.queue(encode_command(verb, *raw), self._confirm)
            for _ in raw[1:]:
                sub.pending.append((self._confirm, sub.queued))

    def _confirm(self, reply: Any) -> None:
        if isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[0], bytes):
            kind = reply[0]
            if kind in (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe"):
                if kind.startswith(b"un") or kind.startswith(b"pun"):
                    self.subscribed.discard(reply[1])
                else:
                    self.subscribed.add(reply[1])
                if self.state is LinkState.CONNECTING:
                    self._maybe_up()
                return
        self._drop(f"a subscription answered {reply!r}")

    def _read(self, conn: _Conn) -> None:
        sock = conn.sock
        assert sock is not None
        for _ in range(READS_PER_PASS):
            try:
                data = sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(f"read failed ({exc.strerror or exc})")
                return
            if not data:
                self._drop("Redis closed the connection")
                return
            try:
                conn.reader.feed(data)
                for reply in conn.reader.replies():
                    if conn.pubsub and type(reply) is list and reply and reply[0] in (b"message", b"pmessage"):
                        self._deliver(reply)
                    elif not conn.pending:
                        self._drop("Redis sent a reply nobody asked for")
                        return
                    else:
                        done = conn.pending.popleft()[0]
                        conn.head_since = self.reactor.now
                        if done is not None:
                            self._answer(done, reply)
                    if conn.sock is None:
                        return  # a callback dropped or closed the link
            except RespProtocolError as exc:
                self._drop(f"protocol error ({exc})")
                return
            if len(data) < READ_SIZE:
                break

    def _deliver(self, reply: List[Any]) -> None:
        if self.on_message is None:
            return
        try:
            if reply[0] == b"message" and len(reply) == 3:
                self.on_message(reply[1], reply[2], None)
            elif len(reply) == 4:
                self.on_message(reply[2], reply[3], reply[1])
        except Exception:
            log.exception("%s: on_message failed; the link goes on", self.name)

    def _answer(self, done: Callback, reply: Any) -> None:
        if isinstance(reply, Unavailable):
            self.refused += 1
        try:
            done(reply)
        except Exception:
            log.exception("%s: a command's callback failed; the link goes on", self.name)

    def _flush(self) -> None:
        """Before sleep: what this pass queued leaves in one send a connection (pipelining)."""
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for conn in dirty:
                if conn.dirty:
                    conn.flush()

    # --- failure and time -----------------------------------------------------------------

    def _shut_both(self) -> List[Tuple[Callback, bool]]:
        """Close both connections; return the user callbacks left unanswered, in order."""
        lost: List[Tuple[Callback, bool]] = []
        for conn in (self._cmd, self._sub):
            if conn is None:
                continue
            written = conn.written
            user = not conn.pubsub
            for done, end in conn.pending:
                if user and done is not None and not getattr(done, "_internal", False):
                    lost.append((done, end <= written))
            conn.pending.clear()
            conn.shut()
        self._cmd = self._sub = None
        self._dirty = []
        self.subscribed.clear()
        for timer in (self._tick, self._retry):
            if timer is not None:
                timer.cancel()
        self._tick = self._retry = None
        return lost

    def _drop(self, reason: str) -> None:
        """One failure path: both connections go, every unanswered command fails, retry later."""
        if self.state is LinkState.CLOSED or self.state is LinkState.DOWN:
            return
        lost = self._shut_both()
        self.failures += 1
        delay = min(self.backoff_max, self.backoff_min * 2 ** min(self.failures - 1, 30))
        delay *= self._random.uniform(0.5, 1.0)
        self._retry = self.reactor.call_later(delay, self._connect)
        failed = f"; {len(lost)} command(s) failed unavailable" if lost else ""
        self._set_state(LinkState.DOWN, f"down ({reason}){failed}; reconnect in {delay:.2f} s",
                        level=logging.WARNING)
        self._fail(lost, reason)

    def _fail(self, lost: List[Tuple[Callback, bool]], reason: str) -> None:
        for done, sent in lost:
            self._answer(done, Unavailable(reason, sent=sent))

    def _set_state(self, state: LinkState, line: str, level: int = logging.INFO) -> None:
        self.state = state
        log.log(level, "%s: %s", self.name, line)
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("%s: on_state failed; the link goes on", self.name)

    def _arm_tick(self) -> None:
        interval = min(self.ping_interval, self.reply_timeout / 4)
        self._tick = self.reactor.call_later(interval, self._on_tick)

    def _on_tick(self, _: Any = None) -> None:
        """Deadlines (connect, handshake, replies) and pings on idle connections."""
        self._tick = None
        now = self.reactor.now
        for conn in (self._cmd, self._sub):
            if conn is None:
                return
            if conn.pending and now - conn.head_since > self.reply_timeout:
                what = "connect" if conn.connecting else "reply"
                self._drop(f"no {what} from Redis in {self.reply_timeout:g} s")
                return
            if (self.state is LinkState.UP and not conn.pending
                    and now - conn.head_since >= self.ping_interval):
                conn.queue(encode_command("PING"), _ignore)
        self._arm_tick()


def _ignore(reply: Any) -> None:
    """An internal command's callback (a liveness PING): its reply only proves the link lives."""


_ignore._internal = True  # type: ignore[attr-defined]
