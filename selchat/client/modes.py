"""Room modes both ways: IRC-style `/mode` arguments to the wire's `mode.set`, and a `set` (or
the full list of modes in force) back to words a person reads.

People who run rooms know `+m`, `+k key`, `+o nick` from IRC, so `/mode` takes those; what the
client shows is spelt out ("moderated on, key set, op carol"), so nobody has to know them.
Pure functions, tested without a server.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

__all__ = ["parse_mode", "describe_set", "describe_modes", "FLAGS"]

# letter -> wire name, for the modes that are on or off
FLAGS: Dict[str, str] = {"m": "moderated", "i": "invite_only", "t": "topic_locked", "s": "secret"}
# letter -> (wire name when set, wire name when unset), for the modes about a nick or a mask
_LISTS: Dict[str, Tuple[str, str]] = {"o": ("op", "deop"), "v": ("voice", "devoice"), "b": ("ban", "unban")}
_WORDS = {"moderated": "moderated", "invite_only": "invite-only", "topic_locked": "topic lock", "secret": "secret"}

MODE_HELP = "modes: +m moderated, +i invite-only, +t topic lock, +s secret, +k key, +l limit, +o/+v/+b nick"


def parse_mode(args: Sequence[str]) -> Union[Dict[str, Any], str]:
    """`["+mk-i", "sesame"]` -> `{"moderated": True, "key": "sesame", "invite_only": False}`,
    or a sentence saying what is wrong. An empty `args` is the empty set (a query)."""
    out: Dict[str, Any] = {}
    words = list(args)
    pos = 0
    while pos < len(words):
        spec = words[pos]
        pos += 1
        if not spec or spec[0] not in "+-":
            return f"expected +/- and mode letters, not {spec!r} ({MODE_HELP})"
        sign = True
        for letter in spec:
            if letter in "+-":
                sign = letter == "+"
                continue
            if letter in FLAGS:
                out[FLAGS[letter]] = sign
            elif letter == "k":
                if sign:
                    if pos >= len(words):
                        return "+k needs a key"
                    out["key"] = words[pos]
                    pos += 1
                else:
                    out["key"] = None
                    if pos < len(words) and words[pos][:1] not in "+-":
                        pos += 1  # IRC clients often repeat the key on -k; it is not needed
            elif letter == "l":
                if sign:
                    if pos >= len(words):
                        return "+l needs a number of members"
                    try:
                        limit = int(words[pos])
                    except ValueError:
                        return f"+l needs a number of members, not {words[pos]!r}"
                    if limit < 1:
                        return "+l needs a number of members of at least 1"
                    out["limit"] = limit
                    pos += 1
                else:
                    out["limit"] = None
            elif letter in _LISTS:
                if pos >= len(words):
                    return f"{'+' if sign else '-'}{letter} needs a nick" + (" or a mask" if letter == "b" else "")
                key = _LISTS[letter][0 if sign else 1]
                out.setdefault(key, []).append(words[pos])
                pos += 1
            else:
                return f"unknown mode letter {letter!r} ({MODE_HELP})"
    return out


def _names(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def describe_set(changes: Mapping[str, Any]) -> List[str]:
    """What a `mode.set` changed, one short phrase per change, in a fixed order."""
    phrases: List[str] = []
    for name, word in _WORDS.items():
        if name in changes:
            phrases.append(f"{word} {'on' if changes[name] else 'off'}")
    if "key" in changes:
        phrases.append("key removed" if changes["key"] in (None, "") else "key set")
    if "limit" in changes:
        phrases.append("no member limit" if changes["limit"] is None else f"member limit {changes['limit']}")
    for key in ("op", "deop", "voice", "devoice", "ban", "unban"):
        if key in changes:
            phrases.append(f"{key} {_names(changes[key])}")
    known = set(_WORDS) | {"key", "limit", "op", "deop", "voice", "devoice", "ban", "unban"}
    for name in sorted(k for k in changes if k not in known):
        phrases.append(f"{name} {changes[name]}")
    return phrases


def describe_modes(modes: Mapping[str, Any], bans: Any) -> str:
    """The modes in force and the ban list (the answer to `/mode` without changes)."""
    parts = [word for name, word in _WORDS.items() if modes.get(name) is True]
    key = modes.get("key")
    if isinstance(key, str) and key:
        parts.append(f"key {key}")
    limit = modes.get("limit")
    if limit is not None:
        parts.append(f"member limit {limit}")
    text = ", ".join(parts) if parts else "no modes set"
    ban_list = [str(b) for b in bans] if isinstance(bans, list) else []
    text += "; bans: " + (" ".join(ban_list) if ban_list else "none")
    return text
