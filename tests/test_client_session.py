"""The client's sans-I/O core: typed lines to requests, events to display items, no sockets."""

from __future__ import annotations

import itertools
from typing import Any, Dict, List

from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.client.session import COMMANDS, ClientSession, Item, Local, Pacer, Reaction, Send, backoff_delays


def registered(nick: str = "alice") -> ClientSession:
    """A session that has been welcomed and has joined #lobby, as after a real hello."""
    s = ClientSession(clock=lambda: 1000.0)
    hello = s.hello(nick)
    s.handle_event({"type": "welcome", "nick": nick, "server": "t", "motd": "", "limits": {}, "ref": hello["ref"]})
    s.handle_event({"type": "join", "room": "#lobby", "nick": nick, "ref": hello["ref"]})
    return s


def sent(action: Any) -> Dict[str, Any]:
    assert isinstance(action, Send), action
    return action.request


def msg(mid: int, room: str = "#lobby", sender: str = "bob", text: str = "hi") -> Dict[str, Any]:
    return {"type": "message", "id": mid, "ts": 1_700_000_000_000 + mid, "from": sender, "room": room, "text": text}


def kinds(reaction: Reaction) -> List[str]:
    return [i.kind for i in reaction.items]


# ----- lines to requests --------------------------------------------------------------------


def test_plain_line_is_said_to_current_room_with_a_ref() -> None:
    s = registered()
    req = sent(s.parse_line("hello there\n"))
    assert req["type"] == "say" and req["room"] == "#lobby" and req["text"] == "hello there"
    assert isinstance(req["ref"], int)


def test_refs_are_unique() -> None:
    s = registered()
    refs = [sent(s.parse_line(f"line {i}"))["ref"] for i in range(50)]
    assert len(set(refs)) == 50


def test_blank_lines_do_nothing() -> None:
    s = registered()
    assert s.parse_line("") is None
    assert s.parse_line("   \n") is None


def test_double_slash_says_a_line_starting_with_slash() -> None:
    s = registered()
    assert sent(s.parse_line("//join is a command"))["text"] == "/join is a command"


def test_no_room_gives_a_local_hint() -> None:
    s = ClientSession()
    action = s.parse_line("hello")
    assert isinstance(action, Local) and action.items[0].kind == "hint"


def test_join_switches_at_once_and_takes_the_server_spelling() -> None:
    s = registered()
    req = sent(s.parse_line("/join #Dev"))
    assert req == {"type": "join", "room": "#Dev", "ref": req["ref"]}
    assert s.current_room == "#Dev"
    assert sent(s.parse_line("x"))["room"] == "#Dev"  # a script's next line already goes there
    s.handle_event({"type": "join", "room": "#dev", "nick": "alice", "ref": req["ref"]})
    assert s.current_room == "#dev"
    assert set(s.rooms.values()) == {"#lobby", "#dev"}


def test_join_adds_the_hash_people_forget() -> None:
    s = registered()
    assert sent(s.parse_line("/join dev"))["room"] == "#dev"


def test_refused_join_switches_back() -> None:
    s = registered()
    req = sent(s.parse_line("/join #no!"))
    r = s.handle_event({"type": "error", "code": "bad_room", "message": "bad", "ref": req["ref"]})
    assert kinds(r) == ["error"]
    assert s.current_room == "#lobby"


def test_part_current_room_falls_back_to_another() -> None:
    s = registered()
    s.parse_line("/join #dev")
    s.handle_event({"type": "join", "room": "#dev", "nick": "alice"})
    req = sent(s.parse_line("/part"))
    assert req["type"] == "part" and req["room"] == "#dev"
    assert s.current_room == "#lobby"
    s.handle_event({"type": "part", "room": "#dev", "nick": "alice", "ref": req["ref"]})
    assert s.current_room == "#lobby" and list(s.rooms.values()) == ["#lobby"]


def test_part_named_room() -> None:
    s = registered()
    assert sent(s.parse_line("/part #other"))["room"] == "#other"
    assert s.current_room == "#lobby"


def test_part_last_room_leaves_no_current_room() -> None:
    s = registered()
    s.parse_line("/part")
    assert s.current_room is None
    assert isinstance(s.parse_line("hello"), Local)


