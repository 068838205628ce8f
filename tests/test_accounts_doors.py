"""Accounts and moderation across the three doors at once (PROTOCOL.md 11, 11.3): a reserved
nick at each door, one account on a native, an IRC and a web connection, a message sent from
IRC to an offline account read at the web door, and an IRC operator's kick seen by a native
and a web user. One server process with all three doors; real sockets."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import unique_nick, unique_room  # noqa: E402
from test_accounts import PASSWORD, SLOW, registered_account, welcomed  # noqa: E402
from test_irc_accounts import Env  # noqa: E402
from test_web_door import WsClient, web_port  # noqa: E402
from wire import Client  # noqa: E402

OPTIONS = ("--irc-port", "0", "--web-port", "0", "--rate", "0", "--max-per-ip", "0",
           "--register-rate", "0")


class Doors:
    def __init__(self, srv: Any) -> None:
        self.srv = srv
        self.irc = Env(srv)
        self.web_port = web_port(srv)
        self.web: List[WsClient] = []

    def ws(self) -> WsClient:
        c = WsClient(self.web_port)
        self.web.append(c)
        return c

    def close(self) -> None:
        self.irc.close()
        for c in self.web:
            c.close()


@pytest.fixture
def doors(start_server) -> Iterator[Doors]:
    d = Doors(start_server(*OPTIONS))
    yield d
    d.close()


def see(c: Client, type: str, **members: Any) -> dict:
    return c.wait_for(type, SLOW, **members)[0]


def test_a_reserved_nick_at_each_door(doors: Doors):
    nick = unique_nick("own")
    registered_account(doors.srv, nick).quit_and_close()
    native = doors.srv.client()
    native.send(type="hello", nick=nick)
    native.expect_error("nick_reserved")
    web = doors.ws()
    web.send(type="hello", nick=nick)
    web.expect_error("nick_reserved")
    irc = doors.irc.connect("irc")
    irc.send(f"NICK {nick}")
    irc.send("USER u 0 * :Real Name")
    line, _ = irc.wait_for("433")
    assert line.params[1] == nick


def test_one_account_on_a_native_an_irc_and_a_web_connection(doors: Doors):
    nick = unique_nick("tri")
    registered_account(doors.srv, nick).quit_and_close()
    friend = doors.srv.registered(unique_nick("fr"))
    native = doors.srv.client()
    native.send(type="hello", nick=nick, login={"account": nick, "password": PASSWORD})
    welcomed(native)
    see(friend, "join", nick=nick)
    irc = doors.irc.sasl(nick, nick, PASSWORD, caps=("echo-message",))
    web = doors.ws()
    web.send(type="hello", nick=unique_nick("w"), login={"account": nick, "password": PASSWORD})
    w = welcomed(web)
    assert w["nick"] == nick and w["account"] == nick
    # Still one user for the others: nobody saw two more arrive.
    friend.assert_quiet()
    # What the IRC connection says in the lobby reaches the native and web connections too.
    irc.send("JOIN #lobby")
    irc.wait_for("366")
    irc.send("PRIVMSG #lobby :said on irc")
    for c in (native, web, friend):
        got = see(c, "message", text="said on irc")
        assert got["from"] == nick
    # A private message to the nick reaches every connection, whatever its door.
    friend.send(type="msg", to=nick, text="to all of you")
    see(friend, "message", text="to all of you")  # its own echo
    see(native, "message", text="to all of you")
    see(web, "message", text="to all of you")
    irc.wait_for("PRIVMSG", nick, "to all of you")
    # The user quits for others only when the last connection goes.
    native.quit_and_close()
    web.quit_and_close()
    friend.assert_quiet()
    irc.send("QUIT :bye")
    see(friend, "quit", nick=nick)


def test_a_message_from_irc_to_an_offline_account_is_read_at_the_web_door(doors: Doors):
    away = unique_nick("away")
    registered_account(doors.srv, away).quit_and_close()
    sender = doors.irc.user(unique_nick("ircs"))
    sender.send(f"PRIVMSG {away} :left for you on irc")
    web = doors.ws()
    web.send(type="hello", nick=away, login={"account": away, "password": PASSWORD})
    welcomed(web)
    got = see(web, "history")
    assert got["with"] == sender.nick
    assert [m["text"] for m in got["messages"]] == ["left for you on irc"]


def test_an_irc_operators_kick_is_seen_by_a_native_and_a_web_user(doors: Doors):
    room = unique_room("k")
    op = doors.irc.user(unique_nick("ircop"))
    op.join(room)
    native = doors.srv.registered(unique_nick("nat"))
    native.send(type="join", room=room)
    see(native, "history", room=room)
    web = doors.ws()
    web.register(unique_nick("web"))
    web.send(type="join", room=room)
    see(web, "history", room=room)
    op.wait_for("JOIN")
    op.send(f"KICK {room} {web.nick} :not here")
    for c in (native, web):
        kick = see(c, "kick", room=room, nick=web.nick)
        assert kick["by"] == op.nick and kick["reason"] == "not here"
    web.send(type="say", room=room, text="still in?", ref="s")
    web.expect_error("not_in_room", ref="s")
