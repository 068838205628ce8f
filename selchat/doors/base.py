"""What every door's session does the same way at the end of a connection.

A session leaves the chat once (`_leave`), is dropped between requests when the hub condemns
it (`drop`), and at shutdown gets a notice, leaves without a quit storm, says its door's last
words (`_shutdown_words`) and closes after flushing, by the server's deadline.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from selchat.loop.transport import State

log = logging.getLogger("selchat.server")


class DoorSession:
    """Mixed into each door's session; it has `door` (with `hub`), `transport`, `user`, `name`."""

    __slots__ = ()

    door: Any
    transport: Any
    user: Any
    SHUTDOWN_NOTICE = "server shutting down"

    def notice(self, text: str) -> None:  # pragma: no cover - every door says it its own way
        raise NotImplementedError

    def _shutdown_words(self) -> None:
        """The door's last words before its transport closes at shutdown (none by default)."""

    def _leave(self, quit_reason: Optional[str]) -> None:
        """Leave the chat, once; with a reason, those sharing a room see the user quit."""
        user, self.user = self.user, None
        if user is not None:
            self.door.hub.leave(user, quit_reason)

    def drop(self, reason: str) -> None:
        """Condemned: leave the chat with `reason` and close now."""
        log.info("dropping %s: %s", self.name, reason)  # type: ignore[attr-defined]
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
