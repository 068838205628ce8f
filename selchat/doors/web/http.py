"""The web door's HTTP side, sans I/O: bytes in, bytes out, one decision per request (h11).

An `HttpConnection` serves one TCP connection until it upgrades to a WebSocket or closes. It
parses with h11 (nothing here reads HTTP syntax by hand) and adds what h11 leaves to the
server: which paths exist, which methods are allowed, how big a request may be, which
origins may open a WebSocket, and the security headers of every response.

Each call to `step()` returns a `Step`: bytes to send, and what happens next:

* `NEED_DATA`: nothing more can be decided until more bytes arrive;
* `AGAIN`: a response was produced and the connection stays open (keep-alive): step again;
* `CLOSE`: send the bytes, then close (an error, `Connection: close`, or the peer is done);
* `UPGRADE`: the bytes are the `101 Switching Protocols`; `trailing` holds what the client
  sent after its request (already WebSocket frames). The h11 object is no longer needed.

Limits, each with its own status: a request line over `MAX_REQUEST_LINE` bytes is 414, header
fields over `MAX_HEADER_BYTES` 431, a body over `MAX_BODY` 413, a method other than GET/HEAD
405, an unknown path 404, and anything h11 cannot parse 400.

Behind a proxy (`--trusted-proxy`), a connection from a trusted address carries, with each
request, where its client really is: `X-Forwarded-For` / `X-Forwarded-Proto` /
`X-Forwarded-Host`, or RFC 7239's `Forwarded` (`--forwarded-header` says which one the proxy
sets; the other is ignored, as a client could send it through). The client is the right-most
address not itself a trusted proxy, so whatever a client writes into the header itself (to
its left) is never taken. Its scheme and host are what the Origin check and the CSP compare
with, so a page served over https by a TLS-terminating proxy may open the WebSocket.
"""


from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import h11
from wsproto.utilities import generate_accept_token

from selchat import SERVER_NAME
from selchat.doors.web.static import StaticFile
from selchat.loop.proxyproto import TrustedProxies, normal_ip

MAX_REQUEST_LINE = 8192  # bytes of "GET /path HTTP/1.1"
MAX_HEADER_BYTES = 16384  # bytes of all header fields together
MAX_BODY = 4096  # bytes of a request body (nothing here needs one)
WS_PATH = b"/ws"
WS_VERSION = b"13"

_REASONS = {
    101: b"Switching Protocols", 200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    413: b"Content Too Large", 414: b"URI Too Long", 426: b"Upgrade Required",
    431: b"Request Header Fields Too Large", 503: b"Service Unavailable",
}

# A Host header as browsers send it: a DNS name or IPv4 address, or a bracketed IPv6 address,
# with an optional port. Anything else is refused, so that the value can go into the CSP.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")

Origin = Tuple[str, str, int]  # (scheme, host, port), as compared


