"""What a room's operators can set: its modes, and bans by mask (contract section 11.2).

No I/O: the chat state applies these to its rooms, and the store keeps a registered room's
state as the JSON that `dump_state` writes and `load_state` reads.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any, Dict, List, Optional, Tuple

from selchat.core.names import fold, valid_nick

MAX_BANS = 100  # masks one room's ban list holds (IRC's MAXLIST); more: `ban_list_full`
MAX_INVITES = 100  # pending invitations one room keeps; the oldest goes first
MASK_MAX = 200  # characters of one ban mask
KEY_MAX = 64  # characters of a room key

FLAG_DEFAULTS = {"moderated": False, "invite_only": False, "topic_locked": True, "secret": False}


class BadMask(ValueError):
    """Not a mask the contract knows (a nick, `account:NAME`, or `nick!user@host`)."""


def normalize_mask(mask: str) -> str:
    """The form a mask is kept and compared in: a plain nick becomes `nick!*@*`, an account
    mask `account:name` with the name folded; globs are folded (names are ASCII-insensitive)."""
    mask = mask.strip()
    if not mask or len(mask) > MASK_MAX or any(c.isspace() or ord(c) < 32 for c in mask):
        raise BadMask(f"not a ban mask: {mask[:40]!r}")
    if mask.lower().startswith("account:") or mask.startswith("$a:"):
        name = mask.split(":", 1)[1]
        if not valid_nick(name):
            raise BadMask(f"not an account name: {name[:40]!r}")
        return "account:" + fold(name)
    if "!" not in mask and "@" not in mask:
        if not all(c.isalnum() or c in "_-[]{}\\|^*?" for c in mask):
            raise BadMask(f"not a nick or mask: {mask[:40]!r}")
        return fold(mask) + "!*@*"
    if "!" not in mask:
        mask = "*!" + mask
    if "@" not in mask:
        mask = mask + "@*"
    return fold(mask)


_compiled: Dict[str, "re.Pattern[str]"] = {}


def _glob(mask: str) -> "re.Pattern[str]":
    pattern = _compiled.get(mask)
    if pattern is None:
        if len(_compiled) > 4096:
            _compiled.clear()
        # fnmatch's translation matches each part between stars once, leftmost (an atomic
        # group, or a lookahead before 3.11), so `a*a*...*z` costs linear time; a plain `.*`
        # per star backtracked for minutes in the loop's thread. '[' is literal in a mask.
        pattern = _compiled[mask] = re.compile(fnmatch.translate(mask.replace("[", "[[]")))
    return pattern


def mask_matches(mask: str, nick: str, ident: str, hosts: Tuple[str, ...],
                 account_key: Optional[str]) -> bool:
    """Does the normalized `mask` cover this user? A host glob is tried against each of the
    user's hosts (the shown one and the address it came from)."""
    if mask.startswith("account:"):
        return account_key is not None and mask[8:] == account_key
    pattern = _glob(mask)
    head = f"{fold(nick)}!{fold(ident)}@"
    return any(pattern.fullmatch(head + fold(host)) is not None for host in hosts if host)


def dump_state(topic: str, topic_by: str, topic_ts: int, flags: Dict[str, bool],
               key: Optional[str], limit: Optional[int], bans: List[str],
               op_accounts: List[str]) -> str:
    return json.dumps({"topic": topic, "topic_by": topic_by, "topic_ts": topic_ts,
                       "flags": flags, "key": key, "limit": limit, "bans": bans,
                       "ops": op_accounts}, separators=(",", ":"), sort_keys=True)


def load_state(text: str) -> Dict[str, Any]:
    """A registered room's state; anything unreadable falls back to the defaults (a damaged
    row must not stop the server)."""
    try:
        state = json.loads(text)
        if not isinstance(state, dict):
            raise ValueError
    except ValueError:
        state = {}
    flags = dict(FLAG_DEFAULTS)
    for name, value in (state.get("flags") or {}).items():
        if name in flags and isinstance(value, bool):
            flags[name] = value
    limit = state.get("limit")
    key = state.get("key")
    return {
        "topic": state.get("topic") if isinstance(state.get("topic"), str) else "",
        "topic_by": state.get("topic_by") if isinstance(state.get("topic_by"), str) else "",
        "topic_ts": state.get("topic_ts") if isinstance(state.get("topic_ts"), int) else 0,
        "flags": flags,
        "key": key if isinstance(key, str) else None,
        "limit": limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None,
        "bans": [b for b in state.get("bans") or [] if isinstance(b, str)][:MAX_BANS],
        "ops": [a for a in state.get("ops") or [] if isinstance(a, str)],
    }
