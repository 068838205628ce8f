"""Rendering: formats, colours, and that nothing from the server reaches the terminal raw."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any, Dict

from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.client.render import PALETTE, escape, escape_json_line, nick_colour, plain, render
from selchat.client.session import Item

# 2023-11-14 22:13:20 UTC; rendered with gmtime so the test does not depend on the time zone.
T = 1_700_000_000.0


def show(kind: str, data: Dict[str, Any], earlier: bool = False) -> str:
    return plain(render(Item(kind, T, data, earlier), time.gmtime))


# Everything this module may never emit: C0 but \n, DEL, C1, separators, bidi controls.
FORBIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def test_room_message_line() -> None:
    line = show("message", {"type": "message", "id": 1, "from": "alice", "room": "#lobby", "text": "hi there"})
    assert line == "22:13 #lobby <alice> hi there"


def test_private_message_line() -> None:
    line = show("message", {"type": "message", "id": 1, "from": "alice", "to": "bob", "text": "psst"})
    assert line == "22:13 private <alice -> bob> psst"


def test_multi_line_text_is_indented_under_the_first_line() -> None:
    line = show("message", {"from": "al", "room": "#r", "text": "one\ntwo\n\tthree"})
    first, second, third = line.split("\n")
    assert first == "22:13 #r <al> one"
    assert second == " " * len("22:13 #r <al> ") + "two"
    assert third == " " * len("22:13 #r <al> ") + " " * 8 + "three"


def test_escape_shows_control_characters() -> None:
    assert escape("a\x1b[31mred") == "a\\x1b[31mred"
    assert escape("\x00\x07\x7f\x9b\r") == "\\x00\\x07\\x7f\\x9b\\x0d"
    assert escape("abc\u202edef") == "abc\\u202edef"
    assert escape("plain text, ünïcödé, emoji 🎉, a\\b") == "plain text, ünïcödé, emoji 🎉, a\\b"


def test_escape_everywhere_not_only_in_text() -> None:
    out = show("quit", {"nick": "ev\x1bil", "reason": "bye\x07"})
    assert "\x1b" not in out and "\x07" not in out
    assert "ev\\x1bil" in out and "bye\\x07" in out
    out = show("message", {"from": "a\x9b", "room": "#r\x1b]0;title\x07", "text": "t"})
    assert not FORBIDDEN.search(out)


def test_status_lines() -> None:
    assert show("join", {"room": "#dev", "nick": "bob"}) == "22:13 #dev * bob joined"
    assert show("part", {"room": "#dev", "nick": "bob"}) == "22:13 #dev * bob left"
    assert show("quit", {"nick": "bob", "reason": "bye"}) == "22:13 * bob quit (bye)"
    assert show("nick", {"old": "bob", "new": "rob"}) == "22:13 * bob is now rob"
    assert show("names", {"room": "#dev", "nicks": ["a", "b"]}) == "22:13 #dev * 2 here: a b"
    rooms = {"rooms": [{"name": "#a", "members": 2}, {"name": "#lobby", "members": 5}]}
    assert show("rooms", rooms) == "22:13 * 2 rooms: #a (2), #lobby (5)"
    assert show("error", {"code": "no_such_nick", "message": "no user"}) == "22:13 error no_such_nick: no user"
    assert show("notice", {"text": "going down"}) == "22:13 notice: going down"
    assert show("history", {"room": "#dev", "count": 3}, earlier=True) == "22:13 -- earlier messages in #dev --"


def test_earlier_messages_are_styled_differently() -> None:
    data = {"from": "a", "room": "#r", "text": "old"}
    live = render(Item("message", T, data), time.gmtime)
    old = render(Item("message", T, data, earlier=True), time.gmtime)
    assert plain(live) == plain(old)
    assert all("dim" in style for style, text in old if text.strip())
    assert not any("dim" in style for style, _ in live)


def test_nick_colour_is_stable_and_ignores_case() -> None:
    assert nick_colour("Alice") == nick_colour("alice") == nick_colour("ALICE")
    assert nick_colour("alice") in PALETTE
    assert len({nick_colour(f"user{i}") for i in range(200)}) == len(PALETTE)  # the palette is used


def test_nick_colour_is_the_same_in_another_process() -> None:
    """Python's hash() of str changes per process; ours must not."""
    code = "from selchat.client.render import nick_colour; print(nick_colour('alice'), nick_colour('Zed'))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed, "PATH": ""},
            cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent),
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{nick_colour('alice')} {nick_colour('Zed')}\n"}


