#!/usr/bin/env python3
"""Soak / abuse run: well-behaved chat under concurrent abuse, with exact loss accounting.

    python benchmarks/soak.py --duration 30            # with abusers, then the same without
    python benchmarks/soak.py --duration 5 --no-write  # a quick look, RESULTS.md untouched

For each mode (with abusers, then without) it starts a fresh selchat server on 127.0.0.1
(flood control on at its defaults, `--max-per-ip 0`, `--max-outbuf 65536`, history in a temp
SQLite file), then:

* a well-behaved worker process (one selectors loop) holds N clients (default 20), each in
  #lobby and in two of R fixed rooms (default 4) for the whole run, and each saying a message
  at a steady rate (default 8/s, under the server's 10/s) in its rooms, alternately. The text
  carries the sender, a sequence number and the send time (CLOCK_MONOTONIC, shared by all
  processes on Linux). Every delivery is recorded, so at the end: sent (echo received),
  refused (rate_limited, must be 0), delivered, lost (a member of the room that did not get a
  message said there; must be 0), duplicates, order violations, and latency percentiles;
* an abuser worker process (one thread per kind, each loop bounded in time and count) runs
  at once: garbage senders, stallers (register, join every room, never read: dropped as slow
  consumers once their queue passes --max-outbuf), flooders (100 pings at once: rate_limited,
  then dropped for excess flood), connect-and-vanish (half a hello, then close), silent
  connections (closed by the handshake timeout), and mid-frame closers (register, half a
  frame, close).

Disconnects are counted by reason twice: from the `quit` events the well-behaved clients saw
(each nick once), and from the server's own `closed:` log lines. The server's peak RSS is
VmHWM from /proc/PID/status; the CPU of the server, of each driver process and of the machine
(/proc/stat) are reported, so a run where the driver or other work was the limit shows it.
Everything goes to 127.0.0.1 only; every loop stops by itself; all processes are cleaned up.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import re
import resource
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
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
HOST = "127.0.0.1"
HEADER = struct.Struct(">I")
LOBBY = "#lobby"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVER_FLAGS = [
    "--max-per-ip", "0",  # every client of this run comes from 127.0.0.1
    "--max-outbuf", "65536",  # small, so stallers are dropped within the run
    "--handshake-timeout", "5",  # silent connections are closed within the run
    # --rate/--burst left at their defaults (10/s, 20): flood control acts on the flooders
]


# --- frames ---------------------------------------------------------------------------------


def encode(obj: Dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
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


class BlockingPeer:
    """A blocking connection for set-up steps and for the abusers."""

    def __init__(self, port: int, rcvbuf: Optional[int] = None, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((HOST, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pending: List[Dict[str, Any]] = []

    def send(self, obj: Dict[str, Any]) -> None:
        self.sock.sendall(encode(obj))

    def until(self, pred, timeout: float = 5.0) -> List[Dict[str, Any]]:
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

    def register(self, nick: str) -> None:
        self.send({"type": "hello", "nick": nick, "client": "soak"})
        first = self.until(lambda e: True)[0]
        if first.get("type") != "welcome":
            raise ConnectionError(f"hello refused: {first!r}")
        self.until(lambda e: e.get("type") == "history" and e.get("room") == LOBBY)

    def join(self, room: str) -> None:
        self.send({"type": "join", "room": room})
        self.until(lambda e: e.get("type") == "history" and e.get("room", "").lower() == room.lower())

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


# --- the well-behaved worker ----------------------------------------------------------------


def rooms_of(i: int, rooms: int) -> List[str]:
    """Client i's two fixed rooms (of `rooms`), never changed during the run."""
    first = i % rooms
    return [f"#soak{first}", f"#soak{(first + 1) % rooms}"] if rooms > 1 else ["#soak0"]


def good_worker(port: int, n: int, rooms: int, rate: float, duration: float, text_min: int, text_max: int,
                tag: str, ready: Any, go: Any, results: Any, seed: int) -> None:
    try:
        results.put(("good", _good_worker(port, n, rooms, rate, duration, text_min, text_max, tag, ready, go, seed)))
    except BaseException as exc:  # report, never hang the driver
        results.put(("good", {"error": f"{type(exc).__name__}: {exc}"}))


