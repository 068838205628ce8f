"""The interactive client's windows without a terminal: where events land, the act list,
presence hiding, the scrollback bound, day lines, history pages, and line wrapping."""

from __future__ import annotations

import time
from typing import Any, Dict, List

from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.client.render import plain, render
from selchat.client.screen import complete_nick, wrap
from selchat.client.session import STATUS, ClientSession, Item
from selchat.client.windows import LEVEL_EVENT, LEVEL_MENTION, LEVEL_TALK, SCROLLBACK, Window, Windows, newest_first

DAY = 86_400.0
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def setup(nick: str = "alice") -> tuple:
    """A session welcomed into #lobby and #dev, and its windows as the screen keeps them."""
    s = ClientSession(nick=nick, clock=lambda: T0)
    w = Windows()
    feed(s, w, {"type": "welcome", "nick": nick, "server": "t", "motd": "", "limits": {}, "ref": s.hello(nick)["ref"]})
    feed(s, w, {"type": "join", "room": "#lobby", "nick": nick})
    feed(s, w, {"type": "names", "room": "#lobby", "nicks": [nick, "bob", "carol"], "more": False})
    feed(s, w, {"type": "history", "room": "#lobby", "messages": [], "more": False})
    req = s.parse_line("/join #dev").request  # type: ignore[union-attr]
    w.follow(s.focus)
    feed(s, w, {"type": "join", "room": "#dev", "nick": nick, "ref": req["ref"]})
    feed(s, w, {"type": "names", "room": "#dev", "nicks": [nick, "bob"], "operators": [nick], "more": False, "ref": req["ref"]})
    return s, w


def feed(s: ClientSession, w: Windows, event: Dict[str, Any]) -> bool:
    bell = w.add_all(s.handle_event(event).items)
    w.follow(s.focus)
    return bell


def texts(window: Window) -> List[str]:
    return [plain(render(i, time.gmtime, windowed=True)) for i in window.lines(time.gmtime)]


def msg(mid: int, room: str = "#lobby", sender: str = "bob", text: str = "hi", ts: float = T0) -> Dict[str, Any]:
    return {"type": "message", "id": mid, "ts": int(ts * 1000), "from": sender, "room": room, "text": text}


def test_windows_are_status_then_rooms_in_join_order() -> None:
    s, w = setup()
    assert [x.name for x in w.windows] == ["status", "#lobby", "#dev"]
    assert w.current == 2 and s.focus == "#dev"
    assert any("welcome" in t for t in texts(w.windows[0]))


def test_messages_go_to_their_room_and_make_activity_elsewhere() -> None:
    s, w = setup()
    feed(s, w, msg(1, "#lobby", text="anyone?"))
    assert texts(w.windows[1])[-1] == "22:13 <bob> anyone?"
    assert w.windows[2].items[-1].kind == "names"  # nothing of #lobby in #dev
    assert w.act_list() == [(2, LEVEL_TALK)]
    w.switch(1)
    assert w.act_list() == []


def test_a_mention_is_its_own_level_and_rings_once() -> None:
    s, w = setup()
    assert feed(s, w, msg(1, "#lobby", text="ALICE: look")) is True
    assert feed(s, w, msg(2, "#lobby", text="malice aforethought")) is False  # not as a word
    assert feed(s, w, msg(3, "#lobby", sender="alice", text="alice here")) is False  # our own
    assert w.act_list() == [(2, LEVEL_MENTION)]
    assert w.windows[1].items[-3].mention


def test_a_private_message_opens_a_conversation_window() -> None:
    s, w = setup()
    assert feed(s, w, {"type": "message", "id": 5, "ts": 1, "from": "Bob", "to": "alice", "text": "psst"})
    assert [x.name for x in w.windows] == ["status", "#lobby", "#dev", "Bob"]
    assert w.act_list() == [(4, LEVEL_MENTION)]
    assert w.current == 2  # it does not take the focus
    # our answer (the server's echo) goes to the same window, whatever the case
    feed(s, w, {"type": "message", "id": 6, "ts": 2, "from": "alice", "to": "bob", "text": "yes?"})
    assert len(w.windows) == 4 and w.windows[3].items[-1].data["text"] == "yes?"


