"""Review of issue 17 (cluster mode): failing cases found by reading the code, shown against a
real redis-server and real selchat processes (the fixtures of tests/test_cluster.py).

Every test here marked `xfail(strict=True)` demonstrates a bug that is still there; when the
lead engineer fixes one, its test starts passing and the strict xfail turns red: then drop
the marker.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable, List


from conftest import ServerProcess, unique_nick, unique_room
from redisserver import RedisServer
from test_cluster import OPEN, SLOW, cluster, join, redis  # noqa: F401  (fixtures)

IN_CLUSTER = re.compile(r"cluster: process \w+ in the cluster")


def fake_member(server: RedisServer, ms_from_now: int, node: str = "0000deadbeef") -> None:
    """A member of the cluster that is not there, its lease alive for `ms_from_now` by Redis's
    clock (what a process killed a moment ago leaves behind)."""
    lines = redis_command(server, "TIME").split(b"\r\n")
    now_ms = int(lines[2]) * 1000 + int(lines[4]) // 1000
    assert redis_command(server, "HSET", "selchat:members", node, str(now_ms + ms_from_now))[:1] == b":"


def member_lapsed(server: RedisServer) -> bool:
    """Every member's lease has run out by Redis's clock."""
    reply = redis_command(server, "EVAL", "local t = redis.call('TIME') "
                          "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "
                          "local all = redis.call('HGETALL', KEYS[1]) "
                          "for i = 1, #all, 2 do if tonumber(all[i + 1]) > now then return 0 end end "
                          "return 1", "1", "selchat:members")
    return reply.startswith(b":1")


def redis_command(server: RedisServer, *args: str) -> bytes:
    """One command on a fresh connection (RESP by hand); the raw reply."""
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(out)
        return s.recv(65536)


# --- (1) starting: two processes that both wait for a snapshot ----------------------------------

def test_two_processes_restarted_together_both_come_up(
        redis: RedisServer, start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    # What a process killed a moment ago leaves behind: its lease, alive for a few seconds.
    fake_member(redis, 4000)
    p1 = start_server("--redis", redis.url, "--db", str(tmp_path / "a.db"), *OPEN)
    p2 = start_server("--redis", redis.url, "--db", str(tmp_path / "b.db"), *OPEN)
    # Both saw the dead lease, both said hello, neither applies the other's hello. Long after
    # the dead lease is gone, each still sees the other's lease (renewed) and asks again.
    deadline = time.monotonic() + 2 * SLOW
    while time.monotonic() < deadline:
        if IN_CLUSTER.search(p1.log()) and IN_CLUSTER.search(p2.log()):
            break
        time.sleep(0.2)  # polling two logs with a deadline
    assert IN_CLUSTER.search(p1.log()), p1.log()[-2000:]
    assert IN_CLUSTER.search(p2.log()), p2.log()[-2000:]


# --- (2) ghosts: a process that stops politely --------------------------------------------------

def test_a_process_stopped_with_sigterm_its_users_quit_for_the_others(
        cluster: Callable[..., ServerProcess]) -> None:
    p1, p2 = cluster(*OPEN), cluster(*OPEN)
    a = p1.registered(unique_nick("a"))
    b = p2.registered(unique_nick("b"))
    a.wait_for("join", SLOW, nick=b.nick)
    p2.signal(signal.SIGTERM)
    p2.wait_exit(SLOW)
    # a, who saw b join, is told that b left (10.3: within 10 s), and b is gone from p1's copy.
    quit_event = a.wait_for("quit", 10.0, nick=b.nick)[0]
    assert quit_event["reason"] == "connection closed"
    a.send(type="who", room="#lobby", ref="w")
    assert b.nick not in a.wait_for("names", SLOW, ref="w")[0]["nicks"]


# --- (1) state the snapshot does not carry: what was taken away while a process was away -------

def test_a_token_revoked_while_a_process_was_away_is_refused_there_too(
        cluster: Callable[..., ServerProcess], tmp_path: Path) -> None:
    from test_accounts import login, hello, registered_account
    kdf = ("--kdf-workers", "0")
    db2 = tmp_path / "away.db"
    p1 = cluster(*OPEN, *kdf)
    p2 = cluster(*OPEN, *kdf, "--db", str(db2))
    nick = unique_nick("tok")
    registered_account(p1, nick).quit_and_close()
    first, w = login(p1, nick, remember=True)
    token = w["token"]
    p2.stop()  # p2 applied the login: its file holds the token
    first.send(type="logout", token=token, ref="out")
    first.wait_for("account", SLOW, account=None, ref="out")
    again = hello(p1, unique_nick("t1"), {"account": nick, "token": token})
    again.expect_error("login_failed", SLOW)  # revoked, on p1
    p2 = cluster(*OPEN, *kdf, "--db", str(db2))
    thief = hello(p2, unique_nick("t2"), {"account": nick, "token": token})
    answer = thief.expect(None, SLOW)
    assert answer.get("type") == "error" and answer.get("code") == "login_failed", answer


# --- (4) the IRC door with --redis ---------------------------------------------------------------

def _irc_flow_join_two_then_speak(srv: ServerProcess) -> List[str]:
    """JOIN #a,#b and PRIVMSG #b in one write; the numerics the client got before its PONG."""
    from test_irc_gateway import Irc
    env = Irc(srv)
    try:
        c = env.user(unique_nick("i"), caps=("echo-message",))
        ra, rb = unique_room("ja"), unique_room("jb")
        c.send_raw(f"JOIN {ra},{rb}\r\nPRIVMSG {rb} :hello b\r\n".encode())
        got = c.barrier(SLOW)
        return [f"{x.command} {' '.join(x.params)}" for x in got]
    finally:
        env.close()


