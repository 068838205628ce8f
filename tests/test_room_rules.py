"""The room rules of PROTOCOL.md 11.2 against a model: a hypothesis state machine drives the
chat state (no sockets) with joins, parts, messages, modes, roles, bans, kicks, invites and
nick changes by a handful of users, some logged in, and checks every answer and the state
after each step against a plain model of what the contract says."""

from __future__ import annotations

from typing import Dict, List, Optional, Set

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from selchat.core import events
from selchat.core.chat import Chat, ChatError, User
from selchat.core.requests import InviteUser, JoinRoom, KickUser, PartRoom, Say, SetModes
from selchat.core.store import MemoryStore

ROOM = "#den"
NICKS = ["ann", "bob", "cat", "dan"]
ACCOUNTS = {"ann": "ann", "bob": "bob"}  # cat and dan stay guests
FLAGS = ["moderated", "invite_only", "secret", "topic_locked"]


class Session:
    """The chat only carries sessions; these record nothing."""


class RoomRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.chat = Chat(MemoryStore())
        self.users: Dict[str, User] = {}
        for nick in NICKS:
            account = ACCOUNTS.get(nick)
            if account is not None:
                self.chat.accounts.create(account, "v", 0)
            user, _ = self.chat.register(nick, Session(), account=account)
            self.users[nick] = user
        self.now = 0
        # The model.
        self.members: Set[str] = set()
        self.ops: Set[str] = set()
        self.voiced: Set[str] = set()
        self.flags = {"moderated": False, "invite_only": False, "secret": False, "topic_locked": True}
        self.key: Optional[str] = None
        self.limit: Optional[int] = None
        self.bans: List[str] = []  # masks as the model keeps them: ("nick", n) or ("account", a)
        self.invited: Dict[str, bool] = {}  # invitee -> the invitation came from an operator
        self.founder: Optional[str] = None
        self.op_accounts: Set[str] = set()

    # --- model helpers ----------------------------------------------------------------------

    def banned(self, nick: str) -> bool:
        for kind, value in self.bans:
            if kind == "nick" and value == nick:
                return True
            if kind == "account" and ACCOUNTS.get(nick) == value:
                return True
        return False

    def exists(self) -> bool:
        return bool(self.members)

    def call(self, nick: str, request: object) -> Optional[str]:
        self.now += 1
        try:
            self.chat.handle(self.users[nick], request, self.now)  # type: ignore[arg-type]
        except ChatError as exc:
            return exc.code
        return None

    # --- rules ------------------------------------------------------------------------------

    @rule(nick=st.sampled_from(NICKS), key=st.sampled_from([None, "k1", "k2"]))
    def join(self, nick: str, key: Optional[str]) -> None:
        code = self.call(nick, JoinRoom(ROOM, key))
        if nick in self.members:
            assert code is None
            return
        if not self.exists():
            # An empty room that was registered comes back with its state; else it is new.
            if self.founder is None:
                self.ops = set()
                self.voiced = set()
                self.flags = {"moderated": False, "invite_only": False, "secret": False, "topic_locked": True}
                self.key = None
                self.limit = None
                self.bans = []
                self.invited = {}
                assert code is None
                self.members = {nick}
                self.ops = {nick}
                if nick in ACCOUNTS:
                    self.founder = ACCOUNTS[nick]
                return
            self.invited = {}  # invitations die with the room's members
        account = ACCOUNTS.get(nick)
        privileged = account is not None and (account == self.founder or account in self.op_accounts)
        invited = nick in self.invited
        # Only an operator's invitation passes a ban (anyone's passes invite-only).
        by_operator = self.invited.get(nick, False)
        expected = None
        if not privileged:
            if self.bans and not by_operator and self.banned(nick):
                expected = "banned"
            elif self.flags["invite_only"] and not invited:
                expected = "invite_only"
            elif self.key is not None and key != self.key:
                expected = "bad_key"
            elif self.limit is not None and len(self.members) >= self.limit:
                expected = "room_full"
        assert code == expected, (code, expected)
        if code is None:
            self.members.add(nick)
            self.invited.pop(nick, None)
            if privileged:
                self.ops.add(nick)

    @rule(nick=st.sampled_from(NICKS))
    def part(self, nick: str) -> None:
        code = self.call(nick, PartRoom(ROOM))
        if nick not in self.members:
            assert code == "not_in_room"
            return
        assert code is None
        self.leave(nick)

    def leave(self, nick: str) -> None:
        self.members.discard(nick)
        self.ops.discard(nick)
        self.voiced.discard(nick)
        if not self.members and self.founder is None:
            self.invited = {}

    @rule(nick=st.sampled_from(NICKS))
    def say(self, nick: str) -> None:
        code = self.call(nick, Say(ROOM, "hi"))
        if nick not in self.members:
            assert code == "not_in_room"
        elif nick in self.ops or nick in self.voiced:
            assert code is None
        elif self.flags["moderated"]:
            assert code == "moderated"
        elif self.banned(nick):
            assert code == "banned"
        else:
            assert code is None

    def operator_request(self, nick: str, request: object) -> Optional[str]:
        code = self.call(nick, request)
        if nick not in self.members:
            assert code == "not_in_room", code
            return "skip"
        if nick not in self.ops:
            assert code == "not_operator", code
            return "skip"
        return code

    @rule(nick=st.sampled_from(NICKS), flag=st.sampled_from(FLAGS), value=st.booleans())
    def set_flag(self, nick: str, flag: str, value: bool) -> None:
        code = self.operator_request(nick, SetModes(ROOM, ((flag, value),)))
        if code == "skip":
            return
        assert code is None
        self.flags[flag] = value

    @rule(nick=st.sampled_from(NICKS), key=st.sampled_from([None, "k1", "k2"]),
          limit=st.sampled_from([None, 1, 2, 3]))
    def set_key_and_limit(self, nick: str, key: Optional[str], limit: Optional[int]) -> None:
        code = self.operator_request(nick, SetModes(ROOM, (("key", key), ("limit", limit))))
        if code == "skip":
            return
        assert code is None
        self.key, self.limit = key, limit

    @rule(nick=st.sampled_from(NICKS), what=st.sampled_from(["op", "deop", "voice", "devoice"]),
          who=st.sampled_from(NICKS))
    def role(self, nick: str, what: str, who: str) -> None:
        code = self.operator_request(nick, SetModes(ROOM, ((what, (who,)),)))
        if code == "skip":
            return
        if who not in self.members:
            assert code == "no_such_nick"
            return
        assert code is None
        table = self.ops if what in ("op", "deop") else self.voiced
        if what in ("op", "voice"):
            table.add(who)
            if what == "op" and who in ACCOUNTS and self.founder is not None:
                self.op_accounts.add(ACCOUNTS[who])
        else:
            table.discard(who)
            if what == "deop" and who in ACCOUNTS:
                self.op_accounts.discard(ACCOUNTS[who])

    @rule(nick=st.sampled_from(NICKS), ban=st.booleans(), who=st.sampled_from(NICKS),
          by_account=st.booleans())
    def ban(self, nick: str, ban: bool, who: str, by_account: bool) -> None:
        mask = f"account:{ACCOUNTS.get(who, who)}" if by_account else who
        code = self.operator_request(nick, SetModes(ROOM, (("ban" if ban else "unban", (mask,)),)))
        if code == "skip":
            return
        assert code is None
        entry = ("account", ACCOUNTS.get(who, who)) if by_account else ("nick", who)
        if ban and entry not in self.bans:
            self.bans.append(entry)
        elif not ban and entry in self.bans:
            self.bans.remove(entry)

    @rule(nick=st.sampled_from(NICKS), who=st.sampled_from(NICKS))
    def kick(self, nick: str, who: str) -> None:
        code = self.operator_request(nick, KickUser(ROOM, who))
        if code == "skip":
            return
        if who not in self.members:
            assert code == "no_such_nick"
            return
        assert code is None
        self.leave(who)

    @rule(nick=st.sampled_from(NICKS), who=st.sampled_from(NICKS))
    def invite(self, nick: str, who: str) -> None:
        code = self.call(nick, InviteUser(ROOM, who))
        if nick not in self.members:
            assert code == "not_in_room"
        elif self.flags["invite_only"] and nick not in self.ops:
            assert code == "not_operator"
        elif who in self.members:
            assert code == "already_in_room"
        else:
            assert code is None
            self.invited[who] = nick in self.ops

    # --- what must always hold ---------------------------------------------------------------

    @invariant()
    def state_matches(self) -> None:
        room = self.chat.rooms.get(ROOM)
        if not self.members:
            assert room is None
            return
        assert room is not None
        assert {u.nick for u in room.members} == self.members
        assert {u.nick for u in room.operators} == self.ops
        assert {u.nick for u in room.voiced} == self.voiced
        assert room.flags == self.flags
        assert room.room_key == self.key and room.limit == self.limit
        assert room.founder == self.founder
        names = self.chat.names(ROOM)
        assert set(names.operators) == self.ops and set(names.voiced) == self.voiced
        listed = [r.name for r in self.chat.room_list().rooms]
        assert (ROOM in listed) == (not self.flags["secret"])


TestRoomRules = RoomRules.TestCase
TestRoomRules.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
