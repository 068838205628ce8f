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
    MODE_FLAGS,
    ChangeNick,
    ChangePassword,
    HistoryRequest,
    InviteUser,
    JoinRoom,
    KickUser,
    Kill,
    ListRooms,
    Login,
    Logout,
    Msg,
    PartRoom,
    Register,
    Say,
    SetModes,
    SetTopic,
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
# A ping `token` is echoed as it came, but the JSON writer recurses once per level of nesting:
# a token nested near the reader's own limit was read, then could not be written back (an
# internal error, the connection lost). Deeper than this, it is refused with `bad_request`.
TOKEN_DEPTH_MAX = 100


def nesting_depth(value: Any, stop: int) -> int:
    """How deeply arrays and objects nest in `value` (0 for a scalar), counted level by level
    without recursion; counting ends at `stop`."""
    depth = 0
    level = [value] if isinstance(value, (dict, list)) else []
    while level and depth < stop:
        depth += 1
        inner: List[Any] = []
        for item in level:
            inner.extend(item.values() if isinstance(item, dict) else item)
        level = [item for item in inner if isinstance(item, (dict, list))]
    return depth


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
    login: Optional[Login] = None  # log into an account while registering


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
        if nesting_depth(value, TOKEN_DEPTH_MAX + 1) > TOKEN_DEPTH_MAX:
            raise self._fail(f"member '{name}' is nested more than {TOKEN_DEPTH_MAX} deep")
        try:
            size = len(codec.encode_json(value))
        except (ValueError, TypeError, RecursionError):
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
            "join": lambda m: JoinRoom(self._room(m, "room"), m.string("key", required=False)),
            "part": lambda m: PartRoom(self._room(m, "room")),
            "nick": lambda m: ChangeNick(self._nick(m, "nick")),
            "who": lambda m: Who(self._room(m, "room")),
            "rooms": self._rooms,
            "ping": lambda m: PingRequest(m.token("token", self.token_max_bytes)),
            "pong": lambda m: PongReply(m.obj.get("token")),  # never echoed: taken as it is
            "quit": self._quit,
            "history": self._history,
            "register": self._register,
            "login": lambda m: self._login(m, m.obj),
            "logout": lambda m: Logout(self._secret(m, "token", required=False)),
            "password": lambda m: ChangePassword(self._secret(m, "old"),  # type: ignore[arg-type]
                                                 self._secret(m, "new"),  # type: ignore[arg-type]
                                                 self._flag(m, "remember")),
            "topic": self._topic,
            "kick": self._kick,
            "invite": lambda m: InviteUser(self._room(m, "room"), self._name(m, "nick")),
            "mode": self._mode,
            "kill": lambda m: Kill(self._name(m, "nick"), self._reason(m)),
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

    def quick_say(self, obj: Dict[str, Any]) -> Optional[Tuple[str, str, bool, Ref]]:
        """A registered user's well-formed `say` (room, text, action, ref), checked by the same
        rules as `parse` without building a request; None for anything else, which `parse`
        then takes (and names what is wrong with it)."""
        room = obj.get("room")
        text = obj.get("text")
        action = obj.get("action", False)
        ref = obj.get("ref")
        if (type(room) is str and type(text) is str and type(action) is bool
                and valid_room(room) and text_problem(text, self.max_text) is None
                and (echoable(ref, self.ref_max_bytes) if ref is not None else "ref" not in obj)):
            return room, text, action, ref
        return None

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
        login = m.obj.get("login")
        if login is not None and not isinstance(login, dict):
            raise m._fail("member 'login' must be an object {account, password or token}")
        nick = self._nick(m, "nick")
        if client is not None:
            client = log_safe(client)[:CLIENT_NAME_MAX]
        return Hello(nick, client, password, self._login(m, login) if login is not None else None)

    # --- accounts and moderation (contract section 11) ------------------------------------

    def _secret(self, m: _Members, name: str, required: bool = True) -> Optional[str]:
        """A password or token: a string of bounded size (the rule is checked by the hub)."""
        value = m.string(name, required=required)
        if value is not None and len(value) > 1024:
            raise ProtocolError("bad_password", f"'{name}' is too long", m.ref)
        return value

    def _name(self, m: _Members, name: str) -> str:
        """A nick or account named by a request: checked for shape by the chat (no_such_nick)."""
        value = m.string(name)
        assert value is not None
        return value[:NICK_MAX + 1]

    def _login(self, m: _Members, obj: Dict[str, Any]) -> Login:
        inner = _Members(obj, m.ref, m.kind)
        account = self._name(inner, "account")
        password = self._secret(inner, "password", required=False)
        token = self._secret(inner, "token", required=False)
        if (password is None) == (token is None):
            raise m._fail("a login carries 'password' or 'token' (one of them)")
        return Login(account, password, token, self._flag(inner, "remember"))

    def _register(self, m: _Members) -> Register:
        return Register(self._secret(m, "password"), self._flag(m, "remember"))  # type: ignore[arg-type]

    def _reason(self, m: _Members) -> str:
        if m.string("reason", required=False) is None:
            return ""
        return self._text(m, "reason", min(self.max_text, 400))

    def _topic(self, m: _Members) -> SetTopic:
        text = m.string("text")
        room = self._room(m, "room")
        if text:
            text = self._text(m, "text", min(self.max_text, 390))
        return SetTopic(room, text or "")

    def _kick(self, m: _Members) -> KickUser:
        return KickUser(self._room(m, "room"), self._name(m, "nick"), self._reason(m))

    def _mode(self, m: _Members) -> SetModes:
        room = self._room(m, "room")
        changes = m.obj.get("set")
        if changes is None:
            return SetModes(room)
        if not isinstance(changes, dict):
            raise m._fail("member 'set' must be an object")
        out: List[Tuple[str, object]] = []
        for name, value in changes.items():
            if name in MODE_FLAGS:
                if not isinstance(value, bool):
                    raise m._fail(f"mode '{name}' must be true or false")
            elif name == "key":
                if value is not None and not isinstance(value, str):
                    raise m._fail("mode 'key' must be a string or null")
            elif name == "limit":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or not 1 <= value <= 1 << 31):
                    raise m._fail("mode 'limit' must be a member count (1 or more) or null")
            elif name in ("op", "deop", "voice", "devoice", "ban", "unban"):
                if (not isinstance(value, list) or len(value) > 100
                        or not all(isinstance(v, str) for v in value)):
                    raise m._fail(f"mode '{name}' must be a list of at most 100 strings")
                value = tuple(v[:200] for v in value)
            else:
                raise m._fail(f"unknown mode {shorten(str(name))!r}")
            out.append((name, value))
        return SetModes(room, tuple(out))

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
        if "with" in m.obj and "room" not in m.obj:
            return HistoryRequest("", before, limit, with_=self._name(m, "with"))
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
    if msg.account is not None:
        obj["account"] = msg.account
    return obj


