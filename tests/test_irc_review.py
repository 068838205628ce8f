"""IRC door defects found by review, each held by a test over real sockets.

* A digit that is not ASCII ('²' passes str.isdigit, not int()) in a line served from a timer
  (after fake lag) raised out of the loop and killed the server.
* Fake lag served one line for free at every resume: a flooder got about twice the rate.
* A TLS connection that never finished its handshake on the IRC port was never closed.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

from conftest import make_certificate
from ircwire import irc_port


def _drain(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends within `seconds` (a fixed window: the test counts)."""
    data = b""
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return data
        ready, _, _ = select.select([sock], [], [], left)
        if ready:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_a_non_ascii_digit_served_after_fake_lag_harms_nobody(start_server) -> None:
    srv = start_server("--irc-port", "0", "--rate", "10", "--burst", "20")
    port = irc_port(srv)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"PING x\r\n" * 22 + "CAP LS \u00b2\r\nCHATHISTORY LATEST #a msgid=\u00b2 \u00b2\r\n".encode())
    got = _drain(s, 3.0)
    assert b" CAP * LS :" in got  # answered, after the lag
    assert srv.alive()
    other = socket.create_connection(("127.0.0.1", port))
    other.sendall(b"PING alive\r\n")
    assert b"PONG" in _drain(other, 1.0)


def test_fake_lag_admits_the_rate_and_no_more(start_server) -> None:
    srv = start_server("--irc-port", "0", "--rate", "10", "--burst", "20")
    s = socket.create_connection(("127.0.0.1", irc_port(srv)))
    s.sendall(b"PING x\r\n" * 200)
    window = 2.0
    pongs = _drain(s, window).count(b" PONG ")
    assert pongs >= 20, "the burst itself was not served"
    assert pongs <= 20 + 10 * window + 3, f"{pongs} lines served in {window}s at rate 10, burst 20"


def test_a_stalled_tls_handshake_on_the_irc_port_is_closed(start_server, tmp_path: Path) -> None:
    files = make_certificate(tmp_path)
    srv = start_server("--irc-port", "0", "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                       "--handshake-timeout", "0.5")
    s = socket.create_connection(("127.0.0.1", irc_port(srv)))  # and never says a word
    s.settimeout(5.0)
    assert s.recv(100) == b""  # closed by the server at the handshake timeout
