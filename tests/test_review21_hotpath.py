"""The shortcuts of the message path (issue 19) say exactly what the general path says.

* a room message's frame is written by template (`message_frame`): the same bytes as encoding
  its object, for every message, and the same refusal for text that cannot be UTF-8;
* a request is parsed by the JSON scanner directly when it is one object and nothing else:
  the same objects and the same refusals as the full decoder, for any text;
* a member's message goes into the room batch without the generic deliveries: the sender,
  its other connection and another member get what they got before.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.core.events import Message
from selchat.doors.framed import codec
from selchat.doors.framed.protocol import encode_event, message_frame, message_object

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import unique_nick  # noqa: E402
from test_accounts import PASSWORD, SLOW, registered_account, welcomed  # noqa: E402

texts = st.text(min_size=0, max_size=40)
ints = st.integers(min_value=0, max_value=2 ** 53)


@st.composite
def messages(draw: Any) -> Message:
    in_room = draw(st.booleans())
    return Message(draw(ints), draw(ints), draw(texts), draw(texts),
                   draw(texts) if in_room else None,
                   None if in_room else draw(st.one_of(st.none(), texts)),
                   draw(st.booleans()), draw(st.booleans()), draw(texts), (),
                   draw(st.one_of(st.none(), texts)))


def _general(msg: Message, ref: Any = None) -> Any:
    try:
        return encode_event(msg, ref, 1 << 20)[0]
    except codec.EncodeError:
        return "refused"


def _template(msg: Message, ref: Any = None) -> Any:
    try:
        return message_frame(msg, 1 << 20, ref)
    except codec.EncodeError:
        return "refused"


refs = st.one_of(st.none(), texts, st.integers(min_value=-2 ** 70, max_value=2 ** 70))


@settings(max_examples=400, deadline=None)
@given(messages(), refs)
def test_message_frame_is_the_encoded_event(msg: Message, ref: Any) -> None:
    assert _template(msg, ref) == _general(msg, ref)
    if ref is None:
        assert _template(msg) == codec.encode(message_object(msg), 1 << 20)


def test_message_frame_refuses_what_encode_refuses() -> None:
    lone = Message(1, 2, "a", "bad \ud800 text", "#r")
    assert _template(lone) == _general(lone) == "refused"
    big = Message(1, 2, "a", "x" * 200, "#r")
    with pytest.raises(codec.EncodeError):
        message_frame(big, 64)


def _reference_decode(payload: bytes) -> Any:
    """What `decode` said before the scanner shortcut: the full decoder, then the same checks."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return "refused"
    try:
        obj = json.JSONDecoder(parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name))).decode(text)
    except (ValueError, RecursionError):
        return "refused"
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return "refused"
    return obj


def _decode(payload: bytes) -> Any:
    try:
        obj = codec.decode(payload)
    except codec.PayloadError:
        return "refused"
    return obj


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(texts, json_values, max_size=4), st.sampled_from(["", " ", "\n", " x", "{}", "]"]),
       st.sampled_from(["", " ", "\t"]), st.booleans())
def test_decode_matches_the_full_decoder(obj: Any, tail: str, head: str, typed: bool) -> None:
    if typed:
        obj = dict(obj, type="say")
    payload = (head + json.dumps(obj) + tail).encode()
    assert _decode(payload) == _reference_decode(payload)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=40))
def test_decode_of_any_bytes_matches_the_full_decoder(payload: bytes) -> None:
    payload = b"{" + payload
    assert _decode(payload) == _reference_decode(payload)


@pytest.mark.parametrize("payload", [b'{"type":"say","x":NaN}', b'{"type":"say","x":Infinity}',
                                     b'{"type":"say"}{"type":"say"}', b'{"type":"say"', b"{",
                                     b'{"type":1}', b'{"type":"a","t":"\\ud800"}'])
def test_decode_refuses_what_it_refused(payload: bytes) -> None:
    assert _decode(payload) == "refused"


