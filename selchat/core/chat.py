"""The chat state: users, nicks, rooms and presence. Requests in, deliveries out.

Nothing here knows sockets, clocks or JSON. The server hands in validated requests (and the
time, when a message needs a timestamp) and gets back `Delivery` records saying which users
receive which event; it encodes each event once and queues the bytes. An IRC or WebSocket
adapter would drive the same object with the same requests.

Invariants:
* a user is in `users` exactly while registered, and is a member of every room in `user.rooms`;
* a room exists while it has members, except the lobby, which always exists;
* message ids only grow, starting above the store's highest id, so they grow across restarts.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Tuple

from selchat.core import events
from selchat.defaults import (
    HISTORY_ON_JOIN,
    LOBBY,
    MAX_PRESENCE,
    MAX_ROOMS,
    MAX_ROOMS_PER_USER,
)
from selchat.doors.framed.protocol import (
    ChangeNick,
    HistoryRequest,
    JoinRoom,
    ListRooms,
    Msg,
    PartRoom,
    PingRequest,
    PongReply,
    QuitRequest,
    Request,
    Say,
    Who,
    fold,
    shorten,
    valid_nick,
)

from selchat.core.store import StoreError

log = logging.getLogger(__name__)


class ChatError(Exception):
    """A request the chat state refuses; `code` is the protocol's error word."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class User:
    """A registered user. `endpoint` belongs to whoever drives the chat (the server's connection)."""

    __slots__ = ("nick", "key", "rooms", "endpoint", "__weakref__")

    def __init__(self, nick: str, endpoint: Any) -> None:
        self.nick = nick
        self.key = fold(nick)
        self.rooms: Dict[str, Room] = {}
        self.endpoint = endpoint

    def __repr__(self) -> str:
        return f"User({self.nick!r})"


class Room:
    __slots__ = ("name", "key", "members")

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = fold(name)
        # A dict used as an ordered set: O(1) membership, cheap iteration for broadcasts.
        self.members: Dict[User, None] = {}


class Delivery:
    """`event` goes to every user in `recipients` except `skip`.

    `reply` marks the copy that answers the request being handled: the adapter adds the
    request's `ref` to it and to nothing else.
    """

    __slots__ = ("event", "recipients", "skip", "reply")

    def __init__(
        self,
        event: events.Event,
        recipients: Iterable[User],
        skip: Optional[User] = None,
        reply: bool = False,
    ) -> None:
        self.event = event
        self.recipients = recipients
        self.skip = skip
        self.reply = reply

    def __repr__(self) -> str:
        return f"Delivery({self.event!r}, {list(self.recipients)!r}, skip={self.skip!r}, reply={self.reply})"


def reply(event: events.Event, user: User) -> Delivery:
    return Delivery(event, (user,), reply=True)


