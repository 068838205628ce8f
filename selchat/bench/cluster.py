"""`selchat-bench --points cluster`: three selchat processes on one Redis against one process.

What it measures (issue 17, docs/cluster.md): what the cluster costs, on the same total load,
in one run. Per receiver count R and per repetition, two set-ups take turns:

* `cluster`: its own redis-server (the Debian package; AOF on with `appendfsync everysec`,
  the default a user runs; a free loopback port, a temporary directory) and three
  `selchat-server --redis` processes, each started once the previous one logged that it is
  in the cluster. The R receivers are dealt evenly over the three (receiver i on process
  i mod 3), and so are the S senders: every message goes from one process through Redis to
  the other two.
* `single`: one selchat process without Redis, the same R receivers and S senders.

Each set-up runs, on the same connections, an idle window (everyone connected, nobody
talking: the CPU floor), then two phases:

1. **flow**: every sender keeps `--window` messages in flight (as the fan-out point does):
   deliveries/s, server CPU per delivery and per message (user + system of every selchat
   process from /proc, summed), Redis CPU per message (redis-server's /proc, all its
   threads) and per publication (its `cmdstat_evalsha` calls, with the time spent inside
   them), latency under that load;
2. **paced**: `--cluster-rate` messages/s offered in total, far below saturation, the same
   on both set-ups: the same costs, and the latency a message takes from `say` on one
   process to its arrival at a member on another (cross-process) and on the same one.

Each window also reads how long the processes and Redis waited for a CPU (the run queue,
/proc schedstat): on a shared machine it tells whether the rates were the scheduler's.

Latency is read at a few receivers per process (probes) in the generator's eager worker:
each message's text carries its sender id and send time (selchat.bench.worker), so a probe
knows whether the sender was on its own process. Counts are checked after every phase:
every member must have received every message sent, once.

Everything is bounded: a fixed window per phase, deadlines on every start, registration and
drain, R at most MAX_RECEIVERS; loopback only; every process started here is stopped here.
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from selchat.bench import loadgen
from selchat.bench.results import append_results
from selchat.bench.launcher import REPO, RunningServer, ServerError, ServerSpec, git_label, resolve_flags
from selchat.bench.worker import MARK, MAX_FRAME, SID_ALPHABET, TEXT_HEAD, READY, Spec, _Worker, now_us, raise_nofile

POINT = "cluster"
PROCESSES = 3
MAX_RECEIVERS = 5000
MAX_DURATION = 60.0
PROBES_PER_PROCESS = 3  # receivers per process whose arrivals are timed
FLOW_SAMPLE_EVERY = 10  # a probe times every 10th message in the flow phase, every one when paced
REDIS_SERVER = shutil.which("redis-server") or "/usr/sbin/redis-server"
JOIN_TIMEOUT = 30.0  # seconds for a process to log that it is in the cluster
_IN_CLUSTER = "in the cluster at offset"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class ClusterBenchError(RuntimeError):
    """A set-up could not be started or measured (said in one line, the run goes on)."""


# ---- redis-server --------------------------------------------------------------------------


def redis_available() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A redis-server of our own: loopback, a free port, a temporary directory, AOF everysec.

    `start()` waits (with a deadline) until it answers PING; a port lost to someone else
    between the look and the bind is retried with another. `stop()` kills it and removes
    the directory.
    """

    ARGS = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no")

    def __init__(self, start_timeout: float = 10.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="selchat-bench-redis-")
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> "RedisProcess":
        for _ in range(attempts):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", *self.ARGS,
                 "--dir", self.dir, "--logfile", "redis.log"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=self.dir, start_new_session=True,
            )
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.ping():
                    return self
                time.sleep(0.02)  # start-up poll with a deadline
            self._kill()
        raise ClusterBenchError(f"redis-server did not answer PING: {self.log_tail()}")

    def ping(self) -> bool:
        try:
            return self.query("PING").startswith(b"+PONG")
        except OSError:
            return False

    def query(self, *args: str, timeout: float = 2.0) -> bytes:
        """One command on a fresh connection (the driver's, never in a measured loop);
        the raw reply, read until a whole simple or bulk reply is in."""
        cmd = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        deadline = time.monotonic() + timeout
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(cmd)
            data = b""
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data[:1] == b"$" and b"\r\n" in data:
                    head, _, rest = data.partition(b"\r\n")
                    if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                        break
                elif data[:1] != b"$" and data.endswith(b"\r\n"):
                    break
            return data

    def info(self, section: str) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for line in self.query("INFO", section).decode(errors="replace").splitlines():
            if ":" in line and not line.startswith("#"):
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
        return out

    def evalsha(self) -> Tuple[int, int]:
        """(calls, microseconds inside them) of EVALSHA so far: every publication of the
        cluster is one; the time is the script's own, without reading, replying or the AOF."""
        stat = self.info("commandstats").get("cmdstat_evalsha", "")
        got = dict(part.split("=", 1) for part in stat.split(",") if "=" in part)
        return int(got.get("calls", 0)), int(got.get("usec", 0))

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return _proc_cpu(self.proc.pid)

    def log_tail(self, n: int = 600) -> str:
        try:
            return (Path(self.dir) / "redis.log").read_text(errors="replace")[-n:]
        except OSError:
            return "no log"

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_queue_wait(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (/proc schedstat's
    second field): on a shared machine, how much the other tenants held it back."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        return 0.0
    return total / 1e9


def _proc_cpu(pid: int) -> float:
    """utime + stime of every thread of `pid` (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# ---- the generator's side: members on several processes ------------------------------------


def member_nick(kind: str, proc: int, i: int) -> str:
    """s (sender), q (timed receiver) or r (receiver), its process, its number."""
    return f"{kind}{proc}x{i:05d}"


def sender_process(sid: int, processes: int) -> int:
    return sid % processes


class ClusterWorker(_Worker):
    """The native worker with each member on the process its nick names (`ports[proc]`),
    and arrival times taken at the probes, told apart by the sender's process."""

    def __init__(self, pipe: Any, host: str, ports: Sequence[int], msg_size: int) -> None:
        super().__init__(pipe, host, ports[0], msg_size)
        self.ports = list(ports)
        self._opening = 0
        self.proc_of: Dict[int, int] = {}  # fd -> process index
        self.probe_fds: Dict[int, int] = {}  # fd -> frames until the next timed one
        # a sender's port, by its id byte: one process serving both ends is "same-process"
        self.sender_port = {SID_ALPHABET[i]: self.ports[sender_process(i, len(self.ports))] for i in range(len(SID_ALPHABET))}
        self.local: List[int] = []  # same-process arrivals (us); self.samples holds cross-process
        self.probe_every = 0  # time every n-th message at a probe (0: none); the scan times none

    def _open(self, spec: Spec) -> None:
        self._opening = int(spec[0][1])
        super()._open(spec)

    def _address(self, sid: int) -> Tuple[str, int]:
        return (self.addr[0], self.ports[self._opening])

    def _new_conn(self, sock: socket.socket, nick: str, sid: int) -> Any:
        c = super()._new_conn(sock, nick, sid)
        self.proc_of[c.fd] = self._opening
        if nick[0] == "q":
            self.probe_fds[c.fd] = 1
        return c

    def _fill(self, c: Any) -> int:
        end = super()._fill(c)
        if end and self.sampling and self.probe_every and c.state == READY and c.fd in self.probe_fds:
            self._time_arrivals(c, end)
        return end

    def _time_arrivals(self, c: Any, end: int) -> None:
        """Walk the complete frames now in `rb` (exactly those the scan will consume) and time
        every `every`-th benchmark message, filed by whether its sender shares the process."""
        rb, t_us, every = self.rb, now_us(), self.probe_every
        mine = self.ports[self.proc_of[c.fd]]
        countdown = self.probe_fds[c.fd]
        off = 0
        while end - off >= 4:
            length = int.from_bytes(rb[off : off + 4], "big")
            if length == 0 or length > MAX_FRAME or off + 4 + length > end:
                break
            countdown -= 1
            if countdown <= 0:
                q = rb.find(MARK, off + 4, off + 4 + length)
                if q >= 0 and q + TEXT_HEAD <= off + 4 + length:
                    countdown = every
                    took = t_us - int(rb[q + 3 : q + TEXT_HEAD])
                    if len(self.samples) + len(self.local) < 500_000:
                        (self.local if self.sender_port.get(rb[q + 2]) == mine else self.samples).append(took)
                else:
                    countdown = 1  # not a message (a join, a pong): time the next one
            off += 4 + length
        self.probe_fds[c.fd] = countdown

    def _start_load(self, params: Dict[str, Any]) -> None:
        super()._start_load(params)
        self.probe_every = int(params.get("probe_every", 0))
        self.local = []

    def _command(self, cmd: Tuple[Any, ...]) -> None:
        if cmd[0] == "local":
            self.pipe.send(("local", self.local))
            self.local = []
            return
        super()._command(cmd)


def _cluster_worker_main(pipe: Any, host: str, ports: List[int], msg_size: int) -> None:
    raise_nofile()
    try:
        ClusterWorker(pipe, host, ports, msg_size).run()
    except BaseException as exc:  # report, never hang the driver
        try:
            pipe.send(("crashed", repr(exc)))
        except OSError:
            pass
        raise


class ClusterFleet(loadgen.Fleet):
    """loadgen's Fleet with ClusterWorker processes (members spread over `ports`)."""

    def __init__(self, host: str, ports: Sequence[int], workers: int, msg_size: int = 100) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_cluster_worker_main, args=(child, host, list(ports), msg_size), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)


