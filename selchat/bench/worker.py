"""The generator's worker side: what runs in each load-generator process.

One epoll loop over a share of the connections (`_Worker`, a `_Conn` per connection), the
frame scanner that counts benchmark messages without decoding JSON (`scan`), and what the
three workloads share. The native workload is `_Worker` itself; the IRC and WebSocket ones
(selchat.bench.ircload, selchat.bench.wsload) subclass it. The driver side (processes, plans,
results: selchat.bench.loadgen) imports all three, and none of them imports it back.
"""

from __future__ import annotations

import errno
import json
import resource
import select
import socket
import struct
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

from selchat.defaults import LOBBY, MAX_FRAME

MARK = b"~@"  # starts every benchmark text; '~' and '@' cannot appear in nicks or room names
_MARK0, _MARK1 = MARK
SID_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"  # one byte per sender
TS_DIGITS = 16
TEXT_HEAD = len(MARK) + 1 + TS_DIGITS  # marker, sender id byte, send time (monotonic us)
RECV_SIZE = 1 << 17
_MAX_SAMPLES = 500_000  # latency samples per worker and run
_LEN = struct.Struct(">I")
_unpack = _LEN.unpack_from
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT

CONNECTING, HELLO, READY, DEAD = range(4)
ACCOUNT_REF = "bench-account"  # the ref of a client's `register`, to find the answer to it
# Clients between connect and logged in, over all workers, when registering accounts. The
# server answers `unavailable` to a hash that waited 5 s for a KDF worker, and refuses more
# than 256 waiting (login_throttled); 32 keep its two workers busy, and even at ~300 ms a hash
# on a crowded machine, the last waits about 5 hashes. Both refusals are retried anyway.
ACCOUNT_MAX_PENDING = 32
ACCOUNT_RETRY = ("unavailable", "login_throttled")  # "try again", the server says
ACCOUNT_RETRY_DELAY = 0.5  # seconds before a refused register is sent again
Spec = Tuple[str, int]  # (nick, sender id or -1 for a receiver)


class BadFrame(Exception):
    """The server broke the framing (length 0 or above max_frame)."""


def now_us() -> int:
    return time.monotonic_ns() // 1000


