"""Rooms that can be run, at the native door (PROTOCOL.md 11.2): roles, topic, kick, invite,
modes, bans by mask, founders across restarts, server operators and kill.

Real server processes, real sockets (tests/wire.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import unique_nick, unique_room  # noqa: E402
from test_accounts import PASSWORD, SLOW, hello, login, registered_account, welcomed  # noqa: E402
from wire import Client  # noqa: E402

OPTS = ("--rate", "0", "--max-per-ip", "0", "--register-rate", "0")


def see(c: Client, type: str, timeout: float = SLOW, **members: Any) -> Dict[str, Any]:
    """The first matching event; others before it (joins to the lobby, ...) are passed over."""
    return c.wait_for(type, timeout, **members)[0]


def refused(c: Client, code: str, **members: Any) -> Dict[str, Any]:
    return see(c, "error", code=code, **members)


def joined(c: Client, room: str, **extra: Any) -> Dict[str, Any]:
    """Join `room` and read the answer through its history; the names event is returned."""
    c.send(type="join", room=room, **extra)
    c.wait_for("join", room=room, nick=c.nick)
    names = c.expect("names", room=room)
    event = c.recv_event()
    if event["type"] == "topic":
        event = c.recv_event()
    assert event["type"] == "history", event
    return names


def test_the_creator_is_operator_and_names_lists_roles(start_server):
    srv = start_server(*OPTS)
    room = unique_room("roles")
    op = srv.registered(unique_nick("op"))
    names = joined(op, room)
    assert names["operators"] == [op.nick] and names["voiced"] == []
    member = srv.registered(unique_nick("m"))
    names = joined(member, room)
    assert names["operators"] == [op.nick]
    see(op, "join", nick=member.nick)
    op.send(type="mode", room=room, set={"voice": [member.nick]}, ref="v")
    change = see(op, "mode", room=room, ref="v")
    assert change["set"] == {"voice": [member.nick]} and change["by"] == op.nick
    see(member, "mode", room=room, set={"voice": [member.nick]})
    member.send(type="who", room=room)
    assert see(member, "names", room=room)["voiced"] == [member.nick]


def test_topic_is_locked_to_operators_and_shown_to_joiners(start_server):
    srv = start_server(*OPTS)
    room = unique_room("topic")
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    member = srv.registered(unique_nick("m"))
    joined(member, room)
    see(op, "join", nick=member.nick)
    member.send(type="topic", room=room, text="mine now", ref="t")
    refused(member, "not_operator", ref="t")
    op.send(type="topic", room=room, text="release on friday", ref="t")
    t = see(op, "topic", room=room, ref="t", text="release on friday", by=op.nick)
    assert isinstance(t["ts"], int)
    see(member, "topic", room=room, text="release on friday", by=op.nick)
    late = srv.registered(unique_nick("late"))
    late.send(type="join", room=room)
    late.wait_for("join", room=room, nick=late.nick)
    late.expect_names(room)
    late.expect("topic", room=room, text="release on friday")
    late.expect("history", room=room)
    # Unlocked, anyone may set it.
    op.send(type="mode", room=room, set={"topic_locked": False})
    member.wait_for("mode", room=room)
    member.send(type="topic", room=room, text="", ref="clear")
    see(member, "topic", room=room, text="", ref="clear")


def test_a_kick_is_seen_by_everyone_and_the_kicked_is_out(start_server):
    srv = start_server(*OPTS)
    room = unique_room("kick")
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    troll = srv.registered(unique_nick("troll"))
    joined(troll, room)
    witness = srv.registered(unique_nick("w"))
    joined(witness, room)
    op.wait_for("join", nick=witness.nick)
    troll.wait_for("join", nick=witness.nick)
    troll.send(type="kick", room=room, nick=op.nick, ref="k")
    refused(troll, "not_operator", ref="k")
    op.send(type="kick", room=room, nick=unique_nick("nobody"), ref="k0")
    refused(op, "no_such_nick", ref="k0")
    op.send(type="kick", room=room, nick=troll.nick, reason="be nice", ref="k1")
    see(op, "kick", room=room, nick=troll.nick, by=op.nick, reason="be nice", ref="k1")
    see(troll, "kick", room=room, nick=troll.nick, by=op.nick, reason="be nice")
    see(witness, "kick", room=room, nick=troll.nick)
    troll.send(type="say", room=room, text="still here?", ref="s")
    refused(troll, "not_in_room", ref="s")


def test_invite_only_key_and_limit(start_server):
    srv = start_server(*OPTS)
    room = unique_room("gate")
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    op.send(type="mode", room=room, set={"invite_only": True}, ref="i")
    see(op, "mode", ref="i", set={"invite_only": True})
    guest = srv.registered(unique_nick("g"))
    guest.send(type="join", room=room, ref="j")
    refused(guest, "invite_only", ref="j")
    op.send(type="invite", room=room, nick=guest.nick, ref="inv")
    see(op, "invite", room=room, nick=guest.nick, by=op.nick, ref="inv")
    see(guest, "invite", room=room, by=op.nick)
    joined(guest, room)
    op.wait_for("join", nick=guest.nick)
    # A key.
    op.send(type="mode", room=room, set={"invite_only": False, "key": "s3cret"}, ref="k")
    see(op, "mode", ref="k", set={"invite_only": False, "key": "s3cret"})
    other = srv.registered(unique_nick("o"))
    other.send(type="join", room=room, ref="nokey")
    refused(other, "bad_key", ref="nokey")
    other.send(type="join", room=room, key="wrong", ref="wrong")
    refused(other, "bad_key", ref="wrong")
    joined(other, room, key="s3cret")
    # A limit.
    op.send(type="mode", room=room, set={"key": None, "limit": 3}, ref="l")
    op.wait_for("mode", ref="l")
    fourth = srv.registered(unique_nick("f"))
    fourth.send(type="join", room=room, ref="full")
    refused(fourth, "room_full", ref="full")
    # The query answers every mode.
    fourth.send(type="mode", room=room, ref="q")
    info = see(fourth, "mode", room=room, ref="q")
    assert info["set"]["limit"] == 3 and info["set"]["key"] is None
    assert info["set"]["topic_locked"] is True and info["bans"] == []


def test_moderated_room_lets_operators_and_voiced_speak(start_server):
    srv = start_server(*OPTS)
    room = unique_room("mod")
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    quiet = srv.registered(unique_nick("q"))
    joined(quiet, room)
    op.wait_for("join", nick=quiet.nick)
    op.send(type="mode", room=room, set={"moderated": True})
    quiet.wait_for("mode", room=room)
    quiet.send(type="say", room=room, text="hello?", ref="s")
    refused(quiet, "moderated", ref="s")
    op.send(type="mode", room=room, set={"voice": [quiet.nick]})
    quiet.wait_for("mode", room=room)
    quiet.send(type="say", room=room, text="thanks", ref="s2")
    see(quiet, "message", ref="s2", text="thanks")


def test_a_ban_by_account_mask_is_not_escaped_by_a_nick_change(start_server):
    srv = start_server(*OPTS)
    room = unique_room("ban")
    bad = unique_nick("bad")
    registered_account(srv, bad).quit_and_close()
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    op.send(type="mode", room=room, set={"ban": [f"account:{bad}"]}, ref="b")
    see(op, "mode", ref="b", set={"ban": [f"account:{bad.lower()}"]})
    c, _ = login(srv, bad)
    c.send(type="join", room=room, ref="j")
    refused(c, "banned", ref="j")
    c.send(type="nick", nick=unique_nick("innocent"), ref="n")
    c.wait_for("nick", ref="n")
    c.send(type="join", room=room, ref="j2")
    refused(c, "banned", ref="j2")
    # A nick mask and a nick!user@host glob.
    nick_banned = srv.registered(unique_nick("nb"))
    op.send(type="mode", room=room, set={"ban": [nick_banned.nick, "*!*@10.9.9.*"]}, ref="b2")
    op.wait_for("mode", ref="b2")
    nick_banned.send(type="join", room=room, ref="j3")
    refused(nick_banned, "banned", ref="j3")
    op.send(type="mode", room=room, ref="q")
    assert sorted(op.wait_for("mode", ref="q")[0]["bans"]) == sorted(
        [f"account:{bad.lower()}", nick_banned.nick.lower() + "!*@*", "*!*@10.9.9.*"])
    op.send(type="mode", room=room, set={"unban": [nick_banned.nick]}, ref="u")
    op.wait_for("mode", ref="u")
    joined(nick_banned, room)


def test_secret_rooms_are_left_out_of_rooms_for_others(start_server):
    srv = start_server(*OPTS)
    room = unique_room("secret")
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    op.send(type="mode", room=room, set={"secret": True}, ref="s")
    op.wait_for("mode", ref="s")
    other = srv.registered(unique_nick("o"))
    other.send(type="rooms", ref="r")
    listed = [r["name"] for r in see(other, "rooms", ref="r")["rooms"]]
    assert room not in listed and "#lobby" in listed
    op.send(type="rooms", ref="r")
    assert room in [r["name"] for r in op.wait_for("rooms", ref="r")[0]["rooms"]]


def test_a_founder_gets_operator_back_after_a_restart(start_server, tmp_path):
    db = str(tmp_path / "chat.db")
    srv = start_server(*OPTS, "--db", db)
    founder = unique_nick("f")
    room = unique_room("reg")
    c = registered_account(srv, founder)
    joined(c, room)
    c.send(type="topic", room=room, text="kept across restarts")
    c.wait_for("topic", room=room)
    c.send(type="mode", room=room, set={"moderated": True, "ban": ["account:spammer"]})
    c.wait_for("mode", room=room)
    srv.close_clients()
    srv.stop()
    srv2 = start_server(*OPTS, "--db", db)
    # Someone else comes first: the room is not theirs to take.
    first = srv2.registered(unique_nick("first"))
    names = joined(first, room)
    assert names["operators"] == []
    back, _ = login(srv2, founder)
    back.send(type="join", room=room)
    back.wait_for("join", room=room, nick=founder)
    names = back.expect("names", room=room)
    assert names["operators"] == [founder]
    back.expect("topic", room=room, text="kept across restarts")
    back.send(type="mode", room=room, ref="q")
    info = back.wait_for("mode", ref="q")[0]
    assert info["set"]["moderated"] is True and info["bans"] == ["account:spammer"]


def test_a_server_operator_kills_and_everyone_sees_the_quit(start_server, tmp_path):
    oper = unique_nick("oper")
    ops_file = tmp_path / "operators"
    ops_file.write_text(f"# the server's operators\n{oper}\n")
    srv = start_server(*OPTS, "--operators", str(ops_file))
    registered_account(srv, oper).quit_and_close()
    root, _ = login(srv, oper)
    victim = srv.registered(unique_nick("v"))
    witness = srv.registered(unique_nick("w"))
    root.wait_for("join", nick=witness.nick)
    witness.send(type="kill", nick=victim.nick, ref="k")
    refused(witness, "not_operator", ref="k")
    root.send(type="kill", nick=victim.nick, reason="spam")
    quit_event = witness.wait_for("quit", nick=victim.nick)[0]
    assert oper in quit_event["reason"] and "spam" in quit_event["reason"]
    victim.assert_closed(SLOW)
    # Operator powers in every room: a room the operator did not make.
    room = unique_room("any")
    joined(witness, room)
    joined(root, room)
    root.send(type="topic", room=room, text="by the server operator", ref="t")
    see(root, "topic", ref="t", text="by the server operator")


def test_sighup_reads_the_operators_file_again(start_server, tmp_path):
    import signal

    first, second = unique_nick("op1"), unique_nick("op2")
    ops_file = tmp_path / "operators"
    ops_file.write_text(f"{first}\n")
    srv = start_server(*OPTS, "--operators", str(ops_file))
    registered_account(srv, second).quit_and_close()
    new_op, _ = login(srv, second)
    victim = srv.registered(unique_nick("v"))
    new_op.send(type="kill", nick=victim.nick, ref="k1")
    refused(new_op, "not_operator", ref="k1")
    ops_file.write_text(f"{first}\n{second}\n")
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"server operators: .*" + second.lower(), SLOW)
    new_op.send(type="kill", nick=victim.nick, reason="reloaded")
    see(new_op, "quit", nick=victim.nick)
    victim.assert_closed(SLOW)
    # A file that cannot be read keeps the operators in force, with one error line.
    ops_file.unlink()
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"operators", SLOW)
    assert srv.alive()
    other = srv.registered(unique_nick("v2"))
    new_op.send(type="kill", nick=other.nick)
    see(new_op, "quit", nick=other.nick)


def test_a_secret_room_shows_nobody_outside_it_its_members_or_modes(start_server):
    """To a non-member a secret room does not exist: `who` answers empty names, `mode`
    {room} `no_such_room` (its bans and key stay its own); members see everything."""
    srv = start_server(*OPTS)
    room = unique_room("hidden")
    op = srv.registered(unique_nick("op"))
    joined(op, room)
    op.send(type="mode", room=room, set={"secret": True, "ban": ["account:someone"]}, ref="s")
    op.wait_for("mode", ref="s")
    other = srv.registered(unique_nick("o"))
    other.send(type="who", room=room, ref="w")
    assert see(other, "names", ref="w")["nicks"] == []
    other.send(type="mode", room=room, ref="m")
    refused(other, "no_such_room", ref="m")
    op.send(type="who", room=room, ref="w")
    assert see(op, "names", ref="w")["nicks"] == [op.nick]
    op.send(type="mode", room=room, ref="m")
    info = see(op, "mode", ref="m")
    assert info["set"]["secret"] is True and "account:someone" in str(info), info
