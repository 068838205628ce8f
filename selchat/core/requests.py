"""What a user asks of the chat, whichever door it came in by: small records, already validated.

Each door turns its own wire form into these (the framed door from JSON objects, the IRC door
from command lines) after checking names and text against `selchat.core.names`, so the chat
state deals in meaning, never in shapes of input. Liveness (ping/pong) and registration are
the doors' business and have no record here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

from selchat.defaults import HISTORY_LIMIT_DEFAULT


@dataclass  # not frozen, for speed (one per message said); never changed once made
class Say:
    room: str
    text: str
    action: bool = False  # "/me": an emote, shown as "* nick text"
    notice: bool = False  # an IRC NOTICE (no automatic reply may follow it)
    client_tags: Tuple[Tuple[str, str], ...] = ()  # IRCv3 client-only tags, relayed as they are


@dataclass(frozen=True)
class Msg:
    to: str
    text: str
    action: bool = False
    notice: bool = False
    client_tags: Tuple[Tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Tag:
    """Client tags without text (IRC's TAGMSG) to a room or a nick."""

    target: str
    client_tags: Tuple[Tuple[str, str], ...]


@dataclass(frozen=True)
class JoinRoom:
    room: str
    key: Optional[str] = None  # a room with a key asks for it


@dataclass(frozen=True)
class PartRoom:
    room: str
    reason: Optional[str] = None


@dataclass(frozen=True)
class ChangeNick:
    nick: str


@dataclass(frozen=True)
class Who:
    room: str


@dataclass(frozen=True)
class ListRooms:
    offset: int = 0  # where a long list goes on from (the `next` of the answer before)


@dataclass(frozen=True)
class HistoryRequest:
    room: str  # "" with `with_`
    before: Optional[int] = None
    limit: int = HISTORY_LIMIT_DEFAULT
    max_bytes: Optional[int] = None  # what the door's answer can carry: reading stops there
    with_: Optional[str] = None  # a private conversation: the other side's nick or account


@dataclass(frozen=True)
class SetTopic:
    room: str
    text: str  # "" clears


@dataclass(frozen=True)
class KickUser:
    room: str
    nick: str
    reason: str = ""


@dataclass(frozen=True)
class InviteUser:
    room: str
    nick: str


@dataclass(frozen=True)
class SetModes:
    """`changes` as in events.ModeChange, validated for shape by the door; empty: a query."""

    room: str
    changes: Tuple[Tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Kill:
    nick: str
    reason: str = ""


# Accounts: the door hands these to the hub, which runs the slow password work off the loop
# (selchat.kdf) and then tells the chat what was decided.


@dataclass(frozen=True)
class Register:
    password: str
    remember: bool = False


@dataclass(frozen=True)
class Login:
    account: str
    password: Optional[str] = None
    token: Optional[str] = None
    remember: bool = False


@dataclass(frozen=True)
class Logout:
    token: Optional[str] = None


@dataclass(frozen=True)
class ChangePassword:
    old: str
    new: str
    remember: bool = False  # a new remember-me token for this device (the others all end)


Request = Union[Say, Msg, JoinRoom, PartRoom, ChangeNick, Who, ListRooms, HistoryRequest, Tag,
                SetTopic, KickUser, InviteUser, SetModes, Kill, Register, Login, Logout,
                ChangePassword]

MODE_FLAGS = ("moderated", "invite_only", "topic_locked", "secret")
MODE_LISTS = ("op", "deop", "voice", "devoice", "ban", "unban")
