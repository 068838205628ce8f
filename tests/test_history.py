"""docs/protocol.md, "History", over real sockets: history on join, paging, privacy, restarts, kill -9."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import List

import pytest

from conftest import ServerProcess, server_command, server_env, unique_nick, unique_room
from wire import Client


def say_all(c: Client, room: str, texts: List[str]) -> List[int]:
    """Say each text and return the ids of the echoes."""
    ids = []
    for i, text in enumerate(texts):
        c.send(type="say", room=room, text=text, ref=i)
    for i, text in enumerate(texts):
        echo = c.expect("message", room=room, text=text, ref=i)
        ids.append(echo["id"])
    return ids


def join_history(c: Client, room: str) -> dict:
    c.send(type="join", room=room)
    c.expect("join", nick=c.nick)
    c.expect_names(room)
    return c.expect("history", room=room)


def test_a_late_joiner_gets_the_last_messages_oldest_first(start_server) -> None:
    srv = start_server("--history-on-join", "3", "--rate", "0")
    room = unique_room()
    early = srv.registered(unique_nick("e"))
    early.join(room)
    ids = say_all(early, room, [f"m{i}" for i in range(5)])
    late = srv.registered(unique_nick("l"))
    history = join_history(late, room)
    assert [m["text"] for m in history["messages"]] == ["m2", "m3", "m4"]
    assert [m["id"] for m in history["messages"]] == ids[2:]
    assert history["more"] is True
    for m in history["messages"]:
        assert m["type"] == "message" and m["from"] == early.nick and m["room"] == room
        assert isinstance(m["ts"], int)
    late.assert_quiet()  # nothing said before the join comes live as well


def test_lobby_history_follows_welcome(start_server) -> None:
    srv = start_server("--rate", "0")
    first = srv.registered(unique_nick("a"))
    say_all(first, "#lobby", ["hello lobby"])
    second = srv.client()
    second.send(type="hello", nick=unique_nick("b"))
    second.expect("welcome")
    second.expect("join")
    second.expect_names("#lobby")
    history = second.expect("history", room="#lobby")
    assert [m["text"] for m in history["messages"]] == ["hello lobby"] and history["more"] is False


def test_paging_backwards(start_server) -> None:
    srv = start_server("--history-on-join", "0", "--rate", "0")
    room = unique_room()
    c = srv.registered(unique_nick("p"))
    c.join(room)
    ids = say_all(c, room, [f"t{i}" for i in range(12)])
    c.send(type="history", room=room, limit=5, ref="a")
    page = c.expect("history", room=room, ref="a")
    assert [m["id"] for m in page["messages"]] == ids[7:] and page["more"] is True
    c.send(type="history", room=room, before=page["messages"][0]["id"], limit=5)
    page = c.expect("history", room=room)
    assert [m["id"] for m in page["messages"]] == ids[2:7] and page["more"] is True
    c.send(type="history", room=room.upper(), before=page["messages"][0]["id"], limit=5)
    page = c.expect("history", room=room)
    assert [m["id"] for m in page["messages"]] == ids[:2] and page["more"] is False
    c.send(type="history", room=room, before=ids[0])
    assert c.expect("history")["messages"] == []
    c.send(type="history", room=room)  # default limit 50: everything
    assert [m["id"] for m in c.expect("history")["messages"]] == ids


@pytest.mark.parametrize("bad", [{"limit": 0}, {"limit": 201}, {"limit": "5"}, {"before": 1.5}, {"room": 5}])
def test_history_request_members_are_checked(start_server, bad: dict) -> None:
    srv = start_server()
    c = srv.registered(unique_nick("h"))
    request = {"type": "history", "room": "#lobby", "ref": 1, **bad}
    c.send(request)
    c.expect_error("bad_request", ref=1)


def test_history_of_a_room_one_is_not_in(start_server) -> None:
    srv = start_server()
    c = srv.registered(unique_nick("h"))
    c.send(type="history", room=unique_room(), ref=2)
    c.expect_error("not_in_room", ref=2)


def test_private_messages_are_never_history(start_server) -> None:
    srv = start_server("--rate", "0")
    a = srv.registered(unique_nick("a"))
    b = srv.registered(unique_nick("b"))
    a.expect("join", nick=b.nick)
    a.send(type="msg", to=b.nick, text="a secret")
    a.expect("message", to=b.nick)
    b.expect("message", text="a secret")
    for c in (a, b):
        c.send(type="history", room="#lobby")
        assert c.expect("history")["messages"] == []
    b.send(type="quit")
    b.assert_closed()
    c = srv.registered(b.nick)  # whoever takes the nick next
    c.send(type="history", room="#lobby", limit=200)
    assert c.expect("history")["messages"] == []


def restart_and_read(db: Path, start_server, *, kill: bool) -> None:
    """Say messages, stop the server (SIGTERM or SIGKILL), start it on the same file, read them back."""
    srv = start_server("--db", str(db), "--rate", "0")
    room = unique_room()
    c = srv.registered(unique_nick("r"))
    c.join(room)
    ids = say_all(c, room, [f"before {i}" for i in range(20)])
    c.send(type="msg", to=c.nick, text="private, newest id")
    private_id = c.expect("message", to=c.nick)["id"]
    if kill:
        srv.signal(signal.SIGKILL)
        srv.wait_exit(5)
    else:
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(10) == 0
    again = start_server("--db", str(db), "--rate", "0")
    d = again.registered(unique_nick("r"))
    history = join_history(d, room)
    assert [m["id"] for m in history["messages"]] == ids
    assert [m["text"] for m in history["messages"]] == [f"before {i}" for i in range(20)]
    later = say_all(d, room, ["after"])[0]
    assert later > private_id > ids[-1]  # ids keep increasing across the restart


def test_history_and_ids_survive_a_restart(start_server, tmp_path: Path) -> None:
    restart_and_read(tmp_path / "chat.db", start_server, kill=False)


def test_what_clients_saw_survives_sigkill(start_server, tmp_path: Path) -> None:
    restart_and_read(tmp_path / "chat.db", start_server, kill=True)


def test_a_join_in_the_middle_of_a_burst_has_no_gap_and_no_duplicate(start_server) -> None:
    srv = start_server("--history-on-join", "1000", "--rate", "0")
    room = unique_room()
    sender = srv.registered(unique_nick("s"))
    sender.join(room)
    total = 600
    burst = b"".join(
        (lambda p: len(p).to_bytes(4, "big") + p)(f'{{"type":"say","room":"{room}","text":"b{i}"}}'.encode())
        for i in range(total)
    )
    joiner = srv.registered(unique_nick("j"))
    sender.send_raw(burst[: len(burst) // 3])
    joiner.send(type="join", room=room)  # lands while the burst is being served
    sender.send_raw(burst[len(burst) // 3 :])
    joiner.expect("join", nick=joiner.nick)
    joiner.expect_names(room)
    history = joiner.expect("history", room=room)
    seen = [m["text"] for m in history["messages"]]
    history_ids = [m["id"] for m in history["messages"]]
    live_ids: List[int] = []
    while len(seen) < total:
        event = joiner.expect("message", room=room)
        seen.append(event["text"])
        live_ids.append(event["id"])
    assert seen == [f"b{i}" for i in range(total)]  # every message once, in order
    if history_ids and live_ids:
        assert max(history_ids) < min(live_ids)
    joiner.assert_quiet()


def test_an_unusable_database_stops_the_server_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such" / "dir" / "chat.db"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    for path in (bad, garbage, tmp_path):
        result = subprocess.run(server_command("--db", str(path)), env=server_env(),
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.stderr
