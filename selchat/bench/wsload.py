"""The WebSocket workload: the native fan-out with its receivers on the web door.

The senders are the native fan-out's own (framed connections on the native port, counting
their own echoes to keep `window` messages in flight), so the only thing that changes between
`fanout` and `wsfanout` is how the R receivers are served: one unmasked WebSocket text frame
per JSON message instead of a length-prefixed frame. A delivery is one `message` received by
one member, as in the native run.

A receiver upgrades with a hand-written HTTP/1.1 request (`GET /ws`, `Origin` the server's
own, a random `Sec-WebSocket-Key`, checked against `Sec-WebSocket-Accept`), then sends
`hello` as a masked text frame. Until the load starts it walks the server's frames one by
one and decodes them (`welcome`, `error`, joins while settling); that costs nothing that is
measured.

Once the load starts it only counts, never decodes (`ws_scan`). Server frames are unmasked
and each benchmark message's payload holds the `~@` marker once (a header cannot: it is 0x81
and length bytes, and the texts are ASCII). Counting the marker with `bytearray.count` over
every byte received was tried first: at R=1000 that scan alone took the two bulk workers to
0.8 cores, the runner's limit. So the frames are walked the native generator's way instead:
frames of one length share their header, so a run of them has its header bytes checked with
strided slices and its markers at their learned offset the same way, at C speed and without
touching the bytes in between; `bytearray.count` only serves a run where the marker is not
at one offset. The walk keeps frame alignment, so anything that is not a whole text frame
(a ping, a close, a fragment) is seen exactly and handled alone.

The server pings a WebSocket client only after `--ping-interval` (60 s) without a byte from
it, which a benchmark run never reaches; still, every ping gets a masked pong with the same
payload, as a client must send it. A close frame ends the connection (counted as an error).

Latency (probe receivers in the fast worker only): every `sample_every`-th message, its send
time read after the marker and the sender-id byte, as in the native run.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

from selchat.bench.worker import (
    DEAD, HELLO, MARK, READY, TEXT_HEAD, BadFrame, _Conn, _Worker, _EPOLLIN, _MARK0, _MARK1, now_us,
)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HTTP_HEAD = 16384  # bytes of a 101 answer before the connection counts as broken
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_SAMPLES = 500_000


def accept_token(key: bytes) -> bytes:
    """RFC 6455, 4.2.2: what the server must answer to `key` in Sec-WebSocket-Accept."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def upgrade_request(host: str, port: int, key: bytes, path: str = "/ws") -> bytes:
    """The client's opening handshake, with the server's own origin (anything else is refused)."""
    authority = f"{host}:{port}".encode()
    return (
        b"GET " + path.encode() + b" HTTP/1.1\r\n"
        b"Host: " + authority + b"\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Origin: http://" + authority + b"\r\n"
        b"\r\n"
    )


