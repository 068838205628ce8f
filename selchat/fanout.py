"""Fan-out: deliveries from the chat state become bytes queued on the recipients' transports.

Every event is encoded once per wire format (the framed JSON door is one format; IRC clients
with the same capabilities share another), and the same `bytes` object is queued for every
recipient of that format. A requester's own copy (which may carry its `ref` or IRC label, or
be nothing at all for IRC without echo-message) is made by its session.

Room messages are batched: consecutive messages to one room in a pass become one chunk per
member, built when the batch is flushed. The batch is flushed here whenever anything else is
delivered, by the chat state before any membership changes (`Chat.before_change`) and by the
hub before the pass ends, so no caller has to remember it.

A session, as seen from here, has `transport` (with `accepting` and `write`), `wire` (with
`encode(event) -> list[bytes]` and `message(msg) -> bytes`), `reply(event, ref)` and
`own_message(msg, ref, shared) -> bytes` (`shared` is the format's common copy, for a
session whose own copy is the same when there is no `ref`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from selchat.core.chat import Delivery, Room
from selchat.core.events import Message
from selchat.loop.transport import Transport


class _Entry:
    __slots__ = ("message", "sender", "ref", "echo")

    def __init__(self, message: Message, sender: Any, ref: Any = None, echo: bool = False) -> None:
        self.message = message
        self.sender = sender  # the connection that said it (its copy is its own)
        self.ref = ref
        self.echo = echo  # the sender gets its own copy in the batch


class Fanout:
    """`current` is the connection whose request is being delivered (set by the hub): the
    answers (`reply` deliveries) go to it; a user's other connections get `mirror` copies."""

    __slots__ = ("_room", "_entries", "current")

    def __init__(self) -> None:
        self._room: Optional[Room] = None
        self._entries: List[_Entry] = []
        self.current: Any = None

    def deliver(self, deliveries: List[Delivery], ref: Any) -> None:
        for delivery in deliveries:
            event = delivery.event
            room = delivery.room
            if room is not None and type(event) is Message:
                self._batch(room, _Entry(event, self.current))
                continue
            if delivery.reply:
                entries = self._entries
                if (entries and entries[-1].message is event and entries[-1].sender is not None
                        and self._room is not None
                        and all(user in self._room.members for user in delivery.recipients)):
                    # The sender's own copy of the message just batched, in the same place
                    # (its other connections, members too, get the common copy). A sender
                    # outside the room (IRC's -n) is not in the batch: it is answered below.
                    entries[-1].ref = ref
                    entries[-1].echo = True
                    continue
                if entries:
                    self.flush()
                for user in delivery.recipients:
                    sessions = user.sessions
                    asker = self.current if self.current in sessions else sessions[0]
                    asker.reply(event, ref)
                    if delivery.mirror and len(sessions) > 1:
                        for session in sessions:
                            if session is not asker:
                                session.reply(event, None)
                continue
            if self._entries:
                self.flush()
            skip = delivery.skip
            encoded: Dict[Any, List[bytes]] = {}
            for user in delivery.recipients:
                if user is skip:
                    continue
                for session in user.sessions:
                    wire = session.wire
                    frames = encoded.get(wire)
                    if frames is None:
                        frames = encoded[wire] = wire.encode(event)
                    transport = session.transport
                    for data in frames:
                        transport.write(data)

    def room_message(self, room: Room, message: Message, sender: Any, ref: Any) -> None:
        """A message said by `sender`, a connection of a member of `room`: into the batch, with
        the sender's own copy (its `ref`) in it. The same as `deliver` makes of `Chat.say`'s
        deliveries for a member, without making them."""
        self._batch(room, _Entry(message, sender, ref, True))

    def _batch(self, room: Room, entry: _Entry) -> None:
        """Into the batch of `room`; a batch of another room is flushed first."""
        if room is not self._room:
            if self._entries:
                self.flush()
            self._room = room
        self._entries.append(entry)

    def send(self, transport: Any, data: bytes) -> None:
        """Queue bytes a session writes by itself (an answer, an error, a ping) after whatever
        the pass has batched, so they never overtake a room message said before them."""
        if self._entries:
            self.flush()
        transport.write(data)

    def flush(self, now: bool = False) -> None:
        """Queue the batched room messages: one chunk per member, shared by every member of a format.
        `now` (only once the pass's messages are durable, from the hub): send it at once to a
        member with nothing queued.

        This is the hot path of a busy room: per member it costs one append, however many
        messages the pass carried. Only the senders, whose own copies differ, get chunks of
        their own.
        """
        entries = self._entries
        room = self._room
        if not entries or room is None:
            return
        self._entries = []
        self._room = None
        senders: Dict[Any, List[int]] = {}  # sender -> where its own messages are in the batch
        for i, e in enumerate(entries):
            mine_at = senders.get(e.sender)
            if mine_at is None:
                senders[e.sender] = [i]
            else:
                mine_at.append(i)
        parts: Dict[Any, List[bytes]] = {}  # wire -> each entry's bytes in that format
        groups: Dict[Any, List[Any]] = {}  # wire -> the transports of the members of that format
        last_wire: Any = None
        group: List[Any] = []
        for user in room.members:
            for session in user.sessions:
                wire = session.wire
                own_at = senders.get(session)
                if own_at is not None:
                    transport = session.transport
                    if not transport.accepting:
                        continue
                    mine = parts.get(wire)
                    if mine is None:
                        mine = parts[wire] = [wire.message(e.message) for e in entries]
                    pieces = list(mine)
                    for i in own_at:
                        e = entries[i]
                        pieces[i] = session.own_message(e.message, e.ref, mine[i]) if e.echo else b""
                    data = b"".join(pieces)
                    if data:
                        if now:  # (first: a sender hears its own words back soonest)
                            Transport.send_many((transport,), data)
                        else:
                            transport.write(data)
                    continue
                if wire is not last_wire:
                    group = groups.get(wire)  # type: ignore[assignment]
                    if group is None:
                        group = groups[wire] = []
                    last_wire = wire
                group.append(session.transport)
        for wire, transports in groups.items():
            mine = parts.get(wire)
            if mine is None:
                mine = parts[wire] = [wire.message(e.message) for e in entries]
            data = mine[0] if len(mine) == 1 else b"".join(mine)
            if data:
                (Transport.send_many if now else Transport.write_many)(transports, data)