def parse_origin(text: str) -> Optional[Origin]:
    """`scheme://host[:port]` (http or https) as a comparable triple, or None if it is not one."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.password is not None:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else _default_port(scheme)


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")  # --forwarded-header's choices


class Site:
    """What every connection of the web door shares: the files, the scheme, the origins allowed,
    and the proxies trusted to say who the client is (and which header they say it in)."""

    __slots__ = ("files", "scheme", "origins", "server", "trusted", "forwarded_header")

    def __init__(self, files: Dict[bytes, StaticFile], tls: bool = False,
                 extra_origins: Sequence[str] = (), trusted: Optional[TrustedProxies] = None,
                 forwarded_header: str = "x-forwarded-for") -> None:
        self.files = files
        self.scheme = "https" if tls else "http"
        self.trusted = trusted if trusted is not None else TrustedProxies()
        if forwarded_header not in FORWARDED_HEADERS:
            raise ValueError(f"not a forwarded header: {forwarded_header!r}")
        self.forwarded_header = forwarded_header
        origins = []
        for text in extra_origins:
            origin = parse_origin(text)
            if origin is None:
                raise ValueError(f"not an origin (scheme://host[:port]): {text!r}")
            origins.append(origin)
        self.origins = frozenset(origins)
        self.server = SERVER_NAME.encode("ascii", "replace")

    def own_origin(self, host: Optional[str], scheme: Optional[str] = None) -> Optional[Origin]:
        """The origin a page served under this Host header has (our scheme, or the one a
        trusted proxy says the client used; that host)."""
        if not host:
            return None
        return parse_origin(f"{scheme or self.scheme}://{host}")

    def origin_allowed(self, origin: Optional[str], host: Optional[str],
                       scheme: Optional[str] = None) -> bool:
        """Docs/web.md, "Origin": the server's own origin or one given with --web-origin.

        A request without `Origin` comes from a program, not a page (every browser sends one
        with a WebSocket handshake), so it is not a cross-site request and is let through.
        """
        if origin is None:
            return True
        parsed = parse_origin(origin)
        if parsed is None:  # "null" (a sandboxed frame, a file: page) or junk
            return False
        return parsed == self.own_origin(host, scheme) or parsed in self.origins

    def csp(self, host: Optional[str], scheme: Optional[str] = None) -> bytes:
        """No inline script, nothing from another origin, never framed.

        `connect-src` names the WebSocket URL of this very host: browsers that do not count
        ws:/wss: as 'self' still let the page reach its own server, and nothing else.
        """
        ws = "wss" if (scheme or self.scheme) == "https" else "ws"
        connect = f"'self' {ws}://{host}" if host else "'self'"
        return (f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                f"connect-src {connect}; object-src 'none'; base-uri 'none'; form-action 'self'; "
                f"frame-ancestors 'none'").encode("ascii")


class Next(enum.Enum):
    NEED_DATA = "need data"  # wait for more bytes
    AGAIN = "again"  # a response was made; step again for the next request
    CLOSE = "close"  # send the bytes, then close the connection
    UPGRADE = "upgrade"  # send the 101; WebSocket from here on


class Step:
    __slots__ = ("next", "data", "trailing", "status", "detail")

    def __init__(self, next: Next, data: bytes = b"", trailing: bytes = b"", status: int = 0,
                 detail: str = "") -> None:
        self.next = next
        self.data = data
        self.trailing = trailing
        self.status = status  # of the response in `data`, if any
        self.detail = detail  # for the log: why a request was refused

    def __repr__(self) -> str:
        return f"<Step {self.next.value} {self.status} {self.detail!r}>"


_NEED_DATA = Step(Next.NEED_DATA)


class HttpConnection:
    """One HTTP/1.1 connection, from its first byte to its upgrade or close.

    `via` is set for a connection from a trusted proxy: an object with the proxy's address
    (`ip`) and `claim(ip, port)`, which makes the client each request names the connection's
    (for the per-address limits and the log) and returns the reason it is refused, if it is.
    """

    __slots__ = ("site", "conn", "refusal", "_pending", "_body", "_host", "_scheme", "via")

    def __init__(self, site: Site, refusal: Optional[str] = None, via: Any = None) -> None:
        self.site = site
        # h11's own bound is on an incomplete request head; which of our limits it was is
        # sorted out in `_too_long`.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_LINE + MAX_HEADER_BYTES)
        self.refusal = refusal  # admission said no: every request gets 503 (a WebSocket, a JSON error)
        self._pending: Optional[h11.Request] = None  # a request whose body is still arriving
        self._body = 0
        self._host: Optional[str] = None
        self._scheme: Optional[str] = None  # the client's scheme as a trusted proxy says it
        self.via = via

    def receive(self, data: bytes) -> None:
        """Bytes from the peer; b"" is its end of stream."""
        self.conn.receive_data(data)

    def step(self) -> Step:
        conn = self.conn
        while True:
            if conn.our_state is h11.MUST_CLOSE or conn.our_state is h11.CLOSED:
                return Step(Next.CLOSE)
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431 and self._line_too_long():
                    status = 414
                return self._error(status, str(exc))
            if event is h11.NEED_DATA:
                return _NEED_DATA
            if event is h11.PAUSED:
                # The peer sent more while we still owe it an answer: it waits in h11's buffer.
                return _NEED_DATA
            kind = type(event)
            if kind is h11.Request:
                step = self._on_request(event)  # type: ignore[arg-type]
                if step is not None:
                    return step
            elif kind is h11.Data:
                self._body += len(event.data)  # type: ignore[union-attr]
                if self._body > MAX_BODY:
                    return self._error(413, f"request body over {MAX_BODY} bytes")
            elif kind is h11.EndOfMessage:
                request = self._pending
                if request is not None:
                    step = self._answer(request)
                    self._pending = None
                    return step
            elif kind is h11.ConnectionClosed:
                return Step(Next.CLOSE, detail="peer closed")

    # --- requests -----------------------------------------------------------------------------

    def _on_request(self, request: h11.Request) -> Optional[Step]:
        """Refuse what can be refused from the head alone; else wait for the end of the body."""
        self._pending = request  # its method decides whether a response carries a body
        self._body = 0
        if len(request.target) > MAX_REQUEST_LINE:
            return self._error(414, "request target too long")
        if sum(len(name) + len(value) + 4 for name, value in request.headers) > MAX_HEADER_BYTES:
            return self._error(431, "header fields too large")
        host = _header(request, b"host")
        if host is not None:
            text = host.decode("ascii", "replace")
            if not _HOST.fullmatch(text):
                return self._error(400, "bad Host header")
            self._host = text
        else:
            self._host = None
        self._scheme = None
        if self.via is not None:
            self._forwarded(request)
        length = _header(request, b"content-length")
        if length is not None and int(length) > MAX_BODY:  # h11 has checked it is a number
            return self._error(413, f"request body of {int(length)} bytes (at most {MAX_BODY})")
        if request.method not in (b"GET", b"HEAD"):
            return self._error(405, "method not allowed", [(b"allow", b"GET, HEAD")])
        path = request.target.split(b"?", 1)[0]
        if path != WS_PATH and path not in self.site.files:
            return self._error(404, "no such file")
        return None

    def _forwarded(self, request: h11.Request) -> None:
        """From a trusted proxy: the client this request is for, its scheme and host."""
        via = self.via
        client = forwarded_client(request.headers, self.site.trusted, self.site.forwarded_header)
        if client.proto is not None:
            self._scheme = client.proto
        if client.host is not None and _HOST.fullmatch(client.host):
            self._host = client.host
        ip, port = (client.ip, client.port) if client.ip is not None else (via.ip, None)
        refused = via.claim(ip, port)
        if refused is not None and self.refusal is None:
            self.refusal = refused

    def _answer(self, request: h11.Request) -> Step:
        path = request.target.split(b"?", 1)[0]
        if path == WS_PATH:
            return self._upgrade(request)
        if self.refusal is not None:
            return self._error(503, self.refusal)
        file = self.site.files[path]
        headers = self._headers(file.content_type, len(file.body))
        data = self.conn.send(h11.Response(status_code=200, headers=headers, reason=_REASONS[200])) or b""
        if request.method != b"HEAD":
            data += self.conn.send(h11.Data(data=file.body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        return Step(Next.CLOSE if self.conn.our_state is h11.MUST_CLOSE else Next.AGAIN, data, status=200)

    def _upgrade(self, request: h11.Request) -> Step:
        """RFC 6455, section 4.2: check the handshake, then the Origin, then switch."""
        if request.method != b"GET":
            return self._error(405, "a WebSocket opens with GET", [(b"allow", b"GET")])
        upgrade = _tokens(request, b"upgrade")
        if b"websocket" not in upgrade or b"upgrade" not in _tokens(request, b"connection"):
            return self._error(426, "expected a WebSocket upgrade",
                               [(b"upgrade", b"websocket"), (b"connection", b"upgrade")])
        if _header(request, b"sec-websocket-version") != WS_VERSION:
            return self._error(426, "unsupported WebSocket version",
                               [(b"sec-websocket-version", WS_VERSION)])
        key = _header(request, b"sec-websocket-key")
        if key is None or not _valid_key(key):
            return self._error(400, "missing or malformed Sec-WebSocket-Key")
        origin = _header(request, b"origin")
        origin_text = origin.decode("latin-1") if origin is not None else None
        if not self.site.origin_allowed(origin_text, self._host, self._scheme):
            return self._error(403, f"origin {origin_text!r} not allowed")
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", generate_accept_token(key)),
            (b"server", self.site.server),
        ]
        data = self.conn.send(h11.InformationalResponse(status_code=101, headers=headers,
                                                          reason=_REASONS[101])) or b""
        trailing, _ = self.conn.trailing_data
        return Step(Next.UPGRADE, data, trailing, status=101)

    # --- responses ----------------------------------------------------------------------------

    def _headers(self, content_type: bytes, length: int) -> List[Tuple[bytes, bytes]]:
        return [
            (b"content-type", content_type),
            (b"content-length", str(length).encode("ascii")),
            (b"content-security-policy", self.site.csp(self._host, self._scheme)),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cache-control", b"no-cache"),
            (b"server", self.site.server),
        ]

    def _error(self, status: int, detail: str, extra: Sequence[Tuple[bytes, bytes]] = ()) -> Step:
        """An error response, then close: after a refusal the rest of the stream is not read."""
        reason = _REASONS.get(status, b"Error")
        body = b"%d %s\n" % (status, reason)
        headers = self._headers(b"text/plain; charset=utf-8", len(body))
        headers.extend(extra)
        headers.append((b"connection", b"close"))
        conn = self.conn
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
            if self._method() != b"HEAD":
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            data = b""  # no response can be sent in this state (the peer is gone): just close
        self._pending = None
        return Step(Next.CLOSE, data, status=status, detail=detail)

    def _method(self) -> Optional[bytes]:
        request = self._pending
        return request.method if request is not None else None

    def _line_too_long(self) -> bool:
        """h11 says "431" for any head too long; a first line past our bound is a 414."""
        buffered, _ = self.conn.trailing_data
        end = buffered.find(b"\n", 0, MAX_REQUEST_LINE + 2)
        return end < 0


def _header(request: h11.Request, name: bytes) -> Optional[bytes]:
    """The value of header `name` (h11 gives lower-case names), or None; a repeated one is joined."""
    values = [value for key, value in request.headers if key == name]
    if not values:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


def _tokens(request: h11.Request, name: bytes) -> List[bytes]:
    value = _header(request, name)
    if value is None:
        return []
    return [token.strip().lower() for token in value.split(b",")]


def _valid_key(key: bytes) -> bool:
    """RFC 6455: the base64 encoding of 16 random bytes."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