def client_frame(opcode: int, payload: bytes, mask: Optional[bytes] = None) -> bytes:
    """One final client frame: masked, as RFC 6455 requires of everything a client sends."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    if n:
        key = (mask * (n // 4 + 1))[:n]
        body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    else:
        body = b""
    return head + mask + body


def parse_frame(buf: Any, off: int, end: int) -> Optional[Tuple[int, int, int, int]]:
    """(first byte, payload start, payload end, masked) of the frame at `off`, None if incomplete."""
    if end - off < 2:
        return None
    b0, b1 = buf[off], buf[off + 1]
    n = b1 & 0x7F
    start = off + 2
    if n == 126:
        if end - off < 4:
            return None
        n = (buf[off + 2] << 8) | buf[off + 3]
        start = off + 4
    elif n == 127:
        if end - off < 10:
            return None
        n = int.from_bytes(buf[off + 2 : off + 10], "big")
        start = off + 10
    if b1 & 0x80:
        start += 4
    if end < start + n:
        return None
    return b0, start, start + n, b1 & 0x80


class Scan:
    """What `ws_scan` found besides messages: ping payloads to answer, a close code."""

    __slots__ = ("pings", "close")

    def __init__(self) -> None:
        self.pings: List[bytes] = []
        self.close: Optional[int] = None


def ws_scan(
    buf: bytearray,
    off: int,
    end: int,
    countdown: int,
    every: int,
    t_us: int,
    samples: List[int],
    rel_cache: Dict[int, int],
    found: Scan,
) -> Tuple[int, int, int, int]:
    """Walk the complete server frames in buf[off:end] and count messages without decoding.

    Returns (end of the last complete frame, frames, messages, countdown). The native
    generator's method with WebSocket headers: a run of frames that share one length also
    share their header (0x81 and the length bytes), so the header bytes of all of them are
    compared at once with strided slices; the marker's offset within a frame of that length
    (learned once, in `rel_cache`) is checked the same way, and `bytearray.count` of the
    marker takes over where it is not uniform. Any other frame (a ping, a close, a fragment)
    ends the run and is looked at alone. Every `every`-th message adds `t_us` minus its send
    time to `samples`.
    """
    frames = msgs = 0
    while end - off >= 2:
        b0 = buf[off]
        b1 = buf[off + 1]
        if b1 & 0x80:
            raise BadFrame("masked server frame")
        n = b1
        h = 2
        if n == 126:
            if end - off < 4:
                break
            n = (buf[off + 2] << 8) | buf[off + 3]
            h = 4
        elif n == 127:
            if end - off < 10:
                break
            n = int.from_bytes(buf[off + 2 : off + 10], "big")
            h = 10
        step = h + n
        if b0 != 0x81:  # not a whole text message: alone, on the slow side
            if end - off < step:
                break
            op = b0 & 0x0F
            if op == OP_PING:
                found.pings.append(bytes(buf[off + h : off + step]))
            elif op == OP_CLOSE:
                found.close = (buf[off + h] << 8 | buf[off + h + 1]) if n >= 2 else 1005
                return off + step, frames, msgs, countdown
            elif op in (OP_TEXT, OP_BINARY, OP_CONT):
                msgs += buf.count(MARK, off + h, off + step)
            off += step
            frames += 1
            continue
        k = (end - off) // step
        if k == 0:
            break
        lim = off + k * step
        if k > 1:
            for j in range(h):
                col = buf[off + j : lim : step]
                lead = k - len(col.lstrip(col[:1]))
                if lead < k:
                    k = lead
                    lim = off + k * step
        rel = rel_cache.get(step, -1)
        if rel < 0 or buf[off + rel : off + rel + 2] != MARK:
            p = buf.find(MARK, off + h, off + step)
            rel = p - off
            if p >= 0:
                rel_cache[step] = rel
        uniform = rel >= 0 and (
            k == 1
            or (buf[off + rel : lim : step].count(_MARK0) == k and buf[off + rel + 1 : lim : step].count(_MARK1) == k)
        )
        msgs += k if uniform else buf.count(MARK, off, lim)
        if every:
            while countdown <= k:
                pos = off + (countdown - 1) * step
                q = pos + rel if uniform else buf.find(MARK, pos + h, pos + step)
                if q >= 0:
                    samples.append(t_us - int(buf[q + 3 : q + TEXT_HEAD]))
                countdown += every
            countdown -= k
        off = lim
        frames += k
    return off, frames, msgs, countdown


class WsConn(_Conn):
    """A receiver on the web door: HTTP upgrade, then frames; `counting` once the load runs."""

    __slots__ = ("key", "upgraded", "counting", "parts")

    def __init__(self, sock: socket.socket, nick: str, sid: int) -> None:
        super().__init__(sock, nick, sid)
        self.key = base64.b64encode(os.urandom(16))
        self.upgraded = False
        self.counting = False
        self.parts: Optional[bytearray] = None  # a fragmented text message arriving


class WsWorker(_Worker):
    """A generator process whose receivers are WebSocket clients and senders native ones."""

    def __init__(self, pipe: Any, host: str, port: int, msg_size: int, ws_port: int) -> None:
        super().__init__(pipe, host, port, msg_size)
        self.ws_addr = (host, ws_port)

    def _address(self, sid: int) -> Tuple[str, int]:
        return self.addr if sid >= 0 else self.ws_addr

    def _new_conn(self, sock: socket.socket, nick: str, sid: int) -> _Conn:
        return _Conn(sock, nick, sid) if sid >= 0 else WsConn(sock, nick, sid)

    # ---- registration ------------------------------------------------------------------
    def _connected(self, c: _Conn) -> None:
        if type(c) is not WsConn:
            super()._connected(c)
            return
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(c, errno.errorcode.get(err, str(err)))
            return
        c.state = HELLO
        c.out += upgrade_request(self.ws_addr[0], self.ws_addr[1], c.key)
        self.ep.modify(c.fd, _EPOLLIN)
        self._flush(c)

    def _http_answer(self, c: WsConn, end: int) -> int:
        """Check the 101; return where the frames start, or -1 (need more bytes, or failed)."""
        rb = self.rb
        stop = rb.find(b"\r\n\r\n", 0, end)
        if stop < 0:
            if end > MAX_HTTP_HEAD:
                self._fail(c, "http_head_too_long")
            else:
                c.tail = rb[:end]
            return -1
        head = bytes(rb[:stop]).split(b"\r\n")
        status = head[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            self._fail(c, "http_" + (status[1].decode("latin-1") if len(status) > 1 else "garbage"))
            return -1
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if fields.get(b"sec-websocket-accept") != accept_token(c.key):
            self._fail(c, "ws_bad_accept")
            return -1
        c.upgraded = True
        hello = json.dumps({"type": "hello", "nick": c.nick, "client": "selchat-bench"}).encode()
        c.out += client_frame(OP_TEXT, hello)
        self._flush(c)
        return stop + 4

    # ---- reading -------------------------------------------------------------------------
    def _read(self, c: _Conn) -> None:
        if type(c) is not WsConn:
            super()._read(c)
            return
        end = self._fill(c)
        if not end:
            return
        if c.counting:  # type: ignore[attr-defined]
            self._count(c, end)  # type: ignore[arg-type]
        else:
            self._frames(c, end)  # type: ignore[arg-type]

    def _count(self, c: WsConn, end: int) -> None:
        """The hot path: frames walked at C speed by `ws_scan`, messages counted by their marker."""
        every = self.sample_every if self.sampling else 0
        samples = self.samples
        found = Scan()
        try:
            off, frames, msgs, c.countdown = ws_scan(
                self.rb, 0, end, c.countdown, every, now_us() if every else 0,
                samples if len(samples) < _MAX_SAMPLES else [], self.rel_cache, found,
            )
        except BadFrame as exc:
            self._fail(c, f"bad_frame:{exc}")
            return
        c.tail = self.rb[off:end] if off < end else b""
        c.frames += frames
        c.msgs += msgs
        if found.pings:
            for body in found.pings:
                c.out += client_frame(OP_PONG, body)
            self._flush(c)
        if found.close is not None:
            self._fail(c, f"ws_close_{found.close}")

    def _frames(self, c: WsConn, end: int) -> None:
        """The slow path (before the load): the 101, then every frame decoded."""
        rb = self.rb
        off = 0
        if not c.upgraded:
            off = self._http_answer(c, end)
            if off < 0:
                return
        while True:
            f = parse_frame(rb, off, end)
            if f is None:
                break
            b0, start, stop, masked = f
            off = stop
            if masked:
                self._fail(c, "ws_masked_server_frame")
                return
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op == OP_PING:
                c.out += client_frame(OP_PONG, bytes(rb[start:stop]))
                self._flush(c)
            elif op == OP_CLOSE:
                code = (rb[start] << 8 | rb[start + 1]) if stop - start >= 2 else 1005
                self._fail(c, f"ws_close_{code}")
                return
            elif op in (OP_TEXT, OP_BINARY, OP_CONT):
                chunk = bytes(rb[start:stop])
                if op != OP_CONT:
                    c.parts = None
                if c.parts is not None:
                    chunk = bytes(c.parts) + chunk
                if not fin:
                    c.parts = bytearray(chunk)
                    continue
                c.parts = None
                c.frames += 1
                self._payload(c, chunk)
            if c.state == DEAD:
                return
        c.tail = rb[off:end] if off < end else b""

    def _payload(self, c: WsConn, payload: bytes) -> None:
        if c.state == READY:
            c.msgs += payload.count(MARK)
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            obj = {}
        kind = obj.get("type")
        if kind == "welcome":
            c.state = READY
            self.pending -= 1
            self.reg_ok += 1
            self.t_last_welcome = time.monotonic()
            self.handshakes.append(self.t_last_welcome - c.t_open)
        elif kind == "error":
            self._fail(c, str(obj.get("code")))

    # ---- load bookkeeping ------------------------------------------------------------------
    def _start_load(self, params: Dict[str, Any]) -> None:
        super()._start_load(params)
        for c in self.conns.values():
            if type(c) is WsConn and c.state == READY:
                # from here on only counted; a partial frame left in the tail is just bytes
                # whose marker (if any) has not been counted yet
                c.counting = True
