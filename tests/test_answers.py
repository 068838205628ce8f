"""Answers stay cheap and never drop a client that reads (found by an outside review).

* One `rooms` answer to a client with a small `--max-outbuf` once took more than that buffer
  holds, so the server dropped as a slow consumer a client that had not had a chance to read
  a byte. Now an answer stops at what the buffer can hold and says where to go on from.
* `history` over long messages read and encoded every row asked for (3 MB for a 64 KiB
  frame); reading now stops at what the answer can carry, and the page says `more`.
"""

from __future__ import annotations

from typing import List

from conftest import unique_nick
from wire import encode


def _fill_rooms(srv, count: int, width: int = 48) -> List[str]:
    """`count` rooms with long names, made by as few users as the per-user cap allows."""
    names = [f"#{i:05d}" + "r" * (width - 5) for i in range(count)]
    for start in range(0, count, 99):  # each maker is in #lobby too: 99 more rooms
        maker = srv.registered(unique_nick("m"))
        chunk = names[start:start + 99]
        maker.send_raw(b"".join(encode({"type": "join", "room": n, "ref": i}) for i, n in enumerate(chunk)))
        maker.wait_for("history", ref=len(chunk) - 1, timeout=10.0)
    return names


def test_a_rooms_answer_never_drops_a_reading_client_and_pages_the_rest(start_server) -> None:
    srv = start_server("--max-outbuf", "16384", "--rate", "0", "--max-per-ip", "0")
    names = _fill_rooms(srv, 300)  # ~20 KiB of rooms: more than the client's whole buffer
    asker = srv.registered(unique_nick("a"))
    seen: List[str] = []
    offset = 0
    for _ in range(20):
        asker.send(type="rooms", offset=offset, ref="page")
        while True:
            ev = asker.expect("rooms", ref="page", timeout=5.0)
            seen.extend(r["name"] for r in ev["rooms"])
            if not ev["more"] or "next" in ev:
                break
        if not ev["more"]:
            break
        offset = ev["next"]
    assert set(names) <= set(seen), "some rooms were never listed"
    assert len(seen) == len(set(seen)), "a room was listed twice"
    asker.assert_quiet()  # still connected: not dropped as a slow consumer


def test_a_history_page_of_long_messages_stops_at_one_frame(start_server) -> None:
    srv = start_server("--rate", "0", "--max-per-ip", "0", "--max-text", "16000",
                       "--max-frame", "100000", "--history-on-join", "0")
    writer = srv.registered(unique_nick("w"))
    writer.join("#long")
    for i in range(40):
        writer.send(type="say", room="#long", text=f"{i} " + "x" * 15990)
        writer.expect("message", room="#long")
    reader = srv.registered(unique_nick("r"))
    reader.join("#long")
    reader.send(type="history", room="#long", limit=200, ref=1)
    page = reader.expect("history", ref=1)
    assert page["more"] is True
    texts = [m["text"].split()[0] for m in page["messages"]]
    assert texts == [str(i) for i in range(40 - len(texts), 40)], "not the newest, in order"
    assert 1 <= len(texts) <= 6  # what 100,000 bytes hold
    reader.send(type="history", room="#long", before=page["messages"][0]["id"], limit=200, ref=2)
    older = reader.expect("history", ref=2)
    assert older["messages"][-1]["id"] < page["messages"][0]["id"]
