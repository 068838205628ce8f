"""Out of file descriptors: the server pauses accepting instead of spinning, and recovers."""

from __future__ import annotations

import os
import re
import resource
import select
import signal
import socket
import subprocess
import time
from typing import List

from conftest import server_command, server_env, unique_nick
from wire import Client

LIMIT = 40  # descriptors the server process may hold: a few for itself, the rest for clients


def _hard_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def read_more(proc: subprocess.Popen, timeout: float) -> bytes:
    """What the server has logged since last time, waiting at most `timeout` for it."""
    fd = proc.stderr.fileno()  # type: ignore[union-attr]
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 65536) if ready else b""


def test_emfile_pauses_accepting_and_the_server_recovers() -> None:
    proc = subprocess.Popen(
        server_command("--max-per-ip", "0", "--rate", "0"), env=server_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_hard_limit,
    )
    log = b""
    clients: List[Client] = []
    extra: List[socket.socket] = []
    try:
        deadline = time.monotonic() + 10
        while b"listening on" not in log:
            assert time.monotonic() < deadline and proc.poll() is None, log
            log += read_more(proc, 0.5)
        port = int(re.search(rb"listening on 127\.0\.0\.1:(\d+)", log).group(1))
        first = Client(port)
        first.register(unique_nick("first"))
        clients.append(first)
        # More connections than descriptors: the kernel completes them, the server cannot accept.
        for _ in range(LIMIT + 10):
            extra.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        deadline = time.monotonic() + 10
        while b"pausing accepts" not in log:
            assert time.monotonic() < deadline, log.decode(errors="replace")[-2000:]
            log += read_more(proc, 0.5)
        first.send(type="ping", token="still here")  # a registered client is still served
        first.expect("pong", token="still here")
        for sock in extra:
            sock.close()
        extra.clear()
        late = Client(port)  # descriptors are free again: new clients get in
        late.register(unique_nick("late"), names=None, timeout=10)
        clients.append(late)
        assert proc.poll() is None
        log += read_more(proc, 0.5)
        assert log.count(b"pausing accepts") == 1  # one warning per shortage, no log storm
        assert b"accepting again" in log
    finally:
        for c in clients:
            c.close()
        for sock in extra:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()  # type: ignore[union-attr]
