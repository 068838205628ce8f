"""The client's --tls, --ca, --insecure and --password-file, end to end in script mode against
real server processes. Certificates are made at test time with the openssl command."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator

import pytest

from conftest import make_certificate
from test_client_script import Server, nick, run

INSECURE_WARNING = "warning: TLS certificate NOT verified (--insecure)"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, Path]]:
    folder = tmp_path_factory.mktemp("client-tls")
    return {
        "both": make_certificate(folder, "both", "DNS:localhost,IP:127.0.0.1"),
        "dns_only": make_certificate(folder, "dns", "DNS:localhost"),
    }


@pytest.fixture(scope="module")
def tls_server(certs: Dict[str, Dict[str, Path]]) -> Iterator[Server]:
    srv = Server("--tls-cert", str(certs["both"]["cert"]), "--tls-key", str(certs["both"]["key"]))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def dns_only_server(certs: Dict[str, Dict[str, Path]]) -> Iterator[Server]:
    srv = Server("--tls-cert", str(certs["dns_only"]["cert"]), "--tls-key", str(certs["dns_only"]["key"]))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client-pw") / "server.pass"
    path.write_text("correct horse\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def protected_server(password_file: Path) -> Iterator[Server]:
    srv = Server("--password-file", str(password_file))
    try:
        yield srv
    finally:
        srv.stop()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----- TLS ----------------------------------------------------------------------------------


def test_tls_with_ca_works(tls_server: Server, certs) -> None:
    me = nick("tls")
    result = run(tls_server.port, "--ca", str(certs["both"]["cert"]), "--nick", me, lines="over tls\n")
    assert result.returncode == 0, result.stderr
    assert f"<{me}> over tls" in result.stdout
    assert result.stderr == ""


def test_ca_is_checked_against_a_host_name_too(tls_server: Server, certs) -> None:
    result = run(tls_server.port, "--host", "localhost", "--ca", str(certs["both"]["cert"]),
                 "--nick", nick("name"), lines="by name\n")
    assert result.returncode == 0, result.stderr


def test_tls_without_ca_refuses_a_self_signed_certificate(tls_server: Server) -> None:
    result = run(tls_server.port, "--tls", "--nick", nick("noca"), lines="never sent\n")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "cannot connect" in line and "certificate verify failed" in line, line
    assert result.stdout == ""


def test_a_ca_that_did_not_sign_the_certificate_is_refused(tls_server: Server, certs) -> None:
    result = run(tls_server.port, "--ca", str(certs["dns_only"]["cert"]), "--nick", nick("other"), lines="x\n")
    assert result.returncode == 1
    assert "certificate verify failed" in one_line(result.stderr)


def test_insecure_works_and_warns(tls_server: Server) -> None:
    me = nick("insec")
    result = run(tls_server.port, "--insecure", "--nick", me, lines="unverified\n")
    assert result.returncode == 0, result.stderr
    assert f"<{me}> unverified" in result.stdout
    assert INSECURE_WARNING in one_line(result.stderr)


def test_wrong_host_name_is_refused(dns_only_server: Server, certs) -> None:
    """The certificate names only localhost: 127.0.0.1 is not in it, however trusted it is."""
    ca = str(certs["dns_only"]["cert"])
    result = run(dns_only_server.port, "--host", "127.0.0.1", "--ca", ca, "--nick", nick("ip"), lines="x\n")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "certificate verify failed" in line and "mismatch" in line and "127.0.0.1" in line, line
    # The same certificate and server by the name it was made for: fine.
    ok = run(dns_only_server.port, "--host", "localhost", "--ca", ca, "--nick", nick("dns"), lines="x\n")
    assert ok.returncode == 0, ok.stderr


def test_tls_to_a_plain_server_fails_in_one_line(protected_server: Server) -> None:
    result = run(protected_server.port, "--insecure", "--nick", nick("mix"), lines="x\n")
    assert result.returncode == 1
    assert "TLS" in one_line(result.stderr)


def test_plain_to_a_tls_server_fails_in_one_line_with_a_hint(tls_server: Server) -> None:
    result = run(tls_server.port, "--nick", nick("plain"), lines="x\n")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "connection closed" in line and "--tls" in line, line


def test_unusable_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    result = run(1, "--ca", str(tmp_path / "none.pem"), "--nick", "x", lines="")
    assert result.returncode == 2
    assert "none.pem" in one_line(result.stderr)


# ----- password -----------------------------------------------------------------------------


def test_right_password_file_works(protected_server: Server, password_file: Path) -> None:
    me = nick("pw")
    result = run(protected_server.port, "--password-file", str(password_file), "--nick", me, lines="let in\n")
    assert result.returncode == 0, result.stderr
    assert f"<{me}> let in" in result.stdout


def test_wrong_password_exits_1_with_bad_password(protected_server: Server, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("incorrect horse\n")
    result = run(protected_server.port, "--password-file", str(wrong), "--nick", nick("bad"), lines="never sent\n")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "bad_password" in line and "wrong.pass" in line, line
    assert "never sent" not in result.stdout


def test_no_password_exits_1_and_says_how_to_give_one(protected_server: Server) -> None:
    result = run(protected_server.port, "--nick", nick("none"), lines="never sent\n")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "bad_password" in line and "--password-file" in line, line


def test_missing_password_file_exits_2(tmp_path: Path) -> None:
    result = run(1, "--password-file", str(tmp_path / "missing.pass"), "--nick", "x", lines="")
    assert result.returncode == 2
    assert "missing.pass" in one_line(result.stderr)
    assert result.stdout == ""


def test_empty_password_file_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    result = run(1, "--password-file", str(empty), "--nick", "x", lines="")
    assert result.returncode == 2
    assert "empty" in one_line(result.stderr)


def test_password_and_tls_together(certs, password_file: Path) -> None:
    srv = Server("--tls-cert", str(certs["both"]["cert"]), "--tls-key", str(certs["both"]["key"]),
                 "--password-file", str(password_file))
    try:
        me = nick("both")
        result = run(srv.port, "--ca", str(certs["both"]["cert"]), "--password-file", str(password_file),
                     "--nick", me, lines="private and secret\n")
        assert result.returncode == 0, result.stderr
        assert f"<{me}> private and secret" in result.stdout
    finally:
        srv.stop()
