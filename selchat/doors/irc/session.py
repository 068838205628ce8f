"""The IRC door: one session per connection, over a transport (docs/irc.md).

An IRC client registers the IRC way (CAP, PASS, NICK, USER: `registration`, with its state
machine in `state`), and its commands become the chat's requests for the hub through the
command table (`commands`) and their handlers (`messaging`, `channels`, `queries`,
`history`); the hub's events come back as IRC lines (`reply` here, `wire` for what is shared).
Rooms are channels of the same name, nicks are the one namespace of every door, ids are msgid
tags. This module keeps what is about the connection: serving lines in order, flood control,
output and its labels (`response`), timers.

Flood control is IRC's: lines are charged to the connection's token bucket from its first
byte; when the bucket is empty the session stops reading ("fake lag") and serves the next line
when a token is due; a peer that keeps sending while lagged piles up unread input, and past
RECVQ bytes of it is disconnected with `ERROR :Excess Flood`.

Expensive answers are weighed and bounded, as the native door's are. What a line's answer
queued beyond its first FREE_ANSWER_BYTES is billed to the bucket (`answer_cost`), and the
debt is waited out by the same fake lag: later lines are served later, never refused, and a
client lagged only by such a debt (its count of lines within the rate) is not an excess flood.
No answer queues more than the client's output buffer can hold: `LIST` streams ("safelist",
see `channels.ListStream`), and `NAMES` and `WHO` are cut at `answer_limit()`, with 416 before
their usual end numeric.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Set

from selchat.core import events
from selchat.core.chat import ChatError
from selchat.core.ratelimit import TokenBucket, answer_cost, cpu_cost
from selchat.defaults import HISTORY_LIMIT_MAX, NICK_MAX, ROOM_MAX
from selchat.doors.base import DoorSession
from selchat.doors.irc import commands, replies
from selchat.doors.irc.channels import ListStream
from selchat.doors.irc.messaging import TARGMAX, quick_privmsg
from selchat.doors.irc.monitor import MONLIST, Watchers
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import TOO_LONG, IrcParseError, Line, LineDecoder, parse_line
from selchat.doors.irc.registration import HOST
from selchat.doors.irc.response import ResponseBuffer, batch_id
from selchat.doors.irc.state import Registration
from selchat.doors.irc.wire import IrcWire, WireSet
from selchat.hub import Hub
from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer
from selchat.loop.transport import State, Transport

if TYPE_CHECKING:
    from selchat.core.chat import User

log = logging.getLogger("selchat.server")

RECVQ = 8192  # unread input bytes a lagged client may pile up before "Excess Flood"
ANSWER_BYTES = 65536  # one answer's queue above the low-water mark (see _answer_budget)
FREE_ANSWER_BYTES = 4096  # what a line's answer may queue before it costs more than its token
MIN_LAG = 0.001  # seconds: a lag timer is never due in the past (it would fire in this pass)

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
    peak_users: int = 0  # the most users LUSERS has seen at once (its "max")

    def __post_init__(self) -> None:
        self.wires = WireSet(self.server_name)
        self.watchers = Watchers()  # MONITOR: who watches which nick
        self.wallops: Set["IrcSession"] = set()  # connections with user mode +w
        self.hub.watch_presence(self.watchers.changed)
        self.isupport = [
            "ACCOUNTEXTBAN=a", "AWAYLEN=390", "BOT=B", "CASEMAPPING=ascii", "CHANLIMIT=#:100",
            "CHANMODES=b,k,l,imnst",
            f"CHANNELLEN={ROOM_MAX + 1}", "CHANTYPES=#", f"CHATHISTORY={HISTORY_LIMIT_MAX}",
            "ELIST=MNU", "EXTBAN=$,a", "LINELEN=512", "MAXLIST=b:100", "MAXTARGETS=4", "MODES=6", f"MONITOR={MONLIST}", "MSGREFTYPES=msgid,timestamp",
            "NETWORK=selchat", f"NICKLEN={NICK_MAX}", "PREFIX=(ov)@+", "SAFELIST", "STATUSMSG=",
            f"TARGMAX=PRIVMSG:{TARGMAX},NOTICE:{TARGMAX},JOIN:,PART:,NAMES:{TARGMAX},WHOIS:1,ISON:,USERHOST:5,KICK:{TARGMAX}",
            "TOPICLEN=390", "USERLEN=16", "UTF8ONLY", "WHOX",
        ]

    def session(self, reject: Optional[str] = None) -> "IrcSession":
        return IrcSession(self, reject)


class IrcSession(DoorSession):
    __slots__ = ("door", "hub", "wire", "transport", "decoder", "user", "bucket", "last_seen",
                 "pinged", "reject", "reg", "caps", "response", "welcoming",
                 "_lagged", "_handshake_timer", "_idle_timer", "_produced", "_billed",
                 "_answer_start", "_listing", "__weakref__",
                 "_viewing", "pending", "account", "sasl", "invisible", "monitoring", "read_markers",
                 "bot", "_label_open")

    # A session going on from an earlier pass takes its share like any other, and its lines
    # are not counted for a session's own share of a pass (`_count_request`): the IRC door
    # has never had these two rules of the JSON doors (left as they were).
    PASS_QUANTUM = 0

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
        self.reject = reject
        self.reg = Registration()  # where registration and CAP negotiation stand (no I/O)
        self.caps: set = set()
        self.response = ResponseBuffer()  # the label of the command being served, its lines
        self.welcoming = False  # registering now: the welcome burst is addressed to our nick
        self._lagged: Optional[Timer] = None
        self._init_serving()  # condemned, the turn, the job, the pass share (DoorSession)
        self._handshake_timer: Optional[Timer] = None
        self._idle_timer: Optional[Timer] = None
        self._produced = 0  # bytes of our own lines so far (answers, collected ones included)
        self._billed = 0  # `_produced` up to which output has been billed
        self._answer_start = 0  # `_produced` when the line being served began
        self._listing: Optional[ListStream] = None  # a LIST still streaming: no line is served
        self._viewing: Optional[str] = None  # the room whose JOIN view (names, topic) is coming
        self.pending = ""  # the command whose answer comes as an event (MODE b, REGISTER, ...)
        self.account: Optional[str] = None  # proved by SASL before registration
        self.sasl: Any = None  # the SASL exchange under way (selchat.doors.irc.accounts.Sasl)
        self._label_open = False  # a labeled command's answer waits for the cluster's order
        self.invisible = False  # user mode +i: left out of WHO masks for those sharing no room
        self.monitoring: dict = {}  # MONITOR: the folded nicks this connection watches
        self.read_markers: dict = {}  # draft/read-marker: folded target -> ms, oldest first
        self.bot = False  # user mode +B: a bot (WHOIS 335, WHO's B, a `bot` tag on messages)

    @property
    def me(self) -> str:
        """Our nick as the target of our numerics: "*" until registration is done."""
        if self.user is not None:
            return self.user.nick
        nick = self.reg.nick
        return nick if self.welcoming and nick else "*"

    @property
    def server(self) -> str:
        return self.door.server_name

    @property
    def host(self) -> str:
        return HOST

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport
        reactor = self.door.reactor
        self._handshake_timer = reactor.call_later(self.door.handshake_timeout, self._handshake_deadline)
        if self.reject is not None:
            self.error(REFUSALS.get(self.reject, self.reject))
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
            self.close("connection closed", "peer closed")  # else once the LIST has been sent

    def resume_serving(self) -> None:
        """Our queue drained: the LIST being streamed goes on, or the next lines are served."""
        if self._listing is not None:
            self._listing.more(self)
            if self._listing is not None:
                return
        self._serve()

    def _release(self) -> None:
        if self._lagged is not None:
            self._lagged.cancel()
            self._lagged = None
        self._listing = None  # a stream is driven by our drain and timers only: it just ends
        self.decoder = LineDecoder()
        self.sasl = None
        self.door.watchers.clear(self)
        self.door.wallops.discard(self)

    # --- for the hub and the fan-out ----------------------------------------------------------

    def reply(self, event: events.Event, ref: Any) -> None:
        """This connection's own copy of an event: an answer to what it asked (the label is in
        `response`), or a copy of what the same user did on another connection (`mirrored`)."""
        replies.reply(self, event)

    def mirrored(self) -> bool:
        """Is the event being delivered the doing of another connection of our user?"""
        return self.hub.fanout.current is not self

    def own_message(self, msg: events.Message, ref: Any, shared: bytes) -> bytes:
        """Our echo of what we said (echo-message). While a labeled command is answered it is
        one of the answer's lines (so several targets make one labeled batch), else the bytes
        the fan-out writes."""
        if "echo-message" not in self.caps:
            return b""
        if self.response.collecting:
            self.answer_lines(self.wire.message(msg))
            return b""
        return shared or self.wire.message(msg)

    def answer_lines(self, data: bytes) -> None:
        """Encoded lines (an echo) as lines of the answer being served."""
        for text in data.decode("utf-8").split("\r\n"):
            if text:
                self.send_line(text)

    def send_error(self, code: str, message: str, ref: Any) -> None:
        """An error the hub reports later (a password job's): in the words of the command."""
        replies.error(self, code, message)

    def notice(self, text: str) -> None:
        self.send_line(f":{self.door.server_name} NOTICE {self.me} :{text}")

    SHUTDOWN_NOTICE = "Server shutting down"

    def _shutdown_words(self) -> None:
        self.error("Server shutting down")

    # --- output, for the handlers -----------------------------------------------------------------

    def raw(self, data: bytes) -> None:
        """Bytes already made (an echo with its own label): written, neither collected nor counted."""
        if data:
            self.hub.fanout.send(self.transport, data)

    def send_line(self, line: str) -> None:
        """One line of ours (without CRLF), as an answer to the command being served."""
        response = self.response
        if response.collecting:
            response.add(line)
            self._produced += len(line) + 2
            return
        data = (line + "\r\n").encode("utf-8", "replace")
        self._produced += len(data)
        self.hub.fanout.send(self.transport, data)

    def _emit(self, line: str) -> None:
        """A line already counted in `_produced` (a labeled answer's lines, sent at its end)."""
        self.hub.fanout.send(self.transport, (line + "\r\n").encode("utf-8", "replace"))

    def numeric_text(self, code: int, *params: str) -> str:
        """A numeric to ourselves: `params` are the middle ones, the last is the trailing text."""
        middle = " ".join(params[:-1])
        text = params[-1] if params else ""
        return (f":{self.door.server_name} {int(code):03d} {self.me}"
                + (f" {middle}" if middle else "") + f" :{text}")

    def numeric(self, code: int, *params: str) -> None:
        self.send_line(self.numeric_text(code, *params))

    def error(self, text: str) -> None:
        self.send_line(f"ERROR :{text}")

    def fail(self, command: str, code: str, *context: str, text: str) -> None:
        """An IRCv3 standard reply: FAIL <command> <code> [<context>...] :<text>."""
        middle = " ".join((command, code) + context)
        self.send_line(f":{self.door.server_name} FAIL {middle} :{text}")

    def source(self, user: Optional[User]) -> str:
        if user is None:
            return self.me
        return f"{user.nick}!{user.userhost}"

    def close(self, quit_reason: Optional[str], detail: str) -> None:
        self._leave(quit_reason)
        self.transport.close(detail)

    def ask(self, request: Any, pending: str = "",
            refused: Optional[Callable[[ChatError], None]] = None) -> None:
        """Hand a request to the hub as this connection. `pending` names the command whose
        answer is an event still to come (the replies put it in its words). A refusal goes
        to `refused(error)`, now or, when the cluster orders the change, later; without
        `refused`, ChatError is raised (and a later one is sent as the door's error)."""
        user = self.user
        assert user is not None
        self.pending = pending
        try:
            later = self.hub.handle(user, request, None, self, refused=refused)
        except ChatError as exc:
            if not self._job:
                self.pending = ""
            if refused is None:
                raise
            refused(exc)
            return
        if later:
            self.wait_for_job()  # answered later (a password job, an ordered change): `job_done`
        elif not self._job:
            self.pending = ""

    def _after_job(self) -> bool:
        self.pending = ""  # its answer has come
        if self._label_open:  # ... and the labeled command's answer is whole now
            self._label_open = False
            self._finish_label()
        return False

    @property
    def produced(self) -> int:
        return self._produced

    def answer_limit(self) -> int:
        """Where the answer being served must stop: its share of the client's buffer, so a
        client that reads is never dropped for what it asked (NAMES and WHO say 416 there)."""
        return self._answer_start + self._answer_budget()

    def _answer_budget(self) -> int:
        """Bytes one answer may have queued for the client: a LIST waits there, NAMES and WHO stop.

        Above the transport's low-water mark, so that waiting for the drain is waiting for the
        client to read, and at most its high-water mark (a quarter of max_outbuf), so that an
        answer and the lines served before it never come near max_outbuf: a client that reads
        is never dropped as a slow consumer for what it asked.
        """
        transport = self.transport
        return max(1, min(transport.high_water, transport.low_water + ANSWER_BYTES))

    def bill(self, answer_start: int) -> None:
        """Bill the output since the last bill, beyond the answer's first FREE_ANSWER_BYTES."""
        produced = self._produced
        bucket = self.bucket
        if bucket is not None:
            extra = produced - max(self._billed, answer_start + FREE_ANSWER_BYTES)
            if extra > 0:
                bucket.bill(answer_cost(extra))
        self._billed = produced

    def bill_cpu(self, seconds: float) -> None:
        """An answer took `seconds` of CPU that its output does not show (a WHO mask)."""
        self.hub.spent_expensive(seconds)
        if self.bucket is not None:
            self.bucket.bill(cpu_cost(seconds))

    def start_stream(self, stream: ListStream) -> None:
        """A LIST streams from now on: nothing is read or served until it has been sent."""
        self._listing = stream
        self.transport.pause_reading()
        stream.more(self)

    def stream_done(self) -> None:
        self._listing = None

    # --- serving ------------------------------------------------------------------------------

    def _serve(self) -> None:
        """Serve the lines buffered, in order, while the serving rules allow
        (`DoorSession._may_serve`); what is left waits in the decoder."""
        transport = self.transport
        decoder = self.decoder
        lines = iter(decoder)
        bucket = self.bucket
        now = self.door.reactor.now
        while self._may_serve(buffered := decoder.buffered, buffered > 0):
            item = next(lines, None)
            if item is None:
                if transport.eof:
                    self.close("connection closed", "peer closed")
                return
            if bucket is not None:
                bucket.take(now)
            self._answer_start = self._billed = self._produced
            if item is TOO_LONG:
                self.numeric(N.ERR_INPUTTOOLONG, "Input line was too long")
            elif quick_privmsg(self, item):  # type: ignore[arg-type]
                pass  # a plain message to a channel, carried out as PRIVMSG would be
            else:
                try:
                    line = parse_line(item)  # type: ignore[arg-type]
                except IrcParseError:
                    continue  # an empty or blank line: nothing to say
                if not item.isascii() and not _utf8(item):  # type: ignore[union-attr]
                    # UTF8ONLY: a line that is not UTF-8 is refused whole, never guessed at.
                    self.fail(line.command[:32] or "*", "INVALID_UTF8",
                              text="Message rejected: it is not UTF-8")
                    continue
                self._dispatch(line)
            self.bill(self._answer_start)

    def _held_back(self) -> bool:
        """IRC's flood policy holds lines back rather than refusing them: nothing is served
        while a LIST streams, nor while the bucket has no token for the next line (`_lag`)."""
        if self._listing is not None:
            return True  # the drain drives the LIST: the lines behind it wait till it is sent
        bucket = self.bucket
        if bucket is None:
            return False
        # Charged before it is served: a line is taken only when a token is there, so a
        # lagged client gets exactly the rate, never one line more per resume. A debt
        # billed for expensive answers is waited out here too.
        now = self.door.reactor.now
        if bucket.ready_in(now) > 0:
            self._lag(now)
            return True
        return False

    def _reading_held(self) -> bool:
        # Fake lag and a streaming LIST keep reading off: their timer, or the drain, resume it.
        return self._lagged is not None or self._listing is not None

    def _waiting_input_cap(self) -> int:
        return RECVQ

    def _lag(self, now: float) -> None:
        """Out of tokens: read nothing more until one is due ("fake lag")."""
        bucket = self.bucket
        assert bucket is not None
        if self.decoder.buffered > RECVQ and self._flooding(bucket, now):
            self.transport.log_info("excess flood", "excess flood from %s", self.name)
            self.error("Excess Flood")
            self.close("excess flood", "excess flood")
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
            if self._listing is not None or self._job:
                return  # reading resumes, and lines are served, once the LIST has been sent
            self._serve_again()

    def _dispatch(self, line: Line) -> None:
        """One command, through the table; its answer goes out labeled if it asked to be."""
        label = line.tags.get("label") if "labeled-response" in self.caps else None
        response = self.response
        if label is not None:
            self.hub.fanout.flush()  # what was said before carries no label of this command
            response.begin(label)
        waiting = self._job
        try:
            commands.run(self, line)
        finally:
            if label is not None:
                if self._job and not waiting:
                    # With --redis its answer comes once the change is ordered (`_after_job`).
                    self._label_open = True
                else:
                    self._finish_label()

    def _finish_label(self) -> None:
        if self.response.collecting:
            self.hub.fanout.flush()  # a room message's echo is part of the answer
        for text in self.response.finish(self.door.server_name):
            self._emit(text)

    # --- history --------------------------------------------------------------------------------

    def _replay(self, history: events.History) -> None:
        """History on join for a client without draft/chathistory: PRIVMSGs (in a batch if it can)."""
        if not history.messages:
            return
        self.send_history(history.room, history.messages, "chathistory")

    def send_history(self, target: str, messages: Sequence[events.Message], kind: str) -> None:
        """Messages as a `batch` of PRIVMSGs when the client has `batch`, else plain lines."""
        batch = "batch" in self.caps
        server = self.door.server_name
        ref = batch_id("H")
        if batch:
            self.send_line(f":{server} BATCH +{ref} {kind} {target}")
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
                    self.send_line(text)
        if batch:
            self.send_line(f":{server} BATCH -{ref}")

    # --- timers -------------------------------------------------------------------------------

    def _handshake_deadline(self, _: Any = None) -> None:
        self._handshake_timer = None
        transport = self.transport
        if transport.state is State.HANDSHAKING or (transport.state is State.OPEN and self.user is None):
            if transport.state is State.HANDSHAKING:
                transport.abort("handshake timeout")  # nothing can be said before TLS is up
                return
            self.error("Registration timeout")
            transport.close("handshake timeout")

    def _send_ping(self, token: str) -> None:
        self.send_line(f"PING :{self.door.server_name}")  # (as IRC servers do: their own name)

    def _ping_timed_out(self) -> None:
        self.error("Ping timeout")
        self.close("ping timeout", "ping timeout")


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


__all__ = ["IrcDoor", "IrcSession", "RECVQ"]
