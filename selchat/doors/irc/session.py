"""The IRC door: one session per connection, over a transport (docs/irc.md).

An IRC client registers the IRC way (CAP, PASS, NICK, USER), and its commands become the
chat's requests for the hub; the hub's events come back as IRC lines. Rooms are channels of
the same name, nicks are the one namespace of every door, ids are msgid tags.

Flood control is IRC's: lines are charged to the connection's token bucket from its first
byte; when the bucket is empty the session stops reading ("fake lag") and serves the next line
when a token is due; a peer that keeps sending while lagged piles up unread input, and past
RECVQ bytes of it is disconnected with `ERROR :Excess Flood`.

Expensive answers are weighed and bounded, as the native door's are. What a line's answer
queued beyond its first FREE_ANSWER_BYTES is billed to the bucket (`answer_cost`), and the
debt is waited out by the same fake lag: later lines are served later, never refused, and a
client lagged only by such a debt (its count of lines within the rate) is not an excess flood.
No answer queues more than the client's output buffer can hold: `LIST` streams ("safelist"),
writing its rooms in key order while the queue is below `_answer_budget()` and continuing
from the last key sent once the client has read them (nothing else is served meanwhile);
`NAMES` and `WHO` are cut at that budget, with 416 before their usual end numeric.
"""

from __future__ import annotations

import fnmatch
import heapq
import hmac
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from selchat import __version__
from selchat.core import events
from selchat.core.chat import ChatError, Room, User
from selchat.core.names import fold, has_control_characters, text_problem, valid_nick, valid_room
from selchat.core.ratelimit import TokenBucket, answer_cost, cpu_cost
from selchat.core.requests import ChangeNick, JoinRoom, Msg, PartRoom, Say, Tag
from selchat.defaults import HISTORY_LIMIT_MAX, NICK_MAX, ROOM_MAX
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import TOO_LONG, IrcParseError, Line, LineDecoder, body_budget, parse_line
from selchat.doors.irc.text import ctcp_action, parse_ctcp, split_for_irc, strip_formatting
from selchat.doors.irc.wire import IrcWire, WireSet
from selchat.doors.base import DoorSession
from selchat.hub import Hub
from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer
from selchat.loop.transport import State, Transport

log = logging.getLogger("selchat.server")

RECVQ = 8192  # unread input bytes a lagged client may pile up before "Excess Flood"
HOST = "irc.selchat"  # the host part every IRC user shows (addresses are never shown)
TARGMAX = 4  # targets of one PRIVMSG/NOTICE
WHO_MAX = 200  # users one WHO with a mask may list
ANSWER_BYTES = 65536  # one answer's queue above the low-water mark (see _answer_budget)
FREE_ANSWER_BYTES = 4096  # what a line's answer may queue before it costs more than its token
LIST_PAGE = 100  # rooms a streaming LIST asks the chat for at a time
ERR_TOOMANYMATCHES = 416  # an answer cut short (hybrid, ratbox: "output too large, truncated")
MIN_LAG = 0.001  # seconds: a lag timer is never due in the past (it would fire in this pass)
CAPS = ("message-tags", "server-time", "echo-message", "batch", "labeled-response",
        "multi-prefix", "userhost-in-names", "draft/chathistory", "cap-notify")

REFUSALS = {
    "server_full": "The server is full",
    "too_many_connections": "Too many connections from your address",
}


@dataclass
class IrcDoor:
    """What every IRC session shares."""

    hub: Hub
    reactor: Reactor
    server_name: str
    max_text: int
    rate: float
    burst: int
    handshake_timeout: float
    ping_interval: float
    ping_timeout: float
    password: Optional[bytes] = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

    def __post_init__(self) -> None:
        self.wires = WireSet(self.server_name)
        self.isupport = [
            "AWAYLEN=390", "CASEMAPPING=ascii", "CHANLIMIT=#:100", "CHANMODES=,,,",
            f"CHANNELLEN={ROOM_MAX + 1}", "CHANTYPES=#", f"CHATHISTORY={HISTORY_LIMIT_MAX}",
            "LINELEN=512", "MAXTARGETS=4", "MODES=0", "MSGREFTYPES=msgid,timestamp",
            "NETWORK=selchat", f"NICKLEN={NICK_MAX}", "PREFIX=(ov)@+", "SAFELIST", "STATUSMSG=",
            f"TARGMAX=PRIVMSG:{TARGMAX},NOTICE:{TARGMAX},JOIN:,PART:,NAMES:{TARGMAX},WHOIS:1,ISON:,USERHOST:5",
            "TOPICLEN=390", "USERLEN=16", "UTF8ONLY",
        ]

    def session(self, reject: Optional[str] = None) -> "IrcSession":
        return IrcSession(self, reject)


_batch_ids = itertools.count(1)


class _ListStream:
    """A LIST being streamed: the key of the last room looked at, where its output began."""

    __slots__ = ("after", "start", "batch")

    def __init__(self, start: int) -> None:
        self.after = ""  # rooms_by_name's cursor: a key, so rooms coming and going never shift it
        self.start = start  # `_produced` when the answer began (for billing)
        self.batch: Optional[str] = None  # the labeled-response batch its lines belong to


