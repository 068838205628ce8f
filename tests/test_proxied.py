"""Behind a proxy (issue 18, item 1), with the proxy's words written by the test: PROXY
protocol headers on the native and IRC ports, forwarded headers at the web door, each from a
trusted address (`--trusted-proxy`) and from one that is not. tests/test_nginx.py does the
same through a real nginx.

What must hold: the client's own address is the one every per-address rule uses
(`--max-per-ip` here) and the one the log names; a client cannot forge it (from an untrusted
address a PROXY header is a protocol error, and at the web door only the right-most untrusted
forwarded address counts); the Origin check holds behind a proxy that terminates TLS.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from typing import Dict, List, Optional, Tuple

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request, TextMessage

from conftest import unique_nick
from ircwire import IrcClient, irc_port
from selchat.loop.proxyproto import encode_v1, encode_v2
from test_web_door import web_port
from wire import HEADER, encode, frame


def _registered_from(srv, nick: str, address: str, timeout: float = 5.0) -> None:
    srv.wait_log(rf"registered: {address}:\d+ as {nick}\b", timeout)


# --- the native port ------------------------------------------------------------------------


def test_a_trusted_proxys_v1_header_gives_the_clients_address(start_server) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.1", "--max-per-ip", "1", "--register-rate", "0")
    first = srv.client()
    first.send_raw(encode_v1(("203.0.113.7", 51000), ("192.0.2.1", 9090)))
    nick = unique_nick("px")
    first.register(nick)
    srv.wait_log(rf"registered: 203\.0\.113\.7:51000 as {nick}\b")
    # Another client behind the same proxy is another address: not over --max-per-ip 1.
    second = srv.client()
    second.send_raw(encode_v2(("2001:db8::5", 4000), ("2001:db8::1", 9090)))
    other = unique_nick("px")
    second.register(other)
    _registered_from(srv, other, r"2001:db8::5")
    # The same client again is over it, as it would be without the proxy.
    third = srv.client()
    third.send_raw(encode_v1(("203.0.113.7", 51001), ("192.0.2.1", 9090)))
    third.expect_error("too_many_connections")
    third.assert_closed()


def test_a_header_split_into_pieces_and_the_hello_behind_it_in_the_same_read(start_server) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.0/8", "--register-rate", "0")
    nick = unique_nick("px")
    header = encode_v2(("198.51.100.20", 7000), ("192.0.2.1", 9090), tlvs=b"\x04\x00\x01x")
    c = srv.client()
    c.send_raw(header[:3])
    time.sleep(0.05)  # (pieces: the gate reads what it can and waits for the rest)
    c.send_raw(header[3:20])
    time.sleep(0.05)
    c.send_raw(header[20:] + encode({"type": "hello", "nick": nick}))
    c.expect("welcome", nick=nick)
    _registered_from(srv, nick, r"198\.51\.100\.20")


def test_a_trusted_address_may_still_connect_without_a_header(start_server) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.1", "--register-rate", "0")
    c = srv.client()
    nick = unique_nick("direct")
    c.register(nick)
    _registered_from(srv, nick, r"127\.0\.0\.1")


def test_a_local_v2_header_keeps_the_connections_own_address(start_server) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.1", "--register-rate", "0")
    c = srv.client()
    c.send_raw(encode_v2(None))
    nick = unique_nick("local")
    c.register(nick)
    _registered_from(srv, nick, r"127\.0\.0\.1")


def test_from_an_untrusted_address_a_proxy_header_is_a_protocol_error(start_server) -> None:
    srv = start_server("--trusted-proxy", "10.0.0.0/8")
    c = srv.client()
    c.send_raw(encode_v1(("203.0.113.7", 51000), ("192.0.2.1", 9090)))
    c.expect_error("frame_too_large")
    c.assert_closed()
    assert "203.0.113.7" not in srv.log()


def test_a_broken_header_or_none_in_time_closes_the_connection(start_server) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.1", "--handshake-timeout", "1")
    broken = srv.client()
    broken.send_raw(b"PROXY TCP4 1.2.3.4 nowhere 1 2\r\n")
    broken.assert_closed()
    srv.wait_log(r"closing 127\.0\.0\.1:\d+ \(a trusted proxy\): PROXY v1 address 'nowhere'")
    silent = srv.client()
    silent.send_raw(b"PROXY TCP4 1.2.3.4")  # and nothing more
    silent.assert_closed(timeout=4.0)
    healthy = srv.client()
    healthy.register(unique_nick("h"))


def test_a_proxy_header_before_tls_on_the_native_port(start_server, certificate) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.1", "--register-rate", "0",
                       "--tls-cert", str(certificate["cert"]), "--tls-key", str(certificate["key"]))
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5.0)
    raw.sendall(encode_v2(("192.0.2.77", 3333), ("192.0.2.1", srv.port)))
    context = ssl.create_default_context(cafile=str(certificate["cert"]))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    nick = unique_nick("tls")
    tls.sendall(encode({"type": "hello", "nick": nick}))
    welcome = _read_frame(tls)
    assert welcome["type"] == "welcome", welcome
    _registered_from(srv, nick, r"192\.0\.2\.77")
    tls.close()


def _read_frame(sock: ssl.SSLSocket) -> Dict[str, object]:
    data = b""
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        data += chunk
    (length,) = HEADER.unpack_from(data)
    return json.loads(data[HEADER.size:HEADER.size + length])


# --- IRC ------------------------------------------------------------------------------------


def test_the_irc_port_reads_the_header_too(start_server) -> None:
    srv = start_server("--trusted-proxy", "127.0.0.1", "--irc-port", "0", "--register-rate", "0",
                       "--max-per-ip", "1")
    port = irc_port(srv)
    clients: List[IrcClient] = []
    try:
        for source in (("203.0.113.8", 6000), ("203.0.113.9", 6001)):
            c = IrcClient(port)
            clients.append(c)
            c.send_raw(encode_v1(source, ("192.0.2.1", 6667)))
            nick = unique_nick("i")
            c.register(nick)
            srv.wait_log(rf"registered: {source[0]}:{source[1]} as {nick} \(irc\)")
        untrusted = start_server("--irc-port", "0")
        c = IrcClient(irc_port(untrusted))
        clients.append(c)
        c.send_raw(encode_v1(("203.0.113.8", 6000), ("192.0.2.1", 6667)))
        c.send("PING :x")
        line = c.recv_line()
        assert line.command in ("421", "451") and line.params[1] == "PROXY", line  # an error
    finally:
        for c in clients:
            c.close()


# --- the web door ---------------------------------------------------------------------------


class ProxiedWs:
    """A WebSocket client that writes a proxy's forwarded headers itself."""

    def __init__(self, port: int, headers: List[Tuple[str, str]], host: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: List[object] = []
        self.status: Optional[int] = None
        self.body = b""
        self.sock.sendall(self.ws.send(Request(host=host or f"127.0.0.1:{port}", target="/ws",
                                               extra_headers=headers)))
        deadline = time.monotonic() + 5.0
        while self.status is None:
            self._read(deadline)

    def _read(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        assert data, "closed"
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.status = 101
            elif isinstance(event, RejectConnection):
                self.status = event.status_code
            elif isinstance(event, RejectData):
                self.body += event.data
            elif isinstance(event, TextMessage):
                self.events.append(json.loads(event.data))

    def send(self, **obj: object) -> None:
        self.sock.sendall(self.ws.send(TextMessage(json.dumps(obj))))

    def expect(self, kind: str) -> Dict[str, object]:
        deadline = time.monotonic() + 5.0
        while True:
            for event in self.events:
                if isinstance(event, dict) and event.get("type") == kind:
                    self.events.remove(event)
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind} in {self.events}")
            self._read(deadline)

    def close(self) -> None:
        self.sock.close()


def test_forwarded_for_names_the_client_and_a_forged_left_part_is_ignored(start_server) -> None:
    srv = start_server("--web-port", "0", "--trusted-proxy", "127.0.0.1", "--max-per-ip", "1",
                       "--register-rate", "0")
    port = web_port(srv)
    opened = []
    try:
        # The client wrote "1.1.1.1" itself; the proxy appended the address it saw.
        a = ProxiedWs(port, [("X-Forwarded-For", "1.1.1.1, 203.0.113.10")])
        opened.append(a)
        assert a.status == 101
        nick = unique_nick("w")
        a.send(type="hello", nick=nick)
        a.expect("welcome")
        srv.wait_log(rf"registered: 203\.0\.113\.10 \(via 127\.0\.0\.1\) as {nick}\b")
        b = ProxiedWs(port, [("X-Forwarded-For", "203.0.113.11")])
        opened.append(b)
        b.send(type="hello", nick=unique_nick("w"))
        b.expect("welcome")
        # Same client again (behind a second, trusted proxy hop): over --max-per-ip 1.
        c = ProxiedWs(port, [("X-Forwarded-For", "203.0.113.10, 127.0.0.1")])
        opened.append(c)
        assert c.status == 101
        error = c.expect("error")
        assert error["code"] == "too_many_connections"
        # The header from a client not behind a trusted proxy is not read at all.
        srv2 = start_server("--web-port", "0", "--max-per-ip", "1", "--register-rate", "0")
        d = ProxiedWs(web_port(srv2), [("X-Forwarded-For", "203.0.113.12")])
        opened.append(d)
        nick = unique_nick("w")
        d.send(type="hello", nick=nick)
        d.expect("welcome")
        srv2.wait_log(rf"registered: 127\.0\.0\.1:\d+ as {nick}\b")
    finally:
        for ws in opened:
            ws.close()


def test_the_rfc_7239_header_when_the_proxy_sets_that_one(start_server) -> None:
    srv = start_server("--web-port", "0", "--trusted-proxy", "127.0.0.1", "--register-rate", "0",
                       "--forwarded-header", "forwarded")
    port = web_port(srv)
    ws = ProxiedWs(port, [("Forwarded", 'for=1.1.1.1, for="[2001:db8::7]:4711";proto=https'),
                          ("X-Forwarded-For", "203.0.113.99")])  # (not the one named: ignored)
    try:
        nick = unique_nick("f")
        ws.send(type="hello", nick=nick)
        ws.expect("welcome")
        srv.wait_log(rf"registered: 2001:db8::7:4711 as {nick}\b")
    finally:
        ws.close()


def test_the_origin_check_behind_a_proxy_that_terminates_tls(start_server) -> None:
    srv = start_server("--web-port", "0", "--trusted-proxy", "127.0.0.1", "--register-rate", "0")
    port = web_port(srv)
    page = "https://chat.example.org"
    host = "chat.example.org"
    ok = ProxiedWs(port, [("Origin", page), ("X-Forwarded-For", "203.0.113.20"),
                          ("X-Forwarded-Proto", "https")], host=host)
    refused = ProxiedWs(port, [("Origin", page), ("X-Forwarded-For", "203.0.113.20")], host=host)
    other_site = ProxiedWs(port, [("Origin", "https://evil.example"), ("X-Forwarded-For", "203.0.113.20"),
                                  ("X-Forwarded-Proto", "https")], host=host)
    try:
        assert ok.status == 101
        assert refused.status == 403  # an https page, as far as an http door can tell: another origin
        assert other_site.status == 403
    finally:
        for ws in (ok, refused, other_site):
            ws.close()
    # From an untrusted address X-Forwarded-Proto is not believed.
    srv2 = start_server("--web-port", "0")
    forged = ProxiedWs(web_port(srv2), [("Origin", page), ("X-Forwarded-Proto", "https")], host=host)
    try:
        assert forged.status == 403
    finally:
        forged.close()
