"""selchat-bench's login storm: what 50 logins a second cost everybody else.

A password check is real CPU work (about 13 ms of scrypt); the server does it in a worker
process so that its one-thread loop stays free. This scenario measures whether it does:

1. a real `selchat-server` with a fresh temporary database; N accounts are registered;
2. a handful of bystanders (guests, from 127.0.0.1) join a room and chat in it at a steady
   rate; every copy of every message that reaches a member is a sample of the time from
   `say` to that member's receipt (one monotonic clock serves every process of the machine);
3. quiet windows and storm windows in turn (Q S Q S ..., so a drift of a shared machine falls
   on both kinds); in a storm window new connections arrive at a fixed rate and send `hello`
   with `login` {account, password}: a fraction with a wrong password, the rest right. Each
   is answered `welcome` or an error (`login_failed`, `login_throttled`, `unavailable` ...)
   and closed. The storm is bounded in count (rate x seconds, at most `max_open` at once)
   and in time (each login has `login_timeout` seconds; the stragglers are counted). A quiet
   window starts once the storm's logins are answered and the server and its workers are
   idle again, so a backlog does not count as quiet.

The storm comes from many loopback addresses (127.1.x.y: Linux routes all of 127/8 to lo),
as a real one from many clients would: from one address the server's failed-login limit
per address would refuse most wrong passwords before any hashing, and the storm would
measure that limit, not the hashing. Per account the limit still applies; the table says
how many logins were throttled.

Reported for each window: the bystanders' p50/p99/max, the logins and their outcomes, the
server's CPU (its loop) and the CPU of its children (the KDF workers) in cores, and other
load on the machine; then the p99 ratio storm / quiet (the target is within 3x).
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import random
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from selchat.bench.launcher import DB_PLACEHOLDER, REPO, RunningServer, ServerSpec, git_label
from selchat.bench.results import append_results

_LEN = struct.Struct(">I")
ROOM = "#storm"
MARK = "~@"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_FRAME = 1 << 20


@dataclass
class StormConfig:
    """One run's shape; the defaults are the issue's: 50 logins/s, within 3x of quiet."""

    accounts: int = 100
    rate: float = 50.0  # logins started per second during the storm
    wrong: float = 0.3  # the fraction of logins with a wrong password
    bystanders: int = 5
    say_rate: float = 5.0  # messages per second per bystander
    quiet: float = 5.0  # seconds of each quiet window
    storm: float = 5.0  # seconds of each storm window
    cycles: int = 3  # quiet and storm windows alternate this many times
    gap: float = 1.0  # seconds after each storm's last answer, and of warm-up before the first
    login_timeout: float = 10.0  # seconds one login may take before it counts as timed out
    max_open: int = 400  # storm connections open at once; a start beyond it is skipped
    addresses: int = 2000  # loopback source addresses the storm and registrations use
    seed: int = 1
    kdf_workers: Optional[int] = 1  # --kdf-workers for the server (None: its default)
    server_flags: Sequence[str] = ("--log-level", "warning", "--rate", "0")


@dataclass
class Window:
    """What one window measured."""

    name: str
    seconds: float
    samples: List[float] = field(default_factory=list)  # bystanders' latencies, ms
    logins: Dict[str, int] = field(default_factory=dict)  # outcome -> count
    login_ms: List[float] = field(default_factory=list)
    server_cores: float = 0.0
    worker_cores: float = 0.0
    other_cores: float = 0.0

    def pct(self, q: float) -> Optional[float]:
        return _percentile(self.samples, q)


@dataclass
class StormResult:
    config: StormConfig
    windows: List[Window]
    registered: int
    register_s: float
    sent: int = 0
    lost: int = 0  # copies the bystanders should have had and did not (all windows)
    worker_pids: List[int] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    cycle_p99: List[Tuple[Optional[float], Optional[float]]] = field(default_factory=list)  # (quiet, storm)

    @property
    def ratio(self) -> Optional[float]:
        quiet, storm = self.windows[0].pct(0.99), self.windows[1].pct(0.99)
        if quiet is None or storm is None or quiet <= 0:
            return None
        return storm / quiet


class StormError(RuntimeError):
    """The scenario could not run (server, registration or a generator failed)."""


def _percentile(values: Sequence[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def source_address(i: int, count: int) -> str:
    """The i-th of `count` loopback addresses 127.1.x.y."""
    i %= max(count, 1)
    return f"127.1.{i // 254}.{i % 254 + 1}"


def account_name(i: int) -> str:
    return f"acct{i:05d}"


def right_password(i: int) -> str:
    return f"storm-password-{i:05d}"


def wrong_password(i: int) -> str:
    return f"storm-guess-{i:05d}"


def now_us() -> int:
    return time.monotonic_ns() // 1000


# --- a small non-blocking framed client ---------------------------------------------------------


class Peer:
    """One connection speaking 4-byte-length JSON frames; every frame is decoded (no hot path:
    the rates here are a few hundred frames a second)."""

    __slots__ = ("sock", "sel", "out", "inbuf", "on_frame", "on_close", "connected", "closed", "t_open", "data")

    def __init__(self, sel: selectors.BaseSelector, addr: Tuple[str, int], source: Optional[str],
                 on_frame: Callable[["Peer", Dict[str, Any]], None],
                 on_close: Callable[["Peer", str], None], data: Any = None) -> None:
        self.sel = sel
        self.out = bytearray()
        self.inbuf = bytearray()
        self.on_frame = on_frame
        self.on_close = on_close
        self.connected = False
        self.closed = False
        self.t_open = time.monotonic()
        self.data = data
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source:
                self.sock.bind((source, 0))
            err = self.sock.connect_ex(addr)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            self.sock.close()
            self.closed = True
            raise OSError(err, os.strerror(err))
        sel.register(self.sock, selectors.EVENT_WRITE, self)

    def send(self, obj: Dict[str, Any]) -> None:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        self.out += _LEN.pack(len(payload)) + payload
        if self.connected:
            self._flush()

    def ready(self, mask: int) -> None:
        if self.closed:
            return
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(f"connect:{errno.errorcode.get(err, err)}")
                return
            self.connected = True
            self.sel.modify(self.sock, selectors.EVENT_READ, self)
            self._flush()
            return
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self.closed:
            self._read()

    def _flush(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.close(f"send:{errno.errorcode.get(exc.errno or 0, 'error')}")
                return
            del self.out[:sent]
        if not self.closed:
            self.sel.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0), self)

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"recv:{errno.errorcode.get(exc.errno or 0, 'error')}")
            return
        if not data:
            self.close("closed_by_server")
            return
        buf = self.inbuf
        buf += data
        while len(buf) >= 4 and not self.closed:
            size = _LEN.unpack_from(buf)[0]
            if size == 0 or size > MAX_FRAME:
                self.close("bad_frame")
                return
            if len(buf) < 4 + size:
                break
            try:
                obj = json.loads(bytes(buf[4:4 + size]))
            except ValueError:
                obj = {}
            del buf[:4 + size]
            self.on_frame(self, obj if isinstance(obj, dict) else {})

    def close(self, why: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.on_close(self, why)


def _pump(sel: selectors.BaseSelector, timeout: float) -> None:
    for key, mask in sel.select(max(timeout, 0.0)):
        key.data.ready(mask)


# --- registering the accounts (in the driver) -----------------------------------------------------


def register_accounts(host: str, port: int, cfg: StormConfig, timeout: float = 120.0) -> Tuple[int, Dict[str, int]]:
    """Register accounts 0..N-1 (nick = account name), a few at a time, each from its own
    loopback address; (how many were registered, error counts)."""
    sel = selectors.DefaultSelector()
    todo = list(range(cfg.accounts))
    ok = 0
    errors: Dict[str, int] = {}
    open_peers: Dict[int, Peer] = {}

    def on_frame(peer: Peer, obj: Dict[str, Any]) -> None:
        nonlocal ok
        kind = obj.get("type")
        if kind == "welcome":
            peer.send({"type": "register", "password": right_password(peer.data), "ref": "r"})
        elif kind == "account" and obj.get("ref") == "r":
            ok += 1
            peer.data = -1
            peer.close()
        elif kind == "error":
            code = str(obj.get("code"))
            errors[code] = errors.get(code, 0) + 1
            peer.data = -1
            peer.close()

    def on_close(peer: Peer, why: str) -> None:
        open_peers.pop(id(peer), None)
        if peer.data != -1:
            errors[why or "closed"] = errors.get(why or "closed", 0) + 1

    deadline = time.monotonic() + timeout
    try:
        while (todo or open_peers) and time.monotonic() < deadline:
            while todo and len(open_peers) < 8:
                i = todo.pop(0)
                try:
                    peer = Peer(sel, (host, port), source_address(i, cfg.addresses), on_frame, on_close, data=i)
                except OSError as exc:
                    errors[str(exc)] = errors.get(str(exc), 0) + 1
                    continue
                open_peers[id(peer)] = peer
                peer.send({"type": "hello", "nick": account_name(i), "client": "selchat-bench"})
            _pump(sel, 0.05)
    finally:
        for peer in list(open_peers.values()):
            peer.close("timeout")
        sel.close()
    return ok, errors


# --- the bystanders (a process of their own) ------------------------------------------------------


def _bystanders_main(pipe: Any, host: str, port: int, cfg: StormConfig) -> None:
    try:
        _bystanders(pipe, host, port, cfg)
    except BaseException as exc:  # report, never leave the driver waiting
        pipe.send(("crashed", repr(exc)))
        raise


def _bystanders(pipe: Any, host: str, port: int, cfg: StormConfig) -> None:
    sel = selectors.DefaultSelector()
    peers: List[Peer] = []
    joined: set = set()
    samples: List[Tuple[int, int]] = []  # (sent at, latency), microseconds
    got = 0
    failures: List[str] = []
    tag = os.getpid() % 10000

    def on_frame(peer: Peer, obj: Dict[str, Any]) -> None:
        nonlocal got
        kind = obj.get("type")
        if kind == "welcome":
            peer.send({"type": "join", "room": ROOM})
        elif kind == "names" or (kind == "join" and obj.get("nick") == f"by{tag}x{peer.data}"):
            joined.add(peer.data)
        elif kind == "message":
            text = obj.get("text", "")
            if isinstance(text, str) and text.startswith(MARK):
                sent = int(text[len(MARK) + 1:len(MARK) + 17])
                samples.append((sent, now_us() - sent))
                got += 1
        elif kind == "error":
            failures.append(str(obj.get("code")))

    def on_close(peer: Peer, why: str) -> None:
        if why:  # (our own close at the end gives no reason)
            failures.append(f"bystander closed: {why}")

    for k in range(cfg.bystanders):
        peer = Peer(sel, (host, port), None, on_frame, on_close, data=k)
        peer.send({"type": "hello", "nick": f"by{tag}x{k}", "client": "selchat-bench"})
        peers.append(peer)
    deadline = time.monotonic() + 20
    while len(joined) < cfg.bystanders and time.monotonic() < deadline and not failures:
        _pump(sel, 0.05)
    if len(joined) < cfg.bystanders:
        pipe.send(("crashed", f"bystanders: {len(joined)} of {cfg.bystanders} joined ({failures[:5]})"))
        return
    pipe.send(("ready", None))
    start = pipe.recv()
    told = _PipeWatch(pipe)
    sel.register(pipe, selectors.EVENT_READ, told)
    interval = 1.0 / cfg.say_rate
    due = [start + interval * k / cfg.bystanders for k in range(cfg.bystanders)]
    sent = 0
    while not told.said:
        now = time.monotonic()
        for k, peer in enumerate(peers):
            while due[k] <= now:
                due[k] += interval
                peer.send({"type": "say", "room": ROOM, "text": f"{MARK}{k % 10}{now_us():016d} bench"})
                sent += 1
        _pump(sel, min(due) - time.monotonic())
    sel.unregister(pipe)
    # drain: every copy should arrive (each message reaches every bystander, the sender too)
    expected = sent * cfg.bystanders
    deadline = time.monotonic() + 5
    while got < expected and time.monotonic() < deadline:
        _pump(sel, 0.05)
    for peer in peers:
        peer.close()
    sel.close()
    pipe.send(("done", {"samples": samples, "sent": sent, "lost": expected - got, "failures": failures[:20]}))


# --- the storm (a process of its own) ---------------------------------------------------------


def _storm_main(pipe: Any, host: str, port: int, cfg: StormConfig) -> None:
    try:
        _storm(pipe, host, port, cfg)
    except BaseException as exc:
        pipe.send(("crashed", repr(exc)))
        raise


def _storm(pipe: Any, host: str, port: int, cfg: StormConfig) -> None:
    sel = selectors.DefaultSelector()
    rng = random.Random(cfg.seed)
    outcomes: Dict[str, int] = {}
    latencies: List[float] = []
    live: Dict[int, Peer] = {}

    def count(what: str) -> None:
        outcomes[what] = outcomes.get(what, 0) + 1

    def on_frame(peer: Peer, obj: Dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind not in ("welcome", "error"):
            return
        right = peer.data
        peer.data = None
        latencies.append((time.monotonic() - peer.t_open) * 1000)
        if kind == "welcome":
            count("welcome" if right else "welcome_with_a_wrong_password")
        else:
            code = str(obj.get("code"))
            count(code if code in ("login_throttled", "unavailable") or not right else f"{code}_with_the_right_password")
        peer.close()

    def on_close(peer: Peer, why: str) -> None:
        live.pop(id(peer), None)
        if peer.data is not None:
            count(why or "closed")

    def expire(now: float) -> None:
        for peer in [p for p in live.values() if now - p.t_open > cfg.login_timeout]:
            count("timeout")
            peer.data = None
            peer.close()

    pipe.send(("ready", None))
    interval = 1.0 / cfg.rate
    n = 0
    while True:
        command = pipe.recv()
        if command[0] == "end":
            break
        _, start, stop = command
        first = n
        k = 0  # logins of this window
        while True:
            now = time.monotonic()
            if now >= stop:
                break
            if now >= start:
                while start + k * interval <= now and start + k * interval < stop:
                    i = n
                    n += 1
                    k += 1
                    if len(live) >= cfg.max_open:
                        count("not_started")
                        continue
                    acct = rng.randrange(cfg.accounts)
                    right = rng.random() >= cfg.wrong
                    try:
                        peer = Peer(sel, (host, port), source_address(i, cfg.addresses), on_frame, on_close,
                                    data=right)
                    except OSError as exc:
                        count(f"connect:{errno.errorcode.get(exc.errno or 0, 'error')}")
                        continue
                    live[id(peer)] = peer
                    peer.send({"type": "hello", "nick": account_name(acct), "client": "selchat-bench",
                               "login": {"account": account_name(acct),
                                         "password": right_password(acct) if right else wrong_password(acct)}})
                expire(now)
            wait = (start if now < start else start + k * interval) - time.monotonic()
            _pump(sel, min(max(wait, 0.0), 0.05))
        # the window's logins finish (or time out) before the next quiet window begins
        while live:
            expire(time.monotonic())
            _pump(sel, 0.05)
        pipe.send(("window", n - first))
    sel.close()
    pipe.send(("done", {"started": n, "outcomes": outcomes, "latencies": latencies}))


class _PipeWatch:
    """A pipe in a generator's selector: notes that the driver said something."""

    def __init__(self, pipe: Any) -> None:
        self.said = False

    def ready(self, mask: int) -> None:
        self.said = True


