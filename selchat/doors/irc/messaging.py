"""PRIVMSG, NOTICE and TAGMSG: IRC lines become `Say`, `Msg` and `Tag` requests for the hub.

What the chat refuses comes back as a ChatError and is put in IRC's words here; a NOTICE is
never answered with an error (RFC 2812: no automatic reply may follow a notice).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from selchat.core.names import has_control_characters, text_problem
from selchat.core.requests import Msg, Say, Tag
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import Line
from selchat.doors.irc.text import ctcp_action, parse_ctcp, strip_formatting
from selchat.hub import ChatError

if TYPE_CHECKING:
    from selchat.doors.irc.session import IrcSession

TARGMAX = 4  # targets of one PRIVMSG/NOTICE


def client_tags(line: Line) -> tuple:
    """The client-only tags ("+key") of a line, to relay; all other tags are the server's to set."""
    return tuple((k, v) for k, v in line.tags.items() if k.startswith("+") and len(k) > 1)


def privmsg(s: "IrcSession", line: Line) -> None:
    _message(s, line, notice=False)


def notice(s: "IrcSession", line: Line) -> None:
    _message(s, line, notice=True)


def tagmsg(s: "IrcSession", line: Line) -> None:
    user = s.user
    assert user is not None
    if not line.params or not line.params[0]:
        s.numeric(N.ERR_NORECIPIENT, "No recipient given (TAGMSG)")
        return
    tags = client_tags(line)
    if "message-tags" not in s.caps or not tags:
        return  # nothing to relay
    for target in line.params[0].split(",")[:TARGMAX]:
        if not target:
            continue
        s.ask(Tag(target, tags), refused=lambda exc, target=target: _tag_refused(s, target, exc))


def _message(s: "IrcSession", line: Line, notice: bool) -> None:
    user = s.user
    assert user is not None
    quiet = notice  # no automatic replies to a NOTICE, errors included (RFC 2812)
    if not line.params or not line.params[0]:
        if not quiet:
            s.numeric(N.ERR_NORECIPIENT, f"No recipient given ({line.command})")
        return
    if len(line.params) < 2 or not line.params[1]:
        if not quiet:
            s.numeric(N.ERR_NOTEXTTOSEND, "No text to send")
        return
    text = line.params[1]
    if not _fits(user, line.command, line.params[0], text):
        if not quiet:
            s.numeric(N.ERR_INPUTTOOLONG, "Input line was too long")
        return
    action = False
    ctcp = parse_ctcp(text)
    if ctcp is not None:
        if ctcp[0].upper() != "ACTION":
            return  # other CTCP requests (VERSION, PING, ...) are not carried between doors
        action = True
        text = ctcp_action(text) or ""
    text = strip_formatting(text)
    tags = client_tags(line) if "message-tags" in s.caps else ()
    if s.bot:
        tags += (("bot", ""),)  # IRCv3 bot mode: to clients that take message tags
    targets = line.params[0].split(",")
    if len(targets) > TARGMAX:
        if not quiet:
            s.numeric(N.ERR_TOOMANYTARGETS, line.params[0][:64], "Too many targets")
        return
    hub = s.hub
    for target in targets:
        if not target:
            continue
        problem = text_problem(text, s.door.max_text)
        if problem is not None:
            if not quiet:
                if has_control_characters(text):
                    s.numeric(N.ERR_CANNOTSENDTOCHAN, target[:64],
                              "Cannot send: control characters are not allowed")
                elif "empty" in problem or "only" in problem:
                    s.numeric(N.ERR_NOTEXTTOSEND, "No text to send")
                else:
                    s.numeric(N.ERR_CANNOTSENDTOCHAN, target[:64], f"Cannot send: {problem}")
            continue
        if target.startswith("#"):
            if hub.find_room(target) is None:
                if not quiet:
                    s.numeric(N.ERR_NOSUCHCHANNEL, target[:64], "No such channel")
                continue
            request: Any = Say(target, text, action, notice, tags)
        else:
            request = Msg(target, text, action, notice, tags)
        failed = False

        def refused(exc: ChatError, target: str = target) -> None:
            nonlocal failed
            failed = True
            if not quiet:
                _refused(s, line.command, target, exc)

        s.ask(request, refused=refused)
        if failed:
            continue
        if not target.startswith("#") and not quiet:
            to = hub.find_user(target)
            if to is not None and to.away:
                s.numeric(N.RPL_AWAY, to.nick, to.away)


def _fits(user: Any, command: str, targets: str, text: str) -> bool:
    """What the recipients get is our source prefix plus this text: if that cannot be one line
    of 512 bytes, the message is refused whole (417) rather than cut or split, as an IRC
    server does; only texts from other doors (which may be long) are split."""
    userhost = user.userhost
    if userhost.isascii() and targets.isascii():  # (nicks are ASCII: the lengths are the bytes)
        prefix = len(user.nick) + len(userhost) + len(command) + len(targets) + 6
    else:
        prefix = len(f":{user.nick}!{userhost} {command} {targets} :".encode())
    return prefix + (len(text) if text.isascii() else len(text.encode("utf-8", "replace"))) <= 510


def quick_privmsg(s: "IrcSession", raw: bytes) -> bool:
    """The busiest line, `PRIVMSG #room :text` with nothing unusual in it, carried out as
    `privmsg` would without parsing it into a `Line`: no tags, no source, one target, printable
    ASCII text (so no CTCP and no formatting to strip) that the chat's text rule takes, a
    channel that exists, a client that is not a bot. False: the line was left untouched, for
    the general path. tests/test_review21_hotpath.py holds the two paths to the same result."""
    if not raw.startswith(b"PRIVMSG #") or not raw.isascii() or s.bot:
        return False
    line = raw.decode("ascii")
    colon = line.find(" :", 9)
    if colon < 0:
        return False
    target = line[8:colon]
    text = line[colon + 2:]
    if (not text or " " in target or "," in target or not text.isprintable()
            or text_problem(text, s.door.max_text) is not None):
        return False
    user = s.user
    if user is None or not _fits(user, "PRIVMSG", target, text) or s.hub.find_room(target) is None:
        return False
    s.ask(Say(target, text), refused=lambda exc: _refused(s, "PRIVMSG", target, exc))
    return True


def _tag_refused(s: "IrcSession", target: str, exc: ChatError) -> None:
    if exc.code == "not_in_room":
        if s.hub.find_room(target) is not None:
            s.numeric(N.ERR_CANNOTSENDTOCHAN, target[:64], "Cannot send to channel")
        else:
            s.numeric(N.ERR_NOSUCHCHANNEL, target[:64], "No such channel")
    else:
        s.numeric(N.ERR_NOSUCHNICK, target[:64], "No such nick/channel")


def _refused(s: "IrcSession", command: str, target: str, exc: ChatError) -> None:
    """The core's refusal of a message, in IRC's words."""
    code = exc.code
    if code in ("not_in_room", "moderated", "banned"):
        why = {"not_in_room": "Cannot send to channel", "moderated": "Cannot send to channel (+m)",
               "banned": "Cannot send to channel (you are banned)"}[code]
        s.numeric(N.ERR_CANNOTSENDTOCHAN, target[:64], why)
    elif code == "no_such_nick":
        s.numeric(N.ERR_NOSUCHNICK, target[:64], "No such nick/channel")
    else:
        s.fail(command, code.upper(), target[:64], text=exc.message)
