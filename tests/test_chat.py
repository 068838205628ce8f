"""The chat state on its own: requests in, deliveries out, no sockets."""

from __future__ import annotations

from typing import Dict, List

import pytest

from selchat.core import events
from selchat.core.chat import Chat, ChatError, Delivery, User
from selchat.core.requests import (
    ChangeNick,
    HistoryRequest,
    JoinRoom,
    ListRooms,
    Msg,
    PartRoom,
    Say,
    Who,
)
from selchat.core.store import MemoryStore


class Endpoint:
    """Stands in for a connection: collects what each user would receive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: List[events.Event] = []


def route(deliveries: List[Delivery]) -> None:
    for d in deliveries:
        for user in d.recipients:
            if user is not d.skip:
                user.session.got.append(d.event)


class World:
    def __init__(self, **options) -> None:
        self.chat = Chat(MemoryStore(), **options)
        self.users: Dict[str, User] = {}

    def connect(self, nick: str) -> User:
        user, out = self.chat.register(nick, Endpoint(nick))
        route(out)
        self.users[nick] = user
        return user

    def do(self, nick: str, request) -> List[Delivery]:
        out = self.chat.handle(self.users[nick], request, now_ms=1000)
        route(out)
        return out

    def got(self, nick: str) -> List[events.Event]:
        endpoint = self.users[nick].session
        got, endpoint.got = endpoint.got, []
        return got

    def clear(self) -> None:
        for user in self.users.values():
            user.session.got = []


def kinds(evts: List[events.Event]) -> List[str]:
    return [type(e).__name__ for e in evts]


def test_register_puts_the_user_in_the_lobby_and_tells_everyone() -> None:
    w = World(motd="hi")
    w.connect("alice")
    assert kinds(w.got("alice")) == ["Welcome", "Join", "Names", "History"]
    w.connect("bob")
    assert w.got("alice") == [events.Join("#lobby", "bob")]
    got = w.got("bob")
    assert got[0] == events.Welcome("bob", "selchat", "hi")
    assert got[2] == events.Names("#lobby", ("alice", "bob"))


def test_nicks_collide_case_insensitively_and_keep_their_spelling() -> None:
    w = World()
    w.connect("Alice")
    with pytest.raises(ChatError) as info:
        w.chat.register("aLICE", Endpoint("x"))
    assert info.value.code == "nick_taken"
    assert w.chat.names("#LOBBY").nicks == ("Alice",)


def test_reply_deliveries_are_marked_for_the_ref() -> None:
    w = World()
    w.connect("alice")
    w.connect("bob")
    out = w.do("alice", Say("#lobby", "hi"))
    replies = [d for d in out if d.reply]
    assert len(replies) == 1 and list(replies[0].recipients) == [w.users["alice"]]
    broadcast = [d for d in out if not d.reply][0]
    assert broadcast.skip is w.users["alice"]


def test_say_reaches_every_member_once_with_increasing_ids() -> None:
    w = World()
    for nick in ("a", "b", "c"):
        w.connect(nick)
    w.clear()
    w.do("a", Say("#lobby", "one"))
    w.do("b", Say("#LOBBY", "two"))
    for nick in ("a", "b", "c"):
        got = w.got(nick)
        assert [m.text for m in got] == ["one", "two"]
        assert got[0].id < got[1].id and got[0].room == "#lobby"


def test_say_outside_the_room_is_refused() -> None:
    w = World()
    w.connect("a")
    with pytest.raises(ChatError) as info:
        w.do("a", Say("#elsewhere", "x"))
    assert info.value.code == "not_in_room"


def test_rooms_keep_the_first_spelling_and_vanish_when_empty() -> None:
    w = World()
    w.connect("a")
    w.connect("b")
    w.do("a", JoinRoom("#Dev"))
    w.clear()
    w.do("b", JoinRoom("#dev"))
    assert w.got("a") == [events.Join("#Dev", "b")]
    assert kinds(w.got("b")) == ["Join", "Names", "History"]
    assert [(r.name, r.members) for r in w.chat.room_list().rooms] == [("#Dev", 2), ("#lobby", 2)]
    w.do("a", PartRoom("#dev"))
    w.do("b", PartRoom("#DEV"))
    assert "#dev" not in w.chat.rooms
    assert w.chat.names("#dev") == events.Names("#dev", ())
    w.do("a", PartRoom("#lobby"))
    w.do("b", PartRoom("#lobby"))
    assert "#lobby" in w.chat.rooms  # the lobby always exists


def test_joining_twice_answers_names_only() -> None:
    w = World()
    w.connect("a")
    w.clear()
    out = w.do("a", JoinRoom("#lobby"))
    assert [type(d.event) for d in out] == [events.Names]


def test_part_goes_to_every_member_including_the_leaver() -> None:
    w = World()
    w.connect("a")
    w.connect("b")
    w.clear()
    w.do("a", PartRoom("#lobby"))
    assert w.got("a") == [events.Part("#lobby", "a")]
    assert w.got("b") == [events.Part("#lobby", "a")]
    with pytest.raises(ChatError) as info:
        w.do("a", PartRoom("#lobby"))
    assert info.value.code == "not_in_room"


def test_private_messages() -> None:
    w = World()
    w.connect("a")
    w.connect("b")
    w.connect("c")
    w.clear()
    w.do("a", Msg("B", "psst"))
    (echo,) = w.got("a")
    assert w.got("b") == [echo] and w.got("c") == []
    assert echo.to == "b" and echo.room is None and echo.sender == "a"
    for to in ("nobody", "9bad"):
        with pytest.raises(ChatError) as info:
            w.do("a", Msg(to, "x"))
        assert info.value.code == "no_such_nick"
    w.do("a", Msg("a", "note to self"))
    assert len(w.got("a")) == 1
    assert w.chat.store.recent("#lobby", None, 10) == ([], False)  # private messages are never history


def test_nick_change_reaches_everyone_sharing_a_room_once() -> None:
    w = World()
    for nick in ("a", "b", "c"):
        w.connect(nick)
    w.do("a", JoinRoom("#x"))
    w.do("b", JoinRoom("#x"))
    w.clear()
    w.do("a", ChangeNick("A2"))
    assert w.got("a") == [events.NickChange("a", "A2")]
    assert w.got("b") == [events.NickChange("a", "A2")]  # once, though they share two rooms
    assert w.got("c") == [events.NickChange("a", "A2")]
    with pytest.raises(ChatError) as info:
        w.do("b", ChangeNick("a2"))
    assert info.value.code == "nick_taken"
    w.do("b", ChangeNick("B"))  # a change of case of one's own nick is allowed
    assert "a" not in w.chat.users and w.chat.users["a2"].nick == "A2"


def test_quit_tells_everyone_sharing_a_room_but_not_the_quitter() -> None:
    w = World()
    for nick in ("a", "b"):
        w.connect(nick)
    w.clear()
    route(w.chat.disconnect(w.users["a"], "bye"))  # what a door does when a user quits
    assert w.got("b") == [events.Quit("a", "bye")]
    assert w.got("a") == []
    assert w.chat.names("#lobby").nicks == ("b",)
    w.connect("a")  # the nick is free again


def test_disconnect_of_an_unknown_user_is_harmless() -> None:
    w = World()
    user = w.connect("a")
    w.chat.disconnect(user, "x")
    assert w.chat.disconnect(user, "again") == []


def test_who_rooms() -> None:
    w = World()
    w.connect("b")
    w.connect("A")
    w.clear()
    w.do("b", Who("#lobby"))
    w.do("b", Who("#none"))
    w.do("b", ListRooms())
    assert w.got("b") == [
        events.Names("#lobby", ("A", "b")),
        events.Names("#none", ()),
        events.RoomList((events.RoomInfo("#lobby", 2),)),
    ]


def test_large_rooms_do_not_broadcast_presence() -> None:
    w = World(max_presence=2)
    w.connect("a")
    w.connect("b")
    w.clear()
    w.connect("c")  # the lobby now has 3 > 2 members
    assert w.got("a") == [] and w.got("b") == []
    assert kinds(w.got("c")) == ["Welcome", "Join", "History"]  # no automatic names
    w.do("a", JoinRoom("#small"))
    w.do("c", JoinRoom("#small"))
    w.clear()
    w.do("c", ChangeNick("c2"))
    assert w.got("a") == [events.NickChange("c", "c2")]  # shares a small room
    assert w.got("b") == []  # only in the large lobby
    assert w.got("c") == [events.NickChange("c", "c2")]
    w.do("b", PartRoom("#lobby"))
    assert w.got("b") == [events.Part("#lobby", "b")] and w.got("a") == []
    route(w.chat.disconnect(w.users["a"], "gone"))
    assert w.got("c") == [events.Quit("a", "gone")]


def test_history_on_join_and_paging() -> None:
    w = World(history_on_join=3)
    w.connect("a")
    for i in range(5):
        w.do("a", Say("#lobby", f"m{i}"))
    w.connect("b")
    history = w.got("b")[-1]
    assert isinstance(history, events.History)
    assert [m.text for m in history.messages] == ["m2", "m3", "m4"] and history.more
    out = w.do("b", HistoryRequest("#lobby", history.messages[0].id, 10))
    assert [m.text for m in out[0].event.messages] == ["m0", "m1"] and not out[0].event.more
    with pytest.raises(ChatError):
        w.do("b", HistoryRequest("#other", None, 10))


def test_room_caps() -> None:
    w = World(max_rooms=3, max_rooms_per_user=2)
    w.connect("a")
    w.connect("b")
    w.do("a", JoinRoom("#one"))
    with pytest.raises(ChatError) as info:
        w.do("a", JoinRoom("#two"))
    assert info.value.code == "too_many_rooms"
    w.do("b", JoinRoom("#two"))
    with pytest.raises(ChatError) as info:
        w.do("b", JoinRoom("#three"))  # lobby, one, two exist: the server is full
    assert info.value.code == "too_many_rooms"


# --- the room table is shared out by origin (one address cannot drain it) ----------------------

def hoard(chat: Chat, origin: str, users: int, tries: int, tag: str) -> int:
    """`users` connections from `origin` each try to create `tries` rooms; rooms created."""
    created = 0
    for u in range(users):
        user, _ = chat.register(f"{tag}u{u}", Endpoint(tag), origin=origin)
        for r in range(tries):
            try:
                chat.join(user, f"#{tag}u{u}r{r}")
            except ChatError as exc:
                assert exc.code == "too_many_rooms"
            else:
                created += 1
    return created


def test_connections_at_the_per_address_limit_cannot_fill_the_room_table() -> None:
    """The review's attack: 7 addresses x 16 connections x 100 rooms would pass 10,000."""
    chat = Chat(MemoryStore())
    for a in range(7):
        created = hoard(chat, f"203.0.113.{a}", 16, 100, f"h{a}")
        assert created == chat.max_rooms_per_origin == 500
    assert len(chat.rooms) == 1 + 7 * 500
    newcomer, _ = chat.register("newcomer", Endpoint("n"), origin="198.51.100.7")
    chat.join(newcomer, "#mine")
    assert chat.rooms["#mine"].members == {newcomer: None}


