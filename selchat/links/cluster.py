"""Several selchat processes as one chat: every change goes through one order that Redis decides.

The funnel (issue 17). Alone, a process decides and applies a change in one call. With
`--redis`, the hub hands each change to `ClusterNode.submit` instead: it becomes a *command*
(who asked, through which connection, what, when), published through one Lua script that
gives it the cluster's next offset and the next message id and appends it to one stream.
Every process, the one that asked included, applies the commands in that offset order, from
the channel (never locally first), by running the same request against its copy of the chat
state. The state is a function of the ordered commands, so every copy agrees: two hellos for
one nick on two processes are ordered, the second is refused `nick_taken` everywhere; two
rooms' messages reach every member everywhere in one order. The process that asked answers
its connection when its command comes back (the door waited: one more "job").

A user of another process is a `User` whose connection is a `RemoteSession`: a member, an
operator, a nick in `names`, a target of `msg`, with nothing to write here.

State that is not in the commands:
* a process that starts asks for the state with a `hello` command; every live process sends
  its copy as it stood at that offset (`Snapshot`), the first one to arrive is loaded, and
  the commands after the hello are applied on top (alone, it starts from its own store);
* each process holds a lease key (renewed every `LEASE_RENEW` s, lasting `LEASE_TTL` s); a
  process that finds another's lease gone publishes `dead`, and everyone's copy drops that
  process's users with the reason `connection closed`;
* Redis down: submissions are answered `unavailable`; when it is back, the process reads what
  it missed by (epoch, offset) before it applies anything newer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from selchat.core import events, requests
from selchat.core.chat import ChatError, Room, User
from selchat.core.names import fold
from selchat.defaults import MAX_ACCOUNTS
from selchat.links.redis import LinkState, RedisLink, Unavailable
from selchat.links.resp import ReplyError
from selchat.links.scripts import EPOCH_LUA, Missed, RoomStreams, Script, new_epoch, parse_message

log = logging.getLogger("selchat.cluster")

STREAM = "cluster"  # the one stream every command goes through
LEASE_TTL = 6.0  # seconds a process's lease lasts without renewal
LEASE_RENEW = 2.0  # seconds between renewals
DEAD_CHECK = 1.0  # seconds between looks at the others' leases
SNAPSHOT_WAIT = 3.0  # seconds a starting process waits for a snapshot before it asks again
SNAPSHOT_HISTORY = 50  # recent messages per room a snapshot carries
CATCH_UP_BATCH = 1000  # commands read per `since` call
SNAPSHOT_PART = 256 << 10  # bytes of a snapshot per PUBLISH (one part in flight at a time)
MAX_SNAPSHOT = 512 << 20  # a snapshot bigger than this is refused (the fate: asked again, logged)
MAX_BUFFERED_BYTES = 64 << 20  # commands held while starting or catching up (the rest: re-read)
MAX_BACKFILL_KEYS = 10000  # rooms and conversations whose shared history a starting process reads
MAX_PENDING = 10000  # commands of this process published and not yet applied
# A process known to hold users (it said hello) but with no lease in the members' hash for
# this long is buried like one whose lease ran out: after Redis came back empty (the hash is
# gone with it) every live process renews within a reconnection (backoff at most 5 s), so one
# that does not has died; so has one stopped with SIGTERM (it drops its own lease).
ABSENT_GRACE = 2 * LEASE_TTL
RULE_DEFAULTS = {"max_accounts": MAX_ACCOUNTS}  # rules added since the first release

# The publication script of `links.scripts`, plus a message id that grows across the cluster
# and across epochs. The publisher gives a floor: the highest id it has seen, raised to its
# clock (ms x 1000) once it has seen Redis lose its data. When this call makes the epoch (Redis
# came back empty, or this is the first start) and the publisher has seen ids (floor > 0), the
# ids start above Redis's clock too: ids another process saw and this one did not (Redis died
# before sending them) are below it, unless more than 1,000 ids a millisecond were given since
# the last such restart.
PUBLISH_WITH_ID_LUA = b"""
-- KEYS: meta, stream, ids. ARGV: channel, payload, maxlen, a fresh epoch, the id floor.
""" + EPOCH_LUA + b"""local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
local id = redis.call('INCR', KEYS[3])
local floor = tonumber(ARGV[5])
if epoch == ARGV[4] and floor > 0 then
  local t = redis.call('TIME')
  local clock = tonumber(t[1]) * 1000000 + math.floor(tonumber(t[2]) / 1000) * 1000
  if clock > floor then floor = clock end
end
if id <= floor then
  id = floor + 1
  redis.call('SET', KEYS[3], id)
