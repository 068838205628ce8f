"""The frame protocol's rules: JSON objects in, validated requests out; events in, JSON objects out.

Everything a peer can get wrong inside a well-formed frame is checked here, and refused with a
`ProtocolError` that carries the protocol's error word. The chat state receives only requests
that passed, so it deals in meaning (who may say what where), never in shapes of JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from selchat.core import events
from selchat.core.names import NICK_RULE, ROOM_RULE, log_safe, shorten, text_problem, valid_nick, valid_room
from selchat.core.requests import (
    ChangeNick,
    HistoryRequest,
    JoinRoom,
    ListRooms,
    Msg,
    PartRoom,
    Say,
    Who,
)
from selchat.core import requests as core_requests
from selchat.doors.framed import codec
from selchat.defaults import (
    MAX_FRAME,
    CLIENT_NAME_MAX,
    HISTORY_LIMIT_DEFAULT,
    HISTORY_LIMIT_MAX,
    MAX_TEXT,
    NAMES_CHUNK,
    NICK_MAX,
    ROOM_MAX,
)

Ref = Union[str, int, None]


class ProtocolError(Exception):
    """A request the server refuses; `code` is the protocol's error word, `ref` the request's."""

    def __init__(self, code: str, message: str, ref: Ref = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


# A `ref` is copied into answers that also carry other members (an error's message, a message
# echo's text), so its size is bounded to keep every answer within max_frame: at most
# REF_MAX_BYTES once written as JSON, less where a small --max-frame leaves less room (see
# `ref_limit`). A ping `token` needs no bound: a pong is never larger than the ping it answers.
REF_MAX_BYTES = 1024
REF_MIN_BYTES = 32


def _answer_envelope() -> int:
    """Bytes of the largest message echo beyond its text and its ref's value."""
    longest = events.Message((1 << 63) - 1, 10**13, "N" * NICK_MAX, "", room="#" + "R" * ROOM_MAX)
    return len(codec.encode_json(message_object(longest))) + len(',"ref":')


def ref_limit(max_frame: int, max_text: int) -> int:
    """The byte bound on refs for these limits: what a full-length message echo leaves over."""
    return max(0, min(REF_MAX_BYTES, max_frame - 4 * max_text - ANSWER_ENVELOPE))


def echoable(value: Any, limit: int = REF_MAX_BYTES) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return len(str(value)) <= limit
    if isinstance(value, str):
        # Six bytes per character at most (a \uXXXX escape); longer ones are measured.
        return len(value) * 6 <= limit or len(codec.encode_json(value)) <= limit
    return False


# --- requests -------------------------------------------------------------------------------
# The chat's requests are `selchat.core.requests`; these four are the framed door's own
# (registration and liveness), which the chat state never sees.


@dataclass(frozen=True)
class Hello:
    nick: str
    client: Optional[str] = None
    password: Optional[str] = None


@dataclass(frozen=True)
class PingRequest:
    token: Any = None


@dataclass(frozen=True)
class PongReply:
    token: Any = None


@dataclass(frozen=True)
class QuitRequest:
    reason: Optional[str] = None


Request = Union[Hello, PingRequest, PongReply, QuitRequest, core_requests.Request]

# Requests served before `welcome`; any other known type then gets `not_registered`.
PRE_REGISTRATION = (Hello, PingRequest, PongReply, QuitRequest)


