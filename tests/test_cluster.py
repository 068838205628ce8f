"""Several selchat processes on one real redis-server (`--redis`): one chat (issue 17).

Every test starts its own redis-server (tests/redisserver.py, AOF on, appendfsync always) on
a free loopback port and selchat processes on port 0 with `--redis`; skipped only when
redis-server is not installed. Waits are the clients' deadlines.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Callable, List

import pytest

from conftest import ServerProcess, unique_nick, unique_room
from redisserver import RedisServer
from test_redis_link import redis  # noqa: F401  (the fixture: a redis-server of the test's own)

SLOW = 15.0  # a process's start, a snapshot, a lease running out


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


def test_accounts_rooms_and_moderation_across_processes(cluster: Callable[..., ServerProcess]) -> None:
    from test_accounts import PASSWORD, registered_account
    p1 = cluster(*OPEN, "--kdf-workers", "0")
    owner_nick = unique_nick("own")
    owner = registered_account(p1, owner_nick)
    away_nick = unique_nick("away")
    registered_account(p1, away_nick).quit_and_close()
    room = unique_room("run")
    join(owner, room)
    p2 = cluster(*OPEN, "--kdf-workers", "0")  # after the accounts: it learns them from the snapshot
    squatter = p2.client()
    squatter.send(type="hello", nick=away_nick)
    squatter.expect_error("nick_reserved", SLOW)
    squatter.send(type="hello", nick=owner_nick)
    squatter.expect_error("nick_taken", SLOW)
    # the same account on the second process: one user, on both
    second = p2.client()
    second.send(type="hello", nick=owner_nick, login={"account": owner_nick, "password": PASSWORD})
    welcome = second.wait_for("welcome", SLOW)[0]
    assert welcome["nick"] == owner_nick and welcome["account"] == owner_nick
    troll = p2.registered(unique_nick("t"))
    join(troll, room)
    owner.wait_for("join", SLOW, room=room, nick=troll.nick)
    owner.send(type="kick", room=room, nick=troll.nick, reason="out")
    kicked = troll.wait_for("kick", SLOW, room=room)[0]
    assert kicked["nick"] == troll.nick and kicked["by"] == owner_nick
    second.wait_for("kick", SLOW, room=room, nick=troll.nick)  # the owner's other device, on p2
    owner.send(type="mode", room=room, set={"ban": [troll.nick]})
    owner.wait_for("mode", SLOW, room=room)
    troll.send(type="join", room=room)
    troll.expect_error("banned", SLOW)
    # what one device says reaches the other, on the other process
    owner.send(type="say", room=room, text="from device one")
    second.wait_for("message", SLOW, room=room, text="from device one")
    # a logout ordered by the cluster: answered, then that connection closes (the other stays)
    second.send(type="logout", ref="lo")
    second.wait_for("account", SLOW, account=None, ref="lo")
    second.assert_closed(SLOW, allow_partial=True)
    owner.send(type="say", room=room, text="still on", ref="on")
    owner.wait_for("message", SLOW, ref="on")


def test_redis_killed_and_back_nothing_lost_nothing_twice(
        redis: RedisServer, cluster: Callable[..., ServerProcess]) -> None:
    """Every message echoed to its sender reached every member exactly once and is in
    history; every other one got `unavailable` (with its ref); both processes come back."""
    p1, p2 = cluster(*OPEN), cluster(*OPEN)
    room = unique_room("blip")
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    join(a, room)
    join(b, room)
    a.wait_for("join", SLOW, room=room, nick=b.nick)
    echoed: List[str] = []
    refused: List[str] = []

    def say(i: int) -> None:
        a.send(type="say", room=room, text=f"m{i}", ref=f"r{i}")
        e = a.wait_for(None, SLOW, ref=f"r{i}")[0]
        if e["type"] == "message":
            echoed.append(e["text"])
        else:
            assert e["type"] == "error" and e["code"] == "unavailable", e
            refused.append(f"m{i}")

    for i in range(5):
        say(i)
    redis.kill(signal.SIGKILL)
    for i in range(5, 10):
        say(i)
    redis.start()
    p1.wait_log("cluster: caught up", SLOW)
    p2.wait_log("cluster: caught up", SLOW)
    deadline = time.monotonic() + SLOW
    i = 10
    while len(echoed) < 10 and time.monotonic() < deadline:
        say(i)
        i += 1
    assert refused, "Redis was down: something must have been refused"
    assert len(echoed) >= 10
    got: List[str] = []
    while len(got) < len(echoed):
        e = b.recv_event(SLOW)
        if e.get("type") == "message" and e.get("room") == room:
            got.append(e["text"])
    assert got == echoed  # each once, in order, nothing refused among them
    assert not [e for e in b.barrier() if e.get("type") == "message"]  # and nothing after
    b.send(type="history", room=room, limit=100, ref="h")
    history = b.wait_for("history", SLOW, ref="h")[0]
    assert [m["text"] for m in history["messages"]] == echoed


def test_every_door_on_a_cluster_process(cluster: Callable[..., ServerProcess]) -> None:
    """Native on one process; IRC and the web door on the other; one room."""
    from test_irc_gateway import Irc
    from test_web_door import WsClient, web_port
    p1 = cluster(*OPEN)
    p2 = cluster(*OPEN, "--irc-port", "0", "--web-port", "0")
    room = unique_room("doors")
    native = p1.registered(unique_nick("n"))
    join(native, room)
    irc_env = Irc(p2)
    web = WsClient(web_port(p2))
    try:
        irc = irc_env.user(unique_nick("i"))
        irc.send(f"JOIN {room}")
        names = irc.wait_for("353", timeout=SLOW)[0]
        assert "@" + native.nick in names.params[-1].split()  # its operator, from p1
        irc.wait_for("366")
        web_nick = unique_nick("w")
        web.send(type="hello", nick=web_nick)
        web.wait_for("welcome", SLOW)
        web.send(type="join", room=room)
        web.wait_for("history", SLOW, room=room)
        native.wait_for("join", SLOW, room=room, nick=web_nick)
        native.send(type="say", room=room, text="to every door")
        irc.wait_for("PRIVMSG", room, "to every door", timeout=SLOW)
        web.wait_for("message", SLOW, room=room, text="to every door")
        irc.send(f"PRIVMSG {room} :from irc")
        native.wait_for("message", SLOW, room=room, text="from irc")
        web.wait_for("message", SLOW, room=room, text="from irc")
        irc.send(f"PRIVMSG {native.nick} :private, across")
        assert native.wait_for("message", SLOW, text="private, across")[0]["to"] == native.nick
        irc.send("QUIT :bye")
        assert native.wait_for("quit", SLOW, nick=irc.nick)[0]["reason"] == "bye"
    finally:
        irc_env.close()
        web.close()


def test_a_process_that_was_away_fills_in_the_history_from_redis(
        cluster: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """p2 stops; p1 says more than a snapshot carries; p2 comes back on its own file and
    pages back through all of it, with no gap and nothing twice."""
    p1 = cluster(*OPEN)
    db2 = tmp_path / "away.db"
    p2 = cluster(*OPEN, "--db", str(db2))
    room = unique_room("away")
    a = p1.registered(unique_nick("a"))
    join(a, room)
    a.send(type="say", room=room, text="while both")
    a.wait_for("message", SLOW, text="while both")
    p2.stop()
    texts = ["while both"] + [f"m{i}" for i in range(120)]
    for t in texts[1:]:
        a.send(type="say", room=room, text=t)
    a.wait_for("message", SLOW, text=texts[-1])
    p2 = cluster(*OPEN, "--db", str(db2))
    p2.wait_log("filled in from Redis", SLOW)
    b = p2.registered(unique_nick("b"))
    join(b, room)
    got: List[str] = []
    before = None
    for _ in range(10):
        ask = {"type": "history", "room": room, "limit": 50, "ref": "h"}
        if before is not None:
            ask["before"] = before
        b.send(ask)
        page = b.wait_for("history", SLOW, ref="h")[0]
        got = [m["text"] for m in page["messages"]] + got
        if not page["more"]:
            break
        before = page["messages"][0]["id"]
    assert got == texts


def test_redis_back_empty_and_the_health_check(redis: RedisServer,
                                               cluster: Callable[..., ServerProcess]) -> None:
    """/healthz is 503 while the link is down; Redis back with nothing (a new epoch): the
    processes say so, carry on, and ids keep growing."""
    import urllib.error
    import urllib.request
    p1 = cluster(*OPEN, "--metrics-port", "0")
    p2 = cluster(*OPEN)
    port = int(p1.wait_log(re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/"), SLOW).group(1))

    def health() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert health() == 200
    room = unique_room("empty")
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    join(a, room)
    join(b, room)
    a.send(type="say", room=room, text="before")
    first = b.wait_for("message", SLOW, room=room, text="before")[0]
    redis.kill(signal.SIGKILL)
    deadline = time.monotonic() + SLOW
    while health() != 503:
        assert time.monotonic() < deadline, "healthz still 200 with the link down"
        time.sleep(0.05)  # polling an HTTP endpoint from the test, with a deadline
    redis.wipe()
    redis.start()
    p1.wait_log("new epoch", SLOW)
    p2.wait_log("new epoch", SLOW)
    deadline = time.monotonic() + SLOW
    while health() != 200:
        assert time.monotonic() < deadline, "healthz not back to 200"
        time.sleep(0.05)
    a.send(type="say", room=room, text="after", ref="x")
    echo = a.wait_for(None, SLOW, ref="x")[0]
    assert echo["type"] == "message", echo
    second = b.wait_for("message", SLOW, room=room, text="after")[0]
    assert second["id"] > first["id"]
    b.send(type="who", room=room, ref="w")
    assert set(b.wait_for("names", SLOW, ref="w")[0]["nicks"]) == {a.nick, b.nick}


def test_a_frozen_process_is_buried_and_closes_its_connections_when_it_wakes(
        cluster: Callable[..., ServerProcess]) -> None:
    """SIGSTOP past the lease: the others see its users quit; woken, it finds itself buried,
    closes those connections (their clients reconnect), and serves new ones in the one chat."""
    p1, p2 = cluster(*OPEN), cluster(*OPEN)
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    a.wait_for("join", SLOW, nick=b.nick)
    p2.signal(signal.SIGSTOP)
    try:
        assert a.wait_for("quit", SLOW, nick=b.nick)[0]["reason"] == "connection closed"
    finally:
        p2.signal(signal.SIGCONT)
    b.assert_closed(SLOW, allow_partial=True)
    p2.wait_log("lease gone", SLOW)
    again = p2.client()
    again.register(b.nick, names=None)
    a.wait_for("join", SLOW, nick=b.nick)
    again.send(type="say", room="#lobby", text="back")
    a.wait_for("message", SLOW, text="back")


def test_a_server_operator_kills_a_user_of_another_process(
        cluster: Callable[..., ServerProcess], tmp_path: Path) -> None:
    from test_accounts import registered_account
    ops = tmp_path / "operators"
    boss = unique_nick("boss")
    ops.write_text(boss + "\n")
    p1 = cluster(*OPEN, "--kdf-workers", "0", "--operators", str(ops))
    p2 = cluster(*OPEN, "--kdf-workers", "0", "--operators", str(ops))
    oper = registered_account(p1, boss)
    victim = p2.registered(unique_nick("v"))
    witness = p2.registered(unique_nick("w"))
    oper.wait_for("join", SLOW, nick=witness.nick)
    oper.send(type="kill", nick=victim.nick, reason="spam", ref="k")
    victim.assert_closed(SLOW, allow_partial=True)
    quit_event = witness.wait_for("quit", SLOW, nick=victim.nick)[0]
    assert quit_event["reason"] == f"killed by {boss}: spam"
    oper.wait_for("quit", SLOW, nick=victim.nick)
    # and a guest of the other process may not
    witness.send(type="kill", nick=oper.nick, ref="no")
    witness.expect_error("not_operator", SLOW, ref="no")


def test_the_terminal_client_waits_for_a_process_that_is_not_in_the_cluster_yet(
        redis: RedisServer, start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """A process still waiting for the state answers hellos `unavailable`: the terminal client
    (script mode here; the full screen does the same) says so and tries again, and gets in
    once the process is in the cluster (without the retry it exits 1 at the first refusal)."""
    from browser.peers import TerminalPeer
    from test_review17_cluster import fake_member, redis_command
    fake_member(redis, 600000)  # a member that will never send the state
    p = start_server("--redis", redis.url, "--db", str(tmp_path / "w.db"), *OPEN)
    p.wait_log("no snapshot came", SLOW)
    term = TerminalPeer(p.port, "patient")
    try:
        p.wait_log("no snapshot came", SLOW)  # (asked again: the client's hello is refused meanwhile)
        redis_command(redis, "HDEL", "selchat:members", "0000deadbeef")  # gone: p goes alone
        p.wait_log(re.compile(r"cluster: process \w+ in the cluster"), SLOW)
        term.send("/join #patience")
        term.expect(r"#patience \* patient joined", SLOW)
    finally:
        assert term.finish() == 0
