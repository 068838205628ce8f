"""`selchat-bench`: run the benchmark points against each server, interleaved, and report medians.

For every point, each repetition starts every server afresh in turn (A B C A B C ...), so a
slow drift of the machine (thermal, other tenants) spreads over all servers instead of
favouring one. The server's CPU time and RSS are read from /proc at the edges of the measured
window. The table goes to stdout and is appended to benchmarks/RESULTS.md with the exact
command, the machine and the date; the fan-out points also give a PNG plot.

Points come in three protocols: the native ones (fan-out, latency, idle) run against the
servers that speak selchat's framed protocol, `ircfanout` and `irclatency` against those that
speak IRC (selchat's IRC door, ngIRCd, InspIRCd), `wsfanout` against selchat's WebSocket door
(`selchat-web`, whose idle point also registers over WebSocket); a server is only run on
the points it can serve, and all kinds share the table's columns.

The latency points (`latency` native, `irclatency` IRC; R = --latency-receivers) offer a fixed
--latency-rate messages/s from --latency-senders senders, paced from the load's start, so
that the server's p50 and p99 at a given load can be compared across servers and doors. With
`--generator c` (the default) both are driven by the C generator in its rate mode (one
generator for selchat's native door, its IRC door and the C IRC servers; every message a
sender, IRC counter or probe receives is timed); a server with accounts, or no compiler, uses
the Python generator. The native latency and irclatency of one R take turns within each
repetition, and under the table each selchat latency point is set beside each C IRC peer's
irclatency at the same R (p50 and p99, and whether selchat's is no worse).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from selchat.bench import cgen, loadgen, loginstorm
from selchat.bench import cluster as cluster_point
from selchat.bench.results import append_results
from selchat.bench.launcher import (
    IRC, NATIVE, REPO, WS, RunningServer, ServerError, ServerSpec, known_servers, resolve_flags, uvloop_available,
)

ALL_POINTS = ("fanout", "latency", "idle", "sweep", "ircfanout", "wsfanout", "irclatency")
KIND_ORDER = ("fanout", "wsfanout", "ircfanout", "latency", "irclatency", "idle")
DEFAULT_SERVERS = "selchat,threaded,asyncio,uvloop,selchat-irc,ngircd,inspircd,selchat-web"
IRC_DRAIN_QUIET = 1.0  # InspIRCd can pause a few hundred ms under load; do not call that the end
GEN_LIMIT = 0.8  # Python generator: cores (all its processes) above which a figure is not trusted
# C generator (one process, pinned): it was the limit when it used this much of its core
# while the server did not use this much of its own (the server had idle CPU)
CGEN_BOUND = 0.9
SERVER_FULL = 0.9
CGEN_KINDS = ("fanout", "ircfanout")  # the fan-out points the C generator runs (window mode)
LATENCY_KINDS = ("latency", "irclatency")  # the fixed-rate points (the C generator's rate mode)
ACCOUNT_PASSWORD = "selchat-bench-password"  # every client of selchat-acct registers with it
OTHER_LIMIT = 0.25  # cores of other processes' load above which a figure is flagged


@dataclass(frozen=True)
class Case:
    """One benchmark point; `kind` is fanout, wsfanout, ircfanout, latency, irclatency or idle."""

    kind: str
    size: int  # receivers (fanout, ircfanout, latency, irclatency) or idle connections

    @property
    def protocol(self) -> str:
        return IRC if self.kind in ("ircfanout", "irclatency") else WS if self.kind == "wsfanout" else NATIVE

    def runs_on(self, spec: ServerSpec) -> bool:
        """The idle point is run over WebSocket on a server measured through its web door."""
        if self.kind == "idle":
            return NATIVE in spec.protocols or WS in spec.protocols
        return self.protocol in spec.protocols

    @property
    def label(self) -> str:
        if self.kind == "fanout":
            return f"fan-out R={self.size}"
        if self.kind == "ircfanout":
            return f"IRC fan-out R={self.size}"
        if self.kind == "wsfanout":
            return f"WebSocket fan-out R={self.size}"
        if self.kind == "latency":
            return f"latency R={self.size}"
        if self.kind == "irclatency":
            return f"IRC latency R={self.size}"
        return f"idle {self.size:,}"


@dataclass
class Outcome:
    """What one run of one case against one server gave."""

    metrics: Dict[str, float] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    failed: Optional[str] = None


def machine_facts() -> Dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# ---- one run --------------------------------------------------------------------------------


def cgen_binary(opts: argparse.Namespace) -> Optional[Path]:
    """The built C generator when `--generator c` (built on first use), else None.

    Without a compiler, or when the build fails, says so in one line and falls back to the
    Python generator for the rest of the run.
    """
    if getattr(opts, "generator", "python") != "c":
        return None
    binary = getattr(opts, "cgen_binary", None)
    if binary is None:
        try:
            binary = opts.cgen_binary = cgen.build()
        except cgen.CgenUnavailable as exc:
            print(f"C generator unavailable ({exc}): using the Python generator", file=sys.stderr)
            opts.generator = "python"
            return None
    return binary


def uses_cgen(case: Case, spec: ServerSpec, opts: argparse.Namespace) -> bool:
    """The C generator runs the fan-out points (window mode) and the latency points (rate
    mode), native and IRC, of servers without accounts; logged-in members (selchat-acct),
    WebSocket and idle points stay with Python."""
    return (case.kind in CGEN_KINDS or case.kind in LATENCY_KINDS) and not spec.accounts and cgen_binary(opts) is not None


def pin_process(pid: int, cpu: int) -> bool:
    """Pin every thread of `pid` to `cpu` (threads it starts later inherit it)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    ok = False
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
            ok = True
        except OSError:  # a thread that ended meanwhile, or a CPU we may not use
            pass
    return ok


