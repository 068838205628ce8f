"""What the chat state says happened: small frozen records, free of any wire format.

The native JSON doors (`selchat.doors.framed.protocol`, used by the framed and the web door) turn
these into JSON objects, the IRC door into its lines; nothing here knows either.
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
    account: Optional[str] = None  # the account the connection is logged into
    token: Optional[str] = None  # a remember-me token, when the login asked for one


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
    account: Optional[str] = None  # the sender's account, when it was logged in


@dataclass(frozen=True)
class Join:
    room: str
    nick: str
    userhost: str = field(default="", compare=False)  # display only
    account: Optional[str] = None  # the joiner's account (IRC extended-join too)
    realname: str = field(default="", compare=False)  # for IRC's extended-join


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
    """The whole member list; each door's wire format cuts it into chunks that fit its frames."""

    room: str
    nicks: Tuple[str, ...]
    operators: Tuple[str, ...] = ()  # the members who are the room's operators (sorted)
    voiced: Tuple[str, ...] = ()  # the members who may speak in a moderated room (sorted)
    accounts: Tuple[Tuple[str, str], ...] = ()  # (nick, account) of the logged-in members


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
class AccountInfo:
    """The answer to register/login/password/logout (`account` None: logged out)."""

    account: Optional[str]
    nick: str = ""
    token: Optional[str] = None


@dataclass(frozen=True)
class AccountChange:
    """A user logged in (IRC's account-notify): to those who share a room with it."""

    nick: str
    account: Optional[str]
    userhost: str = field(default="", compare=False)


@dataclass(frozen=True)
class Topic:
    """A room's topic, set now (`ts`) by `by`; text "" means cleared."""

    room: str
    text: str
    by: str
    ts: int


@dataclass(frozen=True)
class Kick:
    room: str
    nick: str
    by: str
    reason: str
    userhost: str = field(default="", compare=False)  # the kicker's, display only


@dataclass(frozen=True)
class Invite:
    """To the invitee and, as its answer, to the inviter; `nick` is the invitee's."""

    room: str
    by: str
    nick: str = ""
    userhost: str = field(default="", compare=False)  # the inviter's, display only
    to: str = field(default="", compare=False)  # the invitee, in both copies (IRC's INVITE names it)


@dataclass(frozen=True)
class ModeChange:
    """What changed in a room's modes and roles, in the order applied: (name, value) pairs
    where value is a bool (the four flags), a str or None (key), an int or None (limit), or a
    tuple of nicks/masks (op, deop, voice, devoice, ban, unban)."""

    room: str
    by: str
    changes: Tuple[Tuple[str, object], ...]
    userhost: str = field(default="", compare=False)


@dataclass(frozen=True)
class ModeInfo:
    """A room's modes in force and its ban list: the answer to `mode` {room}."""

    room: str
    modes: Tuple[Tuple[str, object], ...]
    bans: Tuple[str, ...]
    created: int = 0  # ms since the epoch (IRC's 329)
    # (mask, who set it as nick!user@host, ms) for each ban, for IRC's 367; who and when are
    # not kept across restarts ("" and 0 then).
    ban_info: Tuple[Tuple[str, str, int], ...] = field(default=(), compare=False)


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

    room: Optional[str]
    messages: Tuple[Message, ...]
    more: bool
    with_: Optional[str] = None  # a private conversation's other side (then `room` is None)


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
    Signal, AccountInfo, AccountChange, Topic, Kick, Invite, ModeChange, ModeInfo,
]
