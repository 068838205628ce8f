"""Nick refusals in words a person understands, and a valid nick to offer instead.

The server answers a bad nick with its rule (`nick must be 1..32 of A-Z a-z ...`), which says
what is allowed but not what was wrong with what you typed. `explain` names the problems of
one nick ("a nick cannot contain spaces"), `suggest` turns it into a nick the server takes
(`john smith` -> `john_smith`, `zoë😀` -> `zoe`). Both are pure functions of the text, tested
with hypothesis against `selchat.core.names.valid_nick`, the server's own rule.
"""

from __future__ import annotations

import re
import unicodedata
from typing import List

from selchat.defaults import NICK_MAX

__all__ = ["explain", "suggest", "taken_suggestion", "ALLOWED"]

ALLOWED = "letters A-Z a-z, digits 0-9 and _ - [ ] { } \\ | ^"
_SPECIAL = "_-[]{}\\|^"
_FALLBACK = "guest"
_BLANK = "\0"  # where blanks were, until the ends are trimmed


def _allowed(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char in _SPECIAL)


def _shown(char: str) -> str:
    """A character as a person can read it in a sentence, invisible ones by their code."""
    if char.isprintable() and not char.isspace() and unicodedata.category(char) not in ("Mn", "Cf"):
        return f"'{char}'"
    return f"U+{ord(char):04X}"


def explain(nick: str) -> List[str]:
    """What is wrong with `nick`, one short sentence per problem (empty when nothing is)."""
    if not nick:
        return ["a nick cannot be empty"]
    problems: List[str] = []
    if any(c.isspace() for c in nick):
        problems.append("a nick cannot contain spaces")
    if nick[0].isascii() and nick[0].isdigit():
        problems.append("a nick cannot start with a digit")
    elif nick[0] == "-":
        problems.append("a nick cannot start with '-'")
    bad: List[str] = []
    for char in nick:
        if not char.isspace() and not _allowed(char) and char not in bad:
            bad.append(char)
    if bad:
        shown = ", ".join(_shown(c) for c in bad[:5]) + (", ..." if len(bad) > 5 else "")
        problems.append(f"a nick cannot contain {shown} (only {ALLOWED})")
    if len(nick) > NICK_MAX:
        problems.append(f"a nick is at most {NICK_MAX} characters long (this one has {len(nick)})")
    return problems


def suggest(nick: str) -> str:
    """A valid nick close to `nick`: blanks become `_`, accents are dropped (ë -> e), other
    characters that are not allowed are left out, a leading digit or `-` is moved behind a
    letter, and the result is cut to the maximum length. Always valid; `guest` if nothing of
    `nick` can be kept."""
    if not explain(nick):
        return nick
    # NFKD splits "ë" into "e" and a combining mark, and folds compatibility forms (ｆｕｌｌ).
    decomposed = unicodedata.normalize("NFKD", nick)
    out: List[str] = []
    for char in decomposed:
        if char.isspace():
            if out and out[-1] != _BLANK:
                out.append(_BLANK)  # a run of blanks is one `_`, none at either end
        elif _allowed(char):
            out.append(char)
    text = "".join(out).strip(_BLANK).replace(_BLANK, "_")
    if text and (text[0].isdigit() or text[0] == "-"):
        rest = re.sub(r"^[0-9-]+", "", text)
        text = rest if rest and rest != "_" else "n" + text
    text = text[:NICK_MAX]
    return text or _FALLBACK


def taken_suggestion(nick: str) -> str:
    """Another nick to try when `nick` is taken: `nick_` (cut to fit), kept valid."""
    base = suggest(nick)
    return (base[: NICK_MAX - 1] + "_") if base == nick else base