def test_a_members_message_reaches_its_other_connection_and_the_room(start_server: Any) -> None:
    """The sender's copy carries its ref; its other connection and another member get the
    common copy, without it; nobody gets one twice."""
    srv = start_server("--rate", "0", "--max-per-ip", "0", "--register-rate", "0")
    nick = unique_nick("two")
    registered_account(srv, nick).quit_and_close()
    phone, laptop = srv.client(), srv.client()
    for c in (phone, laptop):
        c.send(type="hello", nick=nick, login={"account": nick, "password": PASSWORD})
        welcomed(c)
    friend = srv.registered(unique_nick("fr"))
    for i in range(3):
        phone.send(type="say", room="#lobby", text=f"from the phone {i}", ref=f"r{i}")
    for i in range(3):
        mine = phone.wait_for("message", SLOW, text=f"from the phone {i}")[0]
        assert mine["ref"] == f"r{i}" and mine["from"] == nick
        for other in (laptop, friend):
            got = other.wait_for("message", SLOW, text=f"from the phone {i}")[0]
            assert "ref" not in got and got["id"] == mine["id"]
    friend.send(type="ping", token="done")
    friend.wait_for("pong", SLOW, token="done")
    phone.send(type="ping", token="done")
    phone.wait_for("pong", SLOW, token="done")
    for c in (phone, laptop, friend):
        c.assert_quiet()


say_members = st.fixed_dictionaries({}, optional={
    "room": st.one_of(st.sampled_from(["#lobby", "#a-b_c", "lobby", "#", "#" + "r" * 60, "#x y"]),
                      json_values),
    "text": st.one_of(texts, st.sampled_from(["hi", " ", "\x07bell", "a\u202eb", "x" * 500]), json_values),
    "action": st.one_of(st.booleans(), json_values),
    "ref": st.one_of(st.none(), texts, st.integers(), st.booleans(), st.text(min_size=60, max_size=80),
                     json_values),
    "extra": json_values})


@settings(max_examples=40, deadline=None)
@given(say_members)
def test_quick_say_takes_exactly_what_parse_takes(members: Any) -> None:
    from selchat.core.requests import Say
    from selchat.doors.framed.protocol import Parser, ProtocolError
    parser = Parser(max_text=400, ref_max_bytes=64)
    obj = dict(members, type="say")
    quick = parser.quick_say(obj)
    try:
        request, ref = parser.parse(obj)
    except ProtocolError:
        assert quick is None
        return
    assert quick == (request.room, request.text, request.action, ref)
    assert request == Say(request.room, request.text, request.action)


class _FakeIrc:
    """What `privmsg` and `quick_privmsg` use of an IRC session, recording what they do."""

    def __init__(self, bot: bool, rooms: Any) -> None:
        from types import SimpleNamespace
        self.bot = bot
        self.caps = {"message-tags"}
        self.door = SimpleNamespace(max_text=120)
        self.user = SimpleNamespace(nick="nick", userhost="ident@host.example", away=None)
        self.hub = SimpleNamespace(find_room=lambda name: name.lower() if name.lower() in rooms else None,
                                   find_user=lambda name: None)
        self.did: list = []

    def ask(self, request: Any, pending: str = "", refused: Any = None) -> None:
        self.did.append(("ask", request))

    def numeric(self, *args: Any) -> None:
        self.did.append(("numeric", args))

    def fail(self, *args: Any, **kw: Any) -> None:
        self.did.append(("fail", args))


irc_lines_any = st.builds(
    lambda cmd, sep, target, colon, text: (cmd + sep + target + colon + text).encode("utf-8", "surrogatepass"),
    st.sampled_from(["PRIVMSG", "privmsg", "NOTICE", "@label=x PRIVMSG", ":src PRIVMSG"]),
    st.sampled_from([" ", "  "]),
    st.sampled_from(["#lobby", "#LOBBY", "#none", "#lobby,#x", "nick", "#lobby ", "#", "#lo:bby"]),
    st.sampled_from([" :", " ::", " ", ""]),
    st.one_of(texts, st.sampled_from(["hi", "\x01ACTION waves\x01", "\x02bold\x02", " ", "x" * 130,
                                      "x" * 480, "a\tb", "é", "\x7f"])))


irc_lines_plain = st.builds(
    lambda target, text: f"PRIVMSG {target} :{text}".encode("utf-8", "surrogatepass"),
    st.sampled_from(["#lobby", "#LOBBY", "#none", "#lobby,#x", "#lo:bby"]),
    st.one_of(st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=40),
              st.sampled_from(["hi", "a\tb", "x" * 480, ":colon", "\x01ACTION waves\x01"])))
