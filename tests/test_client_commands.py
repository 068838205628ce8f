"""The 1.2 commands and events in the client, without a server: accounts (/register, /login,
/logout, /password, --account in hello), running rooms (/topic, /kick, /ban, /invite, /mode,
/op, /voice, /kill), and how their events read (docs/client.md, "Accounts", "Running a room")."""

from __future__ import annotations

import time
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.client.modes import describe_modes, describe_set, parse_mode
from selchat.client.render import plain, render
from selchat.client.security import redact
from selchat.client.session import Ask, ClientSession, Item, Local, Send

T = 1_700_000_000.0


def registered(nick: str = "alice") -> ClientSession:
    s = ClientSession(clock=lambda: T)
    hello = s.hello(nick)
    s.handle_event({"type": "welcome", "nick": nick, "server": "t", "motd": "", "limits": {}, "ref": hello["ref"]})
    s.handle_event({"type": "join", "room": "#lobby", "nick": nick, "ref": hello["ref"]})
    s.handle_event({"type": "names", "room": "#lobby", "nicks": [nick, "bob", "carol"], "operators": [nick],
                    "voiced": ["bob"], "more": False})
    s.handle_event({"type": "history", "room": "#lobby", "messages": [], "more": False})  # as a server sends
    return s


def sent(action: Any) -> Dict[str, Any]:
    assert isinstance(action, Send), action
    req = dict(action.request)
    req.pop("ref")
    return req


def show(item: Item) -> str:
    return plain(render(item, time.gmtime, windowed=True))


def answer(s: ClientSession, line: str, *secrets: str) -> Any:
    """Type a line, then answer each question it asks."""
    action = s.parse_line(line)
    for secret in secrets:
        assert isinstance(action, Ask), action
        action = action.then(secret)
    return action


# ----- accounts ---------------------------------------------------------------------------------


def test_register_asks_twice_without_putting_the_password_on_the_line() -> None:
    s = registered()
    action = s.parse_line("/register")
    assert isinstance(action, Ask) and "alice" in action.prompt
    assert sent(answer(s, "/register", "correct horse", "correct horse")) == {"type": "register", "password": "correct horse"}
    differ = answer(s, "/register", "correct horse", "correct hose")
    assert isinstance(differ, Local) and "differ" in differ.items[0].data["text"]
    short = answer(s, "/register", "short")
    assert isinstance(short, Local) and "8 to 256 bytes" in short.items[0].data["text"]


def test_login_logout_password() -> None:
    s = registered()
    assert sent(answer(s, "/login alice", "sesame-sesame")) == {"type": "login", "account": "alice", "password": "sesame-sesame"}
    assert sent(s.parse_line("/login alice sesame-sesame")) == {"type": "login", "account": "alice", "password": "sesame-sesame"}
    assert sent(s.parse_line("/logout")) == {"type": "logout"}
    assert sent(answer(s, "/password", "old-password", "new-password", "new-password")) == {
        "type": "password", "old": "old-password", "new": "new-password"}
    assert sent(s.parse_line("/password old-password new-password"))["type"] == "password"


def test_a_login_answer_makes_us_logged_in_and_hello_carries_it_after_a_reconnect() -> None:
    s = registered()
    action = answer(s, "/login alice", "sesame-sesame")
    assert isinstance(action, Send)
    r = s.handle_event({"type": "account", "account": "alice", "nick": "alice", "ref": action.request["ref"]})
    assert s.account == "alice"
    assert show(r.items[0]) == "22:13 * you are logged in as alice"
    s.connection_lost()
    hello = s.hello("alice")
    assert hello["login"] == {"account": "alice", "password": "sesame-sesame"}
    assert redact(hello)["login"]["password"] == "***"


def test_register_answer_and_logout_answer_read_in_words() -> None:
    s = registered()
    action = answer(s, "/register", "correct horse", "correct horse")
    r = s.handle_event({"type": "account", "account": "alice", "nick": "alice", "ref": action.request["ref"]})
    assert "your nick is now the account alice" in show(r.items[0])
    r = s.handle_event({"type": "account", "account": None, "ref": sent and s.parse_line("/logout").request["ref"]})  # type: ignore[union-attr]
    assert s.account is None and show(r.items[0]).endswith("you are logged out")