class IrcSession(DoorSession):
    __slots__ = ("door", "hub", "wire", "transport", "decoder", "user", "bucket", "last_seen",
                 "pinged", "doomed", "reject", "nick", "ident", "realname", "password", "caps",
                 "cap_negotiating", "cap_version", "label", "welcoming", "_collected", "_timers", "_lagged",
                 "_handshake_timer", "_idle_timer", "_produced", "_billed", "_answer_start",
                 "_listing", "_label_taken", "__weakref__", "_turn", "_next_pass")

    def __init__(self, door: IrcDoor, reject: Optional[str] = None) -> None:
        self.door = door
        self.hub = door.hub
        self.wire: IrcWire = door.wires.get(False, False)
        self.transport: Transport = None  # type: ignore[assignment]  # set by connection_made
        self.decoder = LineDecoder()
        self.user: Optional[User] = None
        self.bucket = TokenBucket(door.reactor.now, door.rate, door.burst) if door.rate > 0 else None
        self.last_seen = door.reactor.now
        self.pinged = False
        self.doomed = False
        self.reject = reject
        self.nick: Optional[str] = None  # asked for before registration
        self.ident: Optional[str] = None
        self.realname = ""
        self.password: Optional[str] = None
        self.caps: set = set()
        self.cap_negotiating = False
        self.cap_version = 0
        self.label: Optional[str] = None  # the label of the command being served
        self.welcoming = False  # registering now: the welcome burst is addressed to our nick
        self._collected: Optional[List[str]] = None  # lines answering a labeled command
        self._lagged: Optional[Timer] = None
        self._turn: Any = None  # waiting for the address's turn to register (a pacer ticket)
        self._next_pass = False  # the pass's share of requests is served: going on in the next
        self._handshake_timer: Optional[Timer] = None
        self._idle_timer: Optional[Timer] = None
        self._produced = 0  # bytes of our own lines so far (answers, collected ones included)
        self._billed = 0  # `_produced` up to which output has been billed
        self._answer_start = 0  # `_produced` when the line being served began
        self._listing: Optional[_ListStream] = None  # a LIST still streaming: no line is served
        self._label_taken = False  # the command's label went to a stream's batch of its own

    @property
    def me(self) -> str:
        """Our nick as the target of our numerics: "*" until registration is done."""
        if self.user is not None:
            return self.user.nick
        return self.nick if self.welcoming and self.nick else "*"

    @property
    def name(self) -> str:
        peer = self.transport.peer if self.transport is not None else "?"
        return f"{peer} ({self.user.nick})" if self.user is not None else peer

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        reactor = self.door.reactor
        self._handshake_timer = reactor.call_later(self.door.handshake_timeout, self._handshake_deadline)
        if self.reject is not None:
            self._error(REFUSALS.get(self.reject, self.reject))
            transport.close(self.reject)
            return
        self._idle_timer = reactor.call_later(self.door.ping_interval, self._idle_check)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.door.reactor.now
        self.pinged = False
        self.decoder.feed(data)
        self._serve()

    def eof_received(self) -> None:
        self._serve()
        if self.transport.state is State.OPEN and self._listing is None:
            self._close("connection closed", "peer closed")  # else once the LIST has been sent

    def resume_serving(self) -> None:
        """Our queue drained: the LIST being streamed goes on, or the next lines are served."""
        if self._listing is not None:
            self._list_more()
            if self._listing is not None:
                return
        self._serve()

    def output_overflow(self) -> None:
        if not self.doomed:
            self.doomed = True
            self.hub.condemn(self, "slow consumer")

    def connection_lost(self, detail: str) -> None:
        for timer in (self._handshake_timer, self._idle_timer, self._lagged):
            if timer is not None:
                timer.cancel()
        self._handshake_timer = self._idle_timer = self._lagged = None
        self._listing = None  # a stream is driven by our drain and timers only: it just ends
        self._cancel_turn()
        self.decoder = LineDecoder()
        self.bucket = None
        user, self.user = self.user, None
        if user is not None:
            self.hub.leave(user, "connection closed")

    # --- for the hub and the fan-out ----------------------------------------------------------

    def reply(self, event: events.Event, ref: Any) -> None:
        """The requester's own copy of an event; `ref` is unused (the label is `self.label`)."""
        kind = type(event)
        user = self.user
        if kind is events.Welcome:
            self._welcome()
        elif kind is events.Message:
            if "echo-message" in self.caps:
                self._raw(self.own_message(event, None, b""))  # type: ignore[arg-type]
        elif kind is events.Signal:
            if "echo-message" in self.caps:
                extra = f"label={self.label}" if self.label and "labeled-response" in self.caps else ""
                line = self.wire.signal(event, extra)  # type: ignore[arg-type]
                if line and extra:
                    self.label = None  # the echo is the labeled answer
                    self._collected = None
                self._raw(line)
        elif kind is events.Join:
            self._line(f":{self._source(user)} JOIN {event.room}")  # type: ignore[union-attr]
            room = self.hub.chat.rooms.get(fold(event.room))  # type: ignore[union-attr]
            if room is not None:
                self._names(room)
        elif kind is events.Part:
            reason = f" :{event.reason}" if event.reason else ""  # type: ignore[union-attr]
            self._line(f":{event.nick}!{event.userhost} PART {event.room}{reason}")  # type: ignore[union-attr]
        elif kind is events.NickChange:
            if event.old != event.new:  # type: ignore[union-attr]
                self._line(f":{event.old}!{event.userhost} NICK {event.new}")  # type: ignore[union-attr]
        elif kind is events.History:
            if "draft/chathistory" not in self.caps:
                self._replay(event)  # type: ignore[arg-type]
        elif kind is events.Notice:
            self._line(f":{self.door.server_name} NOTICE {self.me} :{event.text}")  # type: ignore[union-attr]
        elif kind is events.Error:
            self._line(f":{self.door.server_name} NOTICE {self.me} :{event.message}")  # type: ignore[union-attr]
        # Names comes with our own JOIN (see above); pong, rooms: the IRC door answers itself.

    def own_message(self, msg: events.Message, ref: Any, shared: bytes) -> bytes:
        if "echo-message" not in self.caps:
            return b""
        extra = f"label={self.label}" if self.label and "labeled-response" in self.caps else ""
        if not extra and shared:
            return shared
        if extra:
            self.label = None  # one answer carries the label, the first
        return self.wire.message(msg, extra)

    def send_error(self, code: str, message: str, ref: Any) -> None:
        self._line(f":{self.door.server_name} NOTICE {self.me} :{message}")

    def notice(self, text: str) -> None:
        self._line(f":{self.door.server_name} NOTICE {self.me} :{text}")

    SHUTDOWN_NOTICE = "Server shutting down"

    def _shutdown_words(self) -> None:
        self._error("Server shutting down")

    # --- output -------------------------------------------------------------------------------

    def _raw(self, data: bytes) -> None:
        if data:
            self.hub.fanout.send(self.transport, data)

    def _line(self, line: str) -> None:
        """One line of ours (without CRLF), as an answer to the command being served."""
        if self._collected is not None:
            self._collected.append(line)
            self._produced += len(line) + 2
            return
        data = (line + "\r\n").encode("utf-8", "replace")
        self._produced += len(data)
        self.hub.fanout.send(self.transport, data)

    def _emit(self, line: str) -> None:
        """A line already counted in `_produced` (a labeled answer's lines, sent at its end)."""
        self.hub.fanout.send(self.transport, (line + "\r\n").encode("utf-8", "replace"))

    def _num_text(self, code: int, *params: str) -> str:
        """A numeric to ourselves: `params` are the middle ones, the last is the trailing text."""
        middle = " ".join(params[:-1])
        text = params[-1] if params else ""
        return (f":{self.door.server_name} {int(code):03d} {self.me}"
                + (f" {middle}" if middle else "") + f" :{text}")

    def _num(self, code: int, *params: str) -> None:
        self._line(self._num_text(code, *params))

    def _answer_budget(self) -> int:
        """Bytes one answer may have queued for the client: a LIST waits there, NAMES and WHO stop.

        Above the transport's low-water mark, so that waiting for the drain is waiting for the
        client to read, and at most its high-water mark (a quarter of max_outbuf), so that an
        answer and the lines served before it never come near max_outbuf: a client that reads
        is never dropped as a slow consumer for what it asked.
        """
        transport = self.transport
        return max(1, min(transport.high_water, transport.low_water + ANSWER_BYTES))

    def _bill(self, answer_start: int) -> None:
        """Bill the output since the last bill, beyond the answer's first FREE_ANSWER_BYTES."""
        produced = self._produced
        bucket = self.bucket
        if bucket is not None:
            extra = produced - max(self._billed, answer_start + FREE_ANSWER_BYTES)
            if extra > 0:
                bucket.bill(answer_cost(extra))
        self._billed = produced

    def _error(self, text: str) -> None:
        self._line(f"ERROR :{text}")

    def _source(self, user: Optional[User]) -> str:
        if user is None:
            return self.me
        return f"{user.nick}!{user.userhost}"

    def _close(self, quit_reason: Optional[str], detail: str) -> None:
        self._leave(quit_reason)
        self.transport.close(detail)

    # --- serving ------------------------------------------------------------------------------

    def _serve(self) -> None:
        transport = self.transport
        lines = iter(self.decoder)
        bucket = self.bucket
        now = self.door.reactor.now
        while True:
            if self.doomed or transport.state is not State.OPEN or self._listing is not None:
                return
            if self._turn is not None:
                # Registration waits for the address's turn: nothing is served until then, but
                # reading goes on (so a reset is seen at once) unless much piles up.
                if transport.eof:
                    transport.close("peer closed before its turn to register")
                elif self.decoder.buffered > RECVQ:
                    transport.pause_reading()
                return
            if self.decoder.buffered and not self.hub.take_request():
                # This pass has served its share of requests (Hub.take_request): go on next pass.
                if not self._next_pass:
                    self._next_pass = True
                    transport.pause_reading()
                    self.door.reactor.call_soon(self._go_on)
                return
            # Charged before it is served: a line is taken only when a token is there, so a
            # lagged client gets exactly the rate, never one line more per resume. A debt
            # billed for expensive answers is waited out here too.
            if bucket is not None and bucket.ready_in(now) > 0:
                self._lag(now)
                return
            item = next(lines, None)
            if item is None:
                break
            if bucket is not None:
                bucket.take(now)
            self._answer_start = self._billed = self._produced
            if item is TOO_LONG:
                self._num(N.ERR_INPUTTOOLONG, "Input line was too long")
            else:
                try:
                    line = parse_line(item)  # type: ignore[arg-type]
                except IrcParseError:
                    continue  # an empty or blank line: nothing to say
                self._dispatch(line)
            self._bill(self._answer_start)
            if transport.state is not State.OPEN or self._listing is not None:
                return
            if transport.congested:
                transport.wait_for_drain()
                return
        if transport.eof and transport.state is State.OPEN:
            self._close("connection closed", "peer closed")

    def _go_on(self) -> None:
        self._next_pass = False
        transport = self.transport
        if transport.state is State.OPEN and self._lagged is None and self._listing is None:
            self._serve_again()

    def _lag(self, now: float) -> None:
        """Out of tokens: read nothing more until one is due ("fake lag")."""
        bucket = self.bucket
        assert bucket is not None
        if self.decoder.buffered > RECVQ and self._flooding(bucket, now):
            self.transport.log_info("excess flood", "excess flood from %s", self.name)
            self._error("Excess Flood")
            self._close("excess flood", "excess flood")
            return
        self.transport.pause_reading()
        if self._lagged is None:
            wait = max(MIN_LAG, bucket.ready_in(now))  # a debt makes it longer than 1/rate
            self._lagged = self.door.reactor.call_later(wait, self._unlag)

    @staticmethod
    def _flooding(bucket: TokenBucket, now: float) -> bool:
        """Lagged by its count of lines, not by a debt we billed: only that is a flood.

        (While lagged nothing is read, so what a debt leaves unread stays in the kernel and
        the decoder holds at most one read: waiting out a debt needs no excess-flood bound.)
        """
        count = min(float(bucket.burst), bucket.count + max(0.0, now - bucket.stamp) * bucket.rate)
        return count < 1.0

    def _unlag(self, _: Any = None) -> None:
        self._lagged = None
        if self.transport.state is State.OPEN:
            if self._listing is not None:
                return  # reading resumes, and lines are served, once the LIST has been sent
            self._serve_again()

    def _dispatch(self, line: Line) -> None:
        command = line.command
        handler = _REGISTERED.get(command) if self.user is not None else _UNREGISTERED.get(command)
        label = line.tags.get("label") if "labeled-response" in self.caps else None
        if label is not None:
            self.hub.fanout.flush()  # what was said before carries no label of this command
            self.label = label
            self._collected = []
        try:
            if handler is not None:
                handler(self, line)
            elif self.user is None and command in _REGISTERED:
                self._num(N.ERR_NOTREGISTERED, "You have not registered")
            elif self.user is not None and command in _UNREGISTERED:
                self._num(N.ERR_ALREADYREGISTERED, "You may not reregister")
            else:
                self._num(N.ERR_UNKNOWNCOMMAND, command[:32], "Unknown command")
        finally:
            if label is not None:
                if self._label_taken:
                    self._label_taken = False  # a LIST stream sends its own labeled batch
                else:
                    self._finish_label(command)

    def _finish_label(self, command: str) -> None:
        lines, self._collected = self._collected or [], None
        label = self.label
        if command in ("PRIVMSG", "NOTICE", "TAGMSG") and "echo-message" in self.caps and not lines:
            self.hub.fanout.flush()  # the echo is the answer: it carries the label
            echoed = self.label is None  # own_message (or the TAGMSG echo) used it up
            self.label = None
            if echoed:
                return
        self.label = None
        server = self.door.server_name
        if not lines:
            self._emit(f"@label={label} :{server} ACK")
        elif len(lines) == 1:
            self._emit(_tag(lines[0], f"label={label}"))
        else:
            ref = f"L{next(_batch_ids)}"
            self._emit(f"@label={label} :{server} BATCH +{ref} labeled-response")
            for text in lines:
                self._emit(_tag(text, f"batch={ref}"))
            self._emit(f":{server} BATCH -{ref}")

    # --- registration -------------------------------------------------------------------------

    def _cap(self, line: Line) -> None:
        params = line.params
        if not params:
            self._num(N.ERR_NEEDMOREPARAMS, "CAP", "Not enough parameters")
            return
        sub = params[0].upper()
        server = self.door.server_name
        if sub == "LS":
            if self.user is None:
                self.cap_negotiating = True
            version = int(params[1]) if len(params) > 1 and params[1].isascii() and params[1].isdigit() else 0
            self.cap_version = max(self.cap_version, version)
            offered = " ".join(c for c in CAPS if c != "cap-notify" or version >= 302)
            self._line(f":{server} CAP {self.me} LS :{offered}")
        elif sub == "LIST":
            self._line(f":{server} CAP {self.me} LIST :{' '.join(sorted(self.caps))}")
        elif sub == "REQ":
            if self.user is None:
                self.cap_negotiating = True
            wanted = params[1].split() if len(params) > 1 else []
            ok = all(c.lstrip("-") in CAPS for c in wanted)
            if ok:
                for c in wanted:
                    if c.startswith("-"):
                        self.caps.discard(c[1:])
                    else:
                        self.caps.add(c)
                self.wire = self.door.wires.get("server-time" in self.caps, "message-tags" in self.caps)
            verdict = "ACK" if ok else "NAK"
            self._line(f":{server} CAP {self.me} {verdict} :{' '.join(wanted)}")
        elif sub == "END":
            if self.user is None:
                self.cap_negotiating = False
                self._try_register()
        else:
            self._num(N.ERR_INVALIDCAPCMD, params[0][:32], "Invalid CAP command")

    def _pass(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NEEDMOREPARAMS, "PASS", "Not enough parameters")
            return
        self.password = line.params[0]

    def _nick_cmd(self, line: Line) -> None:
        if not line.params or not line.params[0]:
            self._num(N.ERR_NONICKNAMEGIVEN, "No nickname given")
            return
        nick = line.params[0]
        if not valid_nick(nick):
            self._num(N.ERR_ERRONEUSNICKNAME, nick[:NICK_MAX * 2], "Erroneous nickname")
            return
        if self.user is None:
            if fold(nick) in self.hub.chat.users:
                self._num(N.ERR_NICKNAMEINUSE, nick, "Nickname is already in use")
                return
            self.nick = nick
            self._try_register()
            return
        try:
            self.hub.handle(self.user, ChangeNick(nick))
        except ChatError:
            self._num(N.ERR_NICKNAMEINUSE, nick, "Nickname is already in use")

    def _user_cmd(self, line: Line) -> None:
        if len(line.params) < 4 or not line.params[0] or not line.params[3]:
            self._num(N.ERR_NEEDMOREPARAMS, "USER", "Not enough parameters")
            return
        ident = "".join(ch for ch in line.params[0] if ch.isalnum() or ch in "-_.")[:16] or "user"
        self.ident = ident
        self.realname = strip_formatting(line.params[3])[:100]
        self._try_register()

    def _try_register(self) -> None:
        if self.user is not None or self.nick is None or self.ident is None or self.cap_negotiating:
            return
        door = self.door
        if door.password is not None:
            given = (self.password or "").encode("utf-8", "replace")
            if not hmac.compare_digest(door.password, given):
                self.transport.log_info("bad password", "bad password from %s", self.transport.peer)
                self._num(N.ERR_PASSWDMISMATCH, "Password incorrect")
                self._error("Bad password")
                self._close(None, "bad password")
                return
        pacer = self.hub.pacer
        if pacer is None:
            self._register()
            return
        if self._ask_turn(self._turn_came) is None:
            self.hub.log_refusal(self.transport.peer, "too many waiting to register")
            self._error("Too many new connections from your address at once; try again soon")
            self._close(None, "too many waiting to register")
        # (when it waits, the lines after this one are served from its turn)

    def _turn_came(self) -> None:
        queued = self._take_turn()
        if self.transport.state is not State.OPEN:
            return
        self._register()
        if queued and self.transport.state is State.OPEN:
            self._serve_again()  # from the pacer's timer: what came meanwhile

    def _register(self) -> None:
        if self.user is not None or self.nick is None or self.ident is None:
            return
        self.welcoming = True
        try:
            self.user = self.hub.register(self.nick, self, None, join_lobby=False, ident=self.ident,
                                          host=HOST, realname=self.realname, door="irc",
                                          origin=self.transport.ip)
        except ChatError:
            self.welcoming = False
            self._num(N.ERR_NICKNAMEINUSE, self.nick, "Nickname is already in use")
            self.nick = None
            return
        self.welcoming = False
        self.transport.noted = True
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        log.info("registered: %s as %s (irc)", self.transport.peer, self.nick)

    def _welcome(self) -> None:
        door = self.door
        me = self.me
        self._num(N.RPL_WELCOME, f"Welcome to the selchat IRC gateway, {me}!{self.ident}@{HOST}")
        self._num(N.RPL_YOURHOST, f"Your host is {door.server_name}, running selchat-{__version__}")
        self._num(N.RPL_CREATED, f"This server was created {door.created}")
        self._line(f":{door.server_name} 004 {me} {door.server_name} selchat-{__version__} i o")
        tokens = door.isupport
        for start in range(0, len(tokens), 12):
            self._num(N.RPL_ISUPPORT, *tokens[start:start + 12], "are supported by this server")
        self._lusers()
        self._motd()

    # --- commands -----------------------------------------------------------------------------

    def _ping(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NOORIGIN, "No origin specified")
            return
        server = self.door.server_name
        token = line.params[-1]
        # Echoed after our name twice, a token as long as the client's line allows would make
        # our line longer than 512 bytes: it is cut to fit (at a character boundary).
        budget = body_budget("PONG", server, source=server)
        if len(token) > budget // 4:
            data = token.encode("utf-8", "replace")
            if len(data) > budget:
                token = data[:budget].decode("utf-8", "ignore")
        self._line(f":{server} PONG {server} :{token}")

    def _pong(self, line: Line) -> None:
        pass  # the liveness it proves was noted when its bytes arrived

    def _quit(self, line: Line) -> None:
        reason = strip_formatting(line.params[0]) if line.params else ""
        if has_control_characters(reason) or not reason.strip():
            reason = "quit"
        self._error(f"Closing link: {reason}")
        self._close(reason if self.user is not None else None, f"quit: {reason}")

    def _join(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NEEDMOREPARAMS, "JOIN", "Not enough parameters")
            return
        user = self.user
        assert user is not None
        if line.params[0] == "0":
            for room in list(user.rooms.values()):
                self.hub.handle(user, PartRoom(room.name))
            return
        for name in line.params[0].split(","):
            if not name:
                continue
            if not name.startswith("#"):
                self._num(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
                continue
            if not valid_room(name):
                self._num(N.ERR_BADCHANNAME, name[:64], "Illegal channel name")
                continue
            if fold(name) in user.rooms:
                continue  # already there: IRC servers say nothing
            try:
                self.hub.handle(user, JoinRoom(name))
            except ChatError as exc:
                self._num(N.ERR_TOOMANYCHANNELS, name, exc.message)

    def _part(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NEEDMOREPARAMS, "PART", "Not enough parameters")
            return
        user = self.user
        assert user is not None
        reason = strip_formatting(line.params[1]) if len(line.params) > 1 else ""
        if has_control_characters(reason):
            reason = ""
        for name in line.params[0].split(","):
            if not name:
                continue
            if fold(name) not in self.hub.chat.rooms:
                self._num(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
            elif fold(name) not in user.rooms:
                self._num(N.ERR_NOTONCHANNEL, name, "You're not on that channel")
            else:
                cut = reason.encode("utf-8")[:300].decode("utf-8", "ignore")  # fits any line
                self.hub.handle(user, PartRoom(name, cut or None))

    def _privmsg(self, line: Line) -> None:
        self._message(line, notice=False)

    def _notice(self, line: Line) -> None:
        self._message(line, notice=True)

    def _tagmsg(self, line: Line) -> None:
        user = self.user
        assert user is not None
        if not line.params or not line.params[0]:
            self._num(N.ERR_NORECIPIENT, "No recipient given (TAGMSG)")
            return
        tags = _client_tags(line)
        if "message-tags" not in self.caps or not tags:
            return  # nothing to relay
        for target in line.params[0].split(",")[:TARGMAX]:
            if not target:
                continue
            try:
                self.hub.handle(user, Tag(target, tags))
            except ChatError as exc:
                if exc.code == "not_in_room":
                    if fold(target) in self.hub.chat.rooms:
                        self._num(N.ERR_CANNOTSENDTOCHAN, target[:64], "Cannot send to channel")
                    else:
                        self._num(N.ERR_NOSUCHCHANNEL, target[:64], "No such channel")
                else:
                    self._num(N.ERR_NOSUCHNICK, target[:64], "No such nick/channel")

    def _message(self, line: Line, notice: bool) -> None:
        user = self.user
        assert user is not None
        quiet = notice  # no automatic replies to a NOTICE, errors included (RFC 2812)
        if not line.params or not line.params[0]:
            if not quiet:
                self._num(N.ERR_NORECIPIENT, f"No recipient given ({line.command})")
            return
        if len(line.params) < 2 or not line.params[1]:
            if not quiet:
                self._num(N.ERR_NOTEXTTOSEND, "No text to send")
            return
        text = line.params[1]
        # What the recipients get is our source prefix plus this text: if that cannot be one
        # line of 512 bytes, the message is refused whole (417) rather than cut or split, as
        # an IRC server does; only texts from other doors (which may be long) are split.
        prefix = len(f":{user.nick}!{user.userhost} {line.command} {line.params[0]} :".encode())
        if prefix + len(text.encode("utf-8", "replace")) > 510:
            if not quiet:
                self._num(N.ERR_INPUTTOOLONG, "Input line was too long")
            return
        action = False
        ctcp = parse_ctcp(text)
        if ctcp is not None:
            if ctcp[0].upper() != "ACTION":
                return  # other CTCP requests (VERSION, PING, ...) are not carried between doors
            action = True
            text = ctcp_action(text) or ""
        text = strip_formatting(text)
        tags = _client_tags(line) if "message-tags" in self.caps else ()
        targets = line.params[0].split(",")
        if len(targets) > TARGMAX:
            if not quiet:
                self._num(N.ERR_TOOMANYTARGETS, line.params[0][:64], "Too many targets")
            return
        for target in targets:
            if not target:
                continue
            problem = text_problem(text, self.door.max_text)
            if problem is not None:
                if not quiet:
                    if has_control_characters(text):
                        self._num(N.ERR_CANNOTSENDTOCHAN, target[:64],
                                  "Cannot send: control characters are not allowed")
                    elif "empty" in problem or "only" in problem:
                        self._num(N.ERR_NOTEXTTOSEND, "No text to send")
                    else:
                        self._num(N.ERR_CANNOTSENDTOCHAN, target[:64], f"Cannot send: {problem}")
                continue
            if target.startswith("#"):
                room = self.hub.chat.rooms.get(fold(target))
                if room is None:
                    if not quiet:
                        self._num(N.ERR_NOSUCHCHANNEL, target[:64], "No such channel")
                    continue
                if user not in room.members:
                    if not quiet:
                        self._num(N.ERR_CANNOTSENDTOCHAN, target, "Cannot send to channel")
                    continue
                request: Any = Say(target, text, action, notice, tags)
            else:
                to = self.hub.chat.users.get(fold(target))
                if to is None:
                    if not quiet:
                        self._num(N.ERR_NOSUCHNICK, target[:64], "No such nick/channel")
                    continue
                request = Msg(target, text, action, notice, tags)
            try:
                self.hub.handle(user, request)
            except ChatError as exc:
                if not quiet:
                    self._line(f":{self.door.server_name} FAIL {line.command} {exc.code.upper()} "
                               f"{target} :{exc.message}")
                continue
            if not target.startswith("#") and not quiet:
                to = self.hub.chat.users.get(fold(target))
                if to is not None and to.away:
                    self._num(N.RPL_AWAY, to.nick, to.away)

    def _names_cmd(self, line: Line) -> None:
        if not line.params:
            self._num(N.RPL_ENDOFNAMES, "*", "End of /NAMES list")
            return
        names = [n for n in (line.params[0].split() or [""])[0].split(",") if n][:TARGMAX]
        if len(names) > 1:
            # Several channels: their lists, then one end naming them all (RFC 1459, 2812).
            for name in names:
                room = self.hub.chat.rooms.get(fold(name))
                if room is not None:
                    self._names(room, end=False)
            self._num(N.RPL_ENDOFNAMES, ",".join(names)[:300], "End of /NAMES list")
            return
        for name in names:
            room = self.hub.chat.rooms.get(fold(name))
            if room is None:
                self._num(N.RPL_ENDOFNAMES, name[:64], "End of /NAMES list")
            else:
                self._names(room)

    def _names(self, room: Room, end: bool = True) -> None:
        uhnames = "userhost-in-names" in self.caps
        ops = room.operators
        entries = sorted(
            (("@" if u in ops else "") + (f"{u.nick}!{u.userhost}" if uhnames else u.nick)
             for u in room.members),
            key=lambda n: n.lstrip("@").lower())
        server = self.door.server_name
        head = f":{server} 353 {self.me} = {room.name} :"
        budget = 510 - len(head.encode())
        # A room of thousands: what fits in this answer's share of the client's buffer, then
        # 416 and the usual end, so a client that reads is never dropped for asking.
        limit = self._answer_start + self._answer_budget()
        cut = False
        chunk: List[str] = []
        size = 0
        for entry in entries:
            if chunk and size + len(entry) + 1 > budget:
                text = head + " ".join(chunk)
                if self._produced + len(text) + 2 > limit:
                    cut = True
                    break
                self._line(text)
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry) + 1
        if chunk and not cut:
            text = head + " ".join(chunk)
            if self._produced + len(text) + 2 > limit:
                cut = True
            else:
                self._line(text)
        if cut:
            self._num(ERR_TOOMANYMATCHES, "NAMES", f"Output too large, truncated ({room.name})")
        if end:
            self._num(N.RPL_ENDOFNAMES, room.name, "End of /NAMES list")

    def _who(self, line: Line) -> None:
        mask = (line.params[0].split() or ["*"])[0] if line.params else "*"
        chat = self.hub.chat
        server = self.door.server_name
        rows: Iterable[tuple] = []
        if mask.startswith("#"):
            room = chat.rooms.get(fold(mask))
            if room is not None:
                rows = ((room.name, u, u in room.operators) for u in room.members)
        else:
            matched: List[tuple] = []
            rows = matched
            if any(ch in mask for ch in "*?"):
                # Matched against every user: the CPU it takes grows with the server, and is
                # billed (the output alone would not show it).
                started = time.thread_time()
                pattern = fold(mask)
                found = [u for u in chat.users.values() if fnmatch.fnmatchcase(u.key, pattern)]
                found = heapq.nsmallest(WHO_MAX, found, key=lambda u: u.key)
                spent = time.thread_time() - started
                self.hub.spent_expensive(spent)
                if self.bucket is not None:
                    self.bucket.bill(cpu_cost(spent))
            else:
                u = chat.users.get(fold(mask))
                found = [u] if u is not None else []
            for u in found:
                room = next(iter(u.rooms.values()), None)
                matched.append((room.name if room else "*", u, room is not None and u in room.operators))
        limit = self._answer_start + self._answer_budget()  # as for NAMES: cut, never dropped
        for channel, u, op in rows:
            flags = ("G" if u.away else "H") + ("@" if op else "")
            text = (f":{server} 352 {self.me} {channel} {u.ident} {u.host} {server} {u.nick} "
                    f"{flags} :0 {u.realname}")
            if self._produced + len(text) + 2 > limit:
                self._num(ERR_TOOMANYMATCHES, "WHO", "Output too large, truncated")
                break
            self._line(text)
        self._num(N.RPL_ENDOFWHO, mask[:64], "End of /WHO list")

    def _whois(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NONICKNAMEGIVEN, "No nickname given")
            return
        nick = (line.params[-1].split() or ["*"])[0]
        chat = self.hub.chat
        u = chat.users.get(fold(nick))
        server = self.door.server_name
        if u is None:
            self._num(N.ERR_NOSUCHNICK, nick[:64], "No such nick/channel")
            self._num(N.RPL_ENDOFWHOIS, nick[:64], "End of /WHOIS list")
            return
        self._num(N.RPL_WHOISUSER, u.nick, u.ident, u.host, "*", u.realname)
        if u.rooms:
            names = " ".join(("@" if u in r.operators else "") + r.name for r in u.rooms.values())
            self._num(N.RPL_WHOISCHANNELS, u.nick, names)
        self._num(N.RPL_WHOISSERVER, u.nick, server, "selchat")
        if u.away:
            self._num(N.RPL_AWAY, u.nick, u.away)
        self._num(N.RPL_ENDOFWHOIS, u.nick, "End of /WHOIS list")

    def _list(self, line: Line) -> None:
        chat = self.hub.chat
        if line.params and line.params[0]:
            # Named channels: a lookup each (at most one line's worth of names), in key order.
            self._num(N.RPL_LISTSTART, "Channel", "Users  Name")
            for key in sorted({fold(n) for n in line.params[0].split(",") if n}):
                room = chat.rooms.get(key)
                if room is not None and room.members:
                    self._num(N.RPL_LIST, room.name, str(len(room.members)), room.topic)
            self._num(N.RPL_LISTEND, "End of /LIST")
            return
        # Every room: streamed as the client reads ("safelist"), so the answer is never more
        # than its buffer holds. Until RPL_LISTEND nothing is read or served, so what the
        # client says next is answered after the list, in order.
        stream = _ListStream(self._produced)
        label = self.label if self._collected is not None else None
        if label is not None:
            # Labeled: its own batch, opened now and closed after the last room, instead of
            # collecting the whole list to wrap it at the end of the command.
            self._collected = None
            self.label = None
            self._label_taken = True
            stream.batch = f"L{next(_batch_ids)}"
            self._line(f"@label={label} :{self.door.server_name} BATCH +{stream.batch} labeled-response")
        self._line(self._in_stream(stream, self._num_text(N.RPL_LISTSTART, "Channel", "Users  Name")))
        self._listing = stream
        self.transport.pause_reading()
        self._list_more()

    @staticmethod
    def _in_stream(stream: _ListStream, text: str) -> str:
        return _tag(text, f"batch={stream.batch}") if stream.batch else text

    def _list_more(self) -> None:
        """Write the next rooms of the LIST while our queue is below the answer budget.

        Then either wait for the client to read (the transport calls `resume_serving` once the
        queue is below its low-water mark) or, after the last room, end the list and go back
        to reading. Each chunk is billed as it is written. Nothing but the transport's drain
        drives this: a connection that closes meanwhile leaves nothing behind.
        """
        stream = self._listing
        if stream is None:
            return
        transport = self.transport
        if self.doomed or transport.state is not State.OPEN or not transport.accepting:
            self._listing = None
            return
        out = transport.out
        budget = self._answer_budget()
        stop = self._produced + ANSWER_BYTES  # one pass's share of the loop's time, too
        rooms_by_name = self.hub.chat.rooms_by_name
        done = False
        while out.size < budget and self._produced < stop:
            page = rooms_by_name(stream.after, LIST_PAGE)
            if not page:
                done = True
                break
            for room in page:
                stream.after = room.key
                if room.members:
                    self._line(self._in_stream(stream, self._num_text(
                        N.RPL_LIST, room.name, str(len(room.members)), room.topic)))
                    if out.size >= budget or self._produced >= stop:
                        break
        if done:
            self._line(self._in_stream(stream, self._num_text(N.RPL_LISTEND, "End of /LIST")))
            if stream.batch:
                self._line(f":{self.door.server_name} BATCH -{stream.batch}")
        self._bill(stream.start)
        if not transport.accepting or transport.state is not State.OPEN:
            self._listing = None  # overflowed after all (other traffic): condemned already
            return
        if not done:
            transport.wait_for_drain()
            return
        self._listing = None
        transport.resume_reading()

    def _topic(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NEEDMOREPARAMS, "TOPIC", "Not enough parameters")
            return
        name = line.params[0]
        room = self.hub.chat.rooms.get(fold(name))
        if room is None:
            self._num(N.ERR_NOSUCHCHANNEL, name[:64], "No such channel")
        elif len(line.params) > 1:
            self._num(N.ERR_CHANOPRIVSNEEDED, room.name, "Topics cannot be set on this server yet")
        elif room.topic:
            self._num(N.RPL_TOPIC, room.name, room.topic)
        else:
            self._num(N.RPL_NOTOPIC, room.name, "No topic is set")

    def _motd_cmd(self, line: Line) -> None:
        self._motd()

    def _motd(self) -> None:
        motd = self.hub.chat.motd
        if not motd:
            self._num(N.ERR_NOMOTD, "MOTD File is missing")
            return
        self._num(N.RPL_MOTDSTART, f"- {self.door.server_name} Message of the day - ")
        for text in motd.split("\n"):
            for part in split_for_irc(text, 400) or [""]:
                self._num(N.RPL_MOTD, f"- {part}")
        self._num(N.RPL_ENDOFMOTD, "End of /MOTD command.")

    def _lusers_cmd(self, line: Line) -> None:
        self._lusers()

    def _lusers(self) -> None:
        chat = self.hub.chat
        users = len(chat.users)
        rooms = sum(1 for r in chat.rooms.values() if r.members)
        self._num(N.RPL_LUSERCLIENT, f"There are {users} users and 0 invisible on 1 servers")
        self._num(N.RPL_LUSEROP, "0", "operator(s) online")
        self._num(N.RPL_LUSERCHANNELS, str(rooms), "channels formed")
        self._num(N.RPL_LUSERME, f"I have {users} clients and 0 servers")
        self._num(N.RPL_LOCALUSERS, str(users), str(users), f"Current local users {users}, max {users}")
        self._num(N.RPL_GLOBALUSERS, str(users), str(users), f"Current global users {users}, max {users}")

    def _away(self, line: Line) -> None:
        user = self.user
        assert user is not None
        text = strip_formatting(line.params[0]) if line.params else ""
        if text and not has_control_characters(text):
            self.hub.chat.set_away(user, text[:390])
            self._num(N.RPL_NOWAWAY, "You have been marked as being away")
        else:
            self.hub.chat.set_away(user, None)
            self._num(N.RPL_UNAWAY, "You are no longer marked as being away")

    def _userhost(self, line: Line) -> None:
        chat = self.hub.chat
        replies = []
        for nick in line.params[:5]:
            u = chat.users.get(fold(nick))
            if u is not None:
                replies.append(f"{u.nick}={'-' if u.away else '+'}{u.userhost}")
        self._num(N.RPL_USERHOST, " ".join(replies))

    def _ison(self, line: Line) -> None:
        chat = self.hub.chat
        nicks = " ".join(line.params).split()
        self._num(N.RPL_ISON, " ".join(chat.users[fold(n)].nick for n in nicks if fold(n) in chat.users))

    def _mode(self, line: Line) -> None:
        if not line.params:
            self._num(N.ERR_NEEDMOREPARAMS, "MODE", "Not enough parameters")
            return
        target = line.params[0]
        if target.startswith("#"):
            room = self.hub.chat.rooms.get(fold(target))
            if room is None:
                self._num(N.ERR_NOSUCHCHANNEL, target[:64], "No such channel")
            elif len(line.params) == 1:
                self._line(f":{self.door.server_name} 324 {self.me} {room.name} +")
                self._num(N.RPL_CREATIONTIME, room.name, str(room.created // 1000))
            elif line.params[1] in ("b", "+b"):
                self._num(N.RPL_ENDOFBANLIST, room.name, "End of channel ban list")
            else:
                self._num(N.ERR_CHANOPRIVSNEEDED, room.name, "Channel modes cannot be changed here")
        elif fold(target) != fold(self.me):
            self._num(N.ERR_USERSDONTMATCH, "Cannot change mode for other users")
        else:
            # No user modes here: setting one (irssi's +i on connect) changes nothing, and the
            # answer says so by showing the modes in force.
            self._line(f":{self.door.server_name} 221 {self.me} +")

    def _chathistory(self, line: Line) -> None:
        from selchat.doors.irc.history import chathistory

        chathistory(self, line)

    # --- history on join ------------------------------------------------------------------------

    def _replay(self, history: events.History) -> None:
        """History on join for a client without draft/chathistory: PRIVMSGs (in a batch if it can)."""
        if not history.messages:
            return
        self.send_history(history.room, history.messages, "chathistory")

    def send_history(self, target: str, messages: Sequence[events.Message], kind: str) -> None:
        """Messages as a `batch` of PRIVMSGs when the client has `batch`, else plain lines."""
        batch = "batch" in self.caps
        server = self.door.server_name
        ref = f"H{next(_batch_ids)}"
        if batch:
            self._line(f":{server} BATCH +{ref} {kind} {target}")
        with_time = "server-time" in self.caps
        for msg in messages:
            extra = f"batch={ref}" if batch else ""
            if with_time:
                data = self.wire.message(msg, extra)
            else:
                # No server-time: say when it was, or old lines would read as if said now.
                stamp = time.strftime("%H:%M", time.gmtime(msg.ts // 1000))
                data = self.wire.message(events.Message(
                    msg.id, msg.ts, msg.sender, f"[{stamp} UTC] {msg.text}", msg.room, msg.to,
                    msg.action, msg.notice, msg.userhost), extra)
            for text in data.decode("utf-8").split("\r\n"):
                if text:
                    self._line(text)
        if batch:
            self._line(f":{server} BATCH -{ref}")

    # --- timers -------------------------------------------------------------------------------

    def _handshake_deadline(self, _: Any = None) -> None:
        self._handshake_timer = None
        transport = self.transport
        if transport.state is State.HANDSHAKING or (transport.state is State.OPEN and self.user is None):
            if transport.state is State.HANDSHAKING:
                transport.abort("handshake timeout")  # nothing can be said before TLS is up
                return
            self._error("Registration timeout")
            transport.close("handshake timeout")

    def _send_ping(self, token: str) -> None:
        self._line(f"PING :{self.door.server_name}")  # (as IRC servers do: their own name)

    def _ping_timed_out(self) -> None:
        self._error("Ping timeout")
        self._close("ping timeout", "ping timeout")


def _client_tags(line: Line) -> tuple:
    """The client-only tags ("+key") of a line, to relay; all other tags are the server's to set."""
    return tuple((k, v) for k, v in line.tags.items() if k.startswith("+") and len(k) > 1)


def _tag(line: str, tag: str) -> str:
    """Add a tag to a line of ours, which may already carry some."""
    if line.startswith("@"):
        return f"@{tag};{line[1:]}"
    return f"@{tag} {line}"


_UNREGISTERED: Dict[str, Callable[[IrcSession, Line], None]] = {
    "CAP": IrcSession._cap,
    "PASS": IrcSession._pass,
    "NICK": IrcSession._nick_cmd,
    "USER": IrcSession._user_cmd,
    "PING": IrcSession._ping,
    "PONG": IrcSession._pong,
    "QUIT": IrcSession._quit,
}

_REGISTERED: Dict[str, Callable[[IrcSession, Line], None]] = {
    "CAP": IrcSession._cap,
    "NICK": IrcSession._nick_cmd,
    "PING": IrcSession._ping,
    "PONG": IrcSession._pong,
    "QUIT": IrcSession._quit,
    "JOIN": IrcSession._join,
    "PART": IrcSession._part,
    "PRIVMSG": IrcSession._privmsg,
    "NOTICE": IrcSession._notice,
    "TAGMSG": IrcSession._tagmsg,
    "NAMES": IrcSession._names_cmd,
    "WHO": IrcSession._who,
    "WHOIS": IrcSession._whois,
    "LIST": IrcSession._list,
    "TOPIC": IrcSession._topic,
    "MOTD": IrcSession._motd_cmd,
    "LUSERS": IrcSession._lusers_cmd,
    "AWAY": IrcSession._away,
    "USERHOST": IrcSession._userhost,
    "ISON": IrcSession._ison,
    "MODE": IrcSession._mode,
    "CHATHISTORY": IrcSession._chathistory,
}
