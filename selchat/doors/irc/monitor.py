"""IRCv3 MONITOR: tell a client when the nicks it watches come and go.

`MONITOR + a,b` / `- a` / `C` / `L` / `S`, with 730 (online), 731 (offline), 732/733 (the
list) and 734 (the list is full). The core tells the hub when a nick comes or goes, whichever
door the user came by (`Hub.watch_presence`); the door keeps who watches which nick, bounded
per connection (MONLIST), and drops a connection's entries when it goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Set

from selchat.core.names import fold, valid_nick
from selchat.doors.irc.parser import Line

if TYPE_CHECKING:
    from selchat.core.chat import User
    from selchat.doors.irc.session import IrcSession

MONLIST = 100  # nicks one connection may watch (ISUPPORT MONITOR)
RPL_MONONLINE = 730
RPL_MONOFFLINE = 731
RPL_MONLIST = 732
RPL_ENDOFMONLIST = 733
ERR_MONLISTFULL = 734


class Watchers:
    """Which connections watch which nick (folded), and the other way round."""

    __slots__ = ("by_nick",)

    def __init__(self) -> None:
        self.by_nick: Dict[str, Set["IrcSession"]] = {}

    def add(self, session: "IrcSession", key: str) -> None:
        self.by_nick.setdefault(key, set()).add(session)
        session.monitoring[key] = None

    def remove(self, session: "IrcSession", key: str) -> None:
        session.monitoring.pop(key, None)
        watching = self.by_nick.get(key)
        if watching is not None:
            watching.discard(session)
            if not watching:
                del self.by_nick[key]

    def clear(self, session: "IrcSession") -> None:
        for key in list(session.monitoring):
            self.remove(session, key)

    def changed(self, nick: str, user: Optional["User"]) -> None:
        """The core says `nick` came (`user`) or went (None): tell whoever watches it."""
        watching = self.by_nick.get(fold(nick))
        if not watching:
            return
        for session in list(watching):
            if user is not None:
                session.numeric(RPL_MONONLINE, f"{user.nick}!{user.userhost}")
            else:
                session.numeric(RPL_MONOFFLINE, nick)


def monitor(s: "IrcSession", line: Line) -> None:
    sub = line.params[0]
    watchers: Watchers = s.door.watchers
    if sub == "+":
        if len(line.params) < 2:
            return
        online: List[str] = []
        offline: List[str] = []
        for nick in _nicks(line.params[1]):
            key = fold(nick)
            if key in s.monitoring:
                continue
            if len(s.monitoring) >= MONLIST:
                s.numeric(ERR_MONLISTFULL, str(MONLIST), nick, "Monitor list is full")
                break
            watchers.add(s, key)
            user = s.hub.find_user(nick)
            if user is not None:
                online.append(f"{user.nick}!{user.userhost}")
            else:
                offline.append(nick)
        _send(s, RPL_MONONLINE, online)
        _send(s, RPL_MONOFFLINE, offline)
    elif sub == "-":
        if len(line.params) > 1:
            for nick in _nicks(line.params[1]):
                watchers.remove(s, fold(nick))
    elif sub.upper() == "C":
        watchers.clear(s)
    elif sub.upper() == "L":
        _send(s, RPL_MONLIST, list(s.monitoring))
        s.numeric(RPL_ENDOFMONLIST, "End of MONITOR list")
    elif sub.upper() == "S":
        online, offline = [], []
        for key in s.monitoring:
            user = s.hub.find_user(key)
            if user is not None:
                online.append(f"{user.nick}!{user.userhost}")
            else:
                offline.append(key)
        _send(s, RPL_MONONLINE, online)
        _send(s, RPL_MONOFFLINE, offline)


def _nicks(text: str) -> Iterable[str]:
    return (n for n in text.split(",") if n and valid_nick(n))


def _send(s: "IrcSession", code: int, items: List[str]) -> None:
    """Items in as few lines as fit (a comma-separated list each)."""
    line: List[str] = []
    size = 0
    for item in items:
        if line and size + len(item) + 1 > 400:
            s.numeric(code, ",".join(line))
            line, size = [], 0
        line.append(item)
        size += len(item) + 1
    if line:
        s.numeric(code, ",".join(line))
