"""Channel commands: JOIN, PART, NAMES, LIST, TOPIC, KICK, INVITE, MODE.

The handlers parse and ask the hub; what they read of a room comes from the hub's queries for
doors, and every rule (who may set a topic, kick, invite, change a mode; bans, keys, limits) is
the core's: its refusals come back as ChatError codes and `refuse` puts them in IRC's numerics. LIST of every room streams (`ListStream`): rooms go out in name order while the
client's queue is below the answer budget, and go on from the last name sent once it has
read them, so the answer never holds more than the client's buffer ("safelist").
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Callable, List, Optional

from selchat.core.names import fold, has_control_characters, valid_room
from selchat.core.requests import InviteUser, JoinRoom, KickUser, PartRoom, SetModes, SetTopic
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.modes import parse_modes
from selchat.doors.irc.parser import Line
from selchat.doors.irc.queries import ERR_TOOMANYMATCHES, prefix, visible_room
from selchat.doors.irc.response import add_tag, batch_id
from selchat.doors.irc.text import strip_formatting
from selchat.hub import ChatError
from selchat.loop.transport import State

if TYPE_CHECKING:
    from selchat.core.chat import Room
    from selchat.doors.irc.session import IrcSession

NAMES_MAX = 4  # channels one NAMES may name (as TARGMAX says)
LIST_PAGE = 100  # rooms a streaming LIST asks the hub for at a time
TOPICLEN = 390  # bytes of a topic (ISUPPORT TOPICLEN)
RPL_INVITELIST = 336
RPL_ENDOFINVITELIST = 337
LIST_SHARE = 65536  # bytes of LIST one pass may write before it lets others go first


def join(s: "IrcSession", line: Line) -> None:
    user = s.user
    assert user is not None
    hub = s.hub
    if line.params[0] == "0":
        for room in list(user.rooms.values()):
            s.ask(PartRoom(room.name))
        return
    keys = line.params[1].split(",") if len(line.params) > 1 else []
    for i, name in enumerate(line.params[0].split(",")):
        if not name:
            continue
        if not name.startswith("#"):
            s.numeric(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
            continue
        if not valid_room(name):
            s.numeric(N.ERR_BADCHANNAME, name[:64], "Illegal channel name")
            continue
        if hub.is_member(user, name):
            continue  # already there: IRC servers say nothing
        key = keys[i] if i < len(keys) and keys[i] else None
        s.ask(JoinRoom(name, key), refused=lambda exc, name=name: refuse(s, exc, name))


def part(s: "IrcSession", line: Line) -> None:
    user = s.user
    assert user is not None
    reason = strip_formatting(line.params[1]) if len(line.params) > 1 else ""
    if has_control_characters(reason):
        reason = ""
    for name in line.params[0].split(","):
        if not name:
            continue
        if visible_room(s, name) is None:
            s.numeric(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
        elif fold(name) not in user.rooms:
            s.numeric(N.ERR_NOTONCHANNEL, name, "You're not on that channel")
        else:
            cut = reason.encode("utf-8")[:300].decode("utf-8", "ignore")  # fits any line
            s.ask(PartRoom(name, cut or None))


def names(s: "IrcSession", line: Line) -> None:
    if not line.params:
        s.numeric(N.RPL_ENDOFNAMES, "*", "End of /NAMES list")
        return
    wanted = [n for n in (line.params[0].split() or [""])[0].split(",") if n][:NAMES_MAX]
    if len(wanted) > 1:
        # Several channels: their lists, then one end naming them all (RFC 1459, 2812).
        for name in wanted:
            room = visible_room(s, name)
            if room is not None:
                send_names(s, room, end=False)
        s.numeric(N.RPL_ENDOFNAMES, ",".join(wanted)[:300], "End of /NAMES list")
        return
    for name in wanted:
        room = visible_room(s, name)
        if room is None:
            s.numeric(N.RPL_ENDOFNAMES, name[:64], "End of /NAMES list")
        else:
            send_names(s, room)


def send_names(s: "IrcSession", room: Room, end: bool = True) -> None:
    """353 lines of the room's members (cut at the answer's budget, then 416), and 366."""
    uhnames = "userhost-in-names" in s.caps
    multi = "multi-prefix" in s.caps
    entries = sorted(
        (prefix(room, u, multi) + (f"{u.nick}!{u.userhost}" if uhnames else u.nick)
         for u in room.members),
        key=lambda n: n.lstrip("@+").lower())
    kind = "@" if room.flags["secret"] else "="
    head = f":{s.server} 353 {s.me} {kind} {room.name} :"
    budget = 510 - len(head.encode())
    # A room of thousands: what fits in this answer's share of the client's buffer, then
    # 416 and the usual end, so a client that reads is never dropped for asking.
    limit = s.answer_limit()
    cut = False
    chunk: List[str] = []
    size = 0
    for entry in entries:
        if chunk and size + len(entry) + 1 > budget:
            text = head + " ".join(chunk)
            if s.produced + len(text) + 2 > limit:
                cut = True
                break
            s.send_line(text)
            chunk, size = [], 0
        chunk.append(entry)
        size += len(entry) + 1
    if chunk and not cut:
        text = head + " ".join(chunk)
        if s.produced + len(text) + 2 > limit:
            cut = True
        else:
            s.send_line(text)
    if cut:
        s.numeric(ERR_TOOMANYMATCHES, "NAMES", f"Output too large, truncated ({room.name})")
    if end:
        s.numeric(N.RPL_ENDOFNAMES, room.name, "End of /NAMES list")


def list_(s: "IrcSession", line: Line) -> None:
    hub = s.hub
    conditions = line.params[0].split(",") if line.params and line.params[0] else []
    named = bool(conditions) and all(c.startswith("#") and not any(ch in c for ch in "*?")
                                     for c in conditions)
    if named:
        # Named channels: a lookup each (at most one line's worth of names), in key order.
        s.numeric(N.RPL_LISTSTART, "Channel", "Users  Name")
        for key in sorted({fold(n) for n in line.params[0].split(",") if n}):
            room = hub.find_room(key)
            if (room is not None and room.members
                    and (not room.flags["secret"] or s.user in room.members)):
                s.numeric(N.RPL_LIST, room.name, str(len(room.members)), room.topic)
        s.numeric(N.RPL_LISTEND, "End of /LIST")
        return
    # Every room: streamed as the client reads ("safelist"), so the answer is never more
    # than its buffer holds. Until RPL_LISTEND nothing is read or served, so what the
    # client says next is answered after the list, in order.
    stream = ListStream(s.produced, list_filter(conditions))
    if s.response.collecting:
        # Labeled: its own batch, opened now and closed after the last room, instead of
        # collecting the whole list to wrap it at the end of the command.
        label = s.response.take_label()
        stream.batch = batch_id("L")
        s.send_line(f"@label={label} :{s.server} BATCH +{stream.batch} labeled-response")
    s.send_line(stream.tagged(s.numeric_text(N.RPL_LISTSTART, "Channel", "Users  Name")))
    s.start_stream(stream)


class ListStream:
    """A LIST being streamed: the key of the last room looked at, where its output began."""

    __slots__ = ("after", "start", "batch", "accept")

    def __init__(self, start: int, accept: Optional[Callable[["Room"], bool]] = None) -> None:
        self.after = ""  # a key, so rooms coming and going never shift the cursor
        self.start = start  # the session's output count when the answer began (for billing)
        self.batch: Optional[str] = None  # the labeled-response batch its lines belong to
        self.accept = accept  # ELIST conditions (None: every room)

    def tagged(self, text: str) -> str:
        return add_tag(text, f"batch={self.batch}") if self.batch else text

    def more(self, s: "IrcSession") -> None:
        """Write the next rooms while the session's queue is below the answer budget.

        Then either wait for the client to read (the transport calls `resume_serving` once the
        queue is below its low-water mark) or, after the last room, end the list and go back
        to reading. Each chunk is billed as it is written. Nothing but the transport's drain
        drives this: a connection that closes meanwhile leaves nothing behind.
        """
        transport = s.transport
        if s.doomed or transport.state is not State.OPEN or not transport.accepting:
            s.stream_done()
            return
        out = transport.out
        budget = s._answer_budget()
        stop = s.produced + LIST_SHARE  # one pass's share of the loop's time, too
        rooms_by_name = s.hub.rooms_by_name
        done = False
        while out.size < budget and s.produced < stop:
            page = rooms_by_name(self.after, LIST_PAGE)
            if not page:
                done = True
                break
            for room in page:
                self.after = room.key
                if room.members and (self.accept is None or self.accept(room)):
                    s.send_line(self.tagged(s.numeric_text(
                        N.RPL_LIST, room.name, str(len(room.members)), room.topic)))
                    if out.size >= budget or s.produced >= stop:
                        break
        if done:
            # Secret rooms are not in the hub's list: the asker's own come last.
            user = s.user
            for room in (user.rooms.values() if user is not None else ()):
                if room.flags["secret"] and (self.accept is None or self.accept(room)):
                    s.send_line(self.tagged(s.numeric_text(
                        N.RPL_LIST, room.name, str(len(room.members)), room.topic)))
            s.send_line(self.tagged(s.numeric_text(N.RPL_LISTEND, "End of /LIST")))
            if self.batch:
                s.send_line(f":{s.server} BATCH -{self.batch}")
        s.bill(self.start)
        if not transport.accepting or transport.state is not State.OPEN:
            s.stream_done()  # overflowed after all (other traffic): condemned already
            return
        if not done:
            transport.wait_for_drain()
            return
        s.stream_done()
        transport.resume_reading()


def list_filter(conditions: List[str]) -> Optional[Callable[["Room"], bool]]:
    """ELIST=MNU: `>n`/`<n` members, a mask (`*an1`), a mask not to match (`!#ch*`); a room
    must meet every condition. None when there is none."""
    tests: List[Callable[["Room"], bool]] = []
    for text in conditions:
        if text[:1] in "<>" and text[1:].isascii() and text[1:].isdigit():
            count = int(text[1:])
            if text[0] == ">":
                tests.append(lambda r, n=count: len(r.members) > n)
            else:
                tests.append(lambda r, n=count: len(r.members) < n)
        elif text.startswith("!") and len(text) > 1:
            pattern = fold(text[1:])
            tests.append(lambda r, p=pattern: not fnmatch.fnmatchcase(r.key, p))
        elif text:
            pattern = fold(text)
            tests.append(lambda r, p=pattern: fnmatch.fnmatchcase(r.key, p))
    if not tests:
        return None
    return lambda room: all(test(room) for test in tests)


def topic(s: "IrcSession", line: Line) -> None:
    name = line.params[0]
    room = visible_room(s, name)
    if room is None:
        s.numeric(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
    elif len(line.params) > 1:
        text = strip_formatting(line.params[1])
        if has_control_characters(text):
            s.numeric(N.ERR_CANNOTSENDTOCHAN, room.name, "Cannot set a topic with control characters")
            return
        text = text.encode("utf-8")[:TOPICLEN].decode("utf-8", "ignore")
        s.ask(SetTopic(room.name, text), refused=lambda exc: refuse(s, exc, room.name))
    elif room.topic:
        send_topic(s, room)
    else:
        s.numeric(N.RPL_NOTOPIC, room.name, "No topic is set")


def send_topic(s: "IrcSession", room: "Room") -> None:
    s.numeric(N.RPL_TOPIC, room.name, room.topic)
    if room.topic_by:
        s.send_line(f":{s.server} {int(N.RPL_TOPICWHOTIME):03d} {s.me} {room.name} "
                    f"{room.topic_by} {room.topic_ts // 1000}")


def kick(s: "IrcSession", line: Line) -> None:
    """`KICK #a nick1,nick2` or `KICK #a,#b nick1,nick2` (pairs); one KICK line each."""
    names = line.params[0].split(",")
    nicks = [n for n in line.params[1].split(",") if n][:NAMES_MAX]
    if len(names) > 1 and len(names) != len(nicks):
        s.numeric(N.ERR_NEEDMOREPARAMS, "KICK", "Channels and nicks do not pair up")
        return
    reason = strip_formatting(line.params[2]) if len(line.params) > 2 else ""
    if has_control_characters(reason):
        reason = ""
    reason = reason.encode("utf-8")[:300].decode("utf-8", "ignore")
    for i, nick in enumerate(nicks):
        name = names[i] if len(names) > 1 else names[0]
        room = visible_room(s, name)
        if room is None:
            s.numeric(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
            continue
        s.ask(KickUser(room.name, nick, reason),
              refused=lambda exc, name=room.name, nick=nick: refuse(s, exc, name, nick))


def invite(s: "IrcSession", line: Line) -> None:
    if not line.params:
        # The rooms you are invited to (and have not joined yet).
        user = s.user
        assert user is not None
        for room_name in s.hub.invitations(user)[:100]:
            s.numeric(RPL_INVITELIST, room_name)
        s.numeric(RPL_ENDOFINVITELIST, "End of /INVITE list")
        return
    if len(line.params) < 2:
        s.numeric(N.ERR_NEEDMOREPARAMS, "INVITE", "Not enough parameters")
        return
    nick, name = line.params[0], line.params[1]
    if s.hub.find_user(nick) is None:
        s.numeric(N.ERR_NOSUCHNICK, nick[:64], "No such nick/channel")
        return
    room = visible_room(s, name)
    if room is None:
        s.numeric(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
        return
    s.ask(InviteUser(room.name, nick), refused=lambda exc: refuse(s, exc, room.name, nick))


def refuse(s: "IrcSession", exc: ChatError, room: str, nick: str = "") -> None:
    """A refusal of the core's about a room (and a nick), as IRC's numeric for it."""
    code = exc.code
    numeric = _REFUSALS.get(code)
    if code == "unavailable":  # (with --redis, while the cluster cannot order the change)
        s.fail(s.pending or "*", "TEMPORARILY_UNAVAILABLE", room[:64], text=exc.message)
    elif code == "no_such_nick" and nick:
        if s.hub.find_user(nick) is not None:
            s.numeric(N.ERR_USERNOTINCHANNEL, nick[:64], room[:64], "They aren't on that channel")
        else:
            s.numeric(N.ERR_NOSUCHNICK, nick[:64], "No such nick/channel")
    elif code == "already_in_room":
        s.numeric(N.ERR_USERONCHANNEL, nick[:64], room[:64], "is already on channel")
    elif numeric is not None:
        s.numeric(numeric[0], room[:64], numeric[1])
    elif code == "ban_list_full":
        s.numeric(N.ERR_BANLISTFULL, room[:64], "b", "Channel ban list is full")
    else:
        s.numeric(N.ERR_TOOMANYCHANNELS if code == "too_many_rooms" else N.ERR_CANNOTSENDTOCHAN,
                  room[:64], exc.message)


_REFUSALS = {
    "not_operator": (N.ERR_CHANOPRIVSNEEDED, "You're not channel operator"),
    "not_in_room": (N.ERR_NOTONCHANNEL, "You're not on that channel"),
    "no_such_room": (N.ERR_NOSUCHCHANNEL, "No such channel"),
    "banned": (N.ERR_BANNEDFROMCHAN, "Cannot join channel (+b)"),
    "invite_only": (N.ERR_INVITEONLYCHAN, "Cannot join channel (+i)"),
    "bad_key": (N.ERR_BADCHANNELKEY, "Cannot join channel (+k)"),
    "room_full": (N.ERR_CHANNELISFULL, "Cannot join channel (+l)"),
    "moderated": (N.ERR_CANNOTSENDTOCHAN, "Cannot send to channel (+m)"),
}


def mode(s: "IrcSession", line: Line) -> None:
    target = line.params[0]
    if target.startswith("#"):
        room = visible_room(s, target)
        if room is None:
            s.numeric(N.ERR_NOSUCHCHANNEL, target[:64], "No such channel")
            return
        if len(line.params) == 1:
            s.ask(SetModes(room.name), pending="MODE")
            return
        wanted = parse_modes(line.params[1:])
        for letter in wanted.unknown:
            s.numeric(N.ERR_UNKNOWNMODE, letter, "is unknown mode char to me")
        for letter, arg, why in wanted.invalid:
            s.numeric(N.ERR_INVALIDMODEPARAM, room.name, letter, arg, why)
        if wanted.list_bans:
            s.ask(SetModes(room.name), pending="MODE b")
        if wanted.changes:
            s.ask(SetModes(room.name, tuple(wanted.changes)),
                  refused=lambda exc: refuse(s, exc, room.name, _nick_of(exc, wanted.changes)))
    elif fold(target) != fold(s.me):
        s.numeric(N.ERR_USERSDONTMATCH, "Cannot change mode for other users")
    else:
        user_mode(s, line.params[1] if len(line.params) > 1 else "")


def user_mode(s: "IrcSession", modes: str) -> None:
    """User modes, kept by this connection: +i (invisible: WHO masks list you only to those
    who share a room with you), +B (a bot), +w (WALLOPS reach you); `+o` comes with OPER
    only. Others are ignored."""
    if not modes:
        s.send_line(f":{s.server} 221 {s.me} {_user_modes(s)}")
        return
    sign, changed = "+", ""
    for letter in modes:
        if letter in "+-":
            sign = letter
        elif letter == "i" and s.invisible != (sign == "+"):
            s.invisible = sign == "+"
            changed += sign + "i"
        elif letter == "B" and s.bot != (sign == "+"):
            s.bot = sign == "+"
            changed += sign + "B"
        elif letter == "w" and (s in s.door.wallops) != (sign == "+"):
            if sign == "+":
                s.door.wallops.add(s)
            else:
                s.door.wallops.discard(s)
            changed += sign + "w"
    if changed:
        if "i" in changed or "B" in changed:
            s.hub.connection_modes(s, invisible=s.invisible, bot=s.bot)  # (other processes' WHO)
        s.send_line(f":{s.me} MODE {s.me} :{changed}")
    else:
        s.send_line(f":{s.server} 221 {s.me} {_user_modes(s)}")


def _user_modes(s: "IrcSession") -> str:
    modes = "+" + ("B" if s.bot else "") + ("i" if s.invisible else "") + ("w" if s in s.door.wallops else "")
    user = s.user
    if user is not None and s.hub.is_server_operator(user):
        modes += "o"
    return modes


def _nick_of(exc: ChatError, changes: list) -> str:
    """The nick a refusal names (the core's message quotes it), for 441/401."""
    if exc.code != "no_such_nick":
        return ""
    for name, value in changes:
        if name in ("op", "deop", "voice", "devoice"):
            for nick in value:
                if repr(nick) in exc.message or nick in exc.message:
                    return nick
    return ""