irc_lines = st.one_of(irc_lines_plain, irc_lines_any)


@settings(max_examples=40, deadline=None)
@given(irc_lines, st.booleans())
def test_quick_privmsg_does_what_privmsg_does(raw: bytes, bot: bool) -> None:
    from selchat.core.requests import Say
    from selchat.doors.irc.messaging import privmsg, quick_privmsg
    from selchat.doors.irc.parser import IrcParseError, parse_line
    quick = _FakeIrc(bot, {"#lobby"})
    taken = quick_privmsg(quick, raw)  # type: ignore[arg-type]
    if not taken:
        assert quick.did == []  # a line it leaves is left untouched
        return
    general = _FakeIrc(bot, {"#lobby"})
    try:
        line = parse_line(raw)
    except IrcParseError:
        raise AssertionError(f"quick took a line the parser refuses: {raw!r}")
    assert line.command == "PRIVMSG" and not line.tags and line.source is None
    privmsg(general, line)  # type: ignore[arg-type]
    assert quick.did == general.did
    assert len(quick.did) == 1 and type(quick.did[0][1]) is Say
    assert quick.did[0][1] == Say(line.params[0], line.params[1])


def test_quick_privmsg_takes_the_plain_case() -> None:
    from selchat.doors.irc.messaging import quick_privmsg
    fake = _FakeIrc(False, {"#lobby"})
    assert quick_privmsg(fake, b"PRIVMSG #lobby :hello there")  # type: ignore[arg-type]
    assert fake.did[0][1].room == "#lobby" and fake.did[0][1].text == "hello there"


# --- the store's checkpoint, after the pass's writes -----------------------------------------

def _store(tmp_path: Any) -> Any:
    from selchat.core.store import SQLiteStore
    return SQLiteStore(str(tmp_path / "h.db"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=1, max_value=800), min_size=1, max_size=64),
                min_size=1, max_size=80))
def test_checkpoints_when_due_keep_the_wal_near_its_bound(tmp_path_factory: Any, batches: Any) -> None:
    """Checkpointing whenever the server's count says it is due (as the hub does after each
    pass) finds the WAL near WAL_PAGES: past it by at most a quarter and one commit's pages."""
    from selchat.core.store import WAL_PAGES
    store = _store(tmp_path_factory.mktemp("wal"))
    assert store.checkpoint_due()  # (what opening wrote, counted by nobody: taken at once)
    store.checkpoint()
    next_id = 1
    found = []
    for sizes in batches:
        for size in sizes:
            store.add(Message(next_id, 1, "sender", "x" * size, "#room"))
            next_id += 1
        store.commit()
        if store.checkpoint_due():
            found.append(store.checkpoint())
    found.append(store.checkpoint())
    one_commit = 2 + 2 * (64 * (96 + 800)) // 4096
    assert max(found) <= WAL_PAGES * 5 // 4 + one_commit
    store.close()


@pytest.mark.parametrize("rows, text, room, nick, host", [
    (1, "x" * 100, "#room", "sender", "u@h"),  # a quiet room
    (80, "x" * 100, "#room", "sender", "u@h"),  # the fan-out benchmark's passes
    (8, "x" * 400, "#room", "sender", "u@h"),
    (80, "\u0416" * 100, "#room", "sender", "u@h"),  # two bytes a character
    (80, "\u4e2d" * 100, "#room", "sender", "u@h"),  # three
    (80, "\U0001F600" * 100, "#room", "sender", "u@h"),  # four
    (20, "\U0001F600" * 2000, "#room", "sender", "u@h"),
    (80, "x" * 100, "#" + "r" * 50, "n" * 32, "ident@" + "h" * 60),  # the longest names
])
def test_a_busy_or_quiet_room_keeps_the_wal_near_its_bound(tmp_path: Any, rows: int, text: str,
                                                          room: str, nick: str, host: str) -> None:
    """What the hub's checkpoints find in the WAL (SQLite's own count), over 400 passes."""
    from selchat.core.store import WAL_PAGES
    store = _store(tmp_path)
    store.checkpoint()
    found = []
    for p in range(400):
        for k in range(rows):
            store.add(Message(p * rows + k + 1, 1, nick, text, room, None, False, False, host))
        store.commit()
        if store.checkpoint_due():
            found.append(store.checkpoint())
    assert found and max(found) <= WAL_PAGES * 5 // 4
    store.close()


