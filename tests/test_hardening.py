"""docs/protocol.md, "Access and abuse limits", over real sockets: TLS, the server password,
flood control, connection limits."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from conftest import ServerProcess, server_command, server_env, unique_nick
from wire import Client

ROOT = Path(__file__).resolve().parent.parent


# --- TLS --------------------------------------------------------------------------------------


class TLSClient(Client):
    """The test client over TLS, verifying the server against the test certificate."""

    def __init__(self, port: int, cafile: Path, **kwargs: Any) -> None:
        super().__init__(port, **kwargs)
        context = ssl.create_default_context(cafile=str(cafile))
        self.sock.setblocking(True)
        self.sock.settimeout(5.0)
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.sock.setblocking(False)

    def _fill(self, timeout: float) -> bool:
        # Decrypted bytes TLS already holds do not make the socket readable: take them first.
        if not self.closed and self.sock.pending():
            timeout = 0
        try:
            return super()._fill(timeout) or bool(self.pending)
        except ssl.SSLWantReadError:
            return True


def test_tls_chat_end_to_end(start_server, certificate) -> None:
    srv = start_server("--tls-cert", str(certificate["cert"]), "--tls-key", str(certificate["key"]),
                       "--rate", "0")
    alice = TLSClient(srv.port, certificate["cert"])
    bob = TLSClient(srv.port, certificate["cert"])
    try:
        alice.register(unique_nick("a"))
        bob.register(unique_nick("b"))
        alice.expect("join", nick=bob.nick)
        big = "x" * 4000  # several TLS records' worth when many are queued at once
        for i in range(30):
            bob.send(type="say", room="#lobby", text=f"{i} {big}")
        for i in range(30):
            assert alice.expect("message", **{"from": bob.nick})["text"].startswith(f"{i} ")
    finally:
        alice.close()
        bob.close()


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    """True once the peer closes (EOF or reset) within `timeout`; whatever it sent is discarded."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def test_a_plain_client_on_a_tls_port_is_closed_without_hurting_others(start_server, certificate) -> None:
    srv = start_server("--tls-cert", str(certificate["cert"]), "--tls-key", str(certificate["key"]))
    plain = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    plain.sendall(b'\x00\x00\x00\x10{"type":"hello"}')  # a frame, not a TLS ClientHello
    ok = TLSClient(srv.port, certificate["cert"])
    try:
        ok.register(unique_nick("ok"))
        assert wait_closed(plain, 5.0), "the server kept a non-TLS connection open on a TLS port"
        ok.send(type="ping", token="t")
        ok.expect("pong", token="t")
    finally:
        plain.close()
        ok.close()


def test_a_stalled_handshake_blocks_no_one_and_times_out(start_server, certificate) -> None:
    srv = start_server("--tls-cert", str(certificate["cert"]), "--tls-key", str(certificate["key"]),
                       "--handshake-timeout", "1")
    stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    stalled.sendall(b"\x16\x03\x01")  # the first bytes of a TLS record, then nothing more
    started = time.monotonic()
    ok = TLSClient(srv.port, certificate["cert"])
    try:
        ok.register(unique_nick("ok"))  # served while the other handshake hangs
        assert wait_closed(stalled, 5.0), "a stalled TLS handshake was never timed out"
        assert time.monotonic() - started >= 0.5  # by the handshake timeout, not at once
    finally:
        stalled.close()
        ok.close()


