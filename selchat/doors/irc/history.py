"""IRCv3 `draft/chathistory` over the same history as the native `history` request.

`CHATHISTORY LATEST|BEFORE|AFTER|AROUND|BETWEEN <target> <ref> [<ref>] <limit>`, where a ref
is `msgid=N` (our message ids) or `timestamp=ISO-8601`, or `*` for LATEST. Answers come as
one `chathistory` batch, oldest first. Rooms: those the asker is in. A nick: the private
conversation of two accounts (contract 11.1), when the asker is logged in and the nick is, or
names, an account; a guest's private messages are never history (a nick is not an account:
whoever takes a nick later must not read what was said to its last owner), so a guest gets an
empty batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from selchat.core.events import Message
from selchat.defaults import HISTORY_LIMIT_MAX
from selchat.doors.irc.parser import Line
from selchat.doors.irc.response import batch_id
from selchat.doors.irc.wire import iso_time, parse_time
from selchat.hub import ChatError

if TYPE_CHECKING:
    from selchat.doors.irc.session import IrcSession

Ref = Tuple[str, int]  # ("msgid", id) or ("timestamp", ms)


def _digits(text: str) -> bool:
    """ASCII digits only: str.isdigit also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _ref(text: str) -> Optional[Ref]:
    kind, _, value = text.partition("=")
    number, _, part = value.partition(".")  # N.k names line k of message N: message N
    if kind == "msgid" and _digits(number) and (not part or _digits(part)):
        return ("msgid", int(number))
    if kind == "timestamp":
        ms = parse_time(value)
        if ms is not None:
            return ("timestamp", ms)
    return None


def _bounds(ref: Ref, side: str) -> dict:
    """Store bounds for "strictly after" / "strictly before" a ref."""
    kind, value = ref
    if kind == "msgid":
        return {side: value}
    return {side + "_ts": value}


def chathistory(session: "IrcSession", line: Line) -> None:
    params = line.params

    def fail(code: str, *context: str, text: str) -> None:
        session.fail("CHATHISTORY", code, *context, text=text)

    if len(params) < 3:
        fail("NEED_MORE_PARAMS", text="Missing parameters")
        return
    sub = params[0].upper()
    if sub == "TARGETS":
        _targets(session, params, fail)
        return
    if sub not in ("LATEST", "BEFORE", "AFTER", "AROUND", "BETWEEN"):
        fail("INVALID_PARAMS", params[0][:32], text="Unknown subcommand")
        return
    target = params[1]
    want = 5 if sub == "BETWEEN" else 4
    if len(params) < want:
        fail("NEED_MORE_PARAMS", sub, text="Missing parameters")
        return
    limit_text = params[want - 1]
    if not _digits(limit_text) or int(limit_text) < 1:
        fail("INVALID_PARAMS", sub, limit_text[:32], text="Bad limit")
        return
    limit = min(int(limit_text), HISTORY_LIMIT_MAX)
    user = session.user
    assert user is not None
    hub = session.hub
    private = not target.startswith("#")
    if private:
        if hub.find_user(target) is None and hub.account_name(target) is None:
            fail("INVALID_TARGET", sub, target[:64], text="No such target")
            return
        if user.account is None:
            session.send_history(target, [], "chathistory")  # a guest's are never history
            return
    elif not hub.is_member(user, target):
        fail("INVALID_TARGET", sub, target[:64], text="You are not in that channel")
        return
    refs: List[Optional[Ref]] = []
    for text in params[2:want - 1]:
        if sub == "LATEST" and text == "*":
            refs.append(None)
            continue
        ref = _ref(text)
        if ref is None:
            fail("INVALID_PARAMS", sub, text[:64], text="Bad message reference")
            return
        refs.append(ref)
    def window(**bounds: object) -> List[Message]:
        return hub.history_window(user, target, **bounds)  # type: ignore[arg-type]

    try:
        messages = _query(window, sub, refs, limit)
    except ChatError as exc:
        if exc.code == "not_in_room":
            fail("INVALID_TARGET", sub, target[:64], text="You are not in that channel")
        elif exc.code in ("no_such_nick", "not_logged_in"):
            session.send_history(target, [], "chathistory")  # not an account: no history
        else:
            fail("MESSAGE_ERROR", sub, target[:64], text="History cannot be read right now")
        return
    if private:
        name = target
    else:
        room = hub.find_room(target)
        name = room.name if room is not None else target
    session.send_history(name, messages, "chathistory")


def _targets(session: "IrcSession", params: List[str], fail: Callable[..., None]) -> None:
    """`CHATHISTORY TARGETS timestamp=A timestamp=B limit`: the rooms and the private
    conversations with a message between the two times, ordered by their newest message, at
    most `limit` counted from A (as irctest's test of it counts), as `CHATHISTORY TARGETS
    <target> <time>` lines in one batch."""
    if len(params) < 4:
        fail("NEED_MORE_PARAMS", "TARGETS", text="Missing parameters")
        return
    times = [_ref(text) for text in params[1:3]]
    if any(ref is None or ref[0] != "timestamp" for ref in times):
        fail("INVALID_PARAMS", "TARGETS", params[1][:64], text="Targets are asked by timestamp")
        return
    if not _digits(params[3]) or int(params[3]) < 1:
        fail("INVALID_PARAMS", "TARGETS", params[3][:32], text="Bad limit")
        return
    first, second = (ref[1] for ref in times)  # type: ignore[index]
    low, high = sorted((first, second))
    user = session.user
    assert user is not None
    try:
        found = session.hub.history_targets(user, low, high, min(int(params[3]), HISTORY_LIMIT_MAX),
                                            from_start=first <= second)
    except ChatError:
        fail("MESSAGE_ERROR", "TARGETS", text="History cannot be read right now")
        return
    server = session.server
    batch = "batch" in session.caps
    ref = batch_id("T")
    if batch:
        session.send_line(f":{server} BATCH +{ref} draft/chathistory-targets")
    tag = f"@batch={ref} " if batch else ""
    for name, ts in found:
        session.send_line(f"{tag}:{server} CHATHISTORY TARGETS {name} {iso_time(ts)}")
    if batch:
        session.send_line(f":{server} BATCH -{ref}")


def _query(window: Callable[..., List[Message]], sub: str, refs: List[Optional[Ref]],
           limit: int) -> List[Message]:
    if sub == "LATEST":
        bounds = _bounds(refs[0], "after") if refs[0] is not None else {}
        return window(limit=limit, latest=True, **bounds)
    ref = refs[0]
    assert ref is not None
    if sub == "BEFORE":
        return window(limit=limit, latest=True, **_bounds(ref, "before"))
    if sub == "AFTER":
        return window(limit=limit, latest=False, **_bounds(ref, "after"))
    if sub == "AROUND":
        kind, value = ref
        # The reference itself (if it is a message) and up to half the limit before it.
        upto = _bounds((kind, value + 1), "before")
        lower = window(limit=(limit + 1) // 2, latest=True, **upto)
        upper = window(limit=limit - len(lower), latest=False, **_bounds(ref, "after"))
        return lower + upper
    other = refs[1]
    assert other is not None
    low, high = sorted((ref, other), key=lambda r: r[1]) if ref[0] == other[0] else (ref, other)
    from_start = ref is low  # counted from the first reference given
    bounds = {**_bounds(low, "after"), **_bounds(high, "before")}
    return window(limit=limit, latest=not from_start, **bounds)