def test_msg_nick_who_rooms_quit() -> None:
    s = registered()
    req = sent(s.parse_line("/msg bob hello  there"))
    assert (req["type"], req["to"], req["text"]) == ("msg", "bob", "hello  there")
    req = sent(s.parse_line("/nick alice2"))
    assert (req["type"], req["nick"]) == ("nick", "alice2")
    req = sent(s.parse_line("/who"))
    assert (req["type"], req["room"]) == ("who", "#lobby")
    assert sent(s.parse_line("/who #dev"))["room"] == "#dev"
    assert sent(s.parse_line("/rooms"))["type"] == "rooms"
    action = s.parse_line("/quit gone fishing")
    assert isinstance(action, Send) and action.quit
    assert action.request["type"] == "quit" and action.request["reason"] == "gone fishing"
    bare = s.parse_line("/QUIT")
    assert isinstance(bare, Send) and bare.quit and "reason" not in bare.request


def test_me_says_an_action_in_the_current_room() -> None:
    s = registered()
    req = sent(s.parse_line("/me waves  at everyone"))
    assert (req["type"], req["room"], req["text"], req["action"]) == ("say", "#lobby", "waves  at everyone", True)
    for line in ["/me", "/me   "]:
        action = s.parse_line(line)
        assert isinstance(action, Local) and "usage: /me" in action.items[0].data["text"], line
    s.parse_line("/part")
    action = s.parse_line("/me waves")
    assert isinstance(action, Local) and "no room" in action.items[0].data["text"]


def test_usage_errors_are_local() -> None:
    s = registered()
    for line in ["/join", "/join #a key extra", "/msg bob", "/msg", "/nick", "/nick a b", "/history x", "/history 0"]:
        action = s.parse_line(line)
        assert isinstance(action, Local), line
        assert action.items[0].kind == "hint"


def test_unknown_command_is_never_sent() -> None:
    s = registered()
    action = s.parse_line("/frobnicate now")
    assert isinstance(action, Local)
    assert "/help" in action.items[0].data["text"]


def test_help_lists_every_command() -> None:
    s = registered()
    action = s.parse_line("/help")
    assert isinstance(action, Local)
    text = "\n".join(action.items[0].data["lines"])
    for cmd in ["/join", "/part", "/msg", "/me", "/nick", "/who", "/rooms", "/quit", "/help", "/history"]:
        assert cmd in text


def test_history_asks_before_the_oldest_message_seen() -> None:
    s = registered()
    req = sent(s.parse_line("/history"))
    assert req["type"] == "history" and req["room"] == "#lobby" and "before" not in req
    s.handle_event(msg(40))
    s.handle_event({"type": "history", "room": "#lobby", "messages": [msg(12), msg(17)], "more": True})
    s.handle_event(msg(5, room="#other"))
    req = sent(s.parse_line("/history 20"))
    assert req["before"] == 12 and req["limit"] == 20


def test_history_answer_shows_older_messages_marked_earlier() -> None:
    s = registered()
    s.handle_event(msg(10))
    req = sent(s.parse_line("/history"))
    r = s.handle_event({"type": "history", "room": "#lobby", "messages": [msg(3), msg(4)], "more": False, "ref": req["ref"]})
    assert kinds(r) == ["history", "message", "message", "info"]
    assert all(i.earlier for i in r.items[:3])
    # The server said that is the start: /history says so without asking again.
    action = s.parse_line("/history")
    assert isinstance(action, Local) and "all 3 messages of #lobby are shown" in action.items[0].data["text"]


def test_history_says_what_is_shown_when_an_answer_brings_nothing_new() -> None:
    s = registered()
    req = sent(s.parse_line("/history"))
    r = s.handle_event({"type": "history", "room": "#lobby", "messages": [], "more": False, "ref": req["ref"]})
    assert kinds(r) == ["info"] and "no earlier" in r.items[0].data["text"]
    s.handle_event(msg(10))
    s.handle_event(msg(11))
    s.conversations["#lobby"].complete = False  # as if the join's history had said more
    req = sent(s.parse_line("/history"))
    r = s.handle_event({"type": "history", "room": "#lobby", "messages": [msg(10)], "more": False, "ref": req["ref"]})
    assert kinds(r) == ["info"] and r.items[0].data["text"].startswith("all 2 messages of #lobby are shown")


# ----- events ---------------------------------------------------------------------------------


def test_server_ping_is_answered_with_its_token() -> None:
    s = registered()
    r = s.handle_event({"type": "ping", "token": "abc"})
    assert r.replies == [{"type": "pong", "token": "abc"}] and r.items == []
    assert s.handle_event({"type": "ping"}).replies == [{"type": "pong"}]


