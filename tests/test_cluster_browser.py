"""The README's several-process chat, as people use it (issue 17): the web page on one
process, the terminal client and an IRC client on another, one Redis (real redis-server,
real Chromium through Playwright); skipped without either."""

from __future__ import annotations

from typing import Callable

import pytest

from browser.pages import CHROMIUM, LAUNCH_ARGS, ChatPage, missing

_why = missing()
if _why:
    pytest.skip(f"browser tests need Chromium and Playwright: {_why}", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from browser.peers import IrcPeer, TerminalPeer, irc_port, web_port  # noqa: E402
from conftest import ServerProcess  # noqa: E402
from test_cluster import OPEN, cluster, redis  # noqa: E402,F401  (fixtures)


def test_a_browser_a_terminal_and_irssi_on_two_processes(
        cluster: Callable[..., ServerProcess]) -> None:
    p1 = cluster(*OPEN, "--irc-port", "0")
    p2 = cluster(*OPEN, "--web-port", "0")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = ChatPage(browser.new_context().new_page(), f"http://127.0.0.1:{web_port(p2)}/")
            page.open().login("webby")
            page.join("#both")
            term = TerminalPeer(p1.port, "termy")
            irc = IrcPeer(irc_port(p1), "ircy")
            try:
                term.send("/join #both")
                term.expect(r"#both \* termy joined")
                irc.join("#both")
                members = page.page.locator("#member-list li")
                expect(members).to_have_text(["@webby", "ircy", "termy"])
                page.type("hello from the browser on process two")
                term.expect(r"#both <webby> hello from the browser on process two")
                irc.expect(r"^:webby!\S+ PRIVMSG #both :hello from the browser on process two$")
                term.send("hello from the terminal on process one")
                irc.say("#both", "hello from irc on process one")
                page.shows("#both", "hello from the terminal on process one")
                page.shows("#both", "hello from irc on process one")
                assert page.errors == []
            finally:
                irc.close()
                assert term.finish() == 0
        finally:
            browser.close()
