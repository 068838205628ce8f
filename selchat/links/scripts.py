"""One order per room, decided by Redis: an atomic publication, and a read of what was missed.

Each room has, in Redis (prefix `selchat:` by default, the room in a hash tag so a Redis
Cluster keeps a room's keys on one node):

  * `selchat:{#room}:meta`, a hash: `epoch` (a random string set once, when the hash is made)
    and `offset` (the last offset given in that epoch);
  * `selchat:{#room}:stream`, a stream whose entry ids are `OFFSET-0`, field `p` the payload,
    capped by `XADD MAXLEN ~ N` (so it keeps at least N entries, a little more in between);
  * the channel `selchat:DB:#room` (pub/sub ignores the database number, so the channel names
    it), on which every publication goes out as `EPOCH OFFSET PAYLOAD`.

`PUBLISH_LUA` takes the next offset, appends and publishes in one script: Redis runs a
script alone, so the stream's order, the channel's order and the offsets are one order for
every process. A Redis that comes back without the meta hash (restarted empty, flushed) gets
a new epoch from the first script that looks, and the stream is emptied with it, so a
follower that knew (old epoch, offset) is told, never handed a new message under an old
number.

`SINCE_LUA` answers (epoch, top offset, status, entries after the caller's offset), status:
  * `ok`: the entries are exactly what followed the caller's offset (up to `count`);
  * `gap`: some of what followed fell out of the capped stream; the entries start at the
    oldest kept;
  * `epoch`: the caller's epoch is not the room's (or it gave none); the entries start at the
    beginning of the room's epoch;
  * `behind`: the caller saw an offset above the room's top: Redis lost writes it had
    acknowledged (under `appendfsync everysec`: a crash, or a kill while an fsync was slow);
    nothing is returned.

Scripts go by EVALSHA; the link loads them (SCRIPT LOAD) at every connection before it is
UP, and a NOSCRIPT reply (the cache flushed under a live connection) is answered by sending
the same call again as EVAL. That retry goes behind whatever was sent meanwhile, so after a
flush one process's own publications may take Redis's order in a different order than asked;
the order every process sees is still one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, List, NamedTuple, Sequence, Tuple, Union

from selchat.links.redis import RedisLink
from selchat.links.resp import Arg, ReplyError

log = logging.getLogger(__name__)

# The room's epoch (`local epoch`), made with ARGV[4] (a fresh one) and an empty stream when
# the room has none: the first lines of every script on a room (KEYS: meta, stream).
EPOCH_LUA = b"""
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
"""

PUBLISH_LUA = b"""
-- KEYS: meta, stream. ARGV: channel, payload, maxlen, a fresh epoch in case the room has none.
""" + EPOCH_LUA + b"""local offset = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], offset .. '-0', 'p', ARGV[2])
redis.call('PUBLISH', ARGV[1], epoch .. ' ' .. offset .. ' ' .. ARGV[2])
return {epoch, tonumber(offset)}
"""

SINCE_LUA = b"""
-- KEYS: meta, stream. ARGV: known epoch ('' for none), known offset, count, a fresh epoch.
""" + EPOCH_LUA + b"""local top = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local known = tonumber(ARGV[2])
local status = 'ok'
if epoch ~= ARGV[1] then
  status = 'epoch'
  known = 0
elseif known > top then
  return {epoch, top, 'behind', {}}
end
if known >= top then
  return {epoch, top, status, {}}
end
local from = known + 1
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #first == 0 then
  if status == 'ok' then status = 'gap' end
  return {epoch, top, status, {}}
end
local oldest = tonumber(string.match(first[1][1], '^(%d+)'))
if oldest > from then
  if status == 'ok' then status = 'gap' end
  from = oldest
end
return {epoch, top, status,
        redis.call('XRANGE', KEYS[2], string.format('%d', from), '+', 'COUNT', ARGV[3])}