def test_many_hoarding_addresses_leave_the_reserve_to_those_holding_few() -> None:
    chat = Chat(MemoryStore(), max_rooms=1000, max_rooms_per_user=20)  # 50 per origin, 100 kept
    assert (chat.max_rooms_per_origin, chat.room_reserve, chat.few_rooms) == (50, 100, 10)
    for a in range(25):
        hoard(chat, f"203.0.113.{a}", 16, 20, f"h{a}")
    # 18 addresses took their share (the last one a room short: the lobby counts in the table),
    # and every later one only the few rooms a small holder may still take from the reserve.
    assert sorted(chat.rooms_held.values()) == [10] * 7 + [49] + [50] * 17
    for n in range(30):  # room enough for 30 newcomers yet
        newcomer, _ = chat.register(f"new{n}", Endpoint("n"), origin=f"198.51.100.{n}")
        chat.join(newcomer, f"#new{n}")
    assert len(chat.rooms) == chat.max_rooms
    # At this scale it takes 18 + 100 / 10 = 28 addresses to take every room (with the
    # defaults 18 + 1000 / 10 = 118); what they hold goes back as soon as they leave.


def test_the_reserve_refuses_big_holders_only() -> None:
    chat = Chat(MemoryStore(), max_rooms=20, max_rooms_per_user=100, max_rooms_per_origin=15,
                room_reserve=5, few_rooms=2)
    big, _ = chat.register("big", Endpoint("b"), origin="10.0.0.1")
    for r in range(14):  # the lobby and 14: 15 rooms, the reserve starts
        chat.join(big, f"#b{r}")
    with pytest.raises(ChatError) as info:
        chat.join(big, "#b14")
    assert info.value.code == "too_many_rooms" and "kept" in info.value.message
    small, _ = chat.register("small", Endpoint("s"), origin="10.0.0.2")
    chat.join(small, "#s0")
    chat.join(small, "#s1")
    with pytest.raises(ChatError):
        chat.join(small, "#s2")  # holds 2 now: no longer few
    other, _ = chat.register("other", Endpoint("o"), origin="10.0.0.3")
    chat.join(other, "#o0")
    chat.join(other, "#o1")
    last, _ = chat.register("last", Endpoint("l"), origin="10.0.0.4")
    chat.join(last, "#l0")
    assert len(chat.rooms) == 20
    with pytest.raises(ChatError) as info:
        chat.join(last, "#l1")
    assert "as many rooms" in info.value.message
    chat.join(last, "#b0")  # joining an existing room is never refused by these caps


