"""Accounts at the native door (PROTOCOL.md 11.1): register, log in, reserved nicks, one
account on several connections, private history and messages kept while away, throttling.

Every test runs real server processes and talks to them over real sockets (tests/wire.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import unique_nick, unique_room  # noqa: E402
from wire import ANY, Client  # noqa: E402

PASSWORD = "correct horse 42"
SLOW = 15.0  # a password check in a worker process: generous for a loaded machine


def hello(srv: Any, nick: str, login: Optional[Dict[str, Any]] = None, **extra: Any) -> Client:
    c = srv.client()
    msg: Dict[str, Any] = {"type": "hello", "nick": nick, **extra}
    if login is not None:
        msg["login"] = login
    c.send(msg)
    return c


def welcomed(c: Client, timeout: float = SLOW) -> Dict[str, Any]:
    """The welcome, then the lobby's join/names/history (which must follow it)."""
    w = c.expect("welcome", timeout)
    c.nick = w["nick"]
    c.expect("join", room="#lobby")
    c.expect_names("#lobby")
    c.expect("history", room="#lobby")
    return w


def registered_account(srv: Any, nick: str, password: str = PASSWORD) -> Client:
    c = srv.registered(nick)
    c.send(type="register", password=password, ref="reg")
    c.expect("account", SLOW, account=nick, nick=nick, ref="reg")
    return c


def login(srv: Any, account: str, nick: Optional[str] = None, password: str = PASSWORD,
          **login_extra: Any) -> "tuple[Client, Dict[str, Any]]":
    c = hello(srv, nick or account, {"account": account, "password": password, **login_extra})
    return c, welcomed(c)


def test_register_then_the_nick_is_reserved_and_a_login_takes_it(start_server):
    srv = start_server("--rate", "0")
    nick = unique_nick("acc")
    alice = registered_account(srv, nick)
    alice.quit_and_close()
    # Nobody else may use the nick now.
    guest = hello(srv, nick)
    guest.expect_error("nick_reserved")
    # A wrong password: login_failed, and the connection may try again.
    guest.send(type="hello", nick=nick, login={"account": nick, "password": "not it at all"})
    guest.expect_error("login_failed", SLOW)
    guest.send(type="hello", nick=nick, login={"account": nick, "password": PASSWORD})
    w = welcomed(guest)
    assert w["account"] == nick and w["nick"] == nick


def test_register_errors(start_server):
    srv = start_server("--rate", "0")
    a = srv.registered(unique_nick("re"))
    a.send(type="register", password="short", ref=1)
    a.expect_error("bad_password", ref=1)
    a.send(type="register", password="x" * 257, ref=2)
    a.expect_error("bad_password", ref=2)
    a.send(type="register", password=PASSWORD, ref=3)
    a.expect("account", SLOW, ref=3)
    a.send(type="register", password=PASSWORD, ref=4)
    a.expect_error("already_registered", ref=4)


def test_registration_can_be_closed(start_server):
    srv = start_server("--rate", "0", "--registration", "closed")
    a = srv.registered(unique_nick("rc"))
    a.send(type="register", password=PASSWORD, ref=1)
    a.expect_error("registration_closed", ref=1)


def test_events_name_the_account_of_logged_in_users(start_server):
    srv = start_server("--rate", "0")
    nick = unique_nick("ev")
    registered_account(srv, nick).quit_and_close()
    watcher = srv.registered(unique_nick("w"))
    alice, _ = login(srv, nick)
    joined = watcher.expect("join", room="#lobby", nick=nick)
    assert joined["account"] == nick
    alice.send(type="say", room="#lobby", text="hello all")
    said = watcher.expect("message", text="hello all")
    assert said["account"] == nick
    watcher.send(type="who", room="#lobby")
    names = watcher.expect("names", room="#lobby")
    assert names["accounts"] == {nick: nick}
    # A guest's events carry no account.
    guest = srv.registered(unique_nick("g"))
    assert "account" not in watcher.expect("join", nick=guest.nick)


def test_login_after_welcome_tells_room_mates(start_server):
    srv = start_server("--rate", "0")
    nick = unique_nick("la")
    registered_account(srv, nick).quit_and_close()
    mate = srv.registered(unique_nick("m"))
    late = srv.registered(unique_nick("late"))
    mate.expect("join", nick=late.nick)
    late.send(type="login", account=nick, password=PASSWORD, ref="in")
    answer = late.expect("account", SLOW, ref="in")
    assert answer["account"] == nick and answer["nick"] == late.nick  # keeps its own free nick
    mate.expect("account", nick=late.nick, account=nick)


