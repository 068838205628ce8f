"""The PROXY protocol parser (selchat.loop.proxyproto): properties over generated headers and
bytes, and the cases the specification names."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from selchat.loop.proxyproto import (HEADER_MAX, NEED_MORE, NOT_PROXY, V1_MAX, V2_SIGNATURE,
                                     ProxyError, ProxyHeader, TrustedProxies, encode_v1,
                                     encode_v2, normal_ip, parse)

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1)).filter(
    lambda a: ipaddress.IPv6Address(a).ipv4_mapped is None)
ports = st.integers(0, 65535)
endpoints = st.one_of(st.tuples(ipv4, ports), st.tuples(ipv6, ports))
client_bytes = st.binary(max_size=64)


def _header(version: int, source, destination, tlvs: bytes = b"") -> bytes:
    if version == 1:
        return encode_v1(source, destination)
    return encode_v2(source, destination, tlvs)


def _same_family(source, destination) -> bool:
    return (":" in source[0]) == (":" in destination[0])


@given(st.sampled_from([1, 2]), endpoints, endpoints, client_bytes, st.binary(max_size=40))
def test_a_header_gives_its_source_and_length_whatever_follows(version, source, destination, rest, tlvs) -> None:
    if version == 1 and not _same_family(source, destination):
        destination = source
    header = _header(version, source, destination, tlvs)
    result = parse(header + rest)
    assert isinstance(result, ProxyHeader)
    assert result.length == len(header)
    assert result.source == (source[0], source[1])
    assert result.version == version


@given(st.sampled_from([1, 2]), endpoints, client_bytes)
def test_every_strict_prefix_of_a_header_asks_for_more(version, source, rest) -> None:
    header = _header(version, source, source)
    for cut in range(len(header)):
        assert parse(header[:cut]) is NEED_MORE, (cut, header[:cut])


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_any_bytes_are_a_header_more_needed_none_or_a_proxy_error(data) -> None:
    try:
        result = parse(data)
    except ProxyError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= min(len(data), HEADER_MAX)
    else:
        assert result is NEED_MORE or result is NOT_PROXY
        if result is NEED_MORE:
            assert len(data) < HEADER_MAX


@given(st.binary(min_size=1, max_size=30).filter(lambda d: d[:1] not in (b"P", b"\r")))
def test_bytes_that_cannot_start_a_header_are_no_header(data) -> None:
    assert parse(data) is NOT_PROXY


@given(st.sampled_from([b"\x00\x00\x00\x1f{", b"NICK alice\r\n", b"PASS x\r\n", b"PING :x\r\n",
                        b"\x16\x03\x01\x02\x00", b"GET / HTTP/1.1\r\n", b"\r\n\r\nx"]))
def test_what_clients_send_first_is_not_a_header(data) -> None:
    assert parse(data) is NOT_PROXY


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", b"PROXY TCP4 \xff.2.3.4 5.6.7.8 1 2\r\n",
])
def test_broken_v1_lines_are_errors(line) -> None:
    with pytest.raises(ProxyError):
        parse(line)


def test_a_v1_line_without_its_end_within_the_bound_is_an_error() -> None:
    assert parse(b"PROXY TCP4 " + b"1" * (V1_MAX - 12)) is NEED_MORE
    with pytest.raises(ProxyError):
        parse(b"PROXY TCP4 " + b"1" * V1_MAX)


def test_unknown_and_local_use_the_connections_own_address() -> None:
    assert parse(b"PROXY UNKNOWN\r\nrest") == ProxyHeader(15, None, 1)
    assert parse(b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n").source is None
    local = encode_v2(None)
    assert parse(local + b"x") == ProxyHeader(len(local), None, 2)
    unix = V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2, "big") + bytes(216)
    assert parse(unix) == ProxyHeader(len(unix), None, 2)


@pytest.mark.parametrize("header", [
    V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12),  # version 1 in a v2 block
    V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),  # command 2
    V2_SIGNATURE + bytes([0x21, 0x11, 0, 11]) + bytes(11),  # too short for IPv4 addresses
    V2_SIGNATURE + bytes([0x21, 0x21, 0, 35]) + bytes(35),  # too short for IPv6 addresses
    V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]),  # too long
])
def test_broken_v2_headers_are_errors(header) -> None:
    with pytest.raises(ProxyError):
        parse(header)


def test_ipv4_through_ipv6_is_the_ipv4_address() -> None:
    assert normal_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert parse(b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5 6\r\n").source == ("10.1.2.3", 5)
    assert normal_ip("2001:DB8::1") == "2001:db8::1"
    assert normal_ip("not an address") == "not an address"


def test_trusted_proxies_match_addresses_and_blocks_of_both_families() -> None:
    trusted = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])
    assert trusted.trusted("127.0.0.1") and trusted.trusted("10.200.3.4")
    assert trusted.trusted("::ffff:10.1.1.1") and trusted.trusted("fd12::5")
    assert not trusted.trusted("127.0.0.2") and not trusted.trusted("::1")
    assert not trusted.trusted("junk") and not TrustedProxies()
    assert not TrustedProxies().trusted("127.0.0.1")