def test_a_room_counts_for_its_creators_origin_while_it_exists() -> None:
    chat = Chat(MemoryStore(), max_rooms_per_origin=2)
    alice, _ = chat.register("alice", Endpoint("a"), origin="10.0.0.1")
    mallet, _ = chat.register("mallet", Endpoint("m"), origin="10.0.0.1")
    bob, _ = chat.register("bob", Endpoint("b"), origin="10.0.0.2")
    assert alice.origin == "10.0.0.1" and alice.holder == mallet.holder
    chat.join(alice, "#one")
    chat.join(mallet, "#two")
    with pytest.raises(ChatError) as info:
        chat.join(alice, "#three")  # the address holds two rooms, whoever made them
    assert "address" in info.value.message
    chat.join(bob, "#one")
    chat.part(alice, "#one")  # #one lives on with bob in it: still alice's address's
    with pytest.raises(ChatError):
        chat.join(mallet, "#three")
    chat.part(bob, "#one")  # now it is gone, and its place is free again
    assert "#one" not in chat.rooms and chat.rooms_held == {"10.0.0.1": 1}
    chat.join(mallet, "#three")
    chat.disconnect(mallet, "quit")
    chat.disconnect(alice, "quit")
    assert chat.rooms_held == {}  # and the lobby never counts


def test_users_without_an_origin_each_count_alone() -> None:
    chat = Chat(MemoryStore(), max_rooms_per_origin=1)
    a, _ = chat.register("a", Endpoint("a"))
    b, _ = chat.register("b", Endpoint("b"))
    assert a.origin == "" and a.holder != b.holder
    chat.join(a, "#a")
    chat.join(b, "#b")
    with pytest.raises(ChatError):
        chat.join(a, "#a2")


def test_accounts_have_a_cap_and_registration_closes_at_it() -> None:
    w = World()
    w.chat.accounts.max_accounts = 2
    for nick in ("a1", "a2", "a3"):
        w.connect(nick)
    w.chat.may_register_account(w.users["a1"])
    w.chat.register_account(w.users["a1"], "v1", 1000)
    w.chat.register_account(w.users["a2"], "v2", 1000)
    with pytest.raises(ChatError) as refused:
        w.chat.may_register_account(w.users["a3"])
    assert refused.value.code == "registration_closed"
    assert not w.chat.accounts.exists("a3")