class Chat:
    def __init__(
        self,
        store: Any,
        *,
        server_name: str = "selchat",
        motd: str = "",
        max_frame: int = 65536,
        max_text: int = 4096,
        max_presence: int = MAX_PRESENCE,
        history_on_join: int = HISTORY_ON_JOIN,
        max_rooms: int = MAX_ROOMS,
        max_rooms_per_user: int = MAX_ROOMS_PER_USER,
        rate: float = 0.0,
        burst: int = 0,
    ) -> None:
        self.store = store
        self.server_name = server_name
        self.motd = motd
        self.max_frame = max_frame
        self.max_text = max_text
        self.max_presence = max_presence
        self.history_on_join = history_on_join
        self.max_rooms = max_rooms
        self.max_rooms_per_user = max_rooms_per_user
        self.rate = rate  # only told to clients in `welcome`, so they can pace themselves
        self.burst = burst
        self.users: Dict[str, User] = {}
        self.rooms: Dict[str, Room] = {}
        self.lobby = self._room(LOBBY)
        self.last_id: int = store.last_id()

    # --- registration and departure ---------------------------------------------------------

    def register(self, nick: str, endpoint: Any) -> Tuple[User, List[Delivery]]:
        """Add a user with a nick that the protocol layer already found well-formed."""
        key = fold(nick)
        if key in self.users:
            raise ChatError("nick_taken", f"nick {nick!r} is taken")
        user = User(nick, endpoint)
        self.users[key] = user
        welcome = events.Welcome(
            nick, self.server_name, self.motd, self.max_frame, self.max_text, self.rate, self.burst
        )
        out = [reply(welcome, user)]
        self._join(user, self.lobby, out)
        return user, out

    def disconnect(self, user: User, reason: str) -> List[Delivery]:
        """Remove a user for any reason (quit, closed, timeout, ...); others sharing a room see `quit`."""
        if self.users.get(user.key) is not user:
            return []
        del self.users[user.key]
        event = events.Quit(user.nick, reason)
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
            return self.say(user, request.room, request.text, now_ms)  # type: ignore[union-attr]
        if kind is Msg:
            return self.private(user, request.to, request.text, now_ms)  # type: ignore[union-attr]
        if kind is JoinRoom:
            return self.join(user, request.room)  # type: ignore[union-attr]
        if kind is PartRoom:
            return self.part(user, request.room)  # type: ignore[union-attr]
        if kind is ChangeNick:
            return self.change_nick(user, request.nick)  # type: ignore[union-attr]
        if kind is Who:
            return [reply(self.names(request.room), user)]  # type: ignore[union-attr]
        if kind is ListRooms:
            return [reply(self.room_list(), user)]
        if kind is HistoryRequest:
            return self.history(user, request)  # type: ignore[arg-type]
        if kind is PingRequest:
            return [reply(events.Pong(request.token), user)]  # type: ignore[union-attr]
        if kind is PongReply:
            return []
        if kind is QuitRequest:
            return self.disconnect(user, request.reason or "quit")  # type: ignore[union-attr]
        raise ChatError("already_registered", "already registered")  # a second hello

    def say(self, user: User, room_name: str, text: str, now_ms: int) -> List[Delivery]:
        room = user.rooms.get(fold(room_name))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {room_name}")
        self.last_id += 1
        message = events.Message(self.last_id, now_ms, user.nick, text, room=room.name)
        self.store.add(message)
        return [Delivery(message, room.members, skip=user), reply(message, user)]

    def private(self, user: User, to: str, text: str, now_ms: int) -> List[Delivery]:
        target = self.users.get(fold(to)) if valid_nick(to) else None
        if target is None:
            raise ChatError("no_such_nick", f"no user is called {shorten(to)!r}")
        self.last_id += 1
        message = events.Message(self.last_id, now_ms, user.nick, text, to=target.nick)
        self.store.note_id(message.id)
        out = [reply(message, user)]
        if target is not user:
            out.append(Delivery(message, (target,)))
        return out

    def join(self, user: User, room_name: str) -> List[Delivery]:
        key = fold(room_name)
        room = user.rooms.get(key)
        out: List[Delivery] = []
        if room is not None:  # already there: a no-op that still answers names
            out.append(reply(events.Names(room.name, self._sorted_nicks(room)), user))
            return out
        if len(user.rooms) >= self.max_rooms_per_user:
            raise ChatError("too_many_rooms", f"you are in {self.max_rooms_per_user} rooms already")
        room = self.rooms.get(key)
        if room is None:
            if len(self.rooms) >= self.max_rooms:
                raise ChatError("too_many_rooms", "the server has as many rooms as it may hold")
            room = self._room(room_name)
        self._join(user, room, out)
        return out

    def part(self, user: User, room_name: str) -> List[Delivery]:
        room = user.rooms.get(fold(room_name))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {room_name}")
        event = events.Part(room.name, user.nick)
        if len(room.members) > self.max_presence:
            out = [reply(event, user)]
        else:
            out = [Delivery(event, tuple(room.members), skip=user), reply(event, user)]
        self._leave(user, room)
        return out

    def change_nick(self, user: User, nick: str) -> List[Delivery]:
        key = fold(nick)
        holder = self.users.get(key)
        if holder is not None and holder is not user:
            raise ChatError("nick_taken", f"nick {nick!r} is taken")
        event = events.NickChange(user.nick, nick)
        del self.users[user.key]
        user.nick = nick
        user.key = key
        self.users[key] = user
        recipients: Dict[User, None] = {}
        for room in user.rooms.values():
            if len(room.members) <= self.max_presence:
                recipients.update(room.members)
        recipients.pop(user, None)
        out = [reply(event, user)]
        if recipients:
            out.insert(0, Delivery(event, recipients))
        return out

    def names(self, room_name: str) -> events.Names:
        room = self.rooms.get(fold(room_name))
        if room is None:
            return events.Names(room_name, ())
        return events.Names(room.name, self._sorted_nicks(room))

    def room_list(self) -> events.RoomList:
        rooms = sorted(self.rooms.values(), key=lambda r: (-len(r.members), r.key))
        return events.RoomList(tuple(events.RoomInfo(r.name, len(r.members)) for r in rooms))

    def history(self, user: User, request: HistoryRequest) -> List[Delivery]:
        room = user.rooms.get(fold(request.room))
        if room is None:
            raise ChatError("not_in_room", f"you are not in {request.room}")
        try:
            messages, more = self.store.recent(room.name, request.before, request.limit)
        except StoreError as exc:
            log.error("history read failed: %s", exc)
            raise ChatError("history_unavailable", "history cannot be read right now") from None
        return [reply(events.History(room.name, tuple(messages), more), user)]

    # --- helpers ----------------------------------------------------------------------------

    def _room(self, name: str) -> Room:
        room = Room(name)
        self.rooms[room.key] = room
        return room

    def _join(self, user: User, room: Room, out: List[Delivery]) -> None:
        """Membership, then `join` (to all or, in a large room, the joiner), `names`, `history`."""
        room.members[user] = None
        user.rooms[room.key] = room
        event = events.Join(room.name, user.nick)
        large = len(room.members) > self.max_presence
        if not large:
            out.append(Delivery(event, room.members, skip=user))
        out.append(reply(event, user))
        if not large:
            out.append(reply(events.Names(room.name, self._sorted_nicks(room)), user))
        try:
            messages, more = self.store.recent(room.name, None, self.history_on_join)
        except StoreError as exc:
            # The join stands; the history is empty and says older messages exist, so a client
            # can ask again with `history` later.
            log.error("history read failed: %s", exc)
            messages, more = [], True
        out.append(reply(events.History(room.name, tuple(messages), more), user))

    def _leave(self, user: User, room: Room) -> None:
        del room.members[user]
        del user.rooms[room.key]
        if not room.members and room is not self.lobby:
            del self.rooms[room.key]

    @staticmethod
    def _sorted_nicks(room: Room) -> Tuple[str, ...]:
        return tuple(sorted((u.nick for u in room.members), key=lambda n: (n.lower(), n)))