def test_our_own_pong_is_not_shown_but_others_are() -> None:
    s = registered()
    ping = s.ping()
    assert ping["type"] == "ping" and isinstance(ping["token"], str)
    assert s.handle_event({"type": "pong", "token": ping["token"], "ref": ping["ref"]}).items == []
    assert kinds(s.handle_event({"type": "pong", "token": "other"})) == ["pong"]


def test_ping_tokens_are_unique() -> None:
    s = registered()
    assert len({s.ping()["token"] for _ in range(100)}) == 100


def test_welcome_and_refusal() -> None:
    s = ClientSession()
    hello = s.hello("bob")
    r = s.handle_event({"type": "error", "code": "nick_taken", "message": "taken", "ref": hello["ref"]})
    assert r.refused is not None and r.refused["code"] == "nick_taken" and not r.welcome
    hello = s.hello("bob2")
    r = s.handle_event({"type": "welcome", "nick": "bob2", "ref": hello["ref"]})
    assert r.welcome and s.registered and s.nick == "bob2"


def test_other_errors_are_not_refusals() -> None:
    s = registered()
    req = sent(s.parse_line("/msg nobody hi"))
    r = s.handle_event({"type": "error", "code": "no_such_nick", "message": "no", "ref": req["ref"]})
    assert r.refused is None and kinds(r) == ["error"]


def test_own_nick_change_is_followed_case_insensitively() -> None:
    s = registered("Alice")
    s.handle_event({"type": "nick", "old": "alice", "new": "Alicia"})
    assert s.nick == "Alicia"
    s.handle_event({"type": "nick", "old": "bob", "new": "rob"})
    assert s.nick == "Alicia"


def test_names_chunks_are_shown_once_whole() -> None:
    s = registered()
    assert s.handle_event({"type": "names", "room": "#lobby", "nicks": ["a", "b"], "more": True}).items == []
    r = s.handle_event({"type": "names", "room": "#lobby", "nicks": ["c"], "more": False})
    assert kinds(r) == ["names"] and r.items[0].data["nicks"] == ["a", "b", "c"]


def test_a_message_is_shown_once() -> None:
    s = registered()
    assert kinds(s.handle_event(msg(7))) == ["message"]
    assert s.handle_event(msg(7)).items == []
    r = s.handle_event({"type": "history", "room": "#lobby", "messages": [msg(6), msg(7)], "more": False})
    assert kinds(r) == ["history", "message"] and r.items[1].data["id"] == 6
    assert r.items[0].data["count"] == 1
    r = s.handle_event({"type": "history", "room": "#lobby", "messages": [msg(6), msg(7)], "more": False})
    assert r.items == []  # nothing new: no header either


def test_message_time_is_the_server_timestamp() -> None:
    s = registered()
    item = s.handle_event(msg(1)).items[0]
    assert item.at == (1_700_000_000_000 + 1) / 1000.0


def test_unref_error_and_notice_become_the_close_reason() -> None:
    s = registered()
    s.handle_event({"type": "error", "code": "server_full", "message": "too many"})
    assert s.close_reason == "server_full: too many"
    s.handle_event({"type": "notice", "text": "server shutting down"})
    assert s.close_reason == "server shutting down"


def test_unknown_event_type_is_shown_not_dropped() -> None:
    s = registered()
    assert kinds(s.handle_event({"type": "futuristic", "x": 1})) == ["unknown"]


# ----- reconnect --------------------------------------------------------------------------


def welcome_again(s: ClientSession) -> Reaction:
    hello = s.hello(s.nick or "")
    return s.handle_event({"type": "welcome", "nick": hello["nick"], "ref": hello["ref"]})


def test_reconnect_rejoins_rooms_with_the_same_nick() -> None:
    s = registered()
    s.parse_line("/join #dev")
    s.handle_event({"type": "join", "room": "#dev", "nick": "alice"})
    s.handle_event(msg(9))
    s.connection_lost()
    assert not s.registered and s.current_room == "#dev"
    assert s.hello(s.nick or "")["nick"] == "alice"
    r = welcome_again(s)
    assert [(q["type"], q["room"]) for q in r.replies] == [("join", "#dev")]
    # the lobby history after the rejoin overlaps what was shown: only the new one appears
    r = s.handle_event({"type": "history", "room": "#lobby", "messages": [msg(9), msg(11)], "more": False})
    assert [i.data.get("id") for i in r.items if i.kind == "message"] == [11]


