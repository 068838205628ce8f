"""IRC's MODE strings (selchat.doors.irc.modes) and their writing back (wire.mode_text)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from selchat.doors.irc.modes import parse_modes
from selchat.doors.irc.wire import mode_text


def test_a_mixed_mode_string() -> None:
    got = parse_modes(["+mk-o+l", "sesame", "bob", "5"])
    assert got.changes == [("moderated", True), ("key", "sesame"), ("deop", ("bob",)), ("limit", 5)]
    assert not got.unknown and not got.invalid and not got.list_bans


def test_ban_list_unknown_letters_and_bad_arguments() -> None:
    assert parse_modes(["b"]).list_bans and parse_modes(["+b"]).list_bans
    got = parse_modes(["+zb-l+k", "$a:alice", "has space"])
    assert got.unknown == ["z"]
    assert got.changes == [("ban", ("account:alice",)), ("limit", None)]
    assert [i[0] for i in got.invalid] == ["k"]
    assert [i[0] for i in parse_modes(["+l", "0"]).invalid] == ["l"]
    assert parse_modes(["+o"]).changes == []  # a mode without its argument is left out
    assert parse_modes(["-n+n"]).changes == [("no_external", False), ("no_external", True)]


NICKS = st.text(alphabet="abcdefghij", min_size=1, max_size=8)
CHANGE = st.one_of(
    st.tuples(st.sampled_from(["moderated", "invite_only", "topic_locked", "secret", "no_external"]),
              st.booleans()),
    st.tuples(st.just("key"), st.one_of(st.none(), st.text(alphabet="abcxyz123", min_size=1, max_size=10))),
    st.tuples(st.just("limit"), st.one_of(st.none(), st.integers(1, 10_000))),
    st.tuples(st.sampled_from(["op", "deop", "voice", "devoice"]), NICKS.map(lambda n: (n,))),
    st.tuples(st.sampled_from(["ban", "unban"]), NICKS.map(lambda n: (n + "!*@*",))),
)


@given(st.lists(CHANGE, max_size=6))
def test_what_is_written_reads_back_the_same(changes: list) -> None:
    text = mode_text(changes)
    if not changes:
        assert text == ""
        return
    got = parse_modes(text.split(" "))
    expected = [("key", None) if name == "key" and value is None else (name, value)
                for name, value in changes]
    assert got.changes == expected and not got.unknown and not got.invalid


@given(st.lists(st.text(max_size=12), max_size=5))
def test_any_input_is_read_without_an_exception(params: list) -> None:
    got = parse_modes(params)
    names = {"moderated", "invite_only", "topic_locked", "secret", "no_external", "key", "limit",
             "op", "deop", "voice", "devoice", "ban", "unban"}
    assert all(name in names for name, _ in got.changes)
