"""Regression tests for the outside security review's findings, against the real server process.

Each test names its finding and fails on the server as it was before the fix.
"""

from __future__ import annotations

import select
import signal
import sys
import time
from typing import Any, Dict, List

import pytest

from conftest import ServerProcess, unique_room
from wire import Client, encode


def paced_pings(client: Client, rate: float, seconds: float, tag: str) -> int:
    """Send `rate` pings a second for `seconds`; how many. Each waits 1/rate after the one
    before: a test process held up by a loaded machine sends late, never a catch-up burst
    (which would be a real burst, and rightly refused)."""
    start = time.monotonic()
    sent = 0
    due = start
    while True:
        now = time.monotonic()
        if due > now:
            select.select([], [], [], due - now)  # pacing, not waiting for a condition
            now = time.monotonic()
        if now - start >= seconds:
            return sent
        client.send(type="ping", token=f"{tag}{sent}")
        sent += 1
        due = now + 1 / rate


def errors_in(events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [e for e in events if e.get("type") == "error"]


# --- finding 3: a stall must not turn clients within their rate into flooders -------------------

def test_a_stalled_server_does_not_refuse_a_client_within_its_rate(start_server) -> None:
    srv: ServerProcess = start_server()  # flood control on: 10 a second, burst 20
    client = srv.registered()
    sent = paced_pings(client, 8.0, 1.0, "before")
    srv.proc.send_signal(signal.SIGSTOP)  # a busy machine, a paused process, a slow pass
    try:
        sent += paced_pings(client, 8.0, 4.0, "during")
    finally:
        srv.proc.send_signal(signal.SIGCONT)
    sent += paced_pings(client, 8.0, 1.0, "after")
    got = client.barrier(timeout=10.0)
    assert errors_in(got) == [], f"refused although within its rate: {errors_in(got)[:3]!r}"
    assert sum(e.get("type") == "pong" for e in got) == sent


def test_a_real_burst_is_still_refused(start_server) -> None:
    # A slow rate, so that the time between the client's registration and its burst (which
    # the server may count as time the burst's bytes could have been arriving in) cannot add
    # a token, however loaded the machine running the test is.
    srv: ServerProcess = start_server("--rate", "0.5", "--burst", "5")
    client = srv.registered()
    client.send_raw(b"".join(_ping_frame(n) for n in range(5 + 4)))
    got = [client.recv_event() for _ in range(9)]
    assert [e["type"] for e in got] == ["pong"] * 5 + ["error"] * 4
    assert [e["code"] for e in errors_in(got)] == ["rate_limited"] * 4


def _ping_frame(n: int) -> bytes:
    return encode({"type": "ping", "token": n})


# --- finding 6: history with a `before` beyond 64 bits ----------------------------------------------

@pytest.mark.parametrize("before", [-2 ** 70, 2 ** 70, -2 ** 63 - 1, 2 ** 63])
def test_history_with_a_huge_before_is_answered_or_refused_and_the_connection_stays(
        start_server, before: int) -> None:
    srv: ServerProcess = start_server("--rate", "0")
    witness = srv.registered()
    client = srv.registered()
    client.send(type="history", room="#lobby", before=before, ref=7)
    answer = client.collect_until(lambda e: e.get("ref") == 7 and e.get("type") in ("history", "error"))[-1]
    if answer["type"] == "error":
        assert answer["code"] == "bad_request", answer
    else:
        assert answer["room"] == "#lobby" and isinstance(answer["messages"], list)
    assert errors_in(client.barrier()) == []  # still connected, still served
    seen = witness.barrier()
    assert [e for e in seen if e.get("type") == "quit"] == []


# --- finding 7: a deeply nested ping token ------------------------------------------------------------

@pytest.mark.parametrize("depth", [985, 5000])
def test_a_deeply_nested_ping_token_is_answered_or_refused_and_the_connection_stays(
        start_server, depth: int) -> None:
    srv: ServerProcess = start_server("--rate", "0")
    witness = srv.registered()
    client = srv.registered()
    token = "[" * depth + "]" * depth
    client.send_payload(('{"type":"ping","ref":9,"token":' + token + "}").encode())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 3 * depth))  # for our own decoding of a pong that deep
    try:
        answer = client.collect_until(lambda e: e.get("type") in ("pong", "error"), timeout=5.0)[-1]
    finally:
        sys.setrecursionlimit(limit)
    if answer["type"] == "error":
        assert answer["code"] in ("bad_request", "bad_json"), answer
    else:
        depth_seen, value = 0, answer.get("token")
        while isinstance(value, list) and value:
            depth_seen, value = depth_seen + 1, value[0]
        assert depth_seen + 1 == depth and value == [], "the pong's token is not the ping's"
    client.send(type="ping", token="after", ref=10)
    client.expect("pong", token="after", ref=10)
    assert [e for e in witness.barrier() if e.get("type") == "quit"] == []


# --- finding 9: the room table is not a shared pool -----------------------------------------------------

def test_one_address_cannot_hold_more_than_its_share_of_rooms(start_server) -> None:
    srv: ServerProcess = start_server("--rate", "0")
    refused = 0
    for _ in range(6):  # 6 x 100 rooms from 127.0.0.1; its share is 500 of the 10,000
        client = srv.registered()
        for r in range(100):
            client.send(type="join", room=unique_room("hoard"), ref=r)
        got = client.barrier(timeout=20.0)
        refused += sum(e.get("code") == "too_many_rooms" for e in got)
    assert refused == 100


# --- finding 10: log flooding -----------------------------------------------------------------------------

def test_refused_connections_do_not_flood_the_log(start_server) -> None:
    srv: ServerProcess = start_server("--max-per-ip", "1")
    keeper = srv.registered()
    for _ in range(300):
        c = Client(srv.port)
        c.expect_error("too_many_connections")
        c.assert_closed()
    keeper.barrier()
    refusals = [line for line in srv.log().splitlines() if "refusing" in line]
    assert 1 <= len(refusals) <= 2, f"{len(refusals)} log lines for 300 refusals"


# --- finding 11: invisible and bidi text ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["\u200b", "\u2060\u2060", "\ufeff \u200b\n", "\u2800", "\u3164"])
def test_text_of_invisible_characters_is_bad_text(start_server, text: str) -> None:
    srv: ServerProcess = start_server("--rate", "0")
    client = srv.registered()
    witness = srv.registered()
    client.expect("join", nick=witness.nick)
    client.send(type="say", room="#lobby", text=text, ref=1)
    error = client.expect_error("bad_text", ref=1)
    assert "invisible" in error["message"]
    assert witness.barrier() == []


@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069"])
def test_bidi_controls_in_text_are_bad_text(start_server, char: str) -> None:
    srv: ServerProcess = start_server("--rate", "0")
    client = srv.registered()
    other = srv.registered()
    client.expect("join", nick=other.nick)
    client.send(type="msg", to=other.nick, text=f"invoice{char}fdp.exe", ref=2)
    client.expect_error("bad_text", ref=2)
    client.send(type="say", room="#lobby", text=f"\u05e9\u05dc\u05d5\u05dd \u200fok", ref=3)
    client.expect("message", ref=3)
