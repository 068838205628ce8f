"""The core's events, as this connection's own IRC lines.

What goes to many (a room's JOIN, PRIVMSG, KICK, ...) is encoded once per format in `wire`;
what goes to one connection comes here: the answer to what it asked (JOIN's names and topic,
MODE's 324 or ban list, INVITE's 341, REGISTER's and OPER's success), the echo of what it did
(with its label), and the copies of what its user did on another connection (one account on
several devices: they see it as if they had done it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from selchat.core import events
from selchat.core.names import fold
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.wire import ban_display, mode_text

if TYPE_CHECKING:
    from selchat.doors.irc.session import IrcSession

FLAG_LETTERS = (("invite_only", "i"), ("moderated", "m"), ("no_external", "n"), ("secret", "s"),
                ("topic_locked", "t"))


def reply(s: "IrcSession", event: events.Event) -> None:
    kind = type(event)
    handler = _REPLIES.get(kind)
    if handler is not None:
        handler(s, event)
    # Names: a JOIN lists the room itself (everyone, even in a large room); pong, rooms: the
    # IRC door answers those itself.


def _welcome(s: "IrcSession", event: events.Welcome) -> None:
    from selchat.doors.irc.registration import welcome

    s.reg.nick = event.nick  # a connection of a user online elsewhere takes the user's nick
    welcome(s)


def _message(s: "IrcSession", event: events.Message) -> None:
    if s.mirrored():
        s.raw(s.wire.message(event))  # said on another connection of ours: shown here too
        return
    s.raw(s.own_message(event, None, b""))  # the echo, with echo-message
    if event.to is not None and event.room is None and fold(event.to) == fold(event.sender):
        s.raw(s.wire.message(event))  # to ourselves: received, too (not part of the answer)


def _signal(s: "IrcSession", event: events.Signal) -> None:
    if s.mirrored():
        s.raw(s.wire.signal(event))
    else:
        if "echo-message" in s.caps:
            line = s.wire.signal(event)
            if s.response.collecting:
                s.answer_lines(line)
            else:
                s.raw(line)
        if event.to is not None and event.room is None and fold(event.to) == fold(event.sender):
            s.raw(s.wire.signal(event))  # to ourselves: received, too (not part of the answer)


def _join(s: "IrcSession", event: events.Join) -> None:
    from selchat.doors.irc.channels import send_names, send_topic
    from selchat.doors.irc.markread import tell as tell_marker

    s.send_line(s.wire.line(event))
    room = s.hub.find_room(event.room)
    if room is not None:
        # IRC's order: JOIN, the topic (332, 333), the names; the core's Topic that follows
        # in the view is then left out (`_viewing`, until the view's history ends it).
        s._viewing = room.key
        if room.topic:
            send_topic(s, room)
        tell_marker(s, room.name)  # (draft/read-marker: before 366)
        send_names(s, room)
        user = s.user
        if user is not None and user.away and not s.mirrored():
            from selchat.doors.irc.queries import tell_away

            tell_away(s, user, room.members, watchers=False)  # away-notify: the joiner is away


def _line(s: "IrcSession", event: events.Event) -> None:
    line = s.wire.line(event)
    if line:
        s.send_line(line)


def _topic(s: "IrcSession", event: events.Topic) -> None:
    if s._viewing == fold(event.room):
        return  # shown with the JOIN already
    s.send_line(s.wire.line(event))


def _history(s: "IrcSession", event: events.History) -> None:
    s._viewing = None
    if event.room is None:
        # A private conversation: the messages that came while the account was away, after
        # welcome (IRC's CHATHISTORY reads history through the hub, not as this event).
        if event.messages:
            s.send_history(event.with_ or "*", event.messages, "chathistory")
        return
    if "draft/chathistory" not in s.caps and event.messages:
        s.send_history(event.room, event.messages, "chathistory")


def _kick(s: "IrcSession", event: events.Kick) -> None:
    _line(s, event)


def _invite(s: "IrcSession", event: events.Invite) -> None:
    """The inviter's answer (the invitee's INVITE line is the wire's)."""
    if not s.mirrored():
        s.numeric(N.RPL_INVITING, event.nick or event.to, event.room)


def _mode_change(s: "IrcSession", event: events.ModeChange) -> None:
    _line(s, event)


def _mode_info(s: "IrcSession", event: events.ModeInfo) -> None:
    if s.pending == "MODE b":
        setters = {mask: (by, ts) for mask, by, ts in event.ban_info}
        for mask in event.bans:
            by, ts = setters.get(mask, ("", 0))
            s.numeric(N.RPL_BANLIST, event.room, ban_display(mask), by or s.server, str(ts // 1000))
        s.numeric(N.RPL_ENDOFBANLIST, event.room, "End of channel ban list")
        return
    modes = dict(event.modes)
    room = s.hub.find_room(event.room)
    modes["no_external"] = room is None or room.no_external
    letters = "+" + "".join(letter for name, letter in FLAG_LETTERS if modes.get(name))
    args = []
    if modes.get("key") is not None:
        letters += "k"
        args.append(str(modes["key"]))
    if modes.get("limit") is not None:
        letters += "l"
        args.append(str(modes["limit"]))
    s.send_line(f":{s.server} {int(N.RPL_CHANNELMODEIS):03d} {s.me} {event.room} "
                + " ".join([letters] + args))
    s.numeric(N.RPL_CREATIONTIME, event.room, str(event.created // 1000))


def _account_info(s: "IrcSession", event: events.AccountInfo) -> None:
    from selchat.doors.irc.accounts import account_answer

    account_answer(s, event)


def _account_change(s: "IrcSession", event: events.AccountChange) -> None:
    _line(s, event)


def _notice(s: "IrcSession", event: events.Notice) -> None:
    s.notice(event.text)


def _error(s: "IrcSession", event: events.Error) -> None:
    error(s, event.code, event.message)


def error(s: "IrcSession", code: str, message: str) -> None:
    """An error that comes as an event or later from the hub: in the pending command's words."""
    from selchat.doors.irc.accounts import pending_failed

    if not pending_failed(s, code, message):
        s.notice(message)


_REPLIES = {
    events.Welcome: _welcome,
    events.Message: _message,
    events.Signal: _signal,
    events.Join: _join,
    events.Part: _line,
    events.NickChange: _line,
    events.Quit: _line,
    events.History: _history,
    events.Topic: _topic,
    events.Kick: _kick,
    events.Invite: _invite,
    events.ModeChange: _mode_change,
    events.ModeInfo: _mode_info,
    events.AccountInfo: _account_info,
    events.AccountChange: _account_change,
    events.Notice: _notice,
    events.Error: _error,
}

__all__ = ["reply", "error", "mode_text"]
