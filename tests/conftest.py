"""Fixtures that run the real server as a process and talk to it over loopback sockets.

* `start_server(*options)` (fixture factory): a fresh server on port 0 with extra options;
  the port is read from its log on stderr within a deadline. Stopped at teardown (SIGTERM,
  then SIGKILL after a deadline); a server that died on its own during the test fails it.
* `server`: one shared server with default options for the many tests that need no special
  option. After every test that used it, the test's clients quit, and a health check runs:
  the process is alive, a sentinel client registered at start (in no room) still gets its
  `pong` and nothing else, and a new client can still register. So every bad-input test also
  proves that the server is alive and unharmed, and that nothing leaked to other connections.
* `make_certificate(folder, name, san)`, and the fixture `certificate` (one per module): a
  self-signed certificate for localhost, made at test time with the openssl command.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wire import ABSENT, Client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0
STOP_TIMEOUT = 8.0

def make_certificate(folder: Path, name: str = "cert",
                     san: str = "DNS:localhost,IP:127.0.0.1") -> Dict[str, Path]:
    """A self-signed certificate and its key for the names in `san`: {"cert": ..., "key": ...}."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
         "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True, timeout=30,
    )
    return {"cert": cert, "key": key}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """One certificate for localhost and 127.0.0.1 for the tests of a module."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_nicks = itertools.count(1)
_rooms = itertools.count(1)


def unique_nick(prefix: str = "u") -> str:
    return f"{prefix}{os.getpid() % 1000}x{next(_nicks)}"


def unique_room(prefix: str = "r") -> str:
    return f"#{prefix}{os.getpid() % 1000}x{next(_rooms)}"


def server_command(*options: str) -> List[str]:
    return [
        sys.executable, "-m", "selchat.server",
        "--host", "127.0.0.1", "--port", "0", "--db", ":memory:", *options,
    ]


def server_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """A running server: `.port`, `.proc`, `log()`, `wait_log()`, `signal()`, `wait_exit()`."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.proc = subprocess.Popen(
            server_command(*options),
            cwd=str(ROOT),
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._lines: List[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.signalled = False  # the test (or teardown) sent a signal: an exit is expected
        self.clients: List[Client] = []
        match = self.wait_log(_LISTENING, START_TIMEOUT)
        self.port = int(match.group(1))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self._lines.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log(self) -> str:
        """The server's stderr so far."""
        with self._cond:
            return "".join(self._lines)

    def wait_log(self, pattern: "re.Pattern[str] | str", timeout: float = 5.0) -> "re.Match[str]":
        """Wait until a log line matches `pattern` (a regex); fail with the log on timeout or exit."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self._lines)
                if self._eof:
                    raise AssertionError(
                        f"server exited (rc={self.proc.poll()}) before logging {rx.pattern!r}:\n{''.join(self._lines)}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"server did not log {rx.pattern!r} within {timeout}s:\n{''.join(self._lines)}")
                self._cond.wait(left)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.signalled = True
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails (with the log) if the process is still running after `timeout`."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running {timeout}s later:\n{self.log()[-3000:]}") from None
        self._reader.join(2.0)
        return rc

    def client(self, **kwargs) -> Client:
        """A connected client, closed (politely) at teardown."""
        c = Client(self.port, **kwargs)
        self.clients.append(c)
        return c

    def registered(self, nick: Optional[str] = None, **kwargs) -> Client:
        names = kwargs.pop("names", True)
        c = self.client(**kwargs)
        c.register(nick or unique_nick(), names=names)
        return c

    def close_clients(self) -> None:
        clients, self.clients = self.clients, []
        for c in clients:
            c.quit_and_close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        self._reader.join(2.0)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def died_unexpectedly(self) -> bool:
        return not self.signalled and self.proc.poll() is not None


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server("--max-outbuf", "65536", ...) -> a fresh ServerProcess."""
    started: List[ServerProcess] = []

    def start(*options: str) -> ServerProcess:
        srv = ServerProcess(*options)
        started.append(srv)
        return srv

    yield start
    problems = []
    for srv in started:
        for c in srv.clients:
            c.close()  # dedicated servers: no need for polite quits
        srv.clients = []
        if srv.died_unexpectedly():
            problems.append(f"server {srv.options} died during the test (rc={srv.proc.returncode}):\n{srv.log()[-4000:]}")
        srv.stop()
    if problems:
        pytest.fail("\n".join(problems))


SHARED_OPTIONS = ("--rate", "0", "--max-per-ip", "0", "--register-rate", "0")


class _Shared:
    server: Optional[ServerProcess] = None
    sentinel: Optional[Client] = None


def _start_shared() -> None:
    if _Shared.server is not None:
        _Shared.server.stop()
    # Flood control (section 8) off and no per-address limit: these tests send bursts on purpose
    # and open many connections from 127.0.0.1; sections 1-6 are what the shared server is for.
    srv = ServerProcess(*SHARED_OPTIONS)
    sentinel = Client(srv.port, label="sentinel")
    sentinel.register(unique_nick("sentinel"))
    sentinel.send(type="part", room="#lobby")
    sentinel.expect("part", room="#lobby", nick=sentinel.nick)
    _Shared.server, _Shared.sentinel = srv, sentinel


def health_check(srv: ServerProcess, sentinel: Client) -> None:
    """The server is alive, unharmed, and still serves old and new clients."""
    assert srv.alive(), f"the server died (rc={srv.proc.returncode}):\n{srv.log()[-4000:]}"
    stray = []
    for event in sentinel.barrier(3.0):
        if event.get("type") == "ping":  # the server's liveness check of an idle client (60 s)
            sentinel.send(type="pong", token=event.get("token"))
        else:
            stray.append(event)
    assert stray == [], f"a client in no room received events it had nothing to do with: {stray!r}"
    fresh = Client(srv.port, label="health")
    try:
        fresh.register(unique_nick("h"), timeout=3.0)
        fresh.send(type="ping", token="health", ref=1)
        fresh.expect("pong", token="health", ref=1)
    finally:
        fresh.quit_and_close()


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """The shared default server; health-checked after each test that used it."""
    if _Shared.server is None or not _Shared.server.alive():
        _start_shared()
    srv = _Shared.server
    assert srv is not None and _Shared.sentinel is not None
    yield srv
    srv.close_clients()
    try:
        health_check(srv, _Shared.sentinel)
    except BaseException:
        # Leave a fresh server for the next test, and report this one.
        _Shared.server.stop()
        _Shared.server = None
        raise


def pytest_sessionfinish(session, exitstatus) -> None:
    if _Shared.server is not None:
        if _Shared.sentinel is not None:
            _Shared.sentinel.close()
        _Shared.server.stop()
        _Shared.server = None


__all__ = ["ABSENT", "ServerProcess", "unique_nick", "unique_room"]