def test_control_irc_join_two_then_speak_alone(start_server: Callable[..., ServerProcess]) -> None:
    got = _irc_flow_join_two_then_speak(start_server("--irc-port", "0", *OPEN))
    assert not [x for x in got if x.startswith("403")], got
    assert [x for x in got if x.startswith("PRIVMSG") and x.endswith("hello b")], got


def test_irc_join_two_then_speak_with_redis(cluster: Callable[..., ServerProcess]) -> None:
    got = _irc_flow_join_two_then_speak(cluster(*OPEN, "--irc-port", "0"))
    assert not [x for x in got if x.startswith("403")], got
    assert [x for x in got if x.startswith("PRIVMSG") and x.endswith("hello b")], got


def _irc_labeled_privmsg(srv: ServerProcess) -> List[Any]:
    from test_irc_gateway import Irc
    env = Irc(srv)
    try:
        c = env.user(unique_nick("l"), caps=("echo-message", "labeled-response", "batch", "message-tags"))
        room = unique_room("lab")
        c.send(f"JOIN {room}")
        c.wait_for("366", timeout=SLOW)
        c.send(f"@label=L1 PRIVMSG {room} :labeled")
        got = c.barrier(SLOW)
        return [(x.tags.get("label"), x.command, x.params[-1:]) for x in got]
    finally:
        env.close()


def test_control_irc_labeled_echo_alone(start_server: Callable[..., ServerProcess]) -> None:
    got = _irc_labeled_privmsg(start_server("--irc-port", "0", *OPEN))
    assert ("L1", "PRIVMSG", ["labeled"]) in got, got
    assert not [g for g in got if g[1] == "ACK"], got


def test_irc_labeled_echo_with_redis(cluster: Callable[..., ServerProcess]) -> None:
    got = _irc_labeled_privmsg(cluster(*OPEN, "--irc-port", "0"))
    assert ("L1", "PRIVMSG", ["labeled"]) in got, got
    assert not [g for g in got if g[1] == "ACK"], got


# --- (4) the native door with --redis --------------------------------------------------------------

def _guest_logout(srv: ServerProcess) -> List[Any]:
    c = srv.registered(unique_nick("g"))
    c.send(type="logout", ref="lo")
    c.expect_error("not_logged_in", SLOW, ref="lo")
    return c.barrier(SLOW)  # the connection is still there


def test_control_guest_logout_alone(start_server: Callable[..., ServerProcess]) -> None:
    assert _guest_logout(start_server(*OPEN)) == []


def test_guest_logout_with_redis_keeps_the_connection(cluster: Callable[..., ServerProcess]) -> None:
    assert _guest_logout(cluster(*OPEN)) == []


# --- (3) a snapshot bigger than the link's outgoing buffer ----------------------------------------