def plan_members(receivers: int, senders: int, processes: int, bulk_workers: int) -> List[List[Spec]]:
    """Worker 0: the senders and the probes (it reads eagerly); the others: the receivers.
    Receiver i and sender j are on processes i mod P and j mod P; each process's probes are
    picked evenly among its receivers (not all at the front of its member order)."""
    fast: List[Spec] = [(member_nick("s", sender_process(j, processes), j), j) for j in range(senders)]
    bulk: List[Spec] = []
    for p in range(processes):
        mine = list(range(p, receivers, processes))
        k = min(PROBES_PER_PROCESS, len(mine))
        picked = {mine[(n * len(mine)) // k] for n in range(k)} if k else set()
        for i in mine:
            (fast if i in picked else bulk).append((member_nick("q" if i in picked else "r", p, i), -1))
    return [fast] + loadgen.split_round_robin(bulk, bulk_workers)


# ---- one set-up ----------------------------------------------------------------------------


@dataclass
class ClusterConfig:
    receivers: int = 100
    senders: int = 9
    duration: float = 5.0
    warmup: float = 1.0
    window: int = 8
    rate: float = 100.0  # messages/s offered in total in the paced phase (0: no paced phase)
    msg_size: int = 100
    register_timeout: float = 60.0
    drain_timeout: float = 15.0
    bulk_workers: int = 0  # 0: 1 up to 300 receivers, else 2
    idle: float = 2.0  # seconds of the idle window before the load


@dataclass
class SetupResult:
    setup: str  # "cluster" or "single"
    metrics: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    failed: Optional[str] = None


Probe = Callable[[str], None]


@functools.lru_cache(maxsize=1)
def _selchat_flags() -> Tuple[str, ...]:
    """The benchmark's selchat flags that this checkout's --help lists (asked once a run)."""
    spec = ServerSpec("selchat", [sys.executable, "-m", "selchat.server"])
    resolve_flags(spec)
    if spec.unavailable:
        raise ClusterBenchError(spec.unavailable)
    return tuple(spec.extra)


def _selchat_spec(redis_url: Optional[str]) -> ServerSpec:
    spec = ServerSpec("selchat", [sys.executable, "-m", "selchat.server"])
    extra = list(_selchat_flags())
    # the log says when a process is in the cluster (INFO); both set-ups log alike
    if "--log-level" in extra:
        extra[extra.index("--log-level") + 1] = "info"
    else:
        extra += ["--log-level", "info"]
    if redis_url is not None:
        extra += ["--redis", redis_url]
    spec.extra = extra
    return spec


def _wait_in_cluster(srv: RunningServer, timeout: float = JOIN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _IN_CLUSTER in Path(srv.log.name).read_text(errors="replace"):
            return
        if not srv.alive():
            break
        time.sleep(0.05)  # polling a log file with a deadline
    raise ClusterBenchError(f"process did not join the cluster within {timeout:.0f} s: {srv.log_tail(600)!r}")


def log_problems(servers: Sequence[RunningServer]) -> List[str]:
    """The processes' log lines at WARNING or above, and tracebacks (a gap, a lost write, a
    failed command): a benchmark that hides them would measure a broken cluster."""
    out = []
    for n, srv in enumerate(servers):
        for line in Path(srv.log.name).read_text(errors="replace").splitlines():
            if any(w in line for w in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")):
                out.append(f"process {n + 1}: {line.strip()[:300]}")
    return out


def run_setup(setup: str, cfg: ClusterConfig) -> SetupResult:
    """Start the set-up, register every member, run the phases, stop everything."""
    res = SetupResult(setup)
    servers: List[RunningServer] = []
    redis: Optional[RedisProcess] = None
    try:
        if setup == "cluster":
            redis = RedisProcess()
            redis.start()
            spec = _selchat_spec(redis.url)
            for _ in range(PROCESSES):  # one after another: each in the cluster before the next
                servers.append(RunningServer(spec))
                _wait_in_cluster(servers[-1])
        else:
            servers.append(RunningServer(_selchat_spec(None)))
        ports = [s.port for s in servers]
        assert all(p is not None for p in ports)
        ports = [ports[i % len(ports)] for i in range(PROCESSES)]  # single: all three are one
        _measure(cfg, servers, redis, ports, res)  # type: ignore[arg-type]
        dead = [i for i, s in enumerate(servers) if not s.alive()]
        if dead:
            res.failed = f"process(es) {dead} exited: {servers[dead[0]].log_tail(400)!r}"
        problems = log_problems(servers)
        if problems:
            res.notes.append(f"{len(problems)} warning(s) in the logs, first: {problems[0]}")
    except (ServerError, ClusterBenchError, loadgen.GenError, OSError) as exc:
        res.failed = f"{type(exc).__name__}: {exc}"
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            redis.stop()
    return res


def _measure(cfg: ClusterConfig, servers: List[RunningServer], redis: Optional[RedisProcess],
             ports: List[int], res: SetupResult) -> None:
    bulk = cfg.bulk_workers or (1 if cfg.receivers <= 300 else 2)
    shares = plan_members(cfg.receivers, cfg.senders, PROCESSES, bulk)
    members = cfg.receivers + cfg.senders
    raise_nofile()
    edges: Dict[str, Tuple[float, List[float], float, Tuple[int, int]]] = {}
    waits: Dict[str, Tuple[float, float]] = {}

    def probe(edge: str) -> None:
        waits[edge] = (sum(run_queue_wait(s.pid) for s in servers),
                       run_queue_wait(redis.proc.pid) if redis is not None and redis.proc else 0.0)
        cpu = [s.cpu_seconds() for s in servers]
        if redis is not None:
            edges[edge] = (time.monotonic(), cpu, redis.cpu_seconds(), redis.evalsha())
        else:
            edges[edge] = (time.monotonic(), cpu, 0.0, (0, 0))

    m = res.metrics
    with ClusterFleet("127.0.0.1", ports, len(shares), cfg.msg_size) as fleet:
        reg = fleet.connect(shares, 2000.0, 256, cfg.register_timeout)
        if reg["ok"] != members:
            raise loadgen.GenError(f"registered {reg['ok']} of {members} members: {reg['errors']}")
        m["register_s"] = reg["seconds"]
        fleet.settle(quiet=0.5, timeout=30)
        # what the processes and Redis burn with every member connected and nobody talking
        # (timers, lease renewals, pings): the floor under the paced phase's figures
        probe("start")
        time.sleep(cfg.idle)  # the measured idle window
        probe("end")
        t0, cpu0, r0, _ = edges["start"]
        t1, cpu1, r1, _ = edges["end"]
        m["idle_server_cores"] = sum(b - a for a, b in zip(cpu0, cpu1)) / (t1 - t0)
        if redis is not None:
            m["idle_redis_cores"] = (r1 - r0) / (t1 - t0)
        flow, local = _phase(fleet, cfg, "flow", probe, shares)
        _costs(m, "", flow, edges, redis is not None)
        _waits(m, "", waits, edges, redis is not None)
        _latency(m, "flow", flow, local)
        _counts(res, "flow", flow, members)
        if cfg.rate > 0:  # the same offered load on both set-ups: cost and latency at rest
            fleet.settle(quiet=0.3, timeout=30)
            paced, local = _phase(fleet, cfg, "rate", probe, shares)
            _costs(m, "paced_", paced, edges, redis is not None)
            _waits(m, "paced_", waits, edges, redis is not None)
            _latency(m, "paced", paced, local)
            _counts(res, "paced", paced, members)


def _waits(m: Dict[str, float], prefix: str, waits: Dict[str, Tuple[float, float]],
           edges: Dict[str, Tuple[float, List[float], float, Tuple[int, int]]], with_redis: bool) -> None:
    """Run-queue wait over the window, in seconds per second (summed over the processes)."""
    span = edges["end"][0] - edges["start"][0]
    m[prefix + "server_runq"] = (waits["end"][0] - waits["start"][0]) / span
    if with_redis:
        m[prefix + "redis_runq"] = (waits["end"][1] - waits["start"][1]) / span


def _costs(m: Dict[str, float], prefix: str, r: loadgen.LoadResult,
           edges: Dict[str, Tuple[float, List[float], float, Tuple[int, int]]], with_redis: bool) -> None:
    """Rates and CPU of one phase's window, as metrics named with `prefix`."""
    t0, cpu0, r0, e0 = edges["start"]
    t1, cpu1, r1, e1 = edges["end"]
    span = t1 - t0
    used = [b - a for a, b in zip(cpu0, cpu1)]
    sent = r.sent_per_s * r.duration
    m[prefix + "deliveries_per_s"] = r.deliveries_per_s
    m[prefix + "sent_per_s"] = r.sent_per_s
    m[prefix + "server_cores"] = sum(used) / span
    m[prefix + "server_cores_max"] = max(used) / span
    m[prefix + "cpu_us_per_delivery"] = sum(used) * 1e6 / r.deliveries if r.deliveries else math.nan
    m[prefix + "cpu_us_per_msg"] = sum(used) * 1e6 / sent if sent else math.nan
    m[prefix + "gen_cpu"] = r.gen_cpu
    for i, u in enumerate(used):  # each process's own share, per message sent
        m[f"{prefix}p{i}_cpu_us_per_msg"] = u * 1e6 / sent if sent else math.nan
    if with_redis:
        m[prefix + "redis_cores"] = (r1 - r0) / span
        m[prefix + "redis_us_per_msg"] = (r1 - r0) * 1e6 / sent if sent else math.nan
        calls = e1[0] - e0[0]
        m[prefix + "publications_per_s"] = calls / span
        m[prefix + "redis_us_per_pub"] = (r1 - r0) * 1e6 / calls if calls else math.nan
        m[prefix + "script_us_per_pub"] = (e1[1] - e0[1]) / calls if calls else math.nan


def _phase(fleet: ClusterFleet, cfg: ClusterConfig, mode: str, probe: Optional[Probe],
           shares: List[List[Spec]]) -> Tuple[loadgen.LoadResult, List[int]]:
    """One measured window on the connections already there; then the drain and the counts."""
    flow = mode == "flow"
    bulk_poll = min(max(cfg.receivers / 10000, 0.01), 0.1) if flow else 0.0
    t_send = time.monotonic() + 0.1
    for i, pipe in enumerate(fleet.pipes):
        pipe.send(("load", {
            "mode": mode, "t_send": t_send, "t0": t_send + cfg.warmup, "t1": t_send + cfg.warmup + cfg.duration,
            "window": cfg.window, "rate_per_sender": max(cfg.rate, 1.0) / cfg.senders, "senders": cfg.senders,
            # timing is done by ClusterWorker at the probes (worker 0) only, not by the scan
            "sample_every": 0, "probe_every": (FLOW_SAMPLE_EVERY if flow else 1) if i == 0 else 0,
            "poll_interval": (0.002 if i == 0 else bulk_poll) if flow else 0.0,
            "drain_timeout": cfg.drain_timeout, "drain_quiet": 0.3,
        }))
    if probe is not None:
        _sleep_until(t_send + cfg.warmup)
        probe("start")
        _sleep_until(t_send + cfg.warmup + cfg.duration)
        probe("end")
    parts = fleet.gather("loaded", cfg.warmup + cfg.duration + cfg.drain_timeout + 15)
    fleet.broadcast(("local",))
    local = sorted(s for part in fleet.gather("local", 10) for s in part)
    lcfg = loadgen.LoadConfig(receivers=cfg.receivers, senders=cfg.senders, duration=cfg.duration, warmup=cfg.warmup)
    res = loadgen._summarise(lcfg, mode, len(fleet.pipes), {"seconds": 0.0}, parts)
    return res, local


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _latency(m: Dict[str, float], phase: str, r: loadgen.LoadResult, local: List[int]) -> None:
    """Cross-process p50/p99 are `r`'s (the samples whose sender was on another process),
    same-process ones from `local`. One process alone has only the latter."""
    m[f"{phase}_cross_p50_ms"] = r.p50_ms if r.p50_ms is not None else math.nan
    m[f"{phase}_cross_p99_ms"] = r.p99_ms if r.p99_ms is not None else math.nan
    m[f"{phase}_cross_samples"] = r.samples
    m[f"{phase}_same_p50_ms"] = _pct(local, 0.5)
    m[f"{phase}_same_p99_ms"] = _pct(local, 0.99)
    m[f"{phase}_same_samples"] = len(local)


def _pct(values: List[int], q: float) -> float:
    v = loadgen.percentile(values, q)
    return math.nan if v is None else v / 1000.0


def _counts(res: SetupResult, phase: str, r: loadgen.LoadResult, members: int) -> None:
    res.metrics[f"{phase}_sent"] = r.sent_total
    res.metrics[f"{phase}_lost"] = r.lost
    if not r.complete:
        res.notes.append(f"{phase}: incomplete, {r.lost} deliveries lost of {r.sent_total} x {members}")
    if r.dropped:
        res.notes.append(f"{phase}: {r.dropped} connections dropped")
    if r.errors:
        res.notes.append(f"{phase}: errors " + ",".join(f"{k}={v}" for k, v in sorted(r.errors.items())))


# ---- the whole point: set-ups interleaved, medians, the table ------------------------------

SETUPS = ("cluster", "single")
SETUP_LABEL = {"cluster": f"{PROCESSES} processes + Redis", "single": "1 process"}


def run_point(receivers: Sequence[int], cfg: ClusterConfig, repeat: int,
              say: Callable[[str], None] = lambda line: None) -> Dict[Tuple[int, str], List[SetupResult]]:
    """For each R, `repeat` rounds of cluster then single (interleaved, so a drift of the
    shared machine falls on both)."""
    runs: Dict[Tuple[int, str], List[SetupResult]] = {}
    for r in receivers:
        for rep in range(repeat):
            for setup in SETUPS:
                one = ClusterConfig(**{**cfg.__dict__, "receivers": r})
                t = time.monotonic()
                res = run_setup(setup, one)
                runs.setdefault((r, setup), []).append(res)
                summary = res.failed or ", ".join(f"{k}={v:.4g}" for k, v in sorted(res.metrics.items()))
                say(f"R={r} {setup} #{rep + 1}: {summary} ({time.monotonic() - t:.1f}s)")
                for note in res.notes:
                    say(f"  {note}")
    return runs


def median_result(results: List[SetupResult]) -> SetupResult:
    ok = [r for r in results if not r.failed]
    out = SetupResult(results[0].setup)
    if not ok:
        out.failed = results[0].failed
        return out
    keys = {k for r in ok for k in r.metrics}
    for k in keys:
        vals = [r.metrics[k] for r in ok if k in r.metrics and not math.isnan(r.metrics[k])]
        out.metrics[k] = statistics.median(vals) if vals else math.nan
    out.notes = [n for r in results for n in r.notes] + [f"failed: {r.failed}" for r in results if r.failed]
    return out


def _f(v: Optional[float], digits: int = 1) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.{digits}f}"


def _pair(m: Dict[str, float], a: str, b: str) -> str:
    if math.isnan(m.get(a, math.nan)):
        return "-"
    return f"{_f(m.get(a), 1)} / {_f(m.get(b), 1)}"


def _row_start(r: int, setup: str, res: SetupResult, width: int) -> Optional[str]:
    if res.failed and not res.metrics:
        return f"| {r:,} | {SETUP_LABEL[setup]} | n/a: {res.failed[:120]} |" + " |" * (width - 3)
    return None


def _lost(m: Dict[str, float], phase: str) -> str:
    if f"{phase}_lost" not in m:
        return "-"
    lost = int(m[f"{phase}_lost"])
    return "complete" if lost == 0 else f"lost {lost}"


def table(receivers: Sequence[int], results: Dict[Tuple[int, str], SetupResult]) -> str:
    """Two tables: the flow phase (as fast as accepted) and the paced one (the same offered
    load on both set-ups)."""
    flow_head = ("| R | set-up | deliveries/s | messages/s | server CPU us/delivery (all processes) | server CPU us/message "
                 "| server cores (sum; busiest) | Redis cores | Redis CPU us/message | latency ms, cross-process p50 / p99 "
                 "| same-process p50 / p99 | generator cores | counts |")
    paced_head = ("| R | set-up | messages/s | deliveries/s | server CPU us/delivery (all processes) | server CPU us/message "
                  "| server cores (sum; busiest) | Redis cores | Redis CPU us/message | latency ms, cross-process p50 / p99 "
                  "| same-process p50 / p99 | counts |")
    out = ["As fast as accepted (flow phase):", "", flow_head, "|" + "---|" * (flow_head.count("|") - 1)]
    paced = ["", "The same offered load on both set-ups (paced phase):", "", paced_head,
             "|" + "---|" * (paced_head.count("|") - 1)]
    any_paced = False
    for r in receivers:
        for setup in SETUPS:
            res = results.get((r, setup))
            if res is None:
                continue
            failed = _row_start(r, setup, res, flow_head.count("|") - 1)
            if failed:
                out.append(failed)
                continue
            m = res.metrics
            out.append(
                f"| {r:,} | {SETUP_LABEL[setup]} | {_f(m.get('deliveries_per_s'), 0)} | {_f(m.get('sent_per_s'), 0)} "
                f"| {_f(m.get('cpu_us_per_delivery'), 2)} | {_f(m.get('cpu_us_per_msg'), 0)} "
                f"| {_f(m.get('server_cores'), 2)}; {_f(m.get('server_cores_max'), 2)} "
                f"| {_f(m.get('redis_cores'), 2)} | {_f(m.get('redis_us_per_msg'), 1)} "
                f"| {_pair(m, 'flow_cross_p50_ms', 'flow_cross_p99_ms')} | {_pair(m, 'flow_same_p50_ms', 'flow_same_p99_ms')} "
                f"| {_f(m.get('gen_cpu'), 2)} | {_lost(m, 'flow')} |"
            )
            if "paced_sent_per_s" in m:
                any_paced = True
                paced.append(
                    f"| {r:,} | {SETUP_LABEL[setup]} | {_f(m.get('paced_sent_per_s'), 0)} | {_f(m.get('paced_deliveries_per_s'), 0)} "
                    f"| {_f(m.get('paced_cpu_us_per_delivery'), 2)} | {_f(m.get('paced_cpu_us_per_msg'), 0)} "
                    f"| {_f(m.get('paced_server_cores'), 2)}; {_f(m.get('paced_server_cores_max'), 2)} "
                    f"| {_f(m.get('paced_redis_cores'), 2)} | {_f(m.get('paced_redis_us_per_msg'), 1)} "
                    f"| {_pair(m, 'paced_cross_p50_ms', 'paced_cross_p99_ms')} "
                    f"| {_pair(m, 'paced_same_p50_ms', 'paced_same_p99_ms')} | {_lost(m, 'paced')} |"
                )
    return "\n".join(out + (paced if any_paced else []))


def ratios(receivers: Sequence[int], results: Dict[Tuple[int, str], SetupResult]) -> List[str]:
    out = []
    for r in receivers:
        c, s = results.get((r, "cluster")), results.get((r, "single"))
        if c is None or s is None or not c.metrics or not s.metrics:
            continue
        cm, sm = c.metrics, s.metrics
        parts = []
        for prefix, what in (("", "flow"), ("paced_", "paced")):
            a, b = cm.get(prefix + "cpu_us_per_delivery", math.nan), sm.get(prefix + "cpu_us_per_delivery", math.nan)
            if b and not math.isnan(a) and not math.isnan(b):
                parts.append(f"server CPU per delivery ({what}) {a / b:.2f}x one process's")
        if sm.get("deliveries_per_s"):
            parts.append(f"deliveries/s (flow) {cm['deliveries_per_s'] / sm['deliveries_per_s']:.2f}x")
        pubs = cm.get("publications_per_s", math.nan)
        if not math.isnan(pubs) and cm.get("sent_per_s"):
            parts.append(f"Redis ran {pubs:,.0f} publication scripts/s for {cm['sent_per_s']:,.0f} messages/s "
                         f"({_f(cm.get('redis_us_per_pub'), 1)} us of Redis CPU per script, of which "
                         f"{_f(cm.get('script_us_per_pub'), 1)} us inside the script by its commandstats)")
        if "server_runq" in cm:
            parts.append(f"waiting for a CPU in the flow phase (run queue, s/s): the {PROCESSES} processes "
                         f"{cm['server_runq']:.2f}, Redis {cm.get('redis_runq', math.nan):.2f}; one process "
                         f"{sm.get('server_runq', math.nan):.2f}")
        if "idle_server_cores" in cm:
            parts.append(f"idle (members connected, nobody talking): the {PROCESSES} processes "
                         f"{cm['idle_server_cores']:.3f} cores, Redis {cm.get('idle_redis_cores', math.nan):.3f}; "
                         f"one process {sm.get('idle_server_cores', math.nan):.3f}")
        out.append(f"* R={r:,}: " + "; ".join(parts))
    return out


def report(opts: Any, cfg: ClusterConfig, receivers: Sequence[int], results: Dict[Tuple[int, str], SetupResult],
           took: float, load_before: Tuple[float, float, float]) -> str:
    from selchat.bench.runner import machine_facts  # (runner imports this module)

    facts = machine_facts()
    after = os.getloadavg()
    command = ("selchat-bench " + " ".join(shlex.quote(a) for a in getattr(opts, "argv", []))).strip()
    lines = [
        f"## {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — cluster: {PROCESSES} processes on one Redis against one process",
        "",
        f"Command: `{command}`  ",
        f"Machine: {facts['nproc']} CPUs, {facts['cpu']}, Linux {facts['kernel']}, Python {facts['python']}; "
        f"{redis_version()}  ",
        f"Code: {git_label(REPO) or 'not a git checkout'}  ",
        f"Load average (1, 5, 15 min): {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} at the start, "
        f"{after[0]:.2f} {after[1]:.2f} {after[2]:.2f} at the end (the machine is shared).  ",
        f"Run: {opts.repeat} repetition(s), the two set-ups interleaved, medians shown; took {took:.0f} s. "
        f"{cfg.senders} senders, receivers dealt evenly over the processes (receiver i and sender j on process "
        f"i mod {PROCESSES}, j mod {PROCESSES}), all in #lobby, 100-character texts. Flow phase: {cfg.window} messages "
        f"in flight per sender, {cfg.duration:g} s window after {cfg.warmup:g} s; paced phase: {cfg.rate:g} messages/s "
        f"offered in total, the same window. No CPU pinning.",
        "",
        f"* cluster: `{redis_command()}`, then "
        f"{PROCESSES} x `{_describe(True)}`, each started once the previous one logged `in the cluster`",
        f"* one process: `{_describe(False)}`",
        "",
        "Deliveries are messages received by members (the sender's echo counts: R + S per message). Server CPU is "
        "user + system of every selchat process over the phase's window (/proc), divided by the deliveries "
        "or by the messages sent; Redis CPU is redis-server's (all its threads), divided by the messages sent in "
        "the window. Latency is from "
        "`say` to the arrival at a probe (3 receivers per process, in the generator's eager worker): cross = "
        "the sender was on another process than the probe; same = on the probe's own process. Counts: after "
        "each phase every member had every message exactly once, or what was lost.",
        "",
        table(receivers, results),
        "",
    ]
    more = ratios(receivers, results)
    if more:
        lines += more + [""]
    notes = [(r, s, n) for (r, s), res in results.items() for n in res.notes]
    for r, s, n in notes:
        lines.append(f"* note, R={r} {s}: {n}")
    if notes:
        lines.append("")
    return "\n".join(lines)


def redis_command() -> str:
    """redis-server's command line as the report shows it."""
    return "redis-server --port N --bind 127.0.0.1 " + " ".join(shlex.quote(a) for a in RedisProcess.ARGS) + " --dir TMPDIR"


def _describe(with_redis: bool) -> str:
    try:
        spec = _selchat_spec("redis://127.0.0.1:N" if with_redis else None)
    except ClusterBenchError as exc:
        return f"selchat unavailable: {exc}"
    return spec.describe().replace(sys.executable, "python")


def redis_version() -> str:
    try:
        out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "redis-server version unknown"
    v = [w for w in out.split() if w.startswith("v=")]
    return f"redis-server {v[0][2:]}" if v else out.strip()[:60]


# ---- selchat-bench --points cluster ----------------------------------------------------------


def add_arguments(ap: Any) -> None:
    """The cluster point's options on selchat-bench's parser."""
    d = ClusterConfig()
    ap.add_argument("--cluster-receivers", default="10,100",
                    help=f"cluster: receiver counts (each split over {PROCESSES} processes; at most {MAX_RECEIVERS})")
    ap.add_argument("--cluster-senders", type=int, default=d.senders, help="cluster: senders, dealt over the processes")
    ap.add_argument("--cluster-rate", type=float, default=d.rate,
                    help="cluster: messages/s offered in total in the paced (latency) phase; 0: no paced phase")


def config_from(opts: Any) -> Tuple[List[int], ClusterConfig]:
    receivers = [int(x) for x in str(opts.cluster_receivers).split(",") if x.strip()]
    bad = [r for r in receivers if not 0 < r <= MAX_RECEIVERS]
    if bad or not receivers:
        raise ValueError(f"--cluster-receivers: 1..{MAX_RECEIVERS} each, not {opts.cluster_receivers!r}")
    if not 1 <= opts.cluster_senders <= len(SID_ALPHABET):
        raise ValueError(f"--cluster-senders: 1..{len(SID_ALPHABET)}")
    if not 0 < opts.duration <= MAX_DURATION:
        raise ValueError(f"--duration: at most {MAX_DURATION:g} s for the cluster point")
    cfg = ClusterConfig(senders=opts.cluster_senders, duration=opts.duration, warmup=opts.warmup,
                        window=opts.window, rate=opts.cluster_rate, register_timeout=opts.register_timeout)
    return receivers, cfg


def run_from_options(opts: Any) -> int:
    """selchat-bench's entry: the table printed and appended to --results (unless --no-write)."""
    if not redis_available():
        print(f"cluster: {REDIS_SERVER} is not installed (apt-get install redis-server): skipped", file=sys.stderr)
        return 2
    try:
        receivers, cfg = config_from(opts)
    except ValueError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2
    load_before = getattr(opts, "load_before", None) or os.getloadavg()
    started = time.monotonic()
    loadgen.raise_nofile()
    runs = run_point(receivers, cfg, max(opts.repeat, 1),
                     say=lambda line: print(f"[{time.monotonic() - started:6.1f}s] cluster {line}", file=sys.stderr))
    results = {key: median_result(v) for key, v in runs.items()}
    text = report(opts, cfg, receivers, results, time.monotonic() - started, load_before)
    print(text)
    if not opts.no_write and opts.results:
        append_results(Path(opts.results), text)
    return 1 if any(r.failed for v in runs.values() for r in v) else 0
