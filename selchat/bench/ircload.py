"""The IRC workload: the native fan-out's shape, spoken as RFC 1459/2812 lines.

R receivers and S senders register (`NICK`, `USER`, wait for `001`), `JOIN #lobby` and wait
for `366` (end of names); then every sender sends `PRIVMSG #lobby :<text>` lines whose text
has the native generator's layout and size (`~@`, one sender-id byte, 16 digits of send
time in monotonic microseconds, `x` padding up to `msg_size` characters).

The window without echoes. Plain IRC servers (ngIRCd, InspIRCd) do not send a PRIVMSG back
to its sender, so a sender cannot count its own echoes as the native generator does.
Instead, each sender has one *counter*: an ordinary receiver, in the same worker process,
that counts the lines carrying that sender's id byte and credits them to the sender. A
sender keeps at most `window` messages beyond what its counter has seen, i.e. what the
server has fanned out at least as far as that receiver. Counters are picked evenly across
the receivers (among the latency probes of the fast worker), so they sit at different
places in the server's member order, as the senders' own positions do in the native run.
They are not extra connections: every member still counts every line it receives.

Counting stays as cheap as the native generator's: a receive is cut at its last newline;
`bytearray.count(b"\\n")` gives the complete lines and `count(b" :~@")` the benchmark
PRIVMSGs among them (the marker cannot occur in a prefix: nicks and user names hold
neither `~@` nor a space before it). Only when the two counts differ (a `PING`, a late
`JOIN`, an `ERROR`) are the lines of that receive looked at one by one. A delivery is one
PRIVMSG line received by one member; each message reaches R + S - 1 members (not its own
sender), and after the drain every receiver must hold every message sent and every sender
every message but its own (a sender is credited its own lines, which IRC never echoes back,
so the native completeness check applies unchanged).
"""

from __future__ import annotations

import errno
import socket
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from selchat.bench.worker import (
    DEAD, HELLO, MARK, READY, SID_ALPHABET, TEXT_HEAD, TS_DIGITS, Spec,
    _Conn, _Worker, _EPOLLIN, now_us, split_round_robin,
)
from selchat.defaults import LOBBY

if TYPE_CHECKING:  # (a type only: the driver imports this module, never the reverse)
    from selchat.bench.loadgen import LoadConfig

IRC_MARK = b" :" + MARK  # where the text of a benchmark PRIVMSG starts, in any server's relay
_MARK_LEN = len(IRC_MARK)
CHANNEL = LOBBY.encode()
MAX_TAIL = 1 << 16  # bytes without a newline before a connection counts as broken
# numerics that end a registration: nick refused or in use, channel refused
_FATAL = {b"431", b"432", b"433", b"436", b"437", b"403", b"405", b"465", b"471", b"473", b"474", b"475"}


def counter_sid(sender: int) -> int:
    """The spec id of the receiver that counts for `sender` (receivers are -1, senders >= 0)."""
    return -2 - sender


class IrcConn(_Conn):
    __slots__ = ("feeds", "counts_for", "lines", "bytes", "mark_own")

    def __init__(self, sock: socket.socket, nick: str, sid: int) -> None:
        super().__init__(sock, nick, sid)
        self.counts_for = -2 - sid if sid <= -2 else -1
        # a sender never receives its own lines; a counter looks for its sender's id byte
        self.own = SID_ALPHABET[self.counts_for] if self.counts_for >= 0 else 0
        self.mark_own = IRC_MARK + bytes((self.own,)) if self.own else b""
        self.feeds: Optional[_Conn] = None
        self.lines = 0
        self.bytes = 0


