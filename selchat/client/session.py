"""The client's brain without a socket: typed lines in, requests out; events in, display items out.

Nothing here reads the clock directly, touches a terminal or a socket, so the whole of the
client's behaviour (which room or conversation a plain line goes to, what happens when a join is
refused, which history messages are duplicates, what to send back after a reconnect, which
window an event belongs in) is tested with plain dicts. The app feeds it and does what it returns.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

from selchat.client.modes import parse_mode
from selchat.defaults import HISTORY_LIMIT_DEFAULT, HISTORY_LIMIT_MAX, LOBBY

__all__ = [
    "Item",
    "Send",
    "Local",
    "Ask",
    "Ui",
    "Action",
    "Reaction",
    "ClientSession",
    "Pacer",
    "backoff_delays",
    "normalize_room",
    "mentions",
    "COMMANDS",
    "STATUS",
    "CURRENT",
]

Event = Mapping[str, Any]

# Window keys that are neither a room nor a nick (both contain characters neither may have).
STATUS = "(status)"
CURRENT = "(current)"

# (usage, what it does), in the order /help lists them.
COMMANDS: Dict[str, tuple] = {
    "join": ("/join #room [key]", "join a room and make it the current one"),
    "part": ("/part [#room]", "leave the current room (or the one named)"),
    "msg": ("/msg nick text", "send a private message"),
    "query": ("/query nick [text]", "open a conversation window with nick"),
    "me": ("/me text", "an action in the current window: * you text"),
    "nick": ("/nick newnick", "change your nickname"),
    "who": ("/who [#room]", "list the members of the current room (or the one named)"),
    "rooms": ("/rooms", "list every room and its member count"),
    "history": ("/history [n]", "show up to n (default 50) older messages of this window"),
    "win": ("/win n", "go to window n (also Alt+1..9, Alt+Left/Right)"),
    "close": ("/close", "close this window (leaving its room)"),
    "presence": ("/presence [on|off]", "show or hide join/part/quit lines in this room"),
    "bell": ("/bell [on|off]", "ring the terminal bell on mentions and private messages"),
    "topic": ("/topic [text]", "show or set the topic (/topic -clear removes it)"),
    "register": ("/register", "make your nick an account (asks for a password)"),
    "login": ("/login account", "log in (asks for the password)"),
    "logout": ("/logout", "log out; ends this connection"),
    "password": ("/password", "change your account's password (asks)"),
    "kick": ("/kick nick [reason]", "put nick out of this room (operators)"),
    "ban": ("/ban mask", "ban a nick, account:NAME or nick!user@host (operators)"),
    "unban": ("/unban mask", "lift a ban (operators)"),
    "invite": ("/invite nick [#room]", "invite nick to this room (or the one named)"),
    "mode": ("/mode [#room] [+mits-k ...]", "show or change the room's modes"),
    "op": ("/op nick...", "make members operators (operators)"),
    "deop": ("/deop nick...", "take operator away"),
    "voice": ("/voice nick...", "let members speak in a moderated room"),
    "devoice": ("/devoice nick...", "take voice away"),
    "kill": ("/kill nick [reason]", "disconnect a user (server operators)"),
    "quit": ("/quit [reason]", "leave the chat"),
    "help": ("/help", "show this list"),
}
# Commands that change the screen only; script mode says they need a terminal.
UI_COMMANDS = ("win", "close", "presence", "bell")
# Commands whose line may hold a password: never kept in the input history.
SECRET_COMMANDS = ("register", "login", "password")
PASSWORD_MIN, PASSWORD_MAX = 8, 256  # UTF-8 bytes, as the server checks

_PENDING_MAX = 1024  # refs remembered for matching answers; older ones are forgotten
CONVERSATIONS_MAX = 10_000  # rooms and private conversations whose history paging we track
SEEN_MAX = 100_000  # message ids remembered to drop repeats (about 8 MB at most)
_NICK_CHARS = r"A-Za-z0-9_\-\[\]{}\\|^"


@dataclass(frozen=True)
class Item:
    """One thing to show. `kind` picks the renderer; `at` is epoch seconds for the time column.

    `data` is the event as received (for server events) or the fields of a local note, so the
    renderer must treat every member as untrusted and possibly missing or ill-typed.

    Where it goes on the interactive screen: `targets` are window keys (a room, a nick for a
    private conversation, STATUS, CURRENT; none means the current window); `opens` lets it open
    a window that is not there yet (a private message, our own join). `presence` marks the
    join/part/quit lines a room can hide, `mention` a line that names us. Script mode prints
    every item once and ignores all four.
    """

    kind: str
    at: float
    data: Mapping[str, Any] = field(default_factory=dict)
    earlier: bool = False
    targets: Tuple[str, ...] = ()
    opens: bool = False
    presence: bool = False
    mention: bool = False
    own: bool = False  # something we said (no activity in its window)


@dataclass(frozen=True)
class Send:
    """Send `request`; `quit` means it is a quit and the app should wind down after it."""

    request: Dict[str, Any]
    quit: bool = False


@dataclass(frozen=True)
class Local:
    """Something to show locally and not send (help, a usage hint, an unknown command)."""

    items: List[Item]


@dataclass(frozen=True)
class Ask:
    """Ask the person for a secret (a password) without echo, then hand it to `then`, which
    returns the next action (often another Ask: 'the same password again')."""

    prompt: str
    then: Callable[[str], "Action"]


@dataclass(frozen=True)
class Ui:
    """A command about the screen (`/win 3`, `/close`, `/presence off`): the app does it."""

    name: str
    arg: str = ""


Action = Union[Send, Local, Ask, Ui, None]


@dataclass
class Reaction:
    """What the app must do after an event: show `items`, send `replies` (in order).

    `welcome` and `refused` tell the registration step how a `hello` went; `refused` is the
    error event that answered our `hello` (nick taken or invalid, login failed).
    """

    items: List[Item] = field(default_factory=list)
    replies: List[Dict[str, Any]] = field(default_factory=list)
    welcome: bool = False
    refused: Optional[Event] = None


@dataclass
class RoomState:
    """What we know about a room we are in: members and their roles, the topic."""

    name: str
    members: Dict[str, str] = field(default_factory=dict)  # folded nick -> spelling
    operators: Set[str] = field(default_factory=set)  # folded nicks
    voiced: Set[str] = field(default_factory=set)
    topic: Optional[Mapping[str, Any]] = None  # the last `topic` event
    fresh: bool = False  # joined, its history not yet come: the topic is the joiner's copy

    def prefix(self, nick: str) -> str:
        key = _fold(nick)
        return "@" if key in self.operators else "+" if key in self.voiced else ""


@dataclass
class Conversation:
    """How much of a room's or a private conversation's history we have shown."""

    shown: int = 0  # messages shown
    oldest: Optional[int] = None  # oldest id shown
    complete: bool = False  # the server said there is nothing older


def normalize_room(name: str) -> str:
    """`lobby` -> `#lobby`: people forget the `#`; the server still decides what is valid."""
    return name if name.startswith("#") else "#" + name


def _fold(name: str) -> str:
    """Nicks and rooms compare case-insensitively on the server; the client must agree."""
    return name.lower()


def mentions(text: Any, nick: Optional[str]) -> bool:
    """Does `text` name `nick` as a word, in any letter case? ("Bob:" yes, "bobby" no)."""
    if not isinstance(text, str) or not nick:
        return False
    pattern = rf"(?<![{_NICK_CHARS}]){re.escape(nick)}(?![{_NICK_CHARS}])"
    return re.search(pattern, text, re.IGNORECASE) is not None


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
    """State of one user across connections: nick, account, rooms, where lines go, what was shown.

    `focus` is where a plain line goes: a room (`#dev`), a nick (a private conversation) or None
    (the status window). A reconnect keeps all of it; `connection_lost` only forgets what
    belonged to the dead connection, and the next `welcome` produces the joins that put the user
    back where it was.
    """

    def __init__(self, nick: Optional[str] = None, clock: Callable[[], float] = time.time) -> None:
        self.nick: Optional[str] = nick
        self.registered = False
        self.focus: Optional[str] = None
        self.rooms: Dict[str, str] = {}  # folded name -> server spelling, rooms we are in
        self.room_state: Dict[str, RoomState] = {}  # folded name -> members, roles, topic
        self.conversations: Dict[str, Conversation] = {}  # see _conv_key
        self.seen_ids: Set[int] = set()  # ids shown, to drop repeats; the newest SEEN_MAX kept
        self._seen_order: "deque[int]" = deque()
        self.account: Optional[str] = None  # the account we are logged in as
        self.login: Optional[Dict[str, str]] = None  # sent in every hello when set (--account)
        self._clock = clock
        self._refs = itertools.count(1)
        self._pending: "OrderedDict[Any, Dict[str, Any]]" = OrderedDict()
        self._hello_ref: Any = None
        self._line_ref: Any = None  # the ref parse_line was asked to give its request
        self._names: Dict[str, Dict[str, List[str]]] = {}  # folded room -> lists gathered so far
        self._own_pings: Set[str] = set()
        self._was_registered = False
        self._rejoin: Optional[List[str]] = None
        self._status_chosen = False  # the person looks at the status window on purpose
        self.close_reason: Optional[str] = None  # why the server may be about to close us
        self.password: Optional[str] = None  # sent in every hello (reconnects too) when set

    # ----- where lines go -------------------------------------------------------------

    @property
    def current_room(self) -> Optional[str]:
        return self.focus if self.focus is not None and self.focus.startswith("#") else None

    @current_room.setter
    def current_room(self, room: Optional[str]) -> None:
        self.focus = room

    @property
    def current_query(self) -> Optional[str]:
        return self.focus if self.focus is not None and not self.focus.startswith("#") else None

    def set_focus(self, key: Optional[str]) -> None:
        """The person switched windows: a room, a nick, or None for the status window."""
        self.focus = key
        self._status_chosen = key is None

    @property
    def oldest_id(self) -> Dict[str, int]:
        """Folded room -> oldest message id shown there (kept for callers of the old name)."""
        return {k: c.oldest for k, c in self.conversations.items() if k.startswith("#") and c.oldest is not None}

    # ----- requests -------------------------------------------------------------------

    def request(self, type_: str, ref: Any = None, **members: Any) -> Dict[str, Any]:
        """Build a request with a `ref` (fresh unless given), remembered so its answer or error
        can be matched (and shown in the window it was typed in)."""
        if ref is None:
            ref, self._line_ref = self._line_ref, None
        if ref is None:
            ref = next(self._refs)
        req: Dict[str, Any] = {"type": type_, **members, "ref": ref}
        self._pending[ref] = dict(req, _focus=self.focus)
        while len(self._pending) > _PENDING_MAX:
            self._pending.popitem(last=False)
        return req

    def hello(self, nick: str, client: str = "selchat-client", ref: Any = None) -> Dict[str, Any]:
        self.nick = nick
        extra: Dict[str, Any] = {} if self.password is None else {"password": self.password}
        if self.login is not None:
            extra["login"] = dict(self.login)
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
        """Turn one typed line into something to send, to show, to ask, to do on screen, or nothing.

        A plain line goes to the current room or conversation; `//text` says `/text`. Switching
        rooms happens as the request is sent, not when the server answers, so a script's next
        line already goes to the new room; a refused join switches back (see `handle_event`).
        `ref`, when given, is the ref of the request the line makes (script mode uses the line
        number).
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
        return self._say(text, action=False)

    def _say(self, text: str, action: bool) -> Action:
        extra = {"action": True} if action else {}
        if self.current_query is not None:
            return Send(self.request("msg", to=self.current_query, text=text, **extra))
        if self.current_room is None:
            return self._hint("you are in no room: /join #room first, or go to a room's window")
        return Send(self.request("say", room=self.current_room, text=text, **extra))

    def _command(self, line: str) -> Action:
        name, _, rest = line[1:].partition(" ")
        name = name.lower()
        rest = rest.strip()
        handler = getattr(self, f"_cmd_{name}", None) if name in COMMANDS else None
        if handler is None:
            return self._hint(f"unknown command /{name}: type /help for the list, //text to say /text")
        return handler(rest)

    # rooms and people

    def _cmd_join(self, rest: str) -> Action:
        words = rest.split()
        if not 1 <= len(words) <= 2:
            return self._usage("join")
        room = normalize_room(words[0])
        extra = {"key": words[1]} if len(words) == 2 else {}
        req = self.request("join", room=room, **extra)
        self._pending[req["ref"]]["_previous_focus"] = self.focus
        self.set_focus(self.rooms.get(_fold(room), room))
        return Send(req)

    def _cmd_part(self, rest: str) -> Action:
        if " " in rest:
            return self._usage("part")
        room = normalize_room(rest) if rest else self.current_room
        if room is None:
            return self._hint("you are in no room")
        self._leave(room)
        return Send(self.request("part", room=room))

    def _cmd_msg(self, rest: str) -> Action:
        to, _, text = rest.partition(" ")
        if not to or not text.strip():
            return self._usage("msg")
        return Send(self.request("msg", to=to, text=text))

    def _cmd_query(self, rest: str) -> Action:
        to, _, text = rest.partition(" ")
        if not to or to.startswith("#"):
            return self._usage("query")
        self.set_focus(to)
        if text.strip():
            return Send(self.request("msg", to=to, text=text))
        return Local([])

    def _cmd_me(self, rest: str) -> Action:
        if not rest.strip():
            return self._usage("me")
        return self._say(rest, action=True)

    def _cmd_nick(self, rest: str) -> Action:
        if not rest or " " in rest:
            return self._usage("nick")
        return Send(self.request("nick", nick=rest))

    def _cmd_who(self, rest: str) -> Action:
        if " " in rest:
            return self._usage("who")
        room = normalize_room(rest) if rest else self.current_room
        if room is None:
            return self._hint("you are in no room: /who #room")
        return Send(self.request("who", room=room))

    def _cmd_rooms(self, rest: str) -> Action:
        return Send(self.request("rooms"))

    def _cmd_quit(self, rest: str) -> Action:
        return Send(self.quit(rest or None), quit=True)

    def _cmd_help(self, rest: str) -> Action:
        return Local([self._local("help", lines=[f"{u:<28} {d}" for u, d in COMMANDS.values()])])

    def _cmd_history(self, rest: str) -> Action:
        limit = HISTORY_LIMIT_DEFAULT
        if rest:
            try:
                limit = int(rest)
            except ValueError:
                return self._usage("history")
            if not 1 <= limit <= HISTORY_LIMIT_MAX:
                return self._hint(f"/history takes 1..{HISTORY_LIMIT_MAX}")
        if self.focus is None:
            return self._hint("/history works in a room's or a conversation's window")
        key = self._conv_key(self.focus)
        conv = self.conversations.get(key)
        where = self.focus if self.current_room else f"your conversation with {self.focus}"
        if conv is not None and conv.complete:
            if conv.shown == 0:
                return self._info(f"{where} has no earlier messages")
            return self._info(_all_shown(conv.shown, where))
        members: Dict[str, Any] = {"room": self.focus} if self.current_room else {"with": self.focus}
        members["limit"] = limit
        if conv is not None and conv.oldest is not None:
            members["before"] = conv.oldest
        return Send(self.request("history", **members))

    # the screen (interactive mode)

    def _cmd_win(self, rest: str) -> Action:
        if not rest.isdigit():
            return self._usage("win")
        return Ui("win", rest)

    def _cmd_close(self, rest: str) -> Action:
        return Ui("close", rest)

    def _cmd_presence(self, rest: str) -> Action:
        if rest.lower() not in ("", "on", "off"):
            return self._usage("presence")
        return Ui("presence", rest.lower())

    def _cmd_bell(self, rest: str) -> Action:
        if rest.lower() not in ("", "on", "off"):
            return self._usage("bell")
        return Ui("bell", rest.lower())

    # accounts

    def _cmd_register(self, rest: str) -> Action:
        if rest:  # script mode: /register PASSWORD
            return self._register(rest)
        who = self.nick or "your nick"

        def again(first: str) -> Action:
            problem = _password_problem(first)
            if problem:
                return self._hint(problem + "; nothing sent")
            return Ask("the same password again: ", lambda second: self._register(first) if second == first
                       else self._hint("the two passwords differ; nothing sent"))

        return Ask(f"password for the new account {who}: ", again)

    def _register(self, password: str) -> Action:
        problem = _password_problem(password)
        if problem:
            return self._hint(problem + "; nothing sent")
        return Send(self.request("register", password=password))

    def _cmd_login(self, rest: str) -> Action:
        account, _, password = rest.partition(" ")
        if not account:
            return self._usage("login")
        if password:  # script mode: /login ACCOUNT PASSWORD
            return Send(self.request("login", account=account, password=password))
        return Ask(f"password for {account}: ",
                   lambda p: Send(self.request("login", account=account, password=p)) if p else None)

    def _cmd_logout(self, rest: str) -> Action:
        return Send(self.request("logout"))

    def _cmd_password(self, rest: str) -> Action:
        words = rest.split(" ")
        if rest:
            if len(words) != 2:
                return self._hint("usage: /password (asks), or /password OLD NEW in a script")
            return self._new_password(words[0], words[1])

        def new(old: str) -> Action:
            def again(first: str) -> Action:
                problem = _password_problem(first)
                if problem:
                    return self._hint(problem + "; nothing sent")
                return Ask("the same new password again: ", lambda second: self._new_password(old, first)
                           if second == first else self._hint("the two passwords differ; nothing sent"))

            return Ask("new password: ", again)

        return Ask("current password: ", new)

    def _new_password(self, old: str, new: str) -> Action:
        problem = _password_problem(new)
        if problem:
            return self._hint(problem + "; nothing sent")
        return Send(self.request("password", old=old, new=new))

    # running a room

    def _room_and_rest(self, rest: str) -> Tuple[Optional[str], str]:
        """An optional leading #room, else the current room; and what follows."""
        if rest.startswith("#"):
            room, _, rest = rest.partition(" ")
            return room, rest.strip()
        return self.current_room, rest

    def _cmd_topic(self, rest: str) -> Action:
        room, text = self._room_and_rest(rest)
        if room is None:
            return self._hint("/topic works in a room's window (or /topic #room text)")
        if not text:
            state = self.room_state.get(_fold(room))
            topic = state.topic if state is not None else None
            if topic is None or not _text(topic.get("text")):
                return self._info(f"{room} has no topic")
            return Local([Item("topic", self._clock(), dict(topic, _shown=True), targets=(CURRENT,))])
        if text == "-clear":
            text = ""
        return Send(self.request("topic", room=room, text=text))

    def _cmd_kick(self, rest: str) -> Action:
        room, rest = self._room_and_rest(rest)
        nick, _, reason = rest.partition(" ")
        if room is None or not nick:
            return self._usage("kick")
        extra = {"reason": reason.strip()} if reason.strip() else {}
        return Send(self.request("kick", room=room, nick=nick, **extra))

    def _cmd_invite(self, rest: str) -> Action:
        words = rest.split()
        if not 1 <= len(words) <= 2:
            return self._usage("invite")
        room = normalize_room(words[1]) if len(words) == 2 else self.current_room
        if room is None:
            return self._hint("/invite nick #room, or use it in a room's window")
        return Send(self.request("invite", room=room, nick=words[0]))

    def _cmd_mode(self, rest: str) -> Action:
        room, rest = self._room_and_rest(rest)
        if room is None:
            return self._hint("/mode works in a room's window (or /mode #room ...)")
        changes = parse_mode(rest.split())
        if isinstance(changes, str):
            return self._hint(changes)
        if not changes:
            return Send(self.request("mode", room=room))
        return Send(self.request("mode", room=room, set=changes))

    def _set_list(self, name: str, key: str, rest: str) -> Action:
        room, rest = self._room_and_rest(rest)
        names = rest.split()
        if room is None or not names:
            return self._usage(name)
        return Send(self.request("mode", room=room, set={key: names}))

    def _cmd_op(self, rest: str) -> Action:
        return self._set_list("op", "op", rest)

    def _cmd_deop(self, rest: str) -> Action:
        return self._set_list("deop", "deop", rest)

    def _cmd_voice(self, rest: str) -> Action:
        return self._set_list("voice", "voice", rest)

    def _cmd_devoice(self, rest: str) -> Action:
        return self._set_list("devoice", "devoice", rest)

    def _cmd_ban(self, rest: str) -> Action:
        return self._set_list("ban", "ban", rest)

    def _cmd_unban(self, rest: str) -> Action:
        return self._set_list("unban", "unban", rest)

    def _cmd_kill(self, rest: str) -> Action:
        nick, _, reason = rest.partition(" ")
        if not nick:
            return self._usage("kill")
        extra = {"reason": reason.strip()} if reason.strip() else {}
        return Send(self.request("kill", nick=nick, **extra))

    # local answers

    def _usage(self, name: str) -> Local:
        usage, what = COMMANDS[name]
        return self._hint(f"usage: {usage} ({what})")

    def _hint(self, text: str) -> Local:
        return Local([self._local("hint", text=text)])

    def _info(self, text: str) -> Local:
        return Local([self._local("info", text=text)])

    def _local(self, kind: str, **data: Any) -> Item:
        return Item(kind, self._clock(), data, targets=(CURRENT,))

    def note(self, text: str) -> Item:
        """A line from the client itself (connection lost, reconnecting, ...): shown in the
        status window and the current one."""
        return Item("info", self._clock(), {"text": text}, targets=(STATUS, CURRENT))

    def _leave(self, room: str) -> None:
        """Forget a room and, if it was the current one, fall back to the last one joined."""
        self.rooms.pop(_fold(room), None)
        self.room_state.pop(_fold(room), None)
        if self.current_room is not None and _fold(self.current_room) == _fold(room):
            self.focus = next(reversed(self.rooms.values()), None)

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
            out.items.append(Item("unknown", now, event, targets=(STATUS,)))
            return out
        handler(event, request, now, out)
        return out

    def _rooms_of(self, nick: Any) -> Tuple[str, ...]:
        """The rooms (server spelling) where we know `nick` is a member."""
        if not isinstance(nick, str):
            return ()
        key = _fold(nick)
        return tuple(st.name for st in self.room_state.values() if key in st.members)

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
        account = event.get("account")
        self.account = account if isinstance(account, str) else None
        self.registered = True
        self._hello_ref = None
        out.welcome = True
        out.items.append(Item("welcome", now, event, targets=(STATUS,)))
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

    def _conversation(self, where: str) -> Conversation:
        """The history state of a room or a conversation; the oldest are forgotten past
        CONVERSATIONS_MAX (a flood of strangers' private messages must not grow us for ever)."""
        key = self._conv_key(where)
        conv = self.conversations.get(key)
        if conv is None:
            conv = self.conversations[key] = Conversation()
            while len(self.conversations) > CONVERSATIONS_MAX:
                del self.conversations[next(iter(self.conversations))]
        return conv

    def _conv_key(self, where: str) -> str:
        """Key of a room's or a private conversation's history: `#room` or `nick`, folded."""
        return _fold(where)

    def partner(self, event: Mapping[str, Any]) -> Optional[str]:
        """The other person of a private message (its sender, or whom we sent it to)."""
        sender, to = event.get("from"), event.get("to")
        other = to if self.is_me(sender) else sender
        return other if isinstance(other, str) and other else None

    def _on_message(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        item = self._message_item(event, now, earlier=False)
        if item is not None:
            out.items.append(item)

    def _message_item(self, event: Any, now: float, earlier: bool, partner: Optional[str] = None) -> Optional[Item]:
        """None for a message already shown (history after a reconnect overlaps what we saw)."""
        if not isinstance(event, Mapping):
            return None
        room = event.get("room")
        private = not isinstance(room, str) and "to" in event
        where = room if isinstance(room, str) else (partner or self.partner(event)) if private else None
        mid = event.get("id")
        if isinstance(mid, int) and not isinstance(mid, bool):
            if mid in self.seen_ids:
                return None
            self.seen_ids.add(mid)
            self._seen_order.append(mid)
            if len(self._seen_order) > SEEN_MAX:
                # Forget the oldest: a repeat that old is at most shown once more.
                self.seen_ids.discard(self._seen_order.popleft())
        if isinstance(where, str):
            if not earlier and isinstance(room, str) and _fold(room) in self.room_state:
                self.room_state[_fold(room)].fresh = False  # talk has begun: a topic now is news
            conv = self._conversation(where)
            conv.shown += 1
            if isinstance(mid, int) and not isinstance(mid, bool) and (conv.oldest is None or mid < conv.oldest):
                conv.oldest = mid
        ts = event.get("ts")
        at = ts / 1000.0 if isinstance(ts, (int, float)) and not isinstance(ts, bool) else now
        mine = self.is_me(event.get("from"))
        named = not mine and not earlier and (private or mentions(event.get("text"), self.nick))
        return Item("message", at, event, earlier=earlier, targets=(where,) if isinstance(where, str) else (),
                    opens=private, mention=named, own=mine)

    def _on_history(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room, partner = event.get("room"), event.get("with")
        where = room if isinstance(room, str) else partner if isinstance(partner, str) else None
        asked = request is not None and request.get("type") == "history"
        # Messages that came while we were away: new to the person, not dimmed, a window of their own.
        away = where is not None and not isinstance(room, str) and not asked
        messages = event.get("messages")
        fresh = [
            item
            for item in (
                self._message_item(m, now, earlier=not away, partner=where if not isinstance(room, str) else None)
                for m in (messages if isinstance(messages, list) else [])
            )
            if item is not None
        ]
        if where is not None:
            conv = self._conversation(where)
            if event.get("more") is not True and (asked or isinstance(room, str)):
                conv.complete = True
            state = self.room_state.get(_fold(where))
            if state is not None:
                state.fresh = False
        targets = (where,) if where is not None else ()
        if fresh:
            header = {"room": room, "with": partner, "count": len(fresh), "away": away}
            out.items.append(Item("history", fresh[0].at, {k: v for k, v in header.items() if v is not None},
                                  earlier=not away, targets=targets, opens=away))
            if away:
                fresh = [Item("message", i.at, i.data, targets=targets, opens=True, mention=True) for i in fresh]
            out.items.extend(fresh)
        if asked:
            label = where if isinstance(room, str) else f"your conversation with {_text(partner)}"
            conv = self.conversations.get(self._conv_key(where)) if where is not None else None
            if not fresh and conv is not None and conv.complete and conv.shown:
                out.items.append(Item("info", now, {"text": _all_shown(conv.shown, _text(label))}, targets=targets))
            elif not fresh:
                out.items.append(Item("info", now, {"text": f"no earlier messages in {_text(label)}"}, targets=targets))
            elif event.get("more") is not True:
                out.items.append(Item("info", now, {"text": f"that is the start of {_text(label)}"}, targets=targets))

    def _on_join(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room, nick = event.get("room"), event.get("nick")
        mine = self.is_me(nick)
        if isinstance(room, str):
            if mine:
                self.rooms[_fold(room)] = room
                state = self.room_state.setdefault(_fold(room), RoomState(room))
                state.name, state.fresh = room, True
                # Our join takes the focus only when nothing else has it (the first room), or
                # to take the server's spelling of the room we switched to at /join; a join made
                # on another device of our account opens its window but does not steal the focus.
                if (self.focus is None and not self._status_chosen) or (
                    self.current_room is not None and _fold(self.current_room) == _fold(room)
                ):
                    self.focus = room
            state = self.room_state.get(_fold(room))
            if state is not None and isinstance(nick, str):
                state.members[_fold(nick)] = nick
        out.items.append(Item("join", now, event, targets=(room,) if isinstance(room, str) else (),
                              opens=mine, presence=not mine))

    def _on_part(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room, nick = event.get("room"), event.get("nick")
        mine = self.is_me(nick)
        if isinstance(room, str):
            if mine:
                self._leave(room)
            else:
                state = self.room_state.get(_fold(room))
                if state is not None and isinstance(nick, str):
                    state.members.pop(_fold(nick), None)
        out.items.append(Item("part", now, event, targets=(room,) if isinstance(room, str) else (),
                              presence=not mine))

    def _on_quit(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        nick = event.get("nick")
        mine = self.is_me(nick)
        if mine:
            self.close_reason = _text(event.get("reason")) or None
        rooms = self._rooms_of(nick)
        if isinstance(nick, str):
            for state in self.room_state.values():
                state.members.pop(_fold(nick), None)
        targets = rooms + ((nick,) if isinstance(nick, str) and not mine else ())
        out.items.append(Item("quit", now, event, targets=targets or (STATUS,), presence=not mine))

    def _on_nick(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        old, new = event.get("old"), event.get("new")
        mine = self.is_me(old)
        if mine and isinstance(new, str):
            self.nick = new
        rooms = self._rooms_of(old)
        if isinstance(old, str) and isinstance(new, str):
            for state in self.room_state.values():
                for group in (state.operators, state.voiced):
                    if _fold(old) in group:
                        group.discard(_fold(old))
                        group.add(_fold(new))
                if state.members.pop(_fold(old), None) is not None:
                    state.members[_fold(new)] = new
            if self.current_query is not None and _fold(self.current_query) == _fold(old):
                self.focus = new
        targets = rooms + ((old,) if isinstance(old, str) and not mine else ())
        out.items.append(Item("nick", now, event, targets=(STATUS, CURRENT) + rooms if mine else targets or (STATUS,)))

    def _on_names(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        """A long list comes in chunks; show it once, whole."""
        room = event.get("room")
        key = _fold(room) if isinstance(room, str) else ""
        gathered = self._names.setdefault(key, {"nicks": [], "operators": [], "voiced": []})
        for member in ("nicks", "operators", "voiced"):
            value = event.get(member)
            gathered[member].extend(n for n in (value if isinstance(value, list) else []) if isinstance(n, str))
        if event.get("more") is True:
            return
        del self._names[key]
        state = self.room_state.get(key)
        if state is not None:
            state.members = {_fold(n): n for n in gathered["nicks"]}
            state.operators = {_fold(n) for n in gathered["operators"]}
            state.voiced = {_fold(n) for n in gathered["voiced"]}
        data = {"room": room, "nicks": gathered["nicks"], "operators": gathered["operators"], "voiced": gathered["voiced"]}
        target = room if isinstance(room, str) and key in self.rooms else CURRENT
        out.items.append(Item("names", now, data, targets=(target,)))

    def _on_rooms(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        out.items.append(Item("rooms", now, event, targets=(CURRENT,)))

    def _on_notice(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        self.close_reason = _text(event.get("text")) or None
        out.items.append(Item("notice", now, event, targets=(STATUS, CURRENT)))

    def _on_error(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        ref = event.get("ref")
        if isinstance(ref, (int, str)) and ref == self._hello_ref:
            self._hello_ref = None
            out.refused = event
        if request is None and ref is None:
            # Not an answer to anything we asked: the server is telling us why it drops us.
            self.close_reason = f"{_text(event.get('code'))}: {_text(event.get('message'))}"
        if request is not None and request.get("type") == "join":
            # Undo the optimistic switch, unless the person has moved on since.
            room = request.get("room", "")
            if self.current_room is not None and _fold(self.current_room) == _fold(room):
                if _fold(room) not in self.rooms:
                    self.focus = request.get("_previous_focus")
        where = request.get("_focus") if request is not None else None
        if request is not None and request.get("type") == "join":
            where = request.get("_previous_focus")
        out.items.append(Item("error", now, event, targets=(where,) if where is not None else (CURRENT,)))

    # accounts and running rooms (contract 1.2, section 11)

    def _on_account(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        """Our own account changing (the answer to register/login/password/logout), or a
        room-mate logging in."""
        nick = event.get("nick")
        account = event.get("account")
        ours = request is not None or (nick is None) or self.is_me(nick)
        if ours:
            self.account = account if isinstance(account, str) else None
            data = dict(event, _ours=True, _asked=_text(request.get("type")) if request is not None else "")
            # What a reconnect's hello logs in with: the password of the last login, register
            # or password change that worked (without it, our own account's nick is reserved
            # against us after a reconnect).
            secret = {"login": "password", "register": "password", "password": "new"}.get(
                _text(request.get("type")) if request is not None else "")
            if secret is not None and self.account is not None and isinstance(request.get(secret), str):
                self.login = {"account": self.account, "password": request[secret]}
            if self.account is None:
                self.login = None
            out.items.append(Item("account", now, data, targets=(STATUS, CURRENT)))
            return
        rooms = self._rooms_of(nick)
        out.items.append(Item("account", now, event, targets=rooms or (STATUS,)))

    def _room_item(self, kind: str, event: Event, now: float, **extra: Any) -> Item:
        room = event.get("room")
        return Item(kind, now, event, targets=(room,) if isinstance(room, str) else (CURRENT,), **extra)

    def _on_topic(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room = event.get("room")
        state = self.room_state.get(_fold(room)) if isinstance(room, str) else None
        data: Dict[str, Any] = dict(event)
        if state is not None:
            state.topic = event
            data["_shown"] = state.fresh  # the joiner's copy: "topic: ...", not "bob set ..."
            state.fresh = False
        out.items.append(self._room_item("topic", data, now))

    def _on_kick(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room, nick = event.get("room"), event.get("nick")
        mine = self.is_me(nick)
        if isinstance(room, str):
            if mine:
                # Out of the room, but its window stays where it was, to show why.
                self.rooms.pop(_fold(room), None)
                self.room_state.pop(_fold(room), None)
            else:
                state = self.room_state.get(_fold(room))
                if state is not None and isinstance(nick, str):
                    state.members.pop(_fold(nick), None)
                    state.operators.discard(_fold(nick))
                    state.voiced.discard(_fold(nick))
        out.items.append(self._room_item("kick", dict(event, _me=mine), now, mention=mine))

    def _on_invite(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        if "nick" in event and not self.is_me(event.get("nick")):  # the asker's copy
            out.items.append(self._room_item("invite", event, now))
        else:
            out.items.append(Item("invite", now, dict(event, _for_me=True), targets=(STATUS, CURRENT), mention=True))

    def _on_mode(self, event: Event, request: Any, now: float, out: Reaction) -> None:
        room = event.get("room")
        changes = event.get("set")
        state = self.room_state.get(_fold(room)) if isinstance(room, str) else None
        if state is not None and isinstance(changes, Mapping) and "by" in event:
            for key, group, add in (("op", state.operators, True), ("deop", state.operators, False),
                                    ("voice", state.voiced, True), ("devoice", state.voiced, False)):
                nicks = changes.get(key)
                for n in nicks if isinstance(nicks, list) else []:
                    if isinstance(n, str):
                        (group.add if add else group.discard)(_fold(n))
        out.items.append(self._room_item("mode", event, now))

    # ----- what the screen shows about the current window ------------------------------

    def topic_line(self) -> str:
        """The line above the chat: the current room's topic, or what the window is."""
        if self.current_query is not None:
            return f"private conversation with {self.current_query}"
        room = self.current_room
        if room is None:
            return "status: server messages; /join #room, /query nick, /help"
        state = self.room_state.get(_fold(room))
        if state is None:
            return f"{room} (not joined)"
        topic = _text(state.topic.get("text")) if state.topic is not None else ""
        members = f"{len(state.members)} here"
        return f"{room} ({members}): {topic}" if topic else f"{room} ({members}), no topic"

    def members(self, room: str) -> List[str]:
        """The nicks we know are in `room` (for Tab completion)."""
        state = self.room_state.get(_fold(room))
        return list(state.members.values()) if state is not None else []

    def prefix(self, room: Any, nick: Any) -> str:
        """`@` for a room's operator, `+` for a voiced member, else nothing."""
        if not isinstance(room, str) or not isinstance(nick, str):
            return ""
        state = self.room_state.get(_fold(room))
        return state.prefix(nick) if state is not None else ""

    # ----- connection lifecycle ---------------------------------------------------------

    def connection_lost(self) -> None:
        """Forget what died with the connection; keep what the user expects back after it."""
        if self.registered or self._rejoin is None:
            self._rejoin = list(self.rooms.values()) if self._was_registered else None
        self.registered = False
        self.rooms = {}
        self.room_state = {}
        self._pending.clear()
        self._names.clear()
        self._own_pings.clear()
        self._hello_ref = None
        self.close_reason = None


def _all_shown(count: int, where: str) -> str:
    if count == 1:
        return f"the only message of {where} is shown: that is the start"
    return f"all {count} messages of {where} are shown: that is the start"


def _password_problem(password: str) -> Optional[str]:
    size = len(password.encode("utf-8", "surrogatepass"))
    if not PASSWORD_MIN <= size <= PASSWORD_MAX:
        return f"a password is {PASSWORD_MIN} to {PASSWORD_MAX} bytes long (this one is {size})"
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)
