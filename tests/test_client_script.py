"""The client in script mode, end to end, against a real server process.

Every wait has a deadline: a client that keeps listening is read by a thread into a queue and
we wait for the line we expect; a client fed a whole script is simply run to its end (script
mode itself waits for the server's answers before it quits, which is part of what is tested).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
CLIENT = [sys.executable, "-m", "selchat.client"]
START_TIMEOUT = 10.0
RUN_TIMEOUT = 15.0
WAIT = 5.0

_nicks = iter(range(1, 1_000_000))


def nick(base: str) -> str:
    """A nick no other test uses, as the server is shared by the whole module."""
    return f"{base}{next(_nicks)}"


class Lines:
    """A stream read line by line by a daemon thread, so we can wait with a deadline."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.seen: List[str] = []
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in iter(stream.readline, ""):
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = WAIT) -> str:
        """The first line (from now on) that matches `pattern`; fail if none within `timeout`."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; saw {self.seen!r}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"stream ended before a line matching {pattern!r}; saw {self.seen!r}")
            self.seen.append(line)
            if regex.search(line):
                return line


class Server:
    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selchat.server", "--host", "127.0.0.1", "--port", "0", "--db", ":memory:", *extra],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log = Lines(self.proc.stderr)
        line = self.log.wait_for(r"listening on 127\.0\.0\.1:\d+", START_TIMEOUT)
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=START_TIMEOUT)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server()
    try:
        yield srv
    finally:
        srv.stop()


def run(port: int, *args: str, lines: str = "", timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLIENT, "--port", str(port), *args],
        input=lines,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=timeout,
    )


class Listener:
    """A script-mode client whose stdin stays open: it prints events until we close it."""

    def __init__(self, port: int, name: str, *args: str) -> None:
        self.nick = name
        self.proc = subprocess.Popen(
            [*CLIENT, "--port", str(port), "--nick", name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=ENV,
        )
        self.out = Lines(self.proc.stdout)
        self.out.wait_for(rf"#lobby \* {re.escape(name)} joined")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        """Close stdin: the client pings, waits for its pong, quits, and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=RUN_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=RUN_TIMEOUT)


@pytest.fixture
def listeners() -> Iterator[List[Listener]]:
    started: List[Listener] = []
    yield started
    for listener in started:
        listener.kill()


def test_two_clients_talk(server: Server, listeners: List[Listener]) -> None:
    bob = Listener(server.port, nick("bob"))
    listeners.append(bob)
    alice = nick("alice")
    result = run(server.port, "--nick", alice, lines="hello bob\nsecond line\n")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"^\d\d:\d\d #lobby <{alice}> hello bob$", result.stdout, re.M), result.stdout
    bob.out.wait_for(rf"#lobby \* {alice} joined")
    bob.out.wait_for(rf"#lobby <{alice}> hello bob$")
    bob.out.wait_for(rf"#lobby <{alice}> second line$")
    bob.out.wait_for(rf"\* {alice} quit")
    bob.send("reply while stdin stays open")  # lines are acted on as they come, not at EOF
    bob.out.wait_for(rf"#lobby <{bob.nick}> reply while stdin stays open$")
    assert bob.finish() == 0


def test_answers_arrive_before_exit_and_sending_is_paced(server: Server) -> None:
    """End of input does not cut the output short: every echo is printed before the client quits.
    More lines than the server's burst (20 by default) are paced, not refused as a flood."""
    me = nick("many")
    count = 30
    script = "".join(f"line {i}\n" for i in range(count))
    result = run(server.port, "--nick", me, lines=script)
    assert result.returncode == 0, result.stderr
    echoed = re.findall(rf"<{me}> line (\d+)$", result.stdout, re.M)
    assert echoed == [str(i) for i in range(count)]
    assert "error" not in result.stdout


def test_nick_taken_exits_1_with_the_reason(server: Server, listeners: List[Listener]) -> None:
    holder = Listener(server.port, nick("Taken"))
    listeners.append(holder)
    result = run(server.port, "--nick", holder.nick.lower(), lines="never sent\n")
    assert result.returncode == 1
    assert "nick_taken" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "never sent" not in result.stdout
    assert holder.finish() == 0
    assert not any("never sent" in line for line in holder.out.seen)


def test_invalid_nick_exits_1_with_the_reason(server: Server) -> None:
    result = run(server.port, "--nick", "9lives", lines="hi\n")
    assert result.returncode == 1
    assert "bad_nick" in result.stderr and "Traceback" not in result.stderr


