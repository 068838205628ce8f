"""Metrics and health (issue 18, item 2): `--metrics-port`, scraped as Prometheus does.

A real server with every door; clients of each door do a little; the exposition then says so,
in a text that `promtool check metrics` (Debian package prometheus) accepts. /healthz is 200
while the server serves and 503 while it stops.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, Tuple

import pytest

from conftest import unique_nick, unique_room
from ircwire import IrcClient, irc_port
from test_web_door import WsClient, web_port
from wire import encode

METRICS = r"metrics at http://127\.0\.0\.1:(\d+)/metrics \(and /healthz\)"
PROMTOOL = shutil.which("promtool")


def http_get(port: int, path: str, method: str = "GET", timeout: float = 5.0) -> Tuple[int, Dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def value(text: str, series: str) -> float:
    """The value of one series (name with labels, exactly as exposed)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the exposition:\n{text}")


def test_the_exposition_says_what_the_server_did_and_promtool_accepts_it(start_server, tmp_path) -> None:
    srv = start_server("--metrics-port", "0", "--web-port", "0", "--irc-port", "0",
                       "--max-per-ip", "4", "--register-rate", "0", "--db", str(tmp_path / "h.db"))
    port = int(srv.wait_log(METRICS).group(1))
    room = unique_room("m")
    a = srv.registered(unique_nick("ma"))
    a.join(room)
    b = srv.registered(unique_nick("mb"))
    b.join(room)
    a.wait_for("join", room=room, nick=b.nick)
    for i in range(3):
        a.send(type="say", room=room, text=f"hello {i}")
        b.expect("message", room=room, text=f"hello {i}")
    a.send(type="msg", to=b.nick, text="psst")
    b.expect("message", text="psst")
    irc = IrcClient(irc_port(srv))
    web = WsClient(web_port(srv))
    try:
        irc.register(unique_nick("mi"))
        web.register(unique_nick("mw"))
        refused = srv.client()  # the fifth from 127.0.0.1: over --max-per-ip 4
        refused.expect_error("too_many_connections")
        refused.assert_closed()
        status, headers, body = http_get(port, "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=")
        text = body.decode()
        assert value(text, 'selchat_connections{door="native"}') == 2
        assert value(text, 'selchat_connections{door="irc"}') == 1
        assert value(text, 'selchat_connections{door="web"}') == 1
        assert value(text, 'selchat_registered_connections{door="native"}') == 2
        assert value(text, "selchat_users") == 4
        assert value(text, "selchat_rooms") >= 2  # #lobby and ours
        assert value(text, 'selchat_requests_total{type="say"}') == 3
        assert value(text, 'selchat_requests_total{type="join"}') == 2
        assert value(text, 'selchat_messages_total{kind="room"}') == 3
        assert value(text, 'selchat_messages_total{kind="private"}') == 1
        # Each of the three said reached both members; the private one its two ends (the
        # sender's own copy too); and joins, names, ... more.
        assert value(text, "selchat_deliveries_total") >= 3 * 2 + 2
        assert value(text, "selchat_sent_bytes_total") > 1000
        assert value(text, 'selchat_flood_refusals_total{kind="too_many_connections"}') == 1
        assert value(text, "selchat_registrations_total") == 4
        assert value(text, "selchat_history_messages_stored_total") == 3  # (a guest's private one is not kept)
        assert value(text, "selchat_history_write_seconds_count") >= 1
        assert value(text, "selchat_loop_pass_seconds_count") > 10
        assert value(text, 'selchat_loop_pass_seconds_bucket{le="+Inf"}') == value(
            text, "selchat_loop_pass_seconds_count")
        assert value(text, "process_resident_memory_bytes") > 0
        if PROMTOOL is None:
            pytest.skip("promtool is not installed (Debian package prometheus)")
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, (check.stdout + check.stderr).decode()
        assert not check.stdout.strip() and not check.stderr.strip(), (check.stdout + check.stderr).decode()
    finally:
        irc.close()
        web.close()


def test_flood_refusals_are_counted_by_kind(start_server) -> None:
    srv = start_server("--metrics-port", "0", "--rate", "1", "--burst", "2", "--max-per-ip", "0")
    port = int(srv.wait_log(METRICS).group(1))
    c = srv.registered(unique_nick("fl"))
    c.send_raw(b"".join(encode({"type": "ping", "token": i, "ref": i}) for i in range(5)))
    c.expect("pong", ref=0)
    c.expect("pong", ref=1)
    for ref in (2, 3, 4):
        c.expect_error("rate_limited", ref=ref)
    c.assert_closed(5.0)  # the third in a row: disconnected for flooding
    text = http_get(port, "/metrics")[2].decode()
    assert value(text, 'selchat_flood_refusals_total{kind="rate_limited"}') == 2
    assert value(text, 'selchat_flood_refusals_total{kind="excess_flood"}') == 1
    assert value(text, 'selchat_disconnects_total{reason="excess_flood"}') == 1


def test_healthz_and_what_else_the_port_answers(start_server) -> None:
    srv = start_server("--metrics-port", "0", "--shutdown-grace", "3")
    port = int(srv.wait_log(METRICS).group(1))
    assert http_get(port, "/healthz")[0::2] == (200, b"ok\n")
    assert http_get(port, "/nothing")[0] == 404
    assert http_get(port, "/metrics", method="POST")[0] == 405
    status, headers, body = http_get(port, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 100
    # Keep-alive: two scrapes on one connection.
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"ok\n"):
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
    # While it stops (a client that reads nothing keeps it in its grace period): 503.
    stuck = socket.create_connection(("127.0.0.1", srv.port), timeout=5.0)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    srv.client().register(unique_nick("h"))
    srv.signal(signal.SIGTERM)
    srv.wait_log("shutting down")
    deadline = time.monotonic() + 2.0
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status, _, body = http_get(port, "/healthz")
    assert (status, body) == (503, b"stopping\n")
    stuck.close()
    assert srv.wait_exit(10.0) == 0
