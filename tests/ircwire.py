"""A raw, strict IRC client for tests of the IRC door (PROTOCOL.md 10.1, Modern IRC).

Like tests/wire.py's Client it knows the wire and nothing of the server's code: every line it
receives is checked (ends in CRLF, at most 512 bytes without tags, parses as an IRC message)
and a violation fails the test. Waiting is always on lines with a deadline, never on a bare
sleep. To show that something did NOT arrive, `barrier()` sends `PING` with a fresh token and
collects what comes before the matching `PONG`: the server answers in order, so whatever it
produced earlier for this connection has arrived by then.
"""

from __future__ import annotations

import itertools
import re
import select
import socket
import ssl
import time
from typing import Callable, Iterable, List, Optional, Sequence

from selchat.doors.irc.parser import TOO_LONG, Line, LineDecoder, parse_line
from wire import ConnectionClosed, Peer

DEFAULT_TIMEOUT = 3.0
MAX_LINE = 512  # RFC 1459, CRLF included, tags not counted (IRCv3 message-tags)
MAX_TAGS = 8191  # IRCv3: the server may send up to 8191 bytes of tags (with '@' and space)
IRC_LISTENING = re.compile(r"irc listening on 127\.0\.0\.1:(\d+)")

_tokens = itertools.count(1)


def irc_port(srv: object, timeout: float = 10.0) -> int:
    """The IRC port of a tests/conftest.py ServerProcess started with `--irc-port 0`."""
    match = srv.wait_log(IRC_LISTENING, timeout)  # type: ignore[attr-defined]
    return int(match.group(1))


def line_bytes_without_tags(raw: bytes) -> int:
    """What counts against the 512-byte limit: the line with CRLF, minus its tag section."""
    if raw.startswith(b"@"):
        sp = raw.find(b" ")
        return len(raw) - (sp + 1) + 2 if sp >= 0 else len(raw) + 2
    return len(raw) + 2


def describe(line: Line) -> str:
    tags = ";".join(f"{k}={v}" if v else k for k, v in line.tags.items())
    head = (f"@{tags} " if tags else "") + (f":{line.source} " if line.source else "")
    return head + line.command + "".join(f" {p!r}" for p in line.params)


