"""SIGHUP: read the configuration again and apply what can change while clients are connected.

What is re-read: the `--config` file (with the same command line over it), the TLS certificate
and key (a renewed certificate is served to new connections; those connected keep theirs), the
password file, the MOTD, and whatever a part of the server registers in `server.reload_hooks`
(the operators' file). Everything is read and checked first; if anything is wrong (a bad file,
a key that does not load), nothing is applied and one error line says why: the configuration
in force stays. Then what can change live does, and one line says what changed; settings that
cannot change under running connections (ports, the database, frame limits...) are named as
taking effect at the next start.

A reload hook is `hook(new_config) -> apply or None`: it reads and checks its file when called
(raising ValueError with one line when the file is bad) and returns a function that makes the
change and returns a few words saying what changed (or None when nothing did).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import fields, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

from selchat.ops import notify

log = logging.getLogger("selchat.server")

ReloadHook = Callable[[Any], Optional[Callable[[], Optional[str]]]]

# Settings a running server takes at once (each applier below); the rest wait for a restart.
_NOT_SETTINGS = frozenset({"config"})


class ReloadError(ValueError):
    """Why a reload was refused; str() is the one line for the log."""


def reload(server: Any) -> bool:
    """Re-read and apply (see the module's doc); True when the new configuration is in force."""
    notify.reloading()
    try:
        try:
            apply = prepare(server)
        except ReloadError as exc:
            log.error("reload failed, the configuration in force is kept: %s", exc)
            return False
        changes = apply()
        log.info("reloaded: %s", "; ".join(changes) if changes else "nothing changed")
        return True
    finally:
        notify.ready()


def prepare(server: Any) -> Callable[[], List[str]]:
    """Read and check everything; the returned function applies it (and says what changed)."""
    from selchat.config import ConfigError, parse_args

    old = server.config
    if getattr(server, "argv", None) is not None:
        try:
            new = parse_args(server.argv, raising=True)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
    else:  # (a server built in-process, without a command line: its files only)
        new = old
    tls = _load_tls(server, new)
    password = _load_password(new)
    applies = []
    for hook in list(getattr(server, "reload_hooks", ())):
        try:
            apply_hook = hook(new)
        except ValueError as exc:
            raise ReloadError(str(exc)) from None
        if apply_hook is not None:
            applies.append(apply_hook)

    def apply() -> List[str]:
        changes = _apply_settings(server, old, new)
        if tls is not None:
            server.tls, digest, notice = tls
            if digest != getattr(server, "tls_digest", None):
                server.tls_digest = digest
                changes.append(f"TLS certificate {notice} (for new connections)")
        if password != server.password:
            was, server.password = server.password, password
            for door in _doors(server):
                door.password = password
            changes.append("server password " + ("removed" if password is None else
                                                 "set" if was is None else "changed"))
        for apply_hook in applies:
            said = apply_hook()
            if said:
                changes.append(said)
        return changes

    return apply


def _load_tls(server: Any, new: Any) -> Optional[Tuple[ssl.SSLContext, str, str]]:
    """A fresh context from the (perhaps renewed) files, when the port speaks TLS."""
    if server.tls is None or not new.tls_cert or not new.tls_key:
        return None
    from selchat.server import make_tls_context

    try:
        context = make_tls_context(new.tls_cert, new.tls_key)
        with open(new.tls_cert, "rb") as file:
            pem = file.read()
    except (ValueError, OSError) as exc:
        raise ReloadError(str(exc)) from None
    return context, hashlib.sha256(pem).hexdigest(), _describe_certificate(new.tls_cert)


def file_digest(path: Optional[str]) -> Optional[str]:
    """What a reload compares a certificate file by (None when there is none to read)."""
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest()
    except OSError:
        return None


def _describe_certificate(path: str) -> str:
    try:
        info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except Exception:
        return f"from {path}"
    return f"from {path} (serial {info.get('serialNumber', '?')}, valid until {info.get('notAfter', '?')})"


def _load_password(new: Any) -> Optional[bytes]:
    if not new.password_file:
        return None
    from selchat.server import read_password

    try:
        return read_password(new.password_file)
    except (ValueError, OSError) as exc:
        raise ReloadError(str(exc)) from None


def _doors(server: Any) -> List[Any]:
    return [door for door in (server.framed, server.irc, server.web) if door is not None]


def _apply_settings(server: Any, old: Any, new: Any) -> List[str]:
    """Apply the settings that changed and can; the config in force becomes `old` with them."""
    changes: List[str] = []
    later: List[str] = []
    in_force: Dict[str, Any] = {}
    for field in fields(old):
        name = field.name
        before, after = getattr(old, name), getattr(new, name)
        if name in _NOT_SETTINGS or before == after:
            continue
        applier = _APPLIERS.get(name)
        said = applier(server, old, new) if applier is not None else None
        if said is None:
            later.append(f"{_flag(name)} {_show(before)} -> {_show(after)}")
            continue
        in_force[name] = after
        if said is not _SAID_ELSEWHERE:
            changes.append(said or f"{_flag(name)} {_show(before)} -> {_show(after)}")
    server.config = replace(old, **in_force)
    if later:
        changes.append("at the next start: " + ", ".join(later))
    return changes


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37] + "...")
    return repr(value) if isinstance(value, str) else str(value)


