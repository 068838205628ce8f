"""Looked after like a service (issue 18, items 4 and 5; issue 20's server rough edges).

* SIGHUP reads the configuration again: a renewed certificate is served to new connections
  while those connected keep theirs; the config file, the password file and the MOTD apply
  live; a bad file keeps the configuration in force with one error line; parts of the server
  may register their own reload (`server.reload_hooks`).
* `READY=1`, `RELOADING=1`, `STOPPING=1` reach `$NOTIFY_SOCKET` (a socket the test binds).
* `--backup FILE` copies the history while a server writes to it.
* The server's own words: one readable line at the stop, the busy port named (and nothing
  made) on a failed start, the web client as a URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from conftest import ROOT, make_certificate, server_env, unique_nick
from wire import HEADER, encode

LISTENING = r"listening on 127\.0\.0\.1:(\d+)"


# --- SIGHUP ---------------------------------------------------------------------------------


def _tls_connect(port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5.0),
                               server_hostname="localhost")


def _fingerprint(sock: ssl.SSLSocket) -> str:
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def _pem_fingerprint(path: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(path.read_text())
    return hashlib.sha256(der).hexdigest()


def _frames(sock: ssl.SSLSocket, want: str, timeout: float = 5.0) -> dict:
    """Read frames until one of type `want` (the others are skipped)."""
    import json

    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buf) >= HEADER.size and len(buf) >= HEADER.size + HEADER.unpack_from(buf)[0]:
            (length,) = HEADER.unpack_from(buf)
            obj = json.loads(buf[HEADER.size:HEADER.size + length])
            buf = buf[HEADER.size + length:]
            if obj["type"] == want:
                return obj
        chunk = sock.recv(65536)
        assert chunk, "closed"
        buf += chunk
    raise AssertionError(f"no {want}")


def test_a_renewed_certificate_is_served_to_new_connections_and_the_old_ones_stay(start_server, tmp_path) -> None:
    first, second = make_certificate(tmp_path, "first"), make_certificate(tmp_path, "second")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(first["cert"], cert)
    shutil.copy(first["key"], key)
    srv = start_server("--tls-cert", str(cert), "--tls-key", str(key), "--register-rate", "0")
    old = _tls_connect(srv.port)
    assert _fingerprint(old) == _pem_fingerprint(first["cert"])
    old.sendall(encode({"type": "hello", "nick": unique_nick("old")}))
    _frames(old, "welcome")
    # Renewed in place, as certbot or an ACME client does; then the reload.
    shutil.copy(second["cert"], cert)
    shutil.copy(second["key"], key)
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"reloaded: TLS certificate from .*cert\.pem \(serial .*\) \(for new connections\)")
    new = _tls_connect(srv.port)
    assert _fingerprint(new) == _pem_fingerprint(second["cert"])
    new.sendall(encode({"type": "hello", "nick": unique_nick("new")}))
    _frames(new, "welcome")
    # The connection made before the renewal goes on, on its own session.
    old.sendall(encode({"type": "ping", "token": "still", "ref": 1}))
    assert _frames(old, "pong")["token"] == "still"
    # A key that does not go with its certificate: refused, the renewed pair stays in force.
    shutil.copy(first["key"], key)
    srv.signal(signal.SIGHUP)
    srv.wait_log(r"reload failed, the configuration in force is kept: cannot load TLS certificate")
    again = _tls_connect(srv.port)
    assert _fingerprint(again) == _pem_fingerprint(second["cert"])
    for s in (old, new, again):
        s.close()


def test_sighup_applies_the_config_file_and_a_bad_one_keeps_the_old(start_server, tmp_path) -> None:
    config = tmp_path / "selchat.toml"
    password = tmp_path / "password"
    password.write_text("first secret\n")
    config.write_text(f'motd = "one"\npassword-file = "{password}"\nregister-rate = 0\n')
    srv = start_server("--config", str(config))
    c = srv.client()
    c.send(type="hello", nick=unique_nick("a"), password="first secret")
    assert c.expect("welcome")["motd"] == "one"
    config.write_text(f'motd = "two"\npassword-file = "{password}"\nregister-rate = 0\n'
                      'max-per-ip = 2\nmax-frame = 100000\n')
    password.write_text("second secret\n")
    srv.signal(signal.SIGHUP)
    line = srv.wait_log(r"reloaded: .*").group(0)
    assert "motd changed" in line and "max-per-ip 16 -> 2" in line and "server password changed" in line
    assert "at the next start: max-frame 65536 -> 100000" in line
    d = srv.client()
    d.send(type="hello", nick=unique_nick("b"), password="second secret")
    assert d.expect("welcome")["motd"] == "two"
    refused = srv.client()  # the third from 127.0.0.1: --max-per-ip 2 applies at once
    refused.expect_error("too_many_connections")
    # A broken file: one error line, and the configuration in force stays.
    config.write_text('motd = "three"\nmax-per-ip = "many"\n')
    srv.signal(signal.SIGHUP)
    srv.wait_log(rf"ERROR selchat\.server: reload failed, the configuration in force is kept: "
                 rf"{config}: max-per-ip: 'many' is not a whole number")
    c.quit_and_close()
    e = srv.client()
    e.send(type="hello", nick=unique_nick("c"), password="second secret")
    assert e.expect("welcome")["motd"] == "two"
    errors = [line for line in srv.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors


def test_reload_hooks_are_read_first_and_applied_only_when_everything_is_good() -> None:
    from selchat.config import parse_args
    from selchat.server import Server, open_store

    store = open_store(":memory:")
    server = Server(parse_args(["--port", "0"]), store)
    applied: List[str] = []

    def good(config):  # type: ignore[no-untyped-def]
        return lambda: applied.append("operators") or "operators: 2 accounts"

    def bad(config):  # type: ignore[no-untyped-def]
        raise ValueError("--operators ops.txt: line 3: not an account name")

    server.reload_hooks.append(good)
    assert server.reload() and applied == ["operators"]
    server.reload_hooks.append(bad)
    assert not server.reload() and applied == ["operators"]  # nothing applied this time
    store.close()


# --- systemd --------------------------------------------------------------------------------


def test_ready_reloading_and_stopping_reach_the_notify_socket(start_server, tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        srv = start_server()
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1\n") and f"STATUS=listening on 127.0.0.1:{srv.port}" in ready
        srv.signal(signal.SIGHUP)
        reloading = listener.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].split("=")[1]) > 0
        assert listener.recv(4096).decode().startswith("READY=1")
        srv.signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert srv.wait_exit(10.0) == 0
    finally:
        listener.close()


def test_an_abstract_notify_socket_and_none_at_all(monkeypatch) -> None:
    from selchat.ops import notify

    name = f"selchat-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5.0)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.stopping()
        assert listener.recv(100) == b"STOPPING=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not notify.ready()
        monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
        assert not notify.ready()  # (logged at debug; never raises)
    finally:
        listener.close()


# --- backups --------------------------------------------------------------------------------


def test_a_backup_while_the_server_writes(start_server, tmp_path) -> None:
    db = tmp_path / "history.db"
    srv = start_server("--db", str(db), "--rate", "0")
    writer = srv.registered(unique_nick("w"))
    writer.join("#backup")
    backups = []
    for round_ in range(3):
        # A burst of messages still being stored while the backup copies the file.
        writer.send_raw(b"".join(encode({"type": "say", "room": "#backup", "text": f"{round_}:{i}"})
                                 for i in range(300)))
        target = tmp_path / f"copy{round_}.db"
        done = subprocess.run([sys.executable, "-m", "selchat.server", "--db", str(db), "--backup", str(target)],
                              cwd=str(ROOT), env=server_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"backed up {db} to {target} (")
        backups.append(target)
        for _ in range(300):
            writer.expect("message", room="#backup", timeout=10.0)
    counts = []
    for target in backups:
        conn = sqlite3.connect(target)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts.append(conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        conn.close()
    assert counts == sorted(counts) and counts[-1] >= 600  # each a whole, later one
    writer.send(type="ping", token="alive", ref=1)
    writer.expect("pong", token="alive", ref=1)


def test_a_backup_of_nothing_says_why(tmp_path) -> None:
    for args, words in ((["--db", ":memory:"], "keeps nothing to back up"),
                        (["--db", str(tmp_path / "none.db")], "no database at")):
        done = subprocess.run([sys.executable, "-m", "selchat.server", *args, "--backup", str(tmp_path / "b.db")],
                              cwd=str(ROOT), env=server_env(), capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and words in done.stderr, done.stderr
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "b.db").exists()


# --- the server's own words (issue 20) ------------------------------------------------------


def test_the_stop_says_one_readable_line_and_the_web_client_is_a_url(start_server, tmp_path) -> None:
    srv = start_server("--db", str(tmp_path / "h.db"), "--web-port", "0")
    port = int(srv.wait_log(r"web listening on 127\.0\.0\.1:(\d+)").group(1))
    srv.wait_log(rf"web client at http://127\.0\.0\.1:{port}/$")
    c = srv.registered(unique_nick("s"))
    c.send(type="say", room="#lobby", text="one")
    c.expect("message", text="one")
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit(10.0) == 0
    line = srv.wait_log(r"history store closed: .*").group(0)
    assert "{" not in line and "1 message written in 1 commit" in line, line


def test_a_busy_port_is_named_and_nothing_is_made(start_server, tmp_path) -> None:
    srv = start_server("--db", str(tmp_path / "first.db"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "selchat.server", "--port", str(srv.port)],
                          cwd=str(elsewhere), env=server_env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{srv.port}: Address already in use" in done.stderr, done.stderr
    assert list(elsewhere.iterdir()) == []  # no selchat.db made on a failed start
