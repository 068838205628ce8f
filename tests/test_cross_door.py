"""IRC door <-> framed (native) door: one chat (PROTOCOL.md 10 and 10.1).

A user is a user whichever door it came in by: nicks are one case-insensitive namespace, rooms
are the same rooms, message ids are one sequence, history is one history. Every test runs a
fresh server with both doors and talks to it with tests/wire.py's native Client and
tests/ircwire.py's IrcClient (which fails on any line over 512 bytes or not ended by CRLF).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ircwire import IrcClient, describe, irc_port, source_nick  # noqa: E402
from wire import ANY, Client  # noqa: E402

OPTIONS = ("--irc-port", "0", "--rate", "0", "--max-per-ip", "0", "--server-name", "irc.test.example")
HIST_CAPS = ("batch", "draft/chathistory", "message-tags", "server-time")


class Doors:
    """One server, both doors; the clients of one test are closed at teardown."""

    def __init__(self, srv: object) -> None:
        self.srv = srv
        self.irc_port = irc_port(srv)
        self.irc_clients: List[IrcClient] = []

    def native(self, nick: str) -> Client:
        """A registered native client (a member of #lobby, as every native user is)."""
        return self.srv.registered(nick)  # type: ignore[attr-defined]

    def irc(self, nick: str, caps: tuple = ()) -> IrcClient:
        c = IrcClient(self.irc_port, label=f"irc:{nick}")
        self.irc_clients.append(c)
        c.register(nick, caps)
        return c

    def close(self) -> None:
        for c in self.irc_clients:
            c.close()


@pytest.fixture
def doors(start_server: Callable[..., object]) -> Iterator[Doors]:
    d = Doors(start_server(*OPTIONS))
    yield d
    d.close()


def both_in(d: Doors, room: str, native_nick: str = "Nat", irc_nick: str = "Ian", caps: tuple = ()) -> "tuple[Client, IrcClient]":
    """A native and an IRC user in `room` (IRC first, so the native's JOIN reaches IRC)."""
    i = d.irc(irc_nick, caps)
    i.join(room)
    n = d.native(native_nick)
    n.join(room)
    seen = i.expect("JOIN", room)
    assert source_nick(seen) == native_nick, describe(seen)
    return n, i


# --------------------------------------------------------------------------- messages


def test_native_room_message_reaches_irc(doors: Doors) -> None:
    n, i = both_in(doors, "#r", caps=("message-tags", "server-time"))
    n.send(type="say", room="#r", text="hello from native")
    echo = n.expect("message", room="#r", text="hello from native", id=ANY)
    got = i.expect("PRIVMSG", "#r", "hello from native")
    assert source_nick(got) == "Nat", describe(got)
    assert got.tags.get("msgid") == str(echo["id"]), (describe(got), echo)  # "the same ids"
    assert "time" in got.tags


def test_irc_room_message_reaches_native_in_the_same_id_sequence(doors: Doors) -> None:
    n, i = both_in(doors, "#r", caps=("message-tags", "echo-message"))
    n.send(type="say", room="#r", text="first")
    first = n.expect("message", room="#r", text="first")
    i.expect("PRIVMSG", "#r", "first")
    i.send("PRIVMSG #r :second, from irc")
    mine = i.expect("PRIVMSG", "#r", "second, from irc")  # echo-message
    second = n.expect("message", **{"from": "Ian"}, room="#r", text="second, from irc")
    assert isinstance(second["id"], int) and second["id"] > first["id"], (first, second)
    assert isinstance(second["ts"], int)
    assert mine.tags.get("msgid") == str(second["id"]), (describe(mine), second)
    n.send(type="say", room="#r", text="third")
    third = n.expect("message", room="#r", text="third")
    assert third["id"] > second["id"]
    i.expect("PRIVMSG", "#r", "third")


def test_private_messages_each_way(doors: Doors) -> None:
    n = doors.native("Nat")
    i = doors.irc("Ian")
    n.send(type="msg", to="ian", text="psst, irc")
    n.expect("message", to=ANY, text="psst, irc")
    got = i.expect("PRIVMSG", "Ian", "psst, irc")
    assert source_nick(got) == "Nat", describe(got)
    i.send("PRIVMSG nat :psst, native")
    ev = n.expect("message", **{"from": "Ian"}, text="psst, native")
    assert ev["to"].lower() == "nat" and "room" not in ev, ev
    i.assert_quiet()
    n.assert_quiet()


def test_irc_errors_for_native_targets(doors: Doors) -> None:
    n = doors.native("Nat")
    n.join("#natonly")
    i = doors.irc("Ian")
    i.send("PRIVMSG #natonly :let me in")
    err = i.expect("404")
    assert err.params[:2] == ["Ian", "#natonly"], describe(err)
    n.assert_quiet()


# --------------------------------------------------------------------------- nicks


def test_nick_collisions_across_doors_are_case_insensitive(doors: Doors) -> None:
    n = doors.native("Alice")
    i = IrcClient(doors.irc_port, label="irc:collide")
    doors.irc_clients.append(i)
    i.send("NICK aLICE")
    err = i.expect("433")
    assert err.params[:2] == ["*", "aLICE"], describe(err)
    i.register("Bob")
    other = doors.srv.client()  # type: ignore[attr-defined]
    other.send(type="hello", nick="BOB")
    other.expect_error("nick_taken")
    # changes too, both ways
    n.send(type="nick", nick="bob")
    n.expect_error("nick_taken")
    i.send("NICK ALICE")
    err = i.expect("433")
    assert err.params[:2] == ["Bob", "ALICE"], describe(err)


def test_a_nick_freed_at_one_door_is_free_at_the_other(doors: Doors) -> None:
    i = doors.irc("Ian")
    i.send("QUIT :bye")
    i.assert_closed()
    n = doors.srv.client()  # type: ignore[attr-defined]
    n.register("ian")
    n.send(type="nick", nick="Nat")
    n.expect("nick", old="ian", new="Nat")
    i2 = doors.irc("IAN")  # and back: the native gave it up
    i2.assert_quiet()


# --------------------------------------------------------------------------- presence


def test_irc_users_are_not_put_in_the_lobby(doors: Doors) -> None:
    n = doors.native("Nat")
    doors.irc("Ian")
    n.assert_quiet()


def test_native_presence_reaches_irc(doors: Doors) -> None:
    n, i = both_in(doors, "#r")
    n.send(type="part", room="#r")
    n.expect("part", room="#r", nick="Nat")
    assert source_nick(i.expect("PART", "#r")) == "Nat"
    n.join("#r")
    assert source_nick(i.expect("JOIN", "#r")) == "Nat"
    n.send(type="nick", nick="Natalie")
    n.expect("nick", old="Nat", new="Natalie")
    seen = i.expect("NICK", "Natalie")
    assert source_nick(seen) == "Nat", describe(seen)
    n.send(type="quit", reason="off to bed")
    n.assert_closed()
    seen = i.expect("QUIT")
    assert source_nick(seen) == "Natalie" and "off to bed" in seen.params[-1], describe(seen)


def test_irc_presence_reaches_natives(doors: Doors) -> None:
    n = doors.native("Nat")
    n.join("#r")
    i = doors.irc("Ian")
    i.join("#r")
    n.expect("join", room="#r", nick="Ian")
    i.send("PART #r :later")
    i.expect("PART", "#r")
    n.expect("part", room="#r", nick="Ian")
    i.join("#r")
    n.expect("join", room="#r", nick="Ian")
    i.send("NICK Ianto")
    i.expect("NICK", "Ianto")
    n.expect("nick", old="Ian", new="Ianto")
    i.send("QUIT :gone")
    i.assert_closed()
    ev = n.expect("quit", nick="Ianto")
    assert "gone" in ev["reason"], ev


def test_names_and_who_list_both_doors(doors: Doors) -> None:
    n, i = both_in(doors, "#r")
    i.send("NAMES #r")
    got = i.until_numeric("366")
    names = sorted(e for x in got if x.command == "353" for e in x.params[-1].split())
    assert names == ["@Ian", "Nat"], [describe(x) for x in got]
    n.send(type="who", room="#r")
    assert sorted(n.expect_names("#r")) == ["Ian", "Nat"]
    i.send("LIST")
    rows = {x.params[1]: x.params[2] for x in i.until_numeric("323") if x.command == "322"}
    assert rows.get("#r") == "2" and rows.get("#lobby") == "1", rows


# --------------------------------------------------------------------------- long and multi-line


def test_multi_line_native_text_reaches_irc_as_several_lines_none_lost(doors: Doors) -> None:
    n, i = both_in(doors, "#r", caps=("message-tags", "server-time"))
    long_line = "".join(chr(0x3b1 + k % 20) for k in range(1500))  # 3000 bytes of Greek
    lines = ["first line", long_line, "x" * 700, "last \U0001F600 line"]
    text = "\n".join(lines)
    n.send(type="say", room="#r", text=text)
    echo = n.expect("message", room="#r", text=text)
    got: List[str] = []
    want = "".join(lines)
    while len("".join(got)) < len(want):
        line = i.expect("PRIVMSG", "#r")
        assert source_nick(line) == "Nat" and line.params[-1], describe(line)
        assert line.tags.get("msgid"), describe(line)
        got.append(line.params[-1])
    assert "".join(got) == want
    assert got[0] == "first line" and got[-1] == "last \U0001F600 line", got
    assert len(got) >= 1 + 6 + 2 + 1, len(got)  # 3000 bytes need at least 6 lines, 700 need 2
    i.assert_quiet()
    assert echo["id"] > 0


# --------------------------------------------------------------------------- history


def test_irc_message_is_in_native_history(doors: Doors) -> None:
    n, i = both_in(doors, "#r")
    i.send("PRIVMSG #r :remember me")
    live = n.expect("message", **{"from": "Ian"}, room="#r", text="remember me")
    n.send(type="history", room="#r", ref="h1")
    hist = n.expect("history", room="#r", ref="h1")
    assert [m["id"] for m in hist["messages"]] == [live["id"]], hist
    assert hist["messages"][0]["from"] == "Ian" and hist["messages"][0]["text"] == "remember me"
    late = doors.native("Late")
    late.send(type="join", room="#r")
    late.expect("join", room="#r", nick="Late")
    late.expect_names("#r")
    h = late.expect("history", room="#r")
    assert [m["text"] for m in h["messages"]] == ["remember me"], h


def test_native_message_is_served_by_chathistory(doors: Doors) -> None:
    n, i = both_in(doors, "#r", caps=HIST_CAPS)
    n.send(type="say", room="#r", text="native words")
    ev = n.expect("message", room="#r", text="native words")
    i.expect("PRIVMSG", "#r", "native words")
    i.send("CHATHISTORY LATEST #r * 10")
    got = i.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    msgs = [x for x in got if x.command == "PRIVMSG"]
    assert [x.params[-1] for x in msgs] == ["native words"], [describe(x) for x in got]
    assert msgs[0].tags.get("msgid") == str(ev["id"]) and source_nick(msgs[0]) == "Nat"


def test_private_messages_are_not_history_at_either_door(doors: Doors) -> None:
    n = doors.native("Nat")
    i = doors.irc("Ian", HIST_CAPS)
    i.send("PRIVMSG Nat :secret")
    n.expect("message", text="secret")
    n.send(type="msg", to="Ian", text="secret back")
    n.expect("message", text="secret back")
    i.expect("PRIVMSG", "Ian", "secret back")
    i.send("CHATHISTORY LATEST Nat * 10")
    got = i.collect_until(lambda x: (x.command == "BATCH" and x.params[0].startswith("-")) or x.command == "FAIL")
    assert not [x for x in got if x.command == "PRIVMSG"], [describe(x) for x in got]


# --------------------------------------------------------------------------- /me


def test_ctcp_action_from_irc_is_a_native_action(doors: Doors) -> None:
    n, i = both_in(doors, "#r")
    i.send("PRIVMSG #r :\x01ACTION waves\x01")
    ev = n.expect("message", **{"from": "Ian"}, room="#r", text="waves")
    assert ev.get("action") is True, ev
    i.send("PRIVMSG Nat :\x01ACTION winks\x01")
    ev = n.expect("message", **{"from": "Ian"}, text="winks")
    assert ev.get("action") is True, ev
    i.send("PRIVMSG #r :plain")
    ev = n.expect("message", text="plain")
    assert "action" not in ev or ev["action"] is False, ev


def test_native_action_reaches_irc_as_ctcp_action(doors: Doors) -> None:
    n, i = both_in(doors, "#r")
    n.send(type="say", room="#r", text="dances", action=True)
    ev = n.expect("message", room="#r", text="dances")
    assert ev.get("action") is True, ev
    got = i.expect("PRIVMSG", "#r", "\x01ACTION dances\x01")
    assert source_nick(got) == "Nat"
    n.send(type="msg", to="Ian", text="bows", action=True)
    n.expect("message", text="bows")
    i.expect("PRIVMSG", "Ian", "\x01ACTION bows\x01")