# --- appliers: each returns "" (say the default words) or None (cannot change live) ---------------


def _limits(server: Any, old: Any, new: Any) -> Optional[str]:
    for door in _doors(server):
        door.rate, door.burst = new.rate, new.burst
        limits = getattr(door, "limits", None)
        if isinstance(limits, dict):  # what a JSON door's welcome says
            limits.pop("rate", None)
            limits.pop("burst", None)
            if new.rate:
                limits["rate"], limits["burst"] = new.rate, new.burst
    return ""


def _timeouts(server: Any, old: Any, new: Any) -> Optional[str]:
    for door in _doors(server):
        door.handshake_timeout = new.handshake_timeout
        door.ping_interval, door.ping_timeout = new.ping_interval, new.ping_timeout
    return ""


def _motd(server: Any, old: Any, new: Any) -> Optional[str]:
    from selchat.config import welcome_size

    if welcome_size(replace(old, motd=new.motd)) > old.max_frame:
        return None  # (a welcome that would not fit the frames in force)
    server.chat.motd = new.motd
    return "motd changed"


def _chat_attribute(name: str) -> Callable[[Any, Any, Any], Optional[str]]:
    def apply(server: Any, old: Any, new: Any) -> Optional[str]:
        setattr(server.chat, name, getattr(new, name))
        return ""

    return apply


def _admission(server: Any, old: Any, new: Any) -> Optional[str]:
    server.admission.max_clients, server.admission.max_per_ip = new.max_clients, new.max_per_ip
    return ""


def _pacing(server: Any, old: Any, new: Any) -> Optional[str]:
    pacer = server.hub.pacer
    if pacer is None or new.register_rate <= 0:
        return None  # (turning pacing on or off: at the next start)
    pacer.rate, pacer.burst = new.register_rate, max(1, new.register_burst)
    pacer.interval = 1.0 / pacer.rate
    pacer.tolerance = (pacer.burst - 1) * pacer.interval
    return ""


def _log_level(server: Any, old: Any, new: Any) -> Optional[str]:
    logging.getLogger().setLevel(new.log_level.upper())
    return ""


def _web_origin(server: Any, old: Any, new: Any) -> Optional[str]:
    if server.web is None:
        return ""
    from selchat.doors.web.http import parse_origin

    server.web.site.origins = frozenset(parse_origin(origin) for origin in new.web_origin)
    return ""


def _trusted(server: Any, old: Any, new: Any) -> Optional[str]:
    from selchat.loop.proxyproto import TrustedProxies

    fresh = TrustedProxies(new.trusted_proxy)
    server.trusted.networks = fresh.networks
    server.trusted._known.clear()
    return ""


def _forwarded_header(server: Any, old: Any, new: Any) -> Optional[str]:
    if server.web is not None:
        server.web.site.forwarded_header = new.forwarded_header
    return ""


def _files(server: Any, old: Any, new: Any) -> Optional[str]:
    return ""  # (read above: the password file, the TLS files; the new paths are in force)


def _tls_files(server: Any, old: Any, new: Any) -> Optional[str]:
    if server.tls is None or not new.tls_cert:
        return None  # (turning TLS on or off changes what the port speaks: at the next start)
    return ""


def _plain(server: Any, old: Any, new: Any) -> Optional[str]:
    return ""  # (read where it is used, from server.config)


_SAID_ELSEWHERE = "(said by its reload hook)"


def _by_hook(server: Any, old: Any, new: Any) -> Optional[str]:
    return _SAID_ELSEWHERE  # (the server's accounts hook applies these and says what changed)


_APPLIERS: Dict[str, Callable[[Any, Any, Any], Optional[str]]] = {
    "rate": _limits, "burst": _limits,
    "handshake_timeout": _timeouts, "ping_interval": _timeouts, "ping_timeout": _timeouts,
    "motd": _motd,
    "max_presence": _chat_attribute("max_presence"),
    "history_on_join": _chat_attribute("history_on_join"),
    "max_clients": _admission, "max_per_ip": _admission,
    "register_rate": _pacing, "register_burst": _pacing,
    "log_level": _log_level,
    "web_origin": _web_origin,
    "trusted_proxy": _trusted,
    "forwarded_header": _forwarded_header,
    "password_file": _files,
    "tls_cert": _tls_files, "tls_key": _tls_files,
    "shutdown_grace": _plain,
    "operators": _by_hook, "registration": _by_hook, "max_accounts": _by_hook,
}
