"""Several selchat processes on one real redis-server (`--redis`): one chat (issue 17).

Every test starts its own redis-server (tests/redisserver.py, AOF on, appendfsync always) on
a free loopback port and selchat processes on port 0 with `--redis`; skipped only when
redis-server is not installed. Waits are the clients' deadlines.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from conftest import ServerProcess, unique_nick, unique_room
from redisserver import REDIS_SERVER, RedisServer

SLOW = 15.0  # a process's start, a snapshot, a lease running out


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def cluster(redis: RedisServer, start_server: Callable[..., ServerProcess],
            tmp_path: Path) -> Callable[..., ServerProcess]:
    """`cluster(*options)`: one more process on the test's Redis, in the cluster when it returns."""
    made: List[int] = []

    def start(*options: str) -> ServerProcess:
        made.append(1)
        db = tmp_path / f"p{len(made)}.db"
        process = start_server("--redis", redis.url, "--db", str(db), *options)
        process.wait_log(re.compile(r"cluster: process \w+ in the cluster"), SLOW)
        return process

    return start


def test_two_processes_are_one_chat(cluster: Callable[..., ServerProcess]) -> None:
    p1 = cluster()
    p2 = cluster()
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    a.expect("join", SLOW, nick=b.nick)  # b's arrival, from the other process
    room = unique_room()
    a.join(room)
    names = b.join(room)
    assert set(names or []) == {a.nick, b.nick}
    a.expect("join", room=room, nick=b.nick)
    b.send(type="say", room=room, text="hello from p2")
    got = a.wait_for("message", SLOW, room=room, text="hello from p2")[0]
    echo = b.expect("message", room=room, text="hello from p2")
    assert got["id"] == echo["id"] and got["from"] == b.nick
    # private messages cross too
    a.send(type="msg", to=b.nick, text="psst")
    assert b.expect("message", to=b.nick, text="psst")["from"] == a.nick
    # one nick namespace
    c = p1.client()
    c.send(type="hello", nick=b.nick)
    c.expect_error("nick_taken")


OPEN = ("--rate", "0", "--max-per-ip", "0", "--register-rate", "0")


def join(c, room: str) -> None:
    """Join and read past everything up to the room's history (others' lobby joins included)."""
    c.send(type="join", room=room)
    c.wait_for("history", SLOW, room=room)


def test_the_same_order_on_every_process_under_concurrent_senders(
        cluster: Callable[..., ServerProcess]) -> None:
    procs = [cluster(*OPEN) for _ in range(3)]
    room = unique_room("order")
    senders = [p.registered(unique_nick("s")) for p in procs]
    watchers = [p.registered(unique_nick("w")) for p in procs]
    for c in senders + watchers:
        join(c, room)
    for c in senders + watchers:  # every join applied everywhere before the first message
        c.wait_for("join", SLOW, room=room, nick=watchers[-1].nick) if c is not watchers[-1] else None
        c.barrier()
    per = 30
    for i in range(per):  # interleaved: every process has messages in flight at once
        for n, s in enumerate(senders):
            s.send(type="say", room=room, text=f"{n}:{i}")
    seen = []
    for w in watchers:
        msgs: List[dict] = []
        while len(msgs) < 3 * per:
            e = w.recv_event(SLOW)
            if e.get("type") == "message" and e.get("room") == room:
                msgs.append(e)
        seen.append([(m["id"], m["text"]) for m in msgs])
    assert seen[0] == seen[1] == seen[2]  # one order, everywhere
    ids = [i for i, _ in seen[0]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for n in range(3):  # each sender's own messages in the order it sent them
        assert [t for _, t in seen[0] if t.startswith(f"{n}:")] == [f"{n}:{i}" for i in range(per)]


def test_a_nick_is_taken_everywhere_at_once(cluster: Callable[..., ServerProcess]) -> None:
    p1, p2 = cluster(*OPEN), cluster(*OPEN)
    for attempt in range(5):
        nick = unique_nick("race")
        c1, c2 = p1.client(), p2.client()
        c1.send(type="hello", nick=nick)
        c2.send(type="hello", nick=nick)
        answers = [c.expect(None, SLOW) for c in (c1, c2)]
        kinds = sorted(a["type"] for a in answers)
        assert kinds == ["error", "welcome"], answers
        assert [a for a in answers if a["type"] == "error"][0]["code"] == "nick_taken"
        c1.close()
        c2.close()


def test_a_process_that_starts_later_gets_the_state_and_the_history(
        cluster: Callable[..., ServerProcess]) -> None:
    p1 = cluster(*OPEN)
    room = unique_room("late")
    a = p1.registered(unique_nick("a"))
    a.join(room)
    a.send(type="topic", room=room, text="the plan")
    a.expect("topic", room=room)
    for i in range(5):
        a.send(type="say", room=room, text=f"before {i}")
        a.expect("message", text=f"before {i}")
    p2 = cluster(*OPEN)
    b = p2.registered(unique_nick("b"))
    b.send(type="join", room=room)
    b.expect("join", SLOW, room=room, nick=b.nick)
    names = b.expect("names", room=room)
    assert set(names["nicks"]) == {a.nick, b.nick}
    assert b.expect("topic", room=room)["text"] == "the plan"
    history = b.expect("history", room=room)
    assert [m["text"] for m in history["messages"]] == [f"before {i}" for i in range(5)]
    a.wait_for("join", SLOW, room=room, nick=b.nick)
    b.send(type="say", room=room, text="after")
    assert a.wait_for("message", SLOW, room=room, text="after")[0]["id"] > history["messages"][-1]["id"]


def test_a_killed_process_s_users_quit_everywhere_within_ten_seconds(
        cluster: Callable[..., ServerProcess]) -> None:
    p1, p2 = cluster(*OPEN), cluster(*OPEN)
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    a.expect("join", SLOW, nick=b.nick)
    p2.signal(signal.SIGKILL)
    p2.wait_exit(5.0)
    started = time.monotonic()
    quit_event = a.wait_for("quit", SLOW, nick=b.nick)[0]
    assert quit_event["reason"] == "connection closed"
    assert time.monotonic() - started < 10.0
    c = p1.client()  # the nick is free again
    c.register(b.nick)
