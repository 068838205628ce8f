"""The rules for nicks, rooms and text (docs/protocol.md, "Names"), the same at every door."""

from __future__ import annotations

import re
from typing import Optional

from selchat.defaults import NICK_MAX, ROOM_MAX

_NICK = re.compile(r"[A-Za-z_\[\]{}\\|^][A-Za-z0-9_\-\[\]{}\\|^]{0,%d}" % (NICK_MAX - 1))
_ROOM = re.compile(r"#[A-Za-z0-9_\-]{1,%d}" % ROOM_MAX)
# C0 controls but tab and newline, DEL, and C1 controls.
_BAD_TEXT_CHAR = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

NICK_RULE = (f"nick must be 1..{NICK_MAX} of A-Z a-z 0-9 _ - [ ] {{ }} \\ | ^, "
             "not starting with a digit or '-'")
ROOM_RULE = f"room must be '#' and 1..{ROOM_MAX} of A-Z a-z 0-9 _ -"


def valid_nick(nick: str) -> bool:
    return _NICK.fullmatch(nick) is not None


def valid_room(room: str) -> bool:
    return _ROOM.fullmatch(room) is not None


def fold(name: str) -> str:
    """The key under which nicks and rooms collide: ASCII case folded (names are ASCII only)."""
    return name.lower()


def has_control_characters(text: str) -> bool:
    return _BAD_TEXT_CHAR.search(text) is not None


def text_problem(text: str, max_text: int) -> Optional[str]:
    """Why `text` may not be carried, or None when it may."""
    if not text:
        return "text is empty"
    if len(text) > max_text:
        return f"text is longer than {max_text} characters"
    if text.isspace():
        return "text is only whitespace"
    if _BAD_TEXT_CHAR.search(text):
        return "text holds a control character"
    return None


def shorten(text: str, limit: int = 40) -> str:
    """Client-chosen text quoted in an error message, cut so the error stays small."""
    return text if len(text) <= limit else text[:limit] + "..."


def log_safe(text: str) -> str:
    """Free text kept only for logs: control characters replaced, so a log line stays one line."""
    return _BAD_TEXT_CHAR.sub("?", text)