def test_malformed_members_render_without_raising() -> None:
    assert show("message", {"from": None, "room": 5, "text": ["x"]}).startswith("22:13 5 <> ")
    assert show("names", {"room": "#r", "nicks": "not a list"}) == "22:13 #r * 0 here:"
    assert show("rooms", {"rooms": [1, {"name": None}]}).startswith("22:13 * 2 rooms:")
    assert show("unknown", {"type": "shiny\x1b", "x": 1}) == '22:13 * shiny\\x1b {"x": 1}'


def test_json_line_escape_keeps_the_same_json() -> None:
    raw = json.dumps({"type": "message", "text": "a\x7fb\x85c\u202e", "n": 1}, ensure_ascii=False)
    raw = raw.replace(", ", ",\n")  # JSON may carry raw newlines between tokens
    out = escape_json_line(raw)
    assert json.loads(out) == json.loads(raw)
    assert "\n" not in out and not FORBIDDEN.search(out)


json_scalars = st.none() | st.booleans() | st.integers() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=10,
)
kinds = st.sampled_from(
    ["message", "history", "join", "part", "quit", "nick", "names", "rooms", "welcome", "notice", "error", "pong", "help", "hint", "info", "unknown",
     "day", "topic", "kick", "invite", "mode", "account"]
)
members = st.dictionaries(
    st.sampled_from(["type", "from", "to", "room", "text", "nick", "reason", "old", "new", "nicks", "rooms", "motd", "server", "code", "message", "token", "lines", "count",
                     "by", "set", "bans", "account", "ts", "with", "away", "operators", "voiced", "_shown", "_me", "_ours", "_asked"]),
    json_values | st.lists(st.text(), max_size=5) | st.lists(st.fixed_dictionaries({"name": st.text(), "members": json_scalars}), max_size=3),
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(kinds, members, st.booleans(), st.floats(allow_nan=True, allow_infinity=True))
def test_rendered_output_never_carries_a_control_character(kind: str, data: Dict[str, Any], earlier: bool, at: float) -> None:
    """The only control character we emit is the newline between lines of one item, and each
    continuation line starts with indentation, so it cannot pose as a line of its own."""
    fragments = render(Item(kind, at, data, earlier))
    assert not FORBIDDEN.search(plain(render(Item(kind, at, data, earlier, mention=True), windowed=True)))
    assert all(isinstance(style, str) and isinstance(text, str) for style, text in fragments)
    out = plain(fragments)
    assert not FORBIDDEN.search(out)
    for continuation in out.split("\n")[1:]:
        assert continuation.startswith(" ")


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_message_text_survives_escaping_visibly(text: str) -> None:
    out = show("message", {"from": "a", "room": "#r", "text": text})
    assert not FORBIDDEN.search(out)
    # every printable character of the text is still there, in order
    printable = [c for c in text.replace("\t", "") if not FORBIDDEN.search(c) and c != "\n"]
    it = iter(out)
    assert all(c in it for c in printable)


def test_an_action_reads_as_irc_clients_show_it() -> None:
    room = show("message", {"type": "message", "id": 1, "from": "alice", "room": "#lobby", "text": "waves",
                            "action": True})
    assert room == "22:13 #lobby * alice waves"
    private = show("message", {"type": "message", "id": 2, "from": "alice", "to": "bob", "text": "nods",
                               "action": True})
    assert private == "22:13 private * alice -> bob nods"
    # only a real `true` makes an action: anything else is a plain message, as the server sends
    assert show("message", {"from": "al", "room": "#r", "text": "hi", "action": "yes"}) == "22:13 #r <al> hi"
    styles = [style for style, text in render(Item("message", T, {"from": "al", "room": "#r", "text": "waves",
                                                                    "action": True}), time.gmtime) if text == "waves"]
    assert styles == ["italic"]
