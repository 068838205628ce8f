"""The web door without sockets: HTTP requests as bytes into `HttpConnection`, responses out
(parsed back with h11 as a client would), and the shared WebSocket wire format parsed back
with a wsproto client connection (docs/web.md, "Server")."""

from __future__ import annotations

import base64
from typing import Dict, List, Optional, Tuple

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage
from wsproto.utilities import generate_accept_token

from selchat.core import events
from selchat.doors.web import static
from selchat.doors.web.http import (
    MAX_BODY,
    MAX_HEADER_BYTES,
    MAX_REQUEST_LINE,
    HttpConnection,
    Next,
    Site,
    Step,
    parse_origin,
)
from selchat.doors.web.session import WebWire

FILES = static.load()
KEY = base64.b64encode(b"0123456789abcdef").decode()


def site(tls: bool = False, origins: Tuple[str, ...] = ()) -> Site:
    return Site(FILES, tls, origins)


class Response:
    """A response as a client sees it, parsed by h11's client side."""

    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers}>"


def parse_responses(data: bytes, methods: List[bytes], upgrade: bool = False) -> List[Response]:
    client = h11.Connection(h11.CLIENT)
    proposal = [("Connection", "Upgrade"), ("Upgrade", "websocket")] if upgrade else []
    out: List[Response] = []
    for method in methods:
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        client.send(h11.Request(method=method, target="/", headers=[("Host", "x"), *proposal]))
        client.send(h11.EndOfMessage())
        if not out:
            client.receive_data(data)
        status, headers, body = 0, {}, b""
        while True:
            event = client.next_event()
            if isinstance(event, (h11.Response, h11.InformationalResponse)):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
                if isinstance(event, h11.InformationalResponse):
                    break
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"incomplete response: {event!r} in {data!r}")
        out.append(Response(status, headers, body))
    return out


def serve(raw: bytes, *, s: Optional[Site] = None, chunk: Optional[int] = None,
          refusal: Optional[str] = None) -> Tuple[List[Step], bytes]:
    """Feed `raw` (in pieces of `chunk` bytes, if given) and step until nothing more can happen."""
    conn = HttpConnection(s or site(), refusal)
    pieces = [raw] if chunk is None else [raw[i:i + chunk] for i in range(0, len(raw), chunk)]
    steps: List[Step] = []
    out = b""
    for piece in pieces:
        conn.receive(piece)
        while True:
            step = conn.step()
            steps.append(step)
            out += step.data
            if step.next is not Next.AGAIN:
                break
        if step.next in (Next.CLOSE, Next.UPGRADE):
            break
    return steps, out


def one(raw: bytes, method: bytes = b"GET", **kw) -> Tuple[Step, Response]:
    steps, out = serve(raw, **kw)
    final = [s for s in steps if s.status][-1]
    return final, parse_responses(out, [method])[0]


