"""The IRC door's wire formats: chat events as IRC lines, encoded once per format.

IRC clients differ in what a shared line looks like only by five capabilities (FORMAT_CAPS):
`server-time` (a `time` tag), `message-tags` (`msgid` and client tags), `account-tag` (the
sender's `account`), `extended-join` (JOIN with account and real name) and `account-notify`
(ACCOUNT lines at all). Every IRC session points at the format its capabilities select (made
when first asked for: a handful are in use in practice); the fan-out encodes an event once per
format in use and queues the same bytes for all its sessions.

A native text may hold newlines and be longer than IRC allows: it becomes one PRIVMSG per
line, each cut at character boundaries so that no line exceeds 512 bytes (tags aside, which
IRCv3 counts separately). Nothing is lost.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

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


# The capabilities that change what a shared line looks like, in the order of a format's key.
FORMAT_CAPS = ("server-time", "message-tags", "account-tag", "extended-join", "account-notify")


class IrcWire:
    """One shared format: what the capabilities of FORMAT_CAPS make of an event; `server` is
    the server's own name, the source of its lines."""

    __slots__ = ("server", "time", "msgid", "account", "extended_join", "account_notify")

    def __init__(self, server: str, with_time: bool, with_msgid: bool, account: bool = False,
                 extended_join: bool = False, account_notify: bool = False) -> None:
        self.server = server
        self.time = with_time
        self.msgid = with_msgid
        self.account = account  # account-tag: the sender's account on its messages
        self.extended_join = extended_join  # JOIN carries the account and the real name
        self.account_notify = account_notify  # ACCOUNT lines when someone logs in

    def tags(self, msg: events.Message, extra: str = "") -> str:
        parts = []
        if extra:
            parts.append(extra)
        if self.msgid:
            parts.append(f"msgid={msg.id}")
            if msg.client_tags:
                parts.append(client_tag_text(msg.client_tags))
        if self.account and msg.account:
            parts.append(f"account={escape_tag_value(msg.account)}")
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
        line = self.line(event)
        return [(line + "\r\n").encode("utf-8", "replace")] if line else []

    def line(self, event: events.Event) -> str:
        """The one line (without CRLF) an event other than a message is, or "" for none."""
        kind = type(event)
        if kind is events.Join:
            source = _source(event.nick, event.userhost)  # type: ignore[union-attr]
            if self.extended_join:
                return (f":{source} JOIN {event.room} {event.account or '*'} "  # type: ignore[union-attr]
                        f":{event.realname or event.nick}")  # type: ignore[union-attr]
            return f":{source} JOIN {event.room}"  # type: ignore[union-attr]
        if kind is events.Part:
            reason = f" :{_one_line(event.reason)}" if event.reason else ""  # type: ignore[union-attr]
            return f":{_source(event.nick, event.userhost)} PART {event.room}{reason}"  # type: ignore[union-attr]
        if kind is events.Quit:
            return f":{_source(event.nick, event.userhost)} QUIT :{_one_line(event.reason)}"  # type: ignore[union-attr]
        if kind is events.NickChange:
            if event.old == event.new:  # type: ignore[union-attr]
                return ""
            return f":{_source(event.old, event.userhost)} NICK {event.new}"  # type: ignore[union-attr]
        if kind is events.Notice:
            return f":{self.server} NOTICE * :{_one_line(event.text)}"  # type: ignore[union-attr]
        if kind is events.Signal:
            return self.signal(event).decode("utf-8").rstrip("\r\n")  # type: ignore[arg-type]
        if kind is events.Topic:
            return f":{event.by} TOPIC {event.room} :{_one_line(event.text, 400)}"  # type: ignore[union-attr]
        if kind is events.Kick:
            return (f":{_source(event.by, event.userhost)} KICK {event.room} {event.nick} "  # type: ignore[union-attr]
                    f":{_one_line(event.reason)}")  # type: ignore[union-attr]
        if kind is events.Invite:
            invitee = event.to or event.nick or "*"  # type: ignore[union-attr]
            return f":{_source(event.by, event.userhost)} INVITE {invitee} {event.room}"  # type: ignore[union-attr]
        if kind is events.ModeChange:
            text = mode_text(event.changes)  # type: ignore[union-attr]
            if not text:
                return ""
            source = _source(event.by, event.userhost)  # type: ignore[union-attr]
            return f":{source} MODE {event.room} {text}"  # type: ignore[union-attr]
        if kind is events.AccountChange:
            if not self.account_notify:
                return ""
            source = _source(event.nick, event.userhost)  # type: ignore[union-attr]
            return f":{source} ACCOUNT {event.account or '*'}"  # type: ignore[union-attr]
        return ""

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
        return f"@{';'.join(parts)} :{source} TAGMSG {target}\r\n".encode("utf-8")


# IRC's letters for the contract's modes (docs/irc.md), and `n` (no messages from outside).
FLAG_LETTERS = {"moderated": "m", "invite_only": "i", "topic_locked": "t", "secret": "s",
                "no_external": "n"}
LIST_LETTERS = {"op": ("+", "o"), "deop": ("-", "o"), "voice": ("+", "v"),
                "devoice": ("-", "v"), "ban": ("+", "b"), "unban": ("-", "b")}


def mode_text(changes: Sequence[Tuple[str, object]]) -> str:
    """A ModeChange's changes as IRC's mode string and arguments: `+mk-o key nick`."""
    letters: List[str] = []
    args: List[str] = []
    sign = ""

    def put(new_sign: str, letter: str, arg: Optional[str] = None) -> None:
        nonlocal sign
        if new_sign != sign:
            letters.append(new_sign)
            sign = new_sign
        letters.append(letter)
        if arg is not None:
            args.append(arg)

    for name, value in changes:
        if name in FLAG_LETTERS:
            put("+" if value else "-", FLAG_LETTERS[name])
        elif name == "key":
            if value is None:
                put("-", "k", "*")
            else:
                put("+", "k", str(value))
        elif name == "limit":
            if value is None:
                put("-", "l")
            else:
                put("+", "l", str(value))
        elif name in LIST_LETTERS:
            plus, letter = LIST_LETTERS[name]
            for item in value:  # type: ignore[attr-defined]
                put(plus, letter, ban_display(item) if letter == "b" else str(item))
    if not letters:
        return ""
    text = "".join(letters)
    if args:
        text += " " + " ".join(args)  # nicks, masks and keys hold no spaces
    return text


def ban_display(mask: str) -> str:
    """A ban as IRC shows it: an account mask in the `$a:` form IRC servers use."""
    return "$a:" + mask[8:] if mask.startswith("account:") else mask


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
    """The formats of one server, made as sessions ask for them (at most 2 ** 5)."""

    __slots__ = ("_server", "_wires")

    def __init__(self, server: str) -> None:
        self._server = server
        self._wires: Dict[Tuple[bool, ...], IrcWire] = {}

    def get(self, with_time: bool, with_msgid: bool, account: bool = False,
            extended_join: bool = False, account_notify: bool = False) -> IrcWire:
        key = (with_time, with_msgid, account, extended_join, account_notify)
        wire = self._wires.get(key)
        if wire is None:
            wire = self._wires[key] = IrcWire(self._server, *key)
        return wire

    def for_caps(self, caps: Set[str]) -> IrcWire:
        return self.get(*(cap in caps for cap in FORMAT_CAPS))


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
