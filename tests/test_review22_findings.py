"""Review of the send-after-commit change (e6d566c, 0c2cf53): defects found, as failing tests.

Real loopback sockets, the server in this process (tests/test_inprocess.py's harness), driven
pass by pass; every wait has a deadline.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selchat.doors.framed import codec  # noqa: E402

from test_inprocess import Harness, make, wait_until  # noqa: E402,F401  (make: a fixture)


def test_a_short_direct_send_is_not_an_overflow_when_the_rest_fits(
        make: Callable[..., Harness]) -> None:
    """`Transport.send_many` after a short send queues the whole chunk with `write()` and only
    then forgets what was sent: the --max-outbuf check sees the bytes that already left. A
    member whose socket took part of a pass's chunk is condemned as a slow consumer (with a
    truncated frame on its wire) though what is left to queue is well under the cap, while a
    member whose socket took all of it keeps going.

    Here: a 31 KB chunk, a 24 KB cap; `tight`'s socket takes 14 KB, so 17 KB are left to queue."""
    cap = 24 << 10
    h = make(max_outbuf=cap)
    senders = [h.hello(f"s{i}") for i in range(5)]
    bob = h.hello("bob")
    tight = h.hello("tight", rcvbuf=4096)
    transport = h.transport_of(tight)
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    h.settle()
    tight.reading = False
    text = "x" * 2000
    burst = b"".join(codec.encode({"type": "say", "room": "#lobby", "text": text}) for _ in range(3))
    for s in senders:
        s.send_bytes(burst)
    # One pass reads all five, serves the 15 messages and sends one chunk of them to each member.
    h.step()
    wait_until(lambda: len(bob.of("message")) == 15, lambda: bob.poll())
    chunk = sum(len(r) for r in bob.raw[-15:])
    assert chunk > cap  # (the setup: one chunk, over the cap, which bob took whole)
    # What the kernel took for tight: in its receive queue, and still in the server's send queue.
    on_wire = (len(tight.sock.recv(1 << 20, socket.MSG_PEEK))
               + struct.unpack("i", fcntl.ioctl(transport.fd, termios.TIOCOUTQ, b"\0" * 4))[0])
    assert 0 < on_wire < chunk and chunk - on_wire <= cap  # (the setup: a short send, the rest fits)

    # What is left (chunk - on_wire bytes) fits the cap: tight is a member like bob, not a slow
    # consumer. Today: condemned for the whole chunk, dropped, a truncated frame on its wire.
    assert transport.accepting, "tight was condemned for bytes its socket had already taken"
    tight.reading = True
    h.pump(lambda: len(tight.of("message")) == 15 or tight.eof)
    assert not tight.eof and len(tight.of("message")) == 15
    assert b"".join(tight.raw[-15:]) == b"".join(bob.raw[-15:])
