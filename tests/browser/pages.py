"""Chromium through Playwright, and a thin wrapper for one chat page.

The wrapper only names the page's parts (the selectors live here, not in every test) and
types the way a person does: into the focused field, then Enter. Every wait is one of
Playwright's `expect` assertions, which retry until their deadline.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

CHROMIUM = "/usr/bin/chromium"
# Headless Debian chromium; without the background-networking flags it tries to reach Google
# services, and this machine's closed network refuses those connections noisily.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 8000


def missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the python package playwright is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


def view_key(name: str) -> str:
    """The page keys rooms and conversations by their folded name (ASCII lower case)."""
    return re.sub(r"[A-Z]", lambda m: m.group(0).lower(), name)


class ChatPage:
    """One browser tab with the selchat page."""

    def __init__(self, page: Any, url: str) -> None:
        from playwright.sync_api import expect

        self.page = page
        self.url = url
        self.expect = expect
        self.errors: list = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)

    # --- parts of the page -------------------------------------------------------------------

    def log(self, name: str) -> Any:
        return self.page.locator(f'.log[data-view="{view_key(name)}"]')

    def messages(self, name: str) -> Any:
        return self.log(name).locator(".line.msg")

    def message(self, name: str, text: str) -> Any:
        return self.messages(name).filter(has_text=text)

    def current_log(self) -> Any:
        return self.page.locator(".log.active")

    def item(self, name: str) -> Any:
        return self.page.locator(f'.view-item[data-view="{view_key(name)}"]')

    def badge(self, name: str) -> Any:
        return self.item(name).locator(".badge")

    @property
    def conn(self) -> Any:
        return self.page.locator("#conn")

    @property
    def input(self) -> Any:
        return self.page.locator("#input")

    def focused_id(self) -> str:
        return self.page.evaluate("document.activeElement && document.activeElement.id")

    # --- actions -----------------------------------------------------------------------------

    def open(self) -> "ChatPage":
        self.page.goto(self.url)
        self.expect(self.page.locator("#login-nick")).to_be_focused()
        return self

    def login(self, nick: str) -> "ChatPage":
        """Type the nick into the focused field, Enter, and wait to be online."""
        self.page.keyboard.type(nick)
        self.page.keyboard.press("Enter")
        self.expect(self.conn).to_have_attribute("data-state", "online")
        self.expect(self.input).to_be_focused()
        self.expect(self.page.locator("#me-nick")).to_have_text(nick)
        return self

    def type(self, line: str) -> None:
        """Type a line into the message input (it has focus) and press Enter."""
        self.expect(self.input).to_be_focused()
        self.page.keyboard.type(line)
        self.page.keyboard.press("Enter")
        self.expect(self.input).to_have_value("")

    def join(self, room: str) -> None:
        self.type(f"/join {room}")
        self.expect(self.item(room)).to_have_class(re.compile(r"\bcurrent\b"))
        self.expect(self.log(room).locator(".line.self-join")).to_have_count(1)

    def shows(self, name: str, text: str, count: int = 1) -> None:
        self.expect(self.message(name, text)).to_have_count(count)


__all__ = ["CHROMIUM", "LAUNCH_ARGS", "ChatPage", "missing", "view_key"]