def test_bad_tls_files_stop_the_server_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = subprocess.run(
        server_command("--tls-cert", str(missing), "--tls-key", str(missing)),
        env=server_env(), capture_output=True, text=True, timeout=20,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


# --- password ---------------------------------------------------------------------------------


@pytest.fixture
def protected(start_server, tmp_path: Path) -> ServerProcess:
    secret = tmp_path / "password"
    secret.write_text("correct horse\n")
    return start_server("--password-file", str(secret))


@pytest.mark.parametrize("password", [None, "wrong", "correct hors", "correct horse\n", ""])
def test_a_missing_or_wrong_password_is_refused_and_closed(protected: ServerProcess, password) -> None:
    c = protected.client()
    hello: Dict[str, Any] = {"type": "hello", "nick": unique_nick("p"), "ref": 9}
    if password is not None:
        hello["password"] = password
    c.send(hello)
    c.expect_error("bad_password", ref=9)
    c.assert_closed(5.0)


def test_the_right_password_registers(protected: ServerProcess) -> None:
    c = protected.client()
    c.send(type="hello", nick=unique_nick("p"), password="correct horse")
    c.expect("welcome")


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe\n"])
def test_an_unusable_password_file_stops_the_server(tmp_path: Path, content: bytes) -> None:
    secret = tmp_path / "password"
    secret.write_bytes(content)
    for path in (secret, tmp_path / "missing"):
        result = subprocess.run(server_command("--password-file", str(path)), env=server_env(),
                                capture_output=True, text=True, timeout=20)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and str(path) in result.stderr


def test_no_password_on_the_command_line() -> None:
    result = subprocess.run(server_command("--help"), env=server_env(), capture_output=True, text=True, timeout=20)
    assert "--password-file" in result.stdout and "--password " not in result.stdout


# --- flood control ----------------------------------------------------------------------------


def test_requests_beyond_the_burst_are_refused_then_the_flooder_is_dropped(start_server) -> None:
    srv = start_server("--rate", "1", "--burst", "5", "--max-per-ip", "0")
    witness = srv.registered(unique_nick("w"))
    flooder = srv.registered(unique_nick("f"))
    witness.expect("join", nick=flooder.nick)
    for i in range(8):  # 5 pass, 3 are refused
        flooder.send(type="ping", token=i, ref=i)
    for i in range(5):
        flooder.expect("pong", token=i, ref=i)
    for i in range(5, 8):
        flooder.expect_error("rate_limited", ref=i)
    for _ in range(50):  # a pong is not a request: never limited, never answered
        flooder.send(type="pong", token="x")
    for i in range(10):  # and the refusals in a row go past the burst
        flooder.send(type="ping", token="more")
    events = flooder.assert_closed(5.0)
    assert all(e["type"] == "error" and e["code"] == "rate_limited" for e in events), events
    assert witness.expect("quit", nick=flooder.nick)["reason"] == "excess flood"


def test_a_client_within_the_rate_is_never_limited(start_server) -> None:
    srv = start_server("--rate", "50", "--burst", "5")
    c = srv.registered(unique_nick("c"))
    for i in range(15):  # 15 requests over ~0.45 s: 5 of burst, 50/s of rate
        c.send(type="ping", token=i)
        c.expect("pong", token=i)
        time.sleep(0.03)  # pacing the client is the point of this test


def test_rate_zero_turns_flood_control_off(start_server) -> None:
    srv = start_server("--rate", "0")
    c = srv.registered(unique_nick("c"))
    assert "rate" not in c.received[0]["limits"]
    payload = b"".join(
        (lambda b: len(b).to_bytes(4, "big") + b)(f'{{"type":"ping","token":{i}}}'.encode())
        for i in range(500)
    )
    c.send_raw(payload)
    for i in range(500):
        c.expect("pong", token=i)


def test_welcome_tells_the_limits(start_server) -> None:
    srv = start_server("--rate", "3", "--burst", "7")
    c = srv.registered(unique_nick("c"))
    limits = c.received[0]["limits"]
    assert limits["rate"] == 3 and limits["burst"] == 7


# --- connection limits ------------------------------------------------------------------------


def test_too_many_connections_from_one_address(start_server) -> None:
    srv = start_server("--max-per-ip", "2")
    first = srv.client()  # unregistered connections count too
    second = srv.registered(unique_nick("b"))
    third = srv.client()
    third.expect_error("too_many_connections")
    third.assert_closed(5.0)
    first.close()
    second.barrier()  # the server has seen the close by the time it answers this
    srv.registered(unique_nick("again"))  # a slot is free again


def test_server_full(start_server) -> None:
    srv = start_server("--max-clients", "2", "--max-per-ip", "0")
    srv.registered(unique_nick("a"))
    srv.registered(unique_nick("b"))
    third = srv.client()
    third.expect_error("server_full")
    third.assert_closed(5.0)


def test_a_connection_that_never_says_hello_counts_until_its_timeout(start_server) -> None:
    srv = start_server("--max-per-ip", "1", "--handshake-timeout", "0.5")
    silent = srv.client()
    refused = srv.client()
    refused.expect_error("too_many_connections")
    silent.assert_closed(5.0)  # closed by the handshake timeout, which frees its slot
    srv.registered(unique_nick("next"))
