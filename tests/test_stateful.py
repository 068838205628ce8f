"""A stateful, model-based test of the live server (the hardening work: a model of the contract checked against the real server).

A hypothesis `RuleBasedStateMachine` drives one real server process per example (a fresh one:
starting costs ~0.2 s, and a fresh server makes every example, and its shrinking, independent
of the ones before). Four well-behaved registered clients do random valid and invalid requests
(say, msg, join, part, nick and nick races, who, rooms, ping, pong, history, quit and reconnect,
frames with bad payloads that keep the connection, and pipelined history pages and says written
in pieces cut at random offsets); transient throwaway connections misbehave (length 0, lengths
above max_frame, random bytes, closes mid-frame, requests before hello, silence until the
handshake timeout, going quiet until the ping timeout, hello races, a flood past the rate limit).
Small limits make the rarer paths common: --max-presence 3 (rooms of 4 are "large": no presence
broadcasts), --max-outbuf 16384 (pipelined history pages pass the high-water mark, so the server
holds back the rest of a read until they are read), --max-text 64, --history-on-join 5.

The model keeps who is where under which nick, every room message said (for history), and for
each well-behaved client the exact list of events the protocol says it must receive. After
every step (the invariant below):
  * the server process is alive, and its log has no ERROR/CRITICAL line and no traceback;
  * each well-behaved client has received exactly its expected events, in order, and nothing
    else: the events are read until the expected count, then a `ping` barrier proves that
    nothing further was produced for it.

Rules wait until what they caused has happened (their own answers; for throwaways, the server's
`closed:` log line for that connection), so the server handles the steps one after the other and
each client's event order is determined.

Flood control: the server runs with `--rate 20 --burst 200`. Each well-behaved client keeps a
count of its requests and its rules do nothing once it nears the burst (barriers have a reserve),
so it is never limited: a `rate_limited` it received would fail the test. The flood rule uses a
throwaway registered connection that writes 3*burst+extra pings at once.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import ServerProcess
from wire import ConnectionClosed, Client, encode, frame

# --- the server under test ----------------------------------------------------------------------

MAX_FRAME = 4096  # the server wants max_outbuf (16384) >= 4 * max_frame
MAX_TEXT = 64  # small, so over-long texts are cheap to make
HISTORY_ON_JOIN = 5  # small, so the cut of history on join (and `more`) is exercised
RATE, BURST = 20, 200
HANDSHAKE_TIMEOUT = 0.4
PING_INTERVAL, PING_TIMEOUT = 2.0, 4.0  # short, so a client that goes quiet is timed out within an example
# (not shorter: the model's other clients sit idle while one rule runs; in one CI run on a busy
# machine they were timed out at 1.2 s while a flood of 600+ pings was being answered)
MAX_PRESENCE = 3  # small: rooms of 4 well-behaved clients are "large" (section 6), smaller ones are not
SERVER_OPTIONS = (
    "--max-per-ip", "0",  # throwaways come and go from 127.0.0.1 all the time
    "--register-rate", "0",  # and register as fast as they like (tests/test_pacing.py paces)
    "--log-level", "debug",  # a `closed:` line for every connection, registered or not
    "--rate", str(RATE), "--burst", str(BURST),
    "--max-text", str(MAX_TEXT),
    "--history-on-join", str(HISTORY_ON_JOIN),
    "--handshake-timeout", str(HANDSHAKE_TIMEOUT),
    "--ping-interval", str(PING_INTERVAL), "--ping-timeout", str(PING_TIMEOUT),
    "--max-presence", str(MAX_PRESENCE),
    # Small, so the backpressure between pipelined requests (high-water mark max_outbuf/4) acts,
    # yet no answer of this machine (history pages of <= 8 short messages) comes near the cap.
    "--max-outbuf", "16384", "--max-frame", str(MAX_FRAME),
    "--shutdown-grace", "1",
)
LOBBY = "#lobby"
CLIENTS = 4
TIMEOUT = 3.0

EXAMPLES = int(os.environ.get("SELCHAT_STATEFUL_EXAMPLES", "15"))
STEPS = int(os.environ.get("SELCHAT_STATEFUL_STEPS", "25"))
# Requests a well-behaved client may spend on actions in one example (its barriers come on top, one
# a step): the bucket's burst less a reserve, so none is ever refused whatever hypothesis draws.
BUDGET = BURST - STEPS - 10

_BAD_LOG = re.compile(r" (ERROR|CRITICAL) |Traceback")
_throwaway_names = itertools.count(1)


# --- matching events ----------------------------------------------------------------------------


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


class OneOf:
    def __init__(self, *values: Any) -> None:
        self.values = values

    def __repr__(self) -> str:
        return f"OneOf{self.values!r}"


def _same(actual: Any, want: Any) -> bool:
    if want is ANY:
        return True
    if isinstance(want, OneOf):
        return any(_same(actual, v) for v in want.values)
    if isinstance(want, dict):
        return isinstance(actual, dict) and matches(actual, want)
    if isinstance(want, list):
        return (isinstance(actual, list) and len(actual) == len(want)
                and all(_same(a, w) for a, w in zip(actual, want)))
    return type(actual) is type(want) and actual == want


def matches(actual: Dict[str, Any], want: Dict[str, Any]) -> bool:
    """Every member of `want` is there with that value; `ref` is there only if wanted."""
    if "ref" in actual and "ref" not in want:
        return False
    return all(name in actual and _same(actual[name], value) for name, value in want.items())


def error(code: Any, ref: Any = None) -> Dict[str, Any]:
    ev: Dict[str, Any] = {"type": "error", "code": code, "message": ANY}
    if ref is not None:
        ev["ref"] = ref
    return ev


def with_ref(ev: Dict[str, Any], ref: Any) -> Dict[str, Any]:
    ev = dict(ev)
    if ref is not None:
        ev["ref"] = ref
    return ev


# --- the contract's rules for names and text, from docs/protocol.md, "Names and text" --------

_NICK_RX = re.compile(r"[A-Za-z_\[\]{}\\|^][A-Za-z0-9_\-\[\]{}\\|^]{0,31}")
_ROOM_RX = re.compile(r"#[A-Za-z0-9_\-]{1,50}")


def nick_ok(nick: str) -> bool:
    return _NICK_RX.fullmatch(nick) is not None


def room_ok(room: str) -> bool:
    return _ROOM_RX.fullmatch(room) is not None


def text_ok(text: str) -> bool:
    if not 1 <= len(text) <= MAX_TEXT:
        return False
    if all(c in " \n\t\u00a0" for c in text):  # the only (Unicode) whitespace our alphabet has
        return False
    return not any((ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in text)


# --- strategies ---------------------------------------------------------------------------------


def case_variants(word: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flips: "".join(c.swapcase() if f else c for c, f in zip(word, flips))
    )


ROOM_BASES = [LOBBY, "#alpha", "#Beta", "#g-m_4"]
good_rooms = st.sampled_from(ROOM_BASES).flatmap(case_variants)
bad_rooms = st.sampled_from(["lobby", "#", "#a b", "#" + "x" * 51, "#\u00e9t\u00e9", "##", "#a\n", ""])
rooms = st.one_of(good_rooms, good_rooms, good_rooms, bad_rooms)

NICK_BASES = ["ann", "bob", "Cy", "dee", "e[1]", "f^_-", "G{x}|\\", "h" * 32]
good_nicks = st.sampled_from(NICK_BASES).flatmap(case_variants)
bad_nicks = st.sampled_from(["1ab", "-x", "a b", "", "x" * 33, "\u00e9mile", "ab\x00", "#ann"])
nicks = st.one_of(good_nicks, good_nicks, good_nicks, bad_nicks)

_GOOD_CHARS = list("abcXYZ09 .,!?'\"\\/") + ["\u00e9", "\u4e2d", "\U0001F600", "\n", "\t", "\u00a0"]
_BAD_CHARS = ["\x00", "\x1b", "\x07", "\r", "\x7f", "\x85", "\x9f"]
texts = st.one_of(
    st.text(st.sampled_from(_GOOD_CHARS), min_size=1, max_size=20),
    st.text(st.sampled_from(_GOOD_CHARS), min_size=1, max_size=20),
    st.text(st.sampled_from(_GOOD_CHARS + _BAD_CHARS), min_size=0, max_size=MAX_TEXT + 2),
    st.sampled_from(["", " ", "\n\t ", "x" * MAX_TEXT, "x" * (MAX_TEXT + 1), "\U0001F600" * MAX_TEXT,
                     "\U0001F600" * (MAX_TEXT + 1), "\x1b[31mred", "ok\x9b2J"]),
)
refs = st.one_of(
    st.none(), st.none(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.text(max_size=12),
)
tokens = st.one_of(st.none(), st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=12))
who = st.integers(0, CLIENTS - 1)

# Payloads that keep the connection (docs/protocol.md, "Frames"): (payload, error code, ref echoed).
_FIXED_BAD_PAYLOADS: List[Tuple[bytes, str, Any]] = [
    (b"\xff\xfe\x00", "bad_json", None),
    (b"not json", "bad_json", None),
    (b"[1, 2]", "bad_json", None),
    (b'"type"', "bad_json", None),
    (b'{"type": 5, "ref": 1}', "bad_json", None),
    (b'{"ref": 1}', "bad_json", None),
    (b'{"type": "say", "room": "#alpha"', "bad_json", None),
    (b'{"type": "ping", "token": NaN}', "bad_json", None),
    (b'{"type": "ping", "token": Infinity}', "bad_json", None),
    ("\ufeff{\"type\": \"ping\"}".encode(), "bad_json", None),
    (b'{"type": "ping", "token": "\\ud800"}', "bad_json", None),
    # deeper than any JSON parser recurses, and cut short; within max_frame (since MAX_FRAME
    # became 4096 the 60000 of the first version was a frame_too_large that ends the connection)
    (b"[" * (MAX_FRAME - 96), "bad_json", None),
    (b'{"type": "frobnicate", "ref": 7}', "unknown_type", 7),
    (b'{"type": "PING", "ref": "r"}', "unknown_type", "r"),
    (b'{"type": "", "ref": 8}', "unknown_type", 8),
    (b'{"type": "join", "ref": 3}', "bad_request", 3),
    (b'{"type": "say", "room": 5, "text": "hi", "ref": "r5"}', "bad_request", "r5"),
    (b'{"type": "say", "room": "#alpha", "ref": 4}', "bad_request", 4),
    (b'{"type": "msg", "to": ["ann"], "text": "hi", "ref": 6}', "bad_request", 6),
    (b'{"type": "nick", "nick": null, "ref": 2}', "bad_request", 2),
    (b'{"type": "who", "room": {"name": "#lobby"}, "ref": 9}', "bad_request", 9),
    (b'{"type": "ping", "ref": [1]}', "bad_request", None),
    (b'{"type": "ping", "ref": 1.5}', "bad_request", None),
    (b'{"type": "ping", "ref": true}', "bad_request", None),
    (b'{"type": "ping", "ref": null}', "bad_request", None),
    (b'{"type": "history", "room": "#lobby", "limit": 0, "ref": 13}', "bad_request", 13),
    (b'{"type": "history", "room": "#lobby", "before": "1", "ref": 14}', "bad_request", 14),
    (b'{"type": "quit", "reason": 5, "ref": 15}', "bad_request", 15),
    (b'{"type": "quit", "reason": "bye\\u001b", "ref": 16}', "bad_text", 16),
    (b'{"type": "hello", "nick": "zz", "ref": 17}', "already_registered", 17),
]
_REQUIRED_STRINGS = {"say": ("room", "text"), "msg": ("to", "text"), "join": ("room",),
                     "part": ("room",), "nick": ("nick",), "who": ("room",)}
_GOOD_VALUES = {"room": "#alpha", "text": "hi", "to": "ann", "nick": "ann"}
_wrong_values = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.none(),
                          st.booleans(), st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def ill_typed_requests(draw) -> Tuple[bytes, str, Any]:
    """A known request with one required member missing or of another JSON type: bad_request."""
    kind = draw(st.sampled_from(sorted(_REQUIRED_STRINGS)))
    obj: Dict[str, Any] = {"type": kind, **{m: _GOOD_VALUES[m] for m in _REQUIRED_STRINGS[kind]}}
    member = draw(st.sampled_from(_REQUIRED_STRINGS[kind]))
    if draw(st.booleans()):
        del obj[member]
    else:
        obj[member] = draw(_wrong_values)
    ref = draw(st.one_of(st.none(), st.integers(0, 1000)))
    if ref is not None:
        obj["ref"] = ref
    return json.dumps(obj).encode(), "bad_request", ref


def _is_request_object(payload: bytes) -> bool:
    """Would this payload pass as a JSON object with a string type (our reading of section 1)?"""
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=lambda c: 1 / 0)
    except (ValueError, ZeroDivisionError, RecursionError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("type"), str)


bad_payloads = st.one_of(
    st.sampled_from(_FIXED_BAD_PAYLOADS),
    ill_typed_requests(),
    st.binary(min_size=1, max_size=64).filter(lambda b: not _is_request_object(b)).map(
        lambda b: (b, "bad_json", None)),
)


def _frame_piece(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# Random bytes on a fresh connection: whole frames with random payloads and raw junk, mixed.
garbage = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=40).map(_frame_piece),
        st.binary(min_size=1, max_size=40),
        st.sampled_from([b"\x00\x00\x00\x00", struct.pack(">I", MAX_FRAME + 1), b"\xff\xff\xff\xff",
                         b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00"]),
    ),
    min_size=1, max_size=6,
).map(b"".join).filter(lambda data: expected_for_garbage(data)[1])  # no real request by chance


def expected_for_garbage(data: bytes) -> Tuple[Optional[List[str]], bool]:
    """The error codes the server must answer to `data` followed by EOF (section 1's table), and
    whether the answer is fully predictable (False when a frame happens to hold a real request)."""
    codes: List[str] = []
    pos = 0
    while len(data) - pos >= 4:
        (length,) = struct.unpack_from(">I", data, pos)
        if length == 0:
            return codes + ["bad_frame"], True
        if length > MAX_FRAME:
            return codes + ["frame_too_large"], True
        if len(data) - pos - 4 < length:
            break  # mid-frame at EOF: nothing
        payload = data[pos + 4: pos + 4 + length]
        pos += 4 + length
        if _is_request_object(payload):
            return None, False
        codes.append("bad_json")
    return codes, True


# --- the state machine --------------------------------------------------------------------------


class Member:
    """A well-behaved client and what the model says it must have received."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: Optional[Client] = None
        self.nick = ""
        self.rooms: Set[str] = set()  # room keys
        self.got: List[Dict[str, Any]] = []  # read, not yet checked
        self.expected: List[Dict[str, Any]] = []
        self.spent = 0  # requests sent on this connection, against flood control's burst

    def __repr__(self) -> str:
        return f"<Member {self.index} {self.nick!r} in {sorted(self.rooms)}>"

    def take(self, ev: Dict[str, Any]) -> None:
        """Keep an event for the check; a server `ping` (section 6: after ping_interval of silence,
        which a slow step can cause) is answered and not kept."""
        assert self.conn is not None
        if ev.get("type") == "ping":
            assert "ref" not in ev and "token" in ev, ev
            self.conn.send(type="pong", token=ev["token"])
            return
        self.got.append(ev)

    def barrier(self) -> None:
        assert self.conn is not None
        self.spent += 1
        for ev in self.conn.barrier(TIMEOUT):
            self.take(ev)

    def read_until(self, count: int, timeout: float = TIMEOUT) -> None:
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while len(self.got) < count:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise AssertionError("timed out")
                self.take(self.conn.recv_event(left))
            except (AssertionError, ConnectionClosed) as exc:
                raise AssertionError(
                    f"member {self.index} ({self.nick}): {exc}\n  expected {self.expected!r}\n  got {self.got!r}"
                ) from None

    def read_answer(self, ref: Any, timeout: float = TIMEOUT) -> Dict[str, Any]:
        """Read until an event carrying `ref` arrives; return it (it stays in `got`)."""
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.got:
                if ev.get("ref") == ref:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"member {self.index}: no answer with ref {ref!r}; got {self.got!r}")
            self.take(self.conn.recv_event(left))