class IrcClient(Peer):
    """One TCP (or TLS) connection to the IRC door."""

    QUIT = b"QUIT :bye\r\n"

    def __init__(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        label: str = "",
        tls: bool = False,
        connect_timeout: float = 5.0,
    ) -> None:
        self.port = port
        self.label = label or f"irc:{next(_tokens)}"
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        sock.setblocking(False)
        self.sock = sock
        self.decoder = LineDecoder(max_body=MAX_TAGS + MAX_LINE, max_tags=MAX_TAGS)
        self.pending: List[Line] = []
        self.received: List[Line] = []  # every line parsed, for failure messages
        self.raw_received: List[bytes] = []
        self.closed = False
        self.nick: Optional[str] = None
        self.caps: List[str] = []  # acknowledged capabilities
        self.isupport: dict = {}
        self._tail = bytearray()  # bytes after the last LF, to check CRLF endings

    def __repr__(self) -> str:
        return f"<IrcClient {self.label} nick={self.nick!r}>"

    # --- sending -----------------------------------------------------------------------------

    def send(self, line: str) -> None:
        """Send one line (CRLF added)."""
        assert "\r" not in line and "\n" not in line, f"test bug: line ending inside {line!r}"
        self.send_raw(line.encode("utf-8") + b"\r\n")

    # --- receiving ---------------------------------------------------------------------------

    def _check_and_parse(self, data: bytes) -> None:
        # Every line the server sends must end in CRLF (RFC 1459), so a bare LF is a failure.
        self._tail += data
        start = 0
        while True:
            nl = self._tail.find(b"\n", start)
            if nl < 0:
                break
            assert nl > 0 and self._tail[nl - 1] == 13, (
                f"{self.label}: line not ended by CRLF: {bytes(self._tail[start:nl + 1])[:200]!r}"
            )
            start = nl + 1
        del self._tail[:start]
        self.decoder.feed(data)
        for item in self.decoder:
            assert item is not TOO_LONG, f"{self.label}: the server sent a line over every limit"
            assert isinstance(item, bytes)
            size = line_bytes_without_tags(item)
            assert size <= MAX_LINE, f"{self.label}: the server sent a {size}-byte line: {item[:200]!r}"
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise AssertionError(f"{self.label}: the server sent a line that is not UTF-8: {item[:200]!r}") from exc
            assert text == text.strip("\0"), f"{self.label}: NUL in {item!r}"
            line = parse_line(item)
            self.raw_received.append(item)
            self.received.append(line)
            self.pending.append(line)

    def _fill(self, timeout: float) -> bool:
        if self.closed:
            raise ConnectionClosed(f"{self.label}: connection closed by the server")
        if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not ready:
                return False
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            assert not self._tail, f"{self.label}: server closed in the middle of a line: {bytes(self._tail)[:100]!r}"
            raise ConnectionClosed(f"{self.label}: connection closed by the server")
        self._check_and_parse(data)
        return True

    def recv_line(self, timeout: float = DEFAULT_TIMEOUT) -> Line:
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                if self.pending:
                    break
                raise AssertionError(
                    f"{self.label}: no line within {timeout}s; last received: "
                    + "; ".join(describe(x) for x in self.received[-6:])
                )
        return self.pending.pop(0)

    def expect(self, command: str, *params: Optional[str], timeout: float = DEFAULT_TIMEOUT, **kw: object) -> Line:
        """The very next line must be `command` whose first params equal `params` (None: any)."""
        line = self.recv_line(timeout)
        assert matches(line, command, params, **kw), (
            f"{self.label}: expected {command} {params!r} {kw or ''}, got {describe(line)}"
        )
        return line

    def collect_until(self, pred: Callable[[Line], bool], timeout: float = DEFAULT_TIMEOUT) -> List[Line]:
        """Lines up to and including the first one for which `pred` is true."""
        deadline = time.monotonic() + timeout
        got: List[Line] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.label}: condition not met within {timeout}s; got "
                    + "; ".join(describe(x) for x in got[-10:])
                )
            try:
                line = self.recv_line(left)
            except AssertionError:
                raise AssertionError(
                    f"{self.label}: condition not met within {timeout}s; got "
                    + "; ".join(describe(x) for x in got[-10:])
                ) from None
            got.append(line)
            if pred(line):
                return got

    def wait_for(self, command: str, *params: Optional[str], timeout: float = DEFAULT_TIMEOUT) -> "tuple[Line, List[Line]]":
        """The first matching line and the lines before it."""
        got = self.collect_until(lambda x: matches(x, command, params), timeout)
        return got[-1], got[:-1]

    def until_numeric(self, end: str, timeout: float = DEFAULT_TIMEOUT) -> List[Line]:
        """Lines up to and including numeric (or command) `end`."""
        return self.collect_until(lambda x: x.command == end, timeout)

    def barrier(self, timeout: float = DEFAULT_TIMEOUT) -> List[Line]:
        """PING a fresh token; every line that arrived before its PONG."""
        token = f"barrier{next(_tokens)}"
        self.send(f"PING {token}")
        got = self.collect_until(lambda x: x.command == "PONG" and x.params[-1:] == [token], timeout)
        return got[:-1]

    def assert_quiet(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        before = self.barrier(timeout)
        assert before == [], f"{self.label}: unexpected lines: " + "; ".join(describe(x) for x in before)

    def assert_closed(self, timeout: float = DEFAULT_TIMEOUT) -> List[Line]:
        """Wait for EOF; the lines that arrived before it."""
        deadline = time.monotonic() + timeout
        got: List[Line] = []
        while True:
            got += self.pending
            self.pending = []
            if self.closed:
                self.close()
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: connection still open after {timeout}s")
            try:
                self._fill(left)
            except ConnectionClosed:
                got += self.pending
                self.pending = []
                self.close()
                return got

    # --- session -----------------------------------------------------------------------------

    def register(
        self,
        nick: str,
        caps: Sequence[str] = (),
        *,
        user: str = "tester",
        realname: str = "Test User",
        password: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> List[Line]:
        """CAP LS 302 / CAP REQ / PASS / NICK / USER / CAP END; returns the lines up to the MOTD's end.

        The requested caps must all be ACKed (a NAK fails the test).
        """
        self.send("CAP LS 302")
        offered = self.cap_ls(timeout)
        if caps:
            missing = [c for c in caps if c not in offered]
            assert not missing, f"{self.label}: CAP LS lacks {missing}; offered {sorted(offered)}"
            self.send("CAP REQ :" + " ".join(caps))
            ack = self.expect("CAP", None, "ACK", timeout=timeout)
            assert set(ack.params[-1].split()) == set(caps), describe(ack)
            self.caps = list(caps)
        if password is not None:
            self.send(f"PASS {password}")
        self.send(f"NICK {nick}")
        self.send(f"USER {user} 0 * :{realname}")
        self.send("CAP END")
        welcome = self.collect_until(lambda x: x.command in ("001",) or x.command.startswith("4"), timeout)
        assert welcome[-1].command == "001", f"{self.label}: registration failed: {describe(welcome[-1])}"
        self.nick = welcome[-1].params[0]
        rest = self.collect_until(lambda x: x.command in ("376", "422"), timeout)
        for x in rest:
            if x.command == "005":
                for tok in x.params[1:-1]:
                    k, _, v = tok.partition("=")
                    self.isupport[k] = v
        return welcome + rest

    def cap_ls(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Read a (possibly multi-line) CAP LS reply; {cap: value}."""
        offered: dict = {}
        while True:
            line = self.expect("CAP", None, "LS", timeout=timeout)
            more = len(line.params) >= 4 and line.params[2] == "*"
            for item in line.params[-1].split():
                k, _, v = item.partition("=")
                offered[k] = v
            if not more:
                return offered

    def join(self, room: str, timeout: float = DEFAULT_TIMEOUT) -> List[Line]:
        """JOIN; returns the lines up to RPL_ENDOFNAMES (366), the JOIN echo first."""
        self.send(f"JOIN {room}")
        got = self.collect_until(lambda x: x.command == "366", timeout)
        assert got[0].command == "JOIN", f"{self.label}: JOIN not answered by JOIN first: {describe(got[0])}"
        return got




def matches(line: Line, command: str, params: Iterable[Optional[str]] = (), **kw: object) -> bool:
    """`command` equal, each given param equal (None: any); kw: source=..., tag_<name>=..."""
    if line.command != command.upper():
        return False
    params = list(params)
    if len(line.params) < len(params):
        return False
    for got, want in zip(line.params, params):
        if want is not None and got != want:
            return False
    for key, want in kw.items():
        if key == "source":
            if line.source != want:
                return False
        elif key == "nick":
            if (line.source or "").split("!", 1)[0] != want:
                return False
        else:
            raise TypeError(f"unknown matcher {key}")
    return True


def source_nick(line: Line) -> str:
    return (line.source or "").split("!", 1)[0]


__all__ = ["IrcClient", "ConnectionClosed", "irc_port", "matches", "source_nick", "describe", "IRC_LISTENING"]
