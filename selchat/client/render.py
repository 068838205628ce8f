"""Display items as styled fragments that are safe to put on a terminal.

Everything that came from the server is untrusted, including nicks, room names and reasons: a
buggy or hostile server could send escape sequences that rewrite the screen, retitle the window
or hide text. So every string is passed through `escape` before it becomes a fragment, and the
only control character this module ever emits itself is `\\n` between the lines of one item.
Members that are missing or of the wrong type are shown as best we can, never raised on.

Fragments are `(style, text)` pairs in prompt_toolkit's format; `plain` drops the styles for
script mode, so both modes show the same characters.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from typing import Any, Callable, List, Mapping, Optional, Tuple

from selchat.client.modes import describe_modes, describe_set
from selchat.client.session import Item

__all__ = [
    "PALETTE",
    "Fragments",
    "escape",
    "nick_colour",
    "render",
    "plain",
    "escape_json_line",
    "escape_text",
    "render_plain",
    "day_line",
]

Fragments = List[Tuple[str, str]]

# Named ANSI colours: they follow the user's terminal theme, so they stay readable on dark
# and light backgrounds alike. Grey and black/white are left out (time stamps and text use them).
PALETTE: Tuple[str, ...] = (
    "ansired",
    "ansigreen",
    "ansiyellow",
    "ansiblue",
    "ansimagenta",
    "ansicyan",
    "ansibrightred",
    "ansibrightgreen",
    "ansibrightyellow",
    "ansibrightblue",
    "ansibrightmagenta",
    "ansibrightcyan",
)

STYLE_TIME = "ansibrightblack"
STYLE_ROOM = "bold"
STYLE_STATUS = "ansibrightblack"
STYLE_ERROR = "ansired bold"
STYLE_NOTICE = "ansiyellow bold"
STYLE_EARLIER = "dim italic"
STYLE_LOCAL = "ansicyan"
STYLE_ACTION = "italic"  # an emote's text
STYLE_MENTION = "ansimagenta bold"  # a room message that names us
STYLE_DAY = "ansibrightblack bold"
STYLE_EVENT = "ansigreen"  # topic, kick, invite, mode, account: things that happened to a room

# C0, DEL and C1 controls; the line and paragraph separators, which some terminals and most
# text widgets treat as line breaks; and the bidirectional overrides and isolates, which can
# make a line read differently from what it says ("Trojan Source").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """Show every unsafe character as a visible escape (`\\x1b`, `\\u202e`); keep the rest."""
    return _UNSAFE.sub(_escape_char, text)


def escape_text(text: str) -> List[str]:
    """A message text as display lines: split on `\\n`, tabs expanded, the rest escaped."""
    return [escape(line.expandtabs(8)) for line in text.split("\n")]


def nick_colour(nick: str) -> str:
    """The same colour for the same nick on every run and every machine (CRC-32, not hash(),
    which Python randomizes per process), ignoring case as the server does."""
    return PALETTE[zlib.crc32(nick.lower().encode("utf-8", "replace")) % len(PALETTE)]


def _str(value: Any) -> str:
    """Any member as a string: the server promised strings, but we do not rely on it."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _clock(at: float, localtime: Callable[[float], time.struct_time]) -> str:
    try:
        return time.strftime("%H:%M", localtime(at))
    except (OverflowError, OSError, ValueError):
        return "--:--"


_CONTINUATION_MAX = 24  # continuation lines align under the text, up to this many columns in


def _with_body(head: Fragments, body: List[str], style: str) -> Fragments:
    """Append a possibly multi-line body; later lines are indented under the first."""
    indent = " " * min(_CONTINUATION_MAX, sum(len(t) for _, t in head))
    out = list(head)
    for i, line in enumerate(body):
        if i:
            out.append(("", "\n" + indent))
        out.append((style, line))
    return out


def _nick(value: Any, extra: str = "") -> Tuple[str, str]:
    nick = _str(value)
    return (f"{nick_colour(nick)} bold {extra}".strip(), escape(nick))