# --- forwarded headers ---------------------------------------------------------------------


class ForwardedClient:
    """What a trusted proxy's headers say of a request's client (None: they do not say)."""

    __slots__ = ("ip", "port", "proto", "host")

    def __init__(self, ip: Optional[str] = None, port: Optional[int] = None,
                 proto: Optional[str] = None, host: Optional[str] = None) -> None:
        self.ip = ip
        self.port = port
        self.proto = proto
        self.host = host

    def __repr__(self) -> str:
        return f"ForwardedClient({self.ip!r}, {self.port!r}, {self.proto!r}, {self.host!r})"


def forwarded_client(headers: Sequence[Tuple[bytes, bytes]], trusted: TrustedProxies,
                     which: str = "x-forwarded-for") -> ForwardedClient:
    """The client a request from a trusted proxy is for, from the header `which` names.

    Each proxy on the way appends the address it got the request from, so the list reads
    client, proxy, proxy...; only the entries appended by proxies we trust can be believed.
    Walking from the right, trusted proxies are skipped and the first other entry is the
    client (all trusted: the left-most). An entry that is not an address (`unknown`, an
    obfuscated name, junk) ends the walk without a client: the proxy's own address is used.
    """
    if which == "forwarded":
        elements = parse_forwarded(_joined(headers, b"forwarded"))
        nodes = [element.get("for", "") for element in elements]
        index = _client_index(nodes, trusted)
        if index is None:
            return ForwardedClient()
        chosen = elements[index] if index >= 0 else {}
        ip, port = _node(nodes[index]) if index >= 0 else (None, None)
        proto = chosen.get("proto") or _last_with(elements, "proto")
        host = chosen.get("host") or _last_with(elements, "host")
        return ForwardedClient(ip, port, _scheme(proto), host)
    nodes = [part.strip() for part in _joined(headers, b"x-forwarded-for").split(",") if part.strip()]
    index = _client_index(nodes, trusted)
    ip, port = _node(nodes[index]) if index is not None and index >= 0 else (None, None)
    proto = _last_value(headers, b"x-forwarded-proto")
    host = _last_value(headers, b"x-forwarded-host")
    return ForwardedClient(ip, port, _scheme(proto), host)


