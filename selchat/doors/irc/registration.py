"""Registration commands (CAP, PASS, NICK, USER) and the welcome burst.

The handlers parse and report to the connection's state machine (`state.Registration`); once
it says READY, `register` checks the server password, waits for the address's turn (the hub's
pacer) and asks the hub to register the nick.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from selchat import __version__
from selchat.core.names import valid_nick
from selchat.core.requests import ChangeNick
from selchat.defaults import NICK_MAX
from selchat.doors.base import password_matches
from selchat.doors.irc import accounts, queries
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import Line
from selchat.doors.irc.text import strip_formatting
from selchat.hub import ChatError
from selchat.loop.transport import State

if TYPE_CHECKING:
    from selchat.core.chat import User
    from selchat.doors.irc.session import IrcSession

log = logging.getLogger("selchat.server")

HOST = "irc.selchat"  # the host part every IRC user shows (addresses are never shown)
CAPS = ("message-tags", "server-time", "echo-message", "batch", "labeled-response",
        "multi-prefix", "userhost-in-names", "draft/chathistory", "cap-notify", "sasl",
        "draft/account-registration", "account-notify", "account-tag", "extended-join",
        "draft/read-marker", "away-notify", "extended-monitor", "setname")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def cap(s: "IrcSession", line: Line) -> None:
    params = line.params
    sub = params[0].upper()
    server = s.server
    reg = s.reg
    if sub == "LS":
        version = int(params[1]) if len(params) > 1 and _digits(params[1]) else 0
        reg.cap_started(version)
        offered = " ".join(_offered(version))
        s.send_line(f":{server} CAP {s.me} LS :{offered}")
    elif sub == "LIST":
        s.send_line(f":{server} CAP {s.me} LIST :{' '.join(sorted(s.caps))}")
    elif sub == "REQ":
        reg.cap_started()
        wanted = params[1].split() if len(params) > 1 else []
        ok = all(c.lstrip("-") in CAPS for c in wanted)
        if ok:
            for c in wanted:
                if c.startswith("-"):
                    s.caps.discard(c[1:])
                else:
                    s.caps.add(c)
            s.wire = s.door.wires.for_caps(s.caps)
        verdict = "ACK" if ok else "NAK"
        s.send_line(f":{server} CAP {s.me} {verdict} :{' '.join(wanted)}")
    elif sub == "END":
        reg.cap_ended()
        register(s)
    else:
        s.numeric(N.ERR_INVALIDCAPCMD, params[0][:32], "Invalid CAP command")


def _offered(version: int) -> list:
    """What CAP LS lists: cap-notify from 302 on, and the account capabilities' values."""
    values = dict(v.partition("=")[::2] for v in accounts.caps_values(version))
    out = []
    for cap in CAPS:
        if cap == "cap-notify" and version < 302:
            continue
        value = values.get(cap)
        out.append(f"{cap}={value}" if value else cap)
    return out


def pass_(s: "IrcSession", line: Line) -> None:
    s.reg.password = line.params[0]


def nick(s: "IrcSession", line: Line) -> None:
    if not line.params or not line.params[0]:
        s.numeric(N.ERR_NONICKNAMEGIVEN, "No nickname given")
        return
    wanted = line.params[0]
    if not valid_nick(wanted):
        s.numeric(N.ERR_ERRONEUSNICKNAME, wanted[:NICK_MAX * 2], "Erroneous nickname")
        return
    user = s.user
    if user is None:
        # While CAP is being negotiated the client may still log in (SASL) to the account
        # that holds the nick, and become one more connection of it: judged at registration.
        if s.hub.find_user(wanted) is not None and not s.reg.negotiating:
            s.numeric(N.ERR_NICKNAMEINUSE, wanted, "Nickname is already in use")
            return
        s.reg.nick_given(wanted)
        register(s)
        return
    def refused(exc: ChatError) -> None:
        text = ("Nickname is reserved by an account" if exc.code == "nick_reserved"
                else "Nickname is already in use")
        s.numeric(N.ERR_NICKNAMEINUSE, wanted, text)

    s.ask(ChangeNick(wanted), refused=refused)


def user(s: "IrcSession", line: Line) -> None:
    if not line.params[0] or not line.params[3]:
        s.numeric(N.ERR_NEEDMOREPARAMS, "USER", "Not enough parameters")
        return
    ident = "".join(ch for ch in line.params[0] if ch.isalnum() or ch in "-_.")[:16] or "user"
    s.reg.user_given(ident, strip_formatting(line.params[3])[:100])
    register(s)


def register(s: "IrcSession") -> None:
    """Register once the state machine is READY: password, the address's turn, the hub."""
    if not s.reg.ready:
        return
    door = s.door
    if door.password is not None and not password_matches(door.password, s.reg.password):
        s.transport.log_info("bad password", "bad password from %s", s.transport.peer)
        s.numeric(N.ERR_PASSWDMISMATCH, "Password incorrect")
        s.error("Bad password")
        s.close(None, "bad password")
        return

    def refuse() -> None:
        s.error("Too many new connections from your address at once; try again soon")
        s.close(None, "too many waiting to register")

    if s._register_in_turn(lambda: _register_now(s), refuse):
        s.reg.turn_asked()  # the lines after this one are served from its turn


def _register_now(s: "IrcSession") -> None:
    reg = s.reg
    if s.user is not None or reg.nick is None or reg.ident is None:
        return
    s.welcoming = True
    details = {"account": s.account} if s.account is not None else {}
    later = False

    def done(user: Optional["User"], exc: Optional[ChatError]) -> None:
        s.welcoming = False
        if s.transport.state is State.OPEN:
            if user is None and exc.code == "unavailable":  # type: ignore[union-attr]
                # (with --redis, while the cluster cannot take it): not a nick problem, so no
                # 433 that would send the client off to another nick; NICK again retries.
                s.fail("NICK", "TEMPORARILY_UNAVAILABLE", reg.nick,
                       text=f"Cannot register now: {exc.message}")  # type: ignore[union-attr]
                reg.nick_refused()
            elif user is None:
                text = ("Nickname is reserved by an account: log in (SASL) to use it"
                        if exc.code == "nick_reserved" else "Nickname is already in use")  # type: ignore[union-attr]
                s.numeric(N.ERR_NICKNAMEINUSE, reg.nick, text)
                reg.nick_refused()
            else:
                s.user = user
                reg.registered_now()
                s.registered()
                log.info("registered: %s as %s (irc)", s.transport.peer, reg.nick)
        if later:
            s.job_done()  # the cluster ordered it: what came behind goes on

    later = s.hub.admit(reg.nick, s, None, done, join_lobby=False, ident=reg.ident,
                        host=HOST, realname=reg.realname, door="irc",
                        origin=s.transport.ip, **details)
    if later:
        s.wait_for_job()


def welcome(s: "IrcSession") -> None:
    """001-005, the LUSERS numerics and the MOTD: what a client waits for after USER."""
    door = s.door
    me = s.me
    s.numeric(N.RPL_WELCOME, f"Welcome to the selchat IRC gateway, {me}!{s.reg.ident}@{HOST}")
    s.numeric(N.RPL_YOURHOST, f"Your host is {door.server_name}, running selchat-{__version__}")
    s.numeric(N.RPL_CREATED, f"This server was created {door.created}")
    s.send_line(f":{door.server_name} 004 {me} {door.server_name} selchat-{__version__} i o")
    tokens = door.isupport
    for start in range(0, len(tokens), 12):
        s.numeric(N.RPL_ISUPPORT, *tokens[start:start + 12], "are supported by this server")
    queries.send_lusers(s)
    queries.send_motd(s)
