"""The event loop: one thread, one selector, non-blocking sockets. It moves bytes and time, nothing else.

Each pass of the loop:
  1. waits in `select` until a socket is ready or the nearest timer is due;
  2. accepts new connections and reads from readable ones; every complete frame is decoded,
     validated and handed to the chat state, and the deliveries it returns are encoded once
     each and queued on the recipients' output buffers (nothing is sent yet);
  3. runs due timers (handshake, ping and linger deadlines);
  4. before sleeping again: disconnects the clients condemned during the pass, commits the
     pass's messages to the store in one transaction, and only then writes each dirty
     connection's queued bytes with one gather `sendmsg`.

Invariants this file keeps:
  * nothing blocks: every socket is non-blocking, and nothing waits but `select`;
  * nothing reorders: a connection's bytes leave in the order they were queued, and each pass
    handles a connection's frames in the order they arrived;
  * nothing is sent before it is stored: writes happen only after the pass's commit;
  * nothing unbounded: input is read in RECV_SIZE pieces and only while the client's own output
    is below the high-water mark; output beyond `max_outbuf` drops the client;
  * no teardown in the middle of a broadcast: a client that must go is marked, and removed
    between requests, when the chat state is consistent.
"""

from __future__ import annotations

import errno
import hmac
import logging
import resource
import selectors
import signal
import socket
import ssl
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from selchat import SERVER_NAME
from selchat.core import events
from selchat.doors.framed import codec
from selchat.core.events import Message
from selchat.core.chat import Chat, ChatError, Delivery, User
from selchat.config import ServerConfig, parse_args
from selchat.defaults import ACCEPT_PAUSE, ACCEPT_PER_PASS, LINGER_TIMEOUT, LISTEN_BACKLOG, RECV_SIZE
from selchat.loop.outbuffer import OutBuffer
from selchat.password import read_password_file
from selchat.core.ratelimit import ALLOW, DISCONNECT, TokenBucket
from selchat.doors.framed.protocol import (
    Hello,
    Parser,
    PingRequest,
    ProtocolError,
    QuitRequest,
    Ref,
    Say,
    encode_event,
    ref_limit,
)
from selchat.core.store import SQLiteStore, StoreError
from selchat.loop.timers import TimerHeap

REFUSING_MAX = 256  # connections beyond --max-clients that may be in the middle of a refusal

log = logging.getLogger("selchat.server")
_listening_log = logging.getLogger("selchat.server.listening")
_listening_log.setLevel(logging.INFO)

# Connection states. OPEN serves requests; FLUSHING sends what is queued, then half-closes;
# LINGERING has sent everything and reads (discarding) until the peer closes or time is up, so a
# peer still sending does not get a reset that could destroy our last words before it reads them.
OPEN, FLUSHING, LINGERING, CLOSED = range(4)