def raise_nofile() -> int:
    """Lift the soft descriptor limit to the hard one (10,000 connections need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def scan(
    buf: bytearray,
    off: int,
    end: int,
    own: int,
    countdown: int,
    every: int,
    t_us: int,
    samples: List[int],
    rel_cache: Dict[int, int],
) -> Tuple[int, int, int, int, int]:
    """Walk the complete frames in buf[off:end] and count messages without decoding them.

    Returns (end of the last complete frame, frames, messages, messages whose sender id byte
    is `own`, countdown). A run of frames that share one length has the four prefix bytes of
    all its frames compared at once with strided slices (`lstrip` of the expected byte tells
    how many lead), so every prefix is verified but at C speed; a different length ends the
    run and its own prefix is read next. Within a run, the marker's offset (learned once per
    frame length in `rel_cache`) is checked the same way; a run where it is not uniform falls
    back to `bytearray.count`. Every `every`-th frame (the `countdown` carries over between
    calls) that is a message adds `t_us` minus its send time to `samples`.
    """
    frames = msgs = mine = 0
    while end - off >= 4:
        length = _unpack(buf, off)[0]
        if length == 0 or length > MAX_FRAME:
            raise BadFrame(f"frame length {length}")
        step = length + 4
        k = (end - off) // step
        if k == 0:
            break
        lim = off + k * step
        if k > 1:
            for j in range(4):
                col = buf[off + j : lim : step]
                lead = k - len(col.lstrip(col[:1]))
                if lead < k:
                    k = lead
                    lim = off + k * step
        rel = rel_cache.get(step, -1)
        if rel < 0 or buf[off + rel : off + rel + 2] != MARK:
            p = buf.find(MARK, off + 4, off + step)
            rel = p - off
            if p >= 0:
                rel_cache[step] = rel
        uniform = rel >= 0 and (
            k == 1
            or (buf[off + rel : lim : step].count(_MARK0) == k and buf[off + rel + 1 : lim : step].count(_MARK1) == k)
        )
        if uniform:
            msgs += k
            if own:
                mine += buf[off + rel + 2 : lim : step].count(own)
        else:
            n = buf.count(MARK, off, lim)
            msgs += n
            if n and own:
                mine += buf.count(MARK + bytes((own,)), off, lim)
        if every:
            while countdown <= k:
                pos = off + (countdown - 1) * step
                q = pos + rel if uniform else buf.find(MARK, pos + 4, pos + step)
                if q >= 0:
                    samples.append(t_us - int(buf[q + 3 : q + TEXT_HEAD]))
                countdown += every
            countdown -= k
        off = lim
        frames += k
    return off, frames, msgs, mine, countdown


def text_parts(msg_size: int) -> Tuple[bytes, bytes]:
    """The say payload around the timestamp: (head up to the sender id, tail after the time)."""
    if msg_size < TEXT_HEAD + 1:
        raise ValueError(f"msg_size must be at least {TEXT_HEAD + 1}")
    head = b'{"type":"say","room":"' + LOBBY.encode() + b'","text":"' + MARK
    tail = b"x" * (msg_size - TEXT_HEAD) + b'"}'
    return head, tail


class _Conn:
    __slots__ = (
        "sock", "fd", "nick", "sid", "state", "tail", "frames", "msgs", "msgs0", "own",
        "sent", "out", "writing", "countdown", "next_due", "echoes", "say_head", "t_open",
    )

    def __init__(self, sock: socket.socket, nick: str, sid: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.nick = nick
        self.sid = sid
        self.state = CONNECTING
        self.tail: Union[bytes, bytearray] = b""
        self.frames = 0
        self.msgs = 0
        self.msgs0 = 0
        self.echoes = 0
        self.sent = 0
        self.out = bytearray()
        self.writing = False
        self.countdown = 1
        self.next_due = 0.0
        self.own = SID_ALPHABET[sid] if sid >= 0 else 0
        self.say_head = b""
        self.t_open = time.monotonic()


class _Worker:
    """One generator process: an epoll loop over its share of the connections.

    Commands arrive on a pipe (registered in the same epoll) and are answered on it:
    connect, settle, load, counters, close. The IRC worker (selchat.bench.ircload) is a
    subclass that replaces the wire format: `conn_class`, `_connected`, `_read`, `_say`.
    """

    conn_class: type = _Conn

    def __init__(self, pipe: Any, host: str, port: int, msg_size: int) -> None:
        self.pipe = pipe
        self.addr = (host, port)
        self.ep = select.epoll()
        self.ep.register(pipe.fileno(), _EPOLLIN)
        self.conns: Dict[int, _Conn] = {}
        self.senders: List[_Conn] = []
        self.rb = bytearray(2 * (MAX_FRAME + 4) + RECV_SIZE)
        self.rbv = memoryview(self.rb)
        self.say_head, self.say_tail = text_parts(msg_size)
        self.done = False
        self.last_rx = time.monotonic()
        self.poll_interval = 0.0
        # registration
        self.to_connect: Deque[Spec] = deque()
        self.ramp_rate = 1000.0
        self.ramp_t0 = 0.0
        self.opened = 0
        self.pending = 0
        self.max_pending = 100
        self.reg_deadline = 0.0
        self.reg_ok = 0
        self.reg_failed = 0
        self.t_first_connect = 0.0
        self.t_last_welcome = 0.0
        self.errors: Dict[str, int] = {}
        self.dropped = 0
        self.cpu_reg0 = 0.0
        self.awaiting_registration = False
        self.handshakes: List[float] = []  # seconds from connect() to welcome (or account)
        self.account_password = ""  # set: each client registers an account after welcome
        self.account_retries: Deque[Tuple[float, _Conn]] = deque()  # (when, conn) to send again
        # settle
        self.settle_quiet = 0.0
        self.settle_deadline = 0.0
        self.settling = False
        # load
        self.load: Optional[Dict[str, Any]] = None
        self.load_stage = 0
        self.sending = False
        self.sampling = False
        self.sample_every = 0
        self.samples: List[int] = []
        self.rel_cache: Dict[int, int] = {}
        self.snap: Dict[str, Any] = {}
        self.drain_deadline = 0.0

    # ---- loop -------------------------------------------------------------------------
    def run(self) -> None:
        ep_poll = self.ep.poll
        conns = self.conns
        pipe_fd = self.pipe.fileno()
        while not self.done:
            start = time.monotonic()
            timeout = self._tick(start)
            for fd, ev in ep_poll(timeout):
                if fd == pipe_fd:
                    self._command(self.pipe.recv())
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                if ev & _EPOLLOUT:
                    if c.state == CONNECTING:
                        self._connected(c)
                        continue
                    self._flush(c)
                if ev & ~_EPOLLOUT and c.state != DEAD:
                    self._read(c)
            if self.poll_interval:
                idle = start + self.poll_interval - time.monotonic()
                if idle > 0:
                    time.sleep(idle)

    def _tick(self, now: float) -> float:
        """Time-driven work (ramp, load stages, paced sends); returns the poll timeout."""
        timeout = 0.2
        if self.to_connect:
            if now >= self.reg_deadline:
                self.errors["not_attempted"] = self.errors.get("not_attempted", 0) + len(self.to_connect)
                self.reg_failed += len(self.to_connect)
                self.to_connect.clear()
            else:
                due = int((now - self.ramp_t0) * self.ramp_rate) + 1 - self.opened
                n = min(due, self.max_pending - self.pending, len(self.to_connect))
                for _ in range(max(n, 0)):
                    self._open(self.to_connect.popleft())
                timeout = min(timeout, 1.0 / self.ramp_rate)
        while self.account_retries and self.account_retries[0][0] <= now:
            c = self.account_retries.popleft()[1]
            if c.state == HELLO:
                self._register_account(c)
        if self.account_retries:
            timeout = min(timeout, max(self.account_retries[0][0] - now, 0.0))
        if self.awaiting_registration:
            if (not self.to_connect and self.pending == 0) or now >= self.reg_deadline:
                self._report_registration()
        if self.settling:
            if now - self.last_rx >= self.settle_quiet or now >= self.settle_deadline:
                self.settling = False
                self.pipe.send(("settled", self._counters()))
            else:
                timeout = min(timeout, 0.02)
        if self.load is not None:
            timeout = min(timeout, self._load_tick(now))
        return max(timeout, 0.0)

    # ---- commands ------------------------------------------------------------------------
    def _command(self, cmd: Tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "connect":
            _, specs, rate, max_pending, timeout = cmd[:5]
            self.account_password = cmd[5] if len(cmd) > 5 else ""
            self.to_connect.extend(specs)
            self.ramp_rate = max(rate, 1.0)
            self.max_pending = max(max_pending, 1)
            self.ramp_t0 = time.monotonic()
            self.reg_deadline = self.ramp_t0 + timeout
            self.opened = 0
            self.reg_ok = self.reg_failed = 0
            self.t_first_connect = self.t_last_welcome = 0.0
            self.cpu_reg0 = cpu_seconds()
            self.handshakes = []
            self.awaiting_registration = True
        elif kind == "settle":
            _, quiet, timeout = cmd
            self.settle_quiet = quiet
            self.settle_deadline = time.monotonic() + timeout
            self.settling = True
        elif kind == "counters":
            self.pipe.send(("counters", self._counters()))
        elif kind == "load":
            self._start_load(cmd[1])
        elif kind == "close":
            for c in list(self.conns.values()):
                self._close(c)
            self.pipe.send(("closed", None))
            self.done = True
        else:
            self.pipe.send(("error", f"unknown command {kind!r}"))

    def _counters(self) -> Dict[str, Any]:
        frames = sum(c.frames for c in self.conns.values())
        msgs = sum(c.msgs for c in self.conns.values())
        by_prefix: Dict[str, int] = {}
        for c in self.conns.values():
            by_prefix[c.nick[0]] = by_prefix.get(c.nick[0], 0) + c.frames
        return {
            "frames": frames,
            "frames_by_prefix": by_prefix,
            "msgs": msgs,
            "ready": sum(1 for c in self.conns.values() if c.state == READY),
            "dropped": self.dropped,
            "errors": dict(self.errors),
            "cpu": cpu_seconds(),
        }

    # ---- registration --------------------------------------------------------------------
    def _open(self, spec: Spec) -> None:
        nick, sid = spec
        self.opened += 1
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self._count_error(errno.errorcode.get(exc.errno or 0, "socket"))
            self.reg_failed += 1
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t_open = time.monotonic()
        if not self.t_first_connect:
            self.t_first_connect = t_open
        err = sock.connect_ex(self._address(sid))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._count_error(errno.errorcode.get(err, str(err)))
            self.reg_failed += 1
            return
        c = self._new_conn(sock, nick, sid)
        c.t_open = t_open
        if sid >= 0:
            c.say_head = self.say_head + SID_ALPHABET[sid : sid + 1]
        self.conns[c.fd] = c
        self.pending += 1
        self.ep.register(c.fd, _EPOLLOUT)

    def _address(self, sid: int) -> Tuple[str, int]:
        """Where a member connects (the WebSocket workload sends receivers to another port)."""
        return self.addr

    def _new_conn(self, sock: socket.socket, nick: str, sid: int) -> _Conn:
        return self.conn_class(sock, nick, sid)

    def _connected(self, c: _Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, errno.errorcode.get(err, str(err)))
            return
        c.state = HELLO
        payload = json.dumps({"type": "hello", "nick": c.nick, "client": "selchat-bench"}).encode()
        c.out += _LEN.pack(len(payload)) + payload
        self.ep.modify(c.fd, _EPOLLIN)
        self._flush(c)

    def _hello_frames(self, c: _Conn, end: int) -> int:
        """Slow path until welcome: decode each frame; return where the hot path takes over."""
        rb = self.rb
        off = 0
        while c.state == HELLO and end - off >= 4:
            length = _unpack(rb, off)[0]
            if length == 0 or length > MAX_FRAME:
                raise BadFrame(f"frame length {length}")
            if off + 4 + length > end:
                break
            try:
                obj = json.loads(bytes(rb[off + 4 : off + 4 + length]))
            except ValueError:
                obj = {}
            off += 4 + length
            c.frames += 1
            kind = obj.get("type")
            if kind == "welcome":
                if self.account_password:  # not ready until the account is made
                    self._register_account(c)
                else:
                    self._ready(c)
            elif kind == "account" and obj.get("ref") == ACCOUNT_REF:
                if obj.get("account"):
                    self._ready(c)
                else:
                    self._fail(c, "register:no_account")
                    return end
            elif kind == "error":
                reason = str(obj.get("code"))
                if obj.get("ref") == ACCOUNT_REF and reason in ACCOUNT_RETRY:
                    self._count_error(f"register_retried:{reason}")
                    self.account_retries.append((time.monotonic() + ACCOUNT_RETRY_DELAY, c))
                    continue
                self._fail(c, f"register:{reason}" if obj.get("ref") == ACCOUNT_REF else reason)
                return end
        return off

    def _register_account(self, c: _Conn) -> None:
        payload = json.dumps({"type": "register", "password": self.account_password, "ref": ACCOUNT_REF}).encode()
        c.out += _LEN.pack(len(payload)) + payload
        self._flush(c)

    def _ready(self, c: _Conn) -> None:
        """Registration is complete (welcome, or the account answer): the hot path takes over."""
        c.state = READY
        self.pending -= 1
        self.reg_ok += 1
        self.t_last_welcome = time.monotonic()
        self.handshakes.append(self.t_last_welcome - c.t_open)
        if c.sid >= 0:
            self.senders.append(c)

    def _report_registration(self) -> None:
        self.awaiting_registration = False
        self.pipe.send(
            (
                "registered",
                {
                    "ok": self.reg_ok,
                    "failed": self.reg_failed,
                    "pending": self.pending,
                    "t_first": self.t_first_connect,
                    "t_last": self.t_last_welcome,
                    "cpu": cpu_seconds() - self.cpu_reg0,
                    "errors": dict(self.errors),
                    "handshakes": self.handshakes,
                },
            )
        )

    def _count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def _fail(self, c: _Conn, reason: str) -> None:
        if c.state in (CONNECTING, HELLO):
            self.pending -= 1
            self.reg_failed += 1
        elif c.state == READY:
            self.dropped += 1
        self._count_error(reason)
        self._close(c)

    def _close(self, c: _Conn) -> None:
        if c.state == DEAD:
            return
        c.state = DEAD
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    # ---- I/O -------------------------------------------------------------------------------
    def _flush(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._fail(c, errno.errorcode.get(exc.errno or 0, "send"))
            return
        if n:
            del c.out[:n]
        want = bool(c.out)
        if want != c.writing:
            c.writing = want
            self.ep.modify(c.fd, _EPOLLIN | _EPOLLOUT if want else _EPOLLIN)

    def _fill(self, c: _Conn) -> int:
        """The connection's unparsed tail, then what one recv brings, in `rb`: where they end
        (0: nothing came, or the connection is gone and failed). Every generator reads so."""
        rb = self.rb
        k = len(c.tail)
        if k:
            rb[:k] = c.tail
        try:
            n = c.sock.recv_into(self.rbv[k : k + RECV_SIZE])
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._fail(c, "closed_by_server:" + errno.errorcode.get(exc.errno or 0, "recv"))
            return 0
        if n == 0:
            self._fail(c, "closed_by_server")
            return 0
        self.last_rx = time.monotonic()
        return k + n

    def _read(self, c: _Conn) -> None:
        end = self._fill(c)
        if not end:
            return
        rb = self.rb
        start = 0
        try:
            if c.state == HELLO:
                start = self._hello_frames(c, end)
                if c.state != READY:
                    c.tail = rb[start:end] if start < end and c.state == HELLO else b""
                    return
            every = self.sample_every if self.sampling else 0
            samples = self.samples
            off, frames, msgs, mine, c.countdown = scan(
                rb, start, end, c.own, c.countdown, every, now_us() if every else 0,
                samples if len(samples) < _MAX_SAMPLES else [], self.rel_cache,
            )
        except BadFrame as exc:
            self._fail(c, f"bad_frame:{exc}")
            return
        c.tail = rb[off:end] if off < end else b""
        c.frames += frames
        if not msgs:
            return
        c.msgs += msgs
        if mine:
            c.echoes += mine
            if self.sending and self.load is not None and self.load["mode"] == "flow":
                self._top_up(c)

    def _top_up(self, c: _Conn) -> None:
        n = self.load["window"] - (c.sent - c.echoes)  # type: ignore[index]
        if n > 0:
            frame = self._say(c)
            c.out += frame * n
            c.sent += n
            self._flush(c)

    def _say(self, c: _Conn) -> bytes:
        payload = c.say_head + b"%016d" % now_us() + self.say_tail
        return _LEN.pack(len(payload)) + payload

    # ---- measured load ------------------------------------------------------------------
    def _start_load(self, params: Dict[str, Any]) -> None:
        self.load = params
        self.load_stage = 0
        self.sample_every = params["sample_every"]
        self.poll_interval = params["poll_interval"]
        self.samples = []
        for c in self.conns.values():
            c.msgs0 = c.msgs
            c.countdown = 1 + (c.fd % max(self.sample_every, 1))  # spread samples over the frame index
        for c in self.senders:
            c.sent = c.echoes = 0

    def _load_tick(self, now: float) -> float:
        p = self.load
        assert p is not None
        stage = self.load_stage
        if stage == 0:
            if now < p["t_send"]:
                return p["t_send"] - now
            self.load_stage = stage = 1
            self.sending = True
            if p["mode"] == "flow":
                for c in self.senders:
                    if c.state == READY:
                        self._top_up(c)
            else:
                interval = 1.0 / p["rate_per_sender"]
                for c in self.senders:
                    c.next_due = p["t_send"] + interval * (c.sid % p["senders"]) / p["senders"]
        if stage == 1 and now >= p["t0"]:
            self.load_stage = stage = 2
            self.snap["t0"] = self._snapshot()
            self.sampling = True
        if stage == 2 and now >= p["t1"]:
            self.load_stage = stage = 3
            self.snap["t1"] = self._snapshot()
            self.sampling = False
            self.sending = False
            self.poll_interval = 0.0
            self.drain_deadline = now + p["drain_timeout"]
        if stage == 3:
            if (now - self.last_rx >= p["drain_quiet"] and now >= p["t1"] + p["drain_quiet"]) or now >= self.drain_deadline:
                self._report_load()
                return 0.2
            return 0.02
        nxt = p["t0"] if stage == 1 else p["t1"]
        timeout = nxt - now
        if self.sending and p["mode"] == "rate":
            timeout = min(timeout, self._paced_sends(now, p))
        return timeout

    def _paced_sends(self, now: float, p: Dict[str, Any]) -> float:
        """Fixed offered rate: send whatever is due, skip (and count) what cannot be queued."""
        interval = 1.0 / p["rate_per_sender"]
        soonest = 1.0
        for c in self.senders:
            if c.state != READY:
                continue
            n = 0
            while c.next_due <= now:
                c.next_due += interval
                if len(c.out) < 65536:
                    n += 1
                else:
                    self._count_error("rate_skipped")
            if n:
                c.out += self._say(c) * n
                c.sent += n
                self._flush(c)
            soonest = min(soonest, c.next_due - now)
        return max(soonest, 0.0)

    def _snapshot(self) -> Dict[str, Any]:
        return {
            "t": time.monotonic(),
            "cpu": cpu_seconds(),
            "msgs": sum(c.msgs for c in self.conns.values()),
            "frames": sum(c.frames for c in self.conns.values()),
            "sent": sum(c.sent for c in self.senders),
        }

    def _credited(self, c: _Conn) -> int:
        """Messages this member is credited with since the load began (checked against sent)."""
        return c.msgs - c.msgs0

    def _report_load(self) -> None:
        p = self.load
        self.load = None
        self.sending = False
        conns = [c for c in self.conns.values()]
        self.pipe.send(
            (
                "loaded",
                {
                    "t0": self.snap.get("t0"),
                    "t1": self.snap.get("t1"),
                    "sent_total": sum(c.sent for c in self.senders),
                    "per_conn": [self._credited(c) for c in conns if c.state != CONNECTING],
                    "dead": sum(1 for c in conns if c.state == DEAD),
                    "samples": self.samples,
                    "dropped": self.dropped,
                    "errors": dict(self.errors),
                    "mode": p["mode"] if p else None,
                },
            )
        )
        self.samples = []


def split_round_robin(specs: Sequence[Spec], n: int) -> List[List[Spec]]:
    """`specs` dealt out to `n` workers in turn."""
    return [list(specs[i::n]) for i in range(n)]