# --- the driver ---------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children(pid: int) -> List[int]:
    """Process ids whose parent is `pid` (the server's KDF workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        pass
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(name))
    return out


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / _CLK_TCK


class _Edge:
    """CPU counters at one instant: the server, its children by pid, the whole machine."""

    def __init__(self, server_pid: int, own: Sequence[int]) -> None:
        self.t = time.monotonic()
        self.server = _proc_cpu(server_pid)
        self.kids = {pid: _proc_cpu(pid) for pid in children(server_pid)}
        self.busy = _machine_busy()
        self.own = sum(_proc_cpu(p) for p in own) + _self_cpu()


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _between(a: _Edge, b: _Edge, window: Window) -> None:
    """Add the CPU seconds between two edges to `window` (divided by its seconds at the end)."""
    server = b.server - a.server
    workers = sum(b.kids[p] - a.kids.get(p, 0.0) for p in b.kids)
    gen = b.own - a.own
    window.seconds += b.t - a.t
    window.server_cores += server
    window.worker_cores += workers
    window.other_cores += max(0.0, (b.busy - a.busy) - server - workers - gen)


def _settle(server_pid: int, idle: float = 0.05, span: float = 0.5, timeout: float = 90.0) -> bool:
    """Wait until the server and its workers use less than `idle` cores over two `span`s in a
    row: what a storm left queued (clients gone, hashing still to do) must not fall into the
    next quiet window. (Two spans, and a low bar: on a machine shared with other work a busy
    server can get little CPU for a moment.) False if they are still busy at the deadline."""
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        before = _proc_cpu(server_pid) + sum(_proc_cpu(p) for p in children(server_pid))
        time.sleep(span)
        after = _proc_cpu(server_pid) + sum(_proc_cpu(p) for p in children(server_pid))
        calm = calm + 1 if (after - before) / span < idle else 0
        if calm >= 2:
            return True
    return False


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def _expect(pipe: Any, what: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise StormError(f"a generator did not say {what!r} within {timeout:.0f} s")
    kind, payload = pipe.recv()
    if kind != what:
        raise StormError(f"a generator failed: {payload}")
    return payload


def run_storm(host: str, port: int, server_pid: int, cfg: StormConfig) -> StormResult:
    """The scenario against a running server (accounts not yet registered).

    Quiet and storm windows alternate `cycles` times (Q S Q S ...), so a drift of the machine
    (other tenants) spreads over both kinds instead of favouring one. A quiet window begins
    only once the storm's logins have all been answered (or timed out).
    """
    t = time.monotonic()
    registered, errors = register_accounts(host, port, cfg)
    register_s = time.monotonic() - t
    if registered < cfg.accounts:
        raise StormError(f"{registered} of {cfg.accounts} accounts registered ({errors})")
    ctx = mp.get_context("fork")
    by_pipe, by_child = ctx.Pipe()
    st_pipe, st_child = ctx.Pipe()
    by = ctx.Process(target=_bystanders_main, args=(by_child, host, port, cfg), daemon=True)
    st = ctx.Process(target=_storm_main, args=(st_child, host, port, cfg), daemon=True)
    by.start()
    st.start()
    quiet = Window("quiet", 0.0)
    storm = Window("storm", 0.0)
    spans: List[Tuple[str, float, float]] = []
    notes: List[str] = []
    try:
        _expect(by_pipe, "ready", 30)
        _expect(st_pipe, "ready", 30)
        own = [by.pid, st.pid]
        start = time.monotonic() + 0.2
        by_pipe.send(start)
        _sleep_until(start + cfg.gap)  # warm-up
        _settle(server_pid)
        for _ in range(cfg.cycles):
            t0 = time.monotonic()
            a = _Edge(server_pid, own)
            _sleep_until(t0 + cfg.quiet)
            b = _Edge(server_pid, own)
            _between(a, b, quiet)
            spans.append(("quiet", a.t, b.t))
            s0 = time.monotonic() + 0.05
            st_pipe.send(("window", s0, s0 + cfg.storm))
            _sleep_until(s0)
            a = _Edge(server_pid, own)
            _sleep_until(s0 + cfg.storm)
            b = _Edge(server_pid, own)
            _between(a, b, storm)
            spans.append(("storm", s0, s0 + cfg.storm))
            _expect(st_pipe, "window", cfg.login_timeout + 30)
            if not _settle(server_pid):
                notes.append("the server was still busy 90 s after a storm window")
            _sleep_until(time.monotonic() + cfg.gap)
        by_pipe.send("stop")
        st_pipe.send(("end",))
        by_done = _expect(by_pipe, "done", 30)
        st_done = _expect(st_pipe, "done", 30)
    finally:
        for proc in (by, st):
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    per_span: List[List[float]] = [[] for _ in spans]
    bounds = [(int(a * 1e6), int(b * 1e6)) for _, a, b in spans]
    for sent, latency in by_done["samples"]:
        for k, (a, b) in enumerate(bounds):
            if a <= sent < b:
                per_span[k].append(latency / 1000)
                break
    for (kind, _, _), samples in zip(spans, per_span):
        (quiet if kind == "quiet" else storm).samples.extend(samples)
    storm.logins = dict(st_done["outcomes"])
    storm.logins["started"] = st_done["started"]
    storm.login_ms = st_done["latencies"]
    for w in (quiet, storm):
        if w.seconds:
            w.server_cores /= w.seconds
            w.worker_cores /= w.seconds
            w.other_cores /= w.seconds
    result = StormResult(cfg, [quiet, storm], registered, register_s, sent=by_done["sent"], lost=by_done["lost"],
                         worker_pids=sorted(children(server_pid)))
    result.cycle_p99 = [(_percentile(per_span[k], 0.99), _percentile(per_span[k + 1], 0.99))
                        for k in range(0, len(spans) - 1, 2)]
    if by_done["failures"]:
        result.notes.append("bystander errors: " + ", ".join(by_done["failures"][:5]))
    result.notes.extend(sorted(set(notes)))
    return result


def run_point(cfg: StormConfig) -> StormResult:
    """Start a server with a fresh database, run the scenario, stop the server."""
    flags = list(cfg.server_flags) + ["--db", DB_PLACEHOLDER]
    if cfg.kdf_workers is not None:
        flags += ["--kdf-workers", str(cfg.kdf_workers)]
    spec = ServerSpec("selchat", [sys.executable, "-m", "selchat.server"], extra=flags, fixed_flags=True)
    with RunningServer(spec) as srv:
        if srv.port is None:
            raise StormError("the server has no native port")
        result = run_storm("127.0.0.1", srv.port, srv.pid, cfg)
        if not srv.alive():
            raise StormError(f"the server exited: {srv.log_tail(300)!r}")
        result.notes.append(f"server: `{spec.describe()}`")
    return result


# --- the report -----------------------------------------------------------------------------------


def _ms(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def table(results: Sequence[StormResult]) -> str:
    head = ("| KDF workers | window | bystander copies | p50 ms | p99 ms | max ms | logins started (/s) "
            "| welcome / login_failed / login_throttled / other | login p50 / p99 ms | server loop (cores) "
            "| KDF workers (cores) | other load (cores) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        workers = "server default" if res.config.kdf_workers is None else str(res.config.kdf_workers)
        if res.config.kdf_workers == 0:
            workers = "0 (in the loop)"
        for w in res.windows:
            logins = "–"
            outcomes = "–"
            login_ms = "–"
            if w.logins:
                started = w.logins.get("started", 0)
                logins = f"{started} ({started / w.seconds:.1f})"
                known = ("started", "welcome", "login_failed", "login_throttled")
                other = sum(v for k, v in w.logins.items() if k not in known)
                outcomes = (f"{w.logins.get('welcome', 0)} / {w.logins.get('login_failed', 0)} / "
                            f"{w.logins.get('login_throttled', 0)} / {other}")
                login_ms = f"{_ms(_percentile(w.login_ms, 0.5))} / {_ms(_percentile(w.login_ms, 0.99))}"
            lines.append(
                f"| {workers} | {w.name} | {len(w.samples):,} | {_ms(w.pct(0.5))} | {_ms(w.pct(0.99))} "
                f"| {_ms(max(w.samples) if w.samples else None)} | {logins} | {outcomes} | {login_ms} "
                f"| {w.server_cores:.2f} | {w.worker_cores:.2f} | {w.other_cores:.2f} |")
    return "\n".join(lines)


def summary(results: Sequence[StormResult]) -> List[str]:
    out = []
    for res in results:
        ratio = res.ratio
        workers = res.config.kdf_workers
        verdict = "–" if ratio is None else ("within 3x" if ratio <= 3.0 else "**over 3x**")
        out.append(f"* KDF workers {workers if workers is not None else '(server default)'}: bystanders' p99 "
                   f"storm / quiet = {_ms(res.windows[1].pct(0.99))} / {_ms(res.windows[0].pct(0.99))} ms = "
                   f"**{'–' if ratio is None else f'{ratio:.2f}x'}** ({verdict}); {res.registered} accounts "
                   f"registered in {res.register_s:.1f} s; {res.sent:,} bystander messages, "
                   f"{res.lost} copies lost")
        if len(res.cycle_p99) > 1:
            out.append("  p99 per cycle, quiet / storm ms: " + ", ".join(
                f"{_ms(q)} / {_ms(st)}" for q, st in res.cycle_p99))
        other = {k: v for k, v in res.windows[1].logins.items()
                 if k not in ("started", "welcome", "login_failed", "login_throttled")}
        if other:
            out.append("  other login outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(other.items())))
        for note in res.notes:
            out.append(f"  {note}")
    return out


def describe(cfg: StormConfig) -> str:
    return (f"{cfg.accounts} accounts; {cfg.bystanders} bystanders saying {cfg.say_rate:g} messages/s each in "
            f"{ROOM} (every copy to every member is a sample); {cfg.cycles} cycles of a quiet window of "
            f"{cfg.quiet:g} s then a storm window of {cfg.storm:g} s with {cfg.rate:g} logins/s (`hello` with "
            f"`login`, {cfg.wrong:.0%} wrong passwords, accounts drawn at random, from {cfg.addresses} loopback "
            f"addresses, each login answered then closed; the next quiet window waits for the last answer "
            f"and for the server and its workers to fall idle)")


# --- selchat-bench --points loginstorm ------------------------------------------------------------

POINT = "loginstorm"


def add_arguments(ap: Any) -> None:
    """The scenario's options on selchat-bench's parser."""
    d = StormConfig()
    ap.add_argument("--storm-rate", type=float, default=d.rate, help="loginstorm: logins started per second")
    ap.add_argument("--storm-accounts", type=int, default=d.accounts, help="loginstorm: accounts registered first")
    ap.add_argument("--storm-wrong", type=float, default=d.wrong, help="loginstorm: fraction of wrong passwords")
    ap.add_argument("--storm-bystanders", type=int, default=d.bystanders, help="loginstorm: clients chatting meanwhile")
    ap.add_argument("--storm-say-rate", type=float, default=d.say_rate, help="loginstorm: messages/s per bystander")
    ap.add_argument("--storm-seconds", type=float, default=d.storm, help="loginstorm: seconds of each window (quiet, storm)")
    ap.add_argument("--storm-cycles", type=int, default=d.cycles, help="loginstorm: quiet/storm windows, alternated")
    ap.add_argument("--storm-kdf-workers", default="1",
                    help="loginstorm: comma-separated --kdf-workers values, one run each (0: hashing in the loop)")


def config_from(opts: Any, workers: Optional[int]) -> StormConfig:
    return StormConfig(accounts=opts.storm_accounts, rate=opts.storm_rate, wrong=opts.storm_wrong,
                       bystanders=opts.storm_bystanders, say_rate=opts.storm_say_rate,
                       quiet=opts.storm_seconds, storm=opts.storm_seconds, cycles=opts.storm_cycles,
                       kdf_workers=workers)


def report(results: Sequence[StormResult], command: str, took: float) -> str:
    import datetime as _dt

    from selchat.bench.runner import machine_facts  # (runner imports this module)

    facts = machine_facts()
    lines = [
        f"## {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — login storm",
        "",
        f"Command: `{command}`  ",
        f"Machine: {facts['nproc']} CPUs, {facts['cpu']}, Linux {facts['kernel']}, Python {facts['python']}  ",
        f"Code: {git_label(REPO) or 'not a git checkout'}  ",
        f"Run: {describe(results[0].config)}; took {took:.0f} s. Latency is from `say` to each member's "
        "receipt (the sender's echo included); the target is the storm's p99 within 3x of the quiet one.",
        "",
        table(results),
        "",
    ]
    lines += summary(results) + [""]
    return "\n".join(lines)


def run_from_options(opts: Any) -> int:
    """selchat-bench's entry: one run per --storm-kdf-workers value; the report printed and
    appended to --results (unless --no-write). 0 when every run completed."""
    import shlex
    from pathlib import Path

    started = time.monotonic()
    results: List[StormResult] = []
    failed = 0
    for item in str(opts.storm_kdf_workers).split(","):
        item = item.strip()
        workers = None if item in ("", "default") else int(item)
        try:
            results.append(run_point(config_from(opts, workers)))
        except (StormError, OSError, RuntimeError) as exc:
            failed += 1
            print(f"loginstorm with --kdf-workers {item}: {exc}", file=sys.stderr)
    if not results:
        return 1
    command = "selchat-bench " + " ".join(shlex.quote(a) for a in opts.argv)
    text = report(results, command.strip(), time.monotonic() - started)
    print(text)
    if not opts.no_write and opts.results:
        append_results(Path(opts.results), text)
    return 1 if failed else 0
