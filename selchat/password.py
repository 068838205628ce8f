"""The password file, read the same way by the server and the client."""

from __future__ import annotations


def read_password_file(path: str) -> str:
    """The file's first line without its line ending; ValueError (one line) if unusable.

    A password lives in a file so that it never appears on a command line, where `ps` shows it.
    """
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc.strerror or exc}") from None
    password = line.rstrip(b"\r\n")
    if not password:
        raise ValueError(f"password file {path} is empty (the password is its first line)")
    try:
        return password.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"password file {path} is not UTF-8 text") from None
