"""Flood control weighs a request by what serving it cost: an expensive answer leaves a debt.

In-process, so the test can look at the bucket and the clock the session measures serving
time with: a request whose serving took 20 ms (the clock is moved while the chat answers; the
rooms list itself is cheap since it is kept sorted) is billed for that time however small its
answer, so the asker's next requests wait (they are not refused).
"""

from __future__ import annotations

import json
import socket
import struct

from selchat.config import ServerConfig
from selchat.core.store import MemoryStore
from selchat.loop.reactor import Reactor
from selchat.server import Server


def frame(obj: dict) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


def test_a_costly_request_is_billed_by_the_time_it_took(monkeypatch) -> None:
    from selchat.doors import jsonsession

    clock = [1000.0]
    monkeypatch.setattr(jsonsession.time, "perf_counter", lambda: clock[0])
    reactor = Reactor()
    server = Server(ServerConfig(port=0, db=":memory:", max_per_ip=0), MemoryStore(), reactor=reactor)
    server.listen()
    chat = server.chat
    for i in range(200):  # many rooms, made straight in the chat state
        user, _ = chat.register(f"filler{i}", None, join_lobby=False)
        for k in range(40):
            chat.join(user, f"#r{i}x{k}")
    sock = socket.create_connection(("127.0.0.1", server.address[1]))
    sock.sendall(frame({"type": "hello", "nick": "asker"}))
    for _ in range(10):
        reactor.run_once(0.01)
    session = next(t.session for t in server.transports.values())
    bucket = session.bucket
    assert bucket is not None and bucket.tokens == bucket.count  # nothing billed yet
    listing = chat.room_list

    def slow_room_list(offset: int = 0):
        clock[0] += 0.020  # this answer took 20 ms of the loop
        return listing(offset)

    monkeypatch.setattr(chat, "room_list", slow_room_list)
    sock.sendall(frame({"type": "rooms", "offset": 7990}))  # a tiny page of a long list
    for _ in range(10):
        reactor.run_once(0.01)
    assert bucket.count - bucket.tokens >= 1.0, "the 20 ms of serving were not billed"
    server.request_stop()
    server._finish()
    sock.close()
