"""A pass's room messages go out after the commit, straight to the socket of a member with
nothing queued (`Hub._send_batch`, `Transport.send_many`). These hold that path to what the
queue and the writer did: every byte once and in order, whatever the socket takes; behind
bytes already waiting; a dead socket handled like the writer handles it; the bytes counted.
Real loopback sockets, the server in this process (tests/test_inprocess.py's harness).
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selchat.doors.framed import codec  # noqa: E402

from test_inprocess import Harness, make, wait_until  # noqa: E402,F401  (make: a fixture)


def _say_many(client, count: int, text: str) -> None:
    client.send_bytes(b"".join(codec.encode({"type": "say", "room": "#lobby", "text": text})
                               for _ in range(count)))


def test_a_short_send_queues_the_rest_and_every_byte_arrives_once_in_order(
        make: Callable[..., Harness]) -> None:
    """A member whose socket takes part of a pass's chunk gets the rest from the queue, and the
    next passes' chunks wait behind it: its stream is the same as a reading member's."""
    h = make(max_outbuf=4 << 20)
    alice, bob = h.hello("alice"), h.hello("bob")
    tight = h.hello("tight", rcvbuf=4096)
    h.transport_of(tight).sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    h.settle()
    tight.reading = False
    short_sends = [0]
    transport = h.transport_of(tight)
    text = "w" * 900
    rounds = 0
    while rounds < 20:  # each round: 30 messages in one pass (27 KB), far past what fits
        _say_many(alice, 30, text)
        rounds += 1
        wait_until(lambda: len(bob.of("message")) == 30 * rounds, h.step)
        if transport.out.size:
            short_sends[0] += 1
    assert short_sends[0] > 0  # the socket did refuse part of it (else this tests nothing)
    tight.reading = True
    h.pump(lambda: len(tight.of("message")) == 30 * rounds)
    ids = [m["id"] for m in tight.of("message")]
    assert ids == [m["id"] for m in bob.of("message")]
    assert all(m["text"] == text for m in tight.of("message"))
    # Byte for byte what bob got from the same point on (its frames are the same bytes).
    start = len(bob.raw) - len(bob.of("message"))
    assert b"".join(tight.raw[-len(ids):]) == b"".join(bob.raw[start:])


def test_a_message_waits_behind_an_answer_queued_in_the_same_pass(
        make: Callable[..., Harness]) -> None:
    """bob's own request answered in the pass (queued) comes before the room message said
    after it in that pass, though the message would otherwise go straight to the socket."""
    h = make()
    alice, bob = h.hello("alice"), h.hello("bob")
    h.settle()
    bob.send({"type": "rooms", "ref": 7})
    alice.send({"type": "say", "room": "#lobby", "text": "after the answer"})
    h.pump(lambda: bool(bob.of("message")) and any(e.get("ref") == 7 for e in bob.events))
    kinds = [(e["type"], e.get("ref")) for e in bob.events]
    answered = next(i for i, e in enumerate(bob.events) if e.get("ref") == 7)
    said = next(i for i, e in enumerate(bob.events) if e["type"] == "message")
    # (Both came in one pass only if the two reads did; either way the order holds.)
    assert answered < said, kinds


def test_a_dead_member_is_dropped_and_the_others_get_the_message(
        make: Callable[..., Harness]) -> None:
    h = make()
    alice, bob = h.hello("alice"), h.hello("bob")
    gone = h.hello("gone")
    h.settle()
    theirs = h.transport_of(gone)
    # Reset, not closed: the server's next send to it fails at once (ECONNRESET/EPIPE).
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.sock.close()
    h.clients.remove(gone)
    for n in range(3):
        alice.send({"type": "say", "room": "#lobby", "text": f"to all {n}"})
        h.pump(lambda: len(bob.of("message")) == n + 1)
    h.pump(lambda: any(q["nick"] == "gone" for q in bob.of("quit")))
    assert [m["text"] for m in bob.of("message")] == ["to all 0", "to all 1", "to all 2"]
    assert [m["text"] for m in alice.of("message")] == ["to all 0", "to all 1", "to all 2"]
    assert theirs not in h.server.transports.values()


def test_bytes_sent_straight_away_are_counted(make: Callable[..., Harness]) -> None:
    """The writer's byte count (the metrics' bytes sent) includes what went straight out."""
    h = make()
    clients = [h.hello(f"m{i}") for i in range(5)]
    h.settle()
    received_before = [sum(len(r) for r in c.raw) for c in clients]
    sent_before = h.server.writer.sent
    clients[0].send({"type": "say", "room": "#lobby", "text": "count me"})
    h.pump(lambda: all(c.of("message") for c in clients))
    h.settle()
    received = sum(sum(len(r) for r in c.raw) for c in clients) - sum(received_before)
    assert received > 0
    assert h.server.writer.sent - sent_before == received