def _client_index(nodes: List[str], trusted: TrustedProxies) -> Optional[int]:
    """Index of the client in `nodes` (right-most untrusted); -1 for none given; None when
    the walk meets something that is not an address."""
    if not nodes:
        return -1
    for index in range(len(nodes) - 1, -1, -1):
        ip, _ = _node(nodes[index])
        if ip is None:
            return None
        if not trusted.trusted(ip):
            return index
    return 0


def _node(text: str) -> Tuple[Optional[str], Optional[int]]:
    """An address with an optional port, as proxies write them (`1.2.3.4`, `1.2.3.4:80`,
    `2001:db8::1`, `[2001:db8::1]:80`); (None, None) for anything else."""
    text = text.strip()
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None, None
        address, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None, None
            port_text = rest[1:]
    elif text.count(":") == 1:
        address, port_text = text.split(":")
    else:
        address = text
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None, None
    port = int(port_text) if port_text.isdigit() and port_text.isascii() and len(port_text) <= 5 \
        and int(port_text) <= 65535 else None
    return normal_ip(address), port


def _scheme(proto: Optional[str]) -> Optional[str]:
    if proto is None:
        return None
    proto = proto.strip().lower()
    return proto if proto in ("http", "https") else None


def _joined(headers: Sequence[Tuple[bytes, bytes]], name: bytes) -> str:
    return ", ".join(value.decode("latin-1") for key, value in headers if key == name)


