"""What the chat state says happened: small frozen records, free of any wire format.

The frame protocol (`selchat.doors.framed.protocol`) turns these into JSON objects; a later IRC or WebSocket
adapter would turn the same records into its own lines, which is why nothing here knows JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union


@dataclass(frozen=True)
class Welcome:
    """Registration succeeded; each door adds the limits of its own wire."""

    nick: str
    server: str
    motd: str


@dataclass  # not frozen: one is made per message said, and a frozen __init__ costs three times as
class Message:  # much; like every event here it is never changed once made
    """A room message (`room` set) or a private one (`to` set); `id` grows across the whole server."""

    id: int
    ts: int  # milliseconds since the Unix epoch, server clock
    sender: str
    text: str
    room: Optional[str] = None
    to: Optional[str] = None
    action: bool = False  # an emote ("/me waves"), shown as "* sender text"
    notice: bool = False  # an IRC NOTICE: clients must never answer it automatically
    userhost: str = field(default="", compare=False)  # the sender's ident@host (not kept in history)
    # Client-only tags (IRCv3 "+key" = value) the sender attached: relayed to clients that take
    # them, never stored, never interpreted.
    client_tags: Tuple[Tuple[str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Join:
    room: str
    nick: str
    userhost: str = field(default="", compare=False)  # display only


@dataclass(frozen=True)
class Part:
    room: str
    nick: str
    userhost: str = field(default="", compare=False)  # display only
    reason: str = ""


@dataclass(frozen=True)
class Quit:
    nick: str
    reason: str
    userhost: str = field(default="", compare=False)  # display only


@dataclass(frozen=True)
class NickChange:
    old: str
    new: str
    userhost: str = field(default="", compare=False)  # display only


@dataclass(frozen=True)
class Names:
    """The whole member list; the wire adapter cuts it into chunks that fit its frames."""

    room: str
    nicks: Tuple[str, ...]
    operators: Tuple[str, ...] = ()  # the members who are the room's operators (sorted)


@dataclass(frozen=True)
class Signal:
    """Client tags with no text (IRC's TAGMSG: typing notices, reactions): relayed, never stored."""

    sender: str
    client_tags: Tuple[Tuple[str, str], ...]
    room: Optional[str] = None
    to: Optional[str] = None
    userhost: str = field(default="", compare=False)
    tag_id: str = ""  # an id of its own (IRC msgid), not one of the message ids


@dataclass(frozen=True)
class RoomInfo:
    name: str
    members: int


@dataclass(frozen=True)
class RoomList:
    """Every room, largest first; the door sends them from `offset` on, as much as fits.

    `rooms` may be a live view of the chat's index (valid until the chat next changes): a
    door reads only what it sends."""

    rooms: Sequence[RoomInfo]
    offset: int = 0


@dataclass(frozen=True)
class History:
    """Room messages, oldest first; `more` says older ones exist beyond the first."""

    room: str
    messages: Tuple[Message, ...]
    more: bool


@dataclass(frozen=True)
class Pong:
    token: object = None


@dataclass(frozen=True)
class Ping:
    """Sent by the server to a silent client."""

    token: object = None


@dataclass(frozen=True)
class Notice:
    text: str


@dataclass(frozen=True)
class Error:
    code: str
    message: str


Event = Union[
    Welcome, Message, Join, Part, Quit, NickChange, Names, RoomList, History, Pong, Ping, Notice, Error,
    Signal,
]