def test_a_room_mate_logging_in() -> None:
    s = registered()
    r = s.handle_event({"type": "account", "nick": "bob", "account": "bob"})
    assert show(r.items[0]).endswith("* bob is logged in as bob") and r.items[0].targets == ("#lobby",)
    assert s.account is None


def test_welcome_with_an_account() -> None:
    s = ClientSession(clock=lambda: T)
    s.login = {"account": "alice", "password": "pw-pw-pw-pw"}
    hello = s.hello("alice")
    assert hello["login"]["account"] == "alice"
    s.handle_event({"type": "welcome", "nick": "alice", "account": "alice", "server": "t", "motd": "", "limits": {}, "ref": hello["ref"]})
    assert s.account == "alice"


def test_a_refused_login_at_hello_is_a_refusal() -> None:
    s = ClientSession(clock=lambda: T)
    s.login = {"account": "alice", "password": "wrong-wrong"}
    hello = s.hello("alice")
    r = s.handle_event({"type": "error", "code": "login_failed", "message": "no", "ref": hello["ref"]})
    assert r.refused is not None and r.refused["code"] == "login_failed"


def test_redact_hides_every_secret() -> None:
    assert redact({"type": "password", "old": "a", "new": "b"}) == {"type": "password", "old": "***", "new": "***"}
    assert redact({"type": "login", "account": "x", "password": "p"})["password"] == "***"
    assert redact({"type": "hello", "login": {"account": "x", "token": "t"}})["login"] == {"account": "x", "token": "***"}


# ----- running a room ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, request_",
    [
        ("/topic release on friday", {"type": "topic", "room": "#lobby", "text": "release on friday"}),
        ("/topic -clear", {"type": "topic", "room": "#lobby", "text": ""}),
        ("/topic #dev new topic", {"type": "topic", "room": "#dev", "text": "new topic"}),
        ("/kick bob", {"type": "kick", "room": "#lobby", "nick": "bob"}),
        ("/kick bob stop that now", {"type": "kick", "room": "#lobby", "nick": "bob", "reason": "stop that now"}),
        ("/ban account:troll", {"type": "mode", "room": "#lobby", "set": {"ban": ["account:troll"]}}),
        ("/unban *!*@10.0.0.*", {"type": "mode", "room": "#lobby", "set": {"unban": ["*!*@10.0.0.*"]}}),
        ("/invite carol", {"type": "invite", "room": "#lobby", "nick": "carol"}),
        ("/invite carol #dev", {"type": "invite", "room": "#dev", "nick": "carol"}),
        ("/op bob carol", {"type": "mode", "room": "#lobby", "set": {"op": ["bob", "carol"]}}),
        ("/deop bob", {"type": "mode", "room": "#lobby", "set": {"deop": ["bob"]}}),
        ("/voice bob", {"type": "mode", "room": "#lobby", "set": {"voice": ["bob"]}}),
        ("/devoice bob", {"type": "mode", "room": "#lobby", "set": {"devoice": ["bob"]}}),
        ("/mode", {"type": "mode", "room": "#lobby"}),
        ("/mode #dev +mi", {"type": "mode", "room": "#dev", "set": {"moderated": True, "invite_only": True}}),
        ("/mode +k-t sesame", {"type": "mode", "room": "#lobby", "set": {"key": "sesame", "topic_locked": False}}),
        ("/mode +l 10 -s", {"type": "mode", "room": "#lobby", "set": {"limit": 10, "secret": False}}),
        ("/mode -kl", {"type": "mode", "room": "#lobby", "set": {"key": None, "limit": None}}),
        ("/mode +ov bob carol", {"type": "mode", "room": "#lobby", "set": {"op": ["bob"], "voice": ["carol"]}}),
        ("/kill troll flooding", {"type": "kill", "nick": "troll", "reason": "flooding"}),
        ("/join #secret sesame", {"type": "join", "room": "#secret", "key": "sesame"}),
    ],
)
def test_commands_make_the_wire_requests(line: str, request_: Dict[str, Any]) -> None:
    assert sent(registered().parse_line(line)) == request_