def test_a_process_joins_a_cluster_whose_state_is_over_a_mebibyte(
        cluster: Callable[..., ServerProcess], start_server: Callable[..., ServerProcess],
        redis: RedisServer, tmp_path: Path) -> None:
    p1 = cluster(*OPEN)
    a = p1.registered(unique_nick("big"))
    room = unique_room("big")
    join(a, room)
    text = "\U0001F600" * 4000  # 4,000 code points (under max_text): 48 KB as JSON in a snapshot
    for i in range(25):  # the last 50 messages of each room ride in the snapshot: 1.2 MB here
        a.send(type="say", room=room, text=text, ref=f"s{i}")
        a.wait_for("message", SLOW, ref=f"s{i}")
    p2 = start_server("--redis", redis.url, "--db", str(tmp_path / "late.db"), *OPEN)
    p2.wait_log(IN_CLUSTER, SLOW)


# --- (1) decisions that read per-process options ------------------------------------------------

def test_a_process_with_different_rules_does_not_join(
        cluster: Callable[..., ServerProcess], start_server: Callable[..., ServerProcess],
        tmp_path: Path, redis: RedisServer) -> None:
    """Processes that decide by different options (--registration here) would not stay one
    chat: the newcomer says why and stops with exit 1; the cluster goes on."""
    kdf = ("--kdf-workers", "0")
    p1 = cluster(*OPEN, *kdf, "--registration", "closed")
    a = p1.registered(unique_nick("a"))
    p2 = start_server("--redis", redis.url, "--db", str(tmp_path / "odd.db"), *OPEN, *kdf)
    p2.wait_log("differ from the cluster", SLOW)
    p2.signalled = True  # (its exit is the point)
    assert p2.wait_exit(SLOW) == 1
    assert "registration" in p2.log()
    a.send(type="say", room="#lobby", text="still here", ref="s")
    a.wait_for("message", SLOW, ref="s")


# --- (1) split brain: a process that starts "alone" while another's lease has lapsed -------------

