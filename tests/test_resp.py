"""selchat.links.resp without sockets: commands encode to RESP that a reader takes back, split
anywhere; replies come out in order, errors as values; what is not RESP is a protocol error."""

from __future__ import annotations

from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.links.resp import (
    ReplyError, ReplyReader, RespProtocolError, encode_command, encode_pipeline,
)

args_st = st.lists(
    st.one_of(st.binary(max_size=40), st.text(max_size=20), st.integers(-2**63, 2**63)),
    min_size=1, max_size=6,
)


def as_bytes(arg: Any) -> bytes:
    return arg if isinstance(arg, bytes) else str(arg).encode() if isinstance(arg, int) else arg.encode()


def read_all(data: bytes, cuts: List[int]) -> List[Any]:
    """Feed `data` cut at `cuts` (sorted offsets), collecting replies after every piece."""
    reader = ReplyReader()
    out: List[Any] = []
    start = 0
    for cut in [*cuts, len(data)]:
        reader.feed(data[start:cut])
        out.extend(reader.replies())
        start = cut
    return out


def encode_reply(value: Any) -> bytes:
    """A server's side of RESP2, for the tests only."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, ReplyError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)
    raise TypeError(value)


def test_command_bytes() -> None:
    assert encode_command("SET", b"k\r\n", 12) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"
    assert encode_command("ECHO", "é") == b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"
    assert encode_pipeline([["PING"], ["INCR", "n"]]) == encode_command("PING") + encode_command("INCR", "n")


@pytest.mark.parametrize("bad", [True, 1.5, None, ["x"]])
def test_bad_argument_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError):
        encode_command("SET", "k", bad)


def test_empty_command_refused() -> None:
    with pytest.raises(ValueError):
        encode_command()


@settings(max_examples=150, deadline=None)
@given(args_st)
def test_command_round_trips_split_at_every_byte(args: List[Any]) -> None:
    data = encode_command(*args)
    expected = [[as_bytes(a) for a in args]]
    for cut in range(len(data) + 1):
        assert read_all(data, [cut]) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(args_st, min_size=1, max_size=8), st.data())
def test_pipeline_is_one_object_read_back_in_order(commands: List[List[Any]], data: st.DataObject) -> None:
    blob = encode_pipeline(commands)
    assert isinstance(blob, bytes)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    assert read_all(blob, cuts) == [[as_bytes(a) for a in cmd] for cmd in commands]


reply_st = st.recursive(
    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.binary(max_size=30),
              st.from_regex(r"\A[A-Z]{2,8} [a-z ]{0,20}\Z").map(ReplyError)),
    lambda inner: st.lists(inner, max_size=4), max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, ReplyError):
        return isinstance(b, ReplyError) and str(a) == str(b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None)
@given(st.lists(reply_st, min_size=1, max_size=5))
def test_replies_in_order_errors_as_values_split_at_every_byte(replies: List[Any]) -> None:
    blob = b"".join(encode_reply(r) for r in replies)
    for cut in range(len(blob) + 1):
        got = read_all(blob, [cut])
        assert same(got, replies)


def test_error_inside_an_array_is_a_value() -> None:
    got = read_all(b"*2\r\n:1\r\n-NOSCRIPT no such script\r\n+OK\r\n", [])
    assert got[0][0] == 1 and isinstance(got[0][1], ReplyError)
    assert str(got[0][1]).startswith("NOSCRIPT") and got[1] == b"OK"


def test_garbage_is_a_protocol_error_and_the_reader_stays_dead() -> None:
    reader = ReplyReader()
    reader.feed(b"+OK\r\n?what\r\n")
    replies = reader.replies()
    assert next(replies) == b"OK"
    with pytest.raises(RespProtocolError):
        next(replies)
    assert reader.failed
    with pytest.raises(RespProtocolError):
        reader.feed(b"+OK\r\n")


def test_a_reply_past_the_cap_is_a_protocol_error() -> None:
    reader = ReplyReader(max_reply=1000)
    reader.feed(b"$5000\r\n" + b"x" * 600)
    assert list(reader.replies()) == []
    reader.feed(b"x" * 600)
    with pytest.raises(RespProtocolError):
        list(reader.replies())


def test_many_small_replies_never_count_as_one_big_one() -> None:
    reader = ReplyReader(max_reply=100)
    for _ in range(1000):  # each feed ends mid-reply, so the reader always holds something
        reader.feed(b":1\r\n:")
        reader.feed(b"2\r\n")
        assert list(reader.replies()) == [1, 2]