def _good_worker(port: int, n: int, rooms: int, rate: float, duration: float, text_min: int, text_max: int,
                 tag: str, ready: Any, go: Any, seed: int) -> Dict[str, Any]:
    rnd = random.Random(seed)
    peers = []
    for i in range(n):
        p = BlockingPeer(port)
        p.register(f"good{i}")
        peers.append(p)
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
    go.wait(30)

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
    latencies: List[int] = []  # microseconds, deliveries to members other than the sender
    quits: Dict[str, str] = {}
    closed: List[int] = []
    pongs = set()
    seq = [0] * n
    cpu0 = cpu_seconds_self()
    t0 = time.monotonic()
    t_end = t0 + duration
    interval = 1.0 / rate
    next_send = [t0 + rnd.random() * interval for _ in range(n)]
    phase = "chat"
    drain_deadline = t_end + 10.0

    def flush(i: int) -> None:
        q = outq[i]
        if not q:
            return
        try:
            k = peers[i].sock.send(q)
            del q[:k]
        except (BlockingIOError, InterruptedError):
            pass

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
                latencies.append((now_ns - t_ns) // 1000)
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
                        next_send[i] += interval
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
    for key, (room, _) in sent.items():
        want = set(members[room])
        got = received.get(key, set())
        expected += len(want)
        delivered += len(want & got)
        lost += len(want - got)
    unanswered = sum(1 for k in sent if k not in confirmed)
    latencies.sort()

    def pct(p: float) -> Optional[float]:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] / 1000.0

    for p in peers:
        p.close()
    return {
        "clients": n, "sent": len(sent), "confirmed": len(confirmed), "unanswered": unanswered,
        "refused": refused, "other_errors": dict(other_errors), "expected": expected,
        "delivered": delivered, "lost": lost, "duplicates": duplicates, "order_violations": order_violations,
        "latency_ms": {"p50": pct(50), "p99": pct(99), "max": latencies[-1] / 1000.0 if latencies else None,
                       "count": len(latencies)},
        "quit_reasons": dict(collections.Counter(quits.values())),
        "well_behaved_closed": len(closed), "cpu_s": cpu, "wall_s": wall,
    }


# --- the abuser worker ----------------------------------------------------------------------


def abuser_worker(port: int, rooms: int, duration: float, go: Any, results: Any, seed: int) -> None:
    try:
        results.put(("abusers", _abuser_worker(port, rooms, duration, go, seed)))
    except BaseException as exc:
        results.put(("abusers", {"error": f"{type(exc).__name__}: {exc}"}))


def _abuser_worker(port: int, rooms: int, duration: float, go: Any, seed: int) -> Dict[str, Any]:
    go.wait(30)
    cpu0 = cpu_seconds_self()
    t_end = time.monotonic() + duration
    stats: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    names = iter(range(1, 1 << 30))
    room_names = [f"#soak{k}" for k in range(rooms)]

    def note(kind: str, outcome: str) -> None:
        with lock:
            stats[kind][outcome] += 1

    def paced(kind: str, per_second: float, max_count: int, action) -> None:
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
            p.register(f"mid{next(names)}")
            frame = encode({"type": "say", "room": LOBBY, "text": "never finished " * 20})
            p.sock.sendall(frame[: rnd.randint(1, len(frame) - 1)])
            return "registered, half a frame, closed"
        finally:
            p.close()

    def flood(rnd: random.Random) -> str:
        p = BlockingPeer(port)
        try:
            p.register(f"flood{next(names)}")
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
        p.register(f"stall{next(names)}")
        for room in room_names:
            p.join(room)
        with lock:
            stallers.append(p)
        return "stalling"

    threads = [
        threading.Thread(target=paced, args=("garbage", 20, 2000, garbage)),
        threading.Thread(target=paced, args=("half hello", 10, 1000, half_hello)),
        threading.Thread(target=paced, args=("mid-frame close", 4, 400, mid_frame)),
        threading.Thread(target=paced, args=("flooder", 1, 100, flood)),
        threading.Thread(target=paced, args=("staller", 0.5, 50, stall)),
    ]
    # Silent connections: a few at a time, each waits for the server to close it.
    threads += [threading.Thread(target=paced, args=("silent", 0.2, 20, silent)) for _ in range(3)]
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:
        t.join(max(0.1, t_end + 20 - time.monotonic()))
    for p in stallers:
        p.close()
    return {"kinds": {k: dict(v) for k, v in stats.items()}, "cpu_s": cpu_seconds_self() - cpu0}


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
        """The server's own `closed: PEER: detail` lines, details normalised."""
        out: collections.Counter = collections.Counter()
        for line in self.lines:
            m = re.search(r"selchat\.server: closed: \S+: (.*)$", line)
            if m:
                detail = m.group(1).strip()
                if detail.startswith("quit:"):
                    detail = "quit"
                detail = re.sub(r"\d+", "N", detail)
                out[detail] += 1
        return dict(out)


