"""The other doors' users in the browser tests: a raw IRC socket and the terminal client.

Both read on a thread into a list guarded by a condition, so a test waits for a line with a
deadline (never a bare sleep) while the browser runs; a wait that times out fails with what
did arrive, which is what one needs to see when a cross-door test breaks.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[2]
IRC_LISTENING = re.compile(r"irc listening on 127\.0\.0\.1:(\d+)")
WEB_LISTENING = re.compile(r"web listening on 127\.0\.0\.1:(\d+)")


class _Lines:
    """Lines received so far, and a way to wait for one that matches."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.lines: List[str] = []
        self.cond = threading.Condition()
        self.closed = False

    def add(self, line: str) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, pattern: str, timeout: float, start: int = 0) -> "re.Match[str]":
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    why = "closed" if self.closed else f"nothing within {timeout}s"
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(f"{self.label}: no line matching {pattern!r} ({why}); got:\n{tail}")
                self.cond.wait(left)


class IrcPeer:
    """A plain IRC client on a raw socket: registers, joins, says, and answers PING."""

    def __init__(self, port: int, nick: str, timeout: float = 5.0) -> None:
        self.nick = nick
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(None)
        self.inbox = _Lines(f"irc {nick}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick} in a browser test")
        self.inbox.wait(rf"^:\S+ 001 {re.escape(nick)} ", timeout)

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                while b"\r\n" in buf:
                    raw, buf = buf.split(b"\r\n", 1)
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("PING "):
                        self.send("PONG " + line[5:])
                    self.inbox.add(line)
        except OSError:
            pass
        finally:
            self.inbox.close()

    def join(self, room: str, timeout: float = 5.0) -> None:
        mark = len(self.inbox.lines)
        self.send(f"JOIN {room}")
        self.inbox.wait(rf" 366 {re.escape(self.nick)} {re.escape(room)} ", timeout, mark)

    def say(self, target: str, text: str) -> None:
        self.send(f"PRIVMSG {target} :{text}")

    def expect(self, pattern: str, timeout: float = 5.0) -> "re.Match[str]":
        return self.inbox.wait(pattern, timeout)

    def close(self) -> None:
        try:
            self.send("QUIT :bye")
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class TerminalPeer:
    """`python -m selchat.client` in script mode with a pipe for stdin, kept open while the
    test runs, so it reads and prints events live like a person at a terminal would see them."""

    def __init__(self, port: int, nick: str) -> None:
        self.nick = nick
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selchat.client", "--port", str(port), "--nick", nick],
            cwd=str(ROOT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.out = _Lines(f"terminal {nick}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.add(line.rstrip("\n"))
        self.out.close()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, pattern: str, timeout: float = 5.0) -> "re.Match[str]":
        return self.out.wait(pattern, timeout)

    def finish(self, timeout: float = 10.0) -> int:
        """End of input: the client waits for its answers, quits and exits."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(2.0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)


def run_script(port: int, nick: str, lines: List[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    """The terminal client in script mode, run to its end (exit 0 once every line is answered)."""
    return subprocess.run(
        [sys.executable, "-m", "selchat.client", "--port", str(port), "--nick", nick],
        cwd=str(ROOT),
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


def web_port(srv) -> int:
    return int(srv.wait_log(WEB_LISTENING, 10.0).group(1))


def irc_port(srv) -> int:
    return int(srv.wait_log(IRC_LISTENING, 10.0).group(1))


__all__ = ["IrcPeer", "TerminalPeer", "run_script", "web_port", "irc_port", "ROOT"]
