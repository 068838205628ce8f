"""Message text between IRC and the rooms: formatting codes, CTCP ACTION, splitting to fit.

Sans-I/O and independent of the chat server.

Public API
----------
* ``strip_formatting(text) -> str``: removes IRC formatting codes (bold ``\\x02``, colour
  ``\\x03[fg[,bg]]`` with 1-2 digits each, hex colour ``\\x04[RRGGBB[,RRGGBB]]``, monospace
  ``\\x11``, reverse ``\\x16``, italics ``\\x1d``, strikethrough ``\\x1e``, underline ``\\x1f``,
  reset ``\\x0f``) and keeps everything else, other control characters included: refusing
  those is the session's job (the IRC door refuses them), so they must still be visible after this.
* ``parse_ctcp(text) -> tuple[str, str] | None``: ``(COMMAND, params)`` of a CTCP message
  ``\\x01COMMAND params\\x01`` (closing ``\\x01`` optional), else None.
* ``ctcp_action(text) -> str | None``: the text of ``\\x01ACTION text\\x01``, else None.
* ``make_action(text) -> str``: the reverse.
* ``split_for_irc(text, budget) -> list[str]``: a native text as IRC message lines, each at
  most ``budget`` bytes of UTF-8 (see its docstring).
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

__all__ = [
    "FORMAT_CODES",
    "strip_formatting",
    "parse_ctcp",
    "ctcp_action",
    "make_action",
    "split_for_irc",
]

# the single-character toggles; \x03 and \x04 take arguments
FORMAT_CODES = "\x02\x0f\x11\x16\x1d\x1e\x1f"
_FORMATTING = re.compile(
    "\x03(?:[0-9]{1,2}(?:,[0-9]{1,2})?)?"
    "|\x04(?:[0-9A-Fa-f]{6}(?:,[0-9A-Fa-f]{6})?)?"
    "|[\x02\x0f\x11\x16\x1d\x1e\x1f]+"
)
_CTCP = "\x01"


def strip_formatting(text: str) -> str:
    """Remove IRC formatting codes (with a colour's digits); keep every other character."""
    if text.isprintable():  # every code is a control character: none here (most texts)
        return text
    return _FORMATTING.sub("", text)


def parse_ctcp(text: str) -> Optional[Tuple[str, str]]:
    """``(COMMAND, params)`` of a CTCP message, the command upper-cased; None if not CTCP."""
    if not text.startswith(_CTCP) or len(text) < 2:
        return None
    body = text[1:-1] if text.endswith(_CTCP) and len(text) > 1 else text[1:]
    command, _, params = body.partition(" ")
    if not command:
        return None
    return command.upper(), params


def ctcp_action(text: str) -> Optional[str]:
    """The action text of ``\\x01ACTION text\\x01`` (closing ``\\x01`` optional), else None."""
    if not text.startswith(_CTCP):
        return None
    parsed = parse_ctcp(text)
    if parsed is None or parsed[0] != "ACTION":
        return None
    return parsed[1]


def make_action(text: str) -> str:
    """The CTCP ACTION (``/me``) message for ``text``."""
    return "\x01ACTION " + text + "\x01"


def split_for_irc(text: str, budget: int) -> List[str]:
    """Cut a native text into IRC lines of at most ``budget`` UTF-8 bytes each.

    * Lines break at ``\\n`` (a stray ``\\r`` or ``\\r\\n`` counts as one too, so no CR can
      reach the wire); empty lines are dropped.
    * Tabs are kept as they are: IRC carries them, and a client shows them as it likes.
    * A line longer than ``budget`` is cut at character boundaries, at the last space in the
      final fifth of the budget if there is one (that space is dropped), else hard at the
      budget. Only spaces at cut points are ever lost, never another character.

    ``budget`` is what the caller has left after prefix, command and target (see
    ``parser.body_budget``); it must be at least 4 so that any character fits.
    """
    if budget < 4:
        raise ValueError(f"budget {budget} is too small for a UTF-8 character")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: List[str] = []
    for line in text.split("\n"):
        if not line:
            continue
        if len(line) <= budget and (line.isascii() or len(line.encode("utf-8")) <= budget):
            out.append(line)
            continue
        _cut(line.encode("utf-8"), budget, out)
    return out


def _cut(data: bytes, budget: int, out: List[str]) -> None:
    n = len(data)
    soft = budget - budget // 5  # a space at or after start+soft is a good place to cut
    start = 0
    while n - start > budget:
        cut = start + budget  # first byte that does not fit
        while data[cut] & 0xC0 == 0x80:  # a continuation byte: back up to its lead byte
            cut -= 1
        # the space may also be the byte right after the window: then the piece is full
        sp = data.rfind(b" ", start + soft, cut + 1)
        if sp > start:
            out.append(data[start:sp].decode("utf-8"))
            start = sp + 1
        else:
            out.append(data[start:cut].decode("utf-8"))
            start = cut
    if start < n:
        out.append(data[start:].decode("utf-8"))
