"""Review of a57b371 (cluster: the `floor` exchange), against a real redis-server and real
selchat processes (the fixtures of tests/test_cluster.py).

A process that stopped politely (SIGTERM) deletes its lease (`close`: HDEL), so no one ever
publishes `dead` for it, and it stays in every copy's `ClusterNode.nodes` (and in every
snapshot's `nodes`) for ever. After Redis comes back empty, every live process waits for that
process's floor, which never comes: every change is refused `unavailable` for FLOOR_WAIT
(12 s), after every Redis restart, in any cluster where a process was ever stopped or
restarted (a rolling deploy).

The floor exchange is gone (ids go above the clock once Redis lost them; nobody waits), and a
process that holds users but no lease for ABSENT_GRACE is buried: these tests keep it so."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable


sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ServerProcess, unique_nick, unique_room  # noqa: E402
from redisserver import RedisServer  # noqa: E402
from test_cluster import OPEN, SLOW, cluster, join, redis  # noqa: E402,F401  (fixtures)


def two_processes(cluster: Callable[..., ServerProcess]) -> "tuple[Any, ...]":
    """Two processes, a user on each who has seen the other arrive: (p1, p2, a, b)."""
    p1 = cluster(*OPEN)
    p2 = cluster(*OPEN)
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    a.wait_for("join", SLOW, nick=b.nick)
    return p1, p2, a, b


def test_a_process_stopped_long_ago_is_not_waited_for_after_redis_comes_back_empty(
        redis: RedisServer, cluster: Callable[..., ServerProcess]) -> None:
    p1, p2, a, b = two_processes(cluster)
    p2.stop()  # SIGTERM: a polite stop (its users quit for the others)
    a.wait_for("quit", SLOW, nick=b.nick)
    room = unique_room("floor")
    join(a, room)
    redis.kill(signal.SIGKILL)
    redis.wipe()
    redis.start()
    p1.wait_log("new epoch", SLOW)
    started = time.monotonic()
    n = 0
    while True:
        n += 1
        a.send(type="say", room=room, text=f"after {n}", ref=f"x{n}")
        answer = a.wait_for(None, SLOW, ref=f"x{n}")[0]
        if answer["type"] == "message":
            break
        assert answer.get("code") == "unavailable", answer
        assert time.monotonic() - started < 2 * SLOW, "never served again"
        time.sleep(0.25)  # a client's retry, paced; the deadline is the line above
    waited = time.monotonic() - started
    assert "no highest id came from process" not in p1.log(), p1.log()[-1500:]
    assert waited < 6.0, f"every change refused for {waited:.1f} s after Redis came back"


def test_a_process_that_died_with_redis_does_not_leave_ghosts(
        redis: RedisServer, cluster: Callable[..., ServerProcess]) -> None:
    p1, p2, a, b = two_processes(cluster)
    # One machine goes down: Redis and the second process with it.
    p2.signal(signal.SIGKILL)
    p2.wait_exit(SLOW)
    redis.kill(signal.SIGKILL)
    redis.wipe()
    redis.start()
    p1.wait_log("new epoch", SLOW)
    # p2 holds no lease in the new members' hash: after ABSENT_GRACE, b quits as any dead
    # process's users do.
    assert a.wait_for("quit", 2 * SLOW, nick=b.nick)[0]["reason"] == "connection closed"
    c = p1.client()
    c.register(b.nick, names=None)  # the nick is free again


def test_a_password_change_ends_tokens_everywhere_and_its_new_one_works_everywhere(
        cluster: Callable[..., ServerProcess]) -> None:
    from test_accounts import PASSWORD, hello, login, registered_account, welcomed
    kdf = ("--kdf-workers", "0")
    p1 = cluster(*OPEN, *kdf)
    p2 = cluster(*OPEN, *kdf)
    nick = unique_nick("pw")
    registered_account(p1, nick).quit_and_close()
    laptop, w = login(p1, nick, remember=True)
    old = w["token"]
    laptop.send(type="password", old=PASSWORD, new="another pass 4", remember=True, ref="p")
    new = laptop.wait_for("account", SLOW, account=nick, ref="p")[0]["token"]
    stolen = hello(p2, unique_nick("t"), {"account": nick, "token": old})
    answer = stolen.expect(None, SLOW)
    assert answer.get("type") == "error" and answer.get("code") == "login_failed", answer
    phone = hello(p2, unique_nick("t"), {"account": nick, "token": new})
    assert welcomed(phone, SLOW)["account"] == nick
