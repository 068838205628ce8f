"""The client's brain without a socket: typed lines in, requests out; events in, display items out.

Nothing here reads the clock directly, touches a terminal or a socket, so the whole of the
client's behaviour (which room a plain line goes to, what happens when a join is refused, which
history messages are duplicates, what to send back after a reconnect) is tested with plain
dicts. The app feeds it and does what it returns.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Union

from selchat.defaults import HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX, LOBBY

__all__ = [
    "Item",
    "Send",
    "Local",
    "Action",
    "Reaction",
    "ClientSession",
    "Pacer",
    "backoff_delays",
    "normalize_room",
    "COMMANDS",
]

Event = Mapping[str, Any]

# (usage, what it does), in the order /help lists them.
COMMANDS: Dict[str, tuple] = {
    "join": ("/join #room", "join a room and make it the current one"),
    "part": ("/part [#room]", "leave the current room (or the one named)"),
    "msg": ("/msg nick text", "send a private message"),
    "me": ("/me text", "say an action in the current room: * you text"),
    "nick": ("/nick newnick", "change your nickname"),
    "who": ("/who [#room]", "list the members of the current room (or the one named)"),
    "rooms": ("/rooms", "list every room and its member count"),
    "history": ("/history [n]", "show up to n (default 50) older messages of the current room"),
    "quit": ("/quit [reason]", "leave the chat"),
    "help": ("/help", "show this list"),
}

_PENDING_MAX = 1024  # refs remembered for matching answers; older ones are forgotten


@dataclass(frozen=True)
class Item:
    """One thing to show. `kind` picks the renderer; `at` is epoch seconds for the time column.

    `data` is the event as received (for server events) or the fields of a local note, so the
    renderer must treat every member as untrusted and possibly missing or ill-typed.
    """

    kind: str
    at: float
    data: Mapping[str, Any] = field(default_factory=dict)
    earlier: bool = False


@dataclass(frozen=True)
class Send:
    """Send `request`; `quit` means it is a quit and the app should wind down after it."""

    request: Dict[str, Any]
    quit: bool = False


@dataclass(frozen=True)
class Local:
    """Something to show locally and not send (help, a usage hint, an unknown command)."""

    items: List[Item]


Action = Union[Send, Local, None]


@dataclass
class Reaction:
    """What the app must do after an event: show `items`, send `replies` (in order).

    `welcome` and `refused` tell the registration step how a `hello` went; `refused` is the
    error event that answered our `hello` (nick taken or invalid).
    """

    items: List[Item] = field(default_factory=list)
    replies: List[Dict[str, Any]] = field(default_factory=list)
    welcome: bool = False
    refused: Optional[Event] = None


def normalize_room(name: str) -> str:
    """`lobby` -> `#lobby`: people forget the `#`; the server still decides what is valid."""
    return name if name.startswith("#") else "#" + name


def _fold(name: str) -> str:
    """Nicks and rooms compare case-insensitively on the server; the client must agree."""
    return name.lower()


def backoff_delays(
    first: float = 1.0, cap: float = 30.0, rng: Callable[[], float] = random.random
) -> Iterator[float]:
    """Reconnect delays 1, 2, 4, ... capped at 30 s, each jittered down to between half and all
    of it, so a server restart is not met by every client at the same instant."""
    delay = first
    while True:
        yield delay * (0.5 + 0.5 * rng())
        delay = min(cap, delay * 2)


class Pacer:
    """Keeps our requests under the server's flood limit (`limits.rate` and `limits.burst` in
    `welcome`), so a pasted block or a long script is slowed down instead of refused and, past
    `burst` refusals, disconnected.

    A token bucket like the server's, a little stricter than announced: our send times are not
    the server's arrival times, and jitter may bunch two requests together on the way.
    """

    SAFETY = 0.9  # fraction of the announced rate we use

    def __init__(self) -> None:
        self.rate = 0.0  # 0: no limit announced, never wait
        self.burst = 1.0
        self.tokens = 0.0
        self.stamp = 0.0

    def configure(self, limits: Any, now: float) -> None:
        """Take the limits from a welcome; anything missing or odd means no pacing."""
        rate = limits.get("rate") if isinstance(limits, Mapping) else None
        burst = limits.get("burst") if isinstance(limits, Mapping) else None
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (rate, burst))
        if not ok:
            self.rate = 0.0
            return
        self.rate = float(rate) * self.SAFETY  # type: ignore[arg-type]
        self.burst = max(1.0, float(burst) - 1.0)  # type: ignore[arg-type]
        self.tokens = self.burst
        self.stamp = now

    def reserve(self, now: float) -> float:
        """Book one request: how many seconds to wait before sending it (0 if it may go now)."""
        if self.rate <= 0:
            return 0.0
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ClientSession:
    """State of one user across connections: nick, rooms, current room, messages already shown.

    A reconnect keeps all of it; `connection_lost` only forgets what belonged to the dead
    connection, and the next `welcome` produces the joins that put the user back where it was.
    """

    def __init__(self, nick: Optional[str] = None, clock: Callable[[], float] = time.time) -> None:
        self.nick: Optional[str] = nick
        self.registered = False
        self.current_room: Optional[str] = None
        self.rooms: Dict[str, str] = {}  # folded name -> server spelling, rooms we are in
        self.seen_ids: Set[int] = set()
        self.oldest_id: Dict[str, int] = {}  # folded room -> oldest message id seen there
        self._clock = clock
        self._refs = itertools.count(1)
        self._pending: "OrderedDict[Any, Dict[str, Any]]" = OrderedDict()
        self._hello_ref: Any = None
        self._line_ref: Any = None  # the ref parse_line was asked to give its request
        self._names: Dict[str, List[str]] = {}  # folded room -> nicks gathered so far
        self._own_pings: Set[str] = set()
        self._was_registered = False
        self._rejoin: Optional[List[str]] = None
        self.close_reason: Optional[str] = None  # why the server may be about to close us
        self.password: Optional[str] = None  # sent in every hello (reconnects too) when set

    # ----- requests -------------------------------------------------------------------

    def request(self, type_: str, ref: Any = None, **members: Any) -> Dict[str, Any]:
        """Build a request with a `ref` (fresh unless given), remembered so its answer or error
        can be matched."""
        if ref is None:
            ref, self._line_ref = self._line_ref, None
        if ref is None:
            ref = next(self._refs)
        req: Dict[str, Any] = {"type": type_, **members, "ref": ref}
        self._pending[ref] = req
        while len(self._pending) > _PENDING_MAX:
            self._pending.popitem(last=False)
        return req

    def hello(self, nick: str, client: str = "selchat-client", ref: Any = None) -> Dict[str, Any]:
        self.nick = nick
        extra = {} if self.password is None else {"password": self.password}
        req = self.request("hello", ref=ref, nick=nick, client=client, **extra)
        self._hello_ref = req["ref"]
        return req

    def ping(self, ref: Any = None) -> Dict[str, Any]:
        """A ping of our own (end of a script); its pong is not shown."""
        token = f"selchat-client-{next(self._refs)}-{random.getrandbits(32):08x}"
        self._own_pings.add(token)
        return self.request("ping", ref=ref, token=token)

    def quit(self, reason: Optional[str] = None, ref: Any = None) -> Dict[str, Any]:
        return self.request("quit", ref=ref, reason=reason) if reason else self.request("quit", ref=ref)

    def parse_line(self, line: str, ref: Any = None) -> Action:
        """Turn one typed line into something to send, something to show, or nothing.

        A plain line is said to the current room; `//text` says `/text`. Switching rooms happens
        as the request is sent, not when the server answers, so a script's next line already
        goes to the new room; a refused join switches back (see `handle_event`). `ref`, when
        given, is the ref of the request the line makes (script mode uses the line number).
        """
        self._line_ref = ref
        try:
            return self._parse(line.rstrip("\r\n"))
        finally:
            self._line_ref = None

    def _parse(self, line: str) -> Action:
        if not line.strip():
            return None
        if line.startswith("/") and not line.startswith("//"):
            return self._command(line)
        text = line[1:] if line.startswith("//") else line
        if self.current_room is None:
            return self._hint("you are in no room: /join #room first")
        return Send(self.request("say", room=self.current_room, text=text))

    def _command(self, line: str) -> Action:
        name, _, rest = line[1:].partition(" ")
        name = name.lower()
        rest = rest.strip()
        if name == "join":
            if not rest or " " in rest:
                return self._usage("join")
            room = normalize_room(rest)
            req = self.request("join", room=room)
            req_prev = self.current_room
            self._pending[req["ref"]] = dict(req, _previous_room=req_prev)
            self.current_room = self.rooms.get(_fold(room), room)
            return Send(req)
        if name == "part":
            if " " in rest:
                return self._usage("part")
            room = normalize_room(rest) if rest else self.current_room
            if room is None:
                return self._hint("you are in no room")
            self._leave(room)
            return Send(self.request("part", room=room))
        if name == "msg":
            to, _, text = rest.partition(" ")
            if not to or not text.strip():
                return self._usage("msg")
            return Send(self.request("msg", to=to, text=text))
        if name == "me":
            if not rest.strip():
                return self._usage("me")
            if self.current_room is None:
                return self._hint("you are in no room: /join #room first")
            return Send(self.request("say", room=self.current_room, text=rest, action=True))
        if name == "nick":
            if not rest or " " in rest:
                return self._usage("nick")
            return Send(self.request("nick", nick=rest))
        if name == "who":
            if " " in rest:
                return self._usage("who")
            room = normalize_room(rest) if rest else self.current_room
            if room is None:
                return self._hint("you are in no room: /who #room")
            return Send(self.request("who", room=room))
        if name == "rooms":
            return Send(self.request("rooms"))
        if name == "history":
            return self._history(rest)
        if name == "quit":
            return Send(self.quit(rest or None), quit=True)
        if name == "help":
            return Local([self._local("help", lines=[f"{u:<16} {d}" for u, d in COMMANDS.values()])])
        return self._hint(f"unknown command /{name}: type /help for the list, //text to say /text")

    def _history(self, rest: str) -> Action:
        limit = HISTORY_LIMIT_DEFAULT
        if rest:
            try:
                limit = int(rest)
            except ValueError:
                return self._usage("history")
            if not 1 <= limit <= HISTORY_LIMIT_MAX:
                return self._hint(f"/history takes 1..{HISTORY_LIMIT_MAX}")
        room = self.current_room
        if room is None:
            return self._hint("you are in no room")
        members: Dict[str, Any] = {"room": room, "limit": limit}
        oldest = self.oldest_id.get(_fold(room))
        if oldest is not None:
            members["before"] = oldest
        return Send(self.request("history", **members))

    def _usage(self, name: str) -> Local:
        usage, what = COMMANDS[name]
        return self._hint(f"usage: {usage} ({what})")

    def _hint(self, text: str) -> Local:
        return Local([self._local("hint", text=text)])

    def _local(self, kind: str, **data: Any) -> Item:
        return Item(kind, self._clock(), data)

    def note(self, text: str) -> Item:
        """A line from the client itself (connection lost, reconnecting, ...)."""
        return self._local("info", text=text)

    def _leave(self, room: str) -> None:
        """Forget a room and, if it was the current one, fall back to the last one joined."""
        self.rooms.pop(_fold(room), None)
        if self.current_room is not None and _fold(self.current_room) == _fold(room):
            self.current_room = next(reversed(self.rooms.values()), None)

    # ----- events ---------------------------------------------------------------------

    def is_me(self, nick: Any) -> bool:
        return isinstance(nick, str) and self.nick is not None and _fold(nick) == _fold(self.nick)

    def handle_event(self, event: Event) -> Reaction:
        """Update state from one server event and say what to show and send back."""
        kind = event.get("type")
        ref = event.get("ref")
        # Our refs are ints; anything else (a list from a confused server) matches nothing.
        request = self._pending.pop(ref, None) if isinstance(ref, (int, str)) else None
        now = self._clock()
        out = Reaction()
        handler = getattr(self, f"_on_{kind}", None) if isinstance(kind, str) else None
        if handler is None:
            out.items.append(Item("unknown", now, event))
            return out
        handler(event, request, now, out)
        return out

    def _on_ping(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        reply: Dict[str, Any] = {"type": "pong"}
        if "token" in event:
            reply["token"] = event["token"]
        out.replies.append(reply)

    def _on_pong(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        token = event.get("token")
        if isinstance(token, str) and token in self._own_pings:
            self._own_pings.discard(token)
            return
        out.items.append(Item("pong", now, event))

    def _on_welcome(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        nick = event.get("nick")
        if isinstance(nick, str):
            self.nick = nick
        self.registered = True
        self._hello_ref = None
        out.welcome = True
        out.items.append(Item("welcome", now, event))
        if self._rejoin is not None:
            out.replies.extend(self._rejoin_requests(self._rejoin))
            self._rejoin = None
        self._was_registered = True

    def _rejoin_requests(self, rooms: List[str]) -> List[Dict[str, Any]]:
        """After a reconnect: back into every room we were in, out of the lobby if we had left it."""
        reqs = [self.request("join", room=r) for r in rooms if _fold(r) != _fold(LOBBY)]
        if all(_fold(r) != _fold(LOBBY) for r in rooms):
            reqs.append(self.request("part", room=LOBBY))
        return reqs

    def _on_message(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        item = self._message_item(event, now, earlier=False)
        if item is not None:
            out.items.append(item)

    def _message_item(self, event: Any, now: float, earlier: bool) -> Optional[Item]:
        """None for a message already shown (history after a reconnect overlaps what we saw)."""
        if not isinstance(event, Mapping):
            return None
        mid = event.get("id")
        if isinstance(mid, int) and not isinstance(mid, bool):
            if mid in self.seen_ids:
                return None
            self.seen_ids.add(mid)
            room = event.get("room")
            if isinstance(room, str):
                key = _fold(room)
                if mid < self.oldest_id.get(key, mid + 1):
                    self.oldest_id[key] = mid
        ts = event.get("ts")
        at = ts / 1000.0 if isinstance(ts, (int, float)) and not isinstance(ts, bool) else now
        return Item("message", at, event, earlier=earlier)

    def _on_history(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        messages = event.get("messages")
        fresh = [
            item
            for item in (
                self._message_item(m, now, earlier=True)
                for m in (messages if isinstance(messages, list) else [])
            )
            if item is not None
        ]
        asked = request is not None and request.get("type") == "history"
        if fresh:
            out.items.append(Item("history", now, {"room": event.get("room"), "count": len(fresh)}, True))
            out.items.extend(fresh)
        if asked:
            room = event.get("room")
            if not fresh:
                out.items.append(self._local("info", text=f"no earlier messages in {_text(room)}"))
            elif not event.get("more"):
                out.items.append(self._local("info", text=f"that is the start of {_text(room)}"))

    def _on_join(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room = event.get("room")
        if self.is_me(event.get("nick")) and isinstance(room, str):
            self.rooms[_fold(room)] = room
            if self.current_room is None or _fold(self.current_room) == _fold(room):
                self.current_room = room
        out.items.append(Item("join", now, event))

    def _on_part(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room = event.get("room")
        if self.is_me(event.get("nick")) and isinstance(room, str):
            self._leave(room)
        out.items.append(Item("part", now, event))

    def _on_quit(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        if self.is_me(event.get("nick")):
            self.close_reason = _text(event.get("reason")) or None
        out.items.append(Item("quit", now, event))

    def _on_nick(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        new = event.get("new")
        if self.is_me(event.get("old")) and isinstance(new, str):
            self.nick = new
        out.items.append(Item("nick", now, event))

    def _on_names(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        """A long list comes in chunks; show it once, whole."""
        room = event.get("room")
        key = _fold(room) if isinstance(room, str) else ""
        nicks = event.get("nicks")
        gathered = self._names.setdefault(key, [])
        gathered.extend(n for n in (nicks if isinstance(nicks, list) else []))
        if event.get("more") is True:
            return
        del self._names[key]
        out.items.append(Item("names", now, {"room": room, "nicks": gathered}))

    def _on_rooms(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        out.items.append(Item("rooms", now, event))

    def _on_notice(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        self.close_reason = _text(event.get("text")) or None
        out.items.append(Item("notice", now, event))

    def _on_error(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        ref = event.get("ref")
        if isinstance(ref, (int, str)) and ref == self._hello_ref:
            self._hello_ref = None
            out.refused = event
        if request is None and ref is None:
            # Not an answer to anything we asked: the server is telling us why it drops us.
            self.close_reason = f"{_text(event.get('code'))}: {_text(event.get('message'))}"
        if request is not None and request.get("type") == "join":
            # Undo the optimistic switch, unless the user has moved on since.
            room = request.get("room", "")
            if self.current_room is not None and _fold(self.current_room) == _fold(room):
                if _fold(room) not in self.rooms:
                    self.current_room = request.get("_previous_room")
        out.items.append(Item("error", now, event))

    # ----- connection lifecycle ---------------------------------------------------------

    def connection_lost(self) -> None:
        """Forget what died with the connection; keep what the user expects back after it."""
        if self.registered or self._rejoin is None:
            self._rejoin = list(self.rooms.values()) if self._was_registered else None
        self.registered = False
        self.rooms = {}
        self._pending.clear()
        self._names.clear()
        self._own_pings.clear()
        self._hello_ref = None
        self.close_reason = None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)
