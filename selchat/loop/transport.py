"""A stream connection: bytes in to a session, bytes out from a queue, one lifecycle.

The transport moves bytes; the session (a wire protocol: framed JSON, IRC, ...) gives them
meaning. In the spirit of asyncio's transport/protocol pair, the session gets
`connection_made`, `data_received`, `eof_received`, `resume_serving`, `output_overflow` and
`connection_lost`, and calls `write`, `close`, `abort` and `wait_for_drain`.

Lifecycle (every transition is a method of this class; `_closed` is the one teardown path):

    HANDSHAKING --handshake done--> OPEN --close()--> CLOSING --all sent--> LINGERING --> CLOSED
         (TLS only)                   \\__________________ abort(), I/O error, deadline _____/

Flags, one meaning each:
  * `accepting`: output may still be queued (false once overflowed, lingering or closed);
  * `throttled`: our queue for the peer passed the high-water mark, so its input waits
    (backpressure) until the queue drains below the low-water mark;
  * `paused`: the session asked to read nothing for now (IRC's fake lag);
  * `eof`: the peer has shut down its sending side;
  * `dirty`: the transport is in the writer's list for this pass.

Invariants: nothing blocks (non-blocking sockets, readiness from the selector); bytes leave
in the order queued; the selector is asked for writability only while bytes are pending;
a closed transport holds no buffer, no timer and no place in any list of the loop.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import re
import selectors
import socket
import ssl
import struct
import termios
from typing import Any, Callable, Iterable, List, Optional, Protocol

from selchat.defaults import LINGER_TIMEOUT, RECV_SIZE
from selchat.loop import ratelog
from selchat.loop.outbuffer import OutBuffer
from selchat.loop.reactor import ORDER_WRITE, Reactor
from selchat.loop.timers import Timer

log = logging.getLogger("selchat.server")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


class State(enum.Enum):
    HANDSHAKING = "handshaking"  # TLS handshake under way: nothing flows to or from the session
    OPEN = "open"  # bytes flow both ways
    CLOSING = "closing"  # sending our last bytes; the peer's input is read and discarded
    LINGERING = "lingering"  # all sent, our side shut; draining input until EOF or the deadline
    CLOSED = "closed"  # socket closed, buffers and timers released


class Session(Protocol):
    """What a wire protocol implements to sit on a transport."""

    def connection_made(self, transport: "Transport") -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> None: ...
    def resume_serving(self) -> None: ...
    def output_overflow(self) -> None: ...
    def connection_lost(self, detail: str) -> None: ...


class Writer:
    """The before-sleep hook that writes every transport queued to during the pass."""

    __slots__ = ("dirty", "sent")

    def __init__(self, reactor: Reactor) -> None:
        self.dirty: List[Transport] = []
        self.sent = 0  # bytes written to every transport so far (for the metrics)
        reactor.add_before_sleep(self.flush_all, ORDER_WRITE)

    def flush_all(self) -> None:
        # Writing can fail and close a transport, which may queue bytes for others (a `quit`):
        # keep going until the list stays empty.
        sent_here = 0  # (one add per write in a local, one attribute update per pass)
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for t in dirty:
                t.dirty = False
                out = t.out
                if t.plain and t.state is State.OPEN and len(out.chunks) == 1 and not out.offset:
                    # The common case, written out: one whole chunk for a reading peer.
                    data = out.chunks[0]
                    try:
                        sent = t.sock.send(data)
                    except OSError:
                        sent = -1  # would-block or a dead peer: the general path sorts it out
                    if sent == len(data):
                        sent_here += sent
                        out.chunks.clear()
                        out.size = 0
                        if t.mask != EVENT_READ or t.throttled:
                            t.flush()  # interest or backpressure changes
                        continue
                    if sent > 0:
                        sent_here += sent
                        out.consume(sent)
                if t.state is not State.CLOSED:
                    t.flush()
        self.sent += sent_here


_NUMBERS = re.compile(r"\d+")
_QUOTED = re.compile(r"[\'\"(\[{<]")
_NEVER = float("inf")


def _kernel_bytes(fd: int) -> int:
    """Bytes the kernel holds for `fd`, not yet read (0 if it cannot say)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