class Connection:
    """Per-connection state; kept small because 10,000 of them must fit in a few MiB."""

    __slots__ = (
        "sock", "fd", "ip", "peer", "decoder", "out", "user", "state", "mask", "reading",
        "last_seen", "pinged", "dirty", "doom", "close_reason", "linger_until", "bucket",
        "handshaking", "counted", "reject", "accepting", "eof",
    )

    def __init__(self, sock: socket.socket, ip: str, peer: str, max_frame: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ip = ip
        self.peer = peer
        self.decoder = codec.FrameDecoder(max_frame)
        self.out = OutBuffer()
        self.user: Optional[User] = None
        self.state = OPEN
        self.mask = 0  # events registered with the selector now
        self.reading = True  # False while backpressure (or closing) stops us serving requests
        self.last_seen = now
        self.pinged = False
        self.dirty = False  # queued output not yet tried this pass
        self.doom: Optional[str] = None  # quit reason once the connection is condemned
        self.close_reason = ""
        self.linger_until = 0.0
        self.bucket: Optional[TokenBucket] = None  # made at registration: flood control
        self.handshaking = isinstance(sock, ssl.SSLSocket)  # TLS handshake still under way
        self.counted = False  # counts against --max-clients / --max-per-ip
        self.reject: Optional[str] = None  # error word to send once the handshake is done
        self.accepting = True  # output may be queued: not condemned, lingering or closed
        self.eof = False  # the peer has shut down its sending side

    @property
    def name(self) -> str:
        return f"{self.peer} ({self.user.nick})" if self.user is not None else self.peer


class Server:
    def __init__(
        self,
        config: ServerConfig,
        store: Any,
        tls: Optional[ssl.SSLContext] = None,
        password: Optional[bytes] = None,
    ) -> None:
        self.config = config
        self.store = store
        self.tls = tls
        self.password = password
        self.client_count = 0
        self.per_ip: Dict[str, int] = {}
        self.high_water = config.high_water  # read on every flush: plain attributes, not properties
        self.low_water = config.low_water
        self.parser = Parser(config.max_text, ref_limit(config.max_frame, config.max_text), config.max_frame)
        self.chat = Chat(
            store,
            server_name=SERVER_NAME,
            motd=config.motd,
            max_frame=config.max_frame,
            max_text=config.max_text,
            max_presence=config.max_presence,
            history_on_join=config.history_on_join,
            rate=config.rate,
            burst=config.burst,
        )
        self.selector = selectors.DefaultSelector()
        self.timers = TimerHeap()
        self.connections: Dict[int, Connection] = {}
        self.listener: Optional[socket.socket] = None
        self.address: tuple = ()
        self.now = time.monotonic()
        self._dirty: List[Connection] = []
        self._doomed: List[Connection] = []
        self._said: List[tuple] = []  # (connection, ref, message id) of this pass's `say`s
        # The room broadcast being batched: consecutive messages to one room's members are
        # joined into one chunk per member (see _materialize), instead of one chunk each.
        self._batch_members: Optional[Dict[User, None]] = None
        self._batch: List[list] = []  # [bytes for all, the sender, the sender's own bytes, event]
        self._stopping = False
        self._stop_requested = False
        self._stop_deadline = 0.0
        self._wakeup_r: Optional[socket.socket] = None
        self._wakeup_w: Optional[socket.socket] = None
        self._accepting = False
        self._short_of_files = False
        self.stats = {"accepted": 0, "frames_in": 0, "commits": 0}

    # --- set-up -----------------------------------------------------------------------------

    def listen(self) -> None:
        cfg = self.config
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.listener = sock
        self.address = sock.getsockname()[:2]
        self.selector.register(sock, selectors.EVENT_READ, None)
        self._accepting = True
        # Always said, whatever --log-level: scripts and tests read the port from this line.
        _listening_log.info("listening on %s:%d", self.address[0], self.address[1])

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM start a graceful shutdown; a wake-up socket makes `select` return at once."""
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, "wakeup")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag here: the handler may run between any two bytecodes of the loop, so the
        # loop itself starts the shutdown at the end of the pass, when its state is consistent.
        if not self._stop_requested:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            self._stop_requested = True

    # --- the loop ---------------------------------------------------------------------------

    def serve_forever(self) -> None:
        select = self.selector.select
        timers = self.timers
        while True:
            deadline = timers.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = select(timeout)
            self.now = time.monotonic()
            for key, mask in ready:
                conn = key.data
                if conn is None:
                    self._accept()
                elif conn == "wakeup":
                    self._drain_wakeup()
                else:
                    if mask & selectors.EVENT_READ:
                        self._guarded(self._on_readable, conn)
                    if conn.handshaking:
                        if mask & selectors.EVENT_WRITE and conn.state != CLOSED:
                            self._continue_handshake(conn)
                    elif mask & selectors.EVENT_WRITE and not conn.dirty and conn.state != CLOSED:
                        conn.dirty = True
                        self._dirty.append(conn)
            timers.run_due(self.now)
            if self._stop_requested and not self._stopping:
                self.request_stop()
            self._before_sleep()
            if self._stopping and (not self.connections or self.now >= self._stop_deadline):
                break
        self._finish()

    def _guarded(self, serve: Callable[[Connection], None], conn: Connection) -> None:
        """Run a step that serves a client's input; a bug of ours loses that client, not the server."""
        try:
            serve(conn)
        except Exception:
            log.exception("internal error while serving %s; closing it", conn.name)
            self._close_now(conn, "connection closed", "internal error")

    def _before_sleep(self) -> None:
        """Condemned clients out, the pass's messages committed, then the queued bytes written."""
        if self._batch:
            self._materialize()
        committed = False
        while True:
            while self._doomed:
                doomed, self._doomed = self._doomed, []
                for conn in doomed:
                    self._drop(conn)
            if not committed:
                self._commit()
                committed = True
            if not self._dirty:
                return
            # Writing can fail and drop a client, which queues `quit` for others: loop until quiet.
            dirty, self._dirty = self._dirty, []
            plain = self.tls is None
            for conn in dirty:
                conn.dirty = False
                out = conn.out
                if plain and conn.state == OPEN and len(out.chunks) == 1 and not out.offset:
                    # The common case, written out: one chunk for a reading client, sent whole.
                    data = out.chunks[0]
                    try:
                        sent = conn.sock.send(data)
                    except OSError:
                        sent = -1  # would-block or a dead peer: the general path sorts it out
                    if sent == len(data):
                        out.chunks.clear()
                        out.size = 0
                        if conn.mask != selectors.EVENT_READ or not conn.reading:
                            self._flush(conn)  # interest or backpressure changes
                        continue
                    if sent > 0:
                        out.consume(sent)
                if conn.state != CLOSED:
                    self._flush(conn)

    def _commit(self) -> None:
        said, self._said = self._said, []
        try:
            stored = self.store.commit()
        except Exception as exc:  # StoreError, or anything else the disk throws at us
            # Keep serving: the messages were queued already and go out, but their senders
            # learn that history will not have them.
            log.error("history write failed, %d message(s) not stored: %s", len(said), exc)
            for conn, ref, message_id in said:
                if conn.state == OPEN:
                    self._send_error(conn, "not_stored", f"message {message_id} was delivered "
                                     "but could not be stored in history", ref)
            return
        if stored:
            self.stats["commits"] += 1

    # --- accepting --------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_PER_PASS):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # One warning per shortage, not one per 0.1 s retry while it lasts.
                    (log.debug if self._short_of_files else log.warning)(
                        "accept failed (%s): pausing accepts for %.1fs", exc.strerror, ACCEPT_PAUSE)
                    self._short_of_files = True
                    self._pause_accepting()
                    return
                log.info("accept failed: %s", exc)  # e.g. the peer gave up before we got to it
                continue
            if self._short_of_files:
                self._short_of_files = False
                log.warning("accepting again")
            self._add_connection(sock, addr)

    def _pause_accepting(self) -> None:
        if self._accepting and self.listener is not None:
            self.selector.unregister(self.listener)
            self._accepting = False
            self.timers.call_at(self.now + ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self, _: Any = None) -> None:
        if not self._accepting and not self._stopping and self.listener is not None:
            self.selector.register(self.listener, selectors.EVENT_READ, None)
            self._accepting = True

    def _add_connection(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if len(self.connections) >= self.config.max_clients + REFUSING_MAX:
            # Even refusals are bounded: past this, a new connection is closed without a word.
            sock.close()
            return
        ip = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                log.info("TLS set-up failed for %s: %s", peer, exc)
                sock.close()
                return
        conn = Connection(sock, ip, peer, self.config.max_frame, self.now)
        self.connections[conn.fd] = conn
        conn.mask = selectors.EVENT_READ
        self.selector.register(sock, selectors.EVENT_READ, conn)
        self.stats["accepted"] += 1
        cfg = self.config
        # Connections that never finish TLS or hello count against the limits until they time out.
        if self.client_count >= cfg.max_clients:
            conn.reject = "server_full"
        elif cfg.max_per_ip and self.per_ip.get(ip, 0) >= cfg.max_per_ip:
            conn.reject = "too_many_connections"
        else:
            conn.counted = True
            self.client_count += 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.timers.call_at(self.now + cfg.handshake_timeout, self._handshake_deadline, conn)
        if conn.reject is not None:
            log.warning("refusing %s: %s", peer, conn.reject)
            if not conn.handshaking:
                self._refuse(conn)
            return
        self.timers.call_at(self.now + cfg.ping_interval, self._idle_check, conn)
        log.debug("connected: %s", peer)

    def _refuse(self, conn: Connection) -> None:
        assert conn.reject is not None
        text = "the server is full" if conn.reject == "server_full" else "too many connections from your address"
        self._send_error(conn, conn.reject, text, None)
        self._close_after_flush(conn, None, conn.reject)

    def _continue_handshake(self, conn: Connection) -> None:
        """Drive the TLS handshake a step; it never blocks, it asks for readiness instead."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_interest(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_interest(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self._close_now(conn, None, f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
            return
        conn.handshaking = False
        log.debug("TLS established with %s (%s)", conn.peer, sock.version())
        if conn.reject is not None:
            self._refuse(conn)
        self._update_interest(conn)

    # --- reading ----------------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        if conn.handshaking:
            self._continue_handshake(conn)
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
            if self.tls is not None and data and conn.state != CLOSED:
                data = self._read_tls_buffered(conn, data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._close_now(conn, "connection closed", f"read failed: {exc.strerror}")
            return
        if not data:
            if conn.state == OPEN:
                # Perhaps only half-closed (a script piping requests in): whatever complete
                # requests it sent are still served, and answered, before we close too.
                conn.eof = True
                conn.reading = False
                self._serve_frames(conn)
                if conn.state == OPEN:
                    self._update_interest(conn)
            elif conn.state == FLUSHING:
                conn.reading = False  # nothing more will come; wait for the flush to finish
                self._update_interest(conn)
            else:
                self._close_now(conn, None, conn.close_reason or "closed")
            return
        if conn.state != OPEN:
            return  # closing: input is drained and discarded, never served
        conn.last_seen = self.now
        conn.pinged = False
        conn.decoder.feed(data)
        self._serve_frames(conn)

    def _serve_frames(self, conn: Connection) -> None:
        """Serve the complete frames buffered for `conn`, in order, until its output is too full.

        The check between requests is the backpressure: one read can hold hundreds of requests,
        and their answers must not pile up past max_outbuf before the client could read any.
        What is left waits in the decoder until the client has read its answers (`_flush`).
        """
        decoder = conn.decoder
        high_water = self.high_water
        while conn.state == OPEN:
            if conn.doom is not None:
                return  # condemned (a slow consumer): nothing more is served
            if conn.out.size > high_water:
                conn.reading = False
                return
            try:
                payload = decoder.next_frame()
            except codec.FrameError as exc:
                log.info("protocol error from %s: %s", conn.name, exc.message)
                self._send_error(conn, exc.code, exc.message, None)
                self._close_after_flush(conn, "protocol error", exc.message)
                return
            if payload is None:
                if conn.eof:  # the peer has closed its side: nothing more will come
                    if decoder.buffered:
                        self._close_now(conn, "connection closed", "peer closed mid-frame")
                    else:
                        self._close_after_flush(conn, "connection closed", "peer closed")
                return
            self._on_frame(conn, payload)

    def _read_tls_buffered(self, conn: Connection, data: bytes) -> bytes:
        """TLS may hold decrypted bytes the kernel no longer reports as readable: take them now."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        if not sock.pending():
            return data
        parts = [data]
        size = len(data)
        while size < RECV_SIZE and sock.pending():
            more = sock.recv(min(sock.pending(), RECV_SIZE - size))
            if not more:
                break
            parts.append(more)
            size += len(more)
        if sock.pending():
            # More than one pass's worth: come back next pass even if the socket stays quiet.
            self.timers.call_at(self.now, self._on_readable_later, conn)
        return b"".join(parts)

    def _on_readable_later(self, conn: Connection) -> None:
        if conn.state != CLOSED and conn.reading:
            self._guarded(self._on_readable, conn)

    def _on_frame(self, conn: Connection, payload: bytes) -> None:
        self.stats["frames_in"] += 1
        bucket = conn.bucket
        if bucket is not None and (b'"pong"' not in payload or not self._is_pong(payload)):
            verdict = bucket.take(self.now)
            if verdict is not ALLOW:
                if verdict is DISCONNECT:
                    log.info("excess flood from %s", conn.name)
                    self._send_error(conn, "rate_limited", "excess flood: disconnecting",
                                     self._ref_of(payload))
                    self._close_after_flush(conn, "excess flood", "excess flood")
                else:
                    self._send_error(conn, "rate_limited", "too many requests: slow down",
                                     self._ref_of(payload))
                return
        try:
            obj = codec.decode(payload)
        except codec.PayloadError as exc:
            self._send_error(conn, exc.code, exc.message, None)
            return
        try:
            request, ref = self.parser.parse(obj, registered=conn.user is not None)
        except ProtocolError as exc:
            self._send_error(conn, exc.code, exc.message, exc.ref)
            return
        user = conn.user
        if user is None:
            self._on_unregistered(conn, request, ref)
            return
        if type(request) is Hello:
            self._send_error(conn, "already_registered", "you are registered already", ref)
            return
        if type(request) is not Say and self._batch:
            self._materialize()  # membership may change: the batch goes to today's members
        try:
            deliveries = self.chat.handle(user, request, int(time.time() * 1000))
        except ChatError as exc:
            self._send_error(conn, exc.code, exc.message, ref)
            return
        self._deliver(deliveries, ref)
        if type(request) is Say:
            self._said.append((conn, ref, deliveries[0].event.id))
        elif type(request) is QuitRequest:
            conn.user = None  # the chat state has let go of this user
            self._close_after_flush(conn, None, f"quit: {request.reason or 'quit'}")

    @staticmethod
    def _is_pong(payload: bytes) -> bool:
        """Pongs are exempt from flood control; only frames that mention one are decoded here."""
        try:
            return codec.decode(payload).get("type") == "pong"
        except codec.PayloadError:
            return False

    def _ref_of(self, payload: bytes) -> Ref:
        try:
            return self.parser.ref_of(codec.decode(payload))
        except codec.PayloadError:
            return None

    def _on_unregistered(self, conn: Connection, request: Any, ref: Ref) -> None:
        kind = type(request)
        if kind is Hello:
            if self.password is not None and not _password_matches(self.password, request.password):
                log.info("bad password from %s", conn.peer)
                self._send_error(conn, "bad_password", "wrong or missing password", ref)
                self._close_after_flush(conn, None, "bad password")
                return
            if self._batch:
                self._materialize()
            try:
                user, deliveries = self.chat.register(request.nick, conn)
            except ChatError as exc:
                self._send_error(conn, exc.code, exc.message, ref)
                return
            conn.user = user
            if self.config.rate > 0:
                conn.bucket = TokenBucket(self.now, self.config.rate, self.config.burst)
            log.info("registered: %s as %s (client %r)", conn.peer, user.nick, request.client)
            self._deliver(deliveries, ref)
        elif kind is PingRequest:
            self._queue_event(conn, events.Pong(request.token), ref)
        elif kind is QuitRequest:
            self._close_after_flush(conn, None, "quit before registering")
        # a pong before registering needs no answer

    # --- queuing output ---------------------------------------------------------------------

    def _deliver(self, deliveries: List[Delivery], ref: Ref) -> None:
        """Encode each event once and queue the same bytes for every recipient.

        Room messages are not queued member by member here: they join the pass's batch for
        that room, and each member gets the whole batch as one chunk when it is materialized.
        """
        max_frame = self.config.max_frame
        shared: Optional[List[bytes]] = None
        shared_event: Any = None
        batch = self._batch
        for delivery in deliveries:
            event = delivery.event
            if delivery.reply:
                if batch and batch[-1][3] is event and batch[-1][1] is next(iter(delivery.recipients)):
                    # The sender's own copy of the message just batched, in the same place.
                    entry = batch[-1]
                    entry[2] = entry[0] if ref is None else encode_event(event, ref, max_frame)[0]
                    continue
                frames = encode_event(event, ref, max_frame) if ref is not None else None
            else:
                frames = None
            if frames is None:
                if event is shared_event and shared is not None:
                    frames = shared
                else:
                    frames = encode_event(event, None, max_frame)
                    shared, shared_event = frames, event
            recipients = delivery.recipients
            if type(event) is Message and type(recipients) is dict and not delivery.reply:
                if self._batch_members is not recipients:
                    if batch:
                        self._materialize()
                    self._batch_members = recipients
                batch.append([frames[0], delivery.skip, None, event])
                continue
            if batch:
                self._materialize()
            skip = delivery.skip
            for user in recipients:
                if user is not skip:
                    for data in frames:
                        self._queue(user.endpoint, data)

    def _materialize(self) -> None:
        """Queue the batched room messages: one joined chunk shared by every member.

        This is the hot path of a busy room: per member it costs one append, however many
        messages the pass carried. Only the senders, whose own copies differ (they may carry a
        `ref`), get a chunk of their own.
        """
        # `_deliver` holds on to the list object, so it is emptied in place, never replaced.
        entries, members = self._batch.copy(), self._batch_members
        self._batch.clear()
        self._batch_members = None
        if not entries or members is None:
            return
        common = entries[0][0] if len(entries) == 1 else b"".join([e[0] for e in entries])
        senders = {e[1] for e in entries}
        cap = self.config.max_outbuf
        dirty = self._dirty
        size = len(common)
        for user in members:
            if user in senders:
                data = b"".join([e[2] if e[1] is user else e[0] for e in entries
                                 if e[1] is not user or e[2] is not None])
                if not data:
                    continue
            else:
                data = common
            conn = user.endpoint
            if not conn.accepting:
                continue
            out = conn.out
            out.chunks.append(data)
            out.size += size if data is common else len(data)
            if out.size > cap:
                self._overflow(conn)
            elif not conn.dirty:
                conn.dirty = True
                dirty.append(conn)

    def _queue(self, conn: Connection, data: bytes) -> None:
        if not conn.accepting:
            return
        if self._batch:
            self._materialize()  # whatever was said before this goes out before it
        out = conn.out
        out.append(data)
        if out.size > self.config.max_outbuf:
            self._overflow(conn)
        elif not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _overflow(self, conn: Connection) -> None:
        """Past max_outbuf: drop what is queued and condemn the client as a slow consumer."""
        conn.out.clear()
        self._condemn(conn, "slow consumer")

    def _queue_event(self, conn: Connection, event: events.Event, ref: Ref) -> None:
        for data in encode_event(event, ref, self.config.max_frame):
            self._queue(conn, data)

    def _send_error(self, conn: Connection, code: str, message: str, ref: Ref) -> None:
        try:
            frames = encode_event(events.Error(code, message), ref, self.config.max_frame)
        except codec.EncodeError:
            # Only with a tiny --max-frame and a long ref: the code and ref matter, not the words.
            frames = encode_event(events.Error(code, code), ref, self.config.max_frame)
        for data in frames:
            self._queue(conn, data)

    # --- writing ----------------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        out = conn.out
        if out.size:
            try:
                out.send_to(conn.sock, gather=self.tls is None)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass  # TLS wants the socket again first; we stay registered for writing
            except OSError as exc:
                out.clear()
                if conn.state == OPEN:
                    self._close_now(conn, "connection closed", f"write failed: {exc.strerror}")
                else:
                    self._close_now(conn, None, conn.close_reason)
                return
        if not out.size and conn.state == FLUSHING:
            self._start_linger(conn)
            return
        if conn.state == OPEN:
            # Backpressure: a client not reading its own output does not get more served.
            if conn.reading and out.size > self.high_water:
                conn.reading = False
            elif not conn.reading and out.size <= self.low_water:
                conn.reading = not conn.eof
                if conn.decoder.buffered or conn.eof:
                    # Requests that waited in the decoder: served next pass, so that what they
                    # say is committed before it is sent, like everything else.
                    self.timers.call_at(self.now, self._serve_frames_later, conn)
        self._update_interest(conn)

    def _serve_frames_later(self, conn: Connection) -> None:
        if conn.state == OPEN and (conn.reading or conn.eof):
            self._guarded(self._serve_frames, conn)

    def _update_interest(self, conn: Connection) -> None:
        want = 0
        if conn.reading:
            want |= selectors.EVENT_READ
        if conn.out.size:
            want |= selectors.EVENT_WRITE
        self._set_interest(conn, want)

    def _set_interest(self, conn: Connection, want: int) -> None:
        if want == conn.mask:
            return
        if conn.mask == 0:
            self.selector.register(conn.sock, want, conn)
        elif want == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, want, conn)
        conn.mask = want

    # --- closing ----------------------------------------------------------------------------

    def _condemn(self, conn: Connection, reason: str) -> None:
        """Mark for removal between requests (never in the middle of a broadcast)."""
        if conn.doom is None and conn.state != CLOSED:
            conn.doom = reason
            conn.accepting = False
            self._doomed.append(conn)

    def _drop(self, conn: Connection) -> None:
        reason = conn.doom or "connection closed"
        log.info("dropping %s: %s", conn.name, reason)
        self._close_now(conn, reason, reason)

    def _leave_chat(self, conn: Connection, quit_reason: Optional[str]) -> None:
        user = conn.user
        if user is None:
            return
        conn.user = None
        if self._batch:
            self._materialize()
        if quit_reason is not None:
            self._deliver(self.chat.disconnect(user, quit_reason), None)
        else:
            self.chat.disconnect(user, "")

    def _close_after_flush(self, conn: Connection, quit_reason: Optional[str], detail: str) -> None:
        """Leave the chat now; send what is queued, half-close, then linger briefly before closing."""
        if conn.state != OPEN:
            return
        self._leave_chat(conn, quit_reason)
        conn.state = FLUSHING
        conn.close_reason = detail
        conn.reading = True  # keep draining input so closing never resets the peer
        conn.linger_until = self.now + LINGER_TIMEOUT + self.config.shutdown_grace
        self.timers.call_at(conn.linger_until, self._linger_deadline, conn)
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _start_linger(self, conn: Connection) -> None:
        if not conn.reading:  # the peer's end of stream came already: nothing to wait for
            self._close_now(conn, None, conn.close_reason)
            return
        conn.state = LINGERING
        conn.accepting = False
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn, None, conn.close_reason)
            return
        conn.linger_until = min(conn.linger_until, self.now + LINGER_TIMEOUT)
        self.timers.call_at(conn.linger_until, self._linger_deadline, conn)
        self._update_interest(conn)

    def _close_now(self, conn: Connection, quit_reason: Optional[str], detail: str) -> None:
        if conn.state == CLOSED:
            return
        self._leave_chat(conn, quit_reason)
        conn.state = CLOSED
        conn.accepting = False
        conn.out.clear()
        conn.decoder.clear()  # timers may hold the connection a while: not its buffers
        if conn.mask:
            self.selector.unregister(conn.sock)
            conn.mask = 0
        self.connections.pop(conn.fd, None)
        if conn.counted:
            conn.counted = False
            self.client_count -= 1
            left = self.per_ip[conn.ip] - 1
            if left:
                self.per_ip[conn.ip] = left
            else:
                del self.per_ip[conn.ip]
        try:
            conn.sock.close()
        except OSError:
            pass
        log.info("closed: %s: %s", conn.peer, detail)

    # --- timers -----------------------------------------------------------------------------

    def _handshake_deadline(self, conn: Connection) -> None:
        if conn.state != CLOSED and (conn.handshaking or (conn.state == OPEN and conn.user is None)):
            self._close_now(conn, None, "handshake timeout")

    def _idle_check(self, conn: Connection) -> None:
        """One heap entry per connection, re-armed from `last_seen`; no per-frame timer work."""
        if conn.state != OPEN:
            return
        cfg = self.config
        silence = self.now - conn.last_seen
        if silence >= cfg.ping_timeout:
            self._close_now(conn, "ping timeout", "ping timeout")
            return
        if silence >= cfg.ping_interval:
            if not conn.pinged:
                conn.pinged = True
                self._queue_event(conn, events.Ping(f"{int(self.now * 1000)}"), None)
            self.timers.call_at(conn.last_seen + cfg.ping_timeout, self._idle_check, conn)
        else:
            self.timers.call_at(conn.last_seen + cfg.ping_interval, self._idle_check, conn)

    def _linger_deadline(self, conn: Connection) -> None:
        if conn.state in (FLUSHING, LINGERING) and self.now >= conn.linger_until:
            self._close_now(conn, None, conn.close_reason)

    # --- shutdown ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop accepting, tell every client, and give them `shutdown_grace` to receive it."""
        if self._stopping:
            return
        self._stopping = True
        self.now = time.monotonic()
        self._stop_deadline = self.now + self.config.shutdown_grace
        if self.listener is not None:
            if self._accepting:
                self.selector.unregister(self.listener)
                self._accepting = False
            self.listener.close()
        notice = events.Notice("server shutting down")
        for conn in list(self.connections.values()):
            if conn.handshaking:
                self._close_now(conn, None, "server shutting down during the TLS handshake")
            elif conn.state == OPEN:
                self._queue_event(conn, notice, None)
                conn.user = None  # everyone leaves at once: no quit storm for the last seconds
                self._close_after_flush(conn, None, "server shutting down")
                conn.linger_until = self._stop_deadline
        self.timers.call_at(self._stop_deadline, lambda _: None)  # wake the loop at the deadline

    def _drain_wakeup(self) -> None:
        assert self._wakeup_r is not None
        try:
            while self._wakeup_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _finish(self) -> None:
        for conn in list(self.connections.values()):
            self._close_now(conn, None, "server stopped")
        self._commit()
        self.selector.close()
        if self._wakeup_r is not None:
            signal.set_wakeup_fd(-1)
            self._wakeup_r.close()
            assert self._wakeup_w is not None
            self._wakeup_w.close()
        log.info("stopped")