def test_one_account_on_three_connections_is_one_user(start_server):
    srv = start_server("--rate", "0")
    nick = unique_nick("multi")
    registered_account(srv, nick).quit_and_close()
    other = srv.registered(unique_nick("o"))
    phone, _ = login(srv, nick)
    other.expect("join", nick=nick)
    laptop, w2 = login(srv, nick, nick=unique_nick("x"))
    desk, w3 = login(srv, nick, nick=unique_nick("y"))
    assert w2["nick"] == w3["nick"] == nick  # the same user, whatever nick the hello asked
    # Nobody sees the second and third connections arrive.
    other.assert_quiet()
    # What one says is seen on all, echo with ref on the sender.
    laptop.send(type="say", room="#lobby", text="from the laptop", ref="l1")
    laptop.expect("message", text="from the laptop", ref="l1")
    phone.expect("message", text="from the laptop")
    desk.expect("message", text="from the laptop")
    other.expect("message", text="from the laptop", **{"from": nick})
    # A private message to the nick reaches every connection.
    other.send(type="msg", to=nick, text="psst")
    other.expect("message", text="psst")
    for c in (phone, laptop, desk):
        c.expect("message", text="psst", to=nick)
    # A join on one is seen on all.
    room = unique_room("m")
    desk.send(type="join", room=room, ref="j")
    desk.expect("join", room=room, ref="j")
    for c in (phone, laptop):
        c.expect("join", room=room, nick=nick)
    # The user quits for others only when the last connection goes.
    phone.quit_and_close()
    laptop.quit_and_close()
    other.assert_quiet()
    desk.send(type="quit")
    other.expect("quit", nick=nick)


def test_private_history_between_two_accounts_is_paged(start_server):
    srv = start_server("--rate", "0")
    a_nick, b_nick = unique_nick("pa"), unique_nick("pb")
    a = registered_account(srv, a_nick)
    b = registered_account(srv, b_nick)
    a.wait_for("account", nick=b_nick)
    for i in range(5):
        a.send(type="msg", to=b_nick, text=f"line {i}")
        a.expect("message", text=f"line {i}")
        b.expect("message", text=f"line {i}")
    b.send(type="history", **{"with": a_nick}, limit=3, ref="h")
    page = b.expect("history", ref="h", more=True)
    assert page["with"] == a_nick
    assert [m["text"] for m in page["messages"]] == ["line 2", "line 3", "line 4"]
    b.send(type="history", **{"with": a_nick}, before=page["messages"][0]["id"], ref="h2")
    older = b.expect("history", ref="h2", more=False)
    assert [m["text"] for m in older["messages"]] == ["line 0", "line 1"]
    # A guest gets none.
    g = srv.registered(unique_nick("g"))
    g.send(type="history", **{"with": a_nick}, ref="g")
    g.expect_error("not_logged_in", ref="g")


def test_a_message_to_an_offline_account_waits_for_its_next_login(start_server):
    srv = start_server("--rate", "0")
    away = unique_nick("away")
    registered_account(srv, away).quit_and_close()
    sender = srv.registered(unique_nick("s"))
    sender.send(type="msg", to=away, text="while you were out", ref="m")
    echo = sender.expect("message", ref="m", text="while you were out")
    assert echo["to"] == away
    back, _ = login(srv, away)
    got = back.expect("history")
    assert got["with"] == sender.nick and got["more"] is False
    assert [m["text"] for m in got["messages"]] == ["while you were out"]
    assert got["messages"][0]["id"] == echo["id"]
    # Delivered once: the next login gets nothing more.
    back.quit_and_close()
    again, _ = login(srv, away)
    again.assert_quiet()


def remembered(srv: Any, prefix: str) -> "tuple[str, Client, str]":
    """A new account logged in with `remember`: (its nick, the connection, the token)."""
    nick = unique_nick(prefix)
    registered_account(srv, nick).quit_and_close()
    c, w = login(srv, nick, remember=True)
    return nick, c, w["token"]


def test_tokens_log_in_and_logout_revokes_them(start_server):
    srv = start_server("--rate", "0")
    nick, first, token = remembered(srv, "tok")
    assert isinstance(token, str) and len(token) >= 32
    second = hello(srv, nick, {"account": nick, "token": token})
    assert welcomed(second)["account"] == nick
    second.send(type="logout", token=token, ref="out")
    second.expect("account", account=None, ref="out")
    second.assert_closed()
    third = hello(srv, unique_nick("t3"), {"account": nick, "token": token})
    third.expect_error("login_failed")


def test_password_change(start_server):
    srv = start_server("--rate", "0")
    nick = unique_nick("pw")
    a = registered_account(srv, nick)
    a.send(type="password", old="wrong password", new="another pass 1", ref="p0")
    a.expect_error("login_failed", SLOW, ref="p0")
    a.send(type="password", old=PASSWORD, new="another pass 1", ref="p1")
    a.expect("account", SLOW, account=nick, ref="p1")
    a.quit_and_close()
    c = hello(srv, nick, {"account": nick, "password": PASSWORD})
    c.expect_error("login_failed", SLOW)
    c.send(type="hello", nick=nick, login={"account": nick, "password": "another pass 1"})
    welcomed(c)


