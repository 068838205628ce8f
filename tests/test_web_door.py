"""The web door end to end: real server processes (`--web-port 0`) and wsproto as the test's
WebSocket client; and in-process, a server driven pass by pass over socketpairs with a fake
clock, for timeouts and the memory an idle WebSocket client costs (docs/web.md, "Server")."""

from __future__ import annotations

import gc
import itertools
import json
import signal
import socket
import ssl
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from conftest import ServerProcess, unique_nick, unique_room
from wire import Client, ConnectionClosed, encode, recv_all_until_closed

WEB = r"web listening on 127\.0\.0\.1:(\d+)"
INDEX = (Path(__file__).resolve().parent.parent / "selchat" / "doors" / "web" / "static" / "index.html")
_labels = itertools.count(1)


class WsClient(Client):
    """wire.Client's waits and checks, over a WebSocket: one JSON object per text message."""

    def __init__(self, port: int, *, origin: Optional[str] = None, host: Optional[str] = None,
                 rcvbuf: Optional[int] = None, tls: Optional[ssl.SSLContext] = None,
                 auto_pong: bool = True, open: bool = True) -> None:
        Client.__init__(self, port, rcvbuf=rcvbuf, label=f"ws:{next(_labels)}")
        if tls is not None:
            self.sock.setblocking(True)
            self.sock.settimeout(5.0)
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        self.tls = tls is not None
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.accepted = False
        self.rejected: Optional[int] = None
        self.reject_body = b""
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.pings: List[bytes] = []
        self.pongs: List[bytes] = []
        self.auto_pong = auto_pong
        self._text: List[str] = []
        if open:
            self.open(origin, host or f"127.0.0.1:{port}")

    def open(self, origin: Optional[str], host: str, timeout: float = 3.0) -> None:
        extra = [("Origin", origin)] if origin is not None else []
        self.send_raw(self.ws.send(Request(host=host, target="/ws", extra_headers=extra)))
        deadline = time.monotonic() + timeout
        while not self.accepted and self.rejected is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: no handshake answer within {timeout}s")
            self._fill(left)

    # --- sending ------------------------------------------------------------------------------

    def send_raw(self, data: bytes, timeout: float = 3.0) -> None:
        if self.tls:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        else:
            Client.send_raw(self, data, timeout)

    def send(self, obj: Optional[Dict[str, Any]] = None, **members: Any) -> None:
        obj = dict(obj or {})
        obj.update(members)
        self.send_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))

    def send_payload(self, payload: bytes) -> None:
        self.send_text(payload.decode("utf-8"))

    def send_text(self, text: str, fin: bool = True) -> None:
        self.send_raw(self.ws.send(TextMessage(text, message_finished=fin)))

    def send_binary(self, data: bytes) -> None:
        self.send_raw(self.ws.send(BytesMessage(data)))

    # --- receiving ----------------------------------------------------------------------------

    def _fill(self, timeout: float) -> bool:
        if not self.tls:
            return Client._fill(self, timeout)
        if self.closed:
            raise ConnectionClosed(f"{self.label}: connection closed by the server")
        self.sock.settimeout(max(0.001, timeout))
        try:
            data = self.sock.recv(1 << 20)
        except (socket.timeout, ssl.SSLWantReadError):
            return False
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            raise ConnectionClosed(f"{self.label}: connection closed by the server")
        self.buf += data
        self._parse_buffer()
        return True

    def _parse_buffer(self) -> None:
        data = bytes(self.buf)
        self.buf.clear()
        if self.ws.state is ConnectionState.CLOSED:
            return
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                self.rejected = event.status_code
            elif isinstance(event, RejectData):
                self.reject_body += event.data
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    text = "".join(self._text)
                    self._text = []
                    obj = json.loads(text)
                    assert isinstance(obj, dict) and isinstance(obj.get("type"), str), text[:200]
                    self.frame_sizes.append(len(text.encode()))
                    self.pending.append(obj)
                    self.received.append(obj)
            elif isinstance(event, BytesMessage):
                raise AssertionError(f"{self.label}: the server sent a binary message")
            elif isinstance(event, Ping):
                self.pings.append(bytes(event.payload))
                if self.auto_pong:
                    self.send_raw(self.ws.send(event.response()))
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                self.close_reason = event.reason or ""
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    try:
                        self.send_raw(self.ws.send(event.response()), timeout=0.5)
                    except (OSError, AssertionError):
                        pass

    def expect_close(self, code: int, timeout: float = 3.0) -> List[Dict[str, Any]]:
        """The server closes with a close frame of `code`, then the TCP stream; the events before."""
        got = self.assert_closed(timeout, allow_partial=True)
        assert self.close_code == code, f"{self.label}: closed with {self.close_code} {self.close_reason!r}, not {code}"
        return got

    def quit_and_close(self, timeout: float = 2.0) -> None:
        if not self.closed and self.accepted and self.ws.state is ConnectionState.OPEN:
            try:
                self.send(type="quit")
                self.assert_closed(timeout)
            except (AssertionError, OSError, ConnectionClosed):
                pass
        self.close()


