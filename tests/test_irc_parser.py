"""selchat.doors.irc.parser: line decoding with the 512-byte and tag limits, parsing, formatting."""

from __future__ import annotations

from typing import List, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selchat.doors.irc.numerics import Numeric
from selchat.doors.irc.parser import (
    MAX_BODY,
    MAX_TAGS,
    TOO_LONG,
    IrcParseError,
    Line,
    LineDecoder,
    TooLong,
    body_budget,
    escape_tag_value,
    format_line,
    parse_line,
    unescape_tag_value,
)

HARD = MAX_TAGS + MAX_BODY + 2  # what the decoder may hold of an unfinished line
Item = Union[bytes, TooLong]
COMMON = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def decode_all(chunks: List[bytes], drain_each: bool = True) -> List[Item]:
    dec = LineDecoder()
    out: List[Item] = []
    for chunk in chunks:
        dec.feed(chunk)
        if drain_each:
            out.extend(dec)
    out.extend(dec)
    return out


def tagged(section_len: int, body_len: int) -> bytes:
    """A line whose tag section ('@' .. space) has section_len bytes and whose rest has body_len."""
    assert section_len >= 5
    section = b"@k=" + b"v" * (section_len - 4) + b" "
    head = b"PRIVMSG #r :"
    body = head + b"x" * (body_len - len(head))
    assert len(section) == section_len and len(body) == body_len
    return section + body


def plain(body_len: int) -> bytes:
    head = b"PRIVMSG #r :"
    return head + b"y" * (body_len - len(head))


# Streams rich in the bytes that matter (line ends, '@', spaces, lines near the limits).
pieces = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"\r", b"\n", b"\r\n", b"@", b" ", b":", b"@a=b ", b"PING x", b"\xff\xfe",
         b"a" * 509, b"a" * 510, b"a" * 511, b"t" * 4095, b"t" * 4096, b"z" * 5000]
    ),
)
streams = st.lists(pieces, max_size=25).map(b"".join)


def split_at(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


# --------------------------------------------------------------------------- decoder


@COMMON
@given(streams, st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30), st.booleans())
def test_any_split_gives_the_same_items_as_one_feed(data: bytes, cuts: List[int], drain_each: bool) -> None:
    whole = decode_all([data])
    assert decode_all(split_at(data, cuts), drain_each=drain_each) == whole


@COMMON
@given(st.lists(st.one_of(st.binary(max_size=600), pieces), max_size=20))
def test_decoder_never_raises_and_items_are_well_formed(chunks: List[bytes]) -> None:
    dec = LineDecoder()
    for chunk in chunks:
        dec.feed(chunk)
        for item in dec:
            if item is TOO_LONG:
                continue
            assert isinstance(item, bytes) and item
            assert b"\n" not in item  # one CR before the LF is removed, a second one stays
            assert len(item) <= MAX_TAGS + MAX_BODY
        # drained: only the unfinished line is held, and never more than the hard bound
        assert dec.buffered <= HARD


@COMMON
@given(st.binary(max_size=700))
def test_parse_line_raises_only_its_own_error(raw: bytes) -> None:
    try:
        line = parse_line(raw)
    except IrcParseError:
        return
    assert line.command and line.command == line.command.upper()
    assert all(isinstance(p, str) for p in line.params)


@pytest.mark.parametrize("raw", [b"", b" ", b"   ", b"@a=b", b"@a=b ", b":src", b":src ", b": CMD",
                                 b"PRIV\x00MSG", b"PING a\rb", b"12 x", b"P1NG", b"@=x CMD", b"\xc3\xa9t\xc3\xa9"])
def test_garbage_is_a_parse_error(raw: bytes) -> None:
    with pytest.raises(IrcParseError):
        parse_line(raw)


def test_crlf_bare_lf_bare_cr_and_empty_lines() -> None:
    items = decode_all([b"PING a\r\nPING b\n\r\n\n\nPING c\r", b"\nPING d\r\r\nPING e"])
    assert items == [b"PING a", b"PING b", b"PING c", b"PING d\r"]
    with pytest.raises(IrcParseError):  # a CR inside a line is the parser's to refuse
        parse_line(items[-1])


