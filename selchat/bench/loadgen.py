"""Load generator: R receivers and S senders in #lobby, measured over a fixed window.

Why it is built this way (the machine it runs on has two cores, shared with the server):

* Connections are spread over a few worker processes, each one epoll loop over non-blocking
  sockets, so that no single Python process is the ceiling at R=1000.
* The hot path never decodes JSON. A receive lands in one shared buffer; frames are found
  by walking the 4-byte length prefixes; runs of equal-length frames (the common case: every
  message frame of a run has the same size) are checked with strided slices, so every prefix
  is read and verified but at C speed instead of one Python iteration per frame.
* A message is recognised by the marker its text starts with (`~@`, impossible in nicks and
  room names) and counted with one `bytearray.count` over the complete frames of a receive.
  The text carries the sender id and the send time (monotonic microseconds, a clock shared by
  all processes of the machine), so latency is read from a fixed offset after the marker.
* In the as-fast-as-accepted mode each sender keeps at most `window` messages in flight:
  it counts its own echoes (its own marker, sender id included) to know what has been fanned
  out. The server is then measured, not the socket buffers.
* In throughput runs the workers read at most every `poll_interval` seconds, so one receive
  carries many frames; reading every frame as it lands would cost the generator more CPU per
  delivery than the server spends on it. Latency runs read eagerly.
* Every worker reports its own CPU time over the window; the sum, as a fraction of a core,
  tells a reader when the generator rather than the server was the limit.

Correctness is checked after the window: senders stop, everything is drained, and every
member (senders included) must have received every message sent during the run.

With an account password (`LoadConfig.account_password`, `run_idle(account_password=...)`)
every client, senders too, answers its `welcome` with `register` and counts as registered
only once the server's `account` answer came: the measured window sees logged-in members
only. The password hashing happens then, before the window, in the server's KDF workers.

`LoadConfig(protocol="irc")` runs the same shape over IRC instead (selchat.bench.ircload).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# The worker side has a module of its own (BadFrame, READY and scan are named here too, as
# the tests and older scripts know them as loadgen's).
from selchat.bench.worker import (  # noqa: F401
    ACCOUNT_MAX_PENDING,
    BadFrame,
    READY,
    SID_ALPHABET,
    Spec,
    _Worker,
    raise_nofile,
    scan,
    split_round_robin,
)


def _worker_main(pipe: Any, host: str, port: int, msg_size: int, protocol: str = "native", ws_port: int = 0) -> None:
    raise_nofile()
    try:
        if protocol == "irc":
            from selchat.bench.ircload import IrcWorker

            IrcWorker(pipe, host, port, msg_size).run()
        elif protocol == "ws":
            from selchat.bench.wsload import WsWorker

            WsWorker(pipe, host, port, msg_size, ws_port).run()
        else:
            _Worker(pipe, host, port, msg_size).run()
    except BaseException as exc:  # report, never hang the driver
        try:
            pipe.send(("crashed", repr(exc)))
        except OSError:
            pass
        raise


# ==== driver side ============================================================================


class GenError(RuntimeError):
    """The generator could not do what it was asked (registration failed, worker died...)."""


class Fleet:
    """The driver's handle on its worker processes."""

    def __init__(
        self, host: str, port: int, workers: int, msg_size: int = 100, protocol: str = "native", ws_port: int = 0,
    ) -> None:
        ctx = mp.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, host, port, msg_size, protocol, ws_port), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def broadcast(self, cmd: Tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(cmd)

    def gather(self, kind: str, timeout: float) -> List[Any]:
        deadline = time.monotonic() + timeout
        out = []
        for i, pipe in enumerate(self.pipes):
            left = deadline - time.monotonic()
            if not pipe.poll(max(left, 0.0)):
                raise GenError(f"worker {i} did not answer {kind!r} within {timeout:.0f} s")
            got, body = pipe.recv()
            if got != kind:
                raise GenError(f"worker {i} answered {got!r} to {kind!r}: {body}")
            out.append(body)
        return out

    def connect(
        self, shares: Sequence[Sequence[Spec]], rate: float, max_pending: int, timeout: float, account_password: str = "",
    ) -> Dict[str, Any]:
        """Open and register each worker's share, ramped at `rate` connections/s overall
        (with `account_password`, each client also registers an account before it counts)."""
        total = max(sum(len(x) for x in shares), 1)
        if account_password:
            max_pending = min(max_pending, ACCOUNT_MAX_PENDING)
        for pipe, share in zip(self.pipes, shares):
            frac = len(share) / total
            cmd: Tuple[Any, ...] = ("connect", list(share), max(rate * frac, 1.0), max(int(max_pending * frac), 1), timeout)
            pipe.send(cmd + (account_password,) if account_password else cmd)
        parts = self.gather("registered", timeout + 10)
        firsts = [p["t_first"] for p in parts if p["t_first"]]
        lasts = [p["t_last"] for p in parts if p["t_last"]]
        errors: Dict[str, int] = {}
        for p in parts:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        waits = sorted(w for p in parts for w in p["handshakes"])
        return {
            "ok": sum(p["ok"] for p in parts),
            "handshake_p50": percentile(waits, 0.5),
            "handshake_p99": percentile(waits, 0.99),
            "handshake_max": waits[-1] if waits else None,
            "failed": sum(p["failed"] for p in parts),
            "pending": sum(p["pending"] for p in parts),
            "seconds": (max(lasts) - min(firsts)) if firsts and lasts else float("nan"),
            "cpu": sum(p["cpu"] for p in parts),
            "errors": errors,
        }

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> Dict[str, Any]:
        """Read until nothing arrived for `quiet` seconds; return the summed counters."""
        self.broadcast(("settle", quiet, timeout))
        return _sum_counters(self.gather("settled", timeout + 10))

    def counters(self) -> Dict[str, Any]:
        self.broadcast(("counters",))
        return _sum_counters(self.gather("counters", 10))

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("close",))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(deadline - time.monotonic(), 0.1))
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for pipe in self.pipes:
            pipe.close()
        self.pipes = []
        self.procs = []