def test_a_thousand_wrong_passwords_are_throttled_and_nobody_else_is_slowed(start_server):
    # (the guesser never registers: a long handshake timeout keeps it while it guesses)
    srv = start_server("--rate", "0", "--max-per-ip", "0", "--register-rate", "0",
                       "--handshake-timeout", "120")
    nick = unique_nick("victim")
    registered_account(srv, nick).quit_and_close()
    bystander = srv.registered(unique_nick("by"))
    guesser = srv.client()
    codes: Dict[str, int] = {}
    started = time.monotonic()
    for i in range(1000):
        guesser.send(type="hello", nick=unique_nick("gs"),
                     login={"account": nick, "password": f"guess number {i}"})
        if i % 100 == 0:
            # The bystander is served all along: its pings come back.
            bystander.barrier(SLOW)
    for _ in range(1000):
        err = guesser.expect("error", SLOW)
        codes[err["code"]] = codes.get(err["code"], 0) + 1
    print(f"1000 guesses answered in {time.monotonic() - started:.2f} s")
    assert set(codes) == {"login_failed", "login_throttled"}
    assert codes["login_failed"] <= 5  # the rest were refused before any password work
    # Even the right password is refused while the account is throttled.
    guesser.send(type="hello", nick=nick, login={"account": nick, "password": PASSWORD})
    guesser.expect_error("login_throttled")
    bystander.send(type="say", room="#lobby", text="still here", ref="b")
    bystander.expect("message", ref="b")


def test_accounts_and_private_history_survive_a_restart(start_server, tmp_path):
    db = str(tmp_path / "chat.db")
    srv = start_server("--rate", "0", "--db", db)
    a_nick, b_nick = unique_nick("ra"), unique_nick("rb")
    a = registered_account(srv, a_nick)
    registered_account(srv, b_nick)
    a.wait_for("account", nick=b_nick)
    a.send(type="msg", to=b_nick, text="before the restart")
    a.expect("message", text="before the restart")
    srv.close_clients()
    srv.stop()
    srv2 = start_server("--rate", "0", "--db", db)
    hello(srv2, a_nick).expect_error("nick_reserved")
    b2, _ = login(srv2, b_nick)
    b2.send(type="history", **{"with": a_nick}, ref="h")
    got = b2.expect("history", ref="h")
    assert [m["text"] for m in got["messages"]] == ["before the restart"]


def test_a_password_change_ends_every_remember_me_token(start_server):
    """A token that leaked with the old password must not outlive it; the connections open
    now stay, and the new password logs in."""
    srv = start_server("--rate", "0")
    nick, phone, token = remembered(srv, "pt")
    phone.send(type="password", old=PASSWORD, new="another pass 2", ref="p")
    phone.expect("account", SLOW, account=nick, ref="p")
    stolen = hello(srv, unique_nick("t"), {"account": nick, "token": token})
    stolen.expect_error("login_failed", SLOW)
    phone.send(type="ping", token="still", ref="q")
    phone.expect("pong", ref="q")
    again, w2 = login(srv, nick, password="another pass 2")
    assert w2["account"] == nick


def test_a_password_change_with_remember_gives_this_device_a_new_token(start_server):
    srv = start_server("--rate", "0")
    nick, phone, old_token = remembered(srv, "pr")
    phone.send(type="password", old=PASSWORD, new="another pass 3", remember=True, ref="p")
    answer = phone.expect("account", SLOW, account=nick, ref="p")
    new_token = answer["token"]
    assert isinstance(new_token, str) and new_token != old_token
    hello(srv, unique_nick("t"), {"account": nick, "token": old_token}).expect_error("login_failed", SLOW)
    again = hello(srv, unique_nick("t"), {"account": nick, "token": new_token})
    assert welcomed(again)["account"] == nick


def test_max_accounts_closes_registration_when_reached(start_server):
    srv = start_server("--rate", "0", "--max-accounts", "1")
    registered_account(srv, unique_nick("one")).quit_and_close()
    second = srv.registered(unique_nick("two"))
    second.send(type="register", password=PASSWORD, ref="r")
    second.expect_error("registration_closed", SLOW, ref="r")


def test_sighup_raises_max_accounts_from_the_config_file(start_server, tmp_path):
    import signal
    config = tmp_path / "selchat.toml"
    config.write_text("max-accounts = 1\nrate = 0\n")
    srv = start_server("--config", str(config))
    registered_account(srv, unique_nick("one")).quit_and_close()
    second = srv.registered(unique_nick("two"))
    second.send(type="register", password=PASSWORD, ref="r")
    second.expect_error("registration_closed", SLOW, ref="r")
    config.write_text("max-accounts = 2\nrate = 0\n")
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"reloaded: .*at most 2 accounts", SLOW)
    second.send(type="register", password=PASSWORD, ref="r2")
    second.expect("account", SLOW, account=second.nick, ref="r2")