def test_limit_without_tags_at_its_edge() -> None:
    ok, over = plain(MAX_BODY), plain(MAX_BODY + 1)
    assert decode_all([ok + b"\r\n"]) == [ok]  # 512 bytes with CRLF
    assert decode_all([ok + b"\n"]) == [ok]
    assert decode_all([over + b"\r\n", b"PING x\r\n"]) == [TOO_LONG, b"PING x"]
    assert decode_all([over + b"\n"]) == [TOO_LONG]
    assert parse_line(ok).params[1] == "y" * (MAX_BODY - len(b"PRIVMSG #r :"))


def test_limit_with_tags_at_its_edges() -> None:
    ok = tagged(MAX_TAGS, MAX_BODY)
    assert decode_all([ok + b"\r\n"]) == [ok]
    assert len(parse_line(ok).tags["k"]) == MAX_TAGS - 4
    assert decode_all([tagged(MAX_TAGS + 1, MAX_BODY) + b"\r\n"]) == [TOO_LONG]
    assert decode_all([tagged(MAX_TAGS, MAX_BODY + 1) + b"\r\n"]) == [TOO_LONG]
    assert decode_all([tagged(100, MAX_BODY) + b"\n", tagged(100, MAX_BODY + 1) + b"\n"]) == [
        tagged(100, MAX_BODY),
        TOO_LONG,
    ]
    # tags do not lend their unused room to the rest of the line
    assert decode_all([tagged(10, MAX_BODY + 1) + b"\n"]) == [TOO_LONG]
    # an '@' line with no space in the first 4096 bytes is over the limit
    assert decode_all([b"@" + b"a" * 4200 + b"\n"]) == [TOO_LONG]


def test_overlong_line_is_not_stored_and_the_next_line_is_served() -> None:
    dec = LineDecoder()
    dec.feed(b"PING before\r\n")
    for _ in range(1000):  # 1 MB without a line end, in 1 KB feeds
        dec.feed(b"w" * 1024)
        assert dec.buffered <= len(b"PING before\r\n") + HARD
    assert list(dec) == [b"PING before"]  # the overlong line is not finished yet
    dec.feed(b"www\r\nPING after\r\n")
    assert list(dec) == [TOO_LONG, b"PING after"]
    assert dec.buffered == 0


def test_one_huge_feed_is_cut_to_the_stub() -> None:
    dec = LineDecoder()
    dec.feed(b"PING a\n" + b"q" * 100_000)
    assert dec.buffered <= len(b"PING a\n") + HARD
    dec.feed(b"q\nPING b\n")
    assert list(dec) == [b"PING a", TOO_LONG, b"PING b"]


def test_stopping_iteration_early_loses_nothing() -> None:
    dec = LineDecoder()
    dec.feed(b"".join(b"PING %d\r\n" % i for i in range(50)))
    first = [next(dec) for _ in range(10)]
    dec.feed(b"PING 50\r\n")
    assert first + list(dec) == [b"PING %d" % i for i in range(51)]


# --------------------------------------------------------------------------- parse / format

tag_keys = st.from_regex(r"\A\+?(?:[a-z0-9][a-z0-9.-]{0,10}/)?[A-Za-z0-9-]{1,12}\Z")
no_crlf = st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)), max_size=40)
middle = st.text(
    st.characters(blacklist_characters="\r\n\0 ", blacklist_categories=("Cs",)), min_size=1, max_size=20
).filter(lambda s: not s.startswith(":"))
commands = st.one_of(
    st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz"), min_size=1, max_size=12),
    st.integers(min_value=0, max_value=999).map(lambda n: "%03d" % n),
)


@COMMON
@given(
    tags=st.dictionaries(tag_keys, st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30), max_size=5),
    source=st.one_of(st.none(), middle),
    command=commands,
    mids=st.lists(middle, max_size=6),
    last=st.one_of(st.none(), no_crlf),
    trailing=st.booleans(),
)
def test_format_then_parse_round_trips(tags, source, command, mids, last, trailing) -> None:
    params = mids + ([last] if last is not None else [])
    wire = format_line(command, *params, source=source, tags=tags or None, trailing=trailing)
    assert wire.endswith(b"\r\n") and wire.count(b"\n") == 1
    assert parse_line(wire[:-2]) == Line(tags, source, command.upper(), params)
    assert decode_all([wire]) == [wire[:-2]] or len(wire) - 2 > MAX_BODY


