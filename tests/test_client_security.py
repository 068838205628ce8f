"""The client's TLS and password helpers without a server: contexts, error lines, the password
file, what goes into hello and what never goes into the log."""

from __future__ import annotations

import argparse
import logging
import ssl
from pathlib import Path
from typing import List

import pytest

from selchat.client.app import _refusal, _secure_options, build_parser
from selchat.client.connection import Connection
from selchat.client.security import (
    OptionError,
    describe_tls_error,
    is_certificate_error,
    make_tls_context,
    read_password_file,
    redact,
)
from selchat.client.session import ClientSession


# ----- TLS contexts -------------------------------------------------------------------------


def test_default_context_verifies_certificate_and_name() -> None:
    context = make_tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_insecure_context_verifies_nothing() -> None:
    context = make_tls_context(insecure=True)
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname


def test_ca_and_insecure_together_are_refused() -> None:
    with pytest.raises(OptionError, match="contradict"):
        make_tls_context("ca.pem", insecure=True)


def test_missing_ca_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OptionError) as info:
        make_tls_context(str(tmp_path / "nope.pem"))
    assert "nope.pem" in str(info.value) and "\n" not in str(info.value)


def test_ca_file_without_a_certificate_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(OptionError) as info:
        make_tls_context(str(junk))
    assert "junk.pem" in str(info.value) and "\n" not in str(info.value)


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message} (_ssl.c:1006)"
    )
    exc.verify_code = code
    exc.verify_message = message
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    return exc


def test_self_signed_certificate_is_described_with_a_hint() -> None:
    exc = _verify_error(18, "self-signed certificate")
    assert is_certificate_error(exc)
    line = describe_tls_error(exc)
    assert line is not None and line.startswith("certificate verify failed: self-signed certificate")
    assert "--ca" in line and "_ssl.c" not in line and "[SSL" not in line
    with_ca = describe_tls_error(exc, "cert.pem")
    assert with_ca is not None and "cert.pem" in with_ca


def test_name_mismatch_is_described() -> None:
    exc = _verify_error(64, "IP address mismatch, certificate is not valid for '127.0.0.1'.")
    line = describe_tls_error(exc)
    assert line is not None
    assert line.startswith("certificate verify failed: IP address mismatch, certificate is not valid for '127.0.0.1'")


def test_other_tls_errors_are_one_line_and_not_certificate_errors() -> None:
    wrong = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    wrong.reason = "WRONG_VERSION_NUMBER"
    assert not is_certificate_error(wrong)
    assert describe_tls_error(wrong) == "TLS error: wrong version number (is the server speaking TLS?)"
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:992)")
    assert describe_tls_error(eof) == "TLS error: EOF occurred in violation of protocol"


def test_plain_os_errors_are_not_tls_errors() -> None:
    assert describe_tls_error(ConnectionRefusedError(111, "Connection refused")) is None
    assert not is_certificate_error(ConnectionRefusedError(111, "Connection refused"))


# ----- options ------------------------------------------------------------------------------


def _options(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    _secure_options(args)
    return args


def test_no_tls_option_means_plain_tcp() -> None:
    args = _options()
    assert args.tls is False and args.tls_context is None and args.password is None


@pytest.mark.parametrize("flag", [["--tls"], ["--insecure"]])
def test_tls_and_insecure_turn_tls_on(flag: List[str]) -> None:
    args = _options(*flag)
    assert args.tls is True and isinstance(args.tls_context, ssl.SSLContext)


def test_ca_implies_tls(tmp_path: Path) -> None:
    # Any PEM certificate will do to load; take the one Python trusts by default if there is one.
    cafile = ssl.get_default_verify_paths().cafile
    if not cafile or not Path(cafile).is_file():
        pytest.skip("no CA bundle file on this system")
    args = _options("--ca", cafile)
    assert args.tls is True and args.tls_context.verify_mode == ssl.CERT_REQUIRED


def test_ca_and_insecure_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--ca", "x.pem", "--insecure"])
    assert info.value.code == 2


def test_there_is_no_password_option() -> None:
    options = {s for action in build_parser()._actions for s in action.option_strings}
    assert "--password-file" in options
    assert not any(o in options for o in ("--password", "--pass", "-p"))


# ----- the password file --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"secret\n", "secret"),
        (b"secret", "secret"),
        (b"secret\r\n", "secret"),
        (b"correct horse \n", "correct horse "),  # inner and trailing blanks are the password's
        (b"first\nsecond\n", "first"),
        ("p\u00e4ss\n".encode("utf-8"), "p\u00e4ss"),
    ],
)
def test_password_is_the_first_line_without_its_ending(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    assert read_password_file(str(path)) == expected


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n", b"\nsecond line\n"])
def test_empty_password_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "pw"
    path.write_bytes(content)
    with pytest.raises(OptionError, match="empty"):
        read_password_file(str(path))


def test_unreadable_password_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(OptionError) as info:
        read_password_file(str(tmp_path / "missing"))
    assert "missing" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(OptionError):
        read_password_file(str(tmp_path))  # a directory


def test_non_utf8_password_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b"\xff\xfe\n")
    with pytest.raises(OptionError, match="UTF-8"):
        read_password_file(str(path))


# ----- hello, refusals, logs ----------------------------------------------------------------


def test_hello_carries_the_password_only_when_there_is_one() -> None:
    s = ClientSession()
    assert "password" not in s.hello("alice")
    s.password = "secret"
    assert s.hello("alice")["password"] == "secret"
    s.connection_lost()
    assert s.hello("alice")["password"] == "secret"  # a reconnect sends it again


def test_bad_password_refusal_names_its_source() -> None:
    error = {"type": "error", "code": "bad_password", "message": "wrong or missing password", "ref": "hello"}
    without = _refusal("bob", error)
    assert "bad_password: wrong or missing password" in without and "--password-file" in without
    assert "nick" not in without
    with_file = _refusal("bob", error, "server.pass")
    assert "server.pass" in with_file and "bad_password" in with_file
    taken = _refusal("bob", {"code": "nick_taken", "message": "taken"})
    assert taken.startswith("nick 'bob' refused: nick_taken")


def test_redact_hides_the_password_and_nothing_else() -> None:
    request = {"type": "hello", "nick": "a", "password": "secret", "ref": 1}
    assert redact(request) == {"type": "hello", "nick": "a", "password": "***", "ref": 1}
    assert request["password"] == "secret"  # the request itself is untouched
    assert redact({"type": "say", "text": "x"}) == {"type": "say", "text": "x"}


class _Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_debug_log_never_shows_the_password(caplog: pytest.LogCaptureFixture) -> None:
    writer = _Writer()
    conn = Connection(None, writer)  # type: ignore[arg-type]
    logger = logging.getLogger("selchat.client.connection")
    logger.addHandler(caplog.handler)  # whatever propagation the app's logging setup left
    try:
        with caplog.at_level(logging.DEBUG, logger="selchat.client.connection"):
            conn.send({"type": "hello", "nick": "a", "password": "hunter2-secret", "ref": 1})
    finally:
        logger.removeHandler(caplog.handler)
    assert b"hunter2-secret" in writer.data  # it is sent...
    assert "hunter2-secret" not in caplog.text and "***" in caplog.text  # ...and not logged
