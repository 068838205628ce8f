"""The C load generator (loadgen.c next to this file): built with `cc` on first use, run per point.

Why a C generator: the Python one (selchat.bench.loadgen) spends about as much CPU per
delivery as the fastest servers it measures, so on a two-core machine it, not the server,
set InspIRCd's figure at 100 receivers. The C program runs the same workload (same bytes on
the wire, same window rule, same completeness check) in one epoll process that the runner
pins to one core while the server has the other.

Two modes: a window of messages in flight per sender (the fan-out points: as fast as the
server accepts) or, with `rate` > 0, a fixed offered rate paced from the load's start (the
latency points: every message the timed members receive is a sample).

`build()` compiles loadgen.c into a cache directory (a name per source hash, compiler and
flags, so an edit rebuilds and a rerun does not); `run()` starts the binary for one point,
calls the runner's probe at the measured window's edges (the program announces them on
stdout), samples the generator's own CPU in /proc at the same edges, and returns the
driver's `LoadResult`. `python -m selchat.bench.cgen ARGS` builds and runs it by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

SOURCE = Path(__file__).with_name("loadgen.c")
CFLAGS = ["-O2", "-std=c99", "-Wall"]
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class CgenUnavailable(RuntimeError):
    """No C compiler, or the build failed: the runner falls back to the Python generator."""


def cache_dir() -> Path:
    """Where built binaries live: $SELCHAT_BENCH_CACHE, else $XDG_CACHE_HOME/selchat-bench."""
    if os.environ.get("SELCHAT_BENCH_CACHE"):
        return Path(os.environ["SELCHAT_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "selchat-bench"


def find_cc() -> Optional[str]:
    """$CC if set, else `cc` or `gcc` on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"]) or os.environ["CC"]
    return shutil.which("cc") or shutil.which("gcc")


def build(cache: Optional[Path] = None, cc: Optional[str] = None, timeout: float = 120.0) -> Path:
    """The path of a built generator, compiling it if this source was not built yet."""
    compiler = cc or find_cc()
    if not compiler:
        raise CgenUnavailable("no C compiler: neither $CC nor cc nor gcc is on PATH")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + compiler.encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    directory = cache or cache_dir()
    out = directory / f"cgen-{digest}"
    if os.access(out, os.X_OK):
        return out
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".cgen-{digest}.{os.getpid()}"
    try:
        done = subprocess.run(
            [compiler, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CgenUnavailable(f"{compiler} could not build {SOURCE.name}: {exc}") from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CgenUnavailable(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-500:]}")
    os.replace(tmp, out)  # atomic: a concurrent build leaves one complete binary
    return out


@dataclass
class CgenConfig:
    """One point, as the C program's options (see loadgen.c's usage)."""

    port: int
    protocol: str = "native"  # or "irc"
    receivers: int = 100
    senders: int = 10
    window: int = 8
    duration: float = 5.0
    warmup: float = 1.0
    msg_size: int = 100
    host: str = "127.0.0.1"
    ramp_rate: float = 2000.0
    max_pending: int = 256
    register_timeout: float = 60.0
    settle_quiet: float = 0.3
    drain_timeout: float = 10.0
    drain_quiet: float = 0.3
    sample_every: Optional[int] = None  # None: the program's own (4 in window mode, 1 at a rate)
    cpu: Optional[int] = None  # pin the generator to this CPU
    # TCP_QUICKACK after every receive: "window" on the members that drive the window (native
    # senders, IRC counters), "all", or "none". See benchmarks/README.md: a server that does
    # not set TCP_NODELAY (InspIRCd) otherwise waits for delayed ACKs of up to 40 ms.
    quickack: str = "window"
    messages: int = 0  # per sender, 0: as many as the window allows (the tests count exactly)
    bulk_ms: Optional[float] = None  # None: from R (loadgen.c); 0: every receiver read on every pass
    probes: int = 10  # receivers read on every pass and timed, besides the senders and counters
    # messages/s offered by all senders together, paced from the load's start, no window
    # (the latency points); 0: window mode, each sender refilled as its messages arrive
    rate: float = 0.0

    def argv(self, binary: Path) -> List[str]:
        args = [
            str(binary), "--host", self.host, "--port", str(self.port), "--proto", self.protocol,
            "-R", str(self.receivers), "-S", str(self.senders), "--window", str(self.window),
            "--duration", repr(float(self.duration)), "--warmup", repr(float(self.warmup)),
            "--msg-size", str(self.msg_size), "--ramp-rate", repr(float(self.ramp_rate)),
            "--max-pending", str(self.max_pending), "--register-timeout", repr(float(self.register_timeout)),
            "--settle-quiet", repr(float(self.settle_quiet)), "--drain-timeout", repr(float(self.drain_timeout)),
            "--drain-quiet", repr(float(self.drain_quiet)), "--quickack", self.quickack,
        ]
        if self.sample_every is not None:
            args += ["--sample-every", str(self.sample_every)]
        if self.rate > 0:
            args += ["--rate", repr(float(self.rate))]
        if self.messages:
            args += ["--messages", str(self.messages)]
        if self.bulk_ms is not None:
            args += ["--bulk-ms", repr(float(self.bulk_ms))]
        args += ["--probes", str(self.probes)]
        if self.cpu is not None:
            args += ["--cpu", str(self.cpu)]
        return args

    @property
    def budget(self) -> float:
        """Seconds the whole run may take (the program's own alarm is a little shorter)."""
        return self.register_timeout + 10 + self.warmup + self.duration + self.drain_timeout + 25


class CgenFailed(RuntimeError):
    """The generator ran but could not do the point (registration failed, timed out...)."""


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def run(binary: Path, cfg: CgenConfig, probe: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Run one point; return the program's result with `gen_cpu_proc` added.

    `probe("start")` and `probe("end")` are called when the program says its window opened
    and closed; the generator's CPU is read from /proc at the same moments, so it covers
    the same interval as the server's. Raises CgenFailed when the point could not be run.
    """
    deadline = time.monotonic() + cfg.budget
    proc = subprocess.Popen(cfg.argv(binary), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    edges: Dict[str, tuple] = {}
    result: Optional[Dict[str, Any]] = None
    buf = b""
    assert proc.stdout is not None and proc.stderr is not None
    try:
        fd = proc.stdout.fileno()
        while result is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CgenFailed(f"the C generator did not finish within {cfg.budget:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                kind = ev.get("event")
                if kind in ("start", "end"):
                    edges[kind] = (time.monotonic(), proc_cpu_seconds(proc.pid))
                    if probe:
                        probe(kind)
                elif kind == "result":
                    result = ev
        proc.wait(max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired as exc:
        raise CgenFailed("the C generator did not exit after its result") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        err = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
    if result is None:
        raise CgenFailed(f"the C generator exited ({proc.returncode}) without a result: {err.strip()[-300:]}")
    if not result.get("ok"):
        raise CgenFailed(str(result.get("error", "failed")))
    if "start" in edges and "end" in edges:
        (t0, c0), (t1, c1) = edges["start"], edges["end"]
        result["gen_cpu_proc"] = (c1 - c0) / max(t1 - t0, 1e-9)
    else:
        result["gen_cpu_proc"] = result.get("gen_cpu", 0.0)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m selchat.bench.cgen ARGS`: build (once) and run the generator with ARGS."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        binary = build()
    except CgenUnavailable as exc:
        print(f"cgen: {exc}", file=sys.stderr)
        return 2
    if args == ["--path"]:
        print(binary)
        return 0
    os.execv(str(binary), [str(binary)] + args)
    return 0  # not reached
