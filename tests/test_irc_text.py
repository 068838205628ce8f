"""selchat.doors.irc.text: formatting codes, CTCP ACTION, splitting texts to IRC's byte budget."""

from __future__ import annotations

from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.doors.irc.parser import LineDecoder, body_budget, format_line, parse_line
from selchat.doors.irc.text import ctcp_action, make_action, parse_ctcp, split_for_irc, strip_formatting

COMMON = settings(deadline=None)
CODE_CHARS = set("\x02\x03\x04\x0f\x11\x16\x1d\x1e\x1f")
ARG_CHARS = set("0123456789abcdefABCDEF,")  # what a colour code may swallow after it

any_text = st.text(st.characters(blacklist_categories=("Cs",)))
plain_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="".join(CODE_CHARS)))
digits2 = st.integers(0, 99).map(lambda n: "%02d" % n)
hex6 = st.text(st.sampled_from("0123456789abcdefABCDEF"), min_size=6, max_size=6)
# codes with all their arguments: nothing after them can be taken as more arguments
full_codes = st.one_of(
    st.sampled_from(sorted(CODE_CHARS - {"\x03", "\x04"})),
    st.builds(lambda f, b: "\x03" + f + "," + b, digits2, digits2),
    st.builds(lambda f, b: "\x04" + f + "," + b, hex6, hex6),
)
# shorter codes, each followed by a character that cannot be an argument
short_codes = st.one_of(
    st.just("\x03"),
    st.just("\x04"),
    st.integers(0, 99).map(lambda n: "\x03%d" % n),
    st.builds(lambda f, b: "\x03%d,%d" % (f, b), st.integers(0, 99), st.integers(0, 99)),
    hex6.map(lambda h: "\x04" + h),
).map(lambda code: code + "z")


@COMMON
@given(st.lists(st.tuples(plain_text, st.one_of(full_codes, short_codes)), max_size=10), plain_text)
def test_strip_formatting_removes_codes_and_keeps_the_text(parts: List[Tuple[str, str]], end: str) -> None:
    formatted = "".join(seg + code for seg, code in parts) + end
    expected = "".join(seg + ("z" if code.endswith("z") else "") for seg, code in parts) + end
    assert strip_formatting(formatted) == expected


@COMMON
@given(st.text(st.one_of(st.sampled_from(sorted(CODE_CHARS | ARG_CHARS)), st.characters(blacklist_categories=("Cs",)))))
def test_strip_formatting_leaves_no_code_and_only_eats_arguments(text: str) -> None:
    out = strip_formatting(text)
    assert not CODE_CHARS & set(out)
    kept = [c for c in text if c not in CODE_CHARS and c not in ARG_CHARS]
    assert [c for c in out if c not in ARG_CHARS] == kept


def test_strip_formatting_examples() -> None:
    assert strip_formatting("\x02bold\x02 \x1ditalic\x1d \x1funder\x1f \x1estrike\x1e") == "bold italic under strike"
    assert strip_formatting("\x0304red\x03 \x034,12on blue\x03 \x0399,x") == "red on blue ,x"
    assert strip_formatting("\x031234") == "34"  # two digits at most
    assert strip_formatting("\x04FF0000red\x04 \x04ff0000,00ff00x \x04abc") == "red x abc"
    assert strip_formatting("\x11mono\x11 \x16rev\x16 \x0freset") == "mono rev reset"
    assert strip_formatting("keep \x07 and \x01 and \t") == "keep \x07 and \x01 and \t"


# --------------------------------------------------------------------------- CTCP

no_ctcp = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x01"))


@COMMON
@given(no_ctcp)
def test_action_round_trips(text: str) -> None:
    wire = make_action(text)
    assert wire.startswith("\x01ACTION ") and wire.endswith("\x01")
    assert ctcp_action(wire) == text
    assert ctcp_action(wire[:-1]) == text  # closing \x01 optional


def test_ctcp_examples() -> None:
    assert ctcp_action("\x01ACTION waves\x01") == "waves"
    assert ctcp_action("\x01ACTION\x01") == ""
    assert ctcp_action("\x01ACTIONS x\x01") is None
    assert ctcp_action("\x01VERSION\x01") is None
    assert ctcp_action("just text") is None
    assert ctcp_action("") is None
    assert parse_ctcp("\x01VERSION\x01") == ("VERSION", "")
    assert parse_ctcp("\x01ping 123\x01") == ("PING", "123")
    assert parse_ctcp("\x01") is None
    assert parse_ctcp("hello") is None


# --------------------------------------------------------------------------- splitting

texts = st.text(
    st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from([" ", " ", "\n", "\r", "\t", "é", "€", "𝄞", "a"]),
    ),
    max_size=600,
)


@COMMON
@given(texts, st.integers(min_value=4, max_value=520))
def test_split_respects_the_budget_and_loses_only_spaces(text: str, budget: int) -> None:
    lines = split_for_irc(text, budget)
    for line in lines:
        assert line
        assert len(line.encode("utf-8")) <= budget
        assert "\n" not in line and "\r" not in line
    # only spaces at cut points and line breaks go: the other characters stay, in order
    assert "".join(lines).replace(" ", "") == "".join(c for c in text if c not in " \n\r")
    assert sum(line.count(" ") for line in lines) <= text.count(" ")


@COMMON
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=1),
       st.integers(min_value=4, max_value=520))
def test_a_line_that_fits_is_unchanged(line: str, budget: int) -> None:
    if len(line.encode("utf-8")) <= budget:
        assert split_for_irc(line, budget) == [line]


def test_split_examples() -> None:
    assert split_for_irc("one\n\ntwo\r\nthree\n", 100) == ["one", "two", "three"]
    assert split_for_irc("a\tb", 100) == ["a\tb"]
    assert split_for_irc("", 100) == []
    words = "word " * 30  # 150 bytes
    lines = split_for_irc(words.strip(), 50)
    assert all(len(x) <= 50 for x in lines) and all(not x.startswith(" ") for x in lines)
    assert " ".join(lines) == words.strip()  # cut at spaces, each space dropped once
    assert split_for_irc("x" * 10, 4) == ["xxxx", "xxxx", "xx"]  # no space: hard cut
    assert split_for_irc("€€€", 4) == ["€", "€", "€"]  # never inside a character
    assert split_for_irc("𝄞𝄞", 7) == ["𝄞", "𝄞"]
    with pytest.raises(ValueError):
        split_for_irc("abc", 3)


@COMMON
@given(texts.map(lambda t: t.replace("\0", "")), st.sampled_from(["alice", "a" * 32]), st.sampled_from(["#r", "#" + "r" * 50]))
def test_split_lines_make_privmsgs_within_512_bytes(text: str, nick: str, room: str) -> None:
    # native texts never hold NUL (docs/protocol.md, "Names and text", refuses control characters)
    source = nick + "!" + nick + "@selchat"
    budget = body_budget("PRIVMSG", room, source=source)
    dec = LineDecoder()
    for piece in split_for_irc(text, budget):
        wire = format_line("PRIVMSG", room, piece, source=source, trailing=True)
        assert len(wire) <= 512
        dec.feed(wire)
        (raw,) = list(dec)
        assert parse_line(raw).params == [room, piece]


@given(st.text(max_size=60))
def test_strip_formatting_is_the_full_rule_whatever_the_shortcut(text: str) -> None:
    """The shortcut for printable texts must give what the full rule gives, on any text."""
    from selchat.doors.irc.text import _FORMATTING
    assert strip_formatting(text) == _FORMATTING.sub("", text)
