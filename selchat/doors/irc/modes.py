"""IRC's channel MODE strings, read into the contract's mode changes (no I/O).

`MODE #room +mk-o key nick` becomes `(("moderated", True), ("key", "key"), ("deop",
("nick",)))`, the shape `SetModes` takes; what the chat then decides (who may, which nick is
a member) is the core's. Letters (CHANMODES=b,k,l,imnst, PREFIX=(ov)@+):

    i m s t   invite_only, moderated, secret, topic_locked
    n         no messages from outside (on by default; -n lets non-members speak in the room)
    k         key (+k needs one; -k takes one and ignores it), l limit (+l needs a number)
    o v       op/deop, voice/devoice (a nick each)
    b         ban/unban a mask; `+b` or `b` with no mask asks for the ban list

What cannot be read is reported, not guessed: unknown letters (472), a bad key or limit (696),
and a mode that needs an argument and has none is left out, as IRC servers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

FLAGS = {"i": "invite_only", "m": "moderated", "s": "secret", "t": "topic_locked"}
NICK_MODES = {("+", "o"): "op", ("-", "o"): "deop", ("+", "v"): "voice", ("-", "v"): "devoice"}
KEY_MAX = 64  # as the core's rooms.KEY_MAX
LIMIT_MAX = 1_000_000_000
MODES_PER_LINE = 6  # ISUPPORT MODES: modes with an argument one MODE line may carry


@dataclass
class ModeRequest:
    changes: List[Tuple[str, object]] = field(default_factory=list)
    unknown: List[str] = field(default_factory=list)  # letters we do not know (472 each)
    invalid: List[Tuple[str, str, str]] = field(default_factory=list)  # (letter, arg, why): 696
    list_bans: bool = False  # `+b`/`b` without a mask: the ban list


def valid_key(key: str) -> bool:
    return 0 < len(key) <= KEY_MAX and not any(c.isspace() or c == "," or ord(c) < 33 for c in key)


def parse_modes(params: Sequence[str]) -> ModeRequest:
    """`params` are MODE's after the channel: a mode string, then the arguments."""
    out = ModeRequest()
    if not params:
        return out
    modes, args = params[0], list(params[1:])
    sign = "+"
    with_args = 0
    for letter in modes:
        if letter in "+-":
            sign = letter
            continue
        if letter in FLAGS:
            out.changes.append((FLAGS[letter], sign == "+"))
        elif letter == "n":
            out.changes.append(("no_external", sign == "+"))
        elif letter in "kl" or (sign, letter) in NICK_MODES or letter == "b":
            takes = letter != "l" or sign == "+"
            if not takes:
                out.changes.append(("limit", None))
                continue
            if not args:
                if letter == "b":
                    out.list_bans = True
                elif letter == "k" and sign == "-":
                    out.changes.append(("key", None))
                continue
            arg = args.pop(0)
            with_args += 1
            if with_args > MODES_PER_LINE:
                continue
            if letter == "k":
                if sign == "-":
                    out.changes.append(("key", None))
                elif valid_key(arg):
                    out.changes.append(("key", arg))
                else:
                    out.invalid.append(("k", "*", "Invalid key: 1 to 64 characters, no spaces or commas"))
            elif letter == "l":
                if arg.isascii() and arg.isdigit() and 0 < int(arg) <= LIMIT_MAX:
                    out.changes.append(("limit", int(arg)))
                else:
                    out.invalid.append(("l", arg[:32] or "*", "Invalid limit: a positive number"))
            elif letter == "b":
                out.changes.append(("ban" if sign == "+" else "unban", (from_irc_mask(arg),)))
            else:
                out.changes.append((NICK_MODES[(sign, letter)], (arg,)))
        else:
            out.unknown.append(letter)
    return out


def from_irc_mask(mask: str) -> str:
    """IRC's account extban (`$a:name`, Ergo's and InspIRCd's `account:`) as the contract's."""
    if mask.startswith("$a:"):
        return "account:" + mask[3:]
    return mask