"""


class Script:
    """A Lua script called by EVALSHA, with EVAL as the fallback on NOSCRIPT."""

    __slots__ = ("source", "sha")

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest()

    def call(self, link: RedisLink, keys: Sequence[Arg], args: Sequence[Arg],
             done: Callable[[Any], None]) -> bool:
        def answered(reply: Any) -> None:
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                log.warning("%s: script %s not in Redis's cache; sent again as EVAL", link.name,
                            self.sha[:12])
                link.execute("EVAL", self.source, len(keys), *keys, *args, done=done)
                return
            done(reply)

        return link.execute("EVALSHA", self.sha, len(keys), *keys, *args, done=answered)


class Publication(NamedTuple):
    epoch: str
    offset: int
    payload: bytes


class Missed(NamedTuple):
    """What `since` found: the room's epoch and top offset now, how the entries relate to the
    caller's position (see the module's docstring), the entries, and whether more follow."""

    epoch: str
    top: int
    status: str
    entries: List[Publication]
    more: bool


def parse_message(data: bytes) -> Publication:
    """A channel message (`EPOCH OFFSET PAYLOAD`) as a Publication; ValueError if it is not one."""
    epoch, offset, payload = data.split(b" ", 2)
    if not offset.isdigit():
        raise ValueError("a publication's offset is a number")
    return Publication(epoch.decode("ascii"), int(offset), payload)


def new_epoch() -> str:
    return os.urandom(8).hex()


class RoomStreams:
    """The two operations on one link: publish to a room, read what a room said since."""

    PUBLISH = Script(PUBLISH_LUA)
    SINCE = Script(SINCE_LUA)

    def __init__(self, link: RedisLink, prefix: str = "selchat:", maxlen: int = 10000) -> None:
        if maxlen < 1:
            raise ValueError("a room's stream keeps at least one entry")
        self.link = link
        self.prefix = prefix
        self.maxlen = maxlen
        link.add_script(self.PUBLISH.source)
        link.add_script(self.SINCE.source)

    def keys(self, room: str) -> Tuple[str, str]:
        return f"{self.prefix}{{{room}}}:meta", f"{self.prefix}{{{room}}}:stream"

    def channel(self, room: str) -> bytes:
        return f"{self.prefix}{self.link.db}:{room}".encode()

    def publish(self, room: str, payload: bytes,
                done: Callable[[Union[Publication, ReplyError]], None]) -> bool:
        """Give `payload` the room's next offset, store it, publish it; `done(Publication)`,
        or `done(error)` (an `Unavailable` among them). False when refused at once."""
        def answered(reply: Any) -> None:
            if isinstance(reply, ReplyError):
                done(reply)
            else:
                done(Publication(reply[0].decode("ascii"), int(reply[1]), payload))

        return self.PUBLISH.call(self.link, self.keys(room),
                                 (self.channel(room), payload, self.maxlen, new_epoch()), answered)

    def since(self, room: str, epoch: str, offset: int,
              done: Callable[[Union[Missed, ReplyError]], None], count: int = 500) -> bool:
        """What the room said after (epoch, offset), at most `count` entries; `done(Missed)`.
        A new epoch, a gap and a Redis behind the caller are logged here, once a call."""
        if count < 1:
            raise ValueError("count is at least 1")

        def answered(reply: Any) -> None:
            if isinstance(reply, ReplyError):
                done(reply)
                return
            now_epoch = reply[0].decode("ascii")
            top, status = int(reply[1]), reply[2].decode("ascii")
            entries = [Publication(now_epoch, int(entry_id.split(b"-", 1)[0]), _field(fields, b"p"))
                       for entry_id, fields in reply[3]]
            more = bool(entries) and entries[-1].offset < top
            if status == "epoch" and epoch:
                log.warning("%s: room %s has a new epoch in Redis (%s, was %s): what it held "
                            "before is gone", self.link.name, room, now_epoch, epoch)
            elif status == "gap":
                first = entries[0].offset if entries else top + 1
                log.warning("%s: room %s: offsets %d to %d fell out of the capped stream",
                            self.link.name, room, offset + 1, first - 1)
            elif status == "behind":
                log.error("%s: room %s: Redis's top offset %d is below the %d this process saw "
                          "(Redis lost acknowledged writes)", self.link.name, room, top, offset)
            done(Missed(now_epoch, top, status, entries, more))

        return self.SINCE.call(self.link, self.keys(room), (epoch, offset, count, new_epoch()), answered)


def _field(fields: List[bytes], name: bytes) -> bytes:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return fields[i + 1]
    return b""