class _Members:
    """Typed access to a request's members that raises `bad_request` with the member's name."""

    __slots__ = ("obj", "ref", "kind")

    def __init__(self, obj: Dict[str, Any], ref: Ref, kind: str) -> None:
        self.obj = obj
        self.ref = ref
        self.kind = kind

    def _fail(self, message: str) -> ProtocolError:
        return ProtocolError("bad_request", f"{self.kind}: {message}", self.ref)

    def string(self, name: str, required: bool = True) -> Optional[str]:
        value = self.obj.get(name)
        if value is None and not required and name not in self.obj:
            return None
        if not isinstance(value, str):
            raise self._fail(f"member '{name}' must be a string")
        return value

    def integer(self, name: str) -> Optional[int]:
        if name not in self.obj:
            return None
        value = self.obj[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(f"member '{name}' must be an integer")
        return value

    def token(self, name: str, max_bytes: int) -> Any:
        """Ping tokens are echoed whatever JSON value they are, if they can be written back.

        Not every value read can be: 1e400 reads as infinity, which JSON cannot carry, and a
        number may grow when written again (1E15 becomes 1000000000000000.0).
        """
        value = self.obj.get(name)
        if value is None or isinstance(value, int):  # ints (and bools) are written back as read
            return value
        if isinstance(value, str) and len(value) * 6 <= max_bytes:
            return value
        try:
            size = len(codec.encode_json(value))
        except (ValueError, TypeError):
            raise self._fail(f"member '{name}' cannot be written back as JSON") from None
        if size > max_bytes:
            raise self._fail(f"member '{name}' is longer than {max_bytes} bytes as JSON")
        return value


class Parser:
    """Turns a decoded JSON object into a validated request, given the server's limits."""

    def __init__(self, max_text: int = MAX_TEXT, ref_max_bytes: int = REF_MAX_BYTES,
                 max_frame: int = MAX_FRAME) -> None:
        self.max_text = max_text
        self.ref_max_bytes = ref_max_bytes
        # A pong is {"type":"pong","token":T,"ref":R}: what is left of a frame for T.
        self.token_max_bytes = max_frame - ref_max_bytes - 64
        self._builders: Dict[str, Callable[[_Members], Request]] = {
            "hello": self._hello,
            "say": self._say,
            "msg": self._msg,
            "join": lambda m: JoinRoom(self._room(m, "room")),
            "part": lambda m: PartRoom(self._room(m, "room")),
            "nick": lambda m: ChangeNick(self._nick(m, "nick")),
            "who": lambda m: Who(self._room(m, "room")),
            "rooms": self._rooms,
            "ping": lambda m: PingRequest(m.token("token", self.token_max_bytes)),
            "pong": lambda m: PongReply(m.obj.get("token")),  # never echoed: taken as it is
            "quit": self._quit,
            "history": self._history,
        }

    def ref_of(self, obj: Dict[str, Any]) -> Ref:
        """The request's `ref` if it is a usable one, else None (so errors never echo junk)."""
        ref = obj.get("ref")
        return ref if echoable(ref, self.ref_max_bytes) else None

    def parse(self, obj: Dict[str, Any], registered: bool = True) -> Tuple[Request, Ref]:
        """Validate one decoded frame; raise ProtocolError with the protocol's word when it fails."""
        kind = obj["type"]
        ref = self.ref_of(obj)
        builder = self._builders.get(kind)
        if builder is None:
            raise ProtocolError("unknown_type", f"unknown request type {shorten(kind)!r}", ref)
        if "ref" in obj and ref is None:
            raise ProtocolError(
                "bad_request",
                f"member 'ref' must be a string or an integer of at most {self.ref_max_bytes} bytes as JSON",
            )
        if not registered and kind not in ("hello", "ping", "pong", "quit"):
            raise ProtocolError("not_registered", "send hello first", ref)
        return builder(_Members(obj, ref, kind)), ref

    def _nick(self, m: _Members, name: str) -> str:
        nick = m.string(name)
        assert nick is not None
        if not valid_nick(nick):
            raise ProtocolError("bad_nick", NICK_RULE, m.ref)
        return nick

    def _room(self, m: _Members, name: str) -> str:
        room = m.string(name)
        assert room is not None
        if not valid_room(room):
            raise ProtocolError("bad_room", ROOM_RULE, m.ref)
        return room

    def _text(self, m: _Members, name: str, max_len: int) -> str:
        text = m.string(name)
        assert text is not None
        problem = text_problem(text, max_len)
        if problem:
            raise ProtocolError("bad_text", problem, m.ref)
        return text

    def _hello(self, m: _Members) -> Hello:
        client = m.string("client", required=False)
        password = m.string("password", required=False)
        nick = self._nick(m, "nick")
        if client is not None:
            client = log_safe(client)[:CLIENT_NAME_MAX]
        return Hello(nick, client, password)

    def _say(self, m: _Members) -> Say:
        m.string("text")  # shape errors before name errors, whatever the member order
        room = self._room(m, "room")
        return Say(room, self._text(m, "text", self.max_text), self._flag(m, "action"))

    def _msg(self, m: _Members) -> Msg:
        m.string("text")
        to = m.string("to")
        assert to is not None
        return Msg(to, self._text(m, "text", self.max_text), self._flag(m, "action"))

    def _rooms(self, m: _Members) -> ListRooms:
        offset = m.integer("offset")
        if offset is not None and offset < 0:
            raise ProtocolError("bad_request", "rooms: offset must be 0 or more", m.ref)
        return ListRooms(offset or 0)

    @staticmethod
    def _flag(m: _Members, name: str) -> bool:
        value = m.obj.get(name, False)
        if not isinstance(value, bool):
            raise m._fail(f"member '{name}' must be true or false")
        return value

    def _quit(self, m: _Members) -> QuitRequest:
        if m.string("reason", required=False) is None:
            return QuitRequest(None)
        return QuitRequest(self._text(m, "reason", self.max_text))

    def _history(self, m: _Members) -> HistoryRequest:
        before = m.integer("before")
        limit = m.integer("limit")
        if limit is None:
            limit = HISTORY_LIMIT_DEFAULT
        elif not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise ProtocolError("bad_request", f"history: limit must be 1..{HISTORY_LIMIT_MAX}", m.ref)
        room = self._room(m, "room")
        return HistoryRequest(room, before, limit)


# --- events ---------------------------------------------------------------------------------


def message_object(msg: events.Message) -> Dict[str, Any]:
    obj: Dict[str, Any] = {"type": "message", "id": msg.id, "ts": msg.ts, "from": msg.sender}
    if msg.room is not None:
        obj["room"] = msg.room
    else:
        obj["to"] = msg.to
    obj["text"] = msg.text
    if msg.action:
        obj["action"] = True
    if msg.notice:
        obj["notice"] = True
    return obj


def _with_ref(obj: Dict[str, Any], ref: Ref) -> Dict[str, Any]:
    if ref is not None:
        obj["ref"] = ref
    return obj


def event_object(event: events.Event, ref: Ref = None) -> Dict[str, Any]:
    """One event as one JSON object (`names` and `history` may need `encode_event` to split)."""
    obj: Dict[str, Any]
    if isinstance(event, events.Message):
        obj = message_object(event)
    elif isinstance(event, events.Join):
        obj = {"type": "join", "room": event.room, "nick": event.nick}
    elif isinstance(event, events.Part):
        obj = {"type": "part", "room": event.room, "nick": event.nick}
    elif isinstance(event, events.Quit):
        obj = {"type": "quit", "nick": event.nick, "reason": event.reason}
    elif isinstance(event, events.NickChange):
        obj = {"type": "nick", "old": event.old, "new": event.new}
    elif isinstance(event, events.Names):
        obj = {"type": "names", "room": event.room, "nicks": list(event.nicks),
               "operators": list(event.operators), "more": False}
    elif isinstance(event, events.RoomList):
        obj = {"type": "rooms", "rooms": [{"name": r.name, "members": r.members} for r in event.rooms]}
    elif isinstance(event, events.History):
        obj = {
            "type": "history",
            "room": event.room,
            "messages": [message_object(m) for m in event.messages],
            "more": event.more,
        }
    elif isinstance(event, events.Pong):
        obj = {"type": "pong"}
        if event.token is not None:
            obj["token"] = event.token
    elif isinstance(event, events.Ping):
        obj = {"type": "ping", "token": event.token}
    elif isinstance(event, events.Notice):
        obj = {"type": "notice", "text": event.text}
    elif isinstance(event, events.Error):
        obj = {"type": "error", "code": event.code, "message": event.message}
    elif isinstance(event, events.Welcome):
        obj = {"type": "welcome", "nick": event.nick, "server": event.server, "motd": event.motd}
    else:  # pragma: no cover - a new event type without a wire form is a bug here
        raise TypeError(f"no wire form for {event!r}")
    return _with_ref(obj, ref)


def encode_event(event: events.Event, ref: Ref, max_frame: int,
                 limits: Optional[Dict[str, Any]] = None, budget: Optional[int] = None) -> List[bytes]:
    """Encode an event as one or more frames, none larger than `max_frame`.

    `names` comes in chunks of at most NAMES_CHUNK nicks, each cut further if it would not fit;
    `history` keeps the newest messages that fit and says `more: true` when it dropped older ones.
    """
    if isinstance(event, events.Names):
        return _encode_names(event, ref, max_frame)
    if isinstance(event, events.History):
        return [_encode_history(event, ref, max_frame)]
    if isinstance(event, events.RoomList):
        return _encode_rooms(event, ref, max_frame, budget)
    if isinstance(event, events.Signal):
        return []  # client tags without text: only IRC clients take them
    obj = event_object(event, ref)
    if limits is not None and isinstance(event, events.Welcome):
        obj["limits"] = limits
    return [codec.encode(obj, max_frame)]


def _encode_names(event: events.Names, ref: Ref, max_frame: int) -> List[bytes]:
    frames: List[bytes] = []
    nicks = list(event.nicks)
    operators = set(event.operators)
    start = 0
    while True:
        count = min(NAMES_CHUNK, len(nicks) - start)
        while True:
            chunk = nicks[start : start + count]
            last = start + count >= len(nicks)
            ops = [n for n in chunk if n in operators] if operators else []
            obj = _with_ref({"type": "names", "room": event.room, "nicks": chunk,
                             "operators": ops, "more": not last}, ref)
            try:
                frames.append(codec.encode(obj, max_frame))
                break
            except codec.EncodeError:
                if count <= 1:
                    raise
                count //= 2
        start += count
        if start >= len(nicks):
            return frames


def _fitting(obj: Dict[str, Any], member: str, items: List[Dict[str, Any]], max_frame: int) -> int:
    """How many of `items`, taken in the order given, fit in obj[member] within max_frame."""
    obj[member] = []
    budget = max_frame - len(codec.encode(obj, max_frame)) + codec.HEADER
    kept = 0
    for item in items:
        size = len(codec.encode(item, max_frame)) - codec.HEADER + 1  # +1 for the comma
        if size > budget:
            break
        budget -= size
        kept += 1
    return kept


_fragments: Dict[Tuple[str, int], bytes] = {}  # (room name, members) -> its JSON
_FRAGMENTS_KEPT = 20000  # past this many, the cache starts again (it is only a cache)
_READ_AHEAD = 256  # rooms read from the list at a time


def _room_fragment(room: events.RoomInfo) -> bytes:
    """One room as JSON, made once per (name, size): a room's entry changes only when its
    member count does, so a long list costs its encoding once, not once per request."""
    key = (room.name, room.members)
    fragment = _fragments.get(key)
    if fragment is None:
        if len(_fragments) >= _FRAGMENTS_KEPT:
            _fragments.clear()
        fragment = _fragments[key] = codec.encode_json({"name": room.name, "members": room.members})
    return fragment


def _encode_rooms(event: events.RoomList, ref: Ref, max_frame: int,
                  budget: Optional[int] = None) -> List[bytes]:
    """The rooms from `event.offset` on, in as many `rooms` events as fit in `max_frame` each.

    All but the last say `more: true`. **(our choice)** When the whole list would take more than
    `budget` bytes (what the client's buffer can hold), the answer stops there: its last event
    says `more: true` and `next: N`, and `rooms {offset: N}` asks for the rest. Only the rooms
    sent are read from the list, so a page costs the page however many rooms exist.
    """
    rooms = event.rooms
    head = b'{"type":"rooms","rooms":['
    ref_part = b',"ref":' + codec.encode_json(ref) if ref is not None else b""
    end_more = b'],"more":true' + ref_part + b"}"
    frames: List[bytes] = []
    total = 0
    start = max(0, event.offset)
    count = len(rooms)
    room_for = max_frame - len(head) - len(end_more) - len(b',"next":18446744073709551615')
    batch: List[bytes] = []  # fragments read ahead from the list, from position `stop` on
    while True:
        size = 0
        stop = start
        parts: List[bytes] = []
        while stop < count:
            if not batch:
                # Read ahead in slices: one slice of the index costs less than many lookups.
                batch = [_room_fragment(r) for r in rooms[stop: stop + _READ_AHEAD]][::-1]
            fragment = batch[-1]
            if size + len(fragment) + 1 > room_for:
                break
            batch.pop()
            parts.append(fragment)
            size += len(fragment) + 1
            stop += 1
        if stop == start and start < count:
            raise codec.EncodeError("one room entry does not fit in a frame")
        body = head + b",".join(parts)
        last = stop >= count
        out_of_budget = budget is not None and total + len(body) + 64 > budget and frames
        if out_of_budget:
            # The frame before is the last of this answer: it says where to go on from.
            frames[-1] = _with_next(frames[-1], start, ref_part, max_frame)
            return frames
        ending = (b'],"more":false' + ref_part + b"}") if last else end_more
        payload = body + ending
        frames.append(codec.frame(payload, max_frame))
        total += len(frames[-1])
        if last:
            return frames
        start = stop


def _with_next(frame_bytes: bytes, next_offset: int, ref_part: bytes, max_frame: int) -> bytes:
    """A `rooms` frame ending in `more: true`, given `next` too."""
    payload = frame_bytes[codec.HEADER:]
    tail = b'],"more":true' + ref_part + b"}"
    assert payload.endswith(tail)
    payload = payload[: -len(tail)] + b'],"more":true,"next":' + str(next_offset).encode() + ref_part + b"}"
    return codec.frame(payload, max_frame)


def _encode_history(event: events.History, ref: Ref, max_frame: int) -> bytes:
    messages = [message_object(m) for m in event.messages]
    obj = _with_ref({"type": "history", "room": event.room, "messages": messages, "more": event.more}, ref)
    try:
        return codec.encode(obj, max_frame)
    except codec.EncodeError:
        pass
    # Too big: keep the newest messages that fit (the client pages back for the rest).
    obj["more"] = True
    kept = _fitting(obj, "messages", messages[::-1], max_frame)
    obj["messages"] = messages[len(messages) - kept :]
    return codec.encode(obj, max_frame)


ANSWER_ENVELOPE = _answer_envelope()
