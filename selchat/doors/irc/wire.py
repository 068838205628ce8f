"""The IRC door's wire formats: chat events as IRC lines, encoded once per format.

IRC clients differ in what a shared line looks like only by two capabilities: `server-time`
(a `time` tag) and `message-tags` (a `msgid` tag). So there are four formats, and every IRC
session points at the one its capabilities select; the fan-out encodes a room message once
per format in use and queues the same bytes for all its sessions.

A native text may hold newlines and be longer than IRC allows: it becomes one PRIVMSG per
line, each cut at character boundaries so that no line exceeds 512 bytes (tags aside, which
IRCv3 counts separately). Nothing is lost.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from selchat.core import events
from selchat.doors.irc.parser import escape_tag_value
from selchat.doors.irc.text import split_for_irc

LINE_MAX = 510  # bytes of a line without its CRLF (RFC 1459)


def iso_time(ms: int) -> str:
    """The `time` tag of IRCv3 server-time: UTC, millisecond precision."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def message_lines(msg: events.Message, tags: str, source: str, target: str) -> bytes:
    """One message as its PRIVMSG (or NOTICE) lines; `tags` is "" or "@k=v;... "."""
    command = "NOTICE" if msg.notice else "PRIVMSG"
    rest = f":{source} {command} {target} :"
    text = msg.text
    action = msg.action
    budget = LINE_MAX - len(rest.encode("utf-8"))
    if action:
        budget -= 9  # "\x01ACTION " and the closing "\x01"
    if not action and "\n" not in text and "\t" not in text and len(text) * 4 <= budget:
        return (tags + rest + text + "\r\n").encode("utf-8")
    # A tab shows as garbage in most IRC clients: a space instead. A text of several lines
    # becomes one line each. Every line gets an msgid of its own (a msgid names one IRC
    # message, and a client may drop a repeated one): the first the message's id N, the
    # next N.1, N.2, ... (CHATHISTORY takes either as a reference to message N).
    parts = split_for_irc(text.replace("\t", " "), max(budget, 16))
    out = []
    for i, part in enumerate(parts):
        out.append((tags if i == 0 else continuation_tags(tags, msg.id, i)) + rest
                   + ("\x01ACTION " + part + "\x01" if action else part) + "\r\n")
    return "".join(out).encode("utf-8")


def continuation_tags(tags: str, message_id: int, part: int) -> str:
    """The tags of line `part` (1, 2, ...) of a message: its msgid is N.part."""
    return tags.replace(f"msgid={message_id}", f"msgid={message_id}.{part}", 1) if tags else tags


class IrcWire:
    """One of the four shared formats; `server` is the server's own name, the source of its lines."""

    __slots__ = ("server", "time", "msgid")

    def __init__(self, server: str, with_time: bool, with_msgid: bool) -> None:
        self.server = server
        self.time = with_time
        self.msgid = with_msgid

    def tags(self, msg: events.Message, extra: str = "") -> str:
        parts = []
        if extra:
            parts.append(extra)
        if self.msgid:
            parts.append(f"msgid={msg.id}")
            if msg.client_tags:
                parts.append(client_tag_text(msg.client_tags))
        if self.time:
            parts.append(f"time={iso_time(msg.ts)}")
        return "@" + ";".join(parts) + " " if parts else ""

    def message(self, msg: events.Message, extra_tags: str = "") -> bytes:
        source = f"{msg.sender}!{msg.userhost}" if msg.userhost else msg.sender
        target = msg.room if msg.room is not None else msg.to
        return message_lines(msg, self.tags(msg, extra_tags), source, target or "*")

    def encode(self, event: events.Event) -> List[bytes]:
        kind = type(event)
        if kind is events.Message:
            return [self.message(event)]  # type: ignore[arg-type]
        if kind is events.Join:
            return [f":{_source(event.nick, event.userhost)} JOIN {event.room}\r\n".encode()]  # type: ignore[union-attr]
        if kind is events.Part:
            reason = f" :{_one_line(event.reason)}" if event.reason else ""  # type: ignore[union-attr]
            return [f":{_source(event.nick, event.userhost)} PART {event.room}{reason}\r\n".encode()]  # type: ignore[union-attr]
        if kind is events.Quit:
            return [f":{_source(event.nick, event.userhost)} QUIT :{_one_line(event.reason)}\r\n".encode()]  # type: ignore[union-attr]
        if kind is events.NickChange:
            return [f":{_source(event.old, event.userhost)} NICK {event.new}\r\n".encode()]  # type: ignore[union-attr]
        if kind is events.Notice:
            return [f":{self.server} NOTICE * :{_one_line(event.text)}\r\n".encode()]  # type: ignore[union-attr]
        if kind is events.Signal:
            line = self.signal(event)  # type: ignore[arg-type]
            return [line] if line else []
        return []

    def signal(self, event: events.Signal, extra: str = "") -> bytes:
        """TAGMSG: only to clients that take message tags (the others would see nothing)."""
        if not self.msgid:
            return b""
        parts = [extra] if extra else []
        parts.append(f"msgid={event.tag_id}")
        if event.client_tags:
            parts.append(client_tag_text(event.client_tags))
        target = event.room if event.room is not None else event.to
        source = _source(event.sender, event.userhost)
        return f"@{';'.join(parts)} :{source} TAGMSG {target}\r\n".encode("utf-8")  # answers (names, history, ...) are per session: see IrcSession.reply


def client_tag_text(tags: Tuple[Tuple[str, str], ...]) -> str:
    return ";".join(f"{k}={escape_tag_value(v)}" if v else k for k, v in tags)


def _source(nick: str, userhost: str) -> str:
    return f"{nick}!{userhost}" if userhost else nick


def _one_line(text: str, limit: int = 300) -> str:
    """A reason or notice as one line of at most `limit` bytes, cut at a character boundary."""
    line = " ".join(text.split("\n"))
    data = line.encode("utf-8")
    if len(data) <= limit:
        return line
    return data[:limit].decode("utf-8", "ignore")


class WireSet:
    """The four formats of one server, made once."""

    __slots__ = ("_wires",)

    def __init__(self, server: str) -> None:
        self._wires: Dict[Tuple[bool, bool], IrcWire] = {
            (t, m): IrcWire(server, t, m) for t in (False, True) for m in (False, True)
        }

    def get(self, with_time: bool, with_msgid: bool) -> IrcWire:
        return self._wires[(with_time, with_msgid)]


def parse_time(text: str) -> Optional[int]:
    """A `timestamp=` reference of CHATHISTORY (ISO 8601, UTC) in ms, or None if malformed."""
    import calendar

    value = text[:-1] if text.endswith("Z") else text
    frac = 0
    if "." in value:
        value, _, digits = value.partition(".")
        if not (digits.isascii() and digits.isdigit()):
            return None
        frac = int((digits + "000")[:3])
    try:
        parsed = time.strptime(value, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return calendar.timegm(parsed) * 1000 + frac