end
local body = string.format('%d', id) .. ' ' .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], offset .. '-0', 'p', body)
redis.call('PUBLISH', ARGV[1], epoch .. ' ' .. offset .. ' ' .. body)
return {epoch, tonumber(offset)}
"""


# The members' hash: process id -> its lease's expiry, in ms by Redis's clock. Only a
# process that holds the state (synced) is a member.
_NOW_LUA = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
JOIN_LUA = _NOW_LUA + b"""
-- KEYS: members. ARGV: me, lease ms. {0}: a live member holds the state, ask it. {1, ...}:
-- nobody live does, we hold it now; the members whose lease ran out are listed (and dropped)
-- for us to bury: one of them may only be frozen, and must find itself buried when it wakes.
local all = redis.call('HGETALL', KEYS[1])
local expired = {}
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] then
    if tonumber(all[i + 1]) > now then return {0} end
    expired[#expired + 1] = all[i]
  end
end
for _, node in ipairs(expired) do redis.call('HDEL', KEYS[1], node) end
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
return {1, unpack(expired)}
"""
RENEW_LUA = _NOW_LUA + b"""
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
return 1
"""
EXPIRED_LUA = _NOW_LUA + b"""
-- ARGV: me, then the other processes we know to hold users. {expired, absent}: the members
-- whose lease ran out (us left out), dropped from the hash as their `dead` is decided, by the
-- process that publishes it (BURY); and those we know that hold no lease at all.
local out = {}
local all = redis.call('HGETALL', KEYS[1])
local held = {}
for i = 1, #all, 2 do
  held[all[i]] = true
  if all[i] ~= ARGV[1] and tonumber(all[i + 1]) <= now then out[#out + 1] = all[i] end
end
local absent = {}
for i = 2, #ARGV do
  if not held[ARGV[i]] then absent[#absent + 1] = ARGV[i] end
end
return {out, absent}
"""
RAISE_IDS_LUA = b"""
-- KEYS: ids. ARGV: a floor. The ids counter raised to the floor (never lowered).
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
"""
BURY_LUA = _NOW_LUA + b"""
-- Drop a member whose lease ran out (not one that renewed meanwhile).
local expiry = redis.call('HGET', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) <= now then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""


def _ignore(reply: Any) -> None:
    pass



class _NullTransport:
    """What a remote connection writes to: nothing (the fan-out skips it)."""

    accepting = False
    ip = ""
    peer = "remote"

    def write(self, data: bytes) -> None:
        pass


class _NullWire:
    def encode(self, event: Any) -> List[bytes]:
        return []

    def message(self, message: Any) -> bytes:
        return b""


_NULL_TRANSPORT = _NullTransport()
_NULL_WIRE = _NullWire()


class RemoteSession:
    """A connection on another process, as this process's chat state holds it."""

    __slots__ = ("sid", "node", "user", "transport", "wire", "invisible", "bot", "__weakref__")

    def __init__(self, sid: str, node: str) -> None:
        self.sid = sid
        self.node = node
        self.user: Optional[User] = None
        self.invisible = False  # IRC's +i and +B, kept by the connection (its process says)
        self.bot = False
        self.transport = _NULL_TRANSPORT
        self.wire = _NULL_WIRE

    def reply(self, event: Any, ref: Any) -> None:
        pass

    def own_message(self, message: Any, ref: Any, shared: bytes) -> bytes:
        return b""

    def send_error(self, code: str, message: str, ref: Any = None) -> None:
        pass

    def job_done(self) -> None:
        pass

    def drop(self, reason: str) -> None:
        pass

    def __repr__(self) -> str:
        return f"RemoteSession({self.sid})"


# --- requests and events as JSON ------------------------------------------------------------

_REQUESTS = {cls.__name__: cls for cls in (
    requests.Say, requests.Msg, requests.Tag, requests.JoinRoom, requests.PartRoom,
    requests.ChangeNick, requests.SetTopic, requests.KickUser, requests.InviteUser,
    requests.SetModes)}


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def encode_request(request: Any) -> List[Any]:
    return [type(request).__name__, *(getattr(request, f.name) for f in dataclasses.fields(request))]


def decode_request(data: List[Any]) -> Any:
    cls = _REQUESTS[data[0]]
    return cls(*(_tuples(v) for v in data[1:]))


def message_to_json(m: events.Message) -> List[Any]:
    return [m.id, m.ts, m.sender, m.text, m.room, m.to, m.action, m.notice, m.userhost,
            m.client_tags, m.account]


def message_from_json(data: List[Any]) -> events.Message:
    (mid, ts, sender, text, room, to, action, notice, userhost, tags, account) = data
    return events.Message(mid, ts, sender, text, room, to, action, notice, userhost,
                          _tuples(tags), account)


class _Pending:
    """A command of this process's, between its publication and its application."""

    __slots__ = ("session", "ref", "then", "refused", "job", "sent", "lost")

    def __init__(self, session: Any, ref: Any, then: Optional[Callable[[Any], None]],
                 refused: Optional[Callable[[ChatError], None]], job: bool) -> None:
        self.session = session
        self.ref = ref
        self.then = then  # called with the result of applying it here
        self.refused = refused  # called with the ChatError it met (None: the session is told)
        self.job = job  # the session waits for it: `job_done()` once it is settled
        self.sent = False
        self.lost = False  # sent, and the link fell before Redis answered

    def succeeded(self, result: Any) -> None:
        if self.then is not None:
            self.then(result)
        if self.job and self.session is not None:
            self.session.job_done()

    def failed(self, error: ChatError) -> None:
        if self.refused is not None:
            self.refused(error)
        elif self.session is not None:
            self.session.send_error(error.code, error.message, self.ref)
        if self.job and self.session is not None:
            self.session.job_done()


class ClusterNode:
    """This process in the cluster: publishes commands, applies the ordered stream."""

    PUBLISH = Script(PUBLISH_WITH_ID_LUA)
    JOIN = Script(JOIN_LUA)
    RENEW = Script(RENEW_LUA)
    EXPIRED = Script(EXPIRED_LUA)
    BURY = Script(BURY_LUA)
    RAISE_IDS = Script(RAISE_IDS_LUA)

    def __init__(self, hub: Any, link: RedisLink, node_id: Optional[str] = None,
                 maxlen: int = 10000) -> None:
        self.hub = hub
        self.chat = hub.chat
        self.link = link
        self.node = node_id or os.urandom(6).hex()
        self.streams = RoomStreams(link, maxlen=maxlen)
        for script in (self.PUBLISH, self.JOIN, self.RENEW, self.EXPIRED, self.BURY, self.RAISE_IDS):
            link.add_script(script.source)
        self.members_key = f"{self.streams.prefix}members"
        self.prefix = self.streams.prefix
        self.meta_key, self.stream_key = self.streams.keys(STREAM)
        self.ids_key = f"{self.prefix}{{{STREAM}}}:ids"
        self.channel = self.streams.channel(STREAM)
        self.node_channel = f"{self.prefix}{link.db}:node:{self.node}".encode()
        self.epoch = ""
        self.offset = 0  # the last command applied
        self.synced = False  # the state is the cluster's (a snapshot loaded, or alone)
        self.live = False  # synced and caught up: submissions are accepted
        self._catching_up = False
        self._buffer: Dict[int, Tuple[str, bytes]] = {}  # offset -> (epoch, body) not yet applied
        self._hello_at: Optional[int] = None  # the offset of our hello (while waiting a snapshot)
        self._seq = 0
        self._pending: Dict[int, _Pending] = {}  # seq -> what waits for its command
        self.sessions: Dict[str, Any] = {}  # sid -> session (ours and the others')
        self._sid_of: Dict[Any, str] = {}  # our sessions -> sid
        self.nodes: Dict[str, None] = {}  # the processes the state holds users of, and us
        self._current_id = 0  # the id the command being applied carries
        # The highest id this process has seen (any command's, or its store's): the floor it
        # gives every publication, so ids keep growing when Redis comes back without them.
        self._high_id = self.chat.last_id
        # Once Redis has lost ids (came back empty, or behind): our clock in ms x 1000, a floor
        # above any id given before (see PUBLISH_WITH_ID_LUA).
        self._id_floor = 0
        self._absent_since: Dict[str, float] = {}  # known processes with no lease -> since
        self._applying: Optional[_Pending] = None
        self._unsent_leaves: List[Tuple[str, Optional[str]]] = []
        self._leaving: Dict[str, User] = {}  # sid -> the user of our connection that left
        self.stats = {"applied": 0, "caught_up": 0, "snapshots_sent": 0, "unavailable": 0}
        self._snapshot_timer: Any = None
        self._parts: Optional[Tuple[bytes, List[bytes]]] = None  # (sender, parts) of a snapshot
        self._buffered_bytes = 0
        # Told (with why) when this process cannot be part of the cluster (its rules differ);
        # the server stops.
        self.on_fatal: Callable[[str], None] = lambda why: None
        self._how_synced = ""  # said once, when first live
        self._checks_from = 0.0  # no lease is judged before this (reactor time)
        self._mine = False  # the command being applied is this process's
        link.on_message = self._on_message
        link.on_up = self._on_up
        link.on_state = self._on_state
        link.subscribe(self.channel, self.node_channel)
        self.chat._allocate = self._next_id
        self.chat.stored = self._stored
        self.history_kept = maxlen  # messages per room or conversation in the shared history
        self._backfilling = False
        self._lease_timer = hub.reactor.call_later(LEASE_RENEW, self._renew)
        self._check_timer = hub.reactor.call_later(DEAD_CHECK, self._check_leases)

    # --- what the hub asks ------------------------------------------------------------------

    def sid(self, session: Any) -> str:
        if isinstance(session, RemoteSession):
            return session.sid
        sid = self._sid_of.get(session)
        if sid is None:
            self._seq += 1
            sid = self._sid_of[session] = f"{self.node}:{self._seq}"
        return sid

    def submit(self, body: Dict[str, Any], session: Any = None, ref: Any = None,
               then: Optional[Callable[[Any], None]] = None,
               refused: Optional[Callable[[ChatError], None]] = None, job: bool = False) -> None:
        """Publish a command; once it is applied here `then(result)`, or, when applying it
        raised (or it could not be ordered: `unavailable`), `refused(error)` (None: the
        session gets the error with `ref`). `job`: the session waits, `job_done()` after."""
        pending = _Pending(session, ref, then, refused, job)
        if not self.live:
            self._fail(pending, "the cluster link is down: try again")
            return
        if len(self._pending) >= MAX_PENDING:
            self._fail(pending, "too many changes in flight: try again")
            return
        self._seq += 1
        seq = self._seq
        body["n"] = self.node
        body["q"] = seq
        self._pending[seq] = pending
        self._publish(body, lambda reply: self._published(seq, reply))
        pending.sent = True

    def _publish(self, body: Dict[str, Any], done: Callable[[Any], None]) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        self.PUBLISH.call(self.link, (self.meta_key, self.stream_key, self.ids_key),
                          (self.channel, payload, self.streams.maxlen, new_epoch(),
                           max(self._high_id, self._id_floor)), done)

    def _published(self, seq: int, reply: Any) -> None:
        pending = self._pending.get(seq)
        if pending is None or not isinstance(reply, ReplyError):
            return  # applied already, or will be when it comes round on the channel
        if isinstance(reply, Unavailable) and reply.sent:
            pending.lost = True  # it may have run: the catch-up after the reconnection tells
            return
        del self._pending[seq]
        self._fail(pending, "the cluster link is down: try again")

    def _fail(self, pending: _Pending, why: str) -> None:
        self.stats["unavailable"] += 1
        error = ChatError("unavailable", why)
        self.hub.reactor.call_soon(self._refuse, pending, error)

    def _refuse(self, pending: _Pending, error: ChatError) -> None:
        session = pending.session
        if session is not None and getattr(session, "user", None) is None:
            self._sid_of.pop(session, None)  # a hello that never got in: nothing to keep
        pending.failed(error)

    def leave(self, user: User, session: Any, reason: Optional[str]) -> None:
        """Our connection `session` of `user` went: everyone drops it (the user quits with
        `reason` when it was the last one)."""
        sid = self._sid_of.pop(session, None)
        if sid is None:
            return
        self._leaving[sid] = user  # (the door forgets its user at once; we apply it later)
        body = {"k": "leave", "s": sid, "r": reason}
        if self.live:
            self._seq += 1
            body.update(n=self.node, q=self._seq)
            self._publish(body, lambda reply: self._leave_published(sid, reason, reply))
        else:
            self._unsent_leaves.append((sid, reason))

    def _leave_published(self, sid: str, reason: Optional[str], reply: Any) -> None:
        # Not ordered, or perhaps not (sent when the link fell): sent again once the link is
        # back and caught up, unless it came round meanwhile (applying one twice is nothing).
        if isinstance(reply, ReplyError):
            self._unsent_leaves.append((sid, reason))

    # --- the ordered stream ---------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes, pattern: Optional[bytes]) -> None:
        if channel == self.node_channel:
            self._on_snapshot(data)
            return
        try:
            publication = parse_message(data)
        except ValueError:
            log.error("cluster: not a publication on %r", channel)
            return
        self._arrived(publication.epoch, publication.offset, publication.payload)

    def _arrived(self, epoch: str, offset: int, body: bytes) -> None:
        if not self.synced or self._catching_up:
            self._hold(offset, epoch, body)
            return
        if epoch != self.epoch:
            self._hold(offset, epoch, body)
            self._catch_up()
            return
        if offset <= self.offset:
            return  # seen (a catch-up overlapping the live channel)
        if offset != self.offset + 1:
            self._hold(offset, epoch, body)
            self._catch_up()
            return
        self._apply(offset, body)

    def _hold(self, offset: int, epoch: str, body: bytes) -> None:
        """Keep a command that came while we cannot apply it yet; past the cap it is dropped
        (the fate: the catch-up reads it from the stream)."""
        if len(self._buffer) < 4 * MAX_PENDING and self._buffered_bytes + len(body) <= MAX_BUFFERED_BYTES:
            self._buffer[offset] = (epoch, body)
            self._buffered_bytes += len(body)

    def _apply(self, offset: int, body: bytes) -> None:
        self.offset = offset
        self.stats["applied"] += 1
        id_text, _, payload = body.partition(b" ")
        self._current_id = int(id_text)
        if self._current_id > self._high_id:
            self._high_id = self._current_id
        try:
            command = json.loads(payload)
        except ValueError:
            log.error("cluster: command %d is not JSON", offset)
            return
        mine = command.get("n") == self.node
        pending = self._pending.pop(command.get("q", -1), None) if mine else None
        kind = command.get("k")
        self._mine = mine
        try:
            handler = _HANDLERS.get(kind)
            if handler is None:
                log.error("cluster: command %d of an unknown kind %r", offset, kind)
                return
            result = handler(self, command, pending)
        except ChatError as exc:
            if pending is not None:
                self._refuse(pending, exc)
            return
        except Exception:  # a bug here must not stop the stream for everyone else
            log.exception("cluster: command %d (%s) failed", offset, kind)
            if pending is not None:
                self._refuse(pending, ChatError("unavailable", "the change failed: try again"))
            return
        if pending is not None:
            pending.succeeded(result)

    def _next_id(self) -> int:
        return self._current_id

    # --- the history all share: one capped stream per room and per conversation -------------

    def _history_key(self, key: str) -> str:
        return f"{self.prefix}hist:{key}"

    def _stored(self, key: str, message: events.Message) -> None:
        """A message went into our store: the process that decided it copies it to Redis, so
        a process that starts later, or was away, can fill in what it missed."""
        if not self._mine:
            return
        data = json.dumps(message_to_json(message), separators=(",", ":")).encode()
        self.link.execute("XADD", self._history_key(key), "MAXLEN", "~", self.history_kept,
                          "*", "m", data)
        self.link.execute("SADD", f"{self.prefix}hist:keys", key)

    def _backfill(self) -> None:
        """Fill our store with what the shared history holds and we do not (a process that
        started later, or was down): room by room, in the background of the loop."""
        if self._backfilling:
            return
        self._backfilling = True
        store = self.chat.store

        def keys(reply: Any) -> None:
            if isinstance(reply, ReplyError):
                self._backfilling = False
                return
            names = sorted(k.decode() for k in reply)[:MAX_BACKFILL_KEYS]
            left = [len(names)]
            if not names:
                self._backfilling = False
            for key in names:
                self.link.execute("XRANGE", self._history_key(key), "-", "+", "COUNT",
                                  self.history_kept,
                                  done=lambda r, key=key: entries(key, r, left))

        def entries(key: str, reply: Any, left: List[int]) -> None:
            left[0] -= 1
            if left[0] <= 0:
                self._backfilling = False
            if isinstance(reply, ReplyError) or not reply:
                return
            messages = []
            for _, fields in reply:
                try:
                    messages.append(message_from_json(json.loads(dict(zip(fields[::2], fields[1::2]))[b"m"])))
                except (ValueError, KeyError, TypeError):
                    continue
            if not messages:
                return
            low, high = min(m.id for m in messages), max(m.id for m in messages)
            try:
                have = {m.id for m in store.window(key, after=low - 1, before=high + 1,
                                                   limit=len(messages) + 1000, latest=False)}
            except Exception as exc:  # the disk: the backfill is a courtesy, the chat goes on
                log.error("cluster: history backfill of %s failed: %s", key, exc)
                return
            added = 0
            for m in sorted(messages, key=lambda m: m.id):
                if m.id not in have:  # (add_copy keeps it once even if it came meanwhile)
                    store.add_copy(m, key)
                    added += 1
            if added:
                self.stats["backfilled"] = self.stats.get("backfilled", 0) + added
                log.info("cluster: history of %s: %d message(s) filled in from Redis", key, added)
                room = self.chat.rooms.get(key)
                if room is not None:
                    self.chat._forget_recent(room)

        self.link.execute("SMEMBERS", f"{self.prefix}hist:keys", done=keys)

    def _session(self, sid: str) -> Any:
        session = self.sessions.get(sid)
        if session is None:
            node = sid.partition(":")[0]
            session = self.sessions[sid] = RemoteSession(sid, node)
        return session

    def _user(self, sid: str) -> User:
        session = self.sessions.get(sid)
        user = getattr(session, "user", None) if session is not None else None
        if user is None or self.chat.users.get(user.key) is not user:
            raise ChatError("unavailable", "that connection has left")
        return user

    def _deliver(self, deliveries: List[Any], pending: Optional[_Pending], session: Any) -> None:
        self.hub._deliver(deliveries, pending.ref if pending is not None else None, session)

    # --- command handlers ---------------------------------------------------------------------

    def _do_reg(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        sid = c["s"]
        session = pending.session if pending is not None else self._session(sid)
        self.nodes.setdefault(c["n"], None)
        accounts = self.chat.accounts
        accounts.next_token = c.get("tok")
        try:
            user, deliveries = self.chat.register(
                c["nick"], session, join_lobby=c["lobby"], ident=c["ident"], host=c["host"],
                realname=c["real"], door=c["door"], origin=c["origin"], now_ms=c["t"],
                account=c.get("acct"), remember=bool(c.get("tok")))
        except ChatError:
            self.sessions.pop(sid, None)  # refused: nothing of it is kept, here or there
            if pending is not None:
                self._sid_of.pop(session, None)
            raise
        finally:
            accounts.next_token = None
        self.sessions[sid] = session
        session.user = user  # (a door's session learns its user before the welcome is out)
        self._deliver(deliveries, pending, session)
        if not isinstance(session, RemoteSession) and not session.transport.accepting:
            # Ours, and it went while its hello waited for the order: the door never knew a
            # user to leave with, so the leave is ours to send.
            session.user = None
            self.leave(user, session, "connection closed")
        return user

    def _do_req(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        session = self.sessions.get(c["s"])
        user = self._user(c["s"])
        request = decode_request(c["r"])
        deliveries = self.chat.handle(user, request, c["t"])
        self._deliver(deliveries, pending, session)
        if pending is not None and type(request) is requests.Say:
            self.hub._said.append((session, pending.ref, deliveries[0].event.id))
        return deliveries

    def _do_leave(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        session = self.sessions.pop(c["s"], None)
        user = self._leaving.pop(c["s"], None) or getattr(session, "user", None)
        if isinstance(session, RemoteSession):
            session.user = None  # (no cycle: the user goes with its last reference, at once)
        if user is None:
            return None
        self.hub.fanout.deliver(self.chat.disconnect(user, c["r"] or "connection closed", session), None)
        return None

    def _do_acct(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        session = self.sessions.get(c["s"])
        user = self._user(c["s"])
        chat = self.chat
        op = c["op"]
        chat.accounts.next_token = c.get("tok")
        try:
            if op == "register":
                out = chat.register_account(user, c["v"], c["t"], bool(c.get("tok")))
            elif op == "login":
                out = chat.log_in(user, c["a"], session, c["t"], bool(c.get("tok")))
                owner = chat.online.get(c["a"])
                if owner is not None and owner is not user and session in owner.sessions:
                    session.user = owner
            elif op == "password":
                out = chat.set_password(user, c["v"], c["t"], bool(c.get("tok")))
            elif op == "logout":
                out = chat.log_out(user, c.get("token"))
            else:
                raise ChatError("unavailable", f"unknown account change {op!r}")
        finally:
            chat.accounts.next_token = None
        self._deliver(out, pending, session)
        return out

    def _do_attr(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        if c["a"] == "modes":
            session = self.sessions.get(c["s"])
            if isinstance(session, RemoteSession):
                session.invisible = bool(c["v"].get("invisible"))
                session.bot = bool(c["v"].get("bot"))
            return None
        user = self._user(c["s"])
        if c["a"] == "away":
            self.chat.set_away(user, c["v"])
        elif c["a"] == "realname":
            user.realname = c["v"]
        return None

    def _do_kill(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        user = self._user(c["s"])
        target = self.chat.kill_target(user, c["nick"])
        reason = f"killed by {user.nick}" + (f": {c['why']}" if c["why"] else "")
        log.info("kill: %s kills %s (%s)", user.nick, target.nick, c["why"])
        for victim in list(target.sessions):
            if not isinstance(victim, RemoteSession):
                self.hub.condemn(victim, reason)
        return None

    def _do_hello(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        node = c["n"]
        if node == self.node:
            return None
        self.nodes.setdefault(node, None)
        # Our copy as it stands after this offset is the one the newcomer builds on.
        data = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        channel = f"{self.prefix}{self.link.db}:node:{node}".encode()
        parts = [data[i:i + SNAPSHOT_PART] for i in range(0, len(data), SNAPSHOT_PART)] or [b""]
        head = f"{self.node} {self.offset} ".encode()
        offset = self.offset

        def send(index: int) -> None:
            """One part at a time, the next when Redis took this one: a big state never fills
            the link's outgoing buffer (it would be refused whole)."""
            def sent(reply: Any) -> None:
                if isinstance(reply, ReplyError):
                    log.warning("cluster: the state for process %s stopped at part %d of %d: %s",
                                node, index + 1, len(parts), reply)
                elif index + 1 < len(parts):
                    send(index + 1)
                else:
                    log.info("cluster: process %s joined at offset %d; sent it the state "
                             "(%d bytes)", node, offset, len(data))

            self.link.execute("PUBLISH", channel,
                              head + f"{index} {len(parts)} ".encode() + parts[index], done=sent)

        send(0)
        self.stats["snapshots_sent"] += 1
        return None

    def _do_dead(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        node = c["dead"]
        if self._mine:
            self.BURY.call(self.link, (self.members_key,), (node,), _ignore)
        self._absent_since.pop(node, None)
        if node not in self.nodes:
            return None  # (buried already: every process may have seen the lease gone)
        del self.nodes[node]
        prefix = node + ":"
        gone = [sid for sid in self.sessions if sid.startswith(prefix)]
        ours = node == self.node
        if ours:
            # The others buried us (our link was down past the lease): our connections are
            # gone from every copy, so from ours too (the same way), and they close here;
            # their clients come back as new connections.
            log.error("cluster: the others found this process's lease gone; closing its "
                      "%d connection(s)", len(gone))
        for sid in gone:
            session = self.sessions.pop(sid)
            user = self._leaving.pop(sid, None) or getattr(session, "user", None)
            if isinstance(session, RemoteSession):
                session.user = None
            if user is not None and self.chat.users.get(user.key) is user:
                self.hub.fanout.deliver(self.chat.disconnect(user, "connection closed", session), None)
            if ours and not isinstance(session, RemoteSession):
                self._sid_of.pop(session, None)  # (its leave is no one's news now)
                self.hub.condemn(session, "connection closed")
        if not ours:
            log.warning("cluster: process %s is gone (lease expired): %d connection(s) closed",
                        node, len(gone))
        return None

    # --- starting: a snapshot from the others, or alone -------------------------------------

    def _on_up(self) -> None:
        if self.synced:
            self._renew_now()
        # After an outage every lease may have run out inside Redis: the others renew theirs
        # when their links come back, so nobody is buried before a lease's time has passed.
        self._checks_from = self.hub.reactor.now + LEASE_TTL
        self._absent_since.clear()  # (absences are counted from now: the others renew too)
        if not self.synced:
            self._start()
        else:
            self._catch_up()

    def _start(self) -> None:
        """Join: hold the state alone when no live process holds it (one script decides, so
        two starting at once cannot both think so), else `hello` and wait for a snapshot."""
        def decided(reply: Any) -> None:
            if isinstance(reply, ReplyError):
                return  # the link dropped: `_on_up` starts again
            alone = bool(reply[0])
            body = {"k": "hello", "n": self.node, "q": 0}

            def said(answer: Any) -> None:
                if isinstance(answer, ReplyError):
                    return
                self._hello_at = int(answer[1])
                self.epoch = answer[0].decode("ascii")
                if alone:
                    self._become_synced(self.epoch, self._hello_at, alone=True)
                else:
                    self._snapshot_timer = self.hub.reactor.call_later(SNAPSHOT_WAIT, self._no_snapshot)

            self._publish(body, said)
            for raw in reply[1:]:  # (after our hello: whoever wakes applies it after its own state)
                self._seq += 1
                log.warning("cluster: process %s held no lease when this one started alone: "
                            "buried", raw.decode())
                self._publish({"k": "dead", "dead": raw.decode(), "n": self.node, "q": self._seq},
                              _ignore)

        self.JOIN.call(self.link, (self.members_key,), (self.node, int(LEASE_TTL * 1000)), decided)

    def _no_snapshot(self, _: Any = None) -> None:
        self._snapshot_timer = None
        if self.synced:
            return
        log.warning("cluster: no snapshot came in %.0f s; asking again", SNAPSHOT_WAIT)
        self._buffer.clear()
        self._buffered_bytes = 0
        self._parts = None
        if self.link.state is LinkState.UP:
            self._start()

    def _on_snapshot(self, message: bytes) -> None:
        """A part of a snapshot (`SENDER OFFSET INDEX COUNT data`): the parts of the first
        sender to answer our latest hello are put together; anything else is dropped."""
        if self.synced or self._hello_at is None:
            return
        try:
            sender, offset, index, count, data = message.split(b" ", 4)
            offset_n, index_n, count_n = int(offset), int(index), int(count)
        except ValueError:
            log.error("cluster: a snapshot part that is not one")
            return
        if offset_n != self._hello_at:
            return  # for an earlier hello of ours
        parts = self._parts
        if parts is None or parts[0] != sender:
            if index_n != 0 or (parts is not None and len(parts[1]) > 0):
                return  # another sender's, while we take the first one's
            parts = self._parts = (sender, [])
        if index_n != len(parts[1]) or count_n * SNAPSHOT_PART > MAX_SNAPSHOT:
            log.error("cluster: a snapshot out of order or too big (part %d of %d)", index_n, count_n)
            self._parts = None
            return
        parts[1].append(data)
        if self._snapshot_timer is not None:  # it is coming: give it time
            self._snapshot_timer.cancel()
            self._snapshot_timer = self.hub.reactor.call_later(SNAPSHOT_WAIT, self._no_snapshot)
        if len(parts[1]) < count_n:
            return
        self._parts = None
        try:
            snapshot = json.loads(b"".join(parts[1]))
        except ValueError:
            log.error("cluster: a snapshot that is not JSON")
            return
        if snapshot.get("epoch") != self.epoch or snapshot.get("offset") != self._hello_at:
            return
        problem = self.rules_problem(snapshot.get("rules", {}))
        if problem:
            log.critical("cluster: this process's options differ from the cluster's: %s; "
                         "every process must apply the same rules, so this one stops", problem)
            self.on_fatal(problem)
            return
        self.load(snapshot)
        self._become_synced(self.epoch, self._hello_at)

    def _become_synced(self, epoch: str, offset: int, alone: bool = False) -> None:
        if self._snapshot_timer is not None:
            self._snapshot_timer.cancel()
            self._snapshot_timer = None
        self.epoch = epoch
        self.offset = offset
        self.synced = True
        self.nodes.setdefault(self.node, None)
        self._renew_now()  # a member now: the next newcomer asks us
        self._how_synced = "alone: the state is its own" if alone else "state from a snapshot"
        self._catch_up()

    def _catch_up(self) -> None:
        """Read what followed our offset before applying anything newer."""
        if self._catching_up or self.link.state is not LinkState.UP:
            return
        self._catching_up = True
        self.live = False

        def read(missed: Any) -> None:
            self._catching_up = False
            if isinstance(missed, ReplyError):
                return  # the link dropped again: its `on_up` starts over
            assert isinstance(missed, Missed)
            if missed.status == "epoch":
                log.warning("cluster: Redis has a new epoch (%s, was %s): it came back empty; "
                            "the state here goes on, the stream starts again", missed.epoch, self.epoch)
                self.epoch = missed.epoch
                self.offset = 0
                self._forget_pending("Redis came back empty")
                self._raise_id_floor()
            elif missed.status == "gap":
                log.error("cluster: commands after %d fell out of the capped stream: this "
                          "process's state may differ from the others'", self.offset)
            elif missed.status == "behind":
                log.error("cluster: Redis is behind this process (offset %d < %d): it lost "
                          "acknowledged writes", missed.top, self.offset)
                self.offset = missed.top
                self._forget_pending("Redis lost acknowledged writes")
                self._raise_id_floor()
            for entry in missed.entries:
                if entry.offset > self.offset:
                    self.stats["caught_up"] += 1
                    self._apply(entry.offset, entry.payload)
            if missed.more:
                self._catch_up()
                return
            # What arrived live meanwhile, in order; anything past a hole waits for the next look.
            buffered, self._buffer = self._buffer, {}
            self._buffered_bytes = 0
            for offset in sorted(buffered):
                epoch, body = buffered[offset]
                if epoch == self.epoch and offset == self.offset + 1:
                    self._apply(offset, body)
            if any(offset > self.offset for offset in buffered):
                self._catch_up()  # a hole among what came meanwhile: read it from the stream
                return
            self._go_live()

        self.streams.since(STREAM, self.epoch, self.offset, read, count=CATCH_UP_BATCH)

    def _go_live(self) -> None:
        self.live = True
        if self._how_synced:
            log.info("cluster: process %s in the cluster at offset %d (%s)", self.node,
                     self.offset, self._how_synced)
            self._how_synced = ""
            self._backfill()
        else:
            log.info("cluster: caught up to offset %d", self.offset)
        self._after_live()

    def _raise_id_floor(self) -> None:
        """Redis lost ids: a message another process applied just before may carry an id
        above any this process saw (Redis died before sending it here), and asking the others
        would wait for processes that may be gone. Ids go on above our clock (ms x 1000)
        instead: above every id given before, unless more than 1,000 a millisecond were given
        since the last such loss (or our clock is that far behind)."""
        floor = int(time.time() * 1000) * 1000
        if floor > self._id_floor:
            self._id_floor = max(floor, self._high_id)
            log.warning("cluster: Redis lost ids: new ones start above %d", self._id_floor)
        # Redis's counter too, at once: a process that did not see the loss (its link was
        # down while the lost writes were made) publishes with its own, lower floor. (One
        # that publishes before this lands can still take a lost id: docs/cluster.md.)
        self.RAISE_IDS.call(self.link, (self.ids_key,), (self._id_floor,), _ignore)

    def _forget_pending(self, why: str) -> None:
        """What we published before Redis lost its stream will never come round: every
        command still waiting is answered `unavailable` once we are live (even one Redis had
        acknowledged: it may have reached other processes, not ours)."""
        if self._pending:
            log.warning("cluster: %s: %d change(s) of ours will never come round; answered "
                        "unavailable", why, len(self._pending))
        for pending in self._pending.values():
            pending.lost = True

    def _after_live(self) -> None:
        # Commands whose fate the fallen link lost, and that the catch-up did not bring back,
        # never ran: now they can be answered.
        for seq in [s for s, p in self._pending.items() if p.lost]:
            pending = self._pending.pop(seq)
            self._fail(pending, "the cluster link went down: try again")
        self._send_leaves()

    def _send_leaves(self) -> None:
        leaves, self._unsent_leaves = self._unsent_leaves, []
        for sid, reason in leaves:
            if sid in self.sessions:
                self._seq += 1
                self._publish({"k": "leave", "s": sid, "r": reason, "n": self.node, "q": self._seq},
                              lambda reply, sid=sid, reason=reason: self._leave_published(sid, reason, reply))

    def _on_state(self, state: LinkState) -> None:
        if state is not LinkState.UP:
            self.live = False

    # --- leases ---------------------------------------------------------------------------------

    def _renew(self, _: Any = None) -> None:
        self._lease_timer = self.hub.reactor.call_later(LEASE_RENEW, self._renew)
        if self.link.state is LinkState.UP and self.synced:
            self._renew_now()
            if self.live and self._unsent_leaves:
                self._send_leaves()

    def _renew_now(self) -> None:
        """Our lease: an expiry by Redis's clock in the members' hash (one clock for all)."""
        self.RENEW.call(self.link, (self.members_key,), (self.node, int(LEASE_TTL * 1000)), _ignore)

    def _check_leases(self, _: Any = None) -> None:
        self._check_timer = self.hub.reactor.call_later(DEAD_CHECK, self._check_leases)
        if not self.live or self.hub.reactor.now < self._checks_from:
            return

        known = [n for n in self.nodes if n != self.node]

        def found(reply: Any) -> None:
            if isinstance(reply, ReplyError) or not self.live:
                return
            expired, absent = reply
            now = self.hub.reactor.now
            dead = [raw.decode() for raw in expired]
            missing = {raw.decode() for raw in absent}
            for node in list(self._absent_since):
                if node not in missing:
                    del self._absent_since[node]  # it holds a lease (again)
            for node in missing:
                since = self._absent_since.setdefault(node, now)
                if now - since >= ABSENT_GRACE and node in self.nodes and node not in dead:
                    log.warning("cluster: process %s holds users but no lease (for %.0f s): "
                                "buried", node, now - since)
                    dead.append(node)
            for node in dead:
                self._seq += 1
                self._publish({"k": "dead", "dead": node, "n": self.node, "q": self._seq}, _ignore)

        self.EXPIRED.call(self.link, (self.members_key,), (self.node, *known), found)

    def close(self) -> None:
        for timer in (self._lease_timer, self._check_timer, self._snapshot_timer):
            if timer is not None:
                timer.cancel()
        if self.link.state is LinkState.UP:
            self.link.execute("HDEL", self.members_key, self.node)

    # --- the state, whole ----------------------------------------------------------------------

    def rules(self) -> Dict[str, Any]:
        """The options every copy decides by: processes that differ here would not stay one
        chat (an account one refuses, a room one caps), so a newcomer must match them."""
        chat = self.chat
        return {"registration": chat.accounts.registration, "max_accounts": chat.accounts.max_accounts,
                "operators": sorted(chat.accounts.operators),
                "max_presence": chat.max_presence, "history_on_join": chat.history_on_join,
                "max_rooms": chat.max_rooms, "max_rooms_per_user": chat.max_rooms_per_user,
                "max_rooms_per_origin": chat.max_rooms_per_origin,
                "room_reserve": chat.room_reserve, "few_rooms": chat.few_rooms}

    def rules_problem(self, theirs: Dict[str, Any]) -> str:
        mine = self.rules()
        # A rule newer than the sender (its snapshot has no such key) is taken at its default.
        theirs = {**RULE_DEFAULTS, **theirs}
        differ = [f"{key} {mine.get(key)!r} here, {theirs.get(key)!r} there"
                  for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]
        return "; ".join(differ)

    def set_rules(self, operators: List[str], registration: bool, max_accounts: int) -> None:
        """SIGHUP changed who operates, whether registration is open or the accounts cap:
        every copy takes it at one place in the order."""
        self.submit({"k": "rules", "ops": sorted(operators), "reg": registration,
                     "max_accounts": max_accounts},
                    refused=lambda exc: log.error("cluster: the new operators and registration "
                                                  "could not be sent: %s", exc.message))

    def _do_rules(self, c: Dict[str, Any], pending: Optional[_Pending]) -> Any:
        accounts = self.chat.accounts
        accounts.operators = set(c["ops"])
        accounts.registration = bool(c["reg"])
        if isinstance(c.get("max_accounts"), int) and c["max_accounts"] > 0:
            accounts.max_accounts = c["max_accounts"]
        log.info("cluster: server operators %s; registration %s (from process %s)",
                 ", ".join(c["ops"]) or "none", "open" if c["reg"] else "closed", c["n"])
        return None

    def snapshot(self) -> Dict[str, Any]:
        """This process's copy of the chat, as JSON-ready data (what a newcomer loads)."""
        chat = self.chat
        sid_of_session = {id(s): sid for sid, s in self.sessions.items()}
        users = []
        for user in chat.users.values():
            users.append({
                "nick": user.nick, "ident": user.ident, "host": user.host,
                "real": user.realname, "away": user.away, "door": user.door, "since": user.since,
                "origin": user.origin, "holder": user.holder, "acct": user.account_key,
                "s": [sid_of_session.get(id(s)) or self.sid(s) for s in user.sessions],
                "modes": [[bool(getattr(s, "invisible", False)), bool(getattr(s, "bot", False))]
                          for s in user.sessions],
            })
        rooms = []
        for room in chat.rooms.values():
            try:
                recent, _ = chat.store.recent(room.name, None, SNAPSHOT_HISTORY, None)
            except Exception:  # the history is a courtesy; the state is what matters
                recent = []
            rooms.append({
                "name": room.name, "created": room.created, "holder": room.holder,
                "topic": [room.topic, room.topic_by, room.topic_ts], "flags": room.flags,
                "key": room.room_key, "limit": room.limit, "bans": room.bans,
                "ban_info": room.ban_info, "no_ext": room.no_external,
                "founder": room.founder, "op_accounts": list(room.op_accounts),
                "members": [u.key for u in room.members], "ops": [u.key for u in room.operators],
                "voiced": [u.key for u in room.voiced],
                "invited": [[u.key, v] for u, v in (room.invited or {}).items()],
                "recent": [message_to_json(m) for m in recent],
            })
        d = chat.directory
        return {
            "epoch": self.epoch, "offset": self.offset, "nodes": list(self.nodes),
            "ids": [self._high_id, self._id_floor],  # (what ids a newcomer must stay above)
            "rules": self.rules(),
            "users": users, "rooms": rooms, "rooms_held": chat.rooms_held,
            "directory": {
                "accounts": d.accounts, "tokens": d.tokens, "rooms": d.rooms,
                "mail": {k: [message_to_json(m) for _, m in box] for k, box in d.mail.items()},
            },
        }

    def load(self, snapshot: Dict[str, Any]) -> None:
        """Take the others' state (we have no users yet: nobody registers before we are live)."""
        chat = self.chat
        self.nodes = dict.fromkeys(snapshot["nodes"])
        high, floor = snapshot.get("ids", (0, 0))
        self._high_id = max(self._high_id, int(high))
        self._id_floor = max(self._id_floor, int(floor))
        d = chat.directory
        theirs = snapshot["directory"]
        # The cluster's directory replaces ours: a token revoked, an account or a room of a
        # file left from a run alone, must not open or hold anything here.
        for digest in [t for t in d.tokens if t not in theirs["tokens"]]:
            d.drop_token(digest)
        for key in [k for k in d.accounts if k not in theirs["accounts"]]:
            d.forget_account(key)
        for key in [k for k in d.rooms if k not in theirs["rooms"]]:
            d.forget_room(key)
        for key, (name, verifier, created) in theirs["accounts"].items():
            if d.accounts.get(key) != (name, verifier, created):
                d.save_account(key, name, verifier, created)
        for digest, (account, created) in theirs["tokens"].items():
            if digest not in d.tokens:
                d.save_token(digest, account, created)
        for key, (name, founder, state) in theirs["rooms"].items():
            if d.rooms.get(key) != (name, founder, state):
                d.save_room(key, name, founder, state)
        for owner in list(d.mail):
            d.take_mail(owner)
        for owner, box in snapshot["directory"]["mail"].items():
            for m in box:
                d.add_mail(owner, message_from_json(m))
        by_key: Dict[str, User] = {}
        for u in snapshot["users"]:
            sessions = [self._session(sid) for sid in u["s"]]
            user = User(u["nick"], sessions[0], u["ident"], u["host"], u["real"], u["door"], u["origin"])
            user.sessions = sessions
            user.holder = u["holder"]
            user.away = u["away"]
            user.since = u["since"]
            for s, (invisible, bot) in zip(sessions, u.get("modes") or [[False, False]] * len(sessions)):
                s.user = user
                s.invisible, s.bot = invisible, bot
            chat.users[user.key] = user
            if u["acct"] is not None:
                chat._log_in(user, u["acct"])
            by_key[user.key] = user
            self.nodes.update((s.node, None) for s in sessions)
        lobby_key = chat.lobby.key
        copy = getattr(chat.store, "add_copy", None)
        for r in snapshot["rooms"]:
            room: Room = chat.rooms.get(fold(r["name"])) if fold(r["name"]) == lobby_key else None  # type: ignore[assignment]
            if room is None:
                room = chat._room(r["name"], r["created"], r["holder"])
            room.topic, room.topic_by, room.topic_ts = r["topic"]
            room.flags.update(r["flags"])
            room.room_key, room.limit = r["key"], r["limit"]
            room.bans = list(r["bans"])
            room.ban_info = {k: tuple(v) for k, v in r["ban_info"].items()}  # type: ignore[misc]
            room.no_external = r["no_ext"]
            room.founder = r["founder"]
            room.op_accounts = dict.fromkeys(r["op_accounts"])
            if room.flags.get("secret"):
                chat.index.remove(room.key, 0)
            for key in r["members"]:
                user = by_key[key]
                room.members[user] = None
                user.rooms[room.key] = room
                if not room.flags.get("secret"):
                    chat.index.resize(room.key, len(room.members) - 1, len(room.members))
            room.operators = dict.fromkeys(by_key[k] for k in r["ops"])
            room.voiced = dict.fromkeys(by_key[k] for k in r["voiced"])
            if r["invited"]:
                room.invited = weakref.WeakKeyDictionary((by_key[k], v) for k, v in r["invited"])
            room.names_cache = None
            if copy is not None:
                for m in r["recent"]:
                    copy(message_from_json(m), room.name.lower())
        chat.rooms_held.clear()
        chat.rooms_held.update(snapshot["rooms_held"])
        log.info("cluster: loaded the state: %d user(s), %d room(s), %d process(es)",
                 len(chat.users), len(chat.rooms), len(self.nodes))


_HANDLERS: Dict[str, Callable[[ClusterNode, Dict[str, Any], Optional[_Pending]], Any]] = {
    "reg": ClusterNode._do_reg,
    "req": ClusterNode._do_req,
    "leave": ClusterNode._do_leave,
    "acct": ClusterNode._do_acct,
    "attr": ClusterNode._do_attr,
    "kill": ClusterNode._do_kill,
    "hello": ClusterNode._do_hello,
    "dead": ClusterNode._do_dead,
    "rules": ClusterNode._do_rules,
}

__all__ = ["ClusterNode", "RemoteSession", "encode_request", "decode_request"]
