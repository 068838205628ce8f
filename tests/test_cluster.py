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
    got = a.expect("message", room=room, text="hello from p2")
    echo = b.expect("message", room=room, text="hello from p2")
    assert got["id"] == echo["id"] and got["from"] == b.nick
    # private messages cross too
    a.send(type="msg", to=b.nick, text="psst")
    assert b.expect("message", to=b.nick, text="psst")["from"] == a.nick
    # one nick namespace
    c = p1.client()
    c.send(type="hello", nick=b.nick)
    c.expect_error("nick_taken")
