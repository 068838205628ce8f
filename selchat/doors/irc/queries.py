"""Commands that ask about users and the server, and the connection's own ones.

WHO, WHOIS, USERHOST, ISON, LUSERS, MOTD, AWAY; PING, PONG, QUIT. Everything they read comes
from the hub's queries for doors; AWAY is set through the hub.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable, List, Optional

from selchat import __version__
from selchat.core.names import has_control_characters
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import Line, body_budget
from selchat.doors.irc.text import split_for_irc, strip_formatting
from selchat.hub import ChatError

if TYPE_CHECKING:
    from selchat.core.chat import Room, User
    from selchat.doors.irc.session import IrcSession

WHO_MAX = 200  # users one WHO with a mask may list
REALNAME_MAX = 100  # bytes of a real name (as USER keeps it)
ERR_TOOMANYMATCHES = 416  # an answer cut short (hybrid, ratbox: "output too large, truncated")
RPL_WHOISOPERATOR = 313
RPL_WHOISBOT = 335
RPL_WHOWASUSER = 314
RPL_ENDOFWHOWAS = 369
ERR_WASNOSUCHNICK = 406
WHOWAS_MAX = 20  # entries one WHOWAS lists at most
RPL_INFO = 371
RPL_ENDOFINFO = 374
RPL_TIME = 391
RPL_WHOISACCOUNT = 330


def prefix(room: "Room", user: "User", multi: bool = False) -> str:
    """`@` for an operator, `+` for a voiced member; both with multi-prefix."""
    op = "@" if user in room.operators else ""
    voice = "+" if user in room.voiced else ""
    return op + voice if multi else (op or voice)


# --- the connection -------------------------------------------------------------------------


def ping(s: "IrcSession", line: Line) -> None:
    if not line.params:
        s.numeric(N.ERR_NOORIGIN, "No origin specified")
        return
    server = s.server
    token = line.params[-1]
    # Echoed after our name twice, a token as long as the client's line allows would make
    # our line longer than 512 bytes: it is cut to fit (at a character boundary).
    budget = body_budget("PONG", server, source=server)
    if len(token) > budget // 4:
        data = token.encode("utf-8", "replace")
        if len(data) > budget:
            token = data[:budget].decode("utf-8", "ignore")
    s.send_line(f":{server} PONG {server} :{token}")


def pong(s: "IrcSession", line: Line) -> None:
    pass  # the liveness it proves was noted when its bytes arrived


def quit(s: "IrcSession", line: Line) -> None:
    reason = strip_formatting(line.params[0]) if line.params else ""
    if has_control_characters(reason) or not reason.strip():
        reason = "quit"
    s.error(f"Closing link: {reason}")
    s.close(reason if s.user is not None else None, f"quit: {reason}")


# --- users ------------------------------------------------------------------------------------


def visible_room(s: "IrcSession", name: str) -> "Optional[Room]":
    """The room `name` as this connection may know it: a secret room it is not in is, to
    it, a room that does not exist (403), whatever it asks of it (JOIN aside)."""
    room = s.hub.find_room(name)
    return room if room is not None and s.hub.may_see(s.user, room) else None


def who(s: "IrcSession", line: Line) -> None:
    mask = (line.params[0].split() or ["*"])[0] if line.params else "*"
    hub = s.hub
    server = s.server
    rows: Iterable[tuple] = []
    if mask.startswith("#"):
        room = visible_room(s, mask)
        if room is not None:
            rows = ((room, u) for u in room.members)
    else:
        matched: List[tuple] = []
        rows = matched
        if any(ch in mask for ch in "*?"):
            # Matched against every user: the CPU it takes grows with the server, and is
            # billed (the output alone would not show it).
            started = time.thread_time()
            found = [u for u in hub.users_matching(mask, WHO_MAX) if _visible(s, u)]
            s.bill_cpu(time.thread_time() - started)
        else:
            u = hub.find_user(mask)
            found = [u] if u is not None else []
        for u in found:
            # The channel field names a room the asker may see (a secret one only to members).
            shown = next((r for r in u.rooms.values() if hub.may_see(s.user, r)), None)
            matched.append((shown, u))
    fields, token = _whox(line.params[1] if len(line.params) > 1 else "")
    limit = s.answer_limit()  # as for NAMES: cut, never dropped
    multi = "multi-prefix" in s.caps
    for room, u in rows:
        flags = (("G" if u.away else "H") + ("*" if hub.is_server_operator(u) else "")
                 + ("B" if _is_bot(u) else "")
                 + (prefix(room, u, multi) if room is not None else ""))
        channel = room.name if room is not None else "*"
        if fields is None:
            text = (f":{server} 352 {s.me} {channel} {u.ident} {u.host} {server} {u.nick} "
                    f"{flags} :0 {u.realname}")
        else:
            text = _whox_line(s, fields, token, channel, u, flags)
        if s.produced + len(text) + 2 > limit:
            s.numeric(ERR_TOOMANYMATCHES, "WHO", "Output too large, truncated")
            break
        s.send_line(text)
    s.numeric(N.RPL_ENDOFWHO, mask[:64], "End of /WHO list")


WHOX_ORDER = "tcuihsnfdlaor"  # IRCv3 WHOX: the fields come in this order, whatever was asked


def _whox(text: str) -> "tuple":
    """WHO's second parameter `%fields[,token]`: (fields in reply order, token), or (None, "")."""
    if not text.startswith("%"):
        return None, ""
    wanted, _, token = text[1:].partition(",")
    return "".join(c for c in WHOX_ORDER if c in wanted), token[:3] if token.isdigit() else ""