class IrcWorker(_Worker):
    """A generator process for IRC servers: same commands, same loop, another wire format."""

    conn_class = IrcConn

    def __init__(self, pipe: Any, host: str, port: int, msg_size: int) -> None:
        super().__init__(pipe, host, port, msg_size)
        if msg_size < TEXT_HEAD + 1:
            raise ValueError(f"msg_size must be at least {TEXT_HEAD + 1}")
        self.say_head = b"PRIVMSG " + CHANNEL + b" :" + MARK  # + sender id byte, in _open
        self.say_tail = b"x" * (msg_size - TEXT_HEAD) + b"\r\n"

    # ---- registration ------------------------------------------------------------------
    def _connected(self, c: _Conn) -> None:  # type: ignore[override]
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, errno.errorcode.get(err, str(err)))
            return
        c.state = HELLO
        nick = c.nick.encode()
        c.out += b"NICK " + nick + b"\r\nUSER u 0 * :selchat-bench\r\n"
        self.ep.modify(c.fd, _EPOLLIN)
        self._flush(c)

    def _line(self, c: IrcConn, line: bytes) -> None:
        """Slow path: one complete line (without its newline) that is not a benchmark message."""
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] == b":":
            parts = line.split(b" ", 3)
            cmd = parts[1] if len(parts) > 1 else b""
        else:
            parts = line.split(b" ", 1)
            cmd = parts[0]
        if cmd == b"PING":
            c.out += b"PONG" + line[line.index(b"PING") + 4 :] + b"\r\n"
            self._flush(c)
        elif cmd == b"ERROR":
            self._count_error("irc_error")
        elif c.state == HELLO:
            if cmd == b"001":
                c.out += b"JOIN " + CHANNEL + b"\r\n"
                self._flush(c)
            elif cmd == b"366" and len(parts) > 3 and parts[3].split(b" ", 1)[0].lower() == CHANNEL:
                c.state = READY
                self.pending -= 1
                self.reg_ok += 1
                self.t_last_welcome = time.monotonic()
                self.handshakes.append(self.t_last_welcome - c.t_open)
                if c.sid >= 0:
                    self.senders.append(c)
            elif cmd in _FATAL:
                self._fail(c, "irc_" + cmd.decode())

    def _lines(self, c: IrcConn, stop: int) -> int:
        """Walk rb[:stop] line by line (registration, PINGs); return the benchmark messages."""
        msgs = 0
        for line in bytes(self.rb[:stop]).split(b"\n")[:-1]:
            if IRC_MARK in line:
                msgs += 1
            else:
                self._line(c, line)
                if c.state == DEAD:
                    break
        return msgs

    # ---- the hot path --------------------------------------------------------------------
    def _read(self, c: IrcConn) -> None:  # type: ignore[override]
        k = len(c.tail)
        end = self._fill(c)
        if not end:
            return
        c.bytes += end - k
        rb = self.rb
        stop = rb.rfind(b"\n", 0, end) + 1
        if stop == 0:
            if end > MAX_TAIL:
                self._fail(c, "line_too_long")
            else:
                c.tail = rb[:end]
            return
        c.tail = rb[stop:end] if stop < end else b""
        lines = rb.count(b"\n", 0, stop)
        c.lines += lines
        c.frames += lines
        if c.state == HELLO:
            msgs = self._lines(c, stop)
        else:
            msgs = rb.count(IRC_MARK, 0, stop)
            if msgs != lines:
                self._lines(c, stop)
        if not msgs or c.state == DEAD:
            return
        c.msgs += msgs
        if self.sampling and self.sample_every:
            self._sample(c, stop, lines, msgs)
        if c.own:
            mine = rb.count(c.mark_own, 0, stop)
            s = c.feeds
            if mine and s is not None:
                s.echoes += mine
                if self.sending and s.state == READY and self.load is not None and self.load["mode"] == "flow":
                    self._top_up(s)

    def _sample(self, c: IrcConn, stop: int, lines: int, msgs: int) -> None:
        """Time every `sample_every`-th message of this member (the countdown carries over).

        When every line of the receive is a benchmark message of one length (the usual case:
        all senders' nicks have the same length), the send times sit at a fixed stride;
        otherwise the markers are walked one by one.
        """
        rb = self.rb
        samples = self.samples
        if len(samples) >= 500_000:
            return
        t_us = now_us()
        every = self.sample_every
        cd = c.countdown
        step = rb.find(b"\n", 0, stop) + 1
        if msgs == lines and step * lines == stop and rb[step - 1 : stop : step].count(10) == lines:
            rel = rb.find(IRC_MARK, 0, step) + _MARK_LEN + 1
            while cd <= msgs:
                q = (cd - 1) * step + rel
                samples.append(t_us - int(rb[q : q + TS_DIGITS]))
                cd += every
            c.countdown = cd - msgs
            return
        pos = 0
        for _ in range(msgs):
            q = rb.find(IRC_MARK, pos, stop)
            if q < 0:
                break
            pos = q + _MARK_LEN
            if cd == 1:
                samples.append(t_us - int(rb[pos + 1 : pos + 1 + TS_DIGITS]))
                cd = every
            else:
                cd -= 1
        c.countdown = cd

    def _say(self, c: _Conn) -> bytes:
        return c.say_head + b"%016d" % now_us() + self.say_tail

    # ---- load bookkeeping ------------------------------------------------------------------
    def _start_load(self, params: Dict[str, Any]) -> None:
        super()._start_load(params)
        by_sid = {s.sid: s for s in self.senders}
        for c in self.conns.values():
            if isinstance(c, IrcConn) and c.counts_for >= 0:
                c.feeds = by_sid.get(c.counts_for)
                if c.feeds is None:
                    self._count_error("counter_without_sender")

    def _credited(self, c: _Conn) -> int:
        # a sender is credited its own lines, which the server never sends back to it
        return c.msgs - c.msgs0 + (c.sent if c.sid >= 0 else 0)

    def _snapshot(self) -> Dict[str, Any]:
        snap = super()._snapshot()
        snap["lines"] = sum(c.lines for c in self.conns.values())  # type: ignore[attr-defined]
        snap["bytes"] = sum(c.bytes for c in self.conns.values())  # type: ignore[attr-defined]
        return snap


def plan_irc_shares(cfg: LoadConfig) -> List[List[Spec]]:
    """Worker 0: the senders, their counters and the latency probes; the rest: bulk receivers.

    The first S of the probes (picked evenly across the receivers) are the counters, so a
    counter always lives in its sender's process and reads every `fast_poll` seconds.
    """
    if cfg.receivers < cfg.senders:
        raise ValueError("the IRC workload needs at least as many receivers as senders (one counter each)")
    senders: List[Spec] = [(f"s{i:04d}", i) for i in range(cfg.senders)]
    receivers: List[Spec] = [(f"r{i:05d}", -1) for i in range(cfg.receivers)]
    probes = min(max(cfg.probes, cfg.senders), cfg.receivers)
    picked = sorted({round(i * cfg.receivers / probes) for i in range(probes)}) if probes else []
    for k, idx in enumerate(picked[: cfg.senders]):
        receivers[idx] = (receivers[idx][0], counter_sid(k))
    chosen = set(picked)
    fast = senders + [receivers[i] for i in picked]
    bulk = [r for i, r in enumerate(receivers) if i not in chosen]
    if cfg.rate is not None:  # fixed rate: every worker reads eagerly; keep counters with senders
        n = cfg.bulk_workers or (0 if cfg.receivers + cfg.senders < 50 else 1)
        return [fast + bulk] if n == 0 else [fast] + split_round_robin(bulk, n)
    n = cfg.bulk_workers or (1 if cfg.receivers <= 300 else 2)
    return [fast] + split_round_robin(bulk, n)