def test_query_switches_and_lines_go_to_the_person() -> None:
    s, w = setup()
    s.parse_line("/query carol")
    w.follow(s.focus)
    assert w.active.name == "carol"
    req = s.parse_line("hello there").request  # type: ignore[union-attr]
    assert req["type"] == "msg" and req["to"] == "carol"
    req = s.parse_line("/me waves").request  # type: ignore[union-attr]
    assert req == {"type": "msg", "to": "carol", "text": "waves", "action": True, "ref": req["ref"]}


def test_switching_by_number_and_round_the_ends() -> None:
    s, w = setup()
    w.step(1)
    assert w.current == 0
    w.step(-1)
    assert w.current == 2
    assert w.switch(1) and not w.switch(7)


def test_presence_only_in_its_room_and_a_room_can_hide_it() -> None:
    s, w = setup()
    feed(s, w, {"type": "join", "room": "#lobby", "nick": "dave"})
    feed(s, w, {"type": "quit", "nick": "bob", "reason": "bye"})
    assert any("dave joined" in t for t in texts(w.windows[1]))
    assert not any("dave" in t for t in texts(w.windows[2]))
    # bob was in both rooms: his quit is in both, and nowhere else
    assert any("bob quit" in t for t in texts(w.windows[1])) and any("bob quit" in t for t in texts(w.windows[2]))
    assert not any("bob quit" in t for t in texts(w.windows[0]))
    assert w.act_list() == []  # presence is not activity
    w.windows[1].hide_presence = True
    assert not any("joined" in t or "quit" in t for t in texts(w.windows[1]) if "dave" in t or "bob" in t)


def test_leaving_a_room_closes_its_window() -> None:
    s, w = setup()
    req = s.parse_line("/part").request  # type: ignore[union-attr]
    w.follow(s.focus)
    feed(s, w, {"type": "part", "room": "#dev", "nick": "alice", "ref": req["ref"]})
    assert [x.name for x in w.windows] == ["status", "#lobby"] and w.active.name == "#lobby"


def test_being_kicked_keeps_the_window_and_says_why() -> None:
    s, w = setup()
    feed(s, w, {"type": "kick", "room": "#dev", "nick": "alice", "by": "bob", "reason": "spam"})
    assert w.active.name == "#dev" and "#dev" not in s.rooms
    assert texts(w.active)[-1] == "22:13 #dev * you were kicked by bob: spam"


def test_scrollback_is_bounded_per_window() -> None:
    s, w = setup()
    for i in range(SCROLLBACK + 50):
        feed(s, w, msg(10 + i, "#lobby", text=f"m{i}"))
    lobby = w.windows[1]
    assert len(lobby.items) == SCROLLBACK and lobby.dropped > 0
    assert lobby.items[-1].data["text"] == f"m{SCROLLBACK + 49}"


def test_a_day_line_where_the_date_changes() -> None:
    s, w = setup()
    feed(s, w, msg(1, "#lobby", text="late", ts=T0))
    feed(s, w, msg(2, "#lobby", text="early", ts=T0 + DAY))
    lines = texts(w.windows[1])
    i = lines.index("--- Wednesday 15 November 2023 ---")
    assert lines[i - 1].endswith("late") and lines[i + 1].endswith("early")
    # and above the first line, when that is not today
    first = w.windows[1].lines(time.gmtime, today=T0 + 3 * DAY)
    assert first[0].kind == "day"


def test_an_older_history_page_goes_above_what_is_shown() -> None:
    s, w = setup()
    feed(s, w, {"type": "history", "room": "#dev", "messages": [msg(50, "#dev", text="fifty")], "more": True})
    feed(s, w, msg(60, "#dev", text="live"))
    req = s.parse_line("/history").request  # type: ignore[union-attr]
    assert req["before"] == 50
    feed(s, w, {"type": "history", "room": "#dev", "messages": [msg(40, "#dev", text="forty")], "more": False, "ref": req["ref"]})
    said = [i.data.get("text") for i in w.active.items if i.kind == "message"]
    assert said == ["forty", "fifty", "live"]
    action = s.parse_line("/history")
    assert "all 3 messages of #dev are shown" in action.items[0].data["text"]  # type: ignore[union-attr]