def test_messages_spread_over_many_rooms_keep_the_wal_near_its_bound(tmp_path: Any) -> None:
    """Each room a commit adds to has its own leaf in the index, wherever it is: a pass to 40
    rooms of 300 writes about 40 scattered pages, which the count must see (it saw only the
    bytes, and SQLite's count reached 800 pages before a checkpoint). The bound is WAL_PAGES
    and one such commit."""
    import random
    from selchat.core.store import WAL_PAGES
    store = _store(tmp_path)
    rooms = [f"#room{i}" for i in range(300)]
    next_id = 1
    for room in rooms:  # history in every room, so that their index leaves are apart
        for _ in range(20):
            store.add(Message(next_id, 1, "sender", "x" * 100, room))
            next_id += 1
        store.commit()
    store.checkpoint()
    pick = random.Random(19).choice
    found = []
    for _ in range(150):
        for _ in range(40):
            store.add(Message(next_id, 1, "sender", "x" * 100, pick(rooms)))
            next_id += 1
        store.commit()
        if store.checkpoint_due():
            found.append(store.checkpoint())
    assert found and max(found) <= WAL_PAGES + 3 * 40
    store.close()


def test_a_checkpoint_runs_after_the_pass_is_written(tmp_path: Any) -> None:
    from selchat.core.chat import Chat
    from selchat.hub import Hub
    from selchat.loop.reactor import ORDER_WRITE, Reactor
    from selchat.loop.transport import Writer
    store = _store(tmp_path)
    reactor = Reactor()
    Writer(reactor)
    Hub(Chat(store), reactor)
    seen: list = []
    reactor.add_before_sleep(lambda: seen.append("written"), ORDER_WRITE)  # (right after the writer)
    commit, checkpoint = store.commit, store.checkpoint
    store.commit = lambda: (seen.append("commit"), commit())[1]  # type: ignore[method-assign]
    store.checkpoint = lambda: (seen.append("checkpoint"), checkpoint())  # type: ignore[method-assign]
    for k in range(400):  # enough rows for a checkpoint to fall due
        store.add(Message(k + 1, 1, "sender", "y" * 400, "#room"))
    reactor.run_once(0)
    assert seen == ["commit", "written", "checkpoint"]
    seen.clear()
    reactor.run_once(0)
    assert "checkpoint" not in seen  # (not due again until the WAL has grown again)
    store.close()


def test_a_failed_checkpoint_is_tried_again_a_second_later(tmp_path: Any) -> None:
    from selchat.core.store import CHECKPOINT_RETRY, SQLiteStore, StoreError
    clock = [100.0]
    store = SQLiteStore(str(tmp_path / "h.db"), timer=lambda: clock[0])
    assert store.checkpoint_due()
    conn = store._conn  # noqa: SLF001
    try:
        store._conn = _Refusing()  # type: ignore[assignment]  # noqa: SLF001  (a disk that fails)
        with pytest.raises(StoreError):
            store.checkpoint()
        assert store.stats()["checkpoint_failures"] == 1
        assert not store.checkpoint_due()  # (not once a pass against a failing disk)
        clock[0] += CHECKPOINT_RETRY
        assert store.checkpoint_due()
    finally:
        store._conn = conn  # noqa: SLF001
    store.checkpoint()
    assert not store.checkpoint_due() and store.stats()["checkpoints"] == 1
    store.close()


class _Refusing:
    def execute(self, *args: Any) -> Any:
        import sqlite3
        raise sqlite3.OperationalError("disk I/O error")


def test_a_refused_commit_still_keeps_the_account_writes(tmp_path: Any) -> None:
    """The page count runs only after a commit succeeded: a row the database refuses (here a
    message without its userhost, which only a malformed cluster peer could hand over) fails
    the commit as before, and the account written in the same pass waits for the next one."""
    from selchat.core.store import StoreError
    store = _store(tmp_path)
    store.directory.save_account("zed", "Zed", "verifier", 5)
    store.add(Message(5, 1, "alice", "hello", "#room", userhost=None))  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.commit()
    assert store.directory.writes
    store.commit()
    assert store._conn.execute("SELECT name FROM accounts WHERE key = 'zed'").fetchall() == [("Zed",)]  # noqa: SLF001
    store.close()