def run_case(case: Case, spec: ServerSpec, opts: argparse.Namespace) -> Outcome:
    """Start the server, run the case, stop the server; never raises for a server failure."""
    out = Outcome()
    try:
        with RunningServer(spec) as srv:
            pins = getattr(opts, "pin", None)
            if pins and uses_cgen(case, spec, opts) and not pin_process(srv.pid, pins[0]):
                out.notes.append(f"server not pinned to CPU {pins[0]}")
            try:
                if case.kind == "idle":
                    _run_idle(case, srv, opts, out)
                else:
                    _run_load(case, srv, opts, out)
            except (loadgen.GenError, OSError) as exc:
                out.failed = f"{type(exc).__name__}: {exc}"
            if not srv.alive():
                out.failed = (out.failed or "") + f" server exited ({srv.proc.returncode}): {srv.log_tail(300)!r}"
    except ServerError as exc:
        out.failed = str(exc)
    return out


def machine_ticks() -> Tuple[int, int]:
    """(busy, softirq) clock ticks of the whole machine from /proc/stat.

    softirq is where loopback TCP does much of its receive work; the kernel accounts it to
    no process, so it is shown apart. Busy time that is neither softirq, the server nor the
    generator is somebody else's load on the machine, and makes a figure less trustworthy.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, v[6] if len(v) > 6 else 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_idle_ticks() -> Dict[int, Tuple[int, int]]:
    """(idle, all) clock ticks of each CPU from /proc/stat's cpuN lines.

    With the server and the generator pinned to a CPU each, the idle time of each CPU says
    which of the two had time to spare; the processes' own CPU time does not, since the
    loopback TCP work done in softirq on a CPU is charged to neither.
    """
    out: Dict[int, Tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            if name == "cpu":
                continue
            v = [int(x) for x in vals[:8]]
            out[int(name[3:])] = (v[3] + v[4], sum(v))
    return out


def _run_load(case: Case, srv: RunningServer, opts: argparse.Namespace, out: Outcome) -> None:
    samples: Dict[str, Tuple[float, float, int, Tuple[int, int]]] = {}
    per_cpu: Dict[str, Dict[int, Tuple[int, int]]] = {}

    def probe(edge: str) -> None:
        samples[edge] = (time.monotonic(), srv.cpu_seconds(), srv.rss_kib(), machine_ticks())
        per_cpu[edge] = cpu_idle_ticks()

    # The latency points offer a fixed rate from their own senders; the others keep a window
    # of messages in flight per sender. IRC points talk to the IRC port.
    if case.kind in ("latency", "irclatency"):
        load: Dict[str, Any] = dict(senders=opts.latency_senders, rate=opts.latency_rate)
    else:
        load = dict(senders=opts.senders, window=opts.window)
    if case.kind in ("ircfanout", "irclatency"):
        if srv.irc_port is None:
            raise loadgen.GenError(f"{srv.spec.name} has no IRC port")
        load.update(port=srv.irc_port, protocol="irc", drain_quiet=IRC_DRAIN_QUIET)
    elif case.kind == "wsfanout":
        if srv.web_port is None or srv.port is None:
            raise loadgen.GenError(f"{srv.spec.name} has no web port and native port")
        load.update(port=srv.port, ws_port=srv.web_port, protocol="ws")
    else:
        load.update(port=srv.port)
    cfg = loadgen.LoadConfig(receivers=case.size, duration=opts.duration, warmup=opts.warmup, **load)
    if srv.spec.accounts:  # every member logs into its own account before the load
        cfg.account_password = ACCOUNT_PASSWORD
        cfg.register_timeout = _account_timeout(opts, cfg.receivers + cfg.senders)
    binary = cgen_binary(opts) if uses_cgen(case, srv.spec, opts) else None
    if binary is not None:
        res = _run_cgen(binary, cfg, probe, opts)
    else:
        res = loadgen.run_load(cfg, probe)
    t0, cpu0, rss0, (busy0, soft0) = samples["start"]
    t1, cpu1, rss1, (busy1, soft1) = samples["end"]
    server_cores = (cpu1 - cpu0) / (t1 - t0)
    softirq = (soft1 - soft0) / _TICK / (t1 - t0)
    busy = (busy1 - busy0) / _TICK / (t1 - t0)
    m = out.metrics
    m["deliveries_per_s"] = res.deliveries_per_s
    m["sent_per_s"] = res.sent_per_s
    m["cpu_us_per_delivery"] = (cpu1 - cpu0) * 1e6 / res.deliveries if res.deliveries else math.nan
    m["server_cores"] = server_cores
    m["p50_ms"] = res.p50_ms if res.p50_ms is not None else math.nan
    m["p99_ms"] = res.p99_ms if res.p99_ms is not None else math.nan
    m["gen_cpu"] = res.gen_cpu
    m["gen_c"] = 1.0 if binary is not None else 0.0
    if cfg.rate is not None:
        m["rate"] = cfg.rate  # messages/s offered (the latency points)
        m["samples"] = float(res.samples)
    pins = getattr(opts, "pin", None)
    if binary is not None and pins:
        for key, cpu in (("server_cpu_idle", pins[0]), ("gen_cpu_idle", pins[1])):
            a, b = per_cpu["start"].get(cpu), per_cpu["end"].get(cpu)
            if a and b and b[1] > a[1]:
                m[key] = (b[0] - a[0]) / (b[1] - a[1])
    m["gen_bound"] = 1.0 if generator_bound(m) else 0.0
    m["softirq_cores"] = softirq
    m["other_cores"] = max(busy - softirq - server_cores - res.gen_cpu, 0.0)
    m["rss_mib"] = rss1 / 1024
    if cfg.account_password:
        m["register_s"] = res.register_s  # connect to the last account made
    if cfg.protocol == "irc":
        m["lines_per_s"] = res.lines_per_s
        m["rx_mib_per_s"] = res.rx_bytes_per_s / (1 << 20)
    if not res.complete:
        out.notes.append(f"incomplete: {res.lost} deliveries lost")
    if res.dropped:
        out.notes.append(f"{res.dropped} connections dropped")
    if res.errors:
        out.notes.append("errors " + ",".join(f"{k}={v}" for k, v in sorted(res.errors.items())))


def _run_cgen(binary: Path, cfg: loadgen.LoadConfig, probe: loadgen.Probe, opts: argparse.Namespace) -> loadgen.LoadResult:
    """One point with the C generator, pinned to the second CPU of `--pin`: a window of
    messages in flight (fan-out), or `cfg.rate` messages/s paced from the start (latency)."""
    pins = getattr(opts, "pin", None)
    ccfg = cgen.CgenConfig(
        port=cfg.port, protocol=cfg.protocol, receivers=cfg.receivers, senders=cfg.senders, window=cfg.window,
        duration=cfg.duration, warmup=cfg.warmup, msg_size=cfg.msg_size, host=cfg.host, ramp_rate=cfg.ramp_rate,
        max_pending=cfg.max_pending, register_timeout=cfg.register_timeout, drain_timeout=cfg.drain_timeout,
        drain_quiet=cfg.drain_quiet, cpu=pins[1] if pins else None, quickack=getattr(opts, "quickack", "window"),
        rate=cfg.rate or 0.0,
    )
    try:
        r = cgen.run(binary, ccfg, probe)
    except cgen.CgenFailed as exc:
        raise loadgen.GenError(f"C generator: {exc}") from exc
    errors = dict(r.get("errors") or {})
    if r.get("extra"):
        errors["more_than_sent"] = int(r["extra"])
    return loadgen.LoadResult(
        receivers=cfg.receivers, senders=cfg.senders, mode="rate" if cfg.rate else "flow", duration=r["duration"],
        deliveries=int(r["deliveries"]), deliveries_per_s=r["deliveries_per_s"], sent_per_s=r["sent_per_s"],
        p50_ms=r.get("p50_ms"), p99_ms=r.get("p99_ms"), samples=int(r.get("samples", 0)),
        gen_cpu=r["gen_cpu_proc"], gen_cpu_max_proc=r["gen_cpu_proc"], register_s=r["register_s"],
        sent_total=int(r["sent_total"]), expected_per_member=int(r["sent_total"]), lost=int(r["lost"]),
        complete=bool(r["complete"]), dropped=int(r["dropped"]), per_member_min=int(r["per_member_min"]),
        per_member_max=int(r["per_member_max"]), errors=errors, workers=1, protocol=cfg.protocol,
        lines_per_s=r.get("lines_per_s", 0.0), rx_bytes_per_s=r.get("rx_bytes_per_s", 0.0),
        gen_cpu_per_proc=[round(r["gen_cpu_proc"], 3)],
    )


def generator_bound(m: Dict[str, float]) -> Optional[str]:
    """Why a fan-out figure measured the generator rather than the server, or None.

    C generator pinned to a CPU of its own, the server to another: the generator's CPU had
    less than 1 - CGEN_BOUND of idle time (the generator itself, or the loopback work in
    softirq on its CPU, used it up) while the server's CPU had at least 1 - SERVER_FULL idle,
    i.e. the server was waiting for the generator. Not pinned: the generator's own CPU time
    at least CGEN_BOUND of a core while the server's was below SERVER_FULL. Python generator
    (several processes): the old rule, its processes together above GEN_LIMIT cores.
    """
    gen = m.get("gen_cpu")
    if gen is None or math.isnan(gen):
        return None
    if m.get("gen_c"):
        gen_idle, server_idle = m.get("gen_cpu_idle"), m.get("server_cpu_idle")
        if gen_idle is not None and server_idle is not None:
            if (gen >= CGEN_BOUND or gen_idle < 1 - CGEN_BOUND) and server_idle >= 1 - SERVER_FULL:
                return (
                    f"generator-bound (its CPU {1 - gen_idle:.0%} busy, {gen:.2f} of it the generator's own; "
                    f"the server's CPU {1 - server_idle:.0%} busy)"
                )
            return None
        server = m.get("server_cores", math.nan)
        if gen >= CGEN_BOUND and not server >= SERVER_FULL:
            return f"generator-bound (C generator {gen:.2f} cores, server {server:.2f})"
        return None
    if gen > GEN_LIMIT:
        return f"generator-limited ({gen:.2f} cores)"
    return None


def _server_spare(m: Dict[str, float]) -> str:
    """'' when the server used its CPU up; else what it left idle (pinned: its CPU's idle time)."""
    idle = m.get("server_cpu_idle")
    if idle is not None and not math.isnan(idle):
        return f"the server's CPU {idle:.0%} idle" if idle >= 1 - SERVER_FULL else ""
    cores = m.get("server_cores", 1.0)
    return f"server at {cores:.2f} cores" if cores < SERVER_FULL else ""


def is_generator_bound(o: Optional["Outcome"]) -> bool:
    """A row (a median over repetitions) is generator-bound if any repetition was."""
    return o is not None and bool(o.metrics.get("gen_bound"))


def _run_idle(case: Case, srv: RunningServer, opts: argparse.Namespace, out: Outcome) -> None:
    samples: Dict[str, Tuple[float, float, int]] = {}

    def probe(edge: str) -> None:
        samples[edge] = (time.monotonic(), srv.cpu_seconds(), srv.rss_kib())

    over_ws = NATIVE not in srv.spec.protocols and WS in srv.spec.protocols
    port = srv.web_port if over_ws else srv.port
    if port is None:
        raise loadgen.GenError(f"{srv.spec.name} has no port for idle clients")
    timeout = _account_timeout(opts, case.size) if srv.spec.accounts else opts.register_timeout
    res = loadgen.run_idle(
        "127.0.0.1", port, case.size, probe, ramp_rate=opts.ramp_rate,
        register_timeout=timeout, extra_joins=opts.extra_joins,
        protocol="ws" if over_ws else "native", account_password=ACCOUNT_PASSWORD if srv.spec.accounts else "",
    )
    if res.registered != case.size:
        out.failed = f"n/a: {res.registered:,} of {case.size:,} registered within {timeout:.0f} s ({res.errors})"
        return
    rss0 = samples["before"][2]
    rss1 = samples["after"][2]
    m = out.metrics
    m["kib_per_conn"] = (rss1 - rss0) / case.size
    m["register_s"] = res.register_s
    m["handshake_p99_ms"] = res.handshake_p99_ms if res.handshake_p99_ms is not None else math.nan
    m["handshake_max_ms"] = res.handshake_max_ms if res.handshake_max_ms is not None else math.nan
    m["join_frames"] = res.join_frames
    m["join_frames_old"] = res.join_frames_old
    m["gen_cpu"] = res.gen_cpu_register
    m["rss_mib"] = rss1 / 1024
    if res.errors:
        out.notes.append("errors " + ",".join(f"{k}={v}" for k, v in sorted(res.errors.items())))


def _account_timeout(opts: argparse.Namespace, clients: int) -> float:
    """Registration time allowed when every client makes an account: each one is a password
    hash (~20 ms of a KDF worker's CPU), so the time grows with the clients."""
    return opts.register_timeout + clients * opts.account_seconds


# ---- the whole run ---------------------------------------------------------------------------


def plan(opts: argparse.Namespace) -> List[Case]:
    cases: List[Case] = []
    for point in opts.points:
        if point == "fanout":
            cases += [Case("fanout", r) for r in opts.fanout_receivers]
        elif point == "ircfanout":
            cases += [Case("ircfanout", r) for r in opts.fanout_receivers]
        elif point == "wsfanout":
            cases += [Case("wsfanout", r) for r in opts.fanout_receivers]
        elif point == "sweep":
            cases += [Case("fanout", r) for r in opts.sweep]
        elif point == "latency":
            cases.append(Case("latency", opts.latency_receivers))
        elif point == "irclatency":
            cases.append(Case("irclatency", opts.latency_receivers))
        elif point == "idle":
            cases += [Case("idle", n) for n in opts.idle_sizes]
    seen = set()
    unique = []
    for c in sorted(cases, key=lambda c: (KIND_ORDER.index(c.kind), c.size)):
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def interleave_groups(cases: Sequence[Case], servers: Sequence[str], specs: Dict[str, ServerSpec]) -> List[List[Tuple[Case, str]]]:
    """The (case, server) runs that take turns within each repetition.

    Normally one case on every server that can run it. A WebSocket or IRC fan-out joins the
    native fan-out group of the same R, and the IRC latency the native latency of the same R:
    they are compared with each other, so they must share the machine's drift (A B A B ...),
    not run one after the other.
    """
    groups: Dict[Tuple[str, int], List[Tuple[Case, str]]] = {}
    for case in cases:
        # WebSocket and IRC fan-out take turns with the native fan-out of the same R
        shared = case.kind in ("wsfanout", "ircfanout") and Case("fanout", case.size) in cases
        key = ("fanout", case.size) if shared else (case.kind, case.size)
        if case.kind in LATENCY_KINDS:
            key = ("latency", case.size)
        groups.setdefault(key, []).extend((case, n) for n in servers if case.runs_on(specs[n]))
    return [g for g in groups.values() if g]


def median_outcome(runs: Sequence[Outcome]) -> Outcome:
    ok = [r for r in runs if r.failed is None]
    out = Outcome()
    if not ok:
        out.failed = runs[0].failed if runs else "not run"
        return out
    keys = sorted({k for r in ok for k in r.metrics})
    for k in keys:
        vals = [r.metrics[k] for r in ok if k in r.metrics and not math.isnan(r.metrics[k])]
        out.metrics[k] = statistics.median(vals) if vals else math.nan
    bound = sum(1 for r in ok if r.metrics.get("gen_bound"))
    if "gen_bound" in out.metrics:
        out.metrics["gen_bound"] = bound / len(ok)  # any repetition: the row is not quoted
    if bound:
        out.notes.append(f"generator-bound in {bound} of {len(ok)} repetitions")
    for r in runs:
        for n in r.notes:
            if n not in out.notes:
                out.notes.append(n)
        if r.failed:
            out.notes.append(f"a repetition failed: {r.failed}")
    if len(ok) < len(runs):
        out.notes.append(f"median of {len(ok)} of {len(runs)} repetitions")
    return out


def _fmt(v: Optional[float], digits: int = 1, thousands: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if thousands:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _register(m: Dict[str, float]) -> str:
    if "register_s" not in m:
        return "–"
    return f"{_fmt(m['register_s'], 2)} ({_fmt(m.get('handshake_p99_ms'), 1)} / {_fmt(m.get('handshake_max_ms'), 0)})"


def table(
    cases: Sequence[Case],
    servers: Sequence[str],
    results: Dict[Tuple[Case, str], Outcome],
    labels: Optional[Dict[str, str]] = None,
) -> str:
    """The markdown table; `labels` maps a server name to what its rows show (git hash)."""
    labels = labels or {}
    head = (
        "| point | server | deliveries/s | server CPU µs/delivery | server CPU (cores) | p50 ms | p99 ms "
        "| KiB/idle conn | register s (p99 / max wait ms) | frames for 100 joins (to old members) | generator CPU (cores) "
        "| idle of server / generator CPU | softirq / other load (cores) | notes |"
    )
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for case in cases:
        for name in servers:
            o = results.get((case, name))
            if o is None:
                continue
            if o.failed and not o.metrics:
                lines.append(f"| {case.label} | {labels.get(name, name)} | " + " | ".join(["n/a"] * 11) + f" | {o.failed[:300]} |")
                continue
            m = o.metrics
            notes = list(o.notes)
            gen = m.get("gen_cpu")
            if case.kind != "idle":
                reason = generator_bound(m)
                if reason or is_generator_bound(o):
                    notes.insert(0, f"**{reason or 'generator-bound'}: figure not valid**")
                elif m.get("gen_c") and _server_spare(m) and case.kind not in LATENCY_KINDS:
                    notes.insert(0, f"{_server_spare(m)}: not CPU-bound")  # at a fixed rate it never is
                if "gen_c" in m and not m["gen_c"] and case.kind in CGEN_KINDS + LATENCY_KINDS:
                    notes.append("Python generator")
            other = m.get("other_cores", 0.0)
            if other > OTHER_LIMIT:
                notes.insert(0, f"machine busy with other work ({other:.2f} cores)")
            joins = "–"
            if "join_frames" in m:
                joins = f"{m['join_frames']:,.0f} ({m['join_frames_old']:,.0f})"
            lines.append(
                "| "
                + " | ".join(
                    [
                        case.label,
                        labels.get(name, name),
                        _fmt(m.get("deliveries_per_s"), thousands=True),
                        _fmt(m.get("cpu_us_per_delivery"), 2),
                        _fmt(m.get("server_cores"), 2),
                        _fmt(m.get("p50_ms"), 2),
                        _fmt(m.get("p99_ms"), 2),
                        _fmt(m.get("kib_per_conn"), 1),
                        _register(m),
                        joins,
                        _fmt(gen, 2),
                        f"{m['server_cpu_idle']:.0%} / {m['gen_cpu_idle']:.0%}" if "gen_cpu_idle" in m and "server_cpu_idle" in m else "–",
                        f"{_fmt(m.get('softirq_cores'), 2)} / {_fmt(m.get('other_cores'), 2)}" if "other_cores" in m else "–",
                        "; ".join(notes).replace("|", "/")[:400],
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


GEN_BOUND_SHOWN = "generator-bound (no ratio: the generator, not the server, was the limit)"
IRC_PEERS = ("inspircd", "ngircd")  # the C servers selchat is compared with


def _fanout_cell(o: Optional[Outcome]) -> str:
    if o is None:
        return "–"
    m = o.metrics
    if o.failed and not m or "deliveries_per_s" not in m:
        return "n/a"
    if is_generator_bound(o):
        return f"generator-bound ({m['deliveries_per_s'] / 1e6:.2f} M)"
    cell = f"{m['deliveries_per_s'] / 1e6:.2f} M/s, {_fmt(m.get('cpu_us_per_delivery'), 2)} µs CPU, {_fmt(m.get('server_cores'), 2)} cores"
    if any(n.startswith("incomplete") for n in o.notes):
        cell += ", incomplete"
    return cell


def fanout_matrix(cases: Sequence[Case], servers: Sequence[str], results: Dict[Tuple[Case, str], Outcome], labels: Optional[Dict[str, str]] = None) -> List[str]:
    """Receivers down, servers across: deliveries/s, server CPU per delivery and cores of the
    native and IRC fan-out points (each server on the kind it speaks), when a run has both."""
    labels = labels or {}
    fan = [c for c in cases if c.kind in CGEN_KINDS]
    sizes = sorted({c.size for c in fan})
    cols = [n for n in servers if any((c, n) in results for c in fan)]
    if not sizes or len(cols) < 2:
        return []
    head = "| receivers | " + " | ".join(f"{labels.get(n, n)} ({'IRC' if any(c.kind == 'ircfanout' and (c, n) in results for c in fan) else 'native'})" for n in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in sizes:
        cells = []
        for n in cols:
            o = results.get((Case("fanout", r), n)) or results.get((Case("ircfanout", r), n))
            cells.append(_fanout_cell(o))
        lines.append(f"| {r:,} | " + " | ".join(cells) + " |")
    return lines


def _ours_and_peers(servers: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The selchat servers compared with the C IRC servers (not the web door's), and those peers."""
    return ([n for n in servers if n.startswith("selchat") and n != "selchat-web"],
            [n for n in servers if n in IRC_PEERS])


def peer_ratios(cases: Sequence[Case], servers: Sequence[str], results: Dict[Tuple[Case, str], Outcome]) -> List[str]:
    """selchat (native and IRC door) against the C IRC servers at each R measured by both:
    deliveries/s and server CPU per delivery; `generator-bound` instead of a ratio when
    either row was (a ratio of a generator's limit says nothing about the servers)."""
    out: List[str] = []
    ours, peers = _ours_and_peers(servers)
    for r in sorted({c.size for c in cases if c.kind in CGEN_KINDS}):
        for peer in peers:
            po = results.get((Case("ircfanout", r), peer))
            if po is None or "deliveries_per_s" not in po.metrics:
                continue
            for n in ours:
                o = results.get((Case("ircfanout", r), n)) or results.get((Case("fanout", r), n))
                if o is None or "deliveries_per_s" not in o.metrics:
                    continue
                a, b = o.metrics["deliveries_per_s"], po.metrics["deliveries_per_s"]
                head = f"* {n} / {peer} at R={r}: {a:,.0f} / {b:,.0f} deliveries/s"
                if is_generator_bound(o) or is_generator_bound(po):
                    out.append(f"{head} = {GEN_BOUND_SHOWN}")
                    continue
                line = f"{head} = **{a / b:.2f}x**"
                ca, cb = o.metrics.get("cpu_us_per_delivery"), po.metrics.get("cpu_us_per_delivery")
                if ca and cb and not math.isnan(ca) and not math.isnan(cb):
                    line += f"; server CPU per delivery {ca:.3f} / {cb:.3f} µs = {ca / cb:.2f}x"
                out.append(line)
    return out


# at a fixed rate nothing is "the limit", but a full generator CPU delays its own sends and
# receives, so the figures would time the generator's queue as much as the server's
LAT_GEN_BOUND_SHOWN = "no verdict (the generator's CPU was full: its own delays are in the figures)"


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None or math.isnan(v) else v


def latency_ratios(cases: Sequence[Case], servers: Sequence[str], results: Dict[Tuple[Case, str], Outcome]) -> List[str]:
    """selchat's latency points (native door: `latency`, IRC door: `irclatency`) beside each C
    IRC peer's `irclatency` at the same R: p50 and p99 side by side, and whether selchat's are
    no worse (both at most the peer's). Issue 19 asks this at 200 messages/s into 100 receivers."""
    out: List[str] = []
    ours, peers = _ours_and_peers(servers)
    for r in sorted({c.size for c in cases if c.kind in LATENCY_KINDS}):
        for peer in peers:
            po = results.get((Case("irclatency", r), peer))
            if po is None or _ms(po.metrics.get("p99_ms")) is None or _ms(po.metrics.get("p50_ms")) is None:
                continue
            b50, b99 = po.metrics["p50_ms"], po.metrics["p99_ms"]
            for n in ours:
                for kind, door in (("latency", "native"), ("irclatency", "IRC door")):
                    o = results.get((Case(kind, r), n))
                    if o is None:
                        continue
                    a50, a99 = _ms(o.metrics.get("p50_ms")), _ms(o.metrics.get("p99_ms"))
                    if a50 is None or a99 is None:
                        continue
                    rate = o.metrics.get("rate") or po.metrics.get("rate")
                    at = f"R={r}" + (f", {rate:g} msg/s" if rate else "")
                    head = f"* {n} ({door}) / {peer} latency at {at}: p50 {a50:.3f} / {b50:.3f} ms, p99 {a99:.3f} / {b99:.3f} ms"
                    if is_generator_bound(o) or is_generator_bound(po):
                        out.append(f"{head}: {LAT_GEN_BOUND_SHOWN}")
                        continue
                    worse = [f"{q} {x / y:.2f}x" for q, x, y in (("p50", a50, b50), ("p99", a99, b99)) if x > y]
                    line = f"{head}: **no worse**" if not worse else f"{head}: **worse** ({', '.join(worse)})"
                    if o.metrics.get("gen_c") != po.metrics.get("gen_c"):
                        line += " (not the same generator: C and Python)"
                    out.append(line)
    return out


def ws_ratios(cases: Sequence[Case], servers: Sequence[str], results: Dict[Tuple[Case, str], Outcome]) -> List[str]:
    """WebSocket fan-out over native fan-out at each R, when one run measured both."""
    out: List[str] = []
    native = [n for n in servers if n == "selchat"] or [n for n in servers if n.startswith("selchat") and n != "selchat-web"]
    for case in cases:
        if case.kind != "wsfanout":
            continue
        for ws in servers:
            o = results.get((case, ws))
            if o is None or "deliveries_per_s" not in o.metrics:
                continue
            for nat in native:
                ref = results.get((Case("fanout", case.size), nat))
                if ref is None or not ref.metrics.get("deliveries_per_s"):
                    continue
                a, b = o.metrics["deliveries_per_s"], ref.metrics["deliveries_per_s"]
                ratio = GEN_BOUND_SHOWN if is_generator_bound(o) or is_generator_bound(ref) else f"**{a / b:.2f}x**"
                out.append(f"* WebSocket / native fan-out at R={case.size}: {ws} {a:,.0f} / {nat} {b:,.0f} = {ratio}")
    return out


def account_ratios(cases: Sequence[Case], servers: Sequence[str], results: Dict[Tuple[Case, str], Outcome]) -> List[str]:
    """Logged-in members (selchat-acct) against guests (selchat) at each point both measured."""
    if "selchat-acct" not in servers or "selchat" not in servers:
        return []
    out: List[str] = []
    for case in cases:
        acct, guest = results.get((case, "selchat-acct")), results.get((case, "selchat"))
        if acct is None or guest is None:
            continue
        if case.kind == "idle":
            a, b = acct.metrics.get("kib_per_conn"), guest.metrics.get("kib_per_conn")
            if a is not None and b is not None and not math.isnan(a) and not math.isnan(b):
                ratio = f", **{a / b:.2f}x**" if b > 0 else ""
                out.append(f"* KiB per idle user at {case.label}: logged in {a:.1f} / guest {b:.1f} ({a - b:+.1f} KiB{ratio})")
            continue
        key = "deliveries_per_s" if case.kind == "fanout" else "p99_ms"
        a, b = acct.metrics.get(key), guest.metrics.get(key)
        if not a or not b or math.isnan(a) or math.isnan(b):
            continue
        what = "fan-out" if case.kind == "fanout" else "p99 latency"
        unit = "" if case.kind == "fanout" else " ms"
        shown = f"{a:,.0f}{unit} / {b:,.0f}{unit}" if case.kind == "fanout" else f"{a:.2f}{unit} / {b:.2f}{unit}"
        if is_generator_bound(acct) or is_generator_bound(guest):
            out.append(f"* logged-in / guest {what} at {case.label.split(' ', 1)[1]}: {shown} = {GEN_BOUND_SHOWN}")
            continue
        line = f"* logged-in / guest {what} at {case.label.split(' ', 1)[1]}: {shown} = **{a / b:.2f}x**"
        ca, cb = acct.metrics.get("cpu_us_per_delivery"), guest.metrics.get("cpu_us_per_delivery")
        if case.kind == "fanout" and ca and cb and not math.isnan(ca) and not math.isnan(cb):
            # what a busy machine disturbs least: the server's own CPU for each delivery
            line += f" (server CPU µs/delivery {ca:.3f} / {cb:.3f} = {ca / cb:.2f}x)"
        out.append(line)
    return out


def plot(cases: Sequence[Case], servers: Sequence[str], results: Dict[Tuple[Case, str], Outcome], path: Path) -> bool:
    fan = [c for c in cases if c.kind == "fanout"]
    if not fan:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in servers:
        xs, thr, p99 = [], [], []
        for c in fan:
            o = results.get((c, name))
            if o is None or o.failed and not o.metrics:
                continue
            xs.append(c.size)
            thr.append(o.metrics.get("deliveries_per_s", math.nan))
            p99.append(o.metrics.get("p99_ms", math.nan))
        if xs:
            ax1.plot(xs, thr, marker="o", label=name)
            ax2.plot(xs, p99, marker="o", label=name)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("receivers in #lobby")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    ax1.set_ylabel("deliveries/s")
    ax1.set_title("fan-out throughput (as fast as accepted)")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency, ms")
    ax2.set_title("p99 latency in the same runs (in flight / throughput)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(
    opts: argparse.Namespace,
    cases: Sequence[Case],
    servers: Sequence[str],
    specs: Dict[str, ServerSpec],
    results: Dict[Tuple[Case, str], Outcome],
    started: float,
    plotted: Optional[Path],
    skipped: Dict[str, str],
) -> str:
    facts = machine_facts()
    cmd = "selchat-bench " + " ".join(shlex.quote(a) for a in opts.argv)
    lines = [
        f"## {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — {', '.join(specs[n].shown for n in servers)}",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {facts['nproc']} CPUs, {facts['cpu']}, Linux {facts['kernel']}, Python {facts['python']}  ",
        f"Run: {opts.repeat} repetition(s) per point, servers interleaved, medians shown; "
        f"measured window {opts.duration:g} s after {opts.warmup:g} s warm-up; {opts.senders} senders, "
        f"{opts.window} messages in flight per sender; 100-character texts; took {time.monotonic() - started:.0f} s.",
    ]
    if any(c.kind in CGEN_KINDS for c in cases):
        lines[-1] += "  "
        if getattr(opts, "generator", "python") == "c":
            pin = getattr(opts, "pin", None)
            where = f"pinned to CPU {pin[1]}, the server to CPU {pin[0]}" if pin else "not pinned"
            lines.append(
                f"Generator of the fan-out points: C (selchat/bench/cgen/loadgen.c; one epoll process, {where}; "
                f"TCP_QUICKACK: {getattr(opts, 'quickack', 'window')}); a row is generator-bound when the generator's CPU "
                f"was less than {1 - CGEN_BOUND:.0%} idle while the server's was at least {1 - SERVER_FULL:.0%} idle"
                + ("" if pin else f" (not pinned: generator >= {CGEN_BOUND:g} cores while the server < {SERVER_FULL:g})")
                + ".  "
            )
        else:
            lines.append(f"Generator of the fan-out points: Python (worker processes, not pinned; generator-limited above {GEN_LIMIT:g} cores).  ")
    before = getattr(opts, "load_before", None)
    if before:
        after = os.getloadavg()
        lines[-1] += "  " if not lines[-1].endswith("  ") else ""
        lines.append(f"Load average (1, 5, 15 min): {before[0]:.2f} {before[1]:.2f} {before[2]:.2f} at the start, {after[0]:.2f} {after[1]:.2f} {after[2]:.2f} at the end.")
    lines.append("")
    for name in servers:
        spec = specs[name]
        line = f"* `{spec.shown}`: `{spec.describe()}`"
        if spec.note:
            line += f" ({spec.note})"
        lines.append(line)
    for name, why in skipped.items():
        lines.append(f"* `{name}` skipped: {why}")
    if any(c.kind == "ircfanout" for c in cases):
        lines += [
            "",
            "IRC fan-out: the same R receivers and S senders in #lobby over IRC; `PRIVMSG #lobby :` + the same "
            "100-character text; a delivery is one PRIVMSG line received by one member (each message reaches "
            "R + S - 1: IRC does not echo to the sender); each sender's window is counted by one designated receiver.",
        ]
    if any(c.kind in LATENCY_KINDS for c in cases):
        c_gen = getattr(opts, "generator", "python") == "c"
        lines += [
            "",
            f"Latency ({', '.join(sorted({c.label for c in cases if c.kind in LATENCY_KINDS}))}): R receivers and "
            f"{opts.latency_senders} senders in #lobby (native frames or IRC PRIVMSG, the fan-out's texts); the senders "
            f"together offer {opts.latency_rate:g} messages/s whatever the server does, message k due k/{opts.latency_rate:g} s "
            "after the load's start, senders in turn; p50/p99 from the send time written in the text to the receive. "
            + (
                "Generator: C in its rate mode (every message received by a sender, an IRC counter or one of 10 probe "
                "receivers is timed), the same for every server but those with accounts (Python, every delivery timed)."
                if c_gen else "Generator: Python (every delivery timed)."
            ),
        ]
    if "selchat-acct" in servers:
        lines += [
            "",
            "selchat-acct: every client (senders, receivers, idle clients) registers an account of its own "
            "right after `welcome` (`register`, the answer `account` awaited) before anything is measured; "
            "its register column is connect to the last account made. RSS is the server process's "
            "(the KDF worker processes are apart).",
        ]
    if any(c.kind == "wsfanout" for c in cases):
        lines += [
            "",
            "WebSocket fan-out: the same R receivers on selchat's web door (`GET /ws`, one unmasked text frame per "
            "JSON message), the same S native senders counting their own echoes; a delivery is one `message` "
            "received by one member (R + S per message). An idle row of `selchat-web` registers its clients over WebSocket.",
        ]
    lines += ["", table(cases, servers, results, {n: specs[n].shown for n in servers}), ""]
    matrix = fanout_matrix(cases, servers, results, {n: specs[n].shown for n in servers})
    if matrix:
        lines += matrix + [""]
    ratio_lines = (
        peer_ratios(cases, servers, results) + latency_ratios(cases, servers, results)
        + ws_ratios(cases, servers, results) + account_ratios(cases, servers, results)
    )
    if ratio_lines:
        lines += ratio_lines + [""]
    if plotted:
        rel = os.path.relpath(plotted, Path(opts.results).parent) if opts.results else str(plotted)
        lines += [f"![throughput and p99 latency against receivers]({rel})", ""]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="selchat-bench",
        description="Benchmark selchat against reference servers (a thread per connection, asyncio, uvloop, ngIRCd, InspIRCd).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--servers", default=DEFAULT_SERVERS,
        help="comma-separated: selchat, selchat-db (history in an SQLite file), selchat-base (the server of --baseline), "
        "selchat-acct (every client logged into an account), threaded, asyncio, uvloop (native protocol); selchat-irc (selchat's IRC door), selchat-irc-db (the IRC door, history in an SQLite file), ngircd, inspircd (IRC); "
        "selchat-web (selchat's WebSocket door)",
    )
    ap.add_argument("--points", default=",".join(ALL_POINTS), help="comma-separated: fanout, latency, idle, sweep (native); ircfanout, irclatency (IRC); wsfanout (WebSocket); loginstorm (not in the default: accounts, see --storm-*); cluster (not in the default: 3 processes on one Redis against one, see --cluster-*)")
    ap.add_argument("--baseline", default="", metavar="PATH", help="another checkout whose selchat.server runs as selchat-base (e.g. the code before a redesign)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each measured window")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window opens")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of each point (medians are reported)")
    ap.add_argument("--senders", type=int, default=10)
    ap.add_argument("--window", type=int, default=loadgen.LoadConfig.window, help="messages in flight per sender in fan-out runs")
    ap.add_argument(
        "--generator", choices=("c", "python"), default="c",
        help="who drives fanout, ircfanout, latency and irclatency: the C generator (selchat/bench/cgen, built with cc; "
        "falls back to python without a compiler; servers with accounts use python) or the Python one; the other points "
        "always use Python",
    )
    ap.add_argument(
        "--pin", default="0,1", metavar="SERVER_CPU,GEN_CPU",
        help="with the C generator, pin the server and the generator to these CPUs ('off': no pinning)",
    )
    ap.add_argument(
        "--quickack", choices=("window", "all", "none"), default="window",
        help="C generator: TCP_QUICKACK after each receive on the members that drive the window, all, or none",
    )
    ap.add_argument("--fanout-receivers", default="100,1000", help="receiver counts of fanout, wsfanout and ircfanout")
    ap.add_argument("--sweep", default="100,300,1000,3000", help="receiver counts of the plot")
    ap.add_argument("--latency-rate", type=float, default=200.0, help="messages/s offered in total in latency and irclatency")
    ap.add_argument("--latency-receivers", type=int, default=100, help="receivers of latency and irclatency")
    ap.add_argument("--latency-senders", type=int, default=10, help="senders of latency and irclatency")
    ap.add_argument("--idle-sizes", default="1000,10000")
    ap.add_argument("--extra-joins", type=int, default=100, help="joins added to the idle room to count their frames")
    ap.add_argument("--ramp-rate", type=float, default=2000.0, help="connections/s while registering idle clients")
    ap.add_argument("--register-timeout", type=float, default=60.0, help="seconds before an idle point is n/a")
    ap.add_argument(
        "--account-seconds", type=float, default=0.1,
        help="selchat-acct: registration seconds allowed per client on top of --register-timeout (each makes an account)",
    )
    ap.add_argument(
        "--server-args", action="append", default=[], metavar="NAME=ARGS",
        help="replace a server's extra flags, e.g. selchat='--log-level warning --max-outbuf 1048576'",
    )
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "RESULTS.md"), help="markdown file to append to")
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "fanout.png"))
    ap.add_argument("--json", default="", help="also write raw per-repetition numbers here")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot alone")
    loginstorm.add_arguments(ap)
    cluster_point.add_arguments(ap)
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.points = [p.strip() for p in args.points.split(",") if p.strip()]
    bad = [p for p in args.points if p not in ALL_POINTS + (loginstorm.POINT, cluster_point.POINT)]
    if bad:
        ap.error(f"unknown points {bad}; choose from {ALL_POINTS + (loginstorm.POINT, cluster_point.POINT)}")
    args.fanout_receivers = [int(x) for x in args.fanout_receivers.split(",") if x]
    args.pin = _parse_pin(ap, args.pin)
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    args.idle_sizes = [int(x) for x in args.idle_sizes.split(",") if x]
    return args


def _parse_pin(ap: argparse.ArgumentParser, text: str) -> Optional[Tuple[int, int]]:
    """--pin: (server CPU, generator CPU), or None ('off', or a machine with one CPU)."""
    if text.strip().lower() in ("off", "no", "none", ""):
        return None
    try:
        a, b = (int(x) for x in text.split(","))
    except ValueError:
        ap.error(f"--pin takes SERVER_CPU,GEN_CPU or off, not {text!r}")
    allowed = os.sched_getaffinity(0)
    if a == b or a not in allowed or b not in allowed:
        print(f"--pin {text}: needs two different CPUs this process may use ({sorted(allowed)}); not pinning", file=sys.stderr)
        return None
    return a, b


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv)
    opts.load_before = os.getloadavg()
    if loginstorm.POINT in opts.points:  # its own server and report (selchat/bench/loginstorm.py)
        opts.points.remove(loginstorm.POINT)
        code = loginstorm.run_from_options(opts)
        if not opts.points:
            return code
    if cluster_point.POINT in opts.points:  # its own Redis, servers and report (selchat/bench/cluster.py)
        opts.points.remove(cluster_point.POINT)
        code = cluster_point.run_from_options(opts)
        if not opts.points:
            return code
    started = time.monotonic()
    loadgen.raise_nofile()  # the servers we start inherit the raised limit
    overrides = {}
    for item in opts.server_args:
        name, _, args = item.partition("=")
        overrides[name.strip()] = args
    specs = known_servers(overrides, Path(opts.baseline).resolve() if opts.baseline else None)
    servers: List[str] = []
    skipped: Dict[str, str] = {}
    for name in opts.servers:
        if name not in specs:
            print(f"unknown server {name!r}; known: {', '.join(specs)}", file=sys.stderr)
            return 2
        spec = specs[name]
        resolve_flags(spec)
        if spec.unavailable:
            skipped[name] = spec.unavailable
        elif name == "uvloop" and not uvloop_available():
            skipped[name] = "uvloop does not import (pip install uvloop)"
        else:
            servers.append(name)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    if not servers:
        print("no server to measure", file=sys.stderr)
        return 2
    cases = []
    for case in plan(opts):
        if any(case.runs_on(specs[n]) for n in servers):
            cases.append(case)
        else:
            print(f"skipping {case.label}: no server in --servers speaks {case.protocol}", file=sys.stderr)
    runs: Dict[Tuple[Case, str], List[Outcome]] = {}
    for group in interleave_groups(cases, servers, specs):
        for rep in range(opts.repeat):
            for case, name in group:  # interleaved: A B C A B C ...
                t = time.monotonic()
                try:
                    o = run_case(case, specs[name], opts)
                except Exception as exc:  # a harness bug must not lose the other points
                    o = Outcome(failed=f"harness error: {exc!r}")
                    traceback.print_exc()
                runs.setdefault((case, name), []).append(o)
                summary = o.failed or ", ".join(f"{k}={v:.4g}" for k, v in sorted(o.metrics.items()))
                print(f"[{time.monotonic() - started:6.1f}s] {case.label} {name} #{rep + 1}: {summary} ({time.monotonic() - t:.1f}s)", file=sys.stderr)
    results = {key: median_outcome(v) for key, v in runs.items()}
    plotted = None
    if not opts.no_write and opts.plot and plot(cases, servers, results, Path(opts.plot)):
        plotted = Path(opts.plot)
    text = report(opts, cases, servers, specs, results, started, plotted, skipped)
    print(text)
    if not opts.no_write and opts.results:
        append_results(Path(opts.results), text)
    if opts.json:
        raw = {
            f"{case.label} / {name}": [{"metrics": o.metrics, "notes": o.notes, "failed": o.failed} for o in v]
            for (case, name), v in runs.items()
        }
        Path(opts.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
