"""The request rules, checked without a socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selchat.core import events
from selchat.doors.framed.codec import decode
from selchat.doors.framed.protocol import (
    ChangeNick,
    Hello,
    HistoryRequest,
    Msg,
    Parser,
    PingRequest,
    ProtocolError,
    QuitRequest,
    Say,
    encode_event,
    text_problem,
    valid_nick,
    valid_room,
)

parser = Parser(max_text=10)


def refused(obj: dict, registered: bool = True) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parser.parse(obj, registered)
    return info.value


@pytest.mark.parametrize("nick", ["a", "A" * 32, "_x", "[]{}\\|^", "a-1", "Z9_"])
def test_good_nicks(nick: str) -> None:
    assert valid_nick(nick)


@pytest.mark.parametrize("nick", ["", "A" * 33, "1abc", "-abc", "a b", "é", "a.b", "a\n", "#x"])
def test_bad_nicks(nick: str) -> None:
    assert not valid_nick(nick)


@pytest.mark.parametrize("room", ["#a", "#" + "x" * 50, "#A-b_9", "#1"])
def test_good_rooms(room: str) -> None:
    assert valid_room(room)


@pytest.mark.parametrize("room", ["#", "lobby", "#" + "x" * 51, "#a b", "##a", "#é", "#a\n"])
def test_bad_rooms(room: str) -> None:
    assert not valid_room(room)


@pytest.mark.parametrize(
    "text,ok",
    [("hi", True), ("a\nb\tc", True), ("x" * 10, True), ("x" * 11, False), ("", False),
     (" \n\t", False), ("a\x1b[31m", False), ("a\x00", False), ("a\x7f", False), ("a\x9f", False),
     ("a\r", False), ("\u00a0ok", True), ("\U0001F600" * 10, True)],
)
def test_text_rules(text: str, ok: bool) -> None:
    assert (text_problem(text, 10) is None) is ok


def test_requests_parse_into_records() -> None:
    assert parser.parse({"type": "say", "room": "#a", "text": "hi", "ref": 3}) == (Say("#a", "hi"), 3)
    assert parser.parse({"type": "msg", "to": "bob", "text": "x"})[0] == Msg("bob", "x")
    assert parser.parse({"type": "nick", "nick": "n"})[0] == ChangeNick("n")
    assert parser.parse({"type": "ping", "token": "t"})[0] == PingRequest("t")
    assert parser.parse({"type": "quit"})[0] == QuitRequest(None)
    assert parser.parse({"type": "hello", "nick": "a", "client": "c\x1b"})[0] == Hello("a", "c?", None)
    assert parser.parse({"type": "history", "room": "#a"})[0] == HistoryRequest("#a", None, 50)
    assert parser.parse({"type": "say", "room": "#a", "text": "hi", "extra": [1]})[0] == Say("#a", "hi")


@pytest.mark.parametrize(
    "obj,code",
    [
        ({"type": "frobnicate", "ref": "r"}, "unknown_type"),
        ({"type": "say", "room": "#a"}, "bad_request"),
        ({"type": "say", "room": 5, "text": "x"}, "bad_request"),
        ({"type": "say", "room": "lobby", "text": "x"}, "bad_room"),
        ({"type": "say", "room": "#a", "text": "\x07"}, "bad_text"),
        ({"type": "hello", "nick": "9lives"}, "bad_nick"),
        ({"type": "hello"}, "bad_request"),
        ({"type": "join", "room": None}, "bad_request"),
        ({"type": "history", "room": "#a", "limit": 0}, "bad_request"),
        ({"type": "history", "room": "#a", "limit": 201}, "bad_request"),
        ({"type": "history", "room": "#a", "before": "1"}, "bad_request"),
        ({"type": "history", "room": "#a", "limit": True}, "bad_request"),
        ({"type": "say", "room": "#a", "text": "x", "ref": 1.5}, "bad_request"),
        ({"type": "say", "room": "#a", "text": "x", "ref": True}, "bad_request"),
        ({"type": "quit", "reason": ""}, "bad_text"),
    ],
)
def test_refusals(obj: dict, code: str) -> None:
    assert refused(obj).code == code


def test_refusals_carry_a_usable_ref_only() -> None:
    assert refused({"type": "say", "room": "x", "text": "t", "ref": "r1"}).ref == "r1"
    assert refused({"type": "nope", "ref": 7}).ref == 7
    assert refused({"type": "say", "text": "t", "ref": {"a": 1}}).ref is None


def test_only_hello_ping_pong_quit_before_registration() -> None:
    for kind in ("say", "msg", "join", "part", "nick", "who", "rooms", "history"):
        assert refused({"type": kind, "ref": 1}, registered=False).code == "not_registered"
    for obj in ({"type": "hello", "nick": "a"}, {"type": "ping"}, {"type": "pong"}, {"type": "quit"}):
        parser.parse(obj, registered=False)


def _names_frames(n: int, max_frame: int) -> list:
    nicks = tuple(f"user{i:05d}" for i in range(n))
    return [decode(f[4:]) for f in encode_event(events.Names("#r", nicks), "q", max_frame)]


def test_names_come_in_chunks_of_at_most_1000() -> None:
    frames = _names_frames(2500, 65536)
    assert [len(f["nicks"]) for f in frames] == [1000, 1000, 500]
    assert [f["more"] for f in frames] == [True, True, False]
    assert all(f["ref"] == "q" for f in frames)


@given(st.integers(0, 3000), st.integers(300, 70000))
def test_names_never_exceed_max_frame_and_lose_no_one(n: int, max_frame: int) -> None:
    frames = encode_event(events.Names("#r", tuple(f"u{i}" for i in range(n))), None, max_frame)
    assert all(len(f) - 4 <= max_frame for f in frames)
    objs = [decode(f[4:]) for f in frames]
    assert [nick for o in objs for nick in o["nicks"]] == [f"u{i}" for i in range(n)]
    assert [o["more"] for o in objs] == [True] * (len(objs) - 1) + [False]


def test_history_is_cut_to_fit_keeping_the_newest() -> None:
    msgs = tuple(events.Message(i, 0, "a", "x" * 1000, room="#r") for i in range(1, 101))
    (frame,) = encode_event(events.History("#r", msgs, False), None, 20000)
    obj = decode(frame[4:])
    assert len(frame) - 4 <= 20000
    assert obj["more"] is True
    ids = [m["id"] for m in obj["messages"]]
    assert ids == list(range(ids[0], 101)) and 5 < len(ids) < 100


def test_a_long_room_list_comes_in_several_events() -> None:
    rooms = tuple(events.RoomInfo(f"#room{i:05d}", 10000 - i) for i in range(5000))
    frames = encode_event(events.RoomList(rooms), 1, 4096)
    objs = [decode(f[4:]) for f in frames]
    assert all(len(f) - 4 <= 4096 for f in frames) and all(o["ref"] == 1 for o in objs)
    assert [o["more"] for o in objs] == [True] * (len(objs) - 1) + [False]
    assert [r["name"] for o in objs for r in o["rooms"]] == [r.name for r in rooms]
    (small,) = encode_event(events.RoomList(rooms[:3]), None, 4096)
    assert decode(small[4:])["more"] is False


@pytest.mark.parametrize("ref", ["r" * 1023, "\x01" * 200, 10 ** 1024, 2.0, [1], {"a": 1}, None])
def test_refs_that_could_not_be_echoed_safely_are_bad_requests(ref) -> None:
    error = refused({"type": "ping", "ref": ref})
    assert error.code == "bad_request" and error.ref is None


@pytest.mark.parametrize("ref", ["r" * 1022, "\x01" * 170, 1 << 64, -(1 << 70), 0, ""])
def test_refs_within_bounds_are_echoed(ref) -> None:
    assert parser.parse({"type": "ping", "ref": ref})[1] == ref


def test_ping_tokens_are_any_json_value() -> None:
    for token in ("t" * 5000, {"a": [1, None]}, 1.5, None):
        assert parser.parse({"type": "ping", "token": token})[0] == PingRequest(token)


def test_an_unknown_type_is_quoted_short() -> None:
    assert len(refused({"type": "x" * 60000}).message) < 100
