"""The web door's forwarded headers (selchat.doors.web.http.forwarded_client): whatever a
client writes into them itself, the address a trusted proxy appended is the one taken."""

from __future__ import annotations

import ipaddress

from hypothesis import given, strategies as st

from selchat.doors.web.http import forwarded_client, parse_forwarded
from selchat.loop.proxyproto import TrustedProxies

TRUSTED = TrustedProxies(["127.0.0.1", "10.0.0.0/8"])
clients = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0x0B000000, 0x7E000000))
junk = st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30), max_size=5)


def _xff(value: str, proto: str = "") -> list:
    headers = [(b"x-forwarded-for", value.encode("latin-1"))]
    if proto:
        headers.append((b"x-forwarded-proto", proto.encode()))
    return headers


@given(junk, clients, st.lists(st.sampled_from(["127.0.0.1", "10.1.2.3"]), max_size=3))
def test_the_right_most_untrusted_address_whatever_the_client_wrote_to_its_left(forged, client, hops) -> None:
    value = ", ".join([*(f.replace(",", " ") for f in forged), client, *hops])
    got = forwarded_client(_xff(value), TRUSTED)
    assert got.ip == client


@given(junk, clients)
def test_the_same_through_rfc_7239(forged, client) -> None:
    left = ", ".join(f'for="{f.replace(chr(34), "").replace(chr(92), "")}"' for f in forged)
    value = (left + ", " if left else "") + f"for={client};proto=https, for=10.9.9.9"
    got = forwarded_client([(b"forwarded", value.encode("latin-1"))], TRUSTED, "forwarded")
    assert got.ip == client and got.proto == "https"


@given(st.text(max_size=200))
def test_any_header_text_parses_without_failing(text) -> None:
    parse_forwarded(text)
    forwarded_client([(b"forwarded", text.encode("utf-8"))], TRUSTED, "forwarded")
    forwarded_client(_xff(text.encode("utf-8").decode("latin-1")), TRUSTED)


def test_what_the_headers_may_hold() -> None:
    assert forwarded_client(_xff("[2001:db8::1]:80"), TRUSTED).ip == "2001:db8::1"
    got = forwarded_client(_xff("203.0.113.5:4000", "https"), TRUSTED)
    assert (got.ip, got.port, got.proto) == ("203.0.113.5", 4000, "https")
    assert forwarded_client(_xff("2001:db8::2"), TRUSTED).ip == "2001:db8::2"
    assert forwarded_client(_xff("::ffff:203.0.113.6"), TRUSTED).ip == "203.0.113.6"
    # Not an address where the client should be: no client (the proxy's own address is used).
    assert forwarded_client(_xff("203.0.113.5, unknown"), TRUSTED).ip is None
    assert forwarded_client(_xff(""), TRUSTED).ip is None
    # Only trusted hops: the farthest one.
    assert forwarded_client(_xff("10.0.0.1, 127.0.0.1"), TRUSTED).ip == "10.0.0.1"
    # A scheme other than http or https is not one.
    assert forwarded_client(_xff("203.0.113.5", "gopher"), TRUSTED).proto is None
    assert parse_forwarded('for="[2001:db8::7]:4711";proto=https;by=x, for=unknown') == [
        {"for": "[2001:db8::7]:4711", "proto": "https", "by": "x"}, {"for": "unknown"}]
    assert parse_forwarded('for="a,b;c"') == [{"for": "a,b;c"}]
