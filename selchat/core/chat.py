"""The chat state: users, nicks, rooms, operators and presence. Requests in, deliveries out.

Nothing here knows sockets, clocks, doors or wire formats. The hub hands in validated requests
(and the time, when a message needs a timestamp) and gets back `Delivery` records saying which
users receive which event; each door's wire format encodes an event once and the same bytes go
to every recipient of that format. A user's `session` belongs to its door; this module only
carries it.

Invariants:
* a user is in `users` exactly while registered, and is a member of every room in `user.rooms`;
* a room exists while it has members, except the lobby, which always exists;
* a room's operators are members of it;
* `rooms_held[k]` is the number of existing rooms created by users of holder key `k` (their
  origin, the address a door passed, or a key of their own when the door passed none);
* message ids only grow, across restarts too (the store hands them out durably);
* `before_change()` is called before any membership or nick changes, so whoever batches
  broadcasts can send what was said to the members who were there when it was said;
* a user has one or more sessions (one account on several devices is one user); it is in
  `online` under its account key exactly while it is logged in;
* a nick that is an account is held only by a user logged into that account;
* a registered room (made by a logged-in user) keeps its founder, topic, modes, bans and
  operator accounts in the store's directory, whether it has members or not.
"""

from __future__ import annotations

import collections
import itertools
import logging
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from selchat.core import events
from selchat.core.accounts import Accounts
from selchat.core.names import fold, shorten, valid_nick
from selchat.core.roomindex import RoomIndex
from selchat.core.requests import (
    MODE_FLAGS,
    ChangeNick,
    HistoryRequest,
    InviteUser,
    JoinRoom,
    KickUser,
    ListRooms,
    Msg,
    PartRoom,
    Request,
    Say,
    SetModes,
    SetTopic,
    Tag,
    Who,
)
from selchat.core import rooms as room_rules
from selchat.core.store import Directory, StoreError, pair_key
from selchat.defaults import (
    HISTORY_ON_JOIN,
    LOBBY,
    MAX_ACCOUNTS,
    MAX_PRESENCE,
    MAX_ROOMS,
    MAX_ROOMS_PER_USER,
)

log = logging.getLogger(__name__)

# The room table is shared by everyone, so what one address may hold is bounded, and the last
# part of it is kept for those who hold few rooms (docs/protocol.md, "Requests"). With the
# defaults: 10,000 rooms; one address may have created at most 500 of the rooms that exist
# (1/20 of the cap; 16 connections at 100 rooms each could otherwise keep 1,600 alive); past
# 9,000 rooms (the last 1/10 kept back), only an address holding fewer than 10 may create one.
# Filling the table then takes 18 addresses at 500 and over 100 more at 9 each.
ORIGIN_SHARE = 20  # one origin may hold max_rooms / ORIGIN_SHARE rooms it created
RESERVE_SHARE = 10  # the last max_rooms / RESERVE_SHARE rooms are kept for small holders
FEW_ROOMS = 10  # "holds few rooms": fewer than this many
RECENT_CACHED = 64  # rooms whose history-on-join is kept in memory (a frame each at most)
# Registered rooms one account may found: each is kept for ever (no request drops one), so past
# this the rooms it creates are ordinary ones, gone when empty.
ROOMS_FOUNDED = 100
WHOWAS_KEPT = 1000  # users who left or changed nick, remembered for IRC's WHOWAS (oldest go)

_holders = itertools.count(1)


class ChatError(Exception):
    """A request the chat state refuses; `code` is the protocol's error word."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class User:
    """A registered user, from any door. `session` is the door's; `ident@host` is for display.

    `origin` is opaque to the chat: the door's word for where the user comes from (the peer's
    address), used only to share out the room table. `holder` is the key its rooms count
    under: the origin, or a key of the user's own when the door gave none.
    """

    __slots__ = ("nick", "key", "rooms", "sessions", "ident", "host", "realname", "userhost",
                 "away", "door", "since", "origin", "holder", "account", "account_key",
                 "__weakref__")

    def __init__(self, nick: str, session: Any, ident: str = "", host: str = "selchat",
                 realname: str = "", door: str = "", origin: str = "") -> None:
        self.nick = nick
        self.key = fold(nick)
        self.rooms: Dict[str, Room] = {}
        # Every connection this user has: one, or several for one account on several devices.
        self.sessions: List[Any] = [session]
        self.account: Optional[str] = None  # the account's spelling, while logged in
        self.account_key: Optional[str] = None
        self.ident = ident or nick
        self.host = host
        self.realname = realname or nick
        self.userhost = f"{self.ident}@{host}"
        self.away: Optional[str] = None
        self.door = door
        self.since = 0  # registration time, ms since the epoch (for WHOIS idle/signon)
        self.origin = origin
        # NUL cannot be in an address a door passes, so a user's own key never meets an origin.
        self.holder = origin if origin else f"\0user{next(_holders)}"

    @property
    def session(self) -> Any:
        """The first connection (the only one, unless an account is on several devices)."""
        return self.sessions[0]

    def __repr__(self) -> str:
        return f"User({self.nick!r})"


class Room:
    __slots__ = ("name", "key", "members", "operators", "created", "topic", "holder",
                 "names_cache", "recent_cache", "voiced", "topic_by", "topic_ts", "flags",
                 "room_key", "limit", "bans", "invited", "founder", "op_accounts", "ban_info",
                 "no_external")

    def __init__(self, name: str, created: int = 0, holder: Optional[str] = None) -> None:
        self.name = name
        self.key = fold(name)
        # A dict used as an ordered set: O(1) membership, cheap iteration for broadcasts.
        self.members: Dict[User, None] = {}
        self.operators: Dict[User, None] = {}
        self.created = created  # ms since the epoch
        self.topic = ""
        self.topic_by = ""
        self.topic_ts = 0
        self.holder = holder  # whose share of the room table it takes (None: the server's)
        self.voiced: Dict[User, None] = {}
        self.flags: Dict[str, bool] = dict(room_rules.FLAG_DEFAULTS)
        self.room_key: Optional[str] = None  # the key `join` must give (IRC +k)
        self.limit: Optional[int] = None  # members it may hold (IRC +l)
        self.bans: List[str] = []  # normalized masks (selchat.core.rooms)
        self.ban_info: Dict[str, Tuple[str, int]] = {}  # mask -> (who set it, ms): IRC's 367
        # IRC's +n, on unless an operator turns it off (our choice: an IRC-only mode, not kept
        # across restarts): off, those outside the room may speak in it too.
        self.no_external = True
        # May join while invite-only, once. Weak: an invitee that leaves the server is not
        # kept (with its connection) by an invitation it can no longer use. Made at the first
        # invitation (a weak dict costs ten times an empty one, and most rooms never invite).
        # The value: the invitation came from an operator (only such a one passes bans).
        self.invited: "Optional[weakref.WeakKeyDictionary[User, bool]]" = None
        self.founder: Optional[str] = None  # the account key it is registered to
        self.op_accounts: Dict[str, None] = {}  # accounts made operators (registered rooms)
        # Made once and kept until what they show changes: a lobby that many join in turn
        # sorts its nicks and reads its history once, not once per joiner.
        self.names_cache: Optional[events.Names] = None  # until a member, op or nick changes
        self.recent_cache: Optional[Tuple[Tuple[events.Message, ...], bool]] = None  # until said


class Delivery:
    """`event` goes to every user in `recipients` except `skip`.

    `room` is set when the recipients are that room's members (a room broadcast, which the
    fan-out may batch). `reply` marks the copy that answers the request being handled: it
    goes to the connection that asked, and the door adds the request's reference (`ref`, an
    IRC label) to it and to nothing else. `mirror` (with `reply`): the user's other
    connections get the same event too, without the reference (one account on several
    devices sees its own joins, nick changes and messages everywhere).
    """

    __slots__ = ("event", "recipients", "skip", "reply", "room", "mirror")

    def __init__(
        self,
        event: events.Event,
        recipients: Iterable[User],
        skip: Optional[User] = None,
        reply: bool = False,
        room: Optional[Room] = None,
        mirror: bool = False,
    ) -> None:
        self.event = event
        self.recipients = recipients
        self.skip = skip
        self.reply = reply
        self.room = room
        self.mirror = mirror

    def __repr__(self) -> str:
        return (f"Delivery({self.event!r}, {list(self.recipients)!r}, skip={self.skip!r}, "
                f"reply={self.reply}, room={self.room.name if self.room else None})")


def reply(event: events.Event, user: User) -> Delivery:
    """To the connection that asked only (an answer: names, history, errors, welcome)."""
    return Delivery(event, (user,), reply=True)


def mirror(event: events.Event, user: User) -> Delivery:
    """To the connection that asked (with its reference) and to the user's other ones."""
    return Delivery(event, (user,), reply=True, mirror=True)