def test_trailing_colon_only_when_needed() -> None:
    assert format_line("PRIVMSG", "#r", "hi") == b"PRIVMSG #r hi\r\n"
    assert format_line("PRIVMSG", "#r", "hi there") == b"PRIVMSG #r :hi there\r\n"
    assert format_line("PRIVMSG", "#r", ":)") == b"PRIVMSG #r ::)\r\n"
    assert format_line("PRIVMSG", "#r", "") == b"PRIVMSG #r :\r\n"
    assert format_line("PRIVMSG", "#r", "hi", trailing=True) == b"PRIVMSG #r :hi\r\n"
    assert format_line("QUIT") == b"QUIT\r\n"
    assert format_line("JOIN", "#r", source="a!a@h") == b":a!a@h JOIN #r\r\n"
    assert format_line(Numeric.RPL_WELCOME, "bob", "Hi bob", source="srv") == b":srv 001 bob :Hi bob\r\n"
    assert format_line("PRIVMSG", "#r", "é") == "PRIVMSG #r é\r\n".encode()


def test_tags_are_written_escaped_and_bare_when_empty() -> None:
    wire = format_line("TAGMSG", "#r", tags={"msgid": "a;b c\\d\r\n", "+typing": ""})
    assert wire == b"@msgid=a\\:b\\sc\\\\d\\r\\n;+typing TAGMSG #r\r\n"
    assert parse_line(wire[:-2]).tags == {"msgid": "a;b c\\d\r\n", "+typing": ""}


def test_tag_parsing_details() -> None:
    line = parse_line(b"@a;b=;c=x\\y\\;d=\\ :src  CMD  p1   p2 :t r")
    assert line.tags == {"a": "", "b": "", "c": "xy", "d": ""}
    assert (line.source, line.command, line.params) == ("src", "CMD", ["p1", "p2", "t r"])
    assert parse_line(b"@a=1;a=2 CMD").tags == {"a": "2"}
    assert parse_line(b"cmd").command == "CMD"


def test_non_utf8_falls_back_to_latin1() -> None:
    line = parse_line(b"NICK caf\xe9")
    assert line.params == ["caf\xe9"]
    assert parse_line("NICK café".encode()).params == ["café"]


@pytest.mark.parametrize(
    "params",
    [("#r", "a\r\nQUIT"), ("#r\n", "x"), ("#r x", "y"), (":r", "y"), ("", "y"), ("a\0",)],
)
def test_format_refuses_what_cannot_be_a_line(params) -> None:
    with pytest.raises(ValueError):
        format_line("PRIVMSG", *params)


@COMMON
@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_tag_value_escaping_round_trips(value: str) -> None:
    escaped = escape_tag_value(value)
    assert not set(escaped) & {";", " ", "\r", "\n"}
    assert unescape_tag_value(escaped) == value


def test_unescape_lenient_cases() -> None:
    assert unescape_tag_value("a\\b") == "ab"  # unknown escape: the character itself
    assert unescape_tag_value("end\\") == "end"  # lone trailing backslash dropped
    assert unescape_tag_value("\\s\\:\\\\\\r\\n") == " ;\\\r\n"


@COMMON
@given(source=middle, command=commands, target=middle)
def test_body_budget_fills_a_line_to_exactly_512(source, command, target) -> None:
    budget = body_budget(command, target, source=source)
    if budget < 1:
        return
    wire = format_line(command, target, "x" * budget, source=source, trailing=True)
    assert len(wire) == 512
    assert decode_all([wire]) == [wire[:-2]]


def test_longest_valid_line_survives_byte_by_byte_feeding() -> None:
    ok = tagged(MAX_TAGS, MAX_BODY)
    over = tagged(MAX_TAGS, MAX_BODY + 1)
    data = ok + b"\r\n" + over + b"\r\n" + ok + b"\n"
    assert decode_all([data[i : i + 1] for i in range(len(data))]) == [ok, TOO_LONG, ok]
