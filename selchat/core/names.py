"""The rules for nicks, rooms and text (docs/protocol.md, "Names"), the same at every door."""

from __future__ import annotations

import re
from typing import Optional

from selchat.defaults import NICK_MAX, ROOM_MAX

_NICK = re.compile(r"[A-Za-z_\[\]{}\\|^][A-Za-z0-9_\-\[\]{}\\|^]{0,%d}" % (NICK_MAX - 1))
_ROOM = re.compile(r"#[A-Za-z0-9_\-]{1,%d}" % ROOM_MAX)
# C0 controls but tab and newline, DEL, and C1 controls.
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f"
_BAD_TEXT_CHAR = re.compile(f"[{_CONTROLS}]")
# The bidirectional embeddings and overrides (LRE RLE PDF LRO RLO) and isolates (LRI RLI FSI
# PDI). An override makes the characters after it read in the other direction; an embedding or
# an isolate reorders the words after it; unterminated, either runs to the end of the line a
# client shows, nick and all. Refused in text (nicks and rooms are ASCII anyway). The marks
# U+200E, U+200F and U+061C stay allowed: they change how neutral characters next to them lean
# and cannot take over the rest of a line, and mixed Arabic or Hebrew text needs them.
_BIDI_CONTROLS = "\u202a-\u202e\u2066-\u2069"
_BAD_UNICODE_CHAR = re.compile(f"[{_CONTROLS}{_BIDI_CONTROLS}]")
# What draws nothing on its own: every Default_Ignorable_Code_Point (Unicode 15: soft hyphen,
# zero-width space/joiners, word joiner, BOM, variation selectors, Hangul fillers, tags, and
# the unassigned code points reserved as ignorable), every other format character (Cf), and
# U+2800 BRAILLE PATTERN BLANK, which renders as a space and is the usual way round "no empty
# messages" rules. Text made only of these and whitespace is empty. They stay allowed beside
# visible characters: ZWJ builds emoji, ZWNJ is spelling in Persian, VS16 picks emoji style.
_INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
              "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
              "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
              # format characters that are not default-ignorable
              "\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\ufff9-\ufffb\U000110bd"
              "\U000110cd\U00013430-\U0001343f"
              "\u2800")
_VISIBLE = re.compile(f"[^\\s{_INVISIBLE}]")
_LOG_UNSAFE = re.compile(f"[{_CONTROLS}{_BIDI_CONTROLS}]")

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
    """Why `text` may not be carried (the words of a `bad_text`), or None when it may.

    On the hot path (every message): plain printable ASCII text, the common case, costs two C
    scans (`isspace`, `isprintable`; `isascii` is a flag CPython keeps), other ASCII one regex
    search more; other text costs one search, and one more, which stops at the first visible
    character, unless the text starts with a visible ASCII one.
    """
    if not text:
        return "text is empty"
    if len(text) > max_text:
        return f"text is longer than {max_text} characters"
    if text.isascii():
        if text.isspace():
            return "text is only whitespace"
        # (isprintable, a C scan, clears most texts; a tab or a newline is not printable but
        # allowed, so the search decides for the others)
        if not text.isprintable() and _BAD_TEXT_CHAR.search(text):
            return "text holds a control character"
        return None
    bad = _BAD_UNICODE_CHAR.search(text)
    if bad is not None:
        char = bad.group()
        if char >= "\u202a":
            return f"text holds a bidirectional control character (U+{ord(char):04X})"
        return "text holds a control character"
    # A printable ASCII first character is visible: no second search for most such texts.
    if not "!" <= text[0] <= "~" and _VISIBLE.search(text) is None:
        return "text is only whitespace or invisible"
    return None


def shorten(text: str, limit: int = 40) -> str:
    """Client-chosen text quoted in an error message, cut so the error stays small."""
    return text if len(text) <= limit else text[:limit] + "..."


def log_safe(text: str) -> str:
    """Free text kept only for logs: control characters replaced, so a log line stays one line,
    and bidirectional controls too, so it reads in a terminal as it was written."""
    return _LOG_UNSAFE.sub("?", text)