_quote = codec.quote_json


def message_frame(msg: events.Message, max_frame: int, ref: Ref = None) -> bytes:
    """`message_object(msg)` (with the sender's `ref`) as a frame, written by template: the
    frame every member of a busy room gets, and the sender's own. The same bytes as encoding
    the object (tests/test_review21_hotpath.py holds it to that); numbers that are not ints,
    and refs that are neither a str nor an int, take the general path."""
    kind = type(ref)
    if (type(msg.id) is not int or type(msg.ts) is not int
            or (ref is not None and kind is not str and kind is not int)):
        return codec.encode(_with_ref(message_object(msg), ref), max_frame)
    where = (',"room":' + _quote(msg.room) if msg.room is not None
             else ',"to":' + (_quote(msg.to) if msg.to is not None else "null"))
    text = (f'{{"type":"message","id":{msg.id},"ts":{msg.ts},"from":{_quote(msg.sender)}'
            f'{where},"text":{_quote(msg.text)}')
    if msg.action:
        text += ',"action":true'
    if msg.notice:
        text += ',"notice":true'
    if msg.account is not None:
        text += ',"account":' + _quote(msg.account)
    if ref is not None:
        text += ',"ref":' + (_quote(ref) if kind is str else str(ref))
    return codec.encode_payload(text + "}", max_frame)


