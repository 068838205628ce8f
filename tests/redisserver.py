"""A real redis-server for the tests: a free loopback port, a temporary directory, the AOF on.

`RedisServer(folder).start()` runs `redis-server --port N --save '' --appendonly yes
--appendfsync always --dir FOLDER` and waits (with a deadline) until it answers PING. `kill(sig)` sends a signal
(SIGKILL: gone, its AOF kept; SIGSTOP/SIGCONT: stalled and back), `start()` again reuses the
port and the directory, `wipe()` empties the directory (a Redis that comes back empty).

`appendfsync always` because the tests kill Redis and count what it acknowledged: under the
default `everysec`, Redis 7.0 postpones the AOF write while a background fsync is slow (a busy
CI disk) and still replies, so a SIGKILL then loses acknowledged writes (seen in CI: top offset
98 after 300 acknowledged). The link detects that case (`behind`); the tests that want exact
accounting need a Redis that keeps its word.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, folder: Path, extra: Optional[List[str]] = None) -> None:
        self.folder = Path(folder)
        self.port = free_port()
        self.extra = list(extra or [])
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder), "--logfile", "redis.log",
             "--daemonize", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(self.folder),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.folder / "redis.log"
                raise RuntimeError("redis-server did not start: " +
                                   (log.read_text()[-2000:] if log.exists() else "no log"))
            time.sleep(0.02)  # a start-up poll with a deadline, outside any loop under test
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up, password or not
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            if sig == signal.SIGTERM:
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process must run to exit
            self.proc.wait(timeout=START_TIMEOUT)
            self.proc = None

    def wipe(self) -> None:
        assert self.proc is None, "stop it first"
        for item in self.folder.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            elif item.name != "redis.log":
                item.unlink()

    def cpu_seconds(self) -> float:
        """User and system CPU this redis-server has used (from /proc, in clock ticks)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.wait(timeout=START_TIMEOUT)
            self.proc = None
