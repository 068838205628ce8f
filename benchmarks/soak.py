#!/usr/bin/env python3
"""Soak / abuse run: well-behaved chat under concurrent abuse, with exact loss accounting.

    python benchmarks/soak.py --duration 60            # with abusers, then the same without
    python benchmarks/soak.py --duration 5 --no-write  # a quick look, RESULTS.md untouched

For each mode (with abusers, then without) it starts a fresh selchat server on 127.0.0.1
(flood control on at its defaults, `--max-per-ip 0`, `--max-outbuf 65536`, history in a temp
SQLite file), then:

* a well-behaved worker process (one selectors loop) holds N clients (default 20), each in
  #lobby and in two of R fixed rooms (default 4) for the whole run, each saying messages at a
  steady rate of its own (default spread evenly over 5-9.5/s, under the server's 10/s) in its
  rooms, alternately. The text carries the sender, a sequence number and the send time
  (CLOCK_MONOTONIC, shared by all processes on Linux). Every delivery is recorded, so at the
  end: sent (echo received), refused (rate_limited, must be 0), delivered, lost (a member of
  the room that did not get a message said there; must be 0), duplicates, order violations,
  and latency percentiles, over the whole run and outside the stall windows;
* the stall (the review's finding 3, "a busy machine"): the driver stops the server with
  SIGSTOP for --stall-for s every --stall-every s and resumes it with SIGCONT. It is an option
  of its own (`--stall-in`), by default in *both* runs at the same offsets, so the comparison
  stays fair; the table says which run had it;
* an abuser process (one thread per connection or kind, each loop bounded in time and count)
  runs at once. The old kinds: garbage senders, stallers (register, join every room, never
  read: dropped as slow consumers), ping flooders (100 at once), connect-and-vanish (half a
  hello), silent connections (handshake timeout) and mid-frame closers. The review's kinds:
  - room filler (set-up, before the clock starts): a few thousand rooms, each source address
    up to its share of the room table, 100 per connection (the per-user cap), and long
    messages (max_text code points of 4-byte UTF-8, ~16 KB with this run's limits) in #long;
  - expensive-but-within-rate askers (finding 4): `rooms` pagers (following `next`) and
    `history {limit: 200}` askers over #long, each sending at --ask-rate (under the rate);
  - 64 KB pong flooders (finding 8): register, then stream pong frames as large as the
    server's max_frame allows (16 KiB here, 64 KiB at the default max_frame) without pause;
  - pre-registration flooders (finding 8): bad `hello`s, bad JSON, pings, as fast as they
    go for up to 10 s, and pings at 5/s for 10 s (outlived by the handshake timeout); then
    reconnect;
  - room hoarders (finding 9): --hoard-addresses source addresses x --hoard-conns
    connections, each trying to create 100 rooms at the rate; then newcomers (from
    127.0.0.1, holding only the 4 fixed rooms, and from an address holding none) must still
    be able to create a room;
* a churn process (finding 1): connect, `hello`, reset (SO_LINGER 0), at --churn-rate a second.

Source addresses: the server shares the room table out per source address, and Linux delivers
all of 127.0.0.0/8 to the loopback interface, so fillers and hoarders bind 127.0.0.X (X >= 11)
to be the several addresses of the findings; everything else comes from 127.0.0.1.

Disconnects are counted by reason twice: from the `quit` events the well-behaved clients saw
(each nick once), and from the server's own `closed:` log lines. The server's peak RSS is
VmHWM from /proc/PID/status, printed beside the README's memory bound computed from this run's
options and the peak number of sockets the server held (sampled 4 times a second); the CPU of
the server, of each driver process and of the machine (/proc/stat) are reported, so a run
where the driver or other work was the limit shows it. Everything goes to 127.0.0.x only;
every loop stops by itself; all processes are cleaned up.
"""

from __future__ import annotations

import argparse
import array
import collections
import datetime
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import select
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from selchat.core.chat import ORIGIN_SHARE, RESERVE_SHARE  # noqa: E402
from selchat.defaults import MAX_ROOMS, MAX_ROOMS_PER_USER  # noqa: E402

log = logging.getLogger("soak")

RESULTS = REPO / "benchmarks" / "RESULTS.md"
HOST = "127.0.0.1"
HEADER = struct.Struct(">I")
LOBBY = "#lobby"
LONG_ROOM = "#long"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