def day_line(at: float, localtime: Callable[[float], time.struct_time] = time.localtime) -> str:
    """The line between two days in a window: `--- Monday 7 December 2026 ---`."""
    try:
        t = localtime(at)
    except (OverflowError, OSError, ValueError):
        return "--- another day ---"
    return f"--- {time.strftime('%A', t)} {t.tm_mday} {time.strftime('%B %Y', t)} ---"


def render(
    item: Item,
    localtime: Callable[[float], time.struct_time] = time.localtime,
    clock: bool = True,
    windowed: bool = False,
    prefix: Callable[[Any, Any], str] = lambda room, nick: "",
) -> Fragments:
    """One item as styled fragments, without a trailing newline; `clock=False` leaves out the
    time column (script mode's local notes on stderr, which are not events). `windowed`: the
    item is shown in its room's or conversation's window, so a message leaves out where it was
    said; `prefix(room, nick)` gives the `@`/`+` of a member."""
    data = item.data if isinstance(item.data, Mapping) else {}
    dim = STYLE_EARLIER if item.earlier else ""
    head: Fragments = [(f"{STYLE_TIME} {dim}".strip(), _clock(item.at, localtime) + " ")] if clock else []
    kind = item.kind

    if kind == "message":
        return _message(head, data, dim, windowed, item.mention)
    if kind == "day":
        return [(STYLE_DAY, day_line(item.at, localtime))]
    if kind == "history":
        room = escape(_str(data.get("room")))
        if "room" not in data and "with" in data:
            partner = escape(_str(data.get("with")))
            if data.get("away") is True:
                count = data.get("count")
                return head + [(STYLE_NOTICE, f"-- {escape(_str(count))} messages from your conversation with {partner} while you were away --")]
            return head + [(f"{STYLE_STATUS} {dim}".strip(), f"-- earlier messages with {partner} --")]
        return head + [(f"{STYLE_STATUS} {dim}".strip(), f"-- earlier messages in {room} --")]
    if kind in ("join", "part"):
        verb = "joined" if kind == "join" else "left"
        out = head + [
            (STYLE_ROOM, escape(_str(data.get("room")))),
            (STYLE_STATUS, " * "),
            _nick(data.get("nick")),
            (STYLE_STATUS, f" {verb}"),
        ]
        account = data.get("account")
        if kind == "join" and isinstance(account, str) and account:
            out.append((STYLE_STATUS, f" (logged in as {escape(account)})"))
        return out
    if kind in ("topic", "kick", "invite", "mode", "account"):
        return _room_event(head, kind, data, localtime)
    if kind == "quit":
        reason = _str(data.get("reason"))
        line = head + [(STYLE_STATUS, "* "), _nick(data.get("nick")), (STYLE_STATUS, " quit")]
        if reason:
            return _with_body(line + [(STYLE_STATUS, " (")], escape_text(reason), STYLE_STATUS) + [
                (STYLE_STATUS, ")")
            ]
        return line
    if kind == "nick":
        return head + [
            (STYLE_STATUS, "* "),
            _nick(data.get("old")),
            (STYLE_STATUS, " is now "),
            _nick(data.get("new")),
        ]
    if kind == "names":
        nicks = data.get("nicks")
        nicks = nicks if isinstance(nicks, list) else []
        out = head + [
            (STYLE_ROOM, escape(_str(data.get("room")))),
            (STYLE_STATUS, f" * {len(nicks)} here:"),
        ]
        ops = _folded(data.get("operators"))
        voiced = _folded(data.get("voiced"))
        for n in nicks:
            key = _str(n).lower()
            mark = "@" if key in ops else "+" if key in voiced else prefix(data.get("room"), n)
            out += [("", " "), (STYLE_STATUS, mark), _nick(n)] if mark else [("", " "), _nick(n)]
        return out
    if kind == "rooms":
        rooms = data.get("rooms")
        rooms = rooms if isinstance(rooms, list) else []
        parts = []
        for r in rooms:
            r = r if isinstance(r, Mapping) else {}
            parts.append(f"{escape(_str(r.get('name')))} ({escape(_str(r.get('members')))})")
        return head + [(STYLE_STATUS, f"* {len(rooms)} rooms: "), ("", ", ".join(parts))]
    if kind == "welcome":
        out = head + [
            (STYLE_STATUS, "* welcome, "),
            _nick(data.get("nick")),
            (STYLE_STATUS, f" ({escape(_str(data.get('server')))})"),
        ]
        account = data.get("account")
        if isinstance(account, str) and account:
            out.append((STYLE_EVENT, f", logged in as {escape(account)}"))
        motd = _str(data.get("motd"))
        if motd:
            out = _with_body(out + [(STYLE_STATUS, ": ")], escape_text(motd), "")
        return out
    if kind == "notice":
        return _with_body(head + [(STYLE_NOTICE, "notice: ")], escape_text(_str(data.get("text"))), STYLE_NOTICE)
    if kind == "error":
        lead = f"error {escape(_str(data.get('code')))}: "
        return _with_body(head + [(STYLE_ERROR, lead)], escape_text(_str(data.get("message"))), STYLE_ERROR)
    if kind == "pong":
        return head + [(STYLE_STATUS, f"* pong {escape(_str(data.get('token')))}")]
    if kind == "help":
        lines = data.get("lines")
        lines = [escape(_str(x)) for x in lines] if isinstance(lines, list) else []
        title = "commands (a line without / is said to the current room; //text says /text):"
        return _with_body(head, [title] + ["  " + line for line in lines], STYLE_LOCAL)
    if kind in ("hint", "info"):
        lead = [(STYLE_LOCAL, "-- ")] if clock else []
        return _with_body(head + lead, escape_text(_str(data.get("text"))), STYLE_LOCAL)
    # An event type this client does not know (a newer server): say so, show its members.
    summary = escape(_str({k: v for k, v in data.items() if k != "type"}))
    return head + [(STYLE_STATUS, f"* {escape(_str(data.get('type')))} {summary}")]


