"""What every door's session does the same way at the end of a connection.

A session leaves the chat once (`_leave`), is dropped between requests when the hub condemns
it (`drop`), and at shutdown gets a notice, leaves without a quit storm, says its door's last
words (`_shutdown_words`) and closes after flushing, by the server's deadline. Two more things
every door does alike: going on from a timer or a later pass (`_serve_again`), asking the
hub's pacer for a turn to register (`_ask_turn`, `_take_turn`, `_cancel_turn`), and the idle
timer that pings a silent peer and lets it go at the ping timeout (`_idle_check`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from selchat.loop.pacing import Full
from selchat.loop.transport import State

log = logging.getLogger("selchat.server")

_NOW = object()  # the pacer is deciding: if it calls back at once, nothing waited


class DoorSession:
    """Mixed into each door's session; it has `door` (with `hub`), `transport`, `user`, `name`."""

    __slots__ = ()

    door: Any
    transport: Any
    user: Any
    SHUTDOWN_NOTICE = "server shutting down"

    def notice(self, text: str) -> None:  # pragma: no cover - every door says it its own way
        raise NotImplementedError

    def _send_ping(self, token: str) -> None:  # pragma: no cover - every door pings its own way
        raise NotImplementedError

    def _ping_timed_out(self) -> None:  # pragma: no cover - and says goodbye its own way
        raise NotImplementedError

    def _idle_check(self, _: Any = None) -> None:
        """One timer per connection, re-armed from `last_seen`; no per-frame timer work."""
        self._idle_timer = None
        transport = self.transport
        if transport.state is not State.OPEN:
            return
        door = self.door
        now = door.reactor.now
        silence = now - self.last_seen  # type: ignore[attr-defined]
        if silence >= door.ping_timeout:
            self._ping_timed_out()
            return
        if silence >= door.ping_interval:
            if not self.pinged:  # type: ignore[has-type]
                self.pinged = True
                self._send_ping(f"{int(now * 1000)}")
            when = self.last_seen + door.ping_timeout  # type: ignore[attr-defined]
        else:
            when = self.last_seen + door.ping_interval  # type: ignore[attr-defined]
        self._idle_timer = door.reactor.call_at(when, self._idle_check)

    def resume_serving(self) -> None:  # pragma: no cover - every door serves its own way
        raise NotImplementedError

    def _serve_again(self, read: bool = True) -> None:
        """From a timer or a later pass: read again (unless `read` is False) and serve what
        waits. A bug of ours while serving loses this peer, never the server."""
        transport = self.transport
        if read:
            transport.resume_reading()
        try:
            self.resume_serving()
        except Exception:
            transport._internal_error()

    def _ask_turn(self, go: Callable[[], None]) -> Optional[bool]:
        """Ask the hub's pacer for this address's turn to register (selchat.loop.pacing):
        True when `go` ran at once, False when it waits (the ticket is kept in `_turn`), None
        when too many of the address wait already (the caller refuses)."""
        self._turn = _NOW
        try:
            ticket = self.door.hub.pacer.request(self.transport.ip, go)
        except Full:
            self._turn = None
            return None
        if self._turn is _NOW:
            self._turn = ticket
            return False
        return True

    def _take_turn(self) -> bool:
        """In `go`: the turn is taken; True when it had waited (called by the pacer's timer)."""
        queued = self._turn is not _NOW
        self._turn = None
        return queued

    def _cancel_turn(self) -> None:
        """The connection is gone: it leaves the queue at once and never takes a turn."""
        turn, self._turn = self._turn, None
        if turn is not None and turn is not _NOW:
            turn.cancel()

    def _shutdown_words(self) -> None:
        """The door's last words before its transport closes at shutdown (none by default)."""

    def _leave(self, quit_reason: Optional[str]) -> None:
        """Leave the chat, once; with a reason, those sharing a room see the user quit."""
        user, self.user = self.user, None
        if user is not None:
            self.door.hub.leave(user, quit_reason, self)

    def drop(self, reason: str) -> None:
        """Condemned: leave the chat with `reason` and close now."""
        name = self.name  # type: ignore[attr-defined]
        self.transport.log_info(f"dropping: {reason}", "dropping %s: %s", name, reason)
        self._leave(reason)
        self.transport.abort(reason)

    def shutdown(self, deadline: float) -> None:
        """The server is stopping: a notice, then close after flush, by `deadline` at the latest."""
        transport = self.transport
        if transport.state is State.HANDSHAKING:
            transport.abort("server shutting down during the TLS handshake")
            return
        if transport.state is not State.OPEN:
            return
        self.notice(self.SHUTDOWN_NOTICE)
        self._leave(None)  # everyone leaves at once: no quit storm for the last seconds
        self._shutdown_words()
        transport.close("server shutting down", deadline)