def test_reconnect_leaves_the_lobby_again_if_we_had_left_it() -> None:
    s = registered()
    s.parse_line("/join #dev")
    s.handle_event({"type": "join", "room": "#dev", "nick": "alice"})
    s.parse_line("/part #lobby")
    s.connection_lost()
    r = welcome_again(s)
    assert [(q["type"], q["room"]) for q in r.replies] == [("join", "#dev"), ("part", "#lobby")]


def test_failed_reconnect_attempts_keep_the_rooms_to_rejoin() -> None:
    s = registered()
    s.handle_event({"type": "join", "room": "#dev", "nick": "alice"})
    s.connection_lost()
    s.hello("alice")
    s.connection_lost()  # that attempt died before welcome
    r = welcome_again(s)
    assert [(q["type"], q["room"]) for q in r.replies] == [("join", "#dev")]


def test_first_welcome_sends_nothing_back() -> None:
    s = ClientSession()
    hello = s.hello("x")
    assert s.handle_event({"type": "welcome", "nick": "x", "ref": hello["ref"]}).replies == []


def test_backoff_doubles_to_thirty_seconds_with_jitter() -> None:
    top = list(itertools.islice(backoff_delays(rng=lambda: 1.0), 8))
    assert top == [1, 2, 4, 8, 16, 30, 30, 30]
    low = list(itertools.islice(backoff_delays(rng=lambda: 0.0), 3))
    assert low == [0.5, 1, 2]


def test_pacer_without_limits_never_waits() -> None:
    p = Pacer()
    assert all(p.reserve(0.0) == 0 for _ in range(1000))
    p.configure({"max_frame": 65536}, 0.0)  # an older server announces no rate
    assert p.reserve(0.0) == 0
    p.configure({"rate": "fast", "burst": 20}, 0.0)
    assert p.reserve(0.0) == 0


def test_pacer_stays_under_the_announced_rate() -> None:
    p = Pacer()
    p.configure({"rate": 10, "burst": 20}, 100.0)
    waits = [p.reserve(100.0) for _ in range(19)]
    assert waits == [0.0] * 19  # a burst, one short of the server's
    now = 100.0
    sent = []
    for _ in range(50):
        now += p.reserve(now)
        sent.append(now)
    # a server bucket (10/s, burst 20) fed these send times never refuses
    tokens, stamp = 20.0 - 19, 100.0
    for t in sent:
        tokens = min(20.0, tokens + (t - stamp) * 10)
        stamp = t
        assert tokens >= 1.0
        tokens -= 1.0
    assert sent[-1] - sent[0] < 50 / 9 + 0.01  # and not much slower than allowed


def test_pacer_refills_while_idle() -> None:
    p = Pacer()
    p.configure({"rate": 1, "burst": 3}, 0.0)
    assert [p.reserve(0.0) for _ in range(2)] == [0.0, 0.0]
    assert p.reserve(0.0) > 0
    assert p.reserve(1000.0) == 0.0


# ----- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
event_types = st.sampled_from(
    ["welcome", "message", "join", "part", "quit", "nick", "names", "rooms", "history", "pong", "ping", "notice", "error", "zzz",
     "account", "topic", "kick", "invite", "mode"]
)


@settings(max_examples=100, deadline=None)
@given(event_types, st.dictionaries(st.sampled_from(["room", "nick", "id", "ts", "from", "to", "text", "messages", "nicks", "more", "ref", "old", "new", "token", "code",
                                                    "with", "account", "by", "set", "operators", "voiced", "reason"]), json_values, max_size=8))
def test_any_event_is_handled_without_raising(kind: str, members: Dict[str, Any]) -> None:
    s = registered()
    r = s.handle_event({**members, "type": kind})
    assert all(isinstance(i, Item) for i in r.items)


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_any_line_parses_and_unknown_commands_are_never_sent(line: str) -> None:
    s = registered()
    action = s.parse_line(line)
    known = {"/" + name for name in COMMANDS}
    word = line.split(" ")[0].lower().rstrip("\r\n")
    if line.startswith("/") and not line.startswith("//") and word not in known:
        assert isinstance(action, Local)


def test_the_ids_remembered_are_bounded() -> None:
    from selchat.client import session as module

    s = registered()
    for mid in range(module.SEEN_MAX + 10):
        s._message_item({"type": "message", "id": mid, "ts": 1, "from": "b", "room": "#lobby", "text": "x"}, 0.0, False)
    assert len(s.seen_ids) == module.SEEN_MAX and 0 not in s.seen_ids and module.SEEN_MAX + 9 in s.seen_ids