def _folded(value: Any) -> set:
    return {_str(v).lower() for v in value} if isinstance(value, list) else set()


def _room_event(head: Fragments, kind: str, data: Mapping[str, Any], localtime: Callable[[float], time.struct_time]) -> Fragments:
    """Topic, kick, invite, mode and account events, in words."""
    room = [(STYLE_ROOM, escape(_str(data.get("room")))), (STYLE_EVENT, " * ")]
    by = data.get("by")
    if kind == "topic":
        text = _str(data.get("text"))
        if data.get("_shown") is True:  # a joiner's copy, or /topic without text
            if not text:
                return head + room + [(STYLE_EVENT, "no topic")]
            out = _with_body(head + room + [(STYLE_EVENT, "topic: ")], escape_text(text), "")
            when = data.get("ts")
            stamp = ""
            if isinstance(when, (int, float)) and not isinstance(when, bool):
                try:
                    stamp = time.strftime(", %d %b %Y %H:%M", localtime(when / 1000.0))
                except (OverflowError, OSError, ValueError):
                    stamp = ""
            return out + [(STYLE_STATUS, f" (set by {escape(_str(by))}{stamp})")] if by else out
        if not text:
            return head + room + [_nick(by), (STYLE_EVENT, " cleared the topic")]
        return _with_body(head + room + [_nick(by), (STYLE_EVENT, " set the topic: ")], escape_text(text), "")
    if kind == "kick":
        reason = _str(data.get("reason"))
        who = [(STYLE_MENTION, "you")] if data.get("_me") is True else [_nick(data.get("nick"))]
        verb = " were kicked by " if data.get("_me") is True else " was kicked by "
        out = head + room + who + [(STYLE_EVENT, verb), _nick(by)]
        return _with_body(out + [(STYLE_EVENT, ": ")], escape_text(reason), STYLE_EVENT) if reason else out
    if kind == "invite":
        if "nick" in data and data.get("_for_me") is not True:  # our own invitation went out
            return head + room + [_nick(data.get("nick")), (STYLE_EVENT, " was invited by "), _nick(by)]
        target = escape(_str(data.get("room")))
        return head + [_nick(by), (STYLE_MENTION, f" invites you to {target}"), (STYLE_STATUS, f" (/join {target})")]
    if kind == "mode":
        changes = data.get("set")
        changes = changes if isinstance(changes, Mapping) else {}
        if by is None:  # the answer to /mode: everything in force
            return head + room + [(STYLE_EVENT, "modes: " + escape(describe_modes(changes, data.get("bans"))))]
        phrases = ", ".join(describe_set(changes)) or "nothing"
        return head + room + [_nick(by), (STYLE_EVENT, " set " + escape(phrases))]
    # account
    account = data.get("account")
    if data.get("_ours") is True:
        asked = data.get("_asked")
        if not isinstance(account, str):
            return head + [(STYLE_EVENT, "* you are logged out")]
        name = escape(account)
        if asked == "register":
            text = f"* your nick is now the account {name}: nobody else can use it"
        elif asked == "password":
            text = f"* the password of {name} is changed"
        else:
            text = f"* you are logged in as {name}"
        return head + [(STYLE_EVENT, text)]
    if isinstance(account, str) and account:
        return head + [(STYLE_EVENT, "* "), _nick(data.get("nick")), (STYLE_EVENT, f" is logged in as {escape(account)}")]
    return head + [(STYLE_EVENT, "* "), _nick(data.get("nick")), (STYLE_EVENT, " logged out")]


