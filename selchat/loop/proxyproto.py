"""The PROXY protocol header (HAProxy's, versions 1 and 2), sans I/O, and the trusted proxies.

A proxy that passes TCP streams through (HAProxy, nginx's stream module with `proxy_protocol
on`) says where each connection really comes from in a header before the first byte of the
client: version 1 is one text line (`PROXY TCP4 203.0.113.7 192.0.2.1 51000 6667\\r\\n`),
version 2 a binary block behind a fixed 12-byte signature. Only a trusted proxy may say so,
so the header is read only from the addresses given with `--trusted-proxy`
(`TrustedProxies`); from anyone else those bytes are what the door makes of them (a protocol
error).

`parse(data)` looks at the bytes a connection has sent so far and says one of:

* `NEED_MORE`: they are the start of a header (or too few to tell): wait for more;
* `NOT_PROXY`: they cannot start a header: the connection has none (a trusted address may
  also connect directly, as a local health check does);
* a `ProxyHeader`: the header's `length` in bytes and the client's `source` address (None
  when the header says to use the connection's own: a v2 LOCAL command, `UNKNOWN`, or an
  address family that is not TCP over IPv4 or IPv6);

or raises `ProxyError` for a header that is broken or too long: the connection is closed.
`parse` never reads past the header, so the caller knows exactly how many bytes to take off
the socket before the client's own (see `selchat.loop.listener.ProxyGate`).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

__all__ = ["V1_MAX", "V2_SIGNATURE", "HEADER_MAX", "NEED_MORE", "NOT_PROXY", "ProxyError",
           "ProxyHeader", "parse", "encode_v1", "encode_v2", "TrustedProxies", "normal_ip"]

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest version 1 line, CRLF included (the specification's bound)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family and protocol, length
V2_TLV_MAX = 2048  # bytes of a version 2 block past the addresses we accept (TLVs: ignored)
HEADER_MAX = V2_FIXED + 216 + V2_TLV_MAX  # (216: two UNIX socket paths, the largest block)

_V2_ADDRESSES = {0x1: 12, 0x2: 36, 0x3: 216}  # family -> bytes of its address block
_PORT = struct.Struct(">H")


class _Need:
    def __repr__(self) -> str:
        return "NEED_MORE"


class _Not:
    def __repr__(self) -> str:
        return "NOT_PROXY"


NEED_MORE = _Need()
NOT_PROXY = _Not()


class ProxyError(ValueError):
    """A PROXY header that is broken or too long; str() says how (for the log)."""


@dataclass(frozen=True)
class ProxyHeader:
    length: int  # bytes of the header: the client's own bytes start after them
    source: Optional[Tuple[str, int]]  # (address, port) of the client; None: the connection's own
    version: int


Result = Union[ProxyHeader, _Need, _Not]


def parse(data: bytes) -> Result:
    """What the first bytes of a connection from a trusted proxy are (see the module's doc)."""
    if not data:
        return NEED_MORE
    if data[0] == V1_PREFIX[0]:
        if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
            return NOT_PROXY
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else NEED_MORE
    if data[0] == V2_SIGNATURE[0]:
        if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
            return NOT_PROXY
        return _parse_v2(data) if len(data) >= V2_FIXED else NEED_MORE
    return NOT_PROXY


def _parse_v1(data: bytes) -> Result:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyError("PROXY v1 line not ended by CRLF")
        return NEED_MORE
    length = end + 2
    try:
        line = data[len(V1_PREFIX):end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    words = line.split(" ")
    if words[0] == "UNKNOWN":
        return ProxyHeader(length, None, 1)
    if len(words) != 5 or words[0] not in ("TCP4", "TCP6"):
        raise ProxyError("PROXY v1 line is not 'TCP4|TCP6 source destination sport dport'")
    family, source, destination, sport, dport = words
    version = 4 if family == "TCP4" else 6
    for text in (source, destination):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ProxyError(f"PROXY v1 address {text[:45]!r} is not an IP address") from None
        if address.version != version:
            raise ProxyError(f"PROXY v1 address {text!r} is not {family}")
    ports = []
    for text in (sport, dport):
        if not (text.isdigit() and text.isascii() and len(text) <= 5) or int(text) > 65535 \
                or (len(text) > 1 and text[0] == "0"):
            raise ProxyError(f"PROXY v1 port {text[:8]!r} is not a port number")
        ports.append(int(text))
    return ProxyHeader(length, (normal_ip(source), ports[0]), 1)


def _parse_v2(data: bytes) -> Result:
    version_command = data[12]
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    family, transport = data[13] >> 4, data[13] & 0xF
    (size,) = _PORT.unpack_from(data, 14)
    needed = _V2_ADDRESSES.get(family, 0)
    if size < needed:
        raise ProxyError(f"PROXY v2 block of {size} bytes is too short for its addresses")
    if size > needed + V2_TLV_MAX:
        raise ProxyError(f"PROXY v2 block of {size} bytes is too long")
    length = V2_FIXED + size
    if len(data) < length:
        return NEED_MORE
    if command == 0 or transport != 1 or family not in (1, 2):
        # LOCAL (the proxy's own health check), UNSPEC, UNIX, or datagrams: the connection's own.
        return ProxyHeader(length, None, 2)
    block = data[V2_FIXED:length]
    if family == 1:
        source = str(ipaddress.IPv4Address(block[0:4]))
        (port,) = _PORT.unpack_from(block, 8)
    else:
        source = normal_ip(str(ipaddress.IPv6Address(block[0:16])))
        (port,) = _PORT.unpack_from(block, 32)
    return ProxyHeader(length, (source, port), 2)


def encode_v1(source: Tuple[str, int], destination: Tuple[str, int]) -> bytes:
    """A version 1 header (for tests and load generators)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode("ascii"))


def encode_v2(source: Optional[Tuple[str, int]], destination: Tuple[str, int] = ("0.0.0.0", 0),
              tlvs: bytes = b"") -> bytes:
    """A version 2 header; `source` None makes a LOCAL one (for tests and load generators)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + _PORT.pack(len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == 4:
        dst4 = dst if dst.version == 4 else ipaddress.IPv4Address(0)
        block = src.packed + dst4.packed
        family = 0x11
    else:
        dst6 = dst if dst.version == 6 else ipaddress.IPv6Address(0)
        block = src.packed + dst6.packed
        family = 0x21
    block += _PORT.pack(source[1]) + _PORT.pack(destination[1]) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + _PORT.pack(len(block)) + block


def normal_ip(text: str) -> str:
    """An address as the server keys it: an IPv4 address seen through an IPv6 socket
    (::ffff:a.b.c.d) is the IPv4 address; anything else as `ipaddress` writes it (or as given)."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_network(text: str) -> Network:
    """`--trusted-proxy` value: an address or a CIDR block (host bits allowed); ValueError."""
    return ipaddress.ip_network(text.strip(), strict=False)


class TrustedProxies:
    """The networks whose connections may say where a client really comes from.

    `trusted(ip)` is asked once per connection from the PROXY-protocol ports and once per
    forwarded address at the web door; answers are kept (bounded), as a proxy's few addresses
    are asked again and again.
    """

    __slots__ = ("networks", "_known")

    _KNOWN_MAX = 4096

    def __init__(self, networks: Iterable[Union[str, Network]] = ()) -> None:
        self.networks: List[Network] = [n if not isinstance(n, str) else parse_network(n)
                                        for n in networks]
        self._known: Dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusted(self, ip: str) -> bool:
        known = self._known.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(normal_ip(ip))
        except ValueError:
            answer = False
        else:
            answer = any(address in network for network in self.networks)
        if len(self._known) >= self._KNOWN_MAX:
            self._known.clear()
        self._known[ip] = answer
        return answer