def test_a_process_started_while_another_s_lease_lapsed_joins_the_one_chat(
        redis: RedisServer, cluster: Callable[..., ServerProcess],
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """p1 frozen past its lease; p2 starts alone and buries it; p1 wakes, finds itself buried,
    closes its connections, and serves new ones in the one chat (not a second one)."""
    p1 = cluster(*OPEN)
    a = p1.registered(unique_nick("a"))
    p1.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + SLOW
        while not member_lapsed(redis):
            assert time.monotonic() < deadline, "p1's lease never lapsed"
            time.sleep(0.2)  # polling Redis with a deadline
        p2 = start_server("--redis", redis.url, "--db", str(tmp_path / "new.db"), *OPEN)
        p2.wait_log(IN_CLUSTER, SLOW)
        p2.wait_log("started alone: buried", SLOW)  # p2 buried p1
    finally:
        p1.signal(signal.SIGCONT)
    a.assert_closed(SLOW, allow_partial=True)
    p1.wait_log("lease gone", SLOW)
    b = p2.registered(unique_nick("b"))
    again = p1.registered(unique_nick("a2"), names=None)
    b.wait_for("join", SLOW, nick=again.nick)
    again.send(type="say", room="#lobby", text="can you hear me", ref="s")
    again.wait_for("message", SLOW, ref="s")
    b.wait_for("message", SLOW, text="can you hear me")
    b.send(type="who", room="#lobby", ref="w")
    assert a.nick not in b.wait_for("names", SLOW, ref="w")[0]["nicks"]


# --- (4) AWAY while Redis is down -------------------------------------------------------------------

def test_irc_away_while_redis_is_down_is_not_dropped_in_silence(
        redis: RedisServer, cluster: Callable[..., ServerProcess]) -> None:
    from test_irc_gateway import Irc
    p1 = cluster(*OPEN, "--irc-port", "0")
    env = Irc(p1)
    try:
        u = env.user(unique_nick("aw"))
        redis.kill(signal.SIGKILL)
        p1.wait_log("down", SLOW)
        u.send("AWAY :gone fishing")
        # Not 306: the change cannot be ordered now, and the client is told so.
        u.wait_for("FAIL", "AWAY", "TEMPORARILY_UNAVAILABLE", timeout=SLOW)
        redis.start()
        p1.wait_log("caught up", SLOW)
        u.send(f"WHOIS {u.nick}")
        lines = u.until_numeric("318", SLOW)
        assert not [x for x in lines if x.command == "301"]  # as it was told: not away
        u.send("AWAY :gone fishing")
        u.wait_for("306", timeout=SLOW)
        u.send(f"WHOIS {u.nick}")
        assert [x for x in u.until_numeric("318", SLOW) if x.command == "301"]
    finally:
        env.close()


def test_control_irc_away_shows_in_whois_alone(start_server: Callable[..., ServerProcess]) -> None:
    from test_irc_gateway import Irc
    env = Irc(start_server("--irc-port", "0", *OPEN))
    try:
        u = env.user(unique_nick("aw"))
        u.send("AWAY :gone fishing")
        u.wait_for("306", timeout=SLOW)
        u.send(f"WHOIS {u.nick}")
        assert [x for x in u.until_numeric("318", SLOW) if x.command == "301"]
    finally:
        env.close()


# --- (4) IRC user modes live on the connection, not in the shared state ---------------------------

def _who_mask_lists_invisible(p_hidden: ServerProcess, p_asker: ServerProcess) -> bool:
    from test_irc_gateway import Irc
    env_h, env_a = Irc(p_hidden), Irc(p_asker)
    try:
        hidden = env_h.user(unique_nick("hid"))
        hidden.send(f"MODE {hidden.nick} +i")
        hidden.wait_for("MODE", timeout=SLOW)
        # The mode reaches other processes as a change of the ordered stream, after its MODE
        # answer; an AWAY sent after it is ordered after it, and WHOIS shows when that landed.
        hidden.send("AWAY :marker")
        hidden.wait_for("306", timeout=SLOW)
        asker = env_a.user(unique_nick("ask"))
        deadline = time.monotonic() + SLOW
        while True:  # (with --redis: until the asker's process has applied the hidden's AWAY)
            asker.send(f"WHOIS {hidden.nick}")
            if [x for x in asker.until_numeric("318", SLOW) if x.command == "301"]:
                break
            assert time.monotonic() < deadline
        asker.send(f"WHO {hidden.nick[:3]}*")
        lines = asker.until_numeric("315", SLOW)
        return any(x.command == "352" and hidden.nick in x.params for x in lines)
    finally:
        env_h.close()
        env_a.close()


def test_control_invisible_user_not_listed_by_who_masks_alone(
        start_server: Callable[..., ServerProcess]) -> None:
    p = start_server("--irc-port", "0", *OPEN)
    assert not _who_mask_lists_invisible(p, p)


def test_invisible_user_not_listed_by_who_masks_on_another_process(
        cluster: Callable[..., ServerProcess]) -> None:
    p1 = cluster(*OPEN, "--irc-port", "0")
    p2 = cluster(*OPEN, "--irc-port", "0")
    assert not _who_mask_lists_invisible(p1, p2)


# --- (5) /healthz while the process cannot serve ---------------------------------------------------

def test_healthz_is_not_200_while_every_hello_is_refused(
        redis: RedisServer, start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    import urllib.error
    import urllib.request
    # A lease of a process that is not there (a snapshot will never come while it lasts).
    fake_member(redis, 600000)
    p = start_server("--redis", redis.url, "--db", str(tmp_path / "h.db"), "--metrics-port", "0", *OPEN)
    port = int(p.wait_log(re.compile(r"metrics at http://127\.0\.0\.1:(\d+)/"), SLOW).group(1))
    p.wait_log("no snapshot came", SLOW)
    c = p.client()
    c.send(type="hello", nick=unique_nick("h"), ref="h")
    c.expect_error("unavailable", SLOW, ref="h")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 503


def test_irc_registration_while_not_in_the_cluster_is_not_433(
        redis: RedisServer, start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    from ircwire import IrcClient, irc_port
    fake_member(redis, 600000)
    p = start_server("--redis", redis.url, "--db", str(tmp_path / "i.db"), "--irc-port", "0", *OPEN)
    p.wait_log("no snapshot came", SLOW)
    c = IrcClient(irc_port(p))
    try:
        nick = unique_nick("n")
        c.send(f"NICK {nick}")
        c.send("USER u 0 * :u")
        line = c.recv_line(SLOW)
        assert line.command != "433", f"{line.command} {line.params}"
    finally:
        c.close()
