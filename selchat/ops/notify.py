"""systemd's readiness protocol (sd_notify), in a few lines and no dependency.

Under a unit with `Type=notify`, systemd passes `$NOTIFY_SOCKET`, a datagram socket; the
server sends `READY=1` once its ports are open, `RELOADING=1` (with the monotonic clock, as
systemd 253+ asks) while SIGHUP re-reads its files, `READY=1` again after, and `STOPPING=1`
when it starts to shut down. Without the variable, nothing is sent. A send never blocks and a
failure is logged once at debug level: telling systemd is never worth stalling the chat for.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("selchat.server")


def notify(*states: str) -> bool:
    """Send `states` ("READY=1", "STATUS=...") as one datagram; True when it was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path[0] == "@":  # an abstract socket: its name starts with a NUL byte
        path = "\0" + path[1:]
    message = "\n".join(states).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(path)
            sock.send(message)
    except OSError as exc:
        log.debug("could not tell systemd %r: %s", states, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *((f"STATUS={status}",) if status else ()))


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
