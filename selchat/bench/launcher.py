"""Servers under test: how to start each one, wait until it listens, sample it, stop it.

Every server is a separate process started with `--host 127.0.0.1 --port 0`; it must print
`listening on HOST:PORT` on stderr when ready (selchat and the reference peers all do).
CPU time and RSS are read from /proc/PID, which counts every thread of the process, so the
thread-per-connection peer is charged for all of its threads.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

def _find_repo() -> Path:
    """The checkout holding benchmarks/peers: next to this package, else the working directory."""
    here = Path(__file__).resolve().parents[2]
    for candidate in (here, Path.cwd()):
        if (candidate / "benchmarks" / "peers").is_dir():
            return candidate
    return here


REPO = _find_repo()
PEERS_DIR = REPO / "benchmarks" / "peers"
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Flags selchat is meant to be measured with; a flag its --help does not list yet is dropped
# (and reported), so the harness keeps working while the server grows its options.
SELCHAT_WANTED_FLAGS: List[str] = [
    "--log-level", "warning",
    "--max-outbuf", "1048576",  # the protocol's default cap, stated so RESULTS.md shows it
    "--max-presence", "500",
    "--rate", "0",  # flood control off: the senders are meant to be fast
    "--db", ":memory:",  # history kept, but no disk in the measurement
    "--max-per-ip", "0",  # every benchmark client comes from 127.0.0.1
    "--max-clients", "20000",  # the idle point holds 10,000 + 100 joiners
]


@dataclass
class ServerSpec:
    """A named way to start a server; `args` come before --host/--port."""

    name: str
    argv: List[str]
    extra: List[str] = field(default_factory=list)
    note: str = ""

    def command(self, host: str = "127.0.0.1", port: int = 0) -> List[str]:
        return self.argv + self.extra + ["--host", host, "--port", str(port)]


def _supported(argv: Sequence[str], flags: Sequence[str], timeout: float = 20.0) -> tuple:
    """Keep the (flag, value) pairs the program's --help mentions; return (kept, dropped)."""
    try:
        out = subprocess.run(
            list(argv) + ["--help"], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env()
        )
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    kept: List[str] = []
    dropped: List[str] = []
    i = 0
    while i < len(flags):
        flag = flags[i]
        value = [flags[i + 1]] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else []
        i += 1 + len(value)
        if re.search(re.escape(flag) + r"\b", text):
            kept += [flag] + value
        else:
            dropped += [flag] + value
    return kept, dropped


def selchat_available(timeout: float = 20.0) -> bool:
    """True when `python -m selchat.server --help` runs (the server has landed)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "selchat.server", "--help"],
            capture_output=True, timeout=timeout, cwd=REPO, env=_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def known_servers(overrides: Optional[Dict[str, str]] = None) -> Dict[str, ServerSpec]:
    """The servers the runner knows, with per-server extra flags (`overrides` replaces them)."""
    py = sys.executable
    specs = {
        "selchat": ServerSpec("selchat", [py, "-m", "selchat.server"]),
        # The same server with history in an SQLite file (WAL, a commit per loop pass), for the
        # persistence-on versus persistence-off comparison; a fresh file for every start.
        "selchat-db": ServerSpec("selchat-db", [py, "-m", "selchat.server"]),
        "threaded": ServerSpec("threaded", [py, str(PEERS_DIR / "threaded_server.py")]),
        "asyncio": ServerSpec("asyncio", [py, str(PEERS_DIR / "asyncio_server.py")]),
        "uvloop": ServerSpec("uvloop", [py, str(PEERS_DIR / "asyncio_server.py"), "--uvloop"]),
    }
    overrides = overrides or {}
    for name, spec in specs.items():
        if name in overrides:
            spec.extra = shlex.split(overrides[name])
        elif name in ("selchat", "selchat-db"):
            kept, dropped = _supported(spec.argv, SELCHAT_WANTED_FLAGS)
            if name == "selchat-db":
                kept = [DB_PLACEHOLDER if v == ":memory:" else v for v in kept]
            spec.extra = kept
            if dropped:
                spec.note = "flags not supported yet, dropped: " + " ".join(dropped)
    return specs


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ServerError(RuntimeError):
    pass


def listening_port(pid: int) -> int:
    """Port of a TCP socket in LISTEN state owned by `pid` (0 if none yet), read from /proc.

    selchat logs `listening on` at INFO, so with `--log-level warning` the line never comes;
    the socket table says the same thing whatever the log level.
    """
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                return int(cols[1].rsplit(":", 1)[1], 16)
    return 0


DB_PLACEHOLDER = "{tmpdb}"  # replaced by a fresh temporary database file at each start


class RunningServer:
    """A started server process; use as a context manager so it is always killed."""

    def __init__(self, spec: ServerSpec, host: str = "127.0.0.1", start_timeout: float = 20.0) -> None:
        self.spec = spec
        self.host = host
        self.log = tempfile.NamedTemporaryFile(prefix=f"selchat-bench-{spec.name}-", suffix=".log", delete=False)
        self.dbdir: Optional[str] = None
        command = spec.command(host, 0)
        if DB_PLACEHOLDER in command:
            self.dbdir = tempfile.mkdtemp(prefix="selchat-bench-db-")
            command = [os.path.join(self.dbdir, "bench.db") if a == DB_PLACEHOLDER else a for a in command]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            cwd=REPO,
            env=_env(),
            start_new_session=True,  # our Ctrl-C does not reach it; we stop it ourselves
        )
        self.pid = self.proc.pid
        self.port = self._wait_listening(start_timeout)

    def _wait_listening(self, timeout: float) -> int:
        """The port from the `listening on` line, or from /proc when the log level hides it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            m = _LISTENING.search(text)
            if m:
                return int(m.group(2))
            port = listening_port(self.pid)
            if port:
                return port
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"{self.spec.name} exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"{self.spec.name} did not print 'listening on' within {timeout:.0f} s")

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def threads(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        return 0

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 7.0) -> None:
        """SIGTERM, wait for the server's own shutdown grace, then SIGKILL."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        try:
            self.log.close()
            os.unlink(self.log.name)
        except OSError:
            pass
        if self.dbdir is not None:
            shutil.rmtree(self.dbdir, ignore_errors=True)
            self.dbdir = None
