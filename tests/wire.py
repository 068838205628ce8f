"""A raw, strict client for the selchat wire protocol (docs/protocol.md, "Frames"), for tests.

It knows framing and nothing of the server's code: every frame it receives is checked against
the contract (length 1..max_frame, a UTF-8 JSON object with a string `type`), and a violation
fails the test. Waiting is always on events with a deadline, never on a bare sleep; to show that
something did NOT arrive, `barrier()` sends a `ping` with a fresh token and collects what comes
before its `pong`: whatever the server produced earlier for this connection has arrived by then.
"""

from __future__ import annotations

import errno
import itertools
import json
import select
import socket
import ssl
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

DEFAULT_TIMEOUT = 3.0
HEADER = struct.Struct(">I")
LOBBY = "#lobby"



def send_all(sock: socket.socket, data: bytes, timeout: float, label: str) -> None:
    """All of `data` on a non-blocking socket (TLS too) within `timeout`, or a test failure."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        try:
            n = sock.send(view)
            view = view[n:]
            continue
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{label}: could not send {len(view)} bytes within {timeout}s")
        select.select([], [sock], [], left)

class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ABSENT = _Absent()  # expect(..., ref=ABSENT): the member must not be there
ANY = _Any()  # expect(..., id=ANY): the member must be there, any value

_tokens = itertools.count(1)


class ConnectionClosed(Exception):
    """The server closed the connection (EOF or reset) while we waited for an event."""


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def encode(obj: Dict[str, Any]) -> bytes:
    return frame(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not RFC 8259 JSON")


def matches(event: Dict[str, Any], type: Optional[str] = None, **members: Any) -> bool:
    if type is not None and event.get("type") != type:
        return False
    for name, want in members.items():
        if want is ABSENT:
            if name in event:
                return False
        elif want is ANY:
            if name not in event:
                return False
        elif name not in event or event[name] != want or builtin_type(event[name]) is not builtin_type(want):
            return False
    return True


builtin_type = type


def describe(type: Optional[str], members: Dict[str, Any]) -> str:
    parts = [f"type={type!r}"] if type else []
    parts += [f"{k}={v!r}" for k, v in members.items()]
    return ", ".join(parts)



class Peer:
    """What the test clients of every door share: a non-blocking socket, sending within a
    deadline, and a polite teardown. A subclass says its door's goodbye (`QUIT`)."""

    QUIT = b""
    label: str
    sock: Any
    closed: bool

    def send_raw(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send all of `data` within `timeout` (the socket is non-blocking)."""
        send_all(self.sock, data, timeout, self.label)

    def assert_closed(self, timeout: float = DEFAULT_TIMEOUT) -> Any:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def quit_and_close(self, timeout: float = 2.0) -> None:
        """Polite teardown: quit, drain until the server closes (so its side effects are done)."""
        if not self.closed:
            try:
                self.send_raw(self.QUIT, timeout=0.5)
                self.assert_closed(timeout)
            except (AssertionError, OSError, ConnectionClosed):
                pass
        self.close()


class Client(Peer):
    """One TCP connection to the server, speaking frames."""

    QUIT = encode({"type": "quit"})

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        max_frame: int = 65536,
        rcvbuf: Optional[int] = None,
        label: str = "",
        connect_timeout: float = 5.0,
    ) -> None:
        self.port = port
        self.max_frame = max_frame
        self.label = label or f"client:{next(_tokens)}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect so the window we announce is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(connect_timeout)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray()
        self.pending: List[Dict[str, Any]] = []  # parsed, not yet handed out
        self.received: List[Dict[str, Any]] = []  # everything ever parsed, for failure messages
        self.closed = False  # the server closed (EOF or reset)
        self.nick: Optional[str] = None
        self.frame_sizes: List[int] = []
        self.allow_partial = False  # set by assert_closed(allow_partial=True) only

    def __repr__(self) -> str:
        return f"<Client {self.label} nick={self.nick!r}>"

    # --- sending -------------------------------------------------------------------------


    def send_payload(self, payload: bytes) -> None:
        self.send_raw(frame(payload))

    def send(self, obj: Optional[Dict[str, Any]] = None, **members: Any) -> None:
        """send({"type": "say", ...}) or send(type="say", room=..., text=...)."""
        if obj is None:
            obj = {}
        else:
            obj = dict(obj)
        obj.update(members)
        self.send_raw(encode(obj))

    # --- receiving -----------------------------------------------------------------------

    def _parse_buffer(self) -> None:
        buf = self.buf
        while len(buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, 0)
            assert 1 <= length <= self.max_frame, (
                f"{self.label}: server sent a frame of {length} bytes (allowed 1..{self.max_frame})"
            )
            if len(buf) < HEADER.size + length:
                return
            payload = bytes(buf[HEADER.size : HEADER.size + length])
            del buf[: HEADER.size + length]
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AssertionError(f"{self.label}: server sent a payload that is not UTF-8: {payload[:200]!r}") from exc
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except ValueError as exc:
                raise AssertionError(f"{self.label}: server sent a payload that is not JSON: {text[:200]!r}") from exc
            assert isinstance(obj, dict), f"{self.label}: server sent a non-object payload: {text[:200]!r}"
            assert isinstance(obj.get("type"), str), f"{self.label}: server sent a payload without string type: {text[:200]!r}"
            self.frame_sizes.append(length)
            if obj["type"] == "welcome" and isinstance(obj.get("limits"), dict):
                mf = obj["limits"].get("max_frame")
                if isinstance(mf, int):
                    self.max_frame = mf
            self.pending.append(obj)
            self.received.append(obj)

    def _fill(self, timeout: float) -> bool:
        """Read once (waiting up to `timeout`); False on timeout. Raises ConnectionClosed at EOF."""
        if self.closed:
            raise ConnectionClosed(f"{self.label}: connection closed by the server")
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return True
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            partial = bytes(self.buf)
            assert self.allow_partial or not partial, (
                f"{self.label}: server closed in the middle of a frame: {partial[:100]!r}"
            )
            raise ConnectionClosed(f"{self.label}: connection closed by the server")
        self.buf += data
        self._parse_buffer()
        return True

    def recv_event(self, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
        """The next event; AssertionError if none arrives within `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                if self.pending:
                    break
                raise AssertionError(
                    f"{self.label}: no event within {timeout}s; last received: {self.received[-5:]!r}"
                )
        return self.pending.pop(0)

    def poll_event(self) -> Optional[Dict[str, Any]]:
        """An event if one is here already (reading what the socket holds), else None."""
        if not self.pending and not self.closed:
            while self._fill(0):
                pass
        return self.pending.pop(0) if self.pending else None

    def expect(self, type: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, **members: Any) -> Dict[str, Any]:
        """The very next event must match; nothing is skipped."""
        event = self.recv_event(timeout)
        assert matches(event, type, **members), (
            f"{self.label}: expected {describe(type, members)}, got {event!r}"
        )
        return event

    def expect_error(self, code: str, timeout: float = DEFAULT_TIMEOUT, **members: Any) -> Dict[str, Any]:
        event = self.expect("error", timeout, code=code, **members)
        assert isinstance(event.get("message"), str) and event["message"], f"error without message: {event!r}"
        return event

    def collect_until(
        self, pred: Callable[[Dict[str, Any]], bool], timeout: float = DEFAULT_TIMEOUT
    ) -> List[Dict[str, Any]]:
        """Events up to and including the first one for which `pred` is true."""
        deadline = time.monotonic() + timeout
        got: List[Dict[str, Any]] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: condition not met within {timeout}s; got {got[-10:]!r}")
            event = self.recv_event(left)
            got.append(event)
            if pred(event):
                return got

    def wait_for(
        self, type: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, **members: Any
    ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """The first matching event and the list of events before it (for the caller to check)."""
        got = self.collect_until(lambda e: matches(e, type, **members), timeout)
        return got[-1], got[:-1]

    def barrier(self, timeout: float = DEFAULT_TIMEOUT) -> List[Dict[str, Any]]:
        """Ping with a fresh token; return every event that arrived before its pong."""
        token = f"barrier-{next(_tokens)}"
        self.send(type="ping", token=token)
        got = self.collect_until(lambda e: e.get("type") == "pong" and e.get("token") == token, timeout)
        pong = got[-1]
        assert "ref" not in pong, f"pong for a ping without ref carries one: {pong!r}"
        return got[:-1]

    def assert_quiet(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        before = self.barrier(timeout)
        assert before == [], f"{self.label}: unexpected events: {before!r}"

    # --- session -------------------------------------------------------------------------

    def expect_names(self, room: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, **members: Any) -> List[str]:
        """One `names` answer, however many chunks: every chunk but the last has more=true."""
        nicks: List[str] = []
        while True:
            ev = self.expect("names", timeout, **({"room": room} if room else {}), **members)
            assert isinstance(ev.get("nicks"), list) and isinstance(ev.get("more"), bool), ev
            assert len(ev["nicks"]) <= 1000, f"names chunk of {len(ev['nicks'])} nicks"
            nicks += ev["nicks"]
            if not ev["more"]:
                return nicks
            assert ev["nicks"], f"empty names chunk with more=true: {ev!r}"

    def _maybe_names(self, names: Optional[bool], room: str, timeout: float, **refm: Any) -> Optional[List[str]]:
        """names=True: a names answer must come; False: it must not; None: the test does not care."""
        if names is None:
            event = self.recv_event(timeout)
            self.pending.insert(0, event)
            names = event.get("type") == "names"
        if names:
            return self.expect_names(room, timeout, **refm)
        return None

    def register(
        self,
        nick: str,
        *,
        ref: Any = None,
        names: Optional[bool] = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Dict[str, Any]:
        """hello, then welcome, own join to #lobby, names (unless the lobby is large), history."""
        hello: Dict[str, Any] = {"type": "hello", "nick": nick}
        refm: Dict[str, Any] = {}
        if ref is not None:
            hello["ref"] = ref
            refm["ref"] = ref
        self.send(hello)
        welcome = self.expect("welcome", timeout, nick=nick, **refm)
        self.nick = nick
        self.expect("join", timeout, room=LOBBY, nick=nick, **refm)
        got = self._maybe_names(names, LOBBY, timeout, **refm)
        if got is not None:
            assert nick in got, got
        self.expect("history", timeout, room=LOBBY, **refm)
        return welcome

    def join(self, room: str, *, names: Optional[bool] = True, timeout: float = DEFAULT_TIMEOUT) -> Optional[List[str]]:
        """Join and consume own join, names (returned) and history."""
        self.send(type="join", room=room)
        ev = self.expect("join", timeout, nick=self.nick, ref=ABSENT)
        assert ev["room"].lower() == room.lower(), ev
        result = self._maybe_names(names, ev["room"], timeout)
        self.expect("history", timeout, room=ev["room"])
        return result

    def idle(self, seconds: float) -> None:
        """Wait `seconds` on the socket, asserting that no event arrives meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._fill(left)
            assert not self.pending, f"{self.label}: unexpected events while idle: {self.pending!r}"

    def assert_closed(self, timeout: float = DEFAULT_TIMEOUT, allow_partial: bool = False) -> List[Dict[str, Any]]:
        """Wait for EOF or reset; return the events that arrived before it.

        `allow_partial`: the server may close in the middle of a frame (a dropped slow consumer).
        """
        deadline = time.monotonic() + timeout
        got: List[Dict[str, Any]] = []
        while True:
            got += self.pending
            self.pending = []
            if self.closed:
                self.close()
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: connection still open after {timeout}s; got {got[-10:]!r}")
            try:
                self.allow_partial = allow_partial
                self._fill(left)
            except ConnectionClosed:
                got += self.pending
                self.pending = []
                self.close()  # as a real client does on EOF (lets the server finish closing)
                return got

    def is_open_now(self) -> bool:
        """Read what is there without waiting; False once the server has closed."""
        try:
            while self._fill(0):
                pass
        except ConnectionClosed:
            return False
        return True




def recv_all_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """For raw sockets in tests: read everything until EOF (or reset) within `timeout`."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    sock.setblocking(False)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("socket still open")
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            continue
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def is_refused(exc: OSError) -> bool:
    return exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET)
