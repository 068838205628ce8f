"""Server bugs found by the stateful test, the soak run and review.

Each test states what the contract requires; each failed on the server as it was then, and
stays here so the bug cannot come back.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from conftest import unique_nick, unique_room
from wire import encode


def test_the_excess_flood_error_carries_the_ref_of_the_request_that_caused_it(start_server) -> None:
    """docs/protocol.md, "Requests": the server copies `ref` into any `error` a request causes. The
    request that tips a client over the flood limit causes the last `rate_limited` error."""
    srv = start_server("--rate", "1", "--burst", "2", "--max-per-ip", "0")
    c = srv.registered(unique_nick("f"))
    c.send_raw(b"".join(encode({"type": "ping", "token": i, "ref": i}) for i in range(5)))
    c.expect("pong", token=0, ref=0)
    c.expect("pong", token=1, ref=1)
    c.expect_error("rate_limited", ref=2)  # refused: 1 in a row
    c.expect_error("rate_limited", ref=3)  # 2 in a row (= burst)
    c.expect_error("rate_limited", ref=4)  # 3 > burst: disconnected, and this error is ping 4's
    c.assert_closed(5.0)


def test_a_client_that_reads_is_not_dropped_for_asking_within_its_burst(start_server) -> None:
    """docs/protocol.md, "Liveness and limits": max_outbuf is for *slow* consumers, and backpressure stops serving a
    client whose own output is above the high-water mark. A client that asks, within its flood
    allowance (burst 20 by default), for 18 history pages of ~60 KB and reads them all at once is
    not slow; yet the server served all 18 requests of its one read in one pass, queued ~1.1 MB
    before writing a byte, passes the 1 MiB cap and drops it as a slow consumer. The project's own
    client does the same kind of burst when it reconnects and rejoins its rooms (a join answers
    a history of up to max_frame)."""
    srv = start_server("--max-per-ip", "0")  # every other option at its default
    room = unique_room()
    writer = srv.registered(unique_nick("w"))
    writer.join(room)
    writer.send_raw(b"".join(encode({"type": "say", "room": room, "text": f"{i} " + "x" * 3990})
                             for i in range(15)))  # within the burst of 20
    for _ in range(15):
        writer.expect("message", room=room)
    reader = srv.registered(unique_nick("r"))
    reader.join(room)  # its history: ~61 KB, under max_frame
    reader.send_raw(b"".join(encode({"type": "history", "room": room, "limit": 200, "ref": i})
                             for i in range(18)))  # 1 join + 18: the burst less one,
    for i in range(18):                                # kept for the barrier below
        ev = reader.expect("history", room=room, ref=i, timeout=5.0)
        assert len(ev["messages"]) == 15
    reader.assert_quiet()


def test_one_answer_never_drops_a_reading_client_whatever_the_limits(start_server) -> None:
    """docs/protocol.md, "Liveness and limits": max_outbuf is for clients that do not read. With
    --max-outbuf 65536 alone, joining a room whose history fills a frame queues join + names + a
    history of up to max_frame at once; were max_frame left at 65536, that passes the cap and
    drops the joiner as a slow consumer before it could read a byte. The option alone must start
    the server (max_frame is derived: a quarter of max_outbuf), and the join must be served."""
    srv = start_server("--max-outbuf", "65536", "--rate", "0", "--max-per-ip", "0")
    room = unique_room()
    writer = srv.registered(unique_nick("w"))
    writer.join(room)
    for _ in range(5):
        writer.send_raw(b"".join(encode({"type": "say", "room": room, "text": "w" * 4000}) for _ in range(10)))
        for _ in range(10):
            writer.expect("message", room=room)
    joiner = srv.client()
    limits = joiner.register(unique_nick("j"))["limits"]
    assert limits["max_frame"] == 65536 // 4, limits  # derived: one answer fits in a quarter
    writer.expect("join", nick=joiner.nick)
    joiner.send(type="join", room=room)
    joiner.expect("join", room=room, nick=joiner.nick)
    joiner.expect_names(room)
    assert joiner.expect("history", room=room)["messages"], "history cut to nothing"
    writer.expect("join", room=room, nick=joiner.nick)  # the room's member sees the joiner
    writer.assert_quiet()
    joiner.assert_quiet()  # and the joiner was not dropped as a slow consumer


def test_a_ping_token_that_cannot_be_written_back_is_a_bad_request(start_server) -> None:
    """Found by review: 1e400 reads as infinity, which no JSON can carry; echoing it raised out
    of the loop (and, from a timer, killed the server). Now the request is refused instead.
    (Flood control off: 4000 bad frames before hello would now be an excess flood.)"""
    srv = start_server("--max-per-ip", "0", "--rate", "0")
    c = srv.client()
    # Enough bad frames first that the ping waits behind backpressure and is served from a timer.
    infinite = b'{"type":"ping","token":1e400,"ref":"inf"}'
    c.send_raw(b"".join(encode({"no": "type"}) for _ in range(4000))
               + len(infinite).to_bytes(4, "big") + infinite)
    answer = c.collect_until(lambda e: e.get("ref") == "inf", timeout=10.0)[-1]
    assert answer["type"] == "error" and answer["code"] == "bad_request", answer
    c.send(type="ping", token=1.5)
    assert c.collect_until(lambda e: e["type"] == "pong")[-1]["token"] == 1.5
    assert srv.alive()
    c.register(unique_nick("after"))  # the connection is still good


def test_a_client_that_half_closes_after_pipelining_gets_every_answer(start_server) -> None:
    """Found by review: requests held back by backpressure were dropped as 'mid-frame' when the
    peer's end of stream came before they were served. Small requests with large answers (bad
    frames and their errors) make the server pause with many requests still buffered."""
    srv = start_server("--max-per-ip", "0", "--rate", "0")
    watcher = srv.registered(unique_nick("w"))
    c = srv.client(rcvbuf=4096)
    nick = unique_nick("pipe")
    count = 60000
    requests = (b"".join(encode({}) for _ in range(count))
                + encode({"type": "hello", "nick": nick})
                + encode({"type": "say", "room": "#lobby", "text": "the last word"}))
    sender = threading.Thread(target=lambda: (c.sock.setblocking(True), c.sock.sendall(requests),
                                              c.sock.shutdown(socket.SHUT_WR)))
    sender.start()
    # The scenario: the client does not read for a while, so the server stops serving it with
    # requests still buffered, and the end of its stream arrives before they are served.
    time.sleep(1.5)
    c.sock.setblocking(False)
    events = c.assert_closed(30.0)
    sender.join(5.0)
    assert sum(e["type"] == "error" and e["code"] == "bad_json" for e in events) == count
    assert any(e["type"] == "message" and e["text"] == "the last word" for e in events), events[-5:]
    watcher.wait_for("message", text="the last word", timeout=10.0)