class Room:
    def __init__(self, name: str) -> None:
        self.name = name
        self.members: Set[Member] = set()


class ChatMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.srv = ServerProcess(*SERVER_OPTIONS)
        try:
            self._start()
        except BaseException:
            self.srv.stop()
            raise

    def _start(self) -> None:
        self.log_checked = 0
        self.members = [Member(i) for i in range(CLIENTS)]
        self.rooms: Dict[str, Room] = {LOBBY: Room(LOBBY)}
        self.history: Dict[str, List[Dict[str, Any]]] = {}
        self.last_id = 0
        self.silent: List[Tuple[Client, float]] = []
        self.quiet: List[Tuple[Client, float, int, int]] = []
        self.throwaways: List[Client] = []
        for m, nick in zip(self.members, ["ann", "bob", "Cy", "dee"]):
            self.register(m, nick, ref=None)
        self.check_all()

    # --- helpers --------------------------------------------------------------------------

    def connected(self) -> List[Member]:
        return [m for m in self.members if m.conn is not None]

    def holder(self, nick: str) -> Optional[Member]:
        for m in self.members:
            if m.conn is not None and m.nick.lower() == nick.lower():
                return m
        return None

    def sharing(self, m: Member) -> Set[Member]:
        """Who gets m's `nick` and `quit` besides m: the members of m's rooms that are not large
        (at most max_presence members, m counted; section 6)."""
        out: Set[Member] = set()
        for key in m.rooms:
            if len(self.rooms[key].members) <= MAX_PRESENCE:
                out |= self.rooms[key].members
        out.discard(m)
        return out

    def lobby_members(self) -> Set[Member]:
        return set(self.rooms[LOBBY].members)

    def names_of(self, room: Room) -> List[str]:
        return sorted((m.nick for m in room.members), key=lambda n: (n.lower(), n))

    def history_event(self, key: str, name: str, before: Optional[int], limit: int, ref: Any) -> Dict[str, Any]:
        said = [msg for msg in self.history.get(key, []) if before is None or msg["id"] < before]
        page = said[-limit:] if limit else []
        return with_ref({"type": "history", "room": name, "messages": page, "more": len(said) > len(page)}, ref)

    def actor(self, i: int, requests: int = 1) -> Optional[Member]:
        """Member i if it is connected and may send `requests` more without nearing the burst."""
        m = self.members[i]
        if m.conn is None or m.spent + requests > BUDGET:
            return None
        m.spent += requests
        return m

    def send(self, m: Member, obj: Dict[str, Any], ref: Any) -> None:
        assert m.conn is not None
        if ref is not None:
            obj["ref"] = ref
        m.conn.send(obj)

    def join_events(self, m: Member, key: str, name: str, ref: Any) -> None:
        """m becomes a member of `key` (created as `name` if new); the events of section 4."""
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(name)
        large = len(room.members) + 1 > MAX_PRESENCE  # the joiner counted
        if not large:
            for other in room.members:
                other.expected.append({"type": "join", "room": room.name, "nick": m.nick})
        room.members.add(m)
        m.rooms.add(key)
        m.expected.append(with_ref({"type": "join", "room": room.name, "nick": m.nick}, ref))
        if not large:  # in a large room the list comes only on `who`
            m.expected.append(with_ref({"type": "names", "room": room.name, "nicks": self.names_of(room),
                                        "more": False}, ref))
        m.expected.append(self.history_event(key, room.name, None, HISTORY_ON_JOIN, ref))

    def leave(self, m: Member, key: str) -> None:
        room = self.rooms[key]
        room.members.discard(m)
        m.rooms.discard(key)
        if not room.members and key != LOBBY:
            del self.rooms[key]

    def register(self, m: Member, nick: str, ref: Any) -> None:
        """Connect m afresh and say hello with `nick`, falling back to a unique nick if refused."""
        m.conn = Client(self.srv.port, label=f"member{m.index}")
        m.rooms = set()
        m.nick = ""  # not registered: holds no nick
        m.spent = 0  # a new connection, a full bucket (hello does not count)
        if not nick_ok(nick) or self.holder(nick) is not None:
            code = "bad_nick" if not nick_ok(nick) else "nick_taken"
            self.send(m, {"type": "hello", "nick": nick}, ref)
            m.expected.append(error(code, ref))
            m.read_until(len(m.expected))
            nick = f"w{m.index}n{next(_throwaway_names)}"
        m.nick = nick
        self.send(m, {"type": "hello", "nick": nick}, ref)
        m.expected.append(with_ref({"type": "welcome", "nick": nick, "server": ANY, "motd": ANY,
                                    "limits": {"max_frame": MAX_FRAME, "max_text": MAX_TEXT,
                                               "rate": OneOf(RATE, float(RATE)), "burst": BURST}}, ref))
        self.join_events(m, LOBBY, LOBBY, ref)
        m.read_until(len(m.expected))

    def note_message(self, ev: Dict[str, Any]) -> None:
        assert isinstance(ev.get("id"), int) and ev["id"] > self.last_id, (
            f"message id {ev.get('id')!r} not above the last one ({self.last_id}): {ev!r}")
        assert isinstance(ev.get("ts"), int) and abs(ev["ts"] / 1000 - time.time()) < 60, ev
        self.last_id = ev["id"]

    def new_log(self) -> str:
        text = self.srv.log()
        new, self.log_checked = text[self.log_checked:], len(text)
        return new

    def wait_closed_log(self, port: int, since: int, timeout: float = 5.0) -> str:
        """The server's `closed:` line for the connection from local `port` (logged after `since`)."""
        rx = re.compile(r"closed: 127\.0\.0\.1:%d: (.*)" % port)
        deadline = time.monotonic() + timeout
        while True:
            found = rx.search(self.srv.log()[since:])
            if found:
                return found.group(1)
            assert self.srv.alive(), f"server died:\n{self.srv.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no 'closed:' log line for port {port}:\n{self.srv.log()[since:][-3000:]}"
            time.sleep(0.005)

    def throwaway(self) -> Tuple[Client, int, int]:
        since = len(self.srv.log())
        c = Client(self.srv.port, label="throwaway")
        self.throwaways.append(c)
        return c, c.sock.getsockname()[1], since

    def lobby_is_large_with_one_more(self) -> bool:
        return len(self.rooms[LOBBY].members) + 1 > MAX_PRESENCE

    def register_throwaway(self, c: Client) -> str:
        """A throwaway in #lobby: its join (and later its quit) reach the lobby if it is not large."""
        nick = f"tw{next(_throwaway_names)}"
        large = self.lobby_is_large_with_one_more()
        c.register(nick, names=not large)
        if not large:
            for m in self.lobby_members():
                m.expected.append({"type": "join", "room": LOBBY, "nick": nick})
        return nick

    def throwaway_quits(self, nick: str, reason: str) -> None:
        if not self.lobby_is_large_with_one_more():
            for m in self.lobby_members():
                m.expected.append({"type": "quit", "nick": nick, "reason": reason})

    # --- the invariant --------------------------------------------------------------------

    @invariant()
    def check_all(self) -> None:
        assert self.srv.alive(), f"the server died (rc={self.srv.proc.returncode}):\n{self.srv.log()[-4000:]}"
        for m in self.connected():
            m.read_until(len(m.expected))
            assert m.conn is not None
            m.barrier()
            ok = len(m.got) == len(m.expected) and all(matches(g, w) for g, w in zip(m.got, m.expected))
            assert ok, (f"member {m.index} ({m.nick}) received other events than the protocol says:\n"
                        f"  expected {m.expected!r}\n  got      {m.got!r}")
            for g in m.got:
                if g.get("type") == "error":
                    assert isinstance(g.get("message"), str) and g["message"], g
            m.got, m.expected = [], []
        bad = [line for line in self.new_log().splitlines() if _BAD_LOG.search(line)]
        assert not bad, "the server logged errors:\n" + "\n".join(bad)

    # --- valid (and refused) requests of the well-behaved clients -------------------------

    def plan_say(self, m: Member, room: str, text: str, ref: Any) -> Optional[Tuple[int, str]]:
        """The requester's answer to a `say`; (its position, room key) when it is a message."""
        key = room.lower()
        errors = []
        if not room_ok(room):
            errors.append("bad_room")
        if not text_ok(text):
            errors.append("bad_text")
        if room_ok(room) and key not in m.rooms:
            errors.append("not_in_room")
        if errors:  # the contract orders no checks: any of the applicable errors will do
            m.expected.append(error(OneOf(*errors), ref))
            return None
        m.expected.append(with_ref({"type": "message", "id": ANY, "ts": ANY, "from": m.nick,
                                    "room": self.rooms[key].name, "text": text}, ref))
        return len(m.expected) - 1, key

    def commit_say(self, m: Member, planned: Tuple[int, str]) -> None:
        """Once the echo is read: its id and ts go into history and to every other member."""
        pos, key = planned
        m.read_until(pos + 1)
        echo = m.got[pos]
        if echo.get("type") != "message":
            return  # the invariant reports the mismatch
        self.note_message(echo)
        said = {k: echo[k] for k in ("type", "id", "ts", "from", "room", "text") if k in echo}
        self.history.setdefault(key, []).append(said)
        for other in self.rooms[key].members - {m}:
            other.expected.append(dict(said))

    @rule(i=who, room=rooms, text=texts, ref=refs)
    def say(self, i: int, room: str, text: str, ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        self.send(m, {"type": "say", "room": room, "text": text}, ref)
        planned = self.plan_say(m, room, text, ref)
        if planned:
            self.commit_say(m, planned)

    @rule(i=who, pages=st.lists(st.tuples(good_rooms, st.integers(1, 8)), max_size=6),
          says=st.lists(st.tuples(good_rooms, texts, refs), min_size=1, max_size=5),
          cuts=st.lists(st.integers(1, 200), min_size=1, max_size=8))
    def pipelined(self, i: int, pages: List[Tuple[str, int]], says: List[Tuple[str, str, Any]],
                  cuts: List[int]) -> None:
        """History requests, says and a ping in one stream cut at random byte offsets, so frames
        arrive split over reads and several in one read (section 1); the history pages pass the
        high-water mark, so the server holds back the rest until they are read (section 6);
        answers come in request order, and the says reach the others in that order."""
        m = self.actor(i, len(pages) + len(says) + 1)
        if m is None:
            return
        data = bytearray()
        for n, (room, limit) in enumerate(pages):
            data += encode({"type": "history", "room": room, "limit": limit, "ref": f"page{n}"})
            key = room.lower()
            if key in m.rooms:
                m.expected.append(self.history_event(key, self.rooms[key].name, None, limit, f"page{n}"))
            else:
                m.expected.append(error("not_in_room", f"page{n}"))
        for room, text, ref in says:
            data += encode(with_ref({"type": "say", "room": room, "text": text}, ref))
        data += encode({"type": "ping", "token": "pipelined"})
        pos = 0
        for cut in cuts + [len(data)]:
            piece = bytes(data[pos: pos + cut])
            if piece:
                m.conn.send_raw(piece)
                time.sleep(0.001)  # let the server read this piece on its own
            pos += len(piece)
        m.conn.send_raw(bytes(data[pos:]))
        planned = [self.plan_say(m, room, text, ref) for room, text, ref in says]
        m.expected.append({"type": "pong", "token": "pipelined"})
        for p in planned:
            if p:
                self.commit_say(m, p)

    @rule(i=who, to=st.one_of(nicks, st.sampled_from(["nobody", "tw0"])), text=texts, ref=refs,
          pick=st.integers(0, CLIENTS))
    def msg(self, i: int, to: str, text: str, ref: Any, pick: int) -> None:
        m = self.actor(i)
        if m is None:
            return
        if pick < CLIENTS and self.members[pick].conn is not None:
            to = self.members[pick].nick.swapcase() if pick % 2 else self.members[pick].nick
        self.send(m, {"type": "msg", "to": to, "text": text}, ref)
        target = self.holder(to) if nick_ok(to) else None
        errors = []
        if not text_ok(text):
            errors.append("bad_text")
        if target is None:
            errors.append("no_such_nick")
        if errors:
            m.expected.append(error(OneOf(*errors), ref))
            return
        assert target is not None
        m.expected.append(with_ref({"type": "message", "id": ANY, "ts": ANY, "from": m.nick,
                                    "to": target.nick, "text": text}, ref))
        m.read_until(len(m.expected))
        echo = m.got[len(m.expected) - 1]
        if echo.get("type") != "message":
            return
        self.note_message(echo)
        if target is not m:  # (our choice) a message to oneself arrives once
            target.expected.append({k: echo[k] for k in ("type", "id", "ts", "from", "to", "text") if k in echo})

    @rule(i=who, room=rooms, ref=refs)
    def join(self, i: int, room: str, ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        self.send(m, {"type": "join", "room": room}, ref)
        if not room_ok(room):
            m.expected.append(error("bad_room", ref))
            return
        key = room.lower()
        if key in m.rooms:  # a no-op that still answers names
            r = self.rooms[key]
            m.expected.append(with_ref({"type": "names", "room": r.name, "nicks": self.names_of(r),
                                        "more": False}, ref))
        else:
            self.join_events(m, key, room, ref)
        m.read_until(len(m.expected))

    @rule(i=who, room=rooms, ref=refs)
    def part(self, i: int, room: str, ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        self.send(m, {"type": "part", "room": room}, ref)
        key = room.lower()
        if not room_ok(room):
            m.expected.append(error("bad_room", ref))
        elif key not in m.rooms:
            m.expected.append(error("not_in_room", ref))
        else:
            r = self.rooms[key]
            if len(r.members) <= MAX_PRESENCE:  # the leaver counted
                for other in r.members - {m}:
                    other.expected.append({"type": "part", "room": r.name, "nick": m.nick})
            m.expected.append(with_ref({"type": "part", "room": r.name, "nick": m.nick}, ref))
            self.leave(m, key)
        m.read_until(len(m.expected))

    @rule(i=who, nick=nicks, ref=refs, own_case=st.booleans())
    def nick(self, i: int, nick: str, ref: Any, own_case: bool) -> None:
        m = self.actor(i)
        if m is None:
            return
        if own_case:
            nick = m.nick.swapcase() if nick_ok(m.nick.swapcase()) else m.nick
        self.send(m, {"type": "nick", "nick": nick}, ref)
        holder = self.holder(nick) if nick_ok(nick) else None
        if not nick_ok(nick):
            m.expected.append(error("bad_nick", ref))
        elif holder is not None and holder is not m:
            m.expected.append(error("nick_taken", ref))
        else:
            ev = {"type": "nick", "old": m.nick, "new": nick}
            if nick != m.nick:  # (exactly the nick one has: only the asker hears of it)
                for other in self.sharing(m):
                    other.expected.append(dict(ev))
            m.expected.append(with_ref(ev, ref))
            m.nick = nick
        m.read_until(len(m.expected))

    @rule(a=who, b=who, nick=good_nicks, upper=st.booleans())
    def nick_race(self, a: int, b: int, nick: str, upper: bool) -> None:
        """Two clients ask for the same free nick at once: exactly one wins."""
        if a == b:
            return
        ma, mb = self.actor(a), self.actor(b)
        if ma is None or mb is None:
            return
        if self.holder(nick) is not None:
            nick = f"race{next(_throwaway_names)}"
        ref_a, ref_b = f"race-{a}", f"race-{b}"
        ma.conn.send(type="nick", nick=nick, ref=ref_a)
        mb.conn.send(type="nick", nick=nick.upper() if upper else nick, ref=ref_b)
        ans_a, ans_b = ma.read_answer(ref_a), mb.read_answer(ref_b)
        kinds = sorted([ans_a.get("type"), ans_b.get("type")])
        assert kinds == ["error", "nick"], f"a nick race must have exactly one winner: {ans_a!r} {ans_b!r}"
        winner, loser, wref, lref = (ma, mb, ref_a, ref_b) if ans_a["type"] == "nick" else (mb, ma, ref_b, ref_a)
        new = nick if winner is ma or not upper else nick.upper()
        ev = {"type": "nick", "old": winner.nick, "new": new}
        for other in self.sharing(winner):
            other.expected.append(dict(ev))
        winner.expected.append(with_ref(ev, wref))
        loser.expected.append(error("nick_taken", lref))
        winner.nick = new

    @rule(i=who, room=rooms, ref=refs)
    def who_(self, i: int, room: str, ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        self.send(m, {"type": "who", "room": room}, ref)
        if not room_ok(room):
            m.expected.append(error("bad_room", ref))
            return
        r = self.rooms.get(room.lower())
        nicks_ = self.names_of(r) if r is not None else []
        m.expected.append(with_ref({"type": "names", "room": r.name if r else room, "nicks": nicks_,
                                    "more": False}, ref))

    @rule(i=who, ref=refs)
    def list_rooms(self, i: int, ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        self.send(m, {"type": "rooms"}, ref)
        m.expected.append(with_ref({"type": "rooms", "rooms": ANY}, ref))
        m.read_until(len(m.expected))
        got = m.got[-1].get("rooms")
        want = sorted((r.name, len(r.members)) for r in self.rooms.values())
        assert isinstance(got, list) and sorted((r.get("name"), r.get("members")) for r in got) == want, (
            f"rooms answer {got!r}, the model has {want!r}")
        counts = [r["members"] for r in got]
        assert counts == sorted(counts, reverse=True), f"(our choice) largest first: {got!r}"

    @rule(i=who, token=tokens, ref=refs)
    def ping(self, i: int, token: Any, ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        obj: Dict[str, Any] = {"type": "ping"}
        if token is not None:
            obj["token"] = token
        self.send(m, obj, ref)
        m.expected.append(with_ref({"type": "pong", **({"token": token} if token is not None else {})}, ref))

    @rule(i=who, token=tokens)
    def pong(self, i: int, token: Any) -> None:
        """A pong from a client is never answered."""
        m = self.actor(i)
        if m is None:
            return
        m.conn.send(type="pong", **({"token": token} if token is not None else {}))

    @rule(i=who, room=good_rooms, limit=st.one_of(st.none(), st.integers(1, 8)),
          before=st.one_of(st.none(), st.integers(-3, 200)), ref=refs)
    def history_request(self, i: int, room: str, limit: Optional[int], before: Optional[int], ref: Any) -> None:
        m = self.actor(i)
        if m is None:
            return
        obj: Dict[str, Any] = {"type": "history", "room": room}
        if limit is not None:
            obj["limit"] = limit
        if before is not None:
            obj["before"] = before
        self.send(m, obj, ref)
        key = room.lower()
        if key not in m.rooms:
            m.expected.append(error("not_in_room", ref))
            return
        m.expected.append(self.history_event(key, self.rooms[key].name, before, 50 if limit is None else limit, ref))

    @rule(i=who, bad=bad_payloads)
    def bad_payload(self, i: int, bad: Tuple[bytes, str, Any]) -> None:
        """A well-framed payload that is not a valid request: an error, and the connection stays."""
        m = self.actor(i)
        if m is None:
            return
        payload, code, ref = bad
        m.conn.send_raw(frame(payload))
        m.expected.append(error(code, ref))

    @rule(i=who, reason=st.one_of(st.none(), texts), ref=refs, nick=nicks)
    def quit_and_reconnect(self, i: int, reason: Optional[str], ref: Any, nick: str) -> None:
        m = self.actor(i)
        if m is None:
            return
        obj: Dict[str, Any] = {"type": "quit"}
        if reason is not None:
            obj["reason"] = reason
        self.send(m, obj, ref)
        if reason is not None and not text_ok(reason):
            m.expected.append(error("bad_text", ref))  # (our choice) and the quit is not carried out
            return
        for other in self.sharing(m):
            other.expected.append({"type": "quit", "nick": m.nick, "reason": reason or "quit"})
        assert m.conn is not None
        after = m.conn.assert_closed(TIMEOUT)
        assert after == [], f"events after own quit: {after!r}"
        for key in list(m.rooms):
            self.leave(m, key)
        m.conn = None
        self.register(m, nick, ref)

    # --- throwaway misbehaving connections --------------------------------------------------

    @rule(registered=st.booleans(), length=st.one_of(st.just(0), st.integers(MAX_FRAME + 1, (1 << 32) - 1)),
          split=st.booleans())
    def bad_length(self, registered: bool, length: int, split: bool) -> None:
        """Length 0 or above max_frame: the error, then the server closes (section 1)."""
        c, port, since = self.throwaway()
        nick = self.register_throwaway(c) if registered else None
        header = struct.pack(">I", length)
        if split:  # the header in two reads
            c.send_raw(header[:2])
            time.sleep(0.002)
            c.send_raw(header[2:])
        else:
            c.send_raw(header + b"{}")
        events = c.assert_closed(TIMEOUT)
        want = error("bad_frame" if length == 0 else "frame_too_large")
        assert len(events) == 1 and matches(events[0], want), f"length {length}: got {events!r}"
        self.wait_closed_log(port, since)
        if nick:
            self.throwaway_quits(nick, "protocol error")

    @rule(data=garbage)
    def garbage_bytes(self, data: bytes) -> None:
        """Random bytes on a fresh connection, then EOF: exactly the errors section 1 says, then closed."""
        c, port, since = self.throwaway()
        c.send_raw(data)
        c.sock.shutdown(socket.SHUT_WR)
        events = c.assert_closed(TIMEOUT)
        codes, exact = expected_for_garbage(data)
        got = [e.get("code") if e.get("type") == "error" else e.get("type") for e in events]
        assert exact and got == codes, f"garbage {data!r}: expected errors {codes}, got {events!r}"
        self.wait_closed_log(port, since)

    @rule(registered=st.booleans(), cut=st.integers(1, 60))
    def close_mid_frame(self, registered: bool, cut: int) -> None:
        """Half a frame, then close: nothing is answered; others see `connection closed`."""
        c, port, since = self.throwaway()
        nick = self.register_throwaway(c) if registered else None
        whole = encode({"type": "say", "room": LOBBY, "text": "never finished, never said"})
        c.send_raw(whole[: min(cut, len(whole) - 1)])
        time.sleep(0.002)
        assert c.poll_event() is None
        c.close()
        detail = self.wait_closed_log(port, since)
        assert "mid-frame" in detail or "reset" in detail.lower(), detail
        if nick:
            self.throwaway_quits(nick, "connection closed")

    @rule(kind=st.sampled_from(["say", "join", "part", "nick", "who", "rooms", "msg", "history"]),
          ref=refs, token=tokens)
    def before_hello(self, kind: str, ref: Any, token: Any) -> None:
        """Before welcome only hello/ping/pong/quit are served; the rest get not_registered."""
        c, port, since = self.throwaway()
        obj: Dict[str, Any] = {"type": kind}
        if ref is not None:
            obj["ref"] = ref
        c.send(obj)  # (our choice) not_registered even with the members missing
        c.expect_error("not_registered", **({"ref": ref} if ref is not None else {}))
        if ref is None:
            assert "ref" not in c.received[-1]
        c.send(type="pong")
        c.send(type="ping", **({"token": token} if token is not None else {}))
        pong = c.expect("pong")
        assert pong.get("token") == token and "ref" not in pong, pong
        c.send(type="quit")
        assert c.assert_closed(TIMEOUT) == []
        self.wait_closed_log(port, since)

    @rule(half=st.booleans())
    def silent(self, half: bool) -> None:
        """Connect and say nothing (or half a hello): closed after the handshake timeout, checked at teardown."""
        c, _, _ = self.throwaway()
        if half:
            c.send_raw(encode({"type": "hello", "nick": "never"})[:9])
        self.silent.append((c, time.monotonic()))

    @precondition(lambda self: not self.quiet)
    @rule()
    def goes_quiet(self) -> None:
        """A registered client leaves #lobby, then never sends again: one server `ping` after
        ping_interval, closed after ping_timeout (checked at teardown; section 6)."""
        c, port, since = self.throwaway()
        nick = self.register_throwaway(c)
        c.send(type="part", room=LOBBY)
        c.expect("part", room=LOBBY, nick=nick)
        if not self.lobby_is_large_with_one_more():
            for m in self.lobby_members():
                m.expected.append({"type": "part", "room": LOBBY, "nick": nick})
        self.quiet.append((c, time.monotonic(), port, since))

    @rule(upper=st.booleans(), reason=st.one_of(st.none(), st.sampled_from(["bye", "gone \U0001F600"])))
    def hello_race(self, upper: bool, reason: Optional[str]) -> None:
        """Two new connections ask for one nick at once: one welcome, one nick_taken."""
        c1, port1, since = self.throwaway()
        c2, port2, _ = self.throwaway()
        nick = f"tw{next(_throwaway_names)}"
        c1.send(type="hello", nick=nick, ref=1)
        c2.send(type="hello", nick=nick.upper() if upper else nick, ref=2)
        first1, first2 = c1.recv_event(TIMEOUT), c2.recv_event(TIMEOUT)
        kinds = sorted([first1["type"], first2["type"]])
        assert kinds == ["error", "welcome"], f"hello race: {first1!r} {first2!r}"
        (win, wref, wfirst), (lose, lfirst) = (
            ((c1, 1, first1), (c2, first2)) if first1["type"] == "welcome" else ((c2, 2, first2), (c1, first1)))
        assert matches(lfirst, error("nick_taken", 1 if lose is c1 else 2)), lfirst
        wnick = wfirst["nick"]
        assert wnick == (nick if win is c1 or not upper else nick.upper()), wfirst
        win.expect("join", room=LOBBY, nick=wnick, ref=wref)
        large = self.lobby_is_large_with_one_more()
        if not large:
            names = win.expect_names(LOBBY, ref=wref)
            assert sorted(names, key=str.lower) == sorted([x.nick for x in self.lobby_members()] + [wnick],
                                                          key=str.lower)
            for m in self.lobby_members():
                m.expected.append({"type": "join", "room": LOBBY, "nick": wnick})
        win.expect("history", room=LOBBY, ref=wref)
        lose.send(type="quit")
        assert lose.assert_closed(TIMEOUT) == []
        win.send(type="quit", **({"reason": reason} if reason else {}))
        assert win.assert_closed(TIMEOUT) == []
        self.wait_closed_log(port1, since)
        self.wait_closed_log(port2, since)
        self.throwaway_quits(wnick, reason or "quit")

    @rule(extra=st.integers(1, 20))
    def flood(self, extra: int) -> None:
        """A registered connection writes 3*burst+extra pings at once: the bucket answers `burst` (and
        whatever refilled) with pongs, refuses the next ones with rate_limited, and past `burst`
        refusals in a row drops the client; others see `excess flood` (section 8). (The answers
        pass the high-water mark, so the server serves the rest only as they are read, and the
        bucket may refill meanwhile: burst more requests make room for one refill.)"""
        c, port, since = self.throwaway()
        nick = self.register_throwaway(c)
        count = 3 * BURST + extra
        c.send_raw(b"".join(encode({"type": "ping", "token": n, "ref": n}) for n in range(count)))
        events = c.assert_closed(5.0)
        assert len(events) >= 2 * BURST + 1, f"{len(events)} events: {events[-5:]!r}"
        tail = events[-(BURST + 1):]
        assert all(e.get("type") == "error" and e.get("code") == "rate_limited" for e in tail), tail[-3:]
        pongs = [e for e in events[: -(BURST + 1)] if e.get("type") == "pong"]
        assert len(pongs) >= BURST, f"only {len(pongs)} pongs before the refusals"
        for n, e in enumerate(events):  # every answer carries its request's ref, in order
            assert e.get("ref") == n, (n, e)
        self.wait_closed_log(port, since)
        self.throwaway_quits(nick, "excess flood")

    # --- teardown -------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            for c, started in self.silent:
                left = started + HANDSHAKE_TIMEOUT + 3.0 - time.monotonic()
                events = c.assert_closed(max(left, 0.1))
                assert events == [], f"a connection that never said hello got {events!r}"
                assert time.monotonic() - started >= HANDSHAKE_TIMEOUT * 0.9, "closed before the handshake timeout"
            for c, started, port, since in self.quiet:
                left = started + PING_TIMEOUT + 3.0 - time.monotonic()
                events = c.assert_closed(max(left, 0.1))
                took = time.monotonic() - started
                assert [e.get("type") for e in events] == ["ping"] and isinstance(events[0].get("token"), (str, int)), (
                    f"a quiet client must get one ping, then be closed: {events!r}")
                assert took >= PING_TIMEOUT * 0.9, f"closed {took:.2f}s after its last word"
                assert self.wait_closed_log(port, since) == "ping timeout"
            for m in self.members:
                if m.conn is not None:
                    m.conn.close()
            for c in self.throwaways:
                c.close()
            assert self.srv.alive(), f"the server died:\n{self.srv.log()[-4000:]}"
            self.srv.signal(15)
            rc = self.srv.wait_exit(10.0)
            assert rc == 0, f"exit code {rc}:\n{self.srv.log()[-4000:]}"
            bad = [line for line in self.new_log().splitlines() if _BAD_LOG.search(line)]
            assert not bad, "the server logged errors:\n" + "\n".join(bad)
        finally:
            self.srv.stop()


ChatMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestChatMachine = ChatMachine.TestCase