# The room table as the server shares it out (docs/protocol.md, "Requests").
ROOMS_PER_ADDRESS = max(1, MAX_ROOMS // ORIGIN_SHARE)
ROOM_RESERVE = MAX_ROOMS // RESERVE_SHARE

# Source addresses, all on the loopback interface: 127.0.0.1 for everything but these.
ADDR_HOARD = 11  # hoarders: 127.0.0.11, .12, ...
ADDR_LONG = 99  # the writer of the long messages
ADDR_FILL = 100  # fillers: 127.0.0.100, .101, ...
ADDR_FRESH = 250  # the newcomer from an address that holds no room

SERVER_FLAGS = [
    "--max-per-ip", "0",  # every client of this run comes from 127.0.0.x
    "--max-outbuf", "65536",  # small, so stallers are dropped within the run
    "--handshake-timeout", "5",  # silent connections are closed within the run
    # --rate/--burst left at their defaults (10/s, 20): flood control acts on the flooders
]

# The README's memory bound ("Memory bound"): base + C x (max_outbuf + max_frame + 64 KiB + 4 KiB),
# base = the interpreter at rest (about 25 MiB) + SQLite's page cache (up to 32 MiB).
README_BASE_MIB = 25 + 32 + 5  # interpreter, SQLite's page cache, the pacer's addresses
READ_BYTES = 65536
FIXED_PER_CONN = 4096


def memory_bound_bytes(connections: int, max_outbuf: int, max_frame: int) -> int:
    """The README's bound for `connections` connections at these options."""
    return README_BASE_MIB * MIB + connections * (max_outbuf + max_frame + READ_BYTES + FIXED_PER_CONN)


# --- frames ---------------------------------------------------------------------------------


def encode(obj: Dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return HEADER.pack(len(payload)) + payload


def frame_raw(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def take_frames(buf: bytearray) -> List[Dict[str, Any]]:
    """Complete frames out of `buf` (consumed), decoded."""
    out = []
    pos = 0
    n = len(buf)
    while n - pos >= 4:
        (length,) = HEADER.unpack_from(buf, pos)
        if n - pos - 4 < length:
            break
        out.append(json.loads(bytes(buf[pos + 4: pos + 4 + length])))
        pos += 4 + length
    if pos:
        del buf[:pos]
    return out


def loopback(k: int) -> str:
    """127.0.0.k: one more source address on the loopback interface."""
    return f"127.0.0.{k}"


class BlockingPeer:
    """A blocking connection for set-up steps and for the abusers."""

    def __init__(self, port: int, rcvbuf: Optional[int] = None, timeout: float = 5.0,
                 source: Optional[str] = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pending: List[Dict[str, Any]] = []
        self.welcome: Dict[str, Any] = {}

    def send(self, obj: Dict[str, Any]) -> None:
        self.sock.sendall(encode(obj))

    def until(self, pred: Callable[[Dict[str, Any]], bool], timeout: float = 5.0) -> List[Dict[str, Any]]:
        """Events up to and including the first for which pred is true."""
        deadline = time.monotonic() + timeout
        got: List[Dict[str, Any]] = []
        while True:
            while self.pending:
                ev = self.pending.pop(0)
                got.append(ev)
                if pred(ev):
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met; got {got[-3:]!r}")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed by the server")
            self.buf += data
            self.pending += take_frames(self.buf)

    def register(self, nick: str, timeout: float = 5.0) -> None:
        self.send({"type": "hello", "nick": nick, "client": "soak"})
        first = self.until(lambda e: True, timeout)[0]
        if first.get("type") != "welcome":
            raise ConnectionError(f"hello refused: {first!r}")
        self.welcome = first
        self.until(lambda e: e.get("type") == "history" and e.get("room") == LOBBY, timeout)

    def join(self, room: str) -> None:
        self.send({"type": "join", "room": room})
        self.until(lambda e: e.get("type") == "history" and e.get("room", "").lower() == room.lower())

    def try_join(self, room: str, ref: int, timeout: float = 10.0) -> str:
        """'joined', or the error word the server answered the join with."""
        self.send({"type": "join", "room": room, "ref": ref})
        got = self.until(lambda e: (e.get("type") == "history" and e.get("room", "").lower() == room.lower())
                         or (e.get("type") == "error" and e.get("ref") == ref), timeout)
        last = got[-1]
        return "joined" if last.get("type") == "history" else str(last.get("code"))

    def part(self, room: str) -> None:
        self.send({"type": "part", "room": room, "ref": "part"})
        self.until(lambda e: e.get("ref") == "part")

    def wait_eof(self, timeout: float) -> Optional[float]:
        """Read and discard until EOF; seconds it took, or None if still open after `timeout`."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(1 << 16):
                    return time.monotonic() - start
            except socket.timeout:
                return None
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - start

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def cpu_seconds_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Pacer:
    """Sends at `rate` a second, with `credit` of them allowed at once first (within the bucket)."""

    def __init__(self, rate: float, credit: int = 0) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic() - credit * self.interval

    def wait(self, until: float) -> bool:
        """Sleep to the next slot; False when that slot is at or after `until`."""
        self.next = max(self.next + self.interval, time.monotonic() - 2 * self.interval)
        if self.next >= until:
            return False
        delay = self.next - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return True


# --- latency bookkeeping --------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> Optional[float]:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def outside_windows(send_ns: Sequence[int], lat_us: Sequence[int], windows: Sequence[Tuple[int, int]],
                    settle_ns: int) -> List[int]:
    """Latencies of the deliveries whose [sent, received] span touches no window (+ settle).

    A message sent just before a stall and delivered after it waited the stall out as much as
    one sent during it, and the backlog takes a moment to clear after SIGCONT: both count as
    inside. What is left is the latency a client sees while the server runs.
    """
    spans = sorted((a, b + settle_ns) for a, b in windows)
    out = []
    for t, lat in zip(send_ns, lat_us):
        end = t + lat * 1000
        if not any(t < b and end > a for a, b in spans):
            out.append(lat)
    return out


def parse_rates(spec: str, n: int) -> List[float]:
    """'8' -> [8.0]*n; '5-9.5' -> n rates spread evenly from 5 to 9.5."""
    if "-" in spec:
        lo_s, hi_s = spec.split("-", 1)
        lo, hi = float(lo_s), float(hi_s)
        if not 0 < lo <= hi:
            raise ValueError(f"bad rate range {spec!r}")
        if n == 1:
            return [hi]
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    rate = float(spec)
    if rate <= 0:
        raise ValueError(f"bad rate {spec!r}")
    return [rate] * n


# --- the well-behaved worker ----------------------------------------------------------------


def rooms_of(i: int, rooms: int) -> List[str]:
    """Client i's two fixed rooms (of `rooms`), never changed during the run."""
    first = i % rooms
    return [f"#soak{first}", f"#soak{(first + 1) % rooms}"] if rooms > 1 else ["#soak0"]


def good_worker(port: int, n: int, rooms: int, rates: List[float], duration: float, text_min: int,
                text_max: int, tag: str, ready: Any, go: Any, results: Any, seed: int) -> None:
    try:
        results.put(("good", _good_worker(port, n, rooms, rates, duration, text_min, text_max, tag, ready, go,
                                          seed)))
    except BaseException as exc:  # report, never hang the driver
        results.put(("good", {"error": f"{type(exc).__name__}: {exc}"}))


def _good_worker(port: int, n: int, rooms: int, rates: List[float], duration: float, text_min: int,
                 text_max: int, tag: str, ready: Any, go: Any, seed: int) -> Dict[str, Any]:
    rnd = random.Random(seed)
    peers = []
    for i in range(n):
        p = BlockingPeer(port)
        p.register(f"good{i}")
        peers.append(p)
    limits = dict(peers[0].welcome.get("limits", {}))
    for i, p in enumerate(peers):
        for room in rooms_of(i, rooms):
            p.join(room)
    members: Dict[str, List[int]] = collections.defaultdict(list)
    for i in range(n):
        for room in rooms_of(i, rooms):
            members[room].append(i)
    # Everyone's joins have been sent; a ping round trip on each makes sure they are all done.
    for p in peers:
        p.send({"type": "ping", "token": "ready"})
        p.until(lambda e: e.get("type") == "pong" and e.get("token") == "ready")
        p.pending.clear()
    ready.set()
    if not go.wait(600):
        raise RuntimeError("never told to go")

    sel = selectors.DefaultSelector()
    bufs = [bytearray(p.buf) for p in peers]
    outq: List[bytearray] = [bytearray() for _ in peers]
    for i, p in enumerate(peers):
        p.sock.setblocking(False)
        sel.register(p.sock, selectors.EVENT_READ, i)

    sent: Dict[Tuple[int, int], Tuple[str, int]] = {}  # (sender, seq) -> (room, send ns)
    confirmed: Dict[Tuple[int, int], int] = {}  # -> message id
    refused = 0
    other_errors: collections.Counter = collections.Counter()
    received: Dict[Tuple[int, int], set] = collections.defaultdict(set)
    duplicates = 0
    order_violations = 0
    last_id: Dict[Tuple[int, str], int] = {}
    # Deliveries to members other than the sender: when sent (ns), how long it took (µs).
    lat_send = array.array("q")
    lat_us = array.array("q")
    lat_from = array.array("h")  # the sender, to tell one stuck client from a slow server
    quits: Dict[str, str] = {}
    closed: List[int] = []
    pongs = set()
    seq = [0] * n
    cpu0 = cpu_seconds_self()
    t0 = time.monotonic()
    t_end = t0 + duration
    intervals = [1.0 / rates[i % len(rates)] for i in range(n)]
    next_send = [t0 + rnd.random() * intervals[i] for i in range(n)]
    phase = "chat"
    drain_deadline = t_end + 15.0

    def flush(i: int) -> None:
        q = outq[i]
        if not q:
            return
        try:
            k = peers[i].sock.send(q)
            del q[:k]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            q.clear()  # the connection is gone; its reader notes it

    def handle(i: int, ev: Dict[str, Any], now_ns: int) -> None:
        nonlocal refused, duplicates, order_violations
        kind = ev.get("type")
        if kind == "message" and "room" in ev:
            parts = ev.get("text", "").split(" ", 4)
            if len(parts) < 4 or parts[0] != tag:
                return
            j, s, t_ns = int(parts[1]), int(parts[2]), int(parts[3])
            key = (j, s)
            if i in received[key]:
                duplicates += 1
            received[key].add(i)
            room = ev["room"].lower()
            if last_id.get((i, room), 0) >= ev["id"]:
                order_violations += 1
            last_id[(i, room)] = ev["id"]
            if j == i and "ref" in ev:
                confirmed[key] = ev["id"]
            elif j != i:
                lat_send.append(t_ns)
                lat_us.append((now_ns - t_ns) // 1000)
                lat_from.append(j)
        elif kind == "error":
            if ev.get("code") == "rate_limited":
                refused += 1
                if "ref" in ev:
                    sent.pop((i, ev["ref"]), None)  # not said: nobody is owed it
            else:
                other_errors[ev.get("code")] += 1
        elif kind == "quit":
            quits.setdefault(ev["nick"], ev["reason"])
        elif kind == "pong" and ev.get("token") == "final":
            pongs.add(i)
        elif kind == "ping":
            outq[i] += encode({"type": "pong", "token": ev.get("token")})
            flush(i)

    while True:
        now = time.monotonic()
        if phase == "chat":
            if now >= t_end:
                phase = "drain"
            else:
                for i in range(n):
                    if next_send[i] <= now and i not in closed:
                        seq[i] += 1
                        my_rooms = rooms_of(i, rooms)
                        room = my_rooms[seq[i] % len(my_rooms)]
                        t_ns = time.monotonic_ns()
                        pad = "x" * rnd.randint(text_min, text_max)
                        outq[i] += encode({"type": "say", "room": room,
                                           "text": f"{tag} {i} {seq[i]} {t_ns} {pad}", "ref": seq[i]})
                        sent[(i, seq[i])] = (room, t_ns)
                        next_send[i] += intervals[i]
                        flush(i)
        if phase == "drain":
            if all(k in confirmed for k in sent) or now >= drain_deadline:
                for i in range(n):
                    if i not in closed:
                        outq[i] += encode({"type": "ping", "token": "final"})
                        flush(i)
                phase = "final"
        if phase == "final" and (len(pongs) + len(closed) >= n or now >= drain_deadline + 5):
            break
        for i in range(n):
            if outq[i]:
                flush(i)
        wait = 0.05
        if phase == "chat":
            wait = max(0.0, min(min(next_send) - time.monotonic(), 0.05))
        for key, _ in sel.select(wait):
            i = key.data
            try:
                data = peers[i].sock.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                data = b""
            now_ns = time.monotonic_ns()
            if not data:
                closed.append(i)
                sel.unregister(peers[i].sock)
                continue
            bufs[i] += data
            for ev in take_frames(bufs[i]):
                handle(i, ev, now_ns)
    wall = time.monotonic() - t0
    cpu = cpu_seconds_self() - cpu0

    expected = 0
    delivered = 0
    lost = 0
    lost_examples: List[str] = []
    for key, (room, t_ns) in sent.items():
        want = set(members[room])
        got = received.get(key, set())
        expected += len(want)
        delivered += len(want & got)
        missing = want - got
        lost += len(missing)
        if missing and len(lost_examples) < 5:
            lost_examples.append(f"good{key[0]} seq {key[1]} in {room} at +{(t_ns / 1e9 - t0):.2f} s, "
                                 f"missed by {sorted(missing)[:5]}")
    unanswered = sum(1 for k in sent if k not in confirmed)

    for p in peers:
        p.close()
    return {
        "clients": n, "sent": len(sent), "confirmed": len(confirmed), "unanswered": unanswered,
        "refused": refused, "other_errors": dict(other_errors), "expected": expected,
        "delivered": delivered, "lost": lost, "lost_examples": lost_examples, "duplicates": duplicates,
        "order_violations": order_violations, "lat_send_ns": lat_send.tolist(), "lat_us": lat_us.tolist(),
        "lat_from": lat_from.tolist(),
        "quit_reasons": dict(collections.Counter(quits.values())), "limits": limits,
        "well_behaved_closed": len(closed), "closed_which": sorted(closed), "cpu_s": cpu, "wall_s": wall,
        "t0_ns": int(t0 * 1e9),
    }


# --- the abusers ----------------------------------------------------------------------------


class Drain:
    """Keeps held connections (fillers, hoarders, the long writer) read, so they stay members.

    Their rooms exist only while they are in them; a holder that stopped reading would be
    dropped as a slow consumer by the room and lobby traffic, and the rooms would vanish.
    Nothing is decoded: a held connection only has to take its bytes.
    """

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.closed: collections.Counter = collections.Counter()
        self.held: collections.Counter = collections.Counter()
        self.stop = threading.Event()
        self.peers: List[BlockingPeer] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def hold(self, kind: str, p: BlockingPeer) -> None:
        p.sock.setblocking(False)
        with self.lock:
            self.peers.append(p)
            self.held[kind] += 1
            self.sel.register(p.sock, selectors.EVENT_READ, kind)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                empty = not self.sel.get_map()
            if empty:
                time.sleep(0.05)
                continue
            for key, _ in self.sel.select(0.05):
                try:
                    data = key.fileobj.recv(1 << 18)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    with self.lock:
                        self.closed[key.data] += 1
                        self.sel.unregister(key.fileobj)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for p in self.peers:
            p.close()


def blast(sock: socket.socket, frames: Iterator[bytes], seconds: float, pace: Optional[float] = None,
          handshake_timeout: float = 5.0) -> Tuple[str, int, int]:
    """Send `frames` (as fast as the socket takes them, or one per `pace` s) for up to
    `seconds`, reading what comes back; (outcome, frames sent, bytes sent).

    The outcome says how the server ended it: `excess flood` (its last error said so), after
    the handshake timeout without a word, or still open when we stopped.
    """
    sock.setblocking(False)
    out = bytearray()
    inbuf = bytearray()
    codes: collections.Counter = collections.Counter()
    last_message = ""
    frames_sent = bytes_sent = 0
    start = time.monotonic()
    deadline = start + seconds
    next_at = start
    ended = ""
    while not ended:
        now = time.monotonic()
        if now >= deadline:
            ended = "still open when the flooder stopped"
            break
        # Unpaced: top the queue up to 64 KiB in one go (a flood costs the driver little).
        while len(out) < 65536 and (pace is None or now >= next_at):
            chunk = next(frames)
            out += chunk
            frames_sent += 1
            bytes_sent += len(chunk)
            if pace is not None:
                next_at += pace
                break
        if pace is None:
            timeout = 0.0 if len(out) < 65536 else 0.2  # room for more: go on; else wait to write
        else:
            timeout = max(0.0, min(next_at - now, 0.2))
        try:
            readable, writable, _ = select.select([sock], [sock] if out else [], [], timeout)
        except ValueError:
            ended = "driver saw a closed socket"
            break
        try:
            if readable:
                data = sock.recv(1 << 18)
                if not data:
                    ended = "closed"
                else:
                    inbuf += data
                    for ev in take_frames(inbuf):
                        if ev.get("type") == "error":
                            codes[ev.get("code")] += 1
                            last_message = str(ev.get("message", ""))
            if writable and out and not ended:
                k = sock.send(out)
                del out[:k]
        except (BlockingIOError, InterruptedError):
            pass
        except (ConnectionResetError, BrokenPipeError):
            ended = "reset"
    took = time.monotonic() - start
    if ended in ("closed", "reset"):
        if "excess flood" in last_message:
            ended = "dropped: excess flood"
        elif not last_message and took >= handshake_timeout - 0.5:
            ended = "closed by the handshake timeout"
        elif last_message:
            ended = f"closed after error {sorted(codes)}"
        else:
            ended = f"closed silently ({ended})"
    return ended, frames_sent, bytes_sent


def abuser_worker(port: int, role: str, cfg: Dict[str, Any], ready: Any, go: Any, results: Any,
                  seed: int) -> None:
    try:
        fn = _churn_worker if role == "churn" else _abuser_worker
        results.put((role, fn(port, cfg, ready, go, seed)))
    except BaseException as exc:
        ready.set()
        results.put((role, {"error": f"{type(exc).__name__}: {exc}"}))


def _churn_worker(port: int, cfg: Dict[str, Any], ready: Any, go: Any, seed: int) -> Dict[str, Any]:
    """Finding 1: connect, hello, reset (SO_LINGER 0), as fast as --churn-rate says."""
    ready.set()
    go.wait(600)
    cpu0 = cpu_seconds_self()
    rate = float(cfg["churn_rate"])
    start = time.monotonic()
    t_end = start + cfg["duration"]
    outcomes: collections.Counter = collections.Counter()
    linger = struct.pack("ii", 1, 0)
    n = 0
    base = start
    pid = os.getpid()
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        due = base + n / rate
        if due > now:
            time.sleep(due - now)
        elif due < now - 1.0:
            base += (now - 1.0) - due  # more than a second behind (a stall): catch up 1 s, not all
        n += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.connect((HOST, port))
            s.send(encode({"type": "hello", "nick": f"churn{pid % 1000}x{n}"}))
            outcomes["hello, then reset"] += 1
        except socket.timeout:
            outcomes["connect timed out"] += 1
        except OSError as exc:
            outcomes[f"driver saw {type(exc).__name__}"] += 1
        finally:
            s.close()
    wall = time.monotonic() - start
    return {"kinds": {"churn": dict(outcomes)}, "connections": n, "rate": n / max(wall, 1e-9),
            "cpu_s": cpu_seconds_self() - cpu0}


def _abuser_worker(port: int, cfg: Dict[str, Any], ready: Any, go: Any, seed: int) -> Dict[str, Any]:
    duration = cfg["duration"]
    rooms = cfg["rooms"]
    stats: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    names = iter(range(1, 1 << 30))
    room_names = [f"#soak{k}" for k in range(rooms)]
    drain = Drain()
    facts: Dict[str, Any] = {}

    def note(kind: str, outcome: str, k: int = 1) -> None:
        with lock:
            stats[kind][outcome] += k

    def nick(prefix: str) -> str:
        with lock:
            return f"{prefix}{next(names)}"

    # -- set-up: rooms and long messages, before the clock starts ---------------------------
    probe = BlockingPeer(port)
    probe.register(nick("probe"))
    limits = probe.welcome.get("limits", {})
    probe.close()
    max_frame = int(limits.get("max_frame", 65536))
    max_text = int(limits.get("max_text", 4096))
    rate = float(limits.get("rate", 10.0))
    burst = int(limits.get("burst", 20))
    join_rate = min(cfg["ask_rate"], rate * 0.95)
    per_user = MAX_ROOMS_PER_USER

    fill_created: Dict[str, int] = collections.Counter()

    def fill_one(addr: str, conn: int, count: int) -> None:
        try:
            p = BlockingPeer(port, source=addr, timeout=10)
            p.register(nick("fill"))
            p.part(LOBBY)  # these are about rooms: they take no part in the lobby's traffic
            pacer = Pacer(join_rate, credit=burst - 4)
            for k in range(count):
                pacer.wait(float("inf"))
                got = p.try_join(f"#f{addr.rsplit('.', 1)[1]}x{conn}x{k}", k)
                if got != "joined":
                    note("room filler", f"join refused: {got}")
                    if got == "too_many_rooms":
                        break
                    continue
                with lock:
                    fill_created[addr] += 1
            drain.hold("room filler", p)
        except (OSError, TimeoutError, ConnectionError) as exc:
            note("room filler", f"driver saw {type(exc).__name__}")

    fill_threads = []
    left = cfg["fill_rooms"]
    a = 0
    while left > 0:
        addr = loopback(ADDR_FILL + a)
        share = min(left, ROOMS_PER_ADDRESS)
        for c in range(math.ceil(share / per_user)):
            fill_threads.append(threading.Thread(target=fill_one, args=(addr, c, min(per_user, share - c * per_user)),
                                                 daemon=True))
        left -= share
        a += 1
    facts["fill_addresses"] = a
    long_ids: List[int] = []

    def write_long() -> None:
        # Long messages: max_text code points of 4-byte UTF-8, the largest say the limits allow.
        try:
            p = BlockingPeer(port, source=loopback(ADDR_LONG), timeout=10)
            p.register(nick("long"))
            p.join(LONG_ROOM)
            text = "\U0001F600" * max_text
            pacer = Pacer(join_rate, credit=burst - 4)
            for k in range(cfg["long_messages"]):
                pacer.wait(float("inf"))
                p.send({"type": "say", "room": LONG_ROOM, "text": text, "ref": k})
                ev = p.until(lambda e: e.get("ref") == k, 10)[-1]
                if ev.get("type") == "message":
                    long_ids.append(int(ev["id"]))
                else:
                    note("long writer", f"say refused: {ev.get('code')}")
            facts["long_message_bytes"] = len(text.encode("utf-8"))
            drain.hold("long writer", p)
        except (OSError, TimeoutError, ConnectionError) as exc:
            note("long writer", f"driver saw {type(exc).__name__}")

    setup = fill_threads + ([threading.Thread(target=write_long, daemon=True)] if cfg["long_messages"] else [])
    t_setup = time.monotonic()
    for t in setup:
        t.start()
    for t in setup:
        t.join(600)
    facts["setup_s"] = time.monotonic() - t_setup
    facts["filled"] = sum(fill_created.values())
    facts["fill_max_per_address"] = max(fill_created.values(), default=0)
    facts["long_messages"] = len(long_ids)
    ready.set()
    go.wait(600)

    # -- the run ------------------------------------------------------------------------------
    cpu0 = cpu_seconds_self()
    t_start = time.monotonic()
    t_end = t_start + duration

    def paced(kind: str, per_second: float, max_count: int, action: Callable[[random.Random], Optional[str]]) -> None:
        """Run `action` every 1/per_second s until the end of the run, at most max_count times."""
        rnd = random.Random(f"{seed}-{kind}")
        start = time.monotonic()
        for k in range(max_count):
            at = start + k / per_second
            if at >= t_end:
                return
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                note(kind, action(rnd) or "done")
            except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
                note(kind, f"driver saw {type(exc).__name__}")

    def garbage(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        try:
            p.sock.sendall(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300))))
            p.sock.shutdown(socket.SHUT_WR)
            return "closed by server" if p.wait_eof(5.0) is not None else "still open"
        finally:
            p.close()

    def half_hello(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        frame = encode({"type": "hello", "nick": "vanish"})
        p.sock.sendall(frame[: rnd.randint(1, len(frame) - 1)])
        p.close()
        return "sent half a hello, closed"

    def mid_frame(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        try:
            p.register(nick("mid"))
            frame = encode({"type": "say", "room": LOBBY, "text": "never finished " * 20})
            p.sock.sendall(frame[: rnd.randint(1, len(frame) - 1)])
            return "registered, half a frame, closed"
        finally:
            p.close()

    def flood(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        try:
            p.register(nick("flood"))
            p.sock.sendall(b"".join(encode({"type": "ping", "token": k}) for k in range(100)))
            return "dropped" if p.wait_eof(5.0) is not None else "still open"
        finally:
            p.close()

    def silent(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        try:
            took = p.wait_eof(max(0.1, min(15.0, t_end + 10 - time.monotonic())))
            return "closed by server" if took is not None else "still open at the end"
        finally:
            p.close()

    stallers: List[BlockingPeer] = []

    def stall(rnd: random.Random) -> str:
        # Register and join every room (reading those answers), then never read again.
        p = BlockingPeer(port, rcvbuf=4096)
        p.register(nick("stall"))
        for room in room_names:
            p.join(room)
        with lock:
            stallers.append(p)
        return "stalling"

    # Finding 8: pong frames as large as a frame may be, streamed without pause.
    pong_payload = b'{"type":"pong","token":"' + b"p" * (max_frame - 40) + b'"}'
    pong_frame = frame_raw(pong_payload)

    def pong_flood(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        try:
            p.register(nick("pong"))
            outcome, frames, sent = blast(p.sock, iter(lambda: pong_frame, None), min(20.0, t_end - time.monotonic()))
            note("pong flooder (frames sent)", f"{len(pong_frame) // 1024} KiB pongs", frames)
            return outcome
        finally:
            p.close()

    # Finding 8: floods before registration, then reconnect.
    bad_hello = encode({"type": "hello", "nick": "-bad nick-"})
    bad_json = frame_raw(b"{this is not json")
    ping = encode({"type": "ping", "token": "pre"})

    def prereg(frame: bytes, pace: Optional[float]) -> Callable[[random.Random], str]:
        def action(rnd: random.Random) -> str:
            p = BlockingPeer(port)
            try:
                seconds = min(10.0, max(0.1, t_end - time.monotonic()))
                outcome, _, _ = blast(p.sock, iter(lambda: frame, None), seconds, pace, cfg["handshake_timeout"])
                return outcome
            finally:
                p.close()
        return action

    # Finding 4: expensive answers, asked for at the rate limit (no faster).
    ask_stats: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ask_latency: Dict[str, List[float]] = collections.defaultdict(list)

    def asker(kind: str, make: Callable[[int, Dict[str, Any]], Dict[str, Any]], join: Optional[str]) -> None:
        st = ask_stats[kind]
        try:
            p = BlockingPeer(port, timeout=10)
            p.register(nick("ask"))
            if join:
                p.join(join)
        except (OSError, TimeoutError, ConnectionError) as exc:
            st[f"driver saw {type(exc).__name__}"] += 1
            return
        sock = p.sock
        sock.setblocking(False)
        inbuf = bytearray(p.buf)
        state: Dict[str, Any] = {"offset": 0}
        asked: Dict[int, float] = {}
        pacer = Pacer(cfg["ask_rate"])
        k = 0
        open_ = True
        while open_:
            if not pacer.wait(t_end):
                break
            k += 1
            try:
                sock.sendall(encode(make(k, state)))
            except BlockingIOError:
                st["send would block"] += 1
                continue
            except OSError:
                break
            asked[k] = time.monotonic()
            st["requests"] += 1
            # Read what has come until the next slot.
            while True:
                left = pacer.next + pacer.interval - time.monotonic()
                r, _, _ = select.select([sock], [], [], max(0.0, min(left, 0.2)))
                if not r:
                    if left <= 0:
                        break
                    continue
                try:
                    data = sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    st["closed by the server"] += 1
                    open_ = False
                    break
                st["answer bytes"] += len(data)
                inbuf += data
                for ev in take_frames(inbuf):
                    ref = ev.get("ref")
                    kind_ev = ev.get("type")
                    if kind_ev == "error":
                        st[f"error {ev.get('code')}"] += 1
                        asked.pop(ref, None)
                    elif kind_ev == "ping":
                        sock.sendall(encode({"type": "pong", "token": ev.get("token")}))
                    elif kind_ev == "rooms" and isinstance(ref, int):
                        st["rooms frames"] += 1
                        if not ev.get("more"):
                            state["offset"] = 0
                            done = True
                        elif "next" in ev:
                            state["offset"] = int(ev["next"])
                            done = True
                        else:
                            done = False
                        if done and ref in asked:
                            st["answers"] += 1
                            ask_latency[kind].append(time.monotonic() - asked.pop(ref))
                    elif kind_ev == "history" and isinstance(ref, int):
                        st["answers"] += 1
                        st["messages in answers"] += len(ev.get("messages", []))
                        if ref in asked:
                            ask_latency[kind].append(time.monotonic() - asked.pop(ref))
        p.close()

    def rooms_request(k: int, state: Dict[str, Any]) -> Dict[str, Any]:
        return {"type": "rooms", "offset": state["offset"], "ref": k}

    rnd_hist = random.Random(f"{seed}-history")

    def history_request(k: int, state: Dict[str, Any]) -> Dict[str, Any]:
        req: Dict[str, Any] = {"type": "history", "room": LONG_ROOM, "limit": 200, "ref": k}
        if long_ids and rnd_hist.random() < 0.7:
            req["before"] = rnd_hist.choice(long_ids) + 1
        return req

    # Finding 9: hoarders on several addresses, each connection after 100 new rooms.
    hoard_created: Dict[str, int] = collections.Counter()
    hoarders_done = threading.Event()
    hoard_lock_count = [cfg["hoard_addresses"] * cfg["hoard_conns"]]

    def hoard(addr: str, conn: int) -> None:
        try:
            p = BlockingPeer(port, source=addr, timeout=10)
            p.register(nick("hoard"))
            p.part(LOBBY)
            pacer = Pacer(join_rate, credit=burst - 4)
            refusals = 0
            for k in range(per_user + 5):
                if not pacer.wait(t_end - 3):
                    break
                got = p.try_join(f"#h{addr.rsplit('.', 1)[1]}x{conn}x{k}", k)
                if got == "joined":
                    with lock:
                        hoard_created[addr] += 1
                    continue
                note("room hoarder (joins)", f"refused: {got}")
                refusals += 1
                if refusals >= 3:
                    break
            drain.hold("room hoarder", p)
        except (OSError, TimeoutError, ConnectionError) as exc:
            note("room hoarder (joins)", f"driver saw {type(exc).__name__}")
        finally:
            with lock:
                hoard_lock_count[0] -= 1
                if hoard_lock_count[0] <= 0:
                    hoarders_done.set()

    newcomers: Dict[str, str] = {}

    def newcomer() -> None:
        hoarders_done.wait(max(0.1, t_end - 2 - time.monotonic()))
        for label, source in (("from 127.0.0.1", None), ("from a fresh address", loopback(ADDR_FRESH))):
            try:
                p = BlockingPeer(port, source=source, timeout=10)
                p.register(nick("newcomer"))
                newcomers[label] = p.try_join(f"#new{next(names)}", 1)
                p.close()
            except (OSError, TimeoutError, ConnectionError) as exc:
                newcomers[label] = f"driver saw {type(exc).__name__}"
        facts["hoarders_done_at_s"] = time.monotonic() - t_start

    threads = [
        threading.Thread(target=paced, args=("garbage", 20, 2000, garbage)),
        threading.Thread(target=paced, args=("half hello", 10, 1000, half_hello)),
        threading.Thread(target=paced, args=("mid-frame close", 4, 400, mid_frame)),
        threading.Thread(target=paced, args=("flooder", 1, 100, flood)),
        threading.Thread(target=paced, args=("staller", 0.5, 50, stall)),
    ]
    # Silent connections: a few at a time, each waits for the server to close it.
    threads += [threading.Thread(target=paced, args=("silent", 0.2, 20, silent)) for _ in range(3)]
    threads += [threading.Thread(target=paced, args=("pong flooder", 2, 1000, pong_flood))
                for _ in range(cfg["pong_flooders"])]
    if cfg["prereg_flooders"]:
        threads += [
            threading.Thread(target=paced, args=("pre-registration bad hello flood", 2, 1000, prereg(bad_hello, None))),
            threading.Thread(target=paced, args=("pre-registration bad JSON flood", 2, 1000, prereg(bad_json, None))),
            threading.Thread(target=paced, args=("pre-registration ping flood", 2, 1000, prereg(ping, None))),
            threading.Thread(target=paced, args=("pre-registration pings at 5/s", 1, 1000, prereg(ping, 0.2))),
        ]
    threads += [threading.Thread(target=asker, args=("rooms pager", rooms_request, None))
                for _ in range(cfg["rooms_askers"])]
    threads += [threading.Thread(target=asker, args=("history limit=200", history_request, LONG_ROOM))
                for _ in range(cfg["history_askers"])]
    for a in range(cfg["hoard_addresses"]):
        threads += [threading.Thread(target=hoard, args=(loopback(ADDR_HOARD + a), c))
                    for c in range(cfg["hoard_conns"])]
    if not cfg["hoard_addresses"] or not cfg["hoard_conns"]:
        hoarders_done.set()
    threads.append(threading.Thread(target=newcomer))
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:
        t.join(max(0.1, t_end + 25 - time.monotonic()))
    for p in stallers:
        p.close()
    drain.close()
    facts["hoarded"] = sum(hoard_created.values())
    facts["hoard_max_per_address"] = max(hoard_created.values(), default=0)
    facts["newcomers"] = newcomers
    facts["held_dropped"] = dict(drain.closed)
    facts["held"] = dict(drain.held)
    facts["max_frame"] = max_frame
    facts["pong_frame_bytes"] = len(pong_frame)
    facts["askers"] = {k: dict(v) for k, v in ask_stats.items()}
    facts["ask_latency_s"] = {k: {"p50": percentile(sorted(v), 50), "p99": percentile(sorted(v), 99),
                                  "max": max(v) if v else None} for k, v in ask_latency.items()}
    return {"kinds": {k: dict(v) for k, v in stats.items()}, "facts": facts, "cpu_s": cpu_seconds_self() - cpu0}


# --- the server -----------------------------------------------------------------------------


class Server:
    def __init__(self, flags: List[str], db: str) -> None:
        self.cmd = [sys.executable, "-m", "selchat.server", "--host", HOST, "--port", "0", "--db", db, *flags]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(self.cmd, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: List[str] = []
        self._port = threading.Event()
        self.port = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(10):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if not self.port:
                m = re.search(r"listening on [\d.]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    self._port.set()

    def status_kib(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def closes_by_reason(self) -> Dict[str, int]:
        """The server's own `closed: PEER: detail` lines, details normalised.

        Closes of connections that never registered are logged once per kind and period with
        a count ("(N more like this in the last 10 s)"): the count is added back here."""
        out: collections.Counter = collections.Counter()
        for line in self.lines:
            m = re.search(r"selchat\.server: closed: \S+: (.*)$", line)
            if m:
                detail = m.group(1).strip()
                more = re.search(r" \((\d+) more like this in the last \d+ s\)$", detail)
                repeats = 1
                if more:
                    repeats += int(more.group(1))
                    detail = detail[: more.start()]
                if detail.startswith("quit:"):
                    detail = "quit"
                detail = re.sub(r"\d+", "N", detail)
                out[detail] += repeats
        return dict(out)


def machine_busy() -> Tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)




# --- one run --------------------------------------------------------------------------------


def stall_schedule(duration: float, every: float, length: float) -> List[Tuple[float, float]]:
    """(offset, seconds) of each stall: the first at every/2 (or a quarter of a short run),
    then every `every` s, as long as the stall ends within the run. Both runs get the same."""
    if every <= 0 or length <= 0:
        return []
    first = min(every / 2, duration / 4)
    length = min(length, duration / 4)
    out = []
    t = first
    while t + length <= duration:
        out.append((t, length))
        t += every
    return out


class Staller:
    """Finding 3's busy machine: SIGSTOP the server, SIGCONT it `seconds` later, on a schedule."""

    def __init__(self, pid: int, schedule: List[Tuple[float, float]]) -> None:
        self.pid = pid
        self.schedule = schedule
        self.windows: List[Tuple[int, int]] = []  # monotonic ns, as the good worker's clock
        self.cancel = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.thread.start()

    def _run(self) -> None:
        for offset, seconds in self.schedule:
            if self.cancel.wait(max(0.0, self.t0 + offset - time.monotonic())):
                return
            a = time.monotonic_ns()
            try:
                os.kill(self.pid, signal.SIGSTOP)
                self.stopped = True
                self.cancel.wait(seconds)
            finally:
                os.kill(self.pid, signal.SIGCONT)
                self.stopped = False
                self.windows.append((a, time.monotonic_ns()))
            if self.cancel.is_set():
                return

    def stop(self) -> None:
        self.cancel.set()
        self.thread.join(10)
        if self.stopped:
            os.kill(self.pid, signal.SIGCONT)


def server_sockets(pid: int) -> int:
    """Sockets the server holds now (its listener among them)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


def run(args: argparse.Namespace, abusers: bool, stalls: bool) -> Dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="selchat-soak-")
    db = os.path.join(tmp, "history.db")
    flags = SERVER_FLAGS + shlex.split(args.server_args)
    srv = Server(flags, db)
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    tag = f"soak{os.getpid()}{int(abusers)}"
    rates = parse_rates(args.msg_rate, args.clients)
    procs = [ctx.Process(target=good_worker, args=(srv.port, args.clients, args.rooms, rates, args.duration,
                                                  args.text_min, args.text_max, tag, ready, go, results, args.seed))]
    cfg = {"duration": args.duration, "rooms": args.rooms, "churn_rate": args.churn_rate,
           "fill_rooms": args.fill_rooms, "long_messages": args.long_messages, "ask_rate": args.ask_rate,
           "rooms_askers": args.rooms_askers, "history_askers": args.history_askers,
           "pong_flooders": args.pong_flooders, "prereg_flooders": args.prereg_flooders,
           "hoard_addresses": args.hoard_addresses, "hoard_conns": args.hoard_conns,
           "handshake_timeout": 5.0}
    readies = []
    if abusers:
        roles = ["abusers"] + (["churn"] if args.churn_rate > 0 else [])
        for role in roles:
            ev = ctx.Event()
            readies.append(ev)
            procs.append(ctx.Process(target=abuser_worker, args=(srv.port, role, cfg, ev, go, results, args.seed)))
    schedule = stall_schedule(args.duration, args.stall_every, args.stall_for) if stalls else []
    staller = Staller(srv.proc.pid, schedule)
    out: Dict[str, Any] = {"abusers": abusers, "server_cmd": srv.cmd, "stall_schedule": schedule}
    got: Dict[str, Any] = {}
    try:
        procs[0].start()
        if not ready.wait(120):
            raise RuntimeError("well-behaved clients did not get ready")
        t_setup = time.monotonic()
        for p in procs[1:]:
            p.start()
        for ev in readies:
            if not ev.wait(900):
                raise RuntimeError("abusers did not finish their set-up")
        out["setup_s"] = time.monotonic() - t_setup
        base_rss = srv.status_kib("VmRSS")
        out["rss_after_setup_kib"] = base_rss
        cpu0, busy0, main_cpu0 = srv.cpu_s(), machine_busy(), cpu_seconds_self()
        peak_sampled = base_rss
        peak_sockets = server_sockets(srv.proc.pid)
        t0 = time.monotonic()
        go.set()
        staller.start(t0)
        busy1 = busy0
        deadline = t0 + args.duration + 90
        while len(got) < len(procs) and time.monotonic() < deadline:
            try:
                kind, res = results.get(timeout=0.25)
                got[kind] = res
            except Exception:  # queue.Empty
                pass
            if srv.proc.poll() is None:
                peak_sampled = max(peak_sampled, srv.status_kib("VmRSS"))
                peak_sockets = max(peak_sockets, server_sockets(srv.proc.pid))
            if time.monotonic() - t0 <= args.duration + 0.5 and srv.proc.poll() is None:
                out["server_cpu_s"], busy1, out["window_s"] = srv.cpu_s() - cpu0, machine_busy(), time.monotonic() - t0
        staller.stop()
        out["alive"] = srv.proc.poll() is None
        out["peak_rss_kib"] = max(srv.status_kib("VmHWM"), peak_sampled) if out["alive"] else None
        out["end_rss_kib"] = srv.status_kib("VmRSS") if out["alive"] else None
        out["base_rss_kib"] = base_rss
        out["peak_sockets"] = peak_sockets
        out["main_cpu_s"] = cpu_seconds_self() - main_cpu0
        out["machine_busy_cores"] = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
        out.update(got)
    finally:
        staller.stop()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        out["stall_windows"] = staller.windows
        out["exit_code"] = srv.stop()
        out["server_closes"] = srv.closes_by_reason()
        out["server_errors"] = [l.strip() for l in srv.lines if " ERROR " in l or "Traceback" in l][:5]
        out["server_excess_flood_lines"] = sum(1 for l in srv.lines if "excess flood from" in l)
        if args.server_log:
            Path(f"{args.server_log}.{'abusers' if abusers else 'clean'}").write_text("".join(srv.lines))
        try:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
        except OSError:
            pass
    summarize(out, args)
    return out


def summarize(r: Dict[str, Any], args: argparse.Namespace) -> None:
    """Latency over the run and outside the stalls, and the memory bound for this run."""
    good = r.get("good")
    if isinstance(good, dict) and "lat_us" in good:
        send, lat, senders = good.pop("lat_send_ns"), good.pop("lat_us"), good.pop("lat_from")
        by_sender: Dict[int, List[int]] = collections.defaultdict(list)
        for j, v in zip(senders, lat):
            by_sender[j].append(v)
        good["p99_by_sender_ms"] = {j: percentile(sorted(v), 99) / 1000.0 for j, v in sorted(by_sender.items())}
        every = sorted(lat)
        outside = sorted(outside_windows(send, lat, r["stall_windows"], int(args.settle * 1e9)))
        good["latency_ms"] = {k: (v / 1000.0 if v is not None else None) for k, v in (
            ("p50", percentile(every, 50)), ("p99", percentile(every, 99)), ("max", every[-1] if every else None))}
        good["latency_outside_ms"] = {k: (v / 1000.0 if v is not None else None) for k, v in (
            ("p50", percentile(outside, 50)), ("p99", percentile(outside, 99)),
            ("max", outside[-1] if outside else None))}
        good["latency_count"] = len(every)
        # p99 of each second of the run (by send time): where a bad p99 came from.
        t0_ns = good.get("t0_ns", 0)
        buckets: Dict[int, List[int]] = collections.defaultdict(list)
        for t, v in zip(send, lat):
            buckets[int((t - t0_ns) // 1_000_000_000)].append(v)
        good["p99_by_second_ms"] = {k: percentile(sorted(v), 99) / 1000.0 for k, v in sorted(buckets.items())}
        good["latency_outside_count"] = len(outside)
        limits = good.get("limits", {})
        max_frame = int(limits.get("max_frame", 0)) or None
    else:
        max_frame = None
    outbuf = 65536
    flags = SERVER_FLAGS + shlex.split(args.server_args)
    for k, f in enumerate(flags[:-1]):
        if f == "--max-outbuf":
            outbuf = int(flags[k + 1])
    r["max_outbuf"] = outbuf
    r["max_frame"] = max_frame
    if max_frame and r.get("peak_sockets"):
        r["bound_kib"] = memory_bound_bytes(r["peak_sockets"], outbuf, max_frame) // 1024


# --- report ---------------------------------------------------------------------------------


def machine_facts() -> Dict[str, str]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": str(os.cpu_count()), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def good_of(r: Dict[str, Any], key: str) -> Any:
    return (r.get("good") or {}).get(key)


def p99_of(r: Dict[str, Any], outside: bool) -> Optional[float]:
    lat = good_of(r, "latency_outside_ms" if outside else "latency_ms") or {}
    return lat.get("p99")


def checks(runs: List[Dict[str, Any]]) -> List[Tuple[str, bool, str]]:
    """(what, passed, detail) for each promise of this run."""
    out: List[Tuple[str, bool, str]] = []
    for r in runs:
        name = "with abusers" if r["abusers"] else "no abusers"
        lost = good_of(r, "lost")
        out.append((f"{name}: no delivery lost", lost == 0, f"lost {fmt(lost)}"))
        refused, closed, other = good_of(r, "refused"), good_of(r, "well_behaved_closed"), good_of(r, "other_errors")
        out.append((f"{name}: no well-behaved client refused or dropped", refused == 0 and closed == 0 and not other,
                    f"refused {fmt(refused)}, dropped {fmt(closed)}, other errors {other or 'none'}"))
        bound, peak = r.get("bound_kib"), r.get("peak_rss_kib")
        out.append((f"{name}: peak RSS within the README's bound", bool(bound and peak and peak <= bound),
                    f"{fmt((peak or 0) / 1024, 1)} <= {fmt((bound or 0) / 1024, 1)} MiB"))
        out.append((f"{name}: server alive, exit 0, no ERROR", bool(r["alive"] and r["exit_code"] == 0
                                                                    and not r["server_errors"]),
                    f"alive {fmt(r['alive'])}, exit {r['exit_code']}, {len(r['server_errors'])} ERROR lines"))
    dirty = [r for r in runs if r["abusers"]]
    clean = [r for r in runs if not r["abusers"]]
    if dirty and clean:
        d, c = dirty[0], clean[0]
        same_stalls = bool(d["stall_schedule"]) == bool(c["stall_schedule"])
        outside = bool(d["stall_windows"] or c["stall_windows"])
        pd, pc = p99_of(d, outside), p99_of(c, outside)
        ok = pd is not None and pc is not None and same_stalls and pd <= 3 * pc
        what = "bystander p99 outside stalls" if outside else "bystander p99"
        out.append((f"{what} within 3x of the run without abusers", ok,
                    f"{fmt(pd)} vs {fmt(pc)} ms = {fmt(pd / pc if pd and pc else None)}x"
                    + ("" if same_stalls else " (NOT the same stalls in both runs)")))
    for r in dirty:
        facts = (r.get("abusers_result") or {}).get("facts") or {}
        newcomers = facts.get("newcomers") or {}
        if newcomers:
            out.append(("newcomers can still create a room", all(v == "joined" for v in newcomers.values()),
                        ", ".join(f"{k}: {v}" for k, v in newcomers.items())))
        if "hoard_max_per_address" in facts:
            most = max(facts["hoard_max_per_address"], facts.get("fill_max_per_address", 0))
            out.append((f"no address holds more than its share ({ROOMS_PER_ADDRESS} rooms)",
                        most <= ROOMS_PER_ADDRESS, f"most created from one address: {most}"))
    return out


def table(runs: List[Dict[str, Any]]) -> str:
    cols = ["with abusers" if r["abusers"] else "no abusers" for r in runs]
    rows: List[Tuple[str, List[str]]] = []

    def row(label: str, fn: Callable[[Dict[str, Any]], str]) -> None:
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError, AttributeError):
                vals.append("–")
        rows.append((label, vals))

    def lat(r: Dict[str, Any], key: str) -> str:
        return " / ".join(fmt(good_of(r, key)[k]) for k in ("p50", "p99", "max"))

    def stalls(r: Dict[str, Any]) -> str:
        w = r["stall_windows"]
        if not w:
            return "none"
        return f"{len(w)} x {fmt(sum(b - a for a, b in w) / len(w) / 1e9, 1)} s, at " + ", ".join(
            f"+{o:g} s" for o, _ in r["stall_schedule"])

    def worst_second(r: Dict[str, Any]) -> str:
        spans = [(o, o + n + settle_s) for o, n in r["stall_schedule"]]
        secs = {k: v for k, v in good_of(r, "p99_by_second_ms").items()
                if not any(a - 1 < int(k) + 1 and int(k) < b for a, b in spans)}
        if not secs:
            return "– (every second touches a stall)"
        k = max(secs, key=lambda s: secs[s])
        return f"{fmt(secs[k])} at +{k} s"

    def facts(r: Dict[str, Any]) -> Dict[str, Any]:
        return r["abusers_result"]["facts"]

    def askers(r: Dict[str, Any], kind: str) -> str:
        st = facts(r)["askers"][kind]
        lt = facts(r)["ask_latency_s"].get(kind, {})
        refused = sum(v for k, v in st.items() if k.startswith("error"))
        return (f"{fmt(st.get('requests', 0))} asked, {fmt(st.get('answers', 0))} answered "
                f"({fmt(st.get('answer bytes', 0) / MIB, 1)} MiB), {fmt(refused)} errors, "
                f"answer p50 {fmt(lt.get('p50'))} s")

    row("stalls of the server (SIGSTOP/SIGCONT)", stalls)
    row("well-behaved clients (messages/s each)", lambda r: f"{fmt(good_of(r, 'clients'))} ({args_rate})")
    row("messages sent (echo received)", lambda r: fmt(good_of(r, "confirmed")))
    row("deliveries owed / delivered", lambda r: f"{fmt(good_of(r, 'expected'))} / {fmt(good_of(r, 'delivered'))}")
    row("**deliveries lost** (must be 0)", lambda r: f"**{fmt(good_of(r, 'lost'))}**")
    row("**well-behaved refused / dropped** (must be 0 / 0)",
        lambda r: f"**{fmt(good_of(r, 'refused'))} / {fmt(good_of(r, 'well_behaved_closed'))}**")
    row("unanswered / other errors / duplicates / order violations", lambda r: " / ".join([
        fmt(good_of(r, "unanswered")), str(sum((good_of(r, "other_errors") or {}).values())),
        fmt(good_of(r, "duplicates")), fmt(good_of(r, "order_violations"))]))
    row("bystander latency p50 / p99 / max (ms), all", lambda r: lat(r, "latency_ms"))
    row(f"**bystander latency p50 / p99 / max (ms), outside stalls** (+{settle_s:g} s after each)",
        lambda r: "**" + lat(r, "latency_outside_ms") + "**"
        + f" ({fmt(good_of(r, 'latency_outside_count'))} of {fmt(good_of(r, 'latency_count'))})")
    row("worst second outside stalls: p99 (ms) at +N s", worst_second)
    clean = [r for r in runs if not r["abusers"]]
    if clean:
        c = clean[0]
        row("p99 vs the run without abusers: all / outside stalls (must be <= 3x)", lambda r: " / ".join(
            fmt(p99_of(r, o) / p99_of(c, o)) + "x" for o in (False, True)))
    row("**server peak RSS (VmHWM) / README bound (MiB)**", lambda r: f"**{fmt(r['peak_rss_kib'] / 1024, 1)} / "
        f"{fmt(r['bound_kib'] / 1024, 1)}**")
    row("bound = 62 MiB + C x (max_outbuf + max_frame + 64 KiB + 4 KiB), C = peak sockets",
        lambda r: f"C = {r['peak_sockets']}, {r['max_outbuf'] // 1024} + {r['max_frame'] // 1024} + 64 + 4 KiB")
    row("server RSS after set-up / at the end (MiB)",
        lambda r: f"{fmt(r['base_rss_kib'] / 1024, 1)} / {fmt(r['end_rss_kib'] / 1024, 1)}")
    row("quits seen by well-behaved clients", lambda r: ", ".join(
        f"{k}: {fmt(v)}" for k, v in sorted(good_of(r, "quit_reasons").items(), key=lambda kv: -kv[1])) or "none")
    row("server `closed:` log lines by detail", lambda r: ", ".join(
        f"{k}: {fmt(v)}" for k, v in sorted(r["server_closes"].items(), key=lambda kv: -kv[1])[:12]) or "none")
    row("abuser connections (kind: outcome count)", lambda r: "; ".join(
        f"{k}: " + ", ".join(f"{o} {fmt(c)}" for o, c in v.items())
        for k, v in sorted(r["abusers_result"]["kinds"].items())) if r.get("abusers_result") else "–")
    row("churn: connections (rate achieved)", lambda r: f"{fmt(r['churn_result']['connections'])} "
        f"({fmt(r['churn_result']['rate'], 0)}/s): " + ", ".join(
            f"{o} {fmt(c)}" for o, c in r["churn_result"]["kinds"]["churn"].items()) if r.get("churn_result") else "–")
    row("rooms: filled in set-up (addresses) / hoarded in the run (addresses x conns)", lambda r: (
        f"{fmt(facts(r)['filled'])} ({facts(r)['fill_addresses']}, most {facts(r)['fill_max_per_address']} each) / "
        f"{fmt(facts(r)['hoarded'])} ({hoard_shape}, most {facts(r)['hoard_max_per_address']} from one address)"))
    row("newcomers creating a room after the hoarders", lambda r: ", ".join(
        f"{k}: {v}" for k, v in facts(r)["newcomers"].items()))
    row("held connections (fillers, hoarders) dropped by the server", lambda r: ", ".join(
        f"{k}: {fmt(facts(r)['held_dropped'].get(k, 0))} of {fmt(v)}" for k, v in facts(r)["held"].items()) or "none")
    row("`rooms` pagers (following `next`)", lambda r: askers(r, "rooms pager"))
    row(f"`history limit=200` askers over {LONG_ROOM}", lambda r: askers(r, "history limit=200")
        + f"; {fmt(facts(r)['long_messages'])} messages of {fmt(facts(r).get('long_message_bytes'))} bytes")
    row("server CPU (cores)", lambda r: fmt(r["server_cpu_s"] / r["window_s"]))
    row("driver CPU (cores): well-behaved / abusers / churn / main", lambda r: " / ".join([
        fmt(good_of(r, "cpu_s") / good_of(r, "wall_s")),
        fmt(r["abusers_result"]["cpu_s"] / r["window_s"]) if r.get("abusers_result") else "–",
        fmt(r["churn_result"]["cpu_s"] / r["window_s"]) if r.get("churn_result") else "–",
        fmt(r["main_cpu_s"] / r["window_s"])]))
    row("machine busy (cores, all processes)", lambda r: fmt(r["machine_busy_cores"]))
    row("server alive at the end / exit code / ERROR lines",
        lambda r: f"{'yes' if r['alive'] else 'NO'} / {r['exit_code']} / {len(r['server_errors'])}")
    lines = ["| | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---" for _ in cols) + " |"]
    lines += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rows]
    return "\n".join(lines)


# Set by main for the table's labels.
args_rate = ""
settle_s = 1.0
hoard_shape = ""


def main(argv: Optional[List[str]] = None) -> int:
    global args_rate, settle_s, hoard_shape
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of chat per run")
    ap.add_argument("--clients", type=int, default=20, help="well-behaved clients")
    ap.add_argument("--rooms", type=int, default=4, help="fixed rooms; each client is in two")
    ap.add_argument("--msg-rate", default="5-9.5",
                    help="messages per second per well-behaved client: N, or LO-HI spread evenly over the clients")
    ap.add_argument("--text-min", type=int, default=300, help="shortest padding of a message text")
    ap.add_argument("--text-max", type=int, default=1300, help="longest padding of a message text")
    ap.add_argument("--mode", choices=["both", "abusers", "clean"], default="both",
                    help="with abusers, without, or both (with first)")
    ap.add_argument("--stall-every", type=float, default=20.0, help="seconds between stalls of the server (0: none)")
    ap.add_argument("--stall-for", type=float, default=4.0, help="seconds each stall (SIGSTOP) lasts")
    ap.add_argument("--stall-in", choices=["both", "abusers", "none"], default="both",
                    help="which runs have the stalls (both: a fair comparison)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds after a stall still counted as inside it for the latency outside stalls")
    ap.add_argument("--churn-rate", type=float, default=1000.0,
                    help="connect/hello/reset per second (0: no churn)")
    ap.add_argument("--fill-rooms", type=int, default=6000,
                    help=f"rooms made in set-up, {ROOMS_PER_ADDRESS} per source address (its share)")
    ap.add_argument("--long-messages", type=int, default=200, help=f"messages of max_text in {LONG_ROOM}")
    ap.add_argument("--ask-rate", type=float, default=9.5, help="requests per second of each expensive asker")
    ap.add_argument("--rooms-askers", type=int, default=4, help="`rooms` pagers")
    ap.add_argument("--history-askers", type=int, default=4, help=f"`history limit=200` askers in {LONG_ROOM}")
    ap.add_argument("--pong-flooders", type=int, default=2, help="threads streaming max-size pongs")
    ap.add_argument("--prereg-flooders", type=int, choices=[0, 1], default=1, help="pre-registration flooders on/off")
    ap.add_argument("--hoard-addresses", type=int, default=7, help="source addresses of the room hoarders")
    ap.add_argument("--hoard-conns", type=int, default=16, help="hoarding connections per address")
    ap.add_argument("--server-args", default="", help="extra server flags, e.g. '--rate 20 --burst 40'")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not append to {RESULTS}")
    ap.add_argument("--json", help="also write the raw numbers to this file")
    ap.add_argument("--server-log", help="write each server's log to PATH.abusers / PATH.clean")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.duration > 600:
        ap.error("--duration must be in (0, 600]")
    try:
        parse_rates(args.msg_rate, args.clients)
    except ValueError as exc:
        ap.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="soak: %(message)s")
    args_rate = args.msg_rate
    settle_s = args.settle
    hoard_shape = f"{args.hoard_addresses} x {args.hoard_conns}"

    modes = {"both": [True, False], "abusers": [True], "clean": [False]}[args.mode]
    runs = []
    for abusers in modes:
        stalls = args.stall_in == "both" or (args.stall_in == "abusers" and abusers)
        log.info("%s abusers, %s stalls, %g s ...", "with" if abusers else "without",
                 "with" if stalls else "without", args.duration)
        r = run(args, abusers, stalls)
        r["abusers_result"] = r.pop("abusers", None) if isinstance(r.get("abusers"), dict) else None
        r["churn_result"] = r.pop("churn", None)
        r["abusers"] = abusers
        for part in ("good", "abusers_result", "churn_result"):
            if isinstance(r.get(part), dict) and "error" in r[part]:
                log.error("%s worker failed: %s", part, r[part]["error"])
        for example in good_of(r, "lost_examples") or []:
            log.error("lost: %s", example)
        runs.append(r)
    facts = machine_facts()
    command = "python benchmarks/soak.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    server_cmd = " ".join(shlex.quote(a) for a in runs[0]["server_cmd"][1:])
    server_cmd = re.sub(r"--db \S+", "--db TMP/history.db", server_cmd)
    text = table(runs)
    results = checks(runs)
    verdict = all(ok for _, ok, _ in results)
    stall_note = {"both": "both runs", "abusers": "only the run with abusers", "none": "neither run"}[args.stall_in]
    report = "\n".join([
        f"### {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: `{command}`",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Linux {facts['kernel']}, Python {facts['python']}. "
        f"Server: `python {server_cmd}` (flood control at its defaults, 10/s burst 20). "
        f"{args.clients} well-behaved clients, each in #lobby and 2 of {args.rooms} fixed rooms, "
        f"{args.msg_rate} messages/s each, texts of {args.text_min}-{args.text_max} characters. "
        f"Stalls (SIGSTOP {args.stall_for:g} s every {args.stall_every:g} s): in {stall_note}. "
        f"Abusers: churn {args.churn_rate:g}/s; {args.fill_rooms} rooms filled in set-up and "
        f"{args.long_messages} long messages in {LONG_ROOM}; {args.rooms_askers} `rooms` and "
        f"{args.history_askers} `history` askers at {args.ask_rate:g}/s; {args.pong_flooders} pong flooders; "
        f"pre-registration flooders {'on' if args.prereg_flooders else 'off'}; hoarders "
        f"{args.hoard_addresses} addresses x {args.hoard_conns}; and the older kinds.",
        "",
        text,
        "",
        "Checks:",
        "",
        *[f"* {'PASS' if ok else '**FAIL**'}: {what} ({detail})" for what, ok, detail in results],
        "",
        f"Verdict: {'PASS' if verdict else 'FAIL'}.",
        "",
    ])
    print(report)
    for r in runs:
        if r["server_errors"]:
            print("server errors:", *r["server_errors"], sep="\n  ", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2, default=str))
    if not args.no_write:
        existing = RESULTS.read_text() if RESULTS.exists() else ""
        heading = "## Soak / abuse run"
        if heading not in existing:
            log.error("no %r section in %s: not written", heading, RESULTS)
        else:
            insert_in_section(RESULTS, heading, report)
    return 0 if verdict else 1


def insert_in_section(path: Path, heading: str, report: str) -> None:
    """Append `report` at the end of the soak section (before the next `## ` heading)."""
    text = path.read_text()
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    if nxt < 0:
        text = text.rstrip("\n") + "\n\n" + report + "\n"
    else:
        text = text[:nxt].rstrip("\n") + "\n\n" + report + "\n" + text[nxt:]
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