@pytest.mark.parametrize("line", ["/kick", "/ban", "/op", "/mode +k", "/mode +l x", "/mode +z", "/mode m", "/kill", "/invite", "/login"])
def test_bad_uses_are_answered_locally(line: str) -> None:
    action = registered().parse_line(line)
    assert isinstance(action, Local) and action.items[0].kind == "hint", action


def test_topic_without_text_shows_the_topic_we_know() -> None:
    s = registered()
    action = s.parse_line("/topic")
    assert isinstance(action, Local) and "no topic" in action.items[0].data["text"]
    s.handle_event({"type": "topic", "room": "#lobby", "text": "be nice", "by": "bob", "ts": 1_700_000_000_000})
    action = s.parse_line("/topic")
    assert isinstance(action, Local)
    assert show(action.items[0]) == "22:13 #lobby * topic: be nice (set by bob, 14 Nov 2023 22:13)"


def test_the_topic_line_and_prefixes() -> None:
    s = registered()
    assert s.topic_line() == "#lobby (3 here), no topic"
    s.handle_event({"type": "topic", "room": "#lobby", "text": "be nice", "by": "alice", "ts": 1})
    assert s.topic_line() == "#lobby (3 here): be nice"
    assert (s.prefix("#lobby", "ALICE"), s.prefix("#lobby", "bob"), s.prefix("#lobby", "carol")) == ("@", "+", "")
    s.handle_event({"type": "mode", "room": "#lobby", "by": "alice", "set": {"op": ["carol"], "devoice": ["bob"]}})
    assert (s.prefix("#lobby", "carol"), s.prefix("#lobby", "bob")) == ("@", "")
    s.handle_event({"type": "nick", "old": "carol", "new": "caroline"})
    assert s.prefix("#lobby", "caroline") == "@"
    s.parse_line("/query bob")
    assert s.topic_line() == "private conversation with bob"


def test_names_show_operators_and_voiced() -> None:
    s = registered()
    req = s.parse_line("/who").request  # type: ignore[union-attr]
    r = s.handle_event({"type": "names", "room": "#lobby", "nicks": ["alice", "bob", "carol"], "operators": ["alice"],
                        "voiced": ["bob"], "more": False, "ref": req["ref"]})
    assert show(r.items[0]) == "22:13 #lobby * 3 here: @alice +bob carol"


def test_room_events_read_in_words() -> None:
    s = registered()
    cases = [
        ({"type": "topic", "room": "#lobby", "text": "new", "by": "bob", "ts": 1}, "#lobby * bob set the topic: new"),
        ({"type": "topic", "room": "#lobby", "text": "", "by": "bob", "ts": 1}, "#lobby * bob cleared the topic"),
        ({"type": "kick", "room": "#lobby", "nick": "carol", "by": "alice", "reason": "spam"}, "#lobby * carol was kicked by alice: spam"),
        ({"type": "kick", "room": "#lobby", "nick": "alice", "by": "bob", "reason": ""}, "#lobby * you were kicked by bob"),
        ({"type": "invite", "room": "#dev", "by": "bob"}, "bob invites you to #dev (/join #dev)"),
        ({"type": "invite", "room": "#dev", "nick": "alice", "by": "bob"}, "bob invites you to #dev (/join #dev)"),
        ({"type": "invite", "room": "#dev", "nick": "carol", "by": "alice"}, "#dev * carol was invited by alice"),
        ({"type": "mode", "room": "#lobby", "by": "alice", "set": {"moderated": True, "key": "k", "op": ["bob"], "ban": ["account:troll"]}},
         "#lobby * alice set moderated on, key set, op bob, ban account:troll"),
        ({"type": "mode", "room": "#lobby", "set": {"moderated": True, "key": "k", "limit": 5}, "bans": ["x!*@*"]},
         "#lobby * modes: moderated, key k, member limit 5; bans: x!*@*"),
        ({"type": "join", "room": "#lobby", "nick": "dave", "account": "dave"}, "#lobby * dave joined (logged in as dave)"),
    ]
    for event, expected in cases:
        r = s.handle_event(event)
        assert show(r.items[0]) == "22:13 " + expected, event


