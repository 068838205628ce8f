"""The kept orders of rooms (largest first; by name) and the per-room caches agree with the
chat state after any sequence of joins, parts, nick changes, messages and departures."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from selchat.core.chat import Chat, ChatError
from selchat.core.roomindex import RoomIndex
from selchat.core.store import MemoryStore

NICKS = [f"u{i}" for i in range(6)]
ROOMS = ["#a", "#B", "#c", "#d", "#E"]


class Rooms(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.chat = Chat(MemoryStore(), history_on_join=3)
        self.users = {}
        self.clock = 0

    @rule(nick=st.sampled_from(NICKS))
    def register(self, nick: str) -> None:
        if nick not in self.users:
            self.users[nick], _ = self.chat.register(nick, None, join_lobby=nick != "u0")

    @rule(nick=st.sampled_from(NICKS), room=st.sampled_from(ROOMS))
    def join(self, nick: str, room: str) -> None:
        if nick in self.users:
            self.chat.join(self.users[nick], room)

    @rule(nick=st.sampled_from(NICKS), room=st.sampled_from(ROOMS + ["#lobby"]))
    def part(self, nick: str, room: str) -> None:
        if nick in self.users:
            try:
                self.chat.part(self.users[nick], room)
            except ChatError:
                pass

    @rule(nick=st.sampled_from(NICKS), room=st.sampled_from(ROOMS + ["#lobby"]))
    def say(self, nick: str, room: str) -> None:
        if nick in self.users:
            self.clock += 1
            try:
                self.chat.say(self.users[nick], room, f"t{self.clock}", self.clock)
            except ChatError:
                pass

    @rule(nick=st.sampled_from(NICKS), new=st.sampled_from(["x1", "X2", "y3"]))
    def rename(self, nick: str, new: str) -> None:
        user = self.users.get(nick)
        if user is not None:
            try:
                self.chat.change_nick(user, new)
            except ChatError:
                pass  # taken: nothing changes (our map stays keyed by the first nick)

    @rule(nick=st.sampled_from(NICKS))
    def leave(self, nick: str) -> None:
        user = self.users.pop(nick, None)
        if user is not None:
            self.chat.disconnect(user, "bye")

    @invariant()
    def largest_first(self) -> None:
        rooms = self.chat.rooms.values()
        expected = [(r.name, len(r.members)) for r in
                    sorted(rooms, key=lambda r: (-len(r.members), r.key))]
        listed = self.chat.room_list().rooms
        assert [(r.name, r.members) for r in listed] == expected
        assert len(listed) == len(expected)
        if expected:
            assert (listed[-1].name, listed[-1].members) == expected[-1]
            assert [(r.name, r.members) for r in listed[1:3]] == expected[1:3]

    @invariant()
    def by_name(self) -> None:
        keys = sorted(self.chat.rooms)
        assert [r.key for r in self.chat.rooms_by_name("", 100)] == keys
        for i, key in enumerate(keys):
            assert [r.key for r in self.chat.rooms_by_name(key, 2)] == keys[i + 1: i + 3]

    @invariant()
    def names_and_history_as_if_made_afresh(self) -> None:
        for room in self.chat.rooms.values():
            names = self.chat.names(room.name)
            assert names.nicks == tuple(sorted((u.nick for u in room.members),
                                               key=lambda n: (n.lower(), n)))
            assert set(names.operators) == {u.nick for u in room.operators}
            if room.recent_cache is not None:
                fresh, more = self.chat.store.recent(room.name, None, 3, None)
                assert room.recent_cache == (tuple(fresh), more)


Rooms.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestRooms = Rooms.TestCase


def test_an_index_out_of_step_with_the_chat_is_a_loud_bug() -> None:
    index = RoomIndex()
    index.add("#a")
    index.resize("#a", 0, 3)
    try:
        index.resize("#a", 2, 1)  # it has 3, not 2
    except KeyError:
        pass
    else:
        raise AssertionError("a wrong old size went unnoticed")
    assert index.by_size(0, 5) == ["#a"]


def test_history_on_join_is_kept_for_a_bounded_number_of_rooms() -> None:
    """Each room's cached history can be a frame of messages: only the rooms last joined keep
    one, so thousands of rooms with history cannot hold thousands of frames in memory."""
    from selchat.core.chat import RECENT_CACHED

    chat = Chat(MemoryStore(), max_rooms=1000, max_rooms_per_origin=1000, room_reserve=0,
                max_rooms_per_user=1000)
    talker, _ = chat.register("talker", None, join_lobby=False)
    for i in range(RECENT_CACHED * 3):
        chat.join(talker, f"#r{i}")
        chat.say(talker, f"#r{i}", f"hello {i}", i + 1)
    joiner, _ = chat.register("joiner", None, join_lobby=False)
    for i in range(RECENT_CACHED * 3):
        chat.join(joiner, f"#r{i}")
    held = [room for room in chat.rooms.values() if room.recent_cache is not None]
    assert 0 < len(held) <= RECENT_CACHED
    # and what is kept is still right: the last room joined has its message
    last = chat.rooms[f"#r{RECENT_CACHED * 3 - 1}"]
    assert last.recent_cache is not None and last.recent_cache[0][-1].text.endswith(str(RECENT_CACHED * 3 - 1))