def machine_busy() -> Tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


# --- one run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, abusers: bool) -> Dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="selchat-soak-")
    db = os.path.join(tmp, "history.db")
    flags = SERVER_FLAGS + shlex.split(args.server_args)
    srv = Server(flags, db)
    ctx = mp.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    tag = f"soak{os.getpid()}{int(abusers)}"
    procs = [ctx.Process(target=good_worker, args=(srv.port, args.clients, args.rooms, args.msg_rate, args.duration,
                                                  args.text_min, args.text_max, tag, ready, go, results, args.seed))]
    if abusers:
        procs.append(ctx.Process(target=abuser_worker, args=(srv.port, args.rooms, args.duration, go, results,
                                                             args.seed)))
    out: Dict[str, Any] = {"abusers": abusers, "server_cmd": srv.cmd}
    try:
        procs[0].start()
        if not ready.wait(60):
            raise RuntimeError("well-behaved clients did not get ready")
        for p in procs[1:]:
            p.start()
        base_rss = srv.status_kib("VmRSS")
        cpu0, busy0, main_cpu0 = srv.cpu_s(), machine_busy(), cpu_seconds_self()
        t0 = time.monotonic()
        go.set()
        peak_sampled = base_rss
        got: Dict[str, Any] = {}
        deadline = t0 + args.duration + 60
        while len(got) < len(procs) and time.monotonic() < deadline:
            try:
                kind, res = results.get(timeout=0.25)
                got[kind] = res
            except Exception:  # queue.Empty
                pass
            if srv.proc.poll() is None:
                peak_sampled = max(peak_sampled, srv.status_kib("VmRSS"))
            if time.monotonic() - t0 <= args.duration + 0.5:
                window = (srv.cpu_s() - cpu0, machine_busy(), time.monotonic() - t0) if srv.proc.poll() is None else None
                if window:
                    out["server_cpu_s"], busy1, out["window_s"] = window
        out["alive"] = srv.proc.poll() is None
        out["peak_rss_kib"] = max(srv.status_kib("VmHWM"), peak_sampled) if out["alive"] else None
        out["base_rss_kib"] = base_rss
        out["main_cpu_s"] = cpu_seconds_self() - main_cpu0
        out["machine_busy_cores"] = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
        out.update(got)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
        out["exit_code"] = srv.stop()
        out["server_closes"] = srv.closes_by_reason()
        out["server_errors"] = [l.strip() for l in srv.lines if " ERROR " in l or "Traceback" in l][:5]
        try:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
        except OSError:
            pass
    return out


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
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(runs: List[Dict[str, Any]]) -> str:
    cols = ["with abusers" if r["abusers"] else "no abusers" for r in runs]
    rows: List[Tuple[str, List[str]]] = []

    def good(r: Dict[str, Any], key: str) -> Any:
        return r.get("good", {}).get(key)

    def row(label: str, fn) -> None:
        vals = []
        for r in runs:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append("–")
        rows.append((label, vals))

    row("well-behaved clients", lambda r: fmt(good(r, "clients")))
    row("messages sent (echo received)", lambda r: fmt(good(r, "confirmed")))
    row("messages refused (rate_limited) / unanswered", lambda r: f"{fmt(good(r, 'refused'))} / {fmt(good(r, 'unanswered'))}")
    row("deliveries owed / delivered", lambda r: f"{fmt(good(r, 'expected'))} / {fmt(good(r, 'delivered'))}")
    row("**lost**", lambda r: f"**{fmt(good(r, 'lost'))}**")
    row("duplicates / order violations", lambda r: f"{fmt(good(r, 'duplicates'))} / {fmt(good(r, 'order_violations'))}")
    row("well-behaved clients disconnected", lambda r: fmt(good(r, "well_behaved_closed")))
    row("latency p50 / p99 / max (ms)", lambda r: " / ".join(fmt(good(r, "latency_ms")[k]) for k in ("p50", "p99", "max")))
    row("quits seen by well-behaved clients", lambda r: ", ".join(
        f"{k}: {v}" for k, v in sorted(good(r, "quit_reasons").items(), key=lambda kv: -kv[1])) or "none")
    row("server `closed:` log lines by detail", lambda r: ", ".join(
        f"{k}: {v}" for k, v in sorted(r["server_closes"].items(), key=lambda kv: -kv[1])) or "none")
    row("abuser connections (kind: outcome count)", lambda r: "; ".join(
        f"{k}: " + ", ".join(f"{o} {c}" for o, c in v.items())
        for k, v in sorted(r["abusers_result"]["kinds"].items())) if r.get("abusers_result") else "–")
    row("server peak RSS (VmHWM) / at start (MiB)", lambda r: f"{r['peak_rss_kib'] / 1024:.1f} / {r['base_rss_kib'] / 1024:.1f}")
    row("server CPU (cores)", lambda r: fmt(r["server_cpu_s"] / r["window_s"]))
    row("driver CPU (cores): well-behaved / abusers / main", lambda r: " / ".join([
        fmt(good(r, "cpu_s") / good(r, "wall_s")),
        fmt(r["abusers_result"]["cpu_s"] / r["window_s"]) if r.get("abusers_result") else "–",
        fmt(r["main_cpu_s"] / r["window_s"])]))
    row("machine busy (cores, all processes)", lambda r: fmt(r["machine_busy_cores"]))
    row("server alive at the end / exit code / ERROR lines", lambda r: f"{'yes' if r['alive'] else 'NO'} / {r['exit_code']} / {len(r['server_errors'])}")
    lines = ["| | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---" for _ in cols) + " |"]
    lines += [f"| {label} | " + " | ".join(vals) + " |" for label, vals in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of chat per run")
    ap.add_argument("--clients", type=int, default=20, help="well-behaved clients")
    ap.add_argument("--rooms", type=int, default=4, help="fixed rooms; each client is in two")
    ap.add_argument("--msg-rate", type=float, default=8.0, help="messages per second per well-behaved client")
    ap.add_argument("--text-min", type=int, default=300, help="shortest padding of a message text")
    ap.add_argument("--text-max", type=int, default=1300, help="longest padding of a message text")
    ap.add_argument("--mode", choices=["both", "abusers", "clean"], default="both",
                    help="with abusers, without, or both (with first)")
    ap.add_argument("--server-args", default="", help="extra server flags, e.g. '--rate 20 --burst 40'")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not append to {RESULTS}")
    ap.add_argument("--json", help="also write the raw numbers to this file")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.duration > 600:
        ap.error("--duration must be in (0, 600]")

    modes = {"both": [True, False], "abusers": [True], "clean": [False]}[args.mode]
    runs = []
    for abusers in modes:
        print(f"soak: {'with' if abusers else 'without'} abusers, {args.duration:g} s ...", file=sys.stderr, flush=True)
        r = run(args, abusers)
        r["abusers_result"] = r.pop("abusers", None) if isinstance(r.get("abusers"), dict) else None
        r["abusers"] = abusers
        for part in ("good", "abusers_result"):
            if isinstance(r.get(part), dict) and "error" in r[part]:
                print(f"soak: {part} worker failed: {r[part]['error']}", file=sys.stderr)
        runs.append(r)
    facts = machine_facts()
    command = "python benchmarks/soak.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    server_cmd = " ".join(shlex.quote(a) for a in runs[0]["server_cmd"][1:])
    server_cmd = re.sub(r"--db \S+", "--db TMP/history.db", server_cmd)
    text = table(runs)
    verdict = all(r.get("good", {}).get("lost") == 0 and r["alive"] and r["exit_code"] == 0
                  and not r["server_errors"] and r.get("good", {}).get("well_behaved_closed") == 0 for r in runs)
    report = "\n".join([
        f"### {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: `{command}`",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), Linux {facts['kernel']}, Python {facts['python']}. "
        f"Server: `python {server_cmd}` (flood control at its defaults, 10/s burst 20). "
        f"{args.clients} well-behaved clients, each in #lobby and 2 of {args.rooms} fixed rooms, "
        f"{args.msg_rate:g} messages/s each, texts of {args.text_min}-{args.text_max} characters.",
        "",
        text,
        "",
        f"Verdict: {'PASS' if verdict else 'FAIL'} (no loss, no well-behaved client dropped, server alive, exit 0, "
        "no ERROR in its log).",
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
        with open(RESULTS, "a") as f:
            if heading not in existing:
                f.write(f"\n{heading}\n\n`benchmarks/soak.py`: well-behaved chat with exact loss accounting while "
                        "abusers (garbage, stallers, flooders, half-hello vanishers, silent and mid-frame closers) "
                        "run at once, and the same without abusers. Each run appends below.\n\n")
            f.write(report + "\n")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