def upgrade_request(host: str = "chat.example:8080", origin: Optional[str] = "http://chat.example:8080",
                    extra: str = "", key: str = KEY, version: str = "13") -> bytes:
    lines = [f"GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: keep-alive, Upgrade",
             f"Sec-WebSocket-Version: {version}", f"Sec-WebSocket-Key: {key}"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


# --- files ---------------------------------------------------------------------------------------


def test_the_table_holds_the_index_under_slash_and_only_plain_names() -> None:
    assert FILES[b"/"] == FILES[b"/index.html"]
    assert FILES[b"/"].content_type == b"text/html; charset=utf-8"
    for path in FILES:
        assert path == b"/" or (path.count(b"/") == 1 and b".." not in path)


def test_get_slash_serves_the_client_with_the_security_headers() -> None:
    step, resp = one(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n")
    assert step.next is Next.AGAIN and resp.status == 200
    assert resp.body == FILES[b"/"].body
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["x-content-type-options"] == "nosniff"
    csp = resp.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no other origin
    assert directives["frame-ancestors"] == "'none'"
    assert directives["connect-src"] == "'self' ws://127.0.0.1:8080"
    assert "unsafe" not in csp and "*" not in csp and "http" not in csp


def test_tls_pages_may_connect_only_to_their_own_wss() -> None:
    _, resp = one(b"GET / HTTP/1.1\r\nHost: chat.example\r\n\r\n", s=site(tls=True))
    assert "connect-src 'self' wss://chat.example;" in resp.headers["content-security-policy"]


def test_head_has_the_headers_and_no_body() -> None:
    steps, out = serve(b"HEAD /app.js HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = parse_responses(out, [b"HEAD"])[0]
    assert resp.status == 200 and resp.body == b""
    assert int(resp.headers["content-length"]) == len(FILES[b"/app.js"].body)
    assert resp.headers["content-type"] == "text/javascript; charset=utf-8"


def test_keep_alive_serves_pipelined_requests_in_order() -> None:
    raw = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in ("/", "/style.css", "/app.js"))
    steps, out = serve(raw)
    resps = parse_responses(out, [b"GET"] * 3)
    assert [r.body for r in resps] == [FILES[p].body for p in (b"/", b"/style.css", b"/app.js")]
    assert steps[-1].next is Next.NEED_DATA  # still open for more


def test_connection_close_closes_after_the_response() -> None:
    steps, out = serve(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse_responses(out, [b"GET"])[0].status == 200
    assert steps[-1].next is Next.CLOSE


def test_a_query_string_is_ignored() -> None:
    _, resp = one(b"GET /style.css?v=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200 and resp.body == FILES[b"/style.css"].body


@pytest.mark.parametrize("target", [
    "/nope", "/../setup.cfg", "/static/index.html", "/%2e%2e/setup.cfg", "//etc/passwd",
    "/index.html/", "/INDEX.HTML", "http://x/", "*", "/app.js%00", "/.", "/session.py", "/__init__.py",
])
def test_only_the_known_files_exist(target: str) -> None:
    step, resp = one(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert resp.status == 404 and step.next is Next.CLOSE
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" in resp.headers


# --- refusals, each with its status ------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    step, resp = one(f"{method} / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    assert resp.status == 405 and resp.headers["allow"] == "GET, HEAD"
    assert step.next is Next.CLOSE


def test_a_body_over_the_bound_is_413_before_it_arrives() -> None:
    step, resp = one(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\n\r\n".encode())
    assert resp.status == 413 and step.next is Next.CLOSE


def test_a_chunked_body_over_the_bound_is_413() -> None:
    chunk = b"x" * 1000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // 1000 + 2))
    step, resp = one(b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert resp.status == 413


def test_a_small_body_on_get_is_read_and_ignored() -> None:
    steps, out = serve(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                       b"GET /style.css HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.status for r in parse_responses(out, [b"GET", b"GET"])] == [200, 200]


def test_a_long_request_line_is_414() -> None:
    step, resp = one(b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 414 and step.next is Next.CLOSE


def test_a_request_line_that_never_ends_is_414() -> None:
    step, resp = one(b"GET /" + b"a" * (MAX_REQUEST_LINE + MAX_HEADER_BYTES + 10))
    assert resp.status == 414


def test_large_header_fields_are_431() -> None:
    headers = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEADER_BYTES // 1000 + 1))
    step, resp = one(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert resp.status == 431 and step.next is Next.CLOSE


def test_header_fields_that_never_end_are_431() -> None:
    step, resp = one(b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"v" * (MAX_REQUEST_LINE + MAX_HEADER_BYTES + 10))
    assert resp.status == 431


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: evil.example;script-src *\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS on the plain port
])
def test_malformed_requests_are_400(raw: bytes) -> None:
    step, resp = one(raw if raw.endswith(b"\r\n\r\n") else raw + b"\r\n\r\n")
    assert resp.status == 400 and step.next is Next.CLOSE


def test_a_refused_connection_gets_503() -> None:
    step, resp = one(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", refusal="server_full")
    assert resp.status == 503 and step.next is Next.CLOSE


def test_the_peer_closing_closes() -> None:
    conn = HttpConnection(site())
    conn.receive(b"GET / HT")
    assert conn.step().next is Next.NEED_DATA
    conn.receive(b"")
    assert conn.step().next is Next.CLOSE


# --- the upgrade ------------------------------------------------------------------------------


def test_an_upgrade_switches_and_hands_over_the_bytes_after_it() -> None:
    steps, out = serve(upgrade_request() + b"\x81\x85frames")
    step = steps[-1]
    assert step.next is Next.UPGRADE and step.status == 101
    assert step.trailing == b"\x81\x85frames"
    resp = parse_responses(out, [b"GET"], upgrade=True)[0]
    assert resp.status == 101
    assert resp.headers["sec-websocket-accept"] == generate_accept_token(KEY.encode()).decode()
    assert resp.headers["upgrade"].lower() == "websocket"
    assert "sec-websocket-extensions" not in resp.headers  # no compression: frames are shared


@pytest.mark.parametrize("request_bytes, status", [
    (upgrade_request(key="short"), 400),
    (upgrade_request(key=base64.b64encode(b"x" * 15).decode()), 400),
    (upgrade_request(version="8"), 426),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    (upgrade_request().replace(b"GET /ws", b"POST /ws"), 405),
    (upgrade_request().replace(b"GET /ws", b"HEAD /ws"), 405),
])
def test_bad_upgrades_are_refused(request_bytes: bytes, status: int) -> None:
    method = b"HEAD" if request_bytes.startswith(b"HEAD") else b"GET"
    step, resp = one(request_bytes, method=method)
    assert resp.status == status and step.next is Next.CLOSE


def test_426_names_the_version_we_speak() -> None:
    _, resp = one(upgrade_request(version="8"))
    assert resp.headers["sec-websocket-version"] == "13"


@pytest.mark.parametrize("host, origin", [
    ("chat.example:8080", "http://chat.example:8080"),
    ("chat.example", "http://chat.example"),
    ("chat.example:80", "http://chat.example"),  # default ports are the same origin
    ("chat.example", "http://CHAT.example:80"),
    ("127.0.0.1:9", "http://127.0.0.1:9"),
    ("[::1]:9", "http://[::1]:9"),
    ("x", None),  # no Origin: a program, not a page
])
def test_same_origin_may_upgrade(host: str, origin: Optional[str]) -> None:
    steps, _ = serve(upgrade_request(host=host, origin=origin))
    assert steps[-1].next is Next.UPGRADE


@pytest.mark.parametrize("host, origin", [
    ("chat.example:8080", "http://evil.example:8080"),
    ("chat.example:8080", "http://chat.example:8081"),
    ("chat.example:8080", "https://chat.example:8080"),  # another scheme is another origin
    ("chat.example", "http://chat.example.evil.example"),
    ("chat.example", "null"),
    ("chat.example", "http://chat.example/path"),
    ("chat.example", "http://user@chat.example"),
    ("chat.example", ""),
])
def test_other_origins_are_403_before_the_upgrade(host: str, origin: str) -> None:
    step, resp = one(upgrade_request(host=host, origin=origin))
    assert resp.status == 403 and step.next is Next.CLOSE
    assert "sec-websocket-accept" not in resp.headers


def test_web_origin_allows_more_origins() -> None:
    s = site(origins=("https://chat.example.org", "http://localhost:3000"))
    for origin in ("https://chat.example.org", "https://chat.example.org:443", "http://localhost:3000"):
        steps, _ = serve(upgrade_request(host="internal:8080", origin=origin), s=s)
        assert steps[-1].next is Next.UPGRADE, origin
    step, resp = one(upgrade_request(host="internal:8080", origin="http://chat.example.org"), s=s)
    assert resp.status == 403


def test_tls_site_own_origin_is_https() -> None:
    s = site(tls=True)
    steps, _ = serve(upgrade_request(host="chat.example", origin="https://chat.example"), s=s)
    assert steps[-1].next is Next.UPGRADE
    step, resp = one(upgrade_request(host="chat.example", origin="http://chat.example"), s=s)
    assert resp.status == 403


def test_a_bad_web_origin_is_refused_at_start() -> None:
    with pytest.raises(ValueError):
        Site(FILES, False, ("chat.example",))


@given(st.text(max_size=60))
def test_parse_origin_never_raises(text: str) -> None:
    result = parse_origin(text)
    assert result is None or result[0] in ("http", "https")


# --- any split, any junk ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=64))
def test_any_split_of_the_input_gives_the_same_bytes(chunk: int) -> None:
    raw = (b"GET /style.css HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
           + upgrade_request(host="x", origin="http://x") + b"after")
    whole_steps, whole = serve(raw)
    split_steps, split = serve(raw, chunk=chunk)
    assert split == whole
    assert split_steps[-1].next is Next.UPGRADE
    # What came after the request (in whatever pieces) is handed over whole, or fed later.
    assert b"after".startswith(split_steps[-1].trailing)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_junk_never_raises_and_ends_in_a_decision(junk: bytes) -> None:
    conn = HttpConnection(site())
    conn.receive(junk)
    for _ in range(10):
        step = conn.step()
        if step.next is not Next.AGAIN:
            break
    assert step.next in (Next.NEED_DATA, Next.CLOSE, Next.UPGRADE)
    if step.status:
        assert step.status in (200, 400, 404, 405, 413, 414, 426, 431)


# --- the shared wire format -----------------------------------------------------------------


def client_reads(data: bytes) -> List[str]:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    out = []
    for event in client.events():
        assert isinstance(event, TextMessage) and event.message_finished
        out.append(event.data)
    return out


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 70000])
def test_text_frames_of_every_length_form_parse_back(size: int) -> None:
    wire = WebWire(1 << 20)
    payload = ("é" * (size // 2) + "a" * (size % 2)).encode()
    frame = wire.text_frame(payload)
    assert frame[0] == 0x81  # FIN, text
    assert not frame[1] & 0x80  # server frames are unmasked
    assert client_reads(frame) == [payload.decode()]


def test_one_message_encodes_to_the_same_bytes_for_everyone() -> None:
    wire = WebWire(65536)
    msg = events.Message(7, 1700000000000, "alice", "hi \"there\" ✓", room="#lobby")
    a = wire.message(msg)
    assert isinstance(a, bytes) and a == wire.message(msg)
    (text,) = client_reads(a)
    assert text == ('{"type":"message","id":7,"ts":1700000000000,"from":"alice",'
                    '"room":"#lobby","text":"hi \\"there\\" ✓"}')
    # The sender's own copy carries its ref; the others' do not.
    (own,) = client_reads(wire.frames(msg, "r1")[0])
    assert own.endswith(',"ref":"r1"}')
    # Several frames for one member concatenate into a stream the client reads in order.
    assert client_reads(a + a + wire.encode(events.Notice("n"))[0]) == [text, text, '{"type":"notice","text":"n"}']