def test_private_history_is_asked_in_a_conversation_window() -> None:
    s = registered()
    s.parse_line("/query bob")
    assert sent(s.parse_line("/history 20")) == {"type": "history", "with": "bob", "limit": 20}
    req = s.parse_line("/history").request  # type: ignore[union-attr]
    r = s.handle_event({"type": "history", "with": "bob", "more": True, "ref": req["ref"], "messages": [
        {"type": "message", "id": 3, "ts": 1, "from": "bob", "to": "alice", "text": "old one"}]})
    assert [i.kind for i in r.items] == ["history", "message"]
    assert all(i.earlier and i.targets == ("bob",) for i in r.items)
    assert sent(s.parse_line("/history"))["before"] == 3


def test_script_mode_commands_never_send_a_half_asked_secret() -> None:
    s = registered()
    assert isinstance(s.parse_line("/register"), Ask)
    assert isinstance(s.parse_line("/login bob"), Ask)


# ----- modes both ways ----------------------------------------------------------------------------


def test_parse_mode_errors_say_what_is_missing() -> None:
    assert parse_mode(["+k"]) == "+k needs a key"
    assert parse_mode(["+o"]) == "+o needs a nick"
    assert parse_mode(["+b"]) == "+b needs a nick or a mask"
    assert "unknown mode letter 'z'" in str(parse_mode(["+z"]))
    assert parse_mode(["+l", "0"]) == "+l needs a number of members of at least 1"
    assert parse_mode([]) == {}


def test_describe() -> None:
    assert describe_set({"invite_only": False, "limit": None, "devoice": ["a", "b"]}) == ["invite-only off", "no member limit", "devoice a b"]
    assert describe_modes({}, []) == "no modes set; bans: none"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=6))
def test_parse_mode_never_raises(words: List[str]) -> None:
    out = parse_mode(words)
    assert isinstance(out, (dict, str))
    if isinstance(out, dict):
        assert all(isinstance(line, str) for line in describe_set(out))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["topic", "kick", "invite", "mode", "account"]),
       st.dictionaries(st.sampled_from(["room", "nick", "by", "text", "reason", "set", "bans", "account", "ts"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=3)
                       | st.dictionaries(st.text(max_size=6), st.text(max_size=4) | st.none(), max_size=3), max_size=6))
def test_any_new_event_is_shown_without_raising_or_a_control_character(kind: str, members: Dict[str, Any]) -> None:
    s = registered()
    r = s.handle_event({**members, "type": kind})
    for item in r.items:
        text = plain(render(item, time.gmtime, windowed=True)) + plain(render(item, time.gmtime))
        assert not any(ord(c) < 32 and c != "\n" for c in text)


def test_the_joiners_copy_of_a_topic_reads_as_the_topic_not_as_news() -> None:
    s = registered()
    req = s.parse_line("/join #dev").request  # type: ignore[union-attr]
    s.handle_event({"type": "join", "room": "#dev", "nick": "alice", "ref": req["ref"]})
    s.handle_event({"type": "names", "room": "#dev", "nicks": ["alice", "bob"], "operators": ["bob"], "more": False, "ref": req["ref"]})
    r = s.handle_event({"type": "topic", "room": "#dev", "text": "ship it", "by": "bob", "ts": 1_700_000_000_000})
    assert show(r.items[0]) == "22:13 #dev * topic: ship it (set by bob, 14 Nov 2023 22:13)"
    s.handle_event({"type": "history", "room": "#dev", "messages": [], "more": False})
    r = s.handle_event({"type": "topic", "room": "#dev", "text": "shipped", "by": "bob", "ts": 1_700_000_000_000})
    assert show(r.items[0]) == "22:13 #dev * bob set the topic: shipped"


@pytest.mark.parametrize("line, secrets, password", [
    ("/register", ("correct horse", "correct horse"), "correct horse"),
    ("/password", ("old-password", "new-password", "new-password"), "new-password"),
    ("/login alice", ("sesame-sesame",), "sesame-sesame"),
])
def test_a_reconnect_logs_in_with_the_password_that_last_worked(line: str, secrets: tuple, password: str) -> None:
    s = registered()
    action = answer(s, line, *secrets)
    assert isinstance(action, Send)
    s.handle_event({"type": "account", "account": "alice", "nick": "alice", "ref": action.request["ref"]})
    s.connection_lost()
    assert s.hello("alice")["login"] == {"account": "alice", "password": password}