def test_messages_while_away_get_their_conversation_window() -> None:
    s, w = setup()
    bell = feed(s, w, {"type": "history", "with": "bob", "more": False, "messages": [
        {"type": "message", "id": 7, "ts": 1000, "from": "bob", "to": "alice", "text": "you there?"},
        {"type": "message", "id": 8, "ts": 2000, "from": "bob", "to": "alice", "text": "ping me"},
    ]})
    assert bell
    bob = w.windows[w.find("bob")]  # type: ignore[index]
    lines = texts(bob)
    assert "2 messages from your conversation with bob while you were away" in lines[-3]
    assert lines[-1].endswith("<bob> ping me")
    assert (w.find("bob") or 0) + 1 in [n for n, level in w.act_list() if level == LEVEL_MENTION]


def test_a_conversation_window_follows_a_nick_change() -> None:
    s, w = setup()
    feed(s, w, {"type": "message", "id": 5, "ts": 1, "from": "bob", "to": "alice", "text": "psst"})
    feed(s, w, {"type": "nick", "old": "bob", "new": "robert"})
    assert w.find("robert") == 3 and w.find("bob") is None


def test_topic_events_count_as_activity_of_the_event_level() -> None:
    s, w = setup()
    feed(s, w, {"type": "topic", "room": "#lobby", "text": "hello", "by": "bob", "ts": 1})
    assert w.act_list() == [(2, LEVEL_EVENT)]
    assert "bob set the topic: hello" in texts(w.windows[1])[-1]


def test_the_status_window_cannot_be_closed() -> None:
    s, w = setup()
    w.switch(0)
    assert w.close() is None and len(w.windows) == 3


def test_wrap_cuts_rows_at_the_width_and_keeps_styles() -> None:
    rows = wrap([("a", "hello "), ("b", "world\nnext")], 8)
    assert rows == [[("a", "hello "), ("b", "wo")], [("b", "rld")], [("b", "next")]]
    assert wrap([("", "日本語")], 4) == [[("", "日本")], [("", "語")]]  # wide characters


@settings(max_examples=200, deadline=None)
@given(
    # what reaches wrap is rendered, so escaped: no control character but the line break
    st.lists(st.tuples(st.sampled_from(["", "bold"]), st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.just("\n"), max_size=30)), max_size=5),
    st.integers(1, 40),
)
def test_wrapped_rows_fit_and_keep_every_character(fragments: List[Any], width: int) -> None:
    from prompt_toolkit.utils import get_cwidth

    rows = wrap(fragments, width)
    for row in rows:
        cells = sum(get_cwidth(c) for _, t in row for c in t)
        assert cells <= width or len("".join(t for _, t in row)) == 1
    assert "".join(t for row in rows for _, t in row) == "".join(t for _, t in fragments).replace("\n", "")
    assert len(rows) >= 1 + sum(t.count("\n") for _, t in fragments)


def test_status_key_is_not_a_room_or_nick() -> None:
    assert Windows().windows[0].key == STATUS and Item("x", 0).targets == ()


def test_tab_completes_a_nick_as_irssi_does() -> None:
    nicks = ["bob", "Bobby", "carol"]
    assert complete_nick("bo", 2, nicks) == ("bob: ", 5)
    assert complete_nick("hi CA", 5, nicks) == ("hi carol ", 9)
    assert complete_nick("hi ca and more", 5, nicks) == ("hi carol  and more", 9)
    assert complete_nick("zz", 2, nicks) is None
    assert complete_nick("/jo", 3, nicks) is None
    assert complete_nick("", 0, nicks) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=4e9), max_size=30), st.floats(min_value=0, max_value=4e9))
def test_the_screen_reads_the_same_lines_from_the_bottom_up(stamps: List[float], today: float) -> None:
    """newest_first (what the screen draws, computed only as far as needed) is lines() reversed."""
    window = Window("#x")
    for at in sorted(stamps):
        window.add(Item("info", at, {"text": "x"}))
    forward = [(i.kind, i.at) for i in window.lines(time.gmtime, today=today)]
    backward = [(i.kind, i.at) for i in newest_first(window, time.gmtime, today=today)]
    assert backward[::-1] == forward