def _whox_line(s: "IrcSession", fields: str, token: str, channel: str, u: "User",
               flags: str) -> str:
    values = {
        "t": token or "0", "c": channel, "u": u.ident, "i": "255.255.255.255", "h": u.host,
        "s": s.server, "n": u.nick, "f": flags, "d": "0",
        "l": "0",  # idle time is not kept
        "a": u.account or "0", "o": "n/a",
    }
    parts = [values[c] for c in fields if c != "r"]
    if "r" in fields:
        parts.append(":" + u.realname)
    elif parts and (not parts[-1] or parts[-1].startswith(":") or " " in parts[-1]):
        parts[-1] = ":" + parts[-1]
    return f":{s.server} 354 {s.me} " + " ".join(parts)


def _is_bot(u: "User") -> bool:
    return any(getattr(session, "bot", False) for session in u.sessions)


def _visible(s: "IrcSession", u: "User") -> bool:
    """A user who set +i is listed by a mask only to those who share a room with it."""
    if not any(getattr(session, "invisible", False) for session in u.sessions):
        return True
    asker = s.user
    return asker is u or (asker is not None and any(asker in r.members for r in u.rooms.values()))


def whois(s: "IrcSession", line: Line) -> None:
    if not line.params:
        s.numeric(N.ERR_NONICKNAMEGIVEN, "No nickname given")
        return
    nick = (line.params[-1].split() or ["*"])[0]
    u = s.hub.find_user(nick)
    if u is None:
        s.numeric(N.ERR_NOSUCHNICK, nick[:64], "No such nick/channel")
        s.numeric(N.RPL_ENDOFWHOIS, nick[:64], "End of /WHOIS list")
        return
    s.numeric(N.RPL_WHOISUSER, u.nick, u.ident, u.host, "*", u.realname)
    asker = s.user
    multi = "multi-prefix" in s.caps
    shown = [r for r in u.rooms.values()
             if not r.flags["secret"] or (asker is not None and asker in r.members)]
    if shown:
        names = " ".join(prefix(r, u, multi) + r.name for r in shown)
        s.numeric(N.RPL_WHOISCHANNELS, u.nick, names)
    s.numeric(N.RPL_WHOISSERVER, u.nick, s.server, "selchat")
    if s.hub.is_server_operator(u):
        s.numeric(RPL_WHOISOPERATOR, u.nick, "is an IRC operator")
    if u.account is not None:
        s.numeric(RPL_WHOISACCOUNT, u.nick, u.account, "is logged in as")
    if _is_bot(u):
        s.numeric(RPL_WHOISBOT, u.nick, "is a bot")
    if u.away:
        s.numeric(N.RPL_AWAY, u.nick, u.away)
    s.numeric(N.RPL_ENDOFWHOIS, u.nick, "End of /WHOIS list")


def whowas(s: "IrcSession", line: Line) -> None:
    """Who had a nick (the core remembers the last WHOWAS_KEPT who left or changed nick)."""
    if not line.params or not line.params[0]:
        s.numeric(N.ERR_NONICKNAMEGIVEN, "No nickname given")
        return
    nick = line.params[0].split(",")[0]
    count_text = line.params[1] if len(line.params) > 1 else ""
    count = int(count_text) if count_text.isascii() and count_text.isdigit() else 0
    found = s.hub.whowas(nick, min(count, WHOWAS_MAX) if count > 0 else WHOWAS_MAX)
    if not found:
        s.numeric(ERR_WASNOSUCHNICK, nick[:64], "There was no such nickname")
    for was_nick, ident, host, realname in found:
        s.numeric(RPL_WHOWASUSER, was_nick, ident, host, "*", realname)
        s.numeric(N.RPL_WHOISSERVER, was_nick, s.server, "selchat")
    s.numeric(RPL_ENDOFWHOWAS, nick[:64], "End of WHOWAS")


def userhost(s: "IrcSession", line: Line) -> None:
    replies = []
    for nick in line.params[:5]:
        u = s.hub.find_user(nick)
        if u is not None:
            replies.append(f"{u.nick}={'-' if u.away else '+'}{u.userhost}")
    s.numeric(N.RPL_USERHOST, " ".join(replies))


def ison(s: "IrcSession", line: Line) -> None:
    found = (s.hub.find_user(n) for n in " ".join(line.params).split())
    s.numeric(N.RPL_ISON, " ".join(u.nick for u in found if u is not None))