def _last_value(headers: Sequence[Tuple[bytes, bytes]], name: bytes) -> Optional[str]:
    """The right-most value of a comma-separated header (what the nearest proxy set)."""
    parts = [part.strip() for part in _joined(headers, name).split(",") if part.strip()]
    return parts[-1] if parts else None


def _last_with(elements: List[Dict[str, str]], key: str) -> Optional[str]:
    for element in reversed(elements):
        if key in element:
            return element[key]
    return None


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_forwarded(text: str) -> List[Dict[str, str]]:
    """RFC 7239's `Forwarded` as a list of elements, each {parameter (lower case): value}.

    Commas and semicolons inside quoted strings are kept; a pair that is not `token=value`
    is skipped rather than failing the whole header (the walk then finds no `for` there and
    stops, if it gets that far).
    """
    elements: List[Dict[str, str]] = []
    element: Dict[str, str] = {}
    pair: List[str] = []
    quoted = False
    escaped = False
    for ch in text + ",":
        if quoted:
            if escaped:
                pair.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
            else:
                pair.append(ch)
            continue
        if ch == '"':
            quoted = True
        elif ch in ";,":
            _add_pair(element, "".join(pair))
            pair = []
            if ch == ",":
                if element:
                    elements.append(element)
                element = {}
        else:
            pair.append(ch)
    return elements


def _add_pair(element: Dict[str, str], text: str) -> None:
    name, sep, value = text.strip().partition("=")
    name = name.strip().lower()
    if sep and _TOKEN.fullmatch(name) and name not in element:
        element[name] = value.strip()