def web_port(srv: ServerProcess) -> int:
    return int(srv.wait_log(WEB, 5.0).group(1))


@pytest.fixture
def clients() -> Iterator[List[Client]]:
    made: List[Client] = []
    yield made
    for c in made:
        c.close()


def raw_http(port: int, request: bytes, timeout: float = 3.0) -> Tuple[int, Dict[str, str], bytes]:
    """Send one request on a fresh socket; the response's status, headers and body, read to EOF
    or to its end (h11's client side parses it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(request)
        conn = h11.Connection(h11.CLIENT)
        method = "HEAD" if request.startswith(b"HEAD ") else "GET"  # only HEAD changes the parsing
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        deadline = time.monotonic() + timeout
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if time.monotonic() > deadline:
                    raise AssertionError("no complete response")
                conn.receive_data(sock.recv(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, headers, body
    finally:
        sock.close()


# --- HTTP over real sockets ----------------------------------------------------------------------


def test_get_slash_serves_the_page_with_security_headers(start_server) -> None:
    srv = start_server("--web-port", "0")
    port = web_port(srv)
    status, headers, body = raw_http(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert status == 200 and body == INDEX.read_bytes()
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert f"connect-src 'self' ws://127.0.0.1:{port};" in csp


def test_http_errors_each_with_its_status(start_server) -> None:
    srv = start_server("--web-port", "0")
    port = web_port(srv)
    cases = [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /../setup.cfg HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n", 413),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 30000 + b"\r\n\r\n", 431),
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    ]
    for request, want in cases:
        status, headers, _ = raw_http(port, request)
        assert status == want, (request[:60], status)
        assert headers["x-content-type-options"] == "nosniff"
    assert srv.alive()


def test_a_socket_that_sends_nothing_is_closed_at_the_handshake_timeout(start_server) -> None:
    srv = start_server("--web-port", "0", "--handshake-timeout", "1")
    port = web_port(srv)
    started = time.monotonic()
    idle = socket.create_connection(("127.0.0.1", port))
    page = socket.create_connection(("127.0.0.1", port))  # fetched the page, then kept quiet
    page.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    ws = WsClient(port)  # upgraded, never said hello
    try:
        assert recv_all_until_closed(idle, 4.0) == b""
        assert recv_all_until_closed(page, 4.0).startswith(b"HTTP/1.1 200 OK")
        ws.assert_closed(4.0)
        assert 0.8 <= time.monotonic() - started < 4.0
    finally:
        idle.close()
        page.close()
        ws.close()


# --- the WebSocket ----------------------------------------------------------------------------


def test_upgrade_hello_welcome_say_message(start_server, clients) -> None:
    srv = start_server("--web-port", "0")
    port = web_port(srv)
    c = WsClient(port, origin=f"http://127.0.0.1:{port}")
    clients.append(c)
    assert c.accepted
    welcome = c.register(unique_nick("w"), ref="h1")
    assert welcome["limits"]["max_frame"] == 65536
    c.send(type="say", room="#lobby", text="hello from the web", ref=7)
    msg = c.expect("message", room="#lobby", text="hello from the web", ref=7, **{"from": c.nick})
    assert isinstance(msg["id"], int)
    c.send(type="ping", token="t", ref=8)
    c.expect("pong", token="t", ref=8)
    c.send_raw(c.ws.send(Ping(b"ws-level")))
    c.assert_quiet()
    assert c.pongs == [b"ws-level"]
    c.send(type="quit", reason="bye")
    c.expect_close(1000)


def test_a_framed_and_a_web_client_in_one_room_see_the_same_messages(start_server, clients) -> None:
    srv = start_server("--web-port", "0")
    port = web_port(srv)
    room = unique_room("mix")
    native = srv.registered(unique_nick("n"))
    web = WsClient(port)
    clients.append(web)
    web.register(unique_nick("w"))
    native.expect("join", room="#lobby", nick=web.nick)
    native.join(room)
    web.join(room)
    native.expect("join", room=room, nick=web.nick)
    web.send(type="say", room=room, text="from the web")
    native.send(type="say", room=room, text="from the socket")
    seen_by_native = [native.expect("message", room=room) for _ in range(2)]
    seen_by_web = [web.expect("message", room=room) for _ in range(2)]
    assert [(m["id"], m["from"], m["text"]) for m in seen_by_native] == \
           [(m["id"], m["from"], m["text"]) for m in seen_by_web]
    assert {m["text"] for m in seen_by_web} == {"from the web", "from the socket"}
    native.send(type="msg", to=web.nick, text="psst")
    web.expect("message", to=web.nick, text="psst", **{"from": native.nick})
    native.expect("message", to=web.nick, text="psst")
    web.close()
    native.expect("quit", nick=web.nick, reason="connection closed")


def test_another_origin_is_refused_with_403_and_web_origin_allows_one(start_server, clients) -> None:
    srv = start_server("--web-port", "0", "--web-origin", "https://chat.example.org")
    port = web_port(srv)
    evil = WsClient(port, origin="http://evil.example")
    clients.append(evil)
    assert evil.rejected == 403 and not evil.accepted
    evil.assert_closed()
    for origin in (f"http://127.0.0.1:{port}", "https://chat.example.org", None):
        ok = WsClient(port, origin=origin)
        clients.append(ok)
        assert ok.accepted, origin
        ok.register(unique_nick("o"))


def test_a_message_over_max_frame_closes_with_1009(start_server, clients) -> None:
    srv = start_server("--web-port", "0", "--max-frame", "4096")
    port = web_port(srv)
    watcher = srv.registered(unique_nick("watch"))
    c = WsClient(port)
    clients.append(c)
    c.register(unique_nick("big"))
    watcher.expect("join", room="#lobby", nick=c.nick)
    exact = '{"type":"ping","token":"x"}'
    exact = exact[:-1] + " " * (4096 - len(exact)) + "}"
    assert len(exact.encode()) == 4096
    c.send_text(exact)
    c.expect("pong", token="x")  # max_frame bytes exactly: served
    # Past it in one piece or in several frames of one message: closed with 1009.
    c.send_text("[" + " " * 3000, fin=False)
    c.send_text(" " * 1200 + "]")
    c.expect_close(1009)
    watcher.expect("quit", nick=c.nick, reason="protocol error")


def test_a_binary_message_gets_bad_json_and_the_socket_stays(start_server, clients) -> None:
    srv = start_server("--web-port", "0")
    c = WsClient(web_port(srv))
    clients.append(c)
    c.send_binary(b'{"type":"ping"}')
    c.expect_error("bad_json")
    c.register(unique_nick("b"))
    c.send_binary(b"\x00\x01")
    c.expect_error("bad_json")
    c.send_text("not json")
    c.expect_error("bad_json")
    c.assert_quiet()


def test_broken_frames_close_with_a_protocol_error(start_server, clients) -> None:
    srv = start_server("--web-port", "0")
    c = WsClient(web_port(srv))
    clients.append(c)
    c.register(unique_nick("u"))
    c.send_raw(b"\x81\x05hello")  # unmasked: clients must mask every frame
    c.expect_close(1002)


def test_the_peers_close_is_answered_and_the_others_see_quit(start_server, clients) -> None:
    srv = start_server("--web-port", "0")
    watcher = srv.registered(unique_nick("watch"))
    c = WsClient(web_port(srv))
    clients.append(c)
    c.register(unique_nick("c"))
    watcher.expect("join", room="#lobby", nick=c.nick)
    c.send_raw(c.ws.send(CloseConnection(1000, "done")))
    c.assert_closed()
    assert c.close_code == 1000  # the server's answer to our close
    watcher.expect("quit", nick=c.nick, reason="connection closed")


def test_flood_control_refuses_then_disconnects(start_server, clients) -> None:
    srv = start_server("--web-port", "0", "--rate", "1", "--burst", "3")
    watcher = srv.registered(unique_nick("watch"))
    c = WsClient(web_port(srv))
    clients.append(c)
    c.register(unique_nick("f"))
    watcher.expect("join", room="#lobby", nick=c.nick)
    for i in range(10):
        c.send(type="ping", token=i)
    got = c.expect_close(1008)
    codes = [e.get("code") for e in got if e["type"] == "error"]
    assert "rate_limited" in codes and sum(e["type"] == "pong" for e in got) <= 4
    watcher.expect("quit", nick=c.nick, reason="excess flood")


def test_the_connection_limit_applies_to_the_web_door(start_server, clients) -> None:
    srv = start_server("--web-port", "0", "--max-per-ip", "1")
    port = web_port(srv)
    first = WsClient(port)
    clients.append(first)
    first.register(unique_nick("one"))
    second = WsClient(port)
    clients.append(second)
    assert second.accepted  # so that a page can read why
    got = second.expect_close(1013)
    assert [e["code"] for e in got] == ["too_many_connections"]
    native = srv.client()  # the limit counts every door
    native.expect_error("too_many_connections")


def test_a_silent_client_is_pinged_and_one_that_never_answers_is_dropped(start_server, clients) -> None:
    srv = start_server("--web-port", "0", "--ping-interval", "1", "--ping-timeout", "2.5")
    port = web_port(srv)
    watcher = WsClient(port)  # answers the server's pings as a browser does
    watcher.register(unique_nick("watch"))
    clients.append(watcher)
    polite = WsClient(port)
    mute = WsClient(port, auto_pong=False)
    clients.extend([polite, mute])
    polite.register(unique_nick("p"))
    mute.register(unique_nick("m"))
    # The others read (and so answer pings, as a browser does) while the mute one sits there.
    deadline = time.monotonic() + 8.0
    while not mute.closed:
        assert time.monotonic() < deadline, "the mute client was never dropped"
        for c in (watcher, polite):
            assert c.is_open_now(), f"{c.label} was closed though it answers pings"
        try:
            mute._fill(0.05)
        except ConnectionClosed:
            pass
    assert mute.pings, "a WebSocket ping came before the timeout"
    watcher.collect_until(lambda e: e.get("type") == "quit" and e.get("nick") == mute.nick
                          and e.get("reason") == "ping timeout", 5.0)
    assert polite.pings and polite.is_open_now()  # its pongs (answered by wsproto) kept it


def test_a_slow_web_consumer_is_dropped(start_server, clients) -> None:
    srv = start_server("--web-port", "0", "--max-outbuf", "65536", "--max-frame", "16384",
                       "--rate", "0", "--max-per-ip", "0")
    port = web_port(srv)
    room = unique_room("slow")
    sender = srv.registered(unique_nick("fast"))
    sender.send(type="part", room="#lobby")
    sender.expect("part", room="#lobby")
    sender.join(room)
    slow = WsClient(port, rcvbuf=4096)
    clients.append(slow)
    slow.register(unique_nick("slow"))
    slow.join(room)
    sender.expect("join", room=room, nick=slow.nick)
    # From here the web client reads nothing; the sender keeps saying things in their room.
    text = "s" * 3000
    deadline = time.monotonic() + 20
    quits: List[Dict[str, Any]] = []
    while not quits:
        assert time.monotonic() < deadline, "the slow web consumer was never dropped"
        sender.send_raw(b"".join(encode({"type": "say", "room": room, "text": text}) for _ in range(20)))
        got = sender.collect_until(lambda e: e.get("type") == "message" and e.get("text") == text
                                   and e.get("from") == sender.nick, 5.0)
        for _ in range(19):
            got += sender.collect_until(lambda e: e.get("type") == "message", 5.0)
        quits = [e for e in got if e.get("type") == "quit"]
    assert quits == [{"type": "quit", "nick": slow.nick, "reason": "slow consumer"}]
    slow.assert_closed(5.0, allow_partial=True)
    assert srv.alive()
    sender.send(type="ping", token="after")
    sender.wait_for("pong", token="after")


def test_shutdown_says_so_and_closes_with_1001(start_server, clients) -> None:
    srv = start_server("--web-port", "0")
    c = WsClient(web_port(srv))
    clients.append(c)
    c.register(unique_nick("s"))
    srv.signal(signal.SIGTERM)
    got = c.expect_close(1001, timeout=8.0)
    assert any(e["type"] == "notice" for e in got)
    assert srv.wait_exit(8.0) == 0


def test_wss_with_the_same_certificate(start_server, clients, certificate) -> None:
    cert, key = certificate["cert"], certificate["key"]
    srv = start_server("--web-port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    port = web_port(srv)
    context = ssl.create_default_context(cafile=str(cert))
    c = WsClient(port, tls=context, origin=f"https://localhost:{port}", host=f"localhost:{port}")
    clients.append(c)
    assert c.accepted
    c.register(unique_nick("tls"))
    c.send(type="say", room="#lobby", text="over wss")
    c.expect("message", text="over wss")
    plain = WsClient(port, tls=context, origin=f"http://localhost:{port}", host=f"localhost:{port}")
    clients.append(plain)
    assert plain.rejected == 403  # a page over http is another origin than this https server


# --- in process: a fake clock, socketpairs, and what an idle client costs ------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def in_process_server(**options: Any) -> Any:
    from selchat.config import ServerConfig
    from selchat.core.store import SQLiteStore
    from selchat.loop.reactor import Reactor
    from selchat.server import Server

    clock = FakeClock()
    config = ServerConfig(web_port=0, rate=0, max_per_ip=0, register_rate=0, db=":memory:", **options)
    server = Server(config, SQLiteStore(":memory:"), reactor=Reactor(clock=clock))
    return server, clock


def connect(server: Any, n: int) -> socket.socket:
    ours, theirs = socket.socketpair()
    server._accept(server.web, theirs, ("127.0.0.1", 40000 + n))
    ours.setblocking(False)
    return ours


def pump(server: Any, socks: List[socket.socket], ws: List[WSConnection], until: Any, passes: int = 200) -> None:
    for _ in range(passes):
        server.reactor.run_once(0)
        for sock, conn in zip(socks, ws):
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            conn.receive_data(data or None)
        if until():
            return
    raise AssertionError("condition not reached")


def test_in_process_the_handshake_deadline_follows_the_clock() -> None:
    server, clock = in_process_server(handshake_timeout=5.0)
    sock = connect(server, 1)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(5):
        server.reactor.run_once(0)
    assert len(server.transports) == 1
    clock.t += 4.9
    server.reactor.run_once(0)
    assert len(server.transports) == 1
    clock.t += 0.2
    server.reactor.run_once(0)
    assert len(server.transports) == 0 and server.admission.count == 0
    server.reactor.close()


def test_an_idle_web_client_costs_at_most_8_kib() -> None:
    server, clock = in_process_server()
    count = 60
    socks: List[socket.socket] = []
    conns: List[WSConnection] = []

    def open_clients(first: int) -> None:
        for i in range(first, first + count):
            sock = connect(server, i)
            conn = WSConnection(ConnectionType.CLIENT)
            sock.sendall(conn.send(Request(host="x", target="/ws")))
            socks.append(sock)
            conns.append(conn)
        welcomed = set()

        def all_welcomed() -> bool:
            for k, conn in enumerate(conns[first:], first):
                for event in conn.events():
                    if isinstance(event, AcceptConnection):
                        socks[k].sendall(conn.send(TextMessage(json.dumps({"type": "hello", "nick": f"idle{k}"}))))
                    elif isinstance(event, TextMessage) and '"history"' in event.data:
                        welcomed.add(k)
            return len(welcomed) == count

        pump(server, socks[first:], conns[first:], all_welcomed, passes=2000)

    open_clients(0)  # warm-up: caches, the lobby's dict at its size class, the allocator
    gc.collect()
    # Only what the server allocates counts (a frame of selchat in the allocation's stack): the
    # test's own client connections are in the same process. The server's end of each
    # socketpair was made by the test; its size is added by hand.
    server_side = [tracemalloc.Filter(True, "*/selchat/*", all_frames=True)]
    tracemalloc.start(25)
    try:
        before = tracemalloc.take_snapshot().filter_traces(server_side)
        open_clients(count)
        # Idle: what they were sent has gone out; nothing is queued.
        for _ in range(20):
            server.reactor.run_once(0)
            for sock in socks:
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    pass
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces(server_side)
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_client = grown / count + sys.getsizeof(socks[0])
    assert all(t.session.user is not None and t.session.http is None for t in server.transports.values())
    assert per_client <= 8192, f"an idle web client costs {per_client:.0f} bytes"
    for sock in socks:
        sock.close()
    server.reactor.close()


def test_a_web_client_quiet_between_two_pastes_has_its_burst_again() -> None:
    """Flood control over the WebSocket counts the same bytes as it charges by: the request
    of the upgrade and each frame's header and mask included. Counted by payload only, the
    requests were charged at the times of earlier reads, a few messages back: after a quiet
    minute the first lines of a paste were charged as if sent before it, with the bucket
    the first paste had left, and refused."""
    from selchat.config import ServerConfig
    from selchat.core.store import MemoryStore
    from selchat.loop.reactor import Reactor
    from selchat.server import Server

    clock = FakeClock()
    server = Server(ServerConfig(web_port=0, max_per_ip=0, register_rate=0, db=":memory:"),
                    MemoryStore(), reactor=Reactor(clock=clock))
    sock = connect(server, 1)
    conn = WSConnection(ConnectionType.CLIENT)
    browser = [("User-Agent", "Mozilla/5.0 " + "x" * 200), ("Cookie", "c=" + "y" * 300)]
    sock.sendall(conn.send(Request(host="x", target="/ws", extra_headers=browser)))
    got: List[dict] = []

    def collect(want: int) -> Any:
        def done() -> bool:
            for event in conn.events():
                if isinstance(event, AcceptConnection):
                    sock.sendall(conn.send(TextMessage(json.dumps({"type": "hello", "nick": "paster"}))))
                elif isinstance(event, TextMessage):
                    got.append(json.loads(event.data))
            return len([e for e in got if e.get("ref") is not None]) >= want
        return done

    pump(server, [sock], [conn], lambda: any(e["type"] == "welcome" for e in got) or collect(10 ** 6)())

    def paste(first: int, n: int = 16) -> None:
        sock.sendall(b"".join(conn.send(TextMessage(json.dumps(
            {"type": "say", "room": "#lobby", "text": f"line {first + i}", "ref": first + i})))
            for i in range(n)))

    got.clear()
    paste(0)  # 16 of the burst of 20 at once
    pump(server, [sock], [conn], collect(16))
    assert not [e for e in got if e["type"] == "error"], got
    for _ in range(60):  # a quiet minute: the bucket is full again
        clock.t += 1.0
        server.reactor.run_once(0)
    got.clear()
    paste(100)
    pump(server, [sock], [conn], collect(16))
    assert not [e for e in got if e["type"] == "error"], [e for e in got if e["type"] == "error"]
    sock.close()
    server.reactor.close()


def test_what_flood_control_counts_of_a_websocket_is_what_was_read() -> None:
    """Messages on each side of the frame header's sizes (125/126 and 65535/65536 bytes), a
    message in fragments, pings and pongs: once all is served, the offset flood control
    charges by is exactly the bytes read (so a request is charged at the read that brought
    its last byte). (Not exact, and known: a fragment that splits a UTF-8 character next to
    a header size's edge is off by the header's difference, which only the sender pays.)"""
    from selchat.config import ServerConfig
    from selchat.core.store import MemoryStore
    from selchat.loop.reactor import Reactor
    from selchat.server import Server

    clock = FakeClock()
    server = Server(ServerConfig(web_port=0, max_per_ip=0, register_rate=0, rate=1000, burst=1000,
                                 db=":memory:"), MemoryStore(), reactor=Reactor(clock=clock))
    sock = connect(server, 2)
    conn = WSConnection(ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host="x", target="/ws", extra_headers=[("Cookie", "z" * 150)])))
    pongs = []

    def welcomed() -> bool:
        for event in conn.events():
            if isinstance(event, AcceptConnection):
                sock.sendall(conn.send(TextMessage(json.dumps({"type": "hello", "nick": "counter"}))))
            elif isinstance(event, TextMessage) and ('"pong"' in event.data or '"error"' in event.data):
                pongs.append(event.data)  # (the longest token is refused: an answer too)
            elif isinstance(event, TextMessage) and '"welcome"' in event.data:
                pongs.append("welcome")
        return bool(pongs)
    pump(server, [sock], [conn], welcomed)
    pongs.clear()
    session = next(iter(server.transports.values())).session
    out = []
    wrapper = len(json.dumps({"type": "ping", "token": ""}))
    for size in (10, 125, 126, 5000, 65535, 65536):  # each side of each header size's edges
        out.append(conn.send(TextMessage(json.dumps({"type": "ping", "token": "p" * (size - wrapper)}))))
    whole = json.dumps({"type": "ping", "token": "in three pieces " + "q" * 300})
    out.append(conn.send(TextMessage(whole[:100], message_finished=False)))
    out.append(conn.send(TextMessage(whole[100:200], message_finished=False)))
    out.append(conn.send(TextMessage(whole[200:], message_finished=True)))
    out.append(conn.send(Ping(b"are you there")))
    out.append(conn.send(Pong(b"unasked")))
    sock.sendall(b"".join(out))
    pump(server, [sock], [conn], lambda: welcomed() and len(pongs) >= 7, passes=500)
    assert session.arrivals.received > 70000
    assert session.consumed == session.arrivals.received
    sock.close()
    server.reactor.close()


def test_a_web_hello_waiting_its_turn_is_forgotten_as_soon_as_its_peer_resets() -> None:
    """Registrations are paced per address; a web client waiting for its turn is still read
    (what it holds is counted), so a reset is seen at once and it leaves the queue then, not
    when its turn comes."""
    import struct as _struct

    from selchat.config import ServerConfig
    from selchat.core.store import MemoryStore
    from selchat.loop.reactor import Reactor
    from selchat.server import Server

    clock = FakeClock()
    server = Server(ServerConfig(web_port=0, max_per_ip=0, register_rate=0.1, register_burst=1,
                                 db=":memory:"), MemoryStore(), reactor=Reactor(clock=clock))
    socks, conns = [], []
    for n in (3, 4):  # the first takes the address's burst; the second waits 10 s for its turn
        sock = connect(server, n)
        conn = WSConnection(ConnectionType.CLIENT)
        sock.sendall(conn.send(Request(host="x", target="/ws")))
        socks.append(sock)
        conns.append(conn)
    accepted: List[int] = []

    def hellos_sent() -> bool:
        for k, conn in enumerate(conns):
            for event in conn.events():
                if isinstance(event, AcceptConnection):
                    socks[k].sendall(conn.send(TextMessage(json.dumps({"type": "hello", "nick": f"turn{k}"}))))
                    accepted.append(k)
        return len(accepted) == 2
    pump(server, socks, conns, hellos_sent)
    for _ in range(5):
        server.reactor.run_once(0)
    assert len(server.transports) == 2 and server.hub.pacer.waiting("127.0.0.1") == 1
    socks[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _struct.pack("ii", 1, 0))
    socks[1].close()  # a reset, while the clock stands still: its turn is 10 s away
    for _ in range(5):
        server.reactor.run_once(0)
    assert len(server.transports) == 1 and server.hub.pacer.waiting("127.0.0.1") == 0
    socks[0].close()
    server.reactor.close()