def _sum_counters(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    errors: Dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    by_prefix: Dict[str, int] = {}
    for p in parts:
        for k, v in p["frames_by_prefix"].items():
            by_prefix[k] = by_prefix.get(k, 0) + v
    return {
        "frames": sum(p["frames"] for p in parts),
        "frames_by_prefix": by_prefix,
        "msgs": sum(p["msgs"] for p in parts),
        "ready": sum(p["ready"] for p in parts),
        "dropped": sum(p["dropped"] for p in parts),
        "cpu": sum(p["cpu"] for p in parts),
        "errors": errors,
    }


@dataclass
class LoadConfig:
    """One measured point. `rate` None means as fast as the server accepts (bounded window).

    Senders and `probes` receivers live in one "fast" worker that reads every
    `fast_poll` seconds and samples latency; the other receivers are spread over
    `bulk_workers` processes that read every `bulk_poll` seconds, so each receive carries
    many frames. At a fixed rate every worker reads eagerly and samples every message.
    """

    host: str = "127.0.0.1"
    port: int = 0
    receivers: int = 100
    senders: int = 10
    duration: float = 5.0
    warmup: float = 1.0
    rate: Optional[float] = None  # messages/s offered in total
    window: int = 8  # messages in flight per sender (flow mode)
    msg_size: int = 100  # characters of text
    probes: int = 10  # receivers in the fast worker that sample latency (flow mode)
    bulk_workers: int = 0  # 0: 1 up to 300 receivers, else 2
    fast_poll: float = 0.002  # seconds between passes of the fast worker (flow mode)
    bulk_poll: Optional[float] = None  # None: R / 10,000 s, within 10..100 ms (flow mode)
    sample_every: int = 0  # 0: every message at a fixed rate, every 10th frame as fast as possible
    ramp_rate: float = 2000.0  # connections/s while registering
    max_pending: int = 256  # connections between connect and welcome, over all workers
    register_timeout: float = 60.0
    drain_timeout: float = 10.0
    drain_quiet: float = 0.3
    protocol: str = "native"  # or "irc": NICK/USER/JOIN and PRIVMSG lines (selchat.bench.ircload)
    # or "ws": receivers on the WebSocket door at ws_port, senders native on port (selchat.bench.wsload)
    ws_port: int = 0
    # native only: every member registers an account with this password after welcome, and the
    # load starts once all of them are logged in (the server must have accounts: a KDF)
    account_password: str = ""


@dataclass
class LoadResult:
    receivers: int
    senders: int
    mode: str
    duration: float  # the measured window as the workers saw it
    deliveries: int  # messages received by all members inside the window
    deliveries_per_s: float
    sent_per_s: float  # messages the senders put on the wire inside the window
    p50_ms: Optional[float]
    p99_ms: Optional[float]
    samples: int
    gen_cpu: float  # generator CPU over the window, in cores (sum over worker processes)
    gen_cpu_max_proc: float  # the busiest worker, in cores
    register_s: float
    sent_total: int
    expected_per_member: int
    lost: int  # deliveries missing after the drain (sum over members)
    complete: bool  # every member received every message sent
    dropped: int
    per_member_min: int = 0  # messages received by the least served member (after the drain)
    per_member_max: int = 0
    errors: Dict[str, int] = field(default_factory=dict)
    workers: int = 0
    bulk_poll_ms: float = 0.0
    gen_cpu_per_proc: List[float] = field(default_factory=list)  # worker 0 holds senders and probes
    protocol: str = "native"
    lines_per_s: float = 0.0  # IRC only: complete lines received by all members in the window
    rx_bytes_per_s: float = 0.0  # IRC only: bytes received by all members in the window

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> Optional[float]:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


Probe = Callable[[str], None]


def plan_shares(cfg: LoadConfig) -> List[List[Spec]]:
    """Worker 0: senders and the latency probes; the rest: the bulk of the receivers.

    Probes are picked evenly across the receivers, so they sit at different places in the
    server's member order rather than all at its front.
    """
    senders: List[Spec] = [(f"s{i:04d}", i) for i in range(cfg.senders)]
    receivers: List[Spec] = [(f"r{i:05d}", -1) for i in range(cfg.receivers)]
    if cfg.rate is not None:
        n = cfg.bulk_workers or (0 if cfg.receivers + cfg.senders < 50 else 1)
        return split_round_robin(senders + receivers, n + 1)
    n = cfg.bulk_workers or (1 if cfg.receivers <= 300 else 2)
    probes = min(cfg.probes, cfg.receivers)
    picked = {round(i * cfg.receivers / probes) for i in range(probes)} if probes else set()
    fast = senders + [r for i, r in enumerate(receivers) if i in picked]
    bulk = [r for i, r in enumerate(receivers) if i not in picked]
    return [fast] + split_round_robin(bulk, n)


def run_load(cfg: LoadConfig, probe: Optional[Probe] = None) -> LoadResult:
    """Register R receivers and S senders, run the measured window, drain and check counts.

    `probe("start")` and `probe("end")` are called in this process at the window's edges
    (the runner samples the server's /proc there).
    """
    if cfg.senders < 1 or cfg.receivers < 0:
        raise ValueError("need at least one sender")
    if cfg.senders > len(SID_ALPHABET):
        raise ValueError(f"at most {len(SID_ALPHABET)} senders (one id byte each)")
    mode = "flow" if cfg.rate is None else "rate"
    if cfg.protocol == "irc":
        from selchat.bench.ircload import plan_irc_shares

        shares = plan_irc_shares(cfg)
    elif cfg.protocol in ("native", "ws"):
        if cfg.account_password and cfg.protocol != "native":
            raise ValueError("accounts are registered by the native workload only")
        if cfg.protocol == "ws" and not cfg.ws_port:
            raise ValueError("the WebSocket workload needs ws_port")
        shares = plan_shares(cfg)
    else:
        raise ValueError(f"unknown protocol {cfg.protocol!r}")
    if mode == "flow":
        bulk_poll = cfg.bulk_poll if cfg.bulk_poll is not None else min(max(cfg.receivers / 10000, 0.01), 0.1)
        polls = [cfg.fast_poll] + [bulk_poll] * (len(shares) - 1)
        every = cfg.sample_every or 10
        samplings = [every] + [0] * (len(shares) - 1)
    else:
        bulk_poll = 0.0
        polls = [0.0] * len(shares)
        samplings = [cfg.sample_every or 1] * len(shares)
    raise_nofile()
    t_send = 0.0
    with Fleet(cfg.host, cfg.port, len(shares), cfg.msg_size, cfg.protocol, cfg.ws_port) as fleet:
        reg = fleet.connect(shares, cfg.ramp_rate, cfg.max_pending, cfg.register_timeout, cfg.account_password)
        want = cfg.receivers + cfg.senders
        if reg["ok"] != want:
            raise GenError(f"registered {reg['ok']} of {want} connections: {reg['errors']}")
        fleet.settle()
        t_send = time.monotonic() + 0.1
        for pipe, poll, every in zip(fleet.pipes, polls, samplings):
            pipe.send(
                (
                    "load",
                    {
                        "mode": mode,
                        "t_send": t_send,
                        "t0": t_send + cfg.warmup,
                        "t1": t_send + cfg.warmup + cfg.duration,
                        "window": cfg.window,
                        "rate_per_sender": (cfg.rate or 1.0) / cfg.senders,
                        "senders": cfg.senders,
                        "sample_every": every,
                        "poll_interval": poll,
                        "drain_timeout": cfg.drain_timeout,
                        "drain_quiet": cfg.drain_quiet,
                    },
                )
            )
        if probe:
            _sleep_until(t_send + cfg.warmup)
            probe("start")
            _sleep_until(t_send + cfg.warmup + cfg.duration)
            probe("end")
        parts = fleet.gather("loaded", cfg.warmup + cfg.duration + cfg.drain_timeout + 15)
    res = _summarise(cfg, mode, len(shares), reg, parts)
    res.bulk_poll_ms = bulk_poll * 1000
    return res


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _summarise(cfg: LoadConfig, mode: str, workers: int, reg: Dict[str, Any], parts: List[Dict[str, Any]]) -> LoadResult:
    missing = [i for i, p in enumerate(parts) if not p["t0"] or not p["t1"]]
    if missing:
        raise GenError(f"workers {missing} never saw the measured window")
    # each worker opens and closes its window at its own loop pass (up to one poll interval
    # late), so rates are taken per worker over its own window, then summed
    spans = [max(p["t1"]["t"] - p["t0"]["t"], 1e-9) for p in parts]
    duration = sum(spans) / len(spans)
    deliveries = sum(p["t1"]["msgs"] - p["t0"]["msgs"] for p in parts)
    deliveries_per_s = sum((p["t1"]["msgs"] - p["t0"]["msgs"]) / d for p, d in zip(parts, spans))
    sent_per_s = sum((p["t1"]["sent"] - p["t0"]["sent"]) / d for p, d in zip(parts, spans))
    lines_per_s = sum((p["t1"].get("lines", 0) - p["t0"].get("lines", 0)) / d for p, d in zip(parts, spans))
    rx_bytes_per_s = sum((p["t1"].get("bytes", 0) - p["t0"].get("bytes", 0)) / d for p, d in zip(parts, spans))
    cpus = [(p["t1"]["cpu"] - p["t0"]["cpu"]) / max(p["t1"]["t"] - p["t0"]["t"], 1e-9) for p in parts]
    samples = sorted(s for p in parts for s in p["samples"])
    sent_total = sum(p["sent_total"] for p in parts)
    per_conn = [n for p in parts for n in p["per_conn"]]
    members = cfg.receivers + cfg.senders
    lost = sum(max(sent_total - n, 0) for n in per_conn) + sent_total * (members - len(per_conn))
    extra = sum(max(n - sent_total, 0) for n in per_conn)
    errors: Dict[str, int] = {}  # each worker's tally is cumulative, registration included
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    if extra:
        errors["more_than_sent"] = extra
    p50 = percentile(samples, 0.50)
    p99 = percentile(samples, 0.99)
    return LoadResult(
        receivers=cfg.receivers,
        senders=cfg.senders,
        mode=mode,
        duration=duration,
        deliveries=deliveries,
        deliveries_per_s=deliveries_per_s,
        sent_per_s=sent_per_s,
        p50_ms=None if p50 is None else p50 / 1000.0,
        p99_ms=None if p99 is None else p99 / 1000.0,
        samples=len(samples),
        gen_cpu=sum(cpus),
        gen_cpu_max_proc=max(cpus),
        register_s=reg["seconds"],
        sent_total=sent_total,
        expected_per_member=sent_total,
        lost=lost,
        complete=(lost == 0 and not extra and len(per_conn) == members),
        dropped=sum(p["dropped"] for p in parts),
        per_member_min=min(per_conn) if per_conn else 0,
        per_member_max=max(per_conn) if per_conn else 0,
        errors=errors,
        workers=workers,
        gen_cpu_per_proc=[round(c, 3) for c in cpus],
        protocol=cfg.protocol,
        lines_per_s=lines_per_s,
        rx_bytes_per_s=rx_bytes_per_s,
    )


@dataclass
class IdleResult:
    connections: int
    registered: int
    register_s: float  # first connect to last welcome
    handshake_p99_ms: Optional[float]  # connect() to welcome of one client
    handshake_max_ms: Optional[float]
    gen_cpu_register: float  # generator CPU while registering, in cores
    extra_joins: int
    join_frames: int  # frames every member received because of the extra joins
    join_frames_old: int  # of which to the members already there
    errors: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


def run_idle(
    host: str,
    port: int,
    connections: int,
    probe: Optional[Probe] = None,
    ramp_rate: float = 2000.0,
    max_pending: int = 512,
    extra_joins: int = 100,
    workers: int = 2,
    register_timeout: float = 60.0,
    protocol: str = "native",
    account_password: str = "",
) -> IdleResult:
    """Ramp `connections` clients into #lobby, let them sit, then add `extra_joins` more.

    With `protocol="ws"`, `port` is a WebSocket door and every client registers over it.
    With `account_password` (native only), every client, the extra joiners too, registers
    an account of its own and counts as registered once logged in.

    `probe("before")` runs before the first connect and `probe("after")` once everybody is
    registered and the traffic has settled, so the caller can difference the server's RSS.
    The extra joins show what a room of that size costs per join (frames to all members).
    """
    if account_password and protocol != "native":
        raise ValueError("accounts are registered by the native workload only")
    raise_nofile()
    specs: List[Spec] = [(f"i{i:05d}", -1) for i in range(connections)]
    with Fleet(host, port, workers, protocol=protocol, ws_port=port if protocol == "ws" else 0) as fleet:
        if probe:
            probe("before")
        reg = fleet.connect(split_round_robin(specs, workers), ramp_rate, max_pending, register_timeout, account_password)
        errors = dict(reg["errors"])
        if reg["ok"] != connections:
            return IdleResult(connections, reg["ok"], float("nan"), None, None, 0.0, 0, 0, 0, errors)
        before = fleet.settle(quiet=0.5, timeout=30)
        if probe:
            probe("after")
        more: List[Spec] = [(f"j{i:05d}", -1) for i in range(extra_joins)]
        reg2 = fleet.connect(split_round_robin(more, workers), ramp_rate, max_pending, register_timeout, account_password)
        after = fleet.settle(quiet=0.5, timeout=30)
        errors = dict(reg2["errors"])  # each worker's tally is cumulative: the first one's too
        new_frames = after["frames"] - before["frames"]
        old_frames = after["frames_by_prefix"].get("i", 0) - before["frames_by_prefix"].get("i", 0)
        return IdleResult(
            connections=connections,
            registered=reg["ok"],
            register_s=reg["seconds"],
            handshake_p99_ms=_ms(reg["handshake_p99"]),
            handshake_max_ms=_ms(reg["handshake_max"]),
            gen_cpu_register=reg["cpu"] / reg["seconds"] if reg["seconds"] > 0 else 0.0,
            extra_joins=reg2["ok"],
            join_frames=new_frames,
            join_frames_old=old_frames,
            errors=errors,
        )


def main(argv: Optional[List[str]] = None) -> int:
    """Run one point against a server that is already listening; print JSON."""
    ap = argparse.ArgumentParser(prog="python -m selchat.bench.loadgen", description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-R", "--receivers", type=int, default=100)
    ap.add_argument("-S", "--senders", type=int, default=10)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=None, help="offered messages/s in total (default: as fast as accepted)")
    ap.add_argument("--window", type=int, default=LoadConfig.window, help="messages in flight per sender")
    ap.add_argument("--bulk-workers", type=int, default=0)
    ap.add_argument("--bulk-poll-ms", type=float, default=None)
    ap.add_argument("--fast-poll-ms", type=float, default=LoadConfig.fast_poll * 1000)
    ap.add_argument("--idle", type=int, default=0, help="instead: ramp this many idle clients and report")
    ap.add_argument("--irc", action="store_true", help="speak IRC to an IRC server (NICK/USER/JOIN #lobby, PRIVMSG lines)")
    ap.add_argument(
        "--ws-port", type=int, default=0,
        help="receivers on this WebSocket door (GET /ws), senders native on --port; with --idle: idle clients there",
    )
    args = ap.parse_args(argv)
    if args.idle and args.irc:
        ap.error("--idle speaks the native protocol or WebSocket only")
    if args.irc and args.ws_port:
        ap.error("--irc and --ws-port exclude each other")
    if args.idle:
        res: Any = run_idle(
            args.host, args.ws_port or args.port, args.idle, workers=args.bulk_workers or 2,
            protocol="ws" if args.ws_port else "native",
        )
    else:
        cfg = LoadConfig(
            host=args.host, port=args.port, receivers=args.receivers, senders=args.senders,
            duration=args.duration, warmup=args.warmup, rate=args.rate, window=args.window,
            bulk_workers=args.bulk_workers, fast_poll=args.fast_poll_ms / 1000,
            bulk_poll=None if args.bulk_poll_ms is None else args.bulk_poll_ms / 1000,
            protocol="irc" if args.irc else "ws" if args.ws_port else "native", ws_port=args.ws_port,
        )
        res = run_load(cfg)
    json.dump(res.as_dict(), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
