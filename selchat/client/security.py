"""TLS contexts, certificate errors and the server password: the client's pure helpers for them.

Nothing here opens a connection (that is `connection.connect`) or touches a terminal; the app
builds a context once from the options, passes it to every `connect`, and reports failures with
`describe_connect_error` in one line.
"""

from __future__ import annotations

import re
import ssl
from typing import Any, Dict, Mapping, Optional

from selchat import password

__all__ = [
    "INSECURE_WARNING",
    "OptionError",
    "make_tls_context",
    "is_certificate_error",
    "describe_tls_error",
    "read_password_file",
    "redact",
]

# "[SSL: X] " in front and " (_ssl.c:1006)" behind what OpenSSL says
_SSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")

INSECURE_WARNING = "warning: TLS certificate NOT verified (--insecure): anyone on the path can read and change this chat"


class OptionError(ValueError):
    """A file named on the command line cannot be used; the message is one line for stderr."""


def make_tls_context(ca: Optional[str] = None, insecure: bool = False) -> ssl.SSLContext:
    """The client side of TLS: verify the server's certificate and its name against the system's
    trusted CAs, or against the certificates in `ca` only; with `insecure`, verify nothing.

    The host name is checked by `connect`, which passes `server_hostname=host` (for an IP
    address Python matches the certificate's IP subjectAltName).
    """
    if ca is not None and insecure:
        raise OptionError("--ca and --insecure contradict each other: pick one")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except FileNotFoundError:
        raise OptionError(f"cannot read CA file {ca}: no such file") from None
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise OptionError(f"CA file {ca} holds no usable PEM certificate ({exc.reason or exc})") from None
        raise OptionError(f"cannot read CA file {ca}: {exc.strerror or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def is_certificate_error(exc: BaseException) -> bool:
    """The server's certificate was not accepted (untrusted, expired, wrong name): not a network
    hiccup, so the interactive client does not retry it."""
    return isinstance(exc, ssl.SSLCertVerificationError)


def describe_tls_error(exc: BaseException, ca: Optional[str] = None) -> Optional[str]:
    """One line for a TLS failure, or None if `exc` is not one; `ca` is the --ca file, if any.

    `certificate verify failed: self-signed certificate (...)` rather than OpenSSL's
    `[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)`.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or "unknown reason"
        why = why.rstrip(".")
        hint = ""
        code = exc.verify_code
        # 18: self-signed leaf, 19: self-signed root in the chain, 20: issuer not known
        if code in (18, 19, 20):
            if ca is None:
                hint = " (trust it with --ca FILE, giving the server's certificate or its CA)"
            else:
                hint = f" (neither in {ca} nor issued by a certificate in it)"
        elif "mismatch" in why:
            hint = " (use the name or address the certificate was made for)"
        return f"certificate verify failed: {why}{hint}"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)  # OpenSSL's name, WRONG_VERSION_NUMBER; not always set
        if reason:
            why = str(reason).replace("_", " ").lower()
        else:
            text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
            why = _SSL_NOISE.sub("", text) or type(exc).__name__
        hint = " (is the server speaking TLS?)" if "wrong version" in why or "record layer" in why else ""
        return f"TLS error: {why}{hint}"
    return None


def read_password_file(path: str) -> str:
    """The first line of the file without its line ending, as the server reads its own.

    Raises OptionError (one line) when the file cannot be read, is empty, or is not UTF-8.
    """
    try:
        return password.read_password_file(path)
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def redact(request: Mapping[str, Any]) -> Dict[str, Any]:
    """The request as it may be logged: passwords (the server's, an account's in `login`, the old
    and new of `password`) and remembered-login tokens are replaced by `***`."""
    out = dict(request)
    for key in ("password", "old", "new", "token"):
        if key in out:
            out[key] = "***"
    login = out.get("login")
    if isinstance(login, Mapping):
        out["login"] = redact(login)
    return out
