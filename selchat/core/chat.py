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
  broadcasts can send what was said to the members who were there when it was said.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from selchat.core import events
from selchat.core.names import fold, shorten, valid_nick
from selchat.core.roomindex import RoomIndex
from selchat.core.requests import (
    ChangeNick,
    HistoryRequest,
    JoinRoom,
    ListRooms,
    Msg,
    PartRoom,
    Request,
    Say,
    Tag,
    Who,
)
from selchat.core.store import StoreError
from selchat.defaults import (
    HISTORY_ON_JOIN,
    LOBBY,
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

    __slots__ = ("nick", "key", "rooms", "session", "ident", "host", "realname", "userhost",
                 "away", "door", "since", "origin", "holder", "__weakref__")

    def __init__(self, nick: str, session: Any, ident: str = "", host: str = "selchat",
                 realname: str = "", door: str = "", origin: str = "") -> None:
        self.nick = nick
        self.key = fold(nick)
        self.rooms: Dict[str, Room] = {}
        self.session = session
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

    def __repr__(self) -> str:
        return f"User({self.nick!r})"


class Room:
    __slots__ = ("name", "key", "members", "operators", "created", "topic", "holder",
                 "names_cache", "recent_cache")

    def __init__(self, name: str, created: int = 0, holder: Optional[str] = None) -> None:
        self.name = name
        self.key = fold(name)
        # A dict used as an ordered set: O(1) membership, cheap iteration for broadcasts.
        self.members: Dict[User, None] = {}
        self.operators: Dict[User, None] = {}
        self.created = created  # ms since the epoch
        self.topic = ""
        self.holder = holder  # whose share of the room table it takes (None: the server's)
        # Made once and kept until what they show changes: a lobby that many join in turn
        # sorts its nicks and reads its history once, not once per joiner.
        self.names_cache: Optional[events.Names] = None  # until a member, op or nick changes
        self.recent_cache: Optional[Tuple[Tuple[events.Message, ...], bool]] = None  # until said


class Delivery:
    """`event` goes to every user in `recipients` except `skip`.

    `room` is set when the recipients are that room's members (a room broadcast, which the
    fan-out may batch). `reply` marks the copy that answers the request being handled: the
    door adds the request's reference (`ref`, an IRC label) to it and to nothing else.
    """

    __slots__ = ("event", "recipients", "skip", "reply", "room")

    def __init__(
        self,
        event: events.Event,
        recipients: Iterable[User],
        skip: Optional[User] = None,
        reply: bool = False,
        room: Optional[Room] = None,
    ) -> None:
        self.event = event
        self.recipients = recipients
        self.skip = skip
        self.reply = reply
        self.room = room

    def __repr__(self) -> str:
        return (f"Delivery({self.event!r}, {list(self.recipients)!r}, skip={self.skip!r}, "
                f"reply={self.reply}, room={self.room.name if self.room else None})")


def reply(event: events.Event, user: User) -> Delivery:
    return Delivery(event, (user,), reply=True)


def _noop() -> None:
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
        self.index = RoomIndex()  # the rooms by size and by name, kept up to date
        self.lobby = self._room(LOBBY, started_ms)  # made by the server when it starts
        self.before_change: Callable[[], None] = _noop
        self._signals = 0
        self._recent_rooms: Dict[Room, None] = {}  # rooms holding a recent_cache, oldest first
        self._allocate: Optional[Callable[[], int]] = getattr(store, "allocate_id", None)
        self.last_id: int = store.last_id()

    # --- registration and departure ---------------------------------------------------------

    def register(self, nick: str, session: Any, *, join_lobby: bool = True, ident: str = "",
                 host: str = "selchat", realname: str = "", door: str = "",
                 origin: str = "", now_ms: int = 0) -> Tuple[User, List[Delivery]]:
        """Add a user with a nick that the door already found well-formed.

        `origin` is where the user comes from as the door sees it (the peer's IP address; for
        IPv6 better its /64): rooms created by users of one origin share one bound.
        """
        key = fold(nick)
        if key in self.users:
            raise ChatError("nick_taken", f"nick {nick!r} is taken")
        user = User(nick, session, ident, host, realname, door, origin)
        user.since = now_ms
        self.users[key] = user
        out = [reply(events.Welcome(nick, self.server_name, self.motd), user)]
        if join_lobby:
            self._join(user, self.lobby, out)
        return user, out

    def disconnect(self, user: User, reason: str) -> List[Delivery]:
        """Remove a user for any reason (quit, closed, timeout, ...); others sharing a room see `quit`."""
        if self.users.get(user.key) is not user:
            return []
        self.before_change()
        del self.users[user.key]
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
            return self.join(user, request.room, now_ms)  # type: ignore[union-attr]
        if kind is PartRoom:
            return self.part(user, request.room, request.reason or "")  # type: ignore[union-attr]
        if kind is ChangeNick:
            return self.change_nick(user, request.nick)  # type: ignore[union-attr]
        if kind is Who:
            return [reply(self.names(request.room), user)]  # type: ignore[union-attr]
        if kind is ListRooms:
            return [reply(self.room_list(request.offset), user)]  # type: ignore[union-attr]
        if kind is HistoryRequest:
            return self.history(user, request)  # type: ignore[arg-type]
        if kind is Tag:
            return self.signal(user, request.target, request.client_tags)  # type: ignore[union-attr]
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
        room = user.rooms.get(fold(room_name))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {room_name}")
        message = events.Message(self.next_id(), now_ms, user.nick, text, room.name, None,
                                 action, notice, user.userhost, client_tags)
        self.store.add(message)
        self._forget_recent(room)
        return [Delivery(message, room.members, skip=user, room=room), reply(message, user)]

    def _forget_recent(self, room: Room) -> None:
        """The history sent on join is made again next time (it changed, or the room is gone)."""
        if room.recent_cache is not None:
            room.recent_cache = None
            self._recent_rooms.pop(room, None)

    def private(self, user: User, to: str, text: str, now_ms: int,
                action: bool = False, notice: bool = False,
                client_tags: Tuple[Tuple[str, str], ...] = ()) -> List[Delivery]:
        target = self.users.get(fold(to)) if valid_nick(to) else None
        if target is None:
            raise ChatError("no_such_nick", f"no user is called {shorten(to)!r}")
        message = events.Message(self.next_id(), now_ms, user.nick, text, None, target.nick,
                                 action, notice, user.userhost, client_tags)
        self.store.note_id(message.id)
        out = [reply(message, user)]
        if target is not user:
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
            return [Delivery(event, room.members, skip=user), reply(event, user)]
        to = self.users.get(fold(target)) if valid_nick(target) else None
        if to is None:
            raise ChatError("no_such_nick", f"no user is called {shorten(target)!r}")
        event = events.Signal(user.nick, client_tags, None, to.nick, user.userhost, tag_id)
        out = [reply(event, user)]
        if to is not user:
            out.append(Delivery(event, (to,)))
        return out

    def join(self, user: User, room_name: str, now_ms: int = 0) -> List[Delivery]:
        key = fold(room_name)
        room = user.rooms.get(key)
        out: List[Delivery] = []
        if room is not None:  # already there: a no-op that still answers names
            out.append(reply(self._names(room), user))
            return out
        if len(user.rooms) >= self.max_rooms_per_user:
            raise ChatError("too_many_rooms", f"you are in {self.max_rooms_per_user} rooms already")
        room = self.rooms.get(key)
        if room is None:
            self._may_create(user)
            room = self._room(room_name, now_ms, user.holder)
            room.operators[user] = None  # whoever creates a room is its operator
        self._join(user, room, out)
        return out

    def part(self, user: User, room_name: str, reason: str = "") -> List[Delivery]:
        room = user.rooms.get(fold(room_name))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {room_name}")
        self.before_change()
        event = events.Part(room.name, user.nick, user.userhost, reason)
        if len(room.members) > self.max_presence:
            out = [reply(event, user)]
        else:
            out = [Delivery(event, tuple(room.members), skip=user), reply(event, user)]
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
        self.before_change()
        event = events.NickChange(user.nick, nick, user.userhost)
        del self.users[user.key]
        user.nick = nick
        user.key = key
        self.users[key] = user
        recipients: Dict[User, None] = {}
        for room in user.rooms.values():
            room.names_cache = None
            if len(room.members) <= self.max_presence:
                recipients.update(room.members)
        recipients.pop(user, None)
        out = [reply(event, user)]
        if recipients:
            out.insert(0, Delivery(event, recipients))
        return out

    def set_away(self, user: User, text: Optional[str]) -> None:
        user.away = text or None

    def names(self, room_name: str) -> events.Names:
        room = self.rooms.get(fold(room_name))
        if room is None:
            return events.Names(room_name, ())
        return self._names(room)

    def room_list(self, offset: int = 0) -> events.RoomList:
        """Every room, largest first, as a view of the index: what a door reads of it costs
        what it reads, however many rooms there are. The view is valid until the next change,
        so a door encodes it at once (the fan-out does)."""
        return events.RoomList(RoomsBySize(self), offset)

    def rooms_by_name(self, after: str = "", count: int = 100) -> List[Room]:
        """Up to `count` rooms whose key comes after `after`, in key order (IRC's LIST pages
        with this: a cursor by name stays right while rooms come and go)."""
        rooms = self.rooms
        return [rooms[key] for key in self.index.by_key(after, count)]

    def history(self, user: User, request: HistoryRequest) -> List[Delivery]:
        room = user.rooms.get(fold(request.room))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {request.room}")
        try:
            budget = request.max_bytes if request.max_bytes is not None else self.history_bytes
            messages, more = self.store.recent(room.name, request.before, request.limit, budget)
        except StoreError as exc:
            log.error("history read failed: %s", exc)
            raise ChatError("history_unavailable", "history cannot be read right now") from None
        return [reply(events.History(room.name, tuple(messages), more), user)]

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
        """Membership, then `join` (to all or, in a large room, the joiner), `names`, `history`."""
        self.before_change()
        room.members[user] = None
        size = len(room.members)
        self.index.resize(room.key, size - 1, size)
        room.names_cache = None
        user.rooms[room.key] = room
        event = events.Join(room.name, user.nick, user.userhost)
        large = len(room.members) > self.max_presence
        if not large:
            out.append(Delivery(event, room.members, skip=user))
        out.append(reply(event, user))
        if not large:
            out.append(reply(self._names(room), user))
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
        out.append(reply(events.History(room.name, recent[0], recent[1]), user))

    def _leave(self, user: User, room: Room) -> None:
        del room.members[user]
        size = len(room.members)
        self.index.resize(room.key, size + 1, size)
        room.names_cache = None
        room.operators.pop(user, None)
        del user.rooms[room.key]
        if not room.members and room is not self.lobby:
            del self.rooms[room.key]
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
            names = room.names_cache = events.Names(room.name, self._sorted(room.members),
                                                    self._sorted(room.operators))
        return names


class RoomsBySize(Sequence):  # type: ignore[type-arg]
    """The chat's rooms, largest first, read from its index one entry at a time."""

    __slots__ = ("_chat",)

    def __init__(self, chat: Chat) -> None:
        self._chat = chat

    def __len__(self) -> int:
        return len(self._chat.index)

    def __getitem__(self, position: Any) -> Any:
        chat = self._chat
        if isinstance(position, slice):
            start, stop, step = position.indices(len(chat.index))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            rooms = chat.rooms
            Info = events.RoomInfo
            return [Info(room.name, len(room.members))
                    for room in [rooms[key] for key in chat.index.by_size(start, stop - start)]]
        if position < 0:
            position += len(chat.index)
        if not 0 <= position < len(chat.index):
            raise IndexError(position)
        room = chat.rooms[chat.index.key_at(position)]
        return events.RoomInfo(room.name, len(room.members))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # live, so not hashable
