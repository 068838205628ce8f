"""What the last review still found (issue 18, item 6); each test failed on the code before.

* A `ping` whose token nests arrays or objects nearly as deep as the JSON reader allows was
  read, then its `pong` could not be written (the writer recurses once per level): an
  internal error, and the connection was lost. A payload is answered or refused with a
  protocol error, and the connection stays.
* A `rooms` answer stopped where the client's buffer was full and said `next`; a client that
  reads as fast as it can and knows only docs/protocol.md ("a list too long for one frame
  comes as several `rooms` events") waited for the rest for ever. Every paged answer now ends
  with `more: false`: the server sends the rest itself as the client drains its buffer.
"""

from __future__ import annotations

import socket
import time
from typing import List

import pytest

from conftest import unique_nick
from wire import encode, frame


@pytest.mark.parametrize("depth", [981, 982, 3000])
@pytest.mark.parametrize("opening,closing", [("[", "]"), ('{"a":', "}")])
def test_a_deeply_nested_ping_token_is_refused_and_the_connection_stays(
        server, depth: int, opening: str, closing: str) -> None:
    c = server.registered(unique_nick("deep"))
    token = opening * depth + "0" + closing * depth if opening != "[" else "[" * depth + "]" * depth
    c.send_payload(('{"type":"ping","ref":7,"token":%s}' % token).encode())
    ev = c.recv_event(timeout=5.0)
    if ev["type"] == "error":
        assert ev["code"] in ("bad_request", "bad_json") and ev.get("ref") in (7, None)
    else:
        assert ev["type"] == "pong" and ev["ref"] == 7
    c.send(type="ping", token="after", ref=8)
    c.expect("pong", token="after", ref=8)


def test_a_ping_token_of_moderate_depth_is_still_echoed(server) -> None:
    c = server.registered(unique_nick("deep"))
    token: object = "x"
    for _ in range(100):
        token = [token]
    c.send(type="ping", token=token, ref=1)
    c.expect("pong", token=token, ref=1)


def _make_rooms(srv, count: int, monkeypatch) -> List[str]:
    """`count` rooms with names of 40 characters, made by as few users as the caps allow: 99
    a user (each is in #lobby too), from as many loopback addresses as the per-address share
    of the room table (500 by default) asks for."""
    names = [f"#{i:06d}" + "q" * 33 for i in range(count)]
    real_socket = socket.socket
    for start in range(0, count, 99):
        source = f"127.0.0.{2 + start // 495}"

        def bound(*args, _source=source, **kwargs):  # type: ignore[no-untyped-def]
            sock = real_socket(*args, **kwargs)
            sock.bind((_source, 0))
            return sock

        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", bound)
            maker = srv.registered(unique_nick("m"))
        chunk = names[start:start + 99]
        maker.send_raw(b"".join(encode({"type": "join", "room": n, "ref": i}) for i, n in enumerate(chunk)))
        maker.wait_for("history", ref=len(chunk) - 1, timeout=20.0)
    return names


def test_a_long_rooms_answer_ends_with_more_false_for_a_fast_reader(start_server, monkeypatch) -> None:
    """--max-outbuf 262144 and about 6,000 rooms: the answer holds every room once, and its
    last event says `more: false`, within 20 s; the connection stays open."""
    srv = start_server("--max-outbuf", "262144", "--rate", "0", "--max-per-ip", "0",
                       "--register-rate", "0", "--history-on-join", "0")
    names = _make_rooms(srv, 6000, monkeypatch)
    asker = srv.registered(unique_nick("a"))
    asker.send(type="rooms", ref="all")
    seen: List[str] = []
    events = 0
    deadline = time.monotonic() + 20.0
    while True:
        ev = asker.expect("rooms", ref="all", timeout=max(0.1, deadline - time.monotonic()))
        events += 1
        seen.extend(r["name"] for r in ev["rooms"])
        if ev["more"] is False:
            break
    assert events > 1
    assert set(names) <= set(seen), f"{len(set(names) - set(seen))} rooms never listed"
    assert len(seen) == len(set(seen)), "a room was listed twice"
    asker.send(type="ping", token="still", ref=1)
    asker.expect("pong", token="still", ref=1)