def said(room: "Room", message: events.Message, user: "User") -> List[Delivery]:
    """Where a room message goes: every member but its sender, and the sender's own copy."""
    return [Delivery(message, room.members, skip=user, room=room), mirror(message, user)]


def _noop() -> None:
    pass


def _no_presence(nick: str, user: Optional["User"]) -> None:
    pass


class Chat:
    def __init__(
        self,
        store: Any,
        *,
        server_name: str = "selchat",
        motd: str = "",
        max_presence: int = MAX_PRESENCE,
        history_on_join: int = HISTORY_ON_JOIN,
        max_rooms: int = MAX_ROOMS,
        max_rooms_per_user: int = MAX_ROOMS_PER_USER,
        max_rooms_per_origin: Optional[int] = None,
        room_reserve: Optional[int] = None,
        few_rooms: int = FEW_ROOMS,
        history_bytes: Optional[int] = None,
        started_ms: int = 0,
        operators: Iterable[str] = (),
        registration: bool = True,
        max_accounts: int = MAX_ACCOUNTS,
    ) -> None:
        self.store = store
        self.server_name = server_name
        self.motd = motd
        self.max_presence = max_presence
        self.history_on_join = history_on_join
        self.history_bytes = history_bytes  # history read for one answer stops past this many bytes
        self.max_rooms = max_rooms
        self.max_rooms_per_user = max_rooms_per_user
        self.max_rooms_per_origin = (max(1, max_rooms // ORIGIN_SHARE)
                                     if max_rooms_per_origin is None else max_rooms_per_origin)
        self.room_reserve = max_rooms // RESERVE_SHARE if room_reserve is None else room_reserve
        self.few_rooms = few_rooms
        self.rooms_held: Dict[str, int] = {}  # holder key -> rooms it created that still exist
        self.users: Dict[str, User] = {}
        self.rooms: Dict[str, Room] = {}
        directory = getattr(store, "directory", None)
        self.directory: Directory = directory if directory is not None else Directory()
        self.accounts = Accounts(self.directory, operators, registration, max_accounts)
        self.online: Dict[str, User] = {}  # account key -> the user logged into it
        self.index = RoomIndex()  # the rooms by size and by name, kept up to date
        self.lobby = self._room(LOBBY, started_ms)  # made by the server when it starts
        self.before_change: Callable[[], None] = _noop
        # Told when a nick comes or goes (a user with it arrives, leaves or renames):
        # presence(nick, user) or presence(nick, None). IRC's MONITOR listens here.
        self.presence: Callable[[str, Optional[User]], None] = _no_presence
        # Told of every message kept in history, with its key (a room's, or a pair's '@a/b'):
        # with --redis, the process that decided it copies it to the history all share.
        self.stored: Optional[Callable[[str, events.Message], None]] = None
        self._signals = 0
        self._recent_rooms: Dict[Room, None] = {}  # rooms holding a recent_cache, oldest first
        # Who was here (IRC's WHOWAS): (nick, ident, host, realname) of users who left or
        # changed nick, newest last; bounded, so a nick-change storm costs nothing more.
        self.whowas: "collections.deque[Tuple[str, str, str, str]]" = collections.deque(maxlen=WHOWAS_KEPT)
        self._allocate: Optional[Callable[[], int]] = getattr(store, "allocate_id", None)
        self.last_id: int = store.last_id()

    # --- registration and departure ---------------------------------------------------------

    def register(self, nick: str, session: Any, *, join_lobby: bool = True, ident: str = "",
                 host: str = "selchat", realname: str = "", door: str = "",
                 origin: str = "", now_ms: int = 0, account: Optional[str] = None,
                 remember: bool = False) -> Tuple[User, List[Delivery]]:
        """Add a user with a nick that the door already found well-formed.

        `origin` is where the user comes from as the door sees it (the peer's IP address; for
        IPv6 better its /64): rooms created by users of one origin share one bound.
        `account`: the account this connection proved it owns (the hub checked the password
        or token). If that account is online already, the connection joins that user: it gets
        the user's nick and rooms, and nobody else sees anything.
        """
        key = fold(nick)
        account_key = fold(account) if account is not None else None
        # A token only once nothing can refuse the hello: one the client never gets would
        # still count among the account's 20 and push out the oldest real one.
        token = None
        if account_key is not None:
            user = self.online.get(account_key)
            if user is not None:
                if remember:
                    token = self.accounts.issue_token(account_key, now_ms)
                return user, self._attach(user, session, token)
        holder = self.users.get(key)
        if holder is not None:
            raise ChatError("nick_taken", f"nick {nick!r} is taken")
        if self.accounts.exists(key) and key != account_key:
            raise ChatError("nick_reserved", f"nick {nick!r} belongs to an account: log in "
                            "to use it")
        if remember and account_key is not None:
            token = self.accounts.issue_token(account_key, now_ms)
        user = User(nick, session, ident, host, realname, door, origin)
        user.since = now_ms
        self.users[key] = user
        if account_key is not None:
            self._log_in(user, account_key)
        out = [reply(events.Welcome(nick, self.server_name, self.motd, user.account, token), user)]
        if join_lobby:
            self._join(user, self.lobby, out)
        if account_key is not None:
            self._deliver_mail(user, out)
        self.presence(nick, user)
        return user, out

    def _attach(self, user: User, session: Any, token: Optional[str]) -> List[Delivery]:
        """One more connection of a logged-in user: it sees the user as the others do."""
        self.before_change()  # what was batched before it came is not for it (nor before welcome)
        user.sessions.append(session)
        out = [reply(events.Welcome(user.nick, self.server_name, self.motd, user.account, token),
                     user)]
        out.extend(self._rooms_shown(user))
        return out

    def _log_in(self, user: User, account_key: str) -> None:
        user.account = self.accounts.name(account_key)
        user.account_key = account_key
        self.online[account_key] = user
        for room in user.rooms.values():
            room.names_cache = None

    def _deliver_mail(self, user: User, out: List[Delivery]) -> None:
        """What was sent to the account while it was away: one `history` per conversation."""
        mail = self.directory.take_mail(user.account_key)  # type: ignore[arg-type]
        by_partner: Dict[str, List[events.Message]] = {}
        for m in mail:
            by_partner.setdefault(m.account or m.sender, []).append(m)
        for partner, messages in by_partner.items():
            out.append(reply(events.History(None, tuple(messages), False, with_=partner), user))

    def disconnect(self, user: User, reason: str, session: Any = None) -> List[Delivery]:
        """A connection goes, for any reason (quit, closed, timeout, ...). The user leaves when
        its last connection does: then those sharing a room see `quit`."""
        if self.users.get(user.key) is not user:
            return []
        if session is not None and len(user.sessions) > 1:
            if session in user.sessions:
                self.before_change()  # what was said while it was there still reaches it
                user.sessions.remove(session)
            return []
        self.before_change()
        del self.users[user.key]
        self.whowas.append((user.nick, user.ident, user.host, user.realname))
        self.presence(user.nick, None)
        if user.account_key is not None and self.online.get(user.account_key) is user:
            del self.online[user.account_key]
        event = events.Quit(user.nick, reason, user.userhost)
        recipients: Dict[User, None] = {}
        for room in list(user.rooms.values()):
            if len(room.members) <= self.max_presence:
                recipients.update(room.members)
            self._leave(user, room)
        recipients.pop(user, None)
        return [Delivery(event, recipients)] if recipients else []

    # --- requests ---------------------------------------------------------------------------

    def handle(self, user: User, request: Request, now_ms: int) -> List[Delivery]:
        """Carry out one request of a registered user; raise ChatError when it is refused."""
        kind = type(request)
        if kind is Say:
            return self.say(user, request.room, request.text, now_ms, request.action,  # type: ignore[union-attr]
                            request.notice, request.client_tags)  # type: ignore[union-attr]
        if kind is Msg:
            return self.private(user, request.to, request.text, now_ms, request.action,  # type: ignore[union-attr]
                                request.notice, request.client_tags)  # type: ignore[union-attr]
        if kind is JoinRoom:
            return self.join(user, request.room, now_ms, request.key)  # type: ignore[union-attr]
        if kind is PartRoom:
            return self.part(user, request.room, request.reason or "")  # type: ignore[union-attr]
        if kind is ChangeNick:
            return self.change_nick(user, request.nick)  # type: ignore[union-attr]
        if kind is Who:
            room = self.rooms.get(fold(request.room))  # type: ignore[union-attr]
            if room is None or not self.may_see(user, room):
                return [reply(events.Names(request.room, ()), user)]  # type: ignore[union-attr]
            return [reply(self._names(room), user)]
        if kind is ListRooms:
            return [reply(self.room_list(request.offset, user), user)]  # type: ignore[union-attr]
        if kind is HistoryRequest:
            return self.history(user, request)  # type: ignore[arg-type]
        if kind is Tag:
            return self.signal(user, request.target, request.client_tags)  # type: ignore[union-attr]
        if kind is SetTopic:
            return self.set_topic(user, request.room, request.text, now_ms)  # type: ignore[union-attr]
        if kind is KickUser:
            return self.kick(user, request.room, request.nick, request.reason)  # type: ignore[union-attr]
        if kind is InviteUser:
            return self.invite(user, request.room, request.nick)  # type: ignore[union-attr]
        if kind is SetModes:
            return self.mode(user, request.room, request.changes, now_ms)  # type: ignore[union-attr]
        raise TypeError(f"not a chat request: {request!r}")  # pragma: no cover - a door's bug

    def next_id(self) -> int:
        """The next message id, made durable by the store before it is used."""
        if self._allocate is not None:
            try:
                message_id = self._allocate()
            except StoreError as exc:
                log.error("cannot reserve message ids: %s", exc)
                raise ChatError("not_stored", "the message cannot be stored right now; "
                                "it was not sent") from None
        else:
            message_id = self.last_id + 1
        self.last_id = message_id
        return message_id

    def say(self, user: User, room_name: str, text: str, now_ms: int,
            action: bool = False, notice: bool = False,
            client_tags: Tuple[Tuple[str, str], ...] = ()) -> List[Delivery]:
        room, message = self.say_message(user, room_name, text, now_ms, action, notice, client_tags)
        return said(room, message, user)

    def say_message(self, user: User, room_name: str, text: str, now_ms: int,
                    action: bool = False, notice: bool = False,
                    client_tags: Tuple[Tuple[str, str], ...] = ()) -> Tuple[Room, events.Message]:
        """The rule of a room message, once: the room and the message, stored. `say` makes its
        deliveries; the hub, for a sender in the room (the busy case), batches it directly."""
        room = user.rooms.get(fold(room_name))
        if room is None:
            room = self.rooms.get(fold(room_name))
            if room is None or room.no_external:
                raise ChatError("not_in_room", f"you are not in {room_name}")
        if (room.flags["moderated"] or room.bans) and not self._may_speak(user, room):
            if room.flags["moderated"]:
                raise ChatError("moderated", f"{room.name} is moderated: only operators and "
                                "voiced members may speak")
            raise ChatError("banned", f"you are banned from {room.name}")
        message = events.Message(self.next_id(), now_ms, user.nick, text, room.name, None,
                                 action, notice, user.userhost, client_tags, user.account)
        self.store.add(message)
        if self.stored is not None:
            self.stored(room.name.lower(), message)  # (the store's key for a room)
        if room.recent_cache is not None:
            self._forget_recent(room)
        return room, message

    def _may_speak(self, user: User, room: Room) -> bool:
        if user in room.operators or user in room.voiced or self.accounts.is_operator(user.account_key):
            return True
        return not room.flags["moderated"] and not self._banned(user, room)

    def _forget_recent(self, room: Room) -> None:
        """The history sent on join is made again next time (it changed, or the room is gone)."""
        if room.recent_cache is not None:
            room.recent_cache = None
            self._recent_rooms.pop(room, None)

    def find_user(self, nick: str) -> Optional[User]:
        """The user with this nick, or the one logged into the account of this name."""
        if not valid_nick(nick):
            return None
        key = fold(nick)
        return self.users.get(key) or self.online.get(key)

    def private(self, user: User, to: str, text: str, now_ms: int,
                action: bool = False, notice: bool = False,
                client_tags: Tuple[Tuple[str, str], ...] = ()) -> List[Delivery]:
        target = self.find_user(to)
        away_key = None
        if target is None:
            away_key = fold(to) if valid_nick(to) and self.accounts.exists(fold(to)) else None
            if away_key is None:
                raise ChatError("no_such_nick", f"no user is called {shorten(to)!r}")
            if notice:  # an IRC NOTICE is never kept for later: nothing may answer it then
                raise ChatError("no_such_nick", f"{shorten(to)!r} is not connected")
            to_name = self.accounts.name(away_key) or to
        else:
            to_name = target.nick
        message = events.Message(self.next_id(), now_ms, user.nick, text, None, to_name,
                                 action, notice, user.userhost, client_tags, user.account)
        partner_key = target.account_key if target is not None else away_key
        if away_key is not None and not self.directory.add_mail(away_key, message):
            raise ChatError("mailbox_full", f"{to_name} has too many messages waiting")
        if user.account_key is not None and partner_key is not None and not notice:
            pair = pair_key(user.account_key, partner_key)
            self.store.add_private(message, pair)
            if self.stored is not None:
                self.stored(pair, message)
        else:
            self.store.note_id(message.id)
        out = [mirror(message, user)]
        if target is not None and target is not user:
            out.append(Delivery(message, (target,)))
        return out

    def signal(self, user: User, target: str, client_tags: Tuple[Tuple[str, str], ...]) -> List[Delivery]:
        """Client tags without text, to a room's members or one user; nothing is stored."""
        self._signals += 1
        tag_id = f"s{self._signals}"
        if target.startswith("#"):
            room = user.rooms.get(fold(target))
            if room is None:
                raise ChatError("not_in_room", f"you are not in {shorten(target)}")
            event = events.Signal(user.nick, client_tags, room.name, None, user.userhost, tag_id)
            return [Delivery(event, room.members, skip=user), mirror(event, user)]
        to = self.find_user(target)
        if to is None:
            raise ChatError("no_such_nick", f"no user is called {shorten(target)!r}")
        event = events.Signal(user.nick, client_tags, None, to.nick, user.userhost, tag_id)
        out = [mirror(event, user)]
        if to is not user:
            out.append(Delivery(event, (to,)))
        return out

    def join(self, user: User, room_name: str, now_ms: int = 0,
             key: Optional[str] = None) -> List[Delivery]:
        room_key = fold(room_name)
        room = user.rooms.get(room_key)
        out: List[Delivery] = []
        if room is not None:  # already there: a no-op that still answers names
            out.append(reply(self._names(room), user))
            return out
        if len(user.rooms) >= self.max_rooms_per_user:
            raise ChatError("too_many_rooms", f"you are in {self.max_rooms_per_user} rooms already")
        room = self.rooms.get(room_key)
        checked = False
        if room is None:
            registered = self.directory.rooms.get(room_key)
            if registered is not None:
                if len(self.rooms) >= self.max_rooms:  # it takes a place in the table too
                    raise ChatError("too_many_rooms", "the server has as many rooms as it may hold")
                room = self._revive(room_key, registered, now_ms)
                try:
                    self._may_join(user, room, key)
                except ChatError:
                    self._drop_empty(room)  # nobody got in: it stays only in the store
                    raise
                checked = True
        if room is None:
            self._may_create(user)
            room = self._room(room_name, now_ms, user.holder)
            room.operators[user] = None  # whoever creates a room is its operator
            if (user.account_key is not None  # and a logged-in creator registers it
                    and self.directory.founded.get(user.account_key, 0) < ROOMS_FOUNDED):
                room.founder = user.account_key
                self._save_room(room)
        elif not checked:
            self._may_join(user, room, key)
        if room.invited is not None:
            room.invited.pop(user, None)
        if user.account_key is not None and (user.account_key == room.founder
                                             or user.account_key in room.op_accounts):
            room.operators[user] = None
        self._join(user, room, out)
        return out

    def _may_join(self, user: User, room: Room, key: Optional[str]) -> None:
        """The room's rules for a newcomer (IRC's order: ban, invite, key, limit); server
        operators and those the founder's account names pass, an invitation passes the
        invite-only rule and the ban."""
        if self.accounts.is_operator(user.account_key):
            return
        if user.account_key is not None and (user.account_key == room.founder
                                             or user.account_key in room.op_accounts):
            return
        invited = room.invited is not None and user in room.invited
        by_operator = invited and room.invited[user]  # type: ignore[index]
        if room.bans and not by_operator and self._banned(user, room):
            raise ChatError("banned", f"you are banned from {room.name}")
        if room.flags["invite_only"] and not invited:
            raise ChatError("invite_only", f"{room.name} is invite-only")
        if room.room_key is not None and key != room.room_key:
            raise ChatError("bad_key", f"{room.name} needs the right key")
        if room.limit is not None and len(room.members) >= room.limit:
            raise ChatError("room_full", f"{room.name} is full")

    def _banned(self, user: User, room: Room) -> bool:
        hosts = (user.host, user.origin)
        return any(room_rules.mask_matches(mask, user.nick, user.ident, hosts, user.account_key)
                   for mask in room.bans)

    def part(self, user: User, room_name: str, reason: str = "") -> List[Delivery]:
        room = user.rooms.get(fold(room_name))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {room_name}")
        self.before_change()
        event = events.Part(room.name, user.nick, user.userhost, reason)
        if len(room.members) > self.max_presence:
            out = [mirror(event, user)]
        else:
            out = [Delivery(event, tuple(room.members), skip=user), mirror(event, user)]
        self._leave(user, room)
        return out

    def change_nick(self, user: User, nick: str) -> List[Delivery]:
        if nick == user.nick:
            # Nothing changes: only the asker hears back, so nobody sees an old == new event.
            return [reply(events.NickChange(nick, nick, user.userhost), user)]
        key = fold(nick)
        holder = self.users.get(key)
        if holder is not None and holder is not user:
            raise ChatError("nick_taken", f"nick {nick!r} is taken")
        if key != user.account_key and self.accounts.exists(key):
            raise ChatError("nick_reserved", f"nick {nick!r} belongs to an account")
        self.before_change()
        event = events.NickChange(user.nick, nick, user.userhost)
        self.whowas.append((user.nick, user.ident, user.host, user.realname))
        renamed = key != user.key  # not only the letters' case: the old nick is free now
        del self.users[user.key]
        if renamed:
            self.presence(user.nick, None)
        user.nick = nick
        user.key = key
        self.users[key] = user
        if renamed:
            self.presence(nick, user)
        recipients: Dict[User, None] = {}
        for room in user.rooms.values():
            room.names_cache = None
            if len(room.members) <= self.max_presence:
                recipients.update(room.members)
        recipients.pop(user, None)
        out = [mirror(event, user)]
        if recipients:
            out.insert(0, Delivery(event, recipients))
        return out

    def was(self, nick: str, count: int = 0) -> List[Tuple[str, str, str, str]]:
        """Who had `nick` (any case), newest first; at most `count` of them (0: all kept)."""
        key = fold(nick)
        found = [w for w in reversed(self.whowas) if fold(w[0]) == key]
        return found[:count] if count > 0 else found

    def set_away(self, user: User, text: Optional[str]) -> None:
        user.away = text or None

    @staticmethod
    def may_see(user: Optional[User], room: Room) -> bool:
        """A secret room is, to anyone not in it, a room that does not exist: its members,
        modes and bans are not shown (as `rooms` leaves it out and IRC's NAMES shows nothing)."""
        return not room.flags["secret"] or (user is not None and user in room.members)

    def names(self, room_name: str) -> events.Names:
        room = self.rooms.get(fold(room_name))
        if room is None:
            return events.Names(room_name, ())
        return self._names(room)

    def room_list(self, offset: int = 0, user: Optional[User] = None) -> events.RoomList:
        """Every room, largest first, as a view of the index: what a door reads of it costs
        what it reads, however many rooms there are. The view is valid until the next change,
        so a door encodes it at once (the fan-out does). Secret rooms are not in the index:
        the asker's own come last."""
        own: Tuple[events.RoomInfo, ...] = ()
        if user is not None:
            own = tuple(events.RoomInfo(r.name, len(r.members)) for r in user.rooms.values()
                        if r.flags["secret"])
        return events.RoomList(RoomsBySize(self, own), offset)

    def rooms_by_name(self, after: str = "", count: int = 100) -> List[Room]:
        """Up to `count` rooms whose key comes after `after`, in key order (IRC's LIST pages
        with this: a cursor by name stays right while rooms come and go)."""
        rooms = self.rooms
        return [rooms[key] for key in self.index.by_key(after, count)]

    def history(self, user: User, request: HistoryRequest) -> List[Delivery]:
        budget = request.max_bytes if request.max_bytes is not None else self.history_bytes
        if request.with_ is not None:
            return self._private_history(user, request, budget)
        room = user.rooms.get(fold(request.room))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {request.room}")
        try:
            messages, more = self.store.recent(room.name, request.before, request.limit, budget)
        except StoreError as exc:
            log.error("history read failed: %s", exc)
            raise ChatError("history_unavailable", "history cannot be read right now") from None
        return [reply(events.History(room.name, tuple(messages), more), user)]

    def partner_account(self, name: str) -> Optional[str]:
        """The account key behind `name`: a connected user's account, or an account's name."""
        target = self.find_user(name)
        if target is not None:
            return target.account_key
        key = fold(name)
        return key if valid_nick(name) and self.accounts.exists(key) else None

    def _private_history(self, user: User, request: HistoryRequest,
                         budget: Optional[int]) -> List[Delivery]:
        if user.account_key is None:
            raise ChatError("not_logged_in", "private history is kept for accounts only: "
                            "register or log in")
        partner = self.partner_account(request.with_)  # type: ignore[arg-type]
        if partner is None:
            raise ChatError("no_such_nick", f"{shorten(request.with_ or '')!r} is not an account")
        try:
            messages, more = self.store.recent(pair_key(user.account_key, partner),
                                               request.before, request.limit, budget)
        except StoreError as exc:
            log.error("history read failed: %s", exc)
            raise ChatError("history_unavailable", "history cannot be read right now") from None
        name = self.accounts.name(partner) or request.with_
        return [reply(events.History(None, tuple(messages), more, with_=name), user)]

    # --- running rooms (contract 11.2) ------------------------------------------------------

    def is_operator(self, user: User, room: Room) -> bool:
        return user in room.operators or self.accounts.is_operator(user.account_key)

    def _room_of(self, user: User, room_name: str) -> Room:
        room = user.rooms.get(fold(room_name))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {shorten(room_name)}")
        return room

    def _need_operator(self, user: User, room: Room) -> None:
        if not self.is_operator(user, room):
            raise ChatError("not_operator", f"you are not an operator of {room.name}")

    def set_topic(self, user: User, room_name: str, text: str, now_ms: int) -> List[Delivery]:
        room = self._room_of(user, room_name)
        if room.flags["topic_locked"]:
            self._need_operator(user, room)
        room.topic, room.topic_by, room.topic_ts = text, user.nick, now_ms
        self._save_room(room)
        event = events.Topic(room.name, text, user.nick, now_ms)
        return [Delivery(event, room.members, skip=user), mirror(event, user)]

    def kick(self, user: User, room_name: str, nick: str, reason: str = "") -> List[Delivery]:
        room = self._room_of(user, room_name)
        self._need_operator(user, room)
        target = self._member(room, nick)
        self.before_change()
        event = events.Kick(room.name, target.nick, user.nick, reason or user.nick, user.userhost)
        out = [Delivery(event, tuple(room.members), skip=user), mirror(event, user)]
        self._leave(target, room)
        return out

    def _member(self, room: Room, nick: str) -> User:
        target = self.users.get(fold(nick)) if valid_nick(nick) else None
        if target is None or target not in room.members:
            raise ChatError("no_such_nick", f"{shorten(nick)!r} is not in {room.name}")
        return target

    def invite(self, user: User, room_name: str, nick: str) -> List[Delivery]:
        """(our choice, as IRC) anyone in a room may invite to it, unless it is invite-only:
        then only its operators."""
        room = self._room_of(user, room_name)
        if room.flags["invite_only"]:
            self._need_operator(user, room)
        target = self.find_user(nick)
        if target is None:
            raise ChatError("no_such_nick", f"no user is called {shorten(nick)!r}")
        if target in room.members:
            raise ChatError("already_in_room", f"{target.nick} is in {room.name} already")
        invited = room.invited
        if invited is None:
            invited = room.invited = weakref.WeakKeyDictionary()
        invited.pop(target, None)
        if len(invited) >= room_rules.MAX_INVITES:
            del invited[next(iter(invited))]
        invited[target] = self.is_operator(user, room)
        event = events.Invite(room.name, user.nick, target.nick, user.userhost)
        return [Delivery(event, (target,)), reply(event, user)]

    def mode_info(self, room: Room, user: User) -> events.ModeInfo:
        modes: List[Tuple[str, object]] = [(name, room.flags[name]) for name in MODE_FLAGS]
        key: object = room.room_key
        if key is not None and user not in room.members:
            key = "*"  # (our choice) members see a room's key, others only that there is one
        modes += [("key", key), ("limit", room.limit)]
        info = room.ban_info
        setters = tuple((mask,) + info.get(mask, ("", 0)) for mask in room.bans)
        return events.ModeInfo(room.name, tuple(modes), tuple(room.bans), room.created, setters)

    def mode(self, user: User, room_name: str,
             changes: Tuple[Tuple[str, object], ...], now_ms: int = 0) -> List[Delivery]:
        """Apply `changes` in order; everyone in the room sees what really changed."""
        if not changes:
            room = self.rooms.get(fold(room_name))
            if room is None or not self.may_see(user, room):
                raise ChatError("no_such_room", f"there is no room {shorten(room_name)}")
            return [reply(self.mode_info(room, user), user)]
        room = self._room_of(user, room_name)
        self._need_operator(user, room)
        # Every nick and mask is checked before anything is changed: a request is done whole
        # or refused whole.
        targets: List[Tuple[str, Tuple[Any, ...]]] = []
        bans = set(room.bans)  # the ban list as it would be, so a full one refuses it all
        for name, value in changes:
            if name in ("op", "deop", "voice", "devoice"):
                targets.append((name, tuple(self._member(room, n) for n in value)))  # type: ignore[union-attr]
            elif name in ("ban", "unban"):
                try:
                    masks = tuple(room_rules.normalize_mask(m) for m in value)  # type: ignore[union-attr]
                except room_rules.BadMask as exc:
                    raise ChatError("bad_request", str(exc)) from None
                if name == "unban":
                    bans.difference_update(masks)
                elif len(bans.union(masks)) > room_rules.MAX_BANS:
                    raise ChatError("ban_list_full", f"{room.name} may hold "
                                    f"{room_rules.MAX_BANS} bans")
                else:
                    bans.update(masks)
                targets.append((name, masks))
            elif name == "key":
                if value is not None and (not isinstance(value, str) or not value or len(value) > room_rules.KEY_MAX
                                          or any(c.isspace() or c == "," or ord(c) < 32 for c in value)):
                    raise ChatError("bad_request", f"a key is 1..{room_rules.KEY_MAX} characters "
                                    "without spaces or commas")
                targets.append((name, (value,)))
            else:
                targets.append((name, (value,)))
        done: List[Tuple[str, object]] = []
        self.before_change()
        for name, values in targets:
            if name in MODE_FLAGS:
                if room.flags[name] != values[0]:
                    room.flags[name] = bool(values[0])
                    if name == "secret":
                        self._set_secret(room, bool(values[0]))
                    done.append((name, bool(values[0])))
            elif name == "key":
                if room.room_key != values[0]:
                    room.room_key = values[0]
                    done.append((name, values[0]))
            elif name == "no_external":
                if room.no_external != bool(values[0]):
                    room.no_external = bool(values[0])
                    done.append((name, bool(values[0])))
            elif name == "limit":
                if room.limit != values[0]:
                    room.limit = values[0]
                    done.append((name, values[0]))
            else:
                changed = self._apply_list(room, name, values, f"{user.nick}!{user.userhost}", now_ms)
                if changed:
                    done.append((name, tuple(changed)))
        if not done:
            return [reply(events.ModeChange(room.name, user.nick, (), user.userhost), user)]
        room.names_cache = None
        self._save_room(room)
        event = events.ModeChange(room.name, user.nick, tuple(done), user.userhost)
        return [Delivery(event, room.members, skip=user), mirror(event, user)]

    def _apply_list(self, room: Room, name: str, values: Tuple[Any, ...], by: str = "",
                    now_ms: int = 0) -> List[str]:
        changed: List[str] = []
        if name in ("op", "voice"):
            table = room.operators if name == "op" else room.voiced
            for target in values:
                if target not in table:
                    table[target] = None
                    changed.append(target.nick)
                    if name == "op" and target.account_key is not None and room.founder is not None:
                        room.op_accounts[target.account_key] = None
        elif name in ("deop", "devoice"):
            table = room.operators if name == "deop" else room.voiced
            for target in values:
                if target in table:
                    del table[target]
                    changed.append(target.nick)
                    if name == "deop" and target.account_key is not None:
                        room.op_accounts.pop(target.account_key, None)
        elif name == "ban":
            for mask in values:
                if mask not in room.bans:
                    if len(room.bans) >= room_rules.MAX_BANS:
                        raise ChatError("ban_list_full", f"{room.name} has "
                                        f"{room_rules.MAX_BANS} bans already")
                    room.bans.append(mask)
                    room.ban_info[mask] = (by, now_ms)
                    changed.append(mask)
        else:  # unban
            for mask in values:
                if mask in room.bans:
                    room.bans.remove(mask)
                    room.ban_info.pop(mask, None)
                    changed.append(mask)
        return changed

    def _set_secret(self, room: Room, secret: bool) -> None:
        """Secret rooms are left out of the index that `rooms` and IRC's LIST read."""
        if secret:
            self.index.remove(room.key, len(room.members))
        else:
            self.index.add(room.key, len(room.members))

    def kill_target(self, user: User, nick: str) -> User:
        """Who a server operator's `kill` closes; the hub closes its connections."""
        if not self.accounts.is_operator(user.account_key):
            raise ChatError("not_operator", "only server operators may kill")
        target = self.users.get(fold(nick)) if valid_nick(nick) else None
        if target is None:
            raise ChatError("no_such_nick", f"no user is called {shorten(nick)!r}")
        return target

    def _save_room(self, room: Room) -> None:
        if room.founder is None:
            return
        self.directory.save_room(room.key, room.name, room.founder, room_rules.dump_state(
            room.topic, room.topic_by, room.topic_ts, room.flags, room.room_key, room.limit,
            room.bans, list(room.op_accounts)))

    def _revive(self, key: str, registered: Tuple[str, str, str], now_ms: int) -> Room:
        """A registered room, empty until now, comes back as it was left."""
        name, founder, text = registered
        state = room_rules.load_state(text)
        room = self._room(name, now_ms, None)
        room.founder = founder
        room.topic, room.topic_by, room.topic_ts = state["topic"], state["topic_by"], state["topic_ts"]
        room.flags.update(state["flags"])
        room.room_key, room.limit = state["key"], state["limit"]
        room.bans = list(state["bans"])
        room.op_accounts = dict.fromkeys(state["ops"])
        if room.flags["secret"]:
            self.index.remove(room.key, 0)
        return room

    # --- accounts (contract 11.1): the hub runs the password work, the chat decides ----------

    def may_register_account(self, user: User) -> None:
        if not self.accounts.registration:
            raise ChatError("registration_closed", "this server does not take new accounts")
        if user.account_key is not None:
            raise ChatError("already_registered", f"you are logged in as {user.account} already")
        if self.accounts.exists(user.key):
            raise ChatError("already_registered", f"{user.nick} is an account already")
        if self.accounts.full():
            log.warning("registration refused: the server holds %d accounts, its most",
                        self.accounts.max_accounts)
            raise ChatError("registration_closed", f"this server holds its most accounts "
                            f"({self.accounts.max_accounts:,}): ask its operator")

    def register_account(self, user: User, verifier: str, now_ms: int,
                         token: bool = False) -> List[Delivery]:
        """The hub made `verifier` from the password: `user`'s nick becomes an account."""
        self.may_register_account(user)  # again: the hashing took a while
        self.accounts.create(user.nick, verifier, now_ms)
        return self._logged_in(user, user.key, now_ms, token)

    def login_check(self, account: str, address: str, now: float, token: bool = False) -> str:
        """Before any password work: the account's key, or login_throttled / login_failed.
        A `token` login is limited per address only: 32 random bytes are not guessed, and
        refusing the right one would let a password guesser lock the account's devices out."""
        key = fold(account)
        wait = self.accounts.throttle.wait(None if token else key, address, now)
        if wait > 0:
            raise ChatError("login_throttled", f"too many failed logins: try again in "
                            f"{int(wait) + 1} s")
        return key

    def login_failed(self, key: str, address: str, now: float, token: bool = False) -> ChatError:
        counted = key if self.accounts.exists(key) and not token else None
        self.accounts.throttle.failed(counted, address, now)
        return ChatError("login_failed", "wrong account or password")

    def login_refund(self, key: str, address: str, now: float) -> None:
        """A try charged before the password work is given back: the password was right, or
        it could not be checked."""
        self.accounts.throttle.refund(key if self.accounts.exists(key) else None, address, now)

    def log_in(self, user: User, key: str, session: Any, now_ms: int,
               token: bool = False) -> List[Delivery]:
        """A registered user proved it owns account `key` (after welcome)."""
        if user.account_key is not None:
            raise ChatError("already_registered", f"you are logged in as {user.account} already")
        other = self.online.get(key)
        if other is not None:
            return self._move(user, other, session, now_ms, token)
        holder = self.users.get(key)
        if holder is not None and holder is not user:  # a guest holds the name: only possible
            pass  # before the account existed; the account owner keeps its current nick
        return self._logged_in(user, key, now_ms, token)

    def _logged_in(self, user: User, key: str, now_ms: int, token: bool) -> List[Delivery]:
        self._log_in(user, key)
        issued = self.accounts.issue_token(key, now_ms) if token else None
        out = [mirror(events.AccountInfo(user.account, user.nick, None), user)]
        if issued is not None:
            out[0] = reply(events.AccountInfo(user.account, user.nick, issued), user)
        change = events.AccountChange(user.nick, user.account, user.userhost)
        mates = self._room_mates(user)
        if mates:
            out.append(Delivery(change, mates))
        # Rooms whose founder or operator list names the account: operator there now.
        for room in user.rooms.values():
            if key == room.founder or key in room.op_accounts:
                if user not in room.operators:
                    room.operators[user] = None
                    room.names_cache = None
                    event = events.ModeChange(room.name, self.server_name, (("op", (user.nick,)),))
                    out.append(Delivery(event, room.members))
        self._deliver_mail(user, out)
        return out

    def _move(self, guest: User, owner: User, session: Any, now_ms: int,
              token: bool) -> List[Delivery]:
        """A guest connection logs into an account that is online elsewhere: it leaves its
        guest self (others see it quit) and becomes one more connection of the owner."""
        out: List[Delivery] = []
        for room in list(guest.rooms.values()):
            out.append(reply(events.Part(room.name, guest.nick, guest.userhost, "logged in"), guest))
        if len(guest.sessions) > 1:  # (a guest has one connection; kept safe anyway)
            guest.sessions.remove(session)
        else:
            out.extend(self.disconnect(guest, f"logged in as {owner.nick}"))
        issued = self.accounts.issue_token(owner.account_key, now_ms) if token else None  # type: ignore[arg-type]
        owner.sessions.append(session)
        out.append(reply(events.AccountInfo(owner.account, owner.nick, issued), owner))
        if guest.nick != owner.nick:
            out.append(reply(events.NickChange(guest.nick, owner.nick, owner.userhost), owner))
        out.extend(self._rooms_shown(owner))
        return out

    def set_password(self, user: User, verifier: str, now_ms: int = 0,
                     token: bool = False) -> List[Delivery]:
        if user.account_key is None:
            raise ChatError("not_logged_in", "log in first")
        self.accounts.set_verifier(user.account_key, verifier)
        # A new password ends every remember-me token of the account: one that leaked with
        # the old password must not outlive it (the connections open now stay). The device
        # that changed it may ask for a new one (`remember`), to stay logged in.
        self.accounts.revoke(user.account_key, None)
        issued = self.accounts.issue_token(user.account_key, now_ms) if token else None
        return [reply(events.AccountInfo(user.account, user.nick, issued), user)]

    def log_out(self, user: User, token: Optional[str]) -> List[Delivery]:
        """Forget a remember-me token (or all of the account's); the door then closes."""
        if user.account_key is None:
            raise ChatError("not_logged_in", "you are not logged in")
        self.accounts.revoke(user.account_key, token)
        return [reply(events.AccountInfo(None, user.nick), user)]

    def _room_mates(self, user: User) -> Dict[User, None]:
        mates: Dict[User, None] = {}
        for room in user.rooms.values():
            if len(room.members) <= self.max_presence:
                mates.update(room.members)
        mates.pop(user, None)
        return mates

    # --- helpers ----------------------------------------------------------------------------

    def _may_create(self, user: User) -> None:
        """Raise `too_many_rooms` unless `user` may create a room now.

        A global cap alone makes the table a pool that a few addresses can drain; a cap per
        origin bounds each address, and the reserve keeps the last rooms for origins that hold
        few, so a newcomer can create a room even when many addresses hoard their share.
        """
        count = len(self.rooms)
        if count >= self.max_rooms:
            raise ChatError("too_many_rooms", "the server has as many rooms as it may hold")
        held = self.rooms_held.get(user.holder, 0)
        if held >= self.max_rooms_per_origin:
            raise ChatError("too_many_rooms", f"rooms created from your address: {held} exist "
                            f"already, the most one address may hold")
        if held >= self.few_rooms and count >= self.max_rooms - self.room_reserve:
            raise ChatError("too_many_rooms", "the server is nearly full of rooms; the last "
                            "ones are kept for those who hold few")

    def _room(self, name: str, now_ms: int, holder: Optional[str] = None) -> Room:
        room = Room(name, now_ms, holder)
        self.rooms[room.key] = room
        self.index.add(room.key)
        if holder is not None:
            self.rooms_held[holder] = self.rooms_held.get(holder, 0) + 1
        return room

    def _join(self, user: User, room: Room, out: List[Delivery]) -> None:
        """Membership, then `join` (to all or, in a large room, the joiner), `names`, `topic`,
        `history`; the user's other connections see the same."""
        self.before_change()
        room.members[user] = None
        size = len(room.members)
        if not room.flags["secret"]:
            self.index.resize(room.key, size - 1, size)
        room.names_cache = None
        user.rooms[room.key] = room
        event = events.Join(room.name, user.nick, user.userhost, user.account, user.realname)
        large = len(room.members) > self.max_presence
        if not large:
            out.append(Delivery(event, room.members, skip=user))
        out.append(mirror(event, user))
        out.extend(self._room_view(user, room, mirror, names=not large))

    def _rooms_shown(self, user: User) -> List[Delivery]:
        """To a connection that just became one of `user`'s: a join, and the room's view, for
        every room the user is in."""
        out: List[Delivery] = []
        for room in user.rooms.values():
            out.append(reply(events.Join(room.name, user.nick, user.userhost, user.account,
                                         user.realname), user))
            out.extend(self._room_view(user, room, reply))
        return out

    def _room_view(self, user: User, room: Room, to: Callable[[events.Event, User], Delivery],
                   names: bool = True) -> List[Delivery]:
        """What a member is shown of a room it is in: names, topic, recent history."""
        out: List[Delivery] = []
        if names:
            out.append(to(self._names(room), user))
        if room.topic:
            out.append(to(events.Topic(room.name, room.topic, room.topic_by, room.topic_ts), user))
        recent = room.recent_cache
        if recent is None:
            try:
                messages, more = self.store.recent(room.name, None, self.history_on_join,
                                                   self.history_bytes)
                recent = room.recent_cache = (tuple(messages), more)
                # Kept for the RECENT_CACHED rooms last joined only: each may hold up to a
                # frame of messages, and 10,000 of them would be a table without a bound.
                cached = self._recent_rooms
                cached[room] = None
                if len(cached) > RECENT_CACHED:
                    self._forget_recent(next(iter(cached)))
            except StoreError as exc:
                # The join stands; the history is empty and says older messages exist, so a
                # client can ask again with `history` later.
                log.error("history read failed: %s", exc)
                recent = ((), True)
        out.append(to(events.History(room.name, recent[0], recent[1]), user))
        return out

    def _leave(self, user: User, room: Room) -> None:
        del room.members[user]
        size = len(room.members)
        if not room.flags["secret"]:
            self.index.resize(room.key, size + 1, size)
        room.names_cache = None
        room.operators.pop(user, None)
        room.voiced.pop(user, None)
        del user.rooms[room.key]
        if not room.members and room is not self.lobby:
            self._drop_empty(room)

    def _drop_empty(self, room: Room) -> None:
        """An empty room goes (a registered one lives on in the store's directory)."""
        del self.rooms[room.key]
        if not room.flags["secret"]:
            self.index.remove(room.key, 0)
        self._forget_recent(room)
        holder = room.holder
        if holder is not None:
            left = self.rooms_held[holder] - 1
            if left:
                self.rooms_held[holder] = left
            else:
                del self.rooms_held[holder]

    @staticmethod
    def _sorted(users: Iterable[User]) -> Tuple[str, ...]:
        return tuple(sorted((u.nick for u in users), key=lambda n: (n.lower(), n)))

    def _names(self, room: Room) -> events.Names:
        names = room.names_cache
        if names is None:
            accounts = tuple((u.nick, u.account) for u in room.members if u.account is not None)
            names = room.names_cache = events.Names(
                room.name, self._sorted(room.members), self._sorted(room.operators),
                self._sorted(room.voiced), accounts)  # type: ignore[arg-type]
        return names


class RoomsBySize(Sequence):  # type: ignore[type-arg]
    """The chat's rooms, largest first, read from its index one entry at a time; then the
    asker's own secret rooms (`own`), which the index leaves out."""

    __slots__ = ("_chat", "_own")

    def __init__(self, chat: Chat, own: Tuple[events.RoomInfo, ...] = ()) -> None:
        self._chat = chat
        self._own = own

    def __len__(self) -> int:
        return len(self._chat.index) + len(self._own)

    def __getitem__(self, position: Any) -> Any:
        chat = self._chat
        public = len(chat.index)
        if isinstance(position, slice):
            start, stop, step = position.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            rooms = chat.rooms
            Info = events.RoomInfo
            head = [Info(room.name, len(room.members))
                    for room in [rooms[key] for key in chat.index.by_size(start, max(0, min(stop, public) - start))]] \
                if start < public else []
            tail = list(self._own[max(0, start - public): max(0, stop - public)])
            return head + tail
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(position)
        if position >= public:
            return self._own[position - public]
        room = chat.rooms[chat.index.key_at(position)]
        return events.RoomInfo(room.name, len(room.members))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # live, so not hashable