def test_missing_nick_exits_2(server: Server) -> None:
    result = run(server.port, lines="hi\n")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--nick" in result.stderr
    assert result.stdout == ""


def test_cannot_connect_exits_1_with_one_line() -> None:
    with socket.socket() as s:  # a port that was free a moment ago, and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(port, "--nick", "nobody", lines="hi\n")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot connect" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_json_prints_each_event_as_received(server: Server) -> None:
    me = nick("js")
    result = run(server.port, "--nick", me, "--json", lines="in json\n/msg nobody_here x\n")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in events)
    types = [e["type"] for e in events]
    assert types[0] == "welcome" and events[0]["nick"] == me
    said = [e for e in events if e["type"] == "message"]
    assert said and said[0]["text"] == "in json" and said[0]["room"] == "#lobby" and "ref" in said[0]
    errors = [e for e in events if e["type"] == "error"]
    assert errors and errors[0]["code"] == "no_such_nick" and "ref" in errors[0]
    assert types[-1] == "pong"  # the end-of-input barrier, answered last


def test_join_msg_who_rooms(server: Server, listeners: List[Listener]) -> None:
    bob = Listener(server.port, nick("bob"))
    listeners.append(bob)
    me = nick("carol")
    room = f"#Test{me}"
    script = f"/join {room}\nin the room\n/msg {bob.nick} psst\n/who\n/rooms\n/msg nobody_here x\n/unknown\n/part\nback in lobby\n"
    result = run(server.port, "--nick", me, lines=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(rf"^\d\d:\d\d {room} \* {me} joined$", out, re.M), out
    assert re.search(rf"^\d\d:\d\d {room} <{me}> in the room$", out, re.M), out
    assert re.search(rf"^\d\d:\d\d private <{me} -> {bob.nick}> psst$", out, re.M), out
    assert re.search(rf"^\d\d:\d\d {room} \* 1 here: @?{me}$", out, re.M), out  # @: its operator (1.2)
    assert re.search(rf"\* \d+ rooms: .*{room} \(1\)", out), out
    assert re.search(r"^\d\d:\d\d error no_such_nick: ", out, re.M), out
    assert re.search(rf"^\d\d:\d\d {room} \* {me} left$", out, re.M), out
    assert re.search(rf"^\d\d:\d\d #lobby <{me}> back in lobby$", out, re.M), out
    assert "unknown command /unknown" in result.stderr  # local hint, never sent, not on stdout
    bob.out.wait_for(rf"private <{me} -> {bob.nick}> psst$")
    bob.out.wait_for(rf"#lobby <{me}> back in lobby$")
    assert not any("in the room" in line for line in bob.out.seen)
    assert bob.finish() == 0


def test_quit_with_reason_stops_reading(server: Server, listeners: List[Listener]) -> None:
    bob = Listener(server.port, nick("bob"))
    listeners.append(bob)
    me = nick("dave")
    result = run(server.port, "--nick", me, lines="before\n/quit off to lunch\nafter\n")
    assert result.returncode == 0, result.stderr
    assert f"<{me}> before" in result.stdout and "after" not in result.stdout
    bob.out.wait_for(rf"\* {me} quit \(off to lunch\)")
    assert bob.finish() == 0


def test_history_is_shown_as_earlier_messages(server: Server) -> None:
    room = f"#hist{next(_nicks)}"
    first = run(server.port, "--nick", nick("eve"), lines=f"/join {room}\none\ntwo\nthree\n")
    assert first.returncode == 0, first.stderr
    me = nick("fay")
    later = run(server.port, "--nick", me, lines=f"/join {room}\n/history\n")
    assert later.returncode == 0, later.stderr
    out = later.stdout.splitlines()
    header = next(i for i, line in enumerate(out) if line.endswith(f"-- earlier messages in {room} --"))
    assert [re.sub(r"^.*> ", "", line) for line in out[header + 1 : header + 4]] == ["one", "two", "three"]
    # /history: nothing older. Whether the join's history came before the line was read or
    # after, the client says all three are shown (on stderr when it knew without asking).
    assert f"all 3 messages of {room} are shown" in later.stdout + later.stderr


def test_server_going_away_exits_1_with_the_reason(listeners: List[Listener]) -> None:
    srv = Server("--shutdown-grace", "1")
    try:
        bob = Listener(srv.port, nick("bob"))
        listeners.append(bob)
        srv.proc.send_signal(signal.SIGTERM)
        assert bob.proc.wait(timeout=RUN_TIMEOUT) == 1
        assert bob.proc.stderr is not None
        err = bob.proc.stderr.read()
        assert "connection closed by server" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    finally:
        srv.stop()