def _mode_set(changes: Any) -> Dict[str, Any]:
    return {name: (list(value) if isinstance(value, tuple) else value) for name, value in changes}


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
        if event.account is not None:
            obj["account"] = event.account
    elif isinstance(event, events.Part):
        obj = {"type": "part", "room": event.room, "nick": event.nick}
    elif isinstance(event, events.Quit):
        obj = {"type": "quit", "nick": event.nick, "reason": event.reason}
    elif isinstance(event, events.NickChange):
        obj = {"type": "nick", "old": event.old, "new": event.new}
    elif isinstance(event, events.Names):
        obj = {"type": "names", "room": event.room, "nicks": list(event.nicks),
               "operators": list(event.operators), "voiced": list(event.voiced), "more": False}
        if event.accounts:
            obj["accounts"] = dict(event.accounts)
    elif isinstance(event, events.RoomList):
        obj = {"type": "rooms", "rooms": [{"name": r.name, "members": r.members} for r in event.rooms]}
    elif isinstance(event, events.History):
        obj = _history_head(event, [message_object(m) for m in event.messages])
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
        if event.account is not None:
            obj["account"] = event.account
        if event.token is not None:
            obj["token"] = event.token
    elif isinstance(event, events.AccountInfo):
        obj = {"type": "account", "account": event.account, "nick": event.nick}
        if event.token is not None:
            obj["token"] = event.token
    elif isinstance(event, events.AccountChange):
        obj = {"type": "account", "nick": event.nick, "account": event.account}
    elif isinstance(event, events.Topic):
        obj = {"type": "topic", "room": event.room, "text": event.text, "by": event.by, "ts": event.ts}
    elif isinstance(event, events.Kick):
        obj = {"type": "kick", "room": event.room, "nick": event.nick, "by": event.by,
               "reason": event.reason}
    elif isinstance(event, events.Invite):
        obj = {"type": "invite", "room": event.room, "by": event.by}
        if event.nick:
            obj["nick"] = event.nick
    elif isinstance(event, events.ModeChange):
        obj = {"type": "mode", "room": event.room, "by": event.by, "set": _mode_set(event.changes)}
    elif isinstance(event, events.ModeInfo):
        obj = {"type": "mode", "room": event.room, "set": _mode_set(event.modes),
               "bans": list(event.bans)}
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
    voiced = set(event.voiced)
    accounts = dict(event.accounts)
    start = 0
    while True:
        count = min(NAMES_CHUNK, len(nicks) - start)
        while True:
            chunk = nicks[start : start + count]
            last = start + count >= len(nicks)
            ops = [n for n in chunk if n in operators] if operators else []
            obj = {"type": "names", "room": event.room, "nicks": chunk, "operators": ops,
                   "voiced": [n for n in chunk if n in voiced] if voiced else [],
                   "more": not last}
            if accounts:
                obj["accounts"] = {n: accounts[n] for n in chunk if n in accounts}
            _with_ref(obj, ref)
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


class Page(List[bytes]):
    """The frames of an answer cut where the client's buffer is full; `rest` is the offset the
    answer goes on from (the session asks for it once the client has read these)."""

    def __init__(self, frames: List[bytes], rest: int) -> None:
        super().__init__(frames)
        self.rest = rest


def _encode_rooms(event: events.RoomList, ref: Ref, max_frame: int,
                  budget: Optional[int] = None) -> List[bytes]:
    """The rooms from `event.offset` on, in as many `rooms` events as fit in `max_frame` each.

    All but the last say `more: true`. **(our choice)** When the whole list would take more than
    `budget` bytes (what the client's buffer can hold), this page stops there, still saying
    `more: true`, and the frames come as a `Page` whose `rest` is the offset of the next page:
    the session sends it once the client has read this one, so the answer still ends with
    `more: false`. Only the rooms sent are read from the list, so a page costs the page
    however many rooms exist.
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
            # The frame before is the last of this page; the session goes on from `start`.
            return Page(frames, start)
        ending = (b'],"more":false' + ref_part + b"}") if last else end_more
        payload = body + ending
        frames.append(codec.frame(payload, max_frame))
        total += len(frames[-1])
        if last:
            return frames
        start = stop


def _history_head(event: events.History, messages: List[Dict[str, Any]]) -> Dict[str, Any]:
    if event.with_ is not None:
        return {"type": "history", "with": event.with_, "messages": messages, "more": event.more}
    return {"type": "history", "room": event.room, "messages": messages, "more": event.more}


def _encode_history(event: events.History, ref: Ref, max_frame: int) -> bytes:
    messages = [message_object(m) for m in event.messages]
    obj = _with_ref(_history_head(event, messages), ref)
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