def _message(head: Fragments, data: Mapping[str, Any], dim: str, windowed: bool = False, mention: bool = False) -> Fragments:
    text_style = dim
    sender = data.get("from")
    if windowed:
        if mention and "room" in data:
            text_style = STYLE_MENTION
        who_: Fragments = [(dim, "<"), _nick(sender, dim), (dim, "> ")]
        if data.get("action") is True:
            who_ = [(dim, "* "), _nick(sender, dim), (dim, " ")]
            text_style = f"{STYLE_ACTION} {text_style}".strip()
        return _with_body(head + who_, escape_text(_str(data.get("text"))), text_style)
    if "to" in data and "room" not in data:
        where: Fragments = [(f"{STYLE_ROOM} {dim}".strip(), "private"), ("", " ")]
        who: Fragments = [
            (dim, "<"),
            _nick(sender, dim),
            (dim, " -> "),
            _nick(data.get("to"), dim),
            (dim, "> "),
        ]
    else:
        where = [(f"{STYLE_ROOM} {dim}".strip(), escape(_str(data.get("room")))), ("", " ")]
        who = [(dim, "<"), _nick(sender, dim), (dim, "> ")]
    if data.get("action") is True:  # an emote (/me waves): "* alice waves", as IRC clients show it
        arrow: Fragments = [(dim, " -> "), _nick(data.get("to"), dim)] if where[0][1] == "private" else []
        who = [(dim, "* "), _nick(sender, dim)] + arrow + [(dim, " ")]
        text_style = f"{STYLE_ACTION} {dim}".strip()
    return _with_body(head + where + who, escape_text(_str(data.get("text"))), text_style)


def plain(fragments: Fragments) -> str:
    """The text of the fragments, styles dropped: what script mode prints."""
    return "".join(text for _, text in fragments)


_RAW_UNSAFE_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_RAW_JSON_WHITESPACE = re.compile("[\t\n\r]")


def escape_json_line(payload_text: str) -> str:
    """A received payload for `--json`: the same JSON, with characters that JSON allows raw in
    strings but a terminal would act on written as `\\uXXXX` (an equivalent JSON text).

    C0 controls can appear raw in valid JSON only as whitespace between tokens (inside strings
    they must be escaped, and `decode` already checked validity), where a space means the same
    and keeps one event on one line.
    """
    text = _RAW_JSON_WHITESPACE.sub(" ", payload_text)
    return _RAW_UNSAFE_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def render_plain(item: Item, localtime: Optional[Callable[[float], time.struct_time]] = None) -> str:
    return plain(render(item, localtime or time.localtime))