def kind_of(what: str) -> str:
    """`what` as a log key: up to the first ": " after its first one, and before any quote or
    bracket (what a peer sent is quoted: an Origin, a request line), numbers as N, 64 at most."""
    head, sep, rest = what.partition(": ")
    if sep:
        head = head + sep + rest.partition(": ")[0]
    return _NUMBERS.sub("N", _QUOTED.split(head, 1)[0])[:64]


class Transport:
    """A plain TCP stream. `TLSTransport` is the same stream with TLS underneath."""

    __slots__ = (
        "reactor", "writer", "sock", "fd", "ip", "peer", "session", "state", "out", "mask",
        "accepting", "throttled", "paused", "eof", "dirty", "max_outbuf", "high_water", "low_water",
        "close_detail", "linger_until", "_linger_timer", "on_closed", "grace", "noted",
        "unread_since", "watched_since", "arrived_after", "read_at", "via", "__weakref__",
    )

    plain = True  # a gather write (sendmsg) may be used

    def __init__(self, reactor: Reactor, writer: Writer, sock: socket.socket, peer: str, ip: str,
                 max_outbuf: int, high_water: int, low_water: int, grace: float = 0.0,
                 since: Optional[float] = None) -> None:
        self.reactor = reactor
        self.writer = writer
        self.sock = sock
        self.fd = sock.fileno()
        self.ip = ip
        self.peer = peer
        self.session: Any = None
        self.state = State.OPEN
        self.out = OutBuffer()
        self.mask = 0  # events registered with the selector now
        self.accepting = True
        self.throttled = False
        self.paused = False
        self.eof = False
        self.dirty = False
        self.max_outbuf = max_outbuf
        self.high_water = high_water
        self.low_water = low_water
        self.grace = grace  # extra seconds a graceful close may take to flush
        self.noted = False  # registered (set by its session): its close gets a line of its own
        # For flood control, when the bytes of a read may have begun to arrive. The socket was
        # last emptied at `unread_since`: what is read later came after it (for a new
        # connection, `since`: what the listener knows of when it came). If the socket has
        # also been watched for reading, with nothing left over, since before the previous
        # pass took its ready list (`watched_since`), what it has now came after that list,
        # however long ago it was emptied: a burst after a silence is a burst. While reading
        # is off (backpressure, a debt, a registration waiting its turn), or after a read
        # that left bytes behind, they wait in the kernel since `unread_since`; charging them
        # as if they had just arrived would make a client within its rate look like a burst
        # (the soak saw it after every stall). `watched_since` is infinite meanwhile.
        self.unread_since = reactor.prev_listed_at if since is None else since
        self.watched_since = _NEVER
        self.arrived_after = self.unread_since  # for the bytes being handed to the session now
        self.read_at = reactor.now  # and when the last of them may have come (see `_read`)
        self.close_detail = ""
        self.linger_until = 0.0
        self._linger_timer: Optional[Timer] = None
        self.on_closed: Optional[Callable[["Transport"], None]] = None
        # A connection from a trusted proxy whose client is named by each request (the web
        # door's forwarded headers): its owner's object that re-keys `ip` and `peer` (`claim`).
        self.via: Any = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.peer} {self.state.value}>"

    # --- for the owner ----------------------------------------------------------------------

    def start(self, session: Any) -> None:
        """Attach the session and start reading."""
        self.session = session
        self._set_interest(EVENT_READ)
        session.connection_made(self)

    # --- for the session --------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """The session may be served: neither closing nor closed."""
        return self.state is State.OPEN or self.state is State.HANDSHAKING

    @property
    def congested(self) -> bool:
        """Our queue for the peer is past the high-water mark: serve it nothing more for now."""
        return self.out.size > self.high_water

    def write(self, data: bytes) -> None:
        if not self.accepting:
            return
        out = self.out
        out.chunks.append(data)
        out.size += len(data)
        if out.size > self.max_outbuf:
            self._overflow()
        elif not self.dirty:
            self.dirty = True
            self.writer.dirty.append(self)

    @staticmethod
    def write_many(transports: "Iterable[Transport]", data: bytes) -> None:
        """`write(data)` to each of `transports`: the fan-out's one call per wire format
        instead of one per connection, the same `bytes` object queued everywhere."""
        size = len(data)
        for transport in transports:
            if not transport.accepting:
                continue
            out = transport.out
            out.chunks.append(data)
            out.size += size
            if out.size > transport.max_outbuf:
                transport._overflow()
            elif not transport.dirty:
                transport.dirty = True
                transport.writer.dirty.append(transport)

    @staticmethod
    def send_many(transports: "Iterable[Transport]", data: bytes) -> None:
        """`write_many`, but `data` goes straight to the socket of a transport with nothing
        queued (asyncio's habit for a write to an idle transport): it costs that member one
        visit instead of the queue's and the writer's. Only for bytes that may leave now (the
        hub calls it after the commit). A short send queues the rest; a would-block or a dead
        peer queues it all, and the writer's general path sorts that out."""
        size = len(data)
        sent_here = 0
        writer: Optional[Writer] = None
        for t in transports:
            if (not t.accepting or t.dirty or not t.plain or t.state is not State.OPEN
                    or t.mask != EVENT_READ or t.throttled or t.out.size):
                t.write(data)  # behind what waits (or refused, when not accepting)
                continue
            try:
                sent = t.sock.send(data)
            except OSError:
                sent = 0
            if sent == size:
                sent_here += size
                writer = t.writer
                continue
            if sent <= 0:
                t.write(data)
                continue
            # A short send: the rest is queued (the chunk itself, from an offset: the tail is
            # never copied), and only the rest counts against --max-outbuf.
            sent_here += sent
            writer = t.writer
            out = t.out
            out.chunks.append(data)
            out.offset = sent
            out.size = size - sent
            if out.size > t.max_outbuf:
                t._overflow()
            else:
                t.dirty = True
                writer.dirty.append(t)
        if writer is not None:
            writer.sent += sent_here

    def wait_for_drain(self) -> None:
        """Stop reading until our queue drains below the low-water mark (backpressure)."""
        if not self.throttled and self.state is State.OPEN:
            self.throttled = True
            self._update_interest()
            # The writer looks at us at the end of this pass even if nothing is queued for us
            # (the caller may be waiting for bytes batched elsewhere): below the low-water
            # mark by then, we resume in the next pass instead of waiting for ever.
            if not self.dirty:
                self.dirty = True
                self.writer.dirty.append(self)

    def pause_reading(self) -> None:
        if not self.paused and self.state is not State.CLOSED:
            self.paused = True
            self._update_interest()

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.state is not State.CLOSED:
                self._update_interest()

    def close(self, detail: str, deadline: Optional[float] = None) -> None:
        """Send what is queued, shut our side, drain the peer briefly, then close.

        The whole close takes until `deadline` at the latest (default: a linger period plus
        the shutdown grace from now).

        Lingering instead of closing at once means a peer still sending never gets a reset
        that could destroy our last words (an error, a notice) before it reads them.
        """
        if self.state is State.HANDSHAKING:
            self.abort(detail)
            return
        if self.state is not State.OPEN:
            return
        self.state = State.CLOSING
        self.close_detail = detail
        self.throttled = False
        self.linger_until = (deadline if deadline is not None
                             else self.reactor.now + LINGER_TIMEOUT + self.grace)
        self._linger_timer = self.reactor.call_at(self.linger_until, self._linger_deadline)
        if not self.dirty:
            self.dirty = True
            self.writer.dirty.append(self)
        self._update_interest()

    def abort(self, detail: str) -> None:
        """Close now; whatever is queued is lost."""
        self._closed(detail)

    def log_info(self, what: str, msg: str, *args: Any) -> None:
        """One line about this connection: each one once it is registered (`noted`).

        Connections that never got in come and go at the rate of connection attempts, so
        for them one line per kind and period, with a count (selchat.loop.ratelog). The kind
        is `kind_of(what)`, without the peer's own words and numbers (a QUIT text, the bytes
        of a bad request line, an Origin): a peer that could make each line new would flood
        the log again.
        """
        if self.noted or log.isEnabledFor(logging.DEBUG):
            log.info(msg, *args)
        else:
            ratelog.shared(log).log(logging.INFO, kind_of(what), msg, *args)

    # --- readiness --------------------------------------------------------------------------

    def on_ready(self, mask: int) -> None:
        if mask & EVENT_READ:
            self._read()
        if mask & EVENT_WRITE and not self.dirty and self.state is not State.CLOSED:
            self.dirty = True
            self.writer.dirty.append(self)

    def _recv(self) -> bytes:
        return self.sock.recv(RECV_SIZE)

    def _emptied(self, data: bytes) -> bool:
        """The read just made took all the kernel had."""
        return len(data) < RECV_SIZE

    def _waiting(self) -> int:
        """Bytes still waiting to be read (after a read that did not take them all)."""
        return _kernel_bytes(self.fd)

    def _read(self) -> None:
        reactor = self.reactor
        # Watched through the previous pass's list-taking with nothing left over: what is
        # here now came after that list (or it would have been read then).
        self.arrived_after = (max(self.unread_since, reactor.prev_listed_at)
                              if self.watched_since < reactor.prev_listed_at else self.unread_since)
        # The clock at the read, not the pass's `now`: a stop (SIGSTOP, a busy machine) in the
        # middle of a pass would otherwise squeeze what came during it into a moment.
        before = reactor.clock()
        try:
            data = self._recv()
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            # While closing, the peer going away is the end we were waiting for.
            self._closed(f"read failed: {exc.strerror or exc}" if self.state is State.OPEN
                         else self.close_detail)
            return
        state = self.state
        if data:
            after = reactor.clock()
            rest = 0 if self._emptied(data) else self._waiting()
            if not rest:  # emptied: whatever comes next arrives from the read on
                self.unread_since = before
                self.read_at = after
                if self.mask & EVENT_READ:
                    self.watched_since = before
            else:
                # More waits in the kernel, since `unread_since` like this read. Taken as
                # having come evenly, this read is its share of the interval, and the rest
                # (read in later passes) the remainder, not a burst at their end.
                self.watched_since = _NEVER
                start = self.arrived_after
                self.read_at = start + (after - start) * len(data) / (len(data) + rest)
            if state is State.OPEN:
                try:
                    self.session.data_received(data)
                except Exception:
                    self._internal_error()
            return  # closing: input is drained and discarded, never served
        self.eof = True
        if state is State.OPEN:
            # Perhaps only half-closed (a script piping requests in): the session still
            # serves and answers what it has before closing too.
            self._update_interest()
            try:
                self.session.eof_received()
            except Exception:
                self._internal_error()
        elif state is State.CLOSING:
            self._update_interest()  # nothing more will come; the flush finishes the close
        elif state is State.LINGERING:
            self._closed(self.close_detail or "closed")

    # --- writing ----------------------------------------------------------------------------

    def _send(self) -> None:
        self.writer.sent += self.out.send_to(self.sock)

    def flush(self) -> None:
        """Write what the socket takes; then the closing, backpressure and interest that follow."""
        out = self.out
        if out.size:
            try:
                self._send()
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass  # TLS wants the socket again first; we stay registered for writing
            except OSError as exc:
                out.clear()
                self._closed(f"write failed: {exc.strerror or exc}" if self.state is State.OPEN
                             else self.close_detail)
                return
        state = self.state
        if state is State.CLOSING and not out.size:
            self._start_linger()
            return
        if state is State.OPEN:
            if not self.throttled:
                if out.size > self.high_water:
                    self.throttled = True
            elif out.size <= self.low_water:
                self.throttled = False
                # Requests that waited: served next pass, so what they say is committed before
                # it is sent, like everything else.
                self.reactor.call_soon(self._resume)
        self._update_interest()

    def _resume(self) -> None:
        if self.state is State.OPEN and not self.throttled:
            try:
                self.session.resume_serving()
            except Exception:
                self._internal_error()

    def _internal_error(self) -> None:
        """A bug of ours while serving this peer loses this peer, never the server."""
        log.exception("internal error while serving %s; closing it", self.peer)
        self._closed("internal error")

    def _overflow(self) -> None:
        self.out.clear()
        self.accepting = False
        self.session.output_overflow()

    # --- interest ---------------------------------------------------------------------------

    def _update_interest(self) -> None:
        state = self.state
        want = 0
        if state is State.OPEN:
            if not self.eof and not self.throttled and not self.paused:
                want = EVENT_READ
        elif not self.eof:  # closing or lingering: keep draining so closing never resets
            want = EVENT_READ
        if self.out.size:
            want |= EVENT_WRITE
        self._set_interest(want)

    def _set_interest(self, want: int) -> None:
        mask = self.mask
        if want == mask:
            return
        selector = self.reactor.selector
        if mask == 0:
            selector.register(self.sock, want, self.on_ready)
        elif want == 0:
            selector.unregister(self.sock)
        else:
            selector.modify(self.sock, want, self.on_ready)
        self.mask = want
        if not want & EVENT_READ:
            self.watched_since = _NEVER
        elif not mask & EVENT_READ:
            self.watched_since = self.reactor.clock()  # (what waits already is still older)

    # --- closing ----------------------------------------------------------------------------

    def _start_linger(self) -> None:
        if self.eof:  # the peer's end of stream came already: nothing to wait for
            self._closed(self.close_detail)
            return
        self.state = State.LINGERING
        self.accepting = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._closed(self.close_detail)
            return
        until = min(self.linger_until, self.reactor.now + LINGER_TIMEOUT)
        if until < self.linger_until:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
            self.linger_until = until
            self._linger_timer = self.reactor.call_at(until, self._linger_deadline)
        self._update_interest()

    def _linger_deadline(self, _: Any = None) -> None:
        self._linger_timer = None
        if self.state is State.CLOSING or self.state is State.LINGERING:
            self._closed(self.close_detail)

    def _closed(self, detail: str) -> None:
        """The one teardown path: everything released, the session told once."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_detail = detail  # (what its owner's `on_closed` may read: why it ended)
        self.accepting = False
        self.throttled = False
        self.out.clear()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self.mask:
            try:
                self.reactor.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.mask = 0
        try:
            self.sock.close()
        except OSError:
            pass
        self.log_info(f"closed: {detail}", "closed: %s: %s", self.peer, detail)
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed(self)
        session, self.session = self.session, None  # nothing more for it; and no cycle
        if session is not None:
            session.connection_lost(detail)


class TLSTransport(Transport):
    """The same stream over TLS: a handshake first, then no gather writes (SSLSocket has none)."""

    __slots__ = ("_close_after_handshake", "_drained", "_failed", "_more")

    plain = False

    def close(self, detail: str, deadline: Optional[float] = None) -> None:
        if self.state is State.HANDSHAKING:
            # What was queued (a refusal) is for a peer that can read it: once TLS is up.
            self._close_after_handshake = detail
            return
        Transport.close(self, detail, deadline)

    def start(self, session: Any) -> None:
        self.session = session
        self._close_after_handshake: Optional[str] = None
        self._drained = False
        self._failed: Optional[OSError] = None
        self._more = False  # TLS holds what the kernel will not report (a `_read_more` skipped)
        self.state = State.HANDSHAKING
        self._set_interest(EVENT_READ)
        session.connection_made(self)

    def on_ready(self, mask: int) -> None:
        if self.state is State.HANDSHAKING:
            self._handshake()
            return
        Transport.on_ready(self, mask)

    def _handshake(self) -> None:
        """Drive the TLS handshake a step; it never blocks, it asks for readiness instead."""
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        before = self.reactor.clock()
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.unread_since = before  # TLS took what there was: the rest comes from now on
            self._set_interest(EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_interest(EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self._closed(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
            return
        self.state = State.OPEN
        if self._waiting():
            # What the client sent behind its Finished waits in the kernel, perhaps since
            # before the previous pass (a stop while we waited for it): from `unread_since`.
            self.watched_since = _NEVER
        else:  # nothing behind it: what comes next comes from now on, like any emptied socket
            self.unread_since = self.watched_since = before
        log.debug("TLS established with %s (%s)", self.peer, sock.version())
        if self.out.size and not self.dirty:  # written while the handshake went on
            self.dirty = True
            self.writer.dirty.append(self)
        self._update_interest()
        if self._close_after_handshake is not None:
            Transport.close(self, self._close_after_handshake)

    def flush(self) -> None:
        if self.state is State.HANDSHAKING:
            return  # sent once the handshake is done
        Transport.flush(self)

    def _recv(self) -> bytes:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        self._drained = False
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed
        data = sock.recv(RECV_SIZE)
        if not data:
            return data
        # One TLS record per call: read on while TLS or the kernel holds more (up to a pass's
        # worth), so that flood control knows when the socket was emptied (`_emptied`). Asked
        # first, not found by reading: a read past the last record would take the peer's end
        # of stream (or an error) along with the data, and its answers would be lost.
        parts = [data]
        size = len(data)
        while size < RECV_SIZE:
            if not sock.pending() and not _kernel_bytes(self.fd):
                self._drained = True
                break
            try:
                more = sock.recv(RECV_SIZE - size)
            except ssl.SSLWantReadError:
                self._drained = True  # part of a record, which TLS keeps: the rest comes later
                break
            except OSError as exc:
                # A bad record behind good ones: those are served; the next read raises it.
                self._failed = exc
                self.reactor.call_soon(self._read_more)
                break
            if not more:
                # The peer's close_notify: the next read sees the end of the stream again.
                self._drained = True
                self.reactor.call_soon(self._read_more)
                break
            parts.append(more)
            size += len(more)
        if size >= RECV_SIZE and sock.pending():
            # Decrypted bytes the kernel no longer reports as readable: come back next pass
            # even if the socket stays quiet.
            self.reactor.call_soon(self._read_more)
        return data if len(parts) == 1 else b"".join(parts)

    def _emptied(self, data: bytes) -> bool:
        return self._drained

    def _waiting(self) -> int:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        return sock.pending() + _kernel_bytes(self.fd)

    def _start_linger(self) -> None:
        # Our close_notify first, so the peer sees a clean end of TLS, not a truncated stream.
        try:
            self.sock.unwrap()  # type: ignore[attr-defined]
        except (ssl.SSLError, OSError, ValueError):
            pass  # sent (or not possible); waiting for the peer's own close_notify is not needed
        Transport._start_linger(self)

    def _read_more(self) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is State.OPEN and (self.throttled or self.paused):
            self._more = True  # read when reading is on again (`_set_interest`)
            return
        self._more = False
        self._read()

    def _set_interest(self, want: int) -> None:
        was = self.mask
        Transport._set_interest(self, want)
        if self._more and want & EVENT_READ and not was & EVENT_READ:
            # Decrypted bytes, a close_notify or an error wait in TLS, not in the kernel:
            # select will not say so, so go and read them.
            self._more = False
            self.reactor.call_soon(self._read_more)

    def _send(self) -> None:
        self.writer.sent += self.out.send_to(self.sock, gather=False)