def _password_matches(expected: bytes, given: Optional[str]) -> bool:
    """Constant time, so the time taken says nothing about how much of a guess was right."""
    if given is None:
        return False
    return hmac.compare_digest(expected, given.encode("utf-8"))


def read_password(path: str) -> bytes:
    return read_password_file(path).encode("utf-8")


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ValueError(f"cannot load TLS certificate {cert} / key {key}: {reason}") from None
    return context


def raise_open_file_limit() -> None:
    """Each client is a file descriptor: take every one the hard limit allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)


def open_store(path: str) -> Any:
    return SQLiteStore(path)


def close_store(store: Any) -> None:
    try:
        store.close()
    except StoreError as exc:
        log.error("closing the history store: %s", exc)
    else:
        log.info("history store closed: %s", store.stats())


def main(argv: Optional[List[str]] = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        store = open_store(config.db)
    except StoreError as exc:
        print(f"selchat-server: {exc}", file=sys.stderr)
        return 1
    tls = None
    password = None
    try:
        if config.tls_cert and config.tls_key:
            tls = make_tls_context(config.tls_cert, config.tls_key)
        if config.password_file:
            password = read_password(config.password_file)
    except ValueError as exc:
        print(f"selchat-server: {exc}", file=sys.stderr)
        return 1
    raise_open_file_limit()
    server = Server(config, store, tls, password)
    try:
        server.listen()
    except OSError as exc:
        print(f"selchat-server: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        close_store(store)
        return 1
    server.install_signal_handlers()
    try:
        server.serve_forever()
    finally:
        close_store(store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