def away(s: "IrcSession", line: Line) -> None:
    user = s.user
    assert user is not None
    text = strip_formatting(line.params[0]) if line.params else ""
    try:
        if text and not has_control_characters(text):
            later = s.hub.set_away(user, text[:390], s)
            s.numeric(N.RPL_NOWAWAY, "You have been marked as being away")
        else:
            later = s.hub.set_away(user, None, s)
            s.numeric(N.RPL_UNAWAY, "You are no longer marked as being away")
        if later:
            s.wait_for_job()  # (the cluster orders it: what comes next sees it applied)
    except ChatError as exc:  # (with --redis, while the cluster cannot take it)
        s.fail("AWAY", "TEMPORARILY_UNAVAILABLE", text=f"Cannot set away now: {exc.message}")
        return
    tell_away(s, user, s.hub.room_mates(user), watchers=True)


def setname(s: "IrcSession", line: Line) -> None:
    """IRCv3 setname: a new real name, told to the IRC connections that took `setname`."""
    user = s.user
    assert user is not None
    text = strip_formatting(line.params[0])
    if not text.strip() or has_control_characters(text) or len(text.encode("utf-8")) > REALNAME_MAX:
        s.fail("SETNAME", "INVALID_REALNAME", text="Bad real name")
        return
    try:
        if s.hub.set_realname(user, text, s):
            s.wait_for_job()
    except ChatError as exc:  # (with --redis, while the cluster cannot take it)
        s.fail("SETNAME", "TEMPORARILY_UNAVAILABLE", text=f"Cannot change it now: {exc.message}")
        return
    data = f":{user.nick}!{user.userhost} SETNAME :{text}\r\n".encode("utf-8")
    if "setname" in s.caps:
        s.answer_lines(data)
    told = {s}
    for mate in s.hub.room_mates(user) + [user]:
        for session in mate.sessions:
            if session not in told and "setname" in getattr(session, "caps", ()):
                told.add(session)
                session.raw(data)
    for session in s.door.watchers.by_nick.get(user.key, ()):
        if session not in told and "extended-monitor" in session.caps and "setname" in session.caps:
            session.raw(data)


def tell_away(s: "IrcSession", user: "User", mates: Iterable["User"], watchers: bool) -> None:
    """away-notify: `AWAY [:text]` from `user` to IRC connections of `mates` that took it,
    and (extended-monitor) to those that watch the nick. Away is IRC's alone (the native
    doors do not show it), so the IRC door tells its own connections."""
    line = f":{user.nick}!{user.userhost} AWAY" + (f" :{user.away}" if user.away else "")
    data = (line + "\r\n").encode("utf-8", "replace")
    told = set()
    for mate in mates:
        for session in mate.sessions:
            if "away-notify" in getattr(session, "caps", ()) and session is not s:
                told.add(session)
                session.raw(data)
    if watchers:
        for session in s.door.watchers.by_nick.get(user.key, ()):
            if (session not in told and "extended-monitor" in session.caps
                    and "away-notify" in session.caps):
                session.raw(data)


# --- the server -------------------------------------------------------------------------------


def motd(s: "IrcSession", line: Line) -> None:
    send_motd(s)


def send_motd(s: "IrcSession") -> None:
    text = s.hub.motd
    if not text:
        s.numeric(N.ERR_NOMOTD, "MOTD File is missing")
        return
    s.numeric(N.RPL_MOTDSTART, f"- {s.server} Message of the day - ")
    for row in text.split("\n"):
        for part in split_for_irc(row, 400) or [""]:
            s.numeric(N.RPL_MOTD, f"- {part}")
    s.numeric(N.RPL_ENDOFMOTD, "End of /MOTD command.")


def info(s: "IrcSession", line: Line) -> None:
    s.numeric(RPL_INFO, f"selchat {__version__}: one thread, one selectors loop, three doors")
    s.numeric(RPL_INFO, f"This server was started {s.door.created}")
    s.numeric(RPL_ENDOFINFO, "End of /INFO list")


def time_(s: "IrcSession", line: Line) -> None:
    now = time.time()
    text = time.strftime("%A %B %d %Y -- %H:%M:%S UTC", time.gmtime(now))
    s.numeric(RPL_TIME, s.server, str(int(now)), "0", text)


def lusers(s: "IrcSession", line: Line) -> None:
    send_lusers(s)


def send_lusers(s: "IrcSession") -> None:
    users = s.hub.user_count()
    rooms = s.hub.formed_room_count()
    peak = s.door.peak_users = max(s.door.peak_users, users)
    s.numeric(N.RPL_LUSERCLIENT, f"There are {users} users and 0 invisible on 1 servers")
    s.numeric(N.RPL_LUSEROP, str(s.hub.operator_count()), "operator(s) online")
    s.numeric(N.RPL_LUSERCHANNELS, str(rooms), "channels formed")
    s.numeric(N.RPL_LUSERME, f"I have {users} clients and 0 servers")
    s.numeric(N.RPL_LOCALUSERS, str(users), str(peak), f"Current local users {users}, max {peak}")
    s.numeric(N.RPL_GLOBALUSERS, str(users), str(peak), f"Current global users {users}, max {peak}")
