"""The interactive client's full screen, on prompt_toolkit: the topic of the current window on
top, the window's scrollback, a status line (time, nick, window, act list), the input line.

                     #dev (3 here): release on friday
                     16:16 <alice> hi
                     16:17 <bob> alice: the build is green
                     [16:17] [alice] [2:#dev] [act: 3 !4]
                     [#dev] _

What is drawn comes from the session (topic, nick, focus) and from `Windows` (scrollback,
activity); this module only lays it out, wraps lines to the terminal's width and maps keys.
`wrap` is pure and tested; the rest is driven by tests/test_client_tmux.py in a real terminal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.data_structures import Point
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, Window
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl, UIContent, UIControl
from prompt_toolkit.layout.processors import BeforeInput, ConditionalProcessor, PasswordProcessor
from prompt_toolkit.styles import Style
from prompt_toolkit.utils import get_cwidth

from selchat.client.render import Fragments, escape, nick_colour, render
from selchat.client.session import ClientSession, Item
from selchat.client.windows import LEVEL_EVENT, LEVEL_MENTION, Windows, newest_first

__all__ = ["Screen", "wrap", "asks_secret", "complete_nick"]

STYLE = Style.from_dict(
    {
        "topic": "reverse",
        "status": "reverse",
        "status.act": "reverse bold",
        "status.mention": "reverse bold ansimagenta",
        "status.event": "reverse",
        "status.more": "reverse bold ansiyellow",
    }
)


ROW_CACHE = 20_000  # items whose wrapped rows are kept (about 10 windows' worth of scrollback)


def wrap(fragments: Fragments, width: int) -> List[Fragments]:
    """Styled fragments as screen rows of at most `width` cells: split at `\\n`, then cut
    where a row is full (a wide character that does not fit goes to the next row)."""
    width = max(1, width)
    rows: List[Fragments] = [[]]
    used = 0
    for style, text in fragments:
        run = ""
        for char in text:
            if char == "\n":
                if run:
                    rows[-1].append((style, run))
                rows.append([])
                run, used = "", 0
                continue
            cells = get_cwidth(char)
            if used + cells > width and used > 0:
                if run:
                    rows[-1].append((style, run))
                rows.append([])
                run, used = "", 0
            run += char
            used += cells
        if run:
            rows[-1].append((style, run))
    return rows


class _Scrollback(UIControl):
    """The current window's lines, newest at the bottom, `scroll` rows up from there."""

    def __init__(self, screen: "Screen") -> None:
        self.screen = screen
        self.width = 80
        self.height = 20

    def is_focusable(self) -> bool:
        return False

    def create_content(self, width: int, height: int) -> UIContent:
        self.width, self.height = width, height
        rows = self.screen.rows(width, height)
        return UIContent(get_line=lambda i: rows[i], line_count=len(rows), cursor_position=Point(0, max(0, len(rows) - 1)))


class _LogToStatus(logging.Handler):
    """While the screen is up, the client's log lines go to the status window, not stderr."""

    def __init__(self, screen: "Screen") -> None:
        super().__init__()
        self.screen = screen

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.screen.note(f"{record.levelname.lower()}: {record.getMessage()}", status_only=True)
        except Exception:  # never let logging break the screen
            pass


class Screen:
    """Windows on a full-screen prompt_toolkit Application; lines typed go to `on_line`."""

    def __init__(
        self,
        session: ClientSession,
        on_line: Callable[[str], None],
        on_interrupt: Callable[[], None],
        bell: bool = True,
        localtime: Callable[[float], time.struct_time] = time.localtime,
    ) -> None:
        self.session = session
        self.windows = Windows()
        self.bell = bell
        self.offline = False
        self._localtime = localtime
        self._on_line = on_line
        self._on_interrupt = on_interrupt
        self._secret: "Optional[asyncio.Queue[Optional[str]]]" = None  # answers, while asking
        self._secret_prompt = ""
        self._saved = Document()
        self._row_cache: Dict[int, Tuple[Item, int, List[Fragments]]] = {}
        self.buffer = Buffer(multiline=False)
        self.scrollback = _Scrollback(self)
        secret = Condition(lambda: self._secret is not None)
        input_control = BufferControl(
            self.buffer,
            input_processors=[
                ConditionalProcessor(PasswordProcessor(), secret),  # before the prompt: it masks what is there
                BeforeInput(self._prompt, style="bold"),
            ],
        )
        layout = Layout(
            HSplit(
                [
                    Window(FormattedTextControl(self._topic), height=1, style="class:topic"),
                    Window(self.scrollback, wrap_lines=False),
                    Window(FormattedTextControl(self._status), height=1, style="class:status"),
                    Window(input_control, height=1),
                ]
            ),
            focused_element=input_control,
        )
        self.app: Application[None] = Application(
            layout=layout, key_bindings=self._keys(), full_screen=True, style=STYLE, mouse_support=False
        )

    # ----- drawing --------------------------------------------------------------------------

    def rows(self, width: int, height: int) -> List[StyleAndTextTuples]:
        """The screen rows of the current window: the last `height` after scrolling up."""
        window = self.windows.active
        need = height + window.scroll
        chunks: List[List[Fragments]] = []  # newest first
        count = 0
        for item in newest_first(window, self._localtime, today=time.time()):
            chunk = self._rows_of(item, width)
            chunks.append(chunk)
            count += len(chunk)
            if count >= need:
                break
        rows: List[Fragments] = [row for chunk in reversed(chunks) for row in chunk]
        window.scroll = max(0, min(window.scroll, len(rows) - height))
        end = len(rows) - window.scroll
        shown = rows[max(0, end - height):end]
        return [[("", "")]] * (height - len(shown)) + shown  # type: ignore[list-item]

    def _rows_of(self, item: Item, width: int) -> List[Fragments]:
        """An item's screen rows, kept while the width stays (items never change; member lists,
        whose @ and + can, are rendered each time). Bounded: emptied past ROW_CACHE entries."""
        if item.kind == "names":
            return wrap(self._render(item), width)
        cached = self._row_cache.get(id(item))
        if cached is not None and cached[0] is item and cached[1] == width:
            return cached[2]
        rows = wrap(self._render(item), width)
        if len(self._row_cache) >= ROW_CACHE:
            self._row_cache.clear()
        self._row_cache[id(item)] = (item, width, rows)
        return rows

    def _render(self, item: Item) -> Fragments:
        return render(item, self._localtime, windowed=True, prefix=self.session.prefix)

    def _topic(self) -> StyleAndTextTuples:
        return [("", " " + escape(self.session.topic_line()))]

    def _status(self) -> StyleAndTextTuples:
        nick = self.session.nick or ""
        account = self.session.account
        who = escape(nick) + (f"({escape(account)})" if account and account.lower() != nick.lower() else "")
        if account and account.lower() == nick.lower():
            who += "(+a)"  # logged in to the account of that name
        window = self.windows.active
        number = self.windows.current + 1
        out: StyleAndTextTuples = [
            ("", f" [{time.strftime('%H:%M', self._localtime(time.time()))}] "),
            ("", f"[{who}] "),
            ("class:status.act", f"[{number}:{escape(window.name)}]"),
        ]
        if window.is_room and self.session.prefix(window.key, nick):
            out.append(("", f" ({self.session.prefix(window.key, nick)})"))
        if window.hide_presence:
            out.append(("", " [presence hidden]"))
        acts = self.windows.act_list()
        if acts:
            out.append(("", " [act:"))
            for num, level in acts:
                if level >= LEVEL_MENTION:
                    out.append(("class:status.mention", f" !{num}"))
                elif level > LEVEL_EVENT:
                    out.append(("class:status.act", f" {num}"))
                else:
                    out.append(("class:status.event", f" {num}"))
            out.append(("", "]"))
        if window.scroll:
            out.append(("class:status.more", " -- more below (PageDown) --"))
        if self.offline:
            out.append(("class:status.mention", " (offline, reconnecting)"))
        if not self.bell:
            out.append(("", " [bell off]"))
        return out

    def _prompt(self) -> StyleAndTextTuples:
        if self._secret is not None:
            return [("bold", self._secret_prompt)]
        window = self.windows.active
        nick = self.session.nick or ""
        return [("bold", f"[{escape(window.name)}] "), (f"{nick_colour(nick)} bold", escape(nick)), ("", "> ")]

    def invalidate(self) -> None:
        self.app.invalidate()

    # ----- what the app tells us ------------------------------------------------------------

    def show(self, items: List[Item]) -> None:
        """Put the items of one event in their windows; ring once if one of them names us."""
        if not items:
            return
        before = {id(w): len(w.items) for w in self.windows.windows}
        attention = self.windows.add_all(items)
        for window in self.windows.windows:  # a window scrolled up stays where it is
            if window.scroll and len(window.items) > before.get(id(window), 0):
                added = window.items[before.get(id(window), 0):]
                window.scroll += sum(len(self._rows_of(i, self.scrollback.width)) for i in added)
        self.windows.follow(self.session.focus)
        self._prune()
        if attention and self.bell and self.app.is_running:
            self.app.output.bell()
        self.invalidate()

    def _prune(self) -> None:
        """Close the window a refused /join opened (empty, not joined, no longer looked at)."""
        for index in range(len(self.windows.windows) - 1, 0, -1):
            window = self.windows.windows[index]
            if (window.is_room and not window.items and index != self.windows.current
                    and window.key.lower() not in self.session.rooms):
                self.windows.close(index)

    def note(self, text: str, status_only: bool = False) -> None:
        item = self.session.note(text)
        if status_only:
            item = Item(item.kind, item.at, item.data, targets=("(status)",))
        self.show([item])

    def switch(self, index: int) -> None:
        if self.windows.switch(index):
            self.session.set_focus(self.windows.focus_key())
            self.invalidate()

    def step(self, delta: int) -> None:
        self.windows.step(delta)
        self.session.set_focus(self.windows.focus_key())
        self.invalidate()

    async def ask_secret(self, prompt: str) -> Optional[str]:
        """Turn the input line into a password field and wait for Enter (the text) or Ctrl-C
        (None). The field stays a password field until `end_secret`, so that an answer typed
        ahead of the next question (`the same password again:`) is never taken for a chat
        line; answers are queued in the order typed."""
        self._secret_prompt = prompt
        if self._secret is None:
            self._secret = asyncio.Queue()
            self._saved = self.buffer.document
            self.buffer.reset()
        self.invalidate()
        return await self._secret.get()

    def end_secret(self) -> None:
        """Back to the chat line (a half-typed line comes back)."""
        if self._secret is not None:
            self._secret = None
            self.buffer.reset(document=self._saved)
            self.invalidate()

    def log_handler(self) -> logging.Handler:
        return _LogToStatus(self)

    # ----- keys -----------------------------------------------------------------------------

    def _keys(self) -> KeyBindings:
        kb = KeyBindings()

        @kb.add("enter", eager=True)
        def _(event: KeyPressEvent) -> None:
            text = self.buffer.text
            if self._secret is not None:
                self.buffer.reset()
                self._secret.put_nowait(text)
                return
            if not _secret_line(text) and text.strip():
                self.buffer.append_to_history()
            self.buffer.reset()
            if asks_secret(text):
                # Mask the line at once: a password typed before the question is up must
                # not go out as a chat line. The app ends this (end_secret) when done.
                self._secret, self._saved, self._secret_prompt = asyncio.Queue(), Document(), "password: "
            self.windows.active.scroll = 0  # what you say is at the bottom: show it
            self._on_line(text)

        @kb.add("c-c")
        def _(event: KeyPressEvent) -> None:
            if self._secret is not None:
                self._secret.put_nowait(None)
                return
            self._on_interrupt()

        @kb.add("c-d")
        def _(event: KeyPressEvent) -> None:
            if self.buffer.text:
                self.buffer.delete()
            elif self._secret is not None:
                self._secret.put_nowait(None)
            else:
                self._on_interrupt()

        for digit in "1234567890":

            @kb.add("escape", digit)
            def _(event: KeyPressEvent, digit: str = digit) -> None:
                self.switch(int(digit) - 1 if digit != "0" else 9)

        @kb.add("escape", "left")
        @kb.add("c-p")
        def _(event: KeyPressEvent) -> None:
            self.step(-1)

        @kb.add("escape", "right")
        @kb.add("c-n")
        def _(event: KeyPressEvent) -> None:
            self.step(1)

        @kb.add("tab")
        def _(event: KeyPressEvent) -> None:
            if self._secret is not None:
                return
            window = self.windows.active
            nicks = self.session.members(window.key) if window.is_room else [window.key] if window.key != "(status)" else []
            done = complete_nick(self.buffer.text, self.buffer.cursor_position, [n for n in nicks if not self.session.is_me(n)])
            if done is not None:
                self.buffer.text, self.buffer.cursor_position = done

        @kb.add("pageup")
        def _(event: KeyPressEvent) -> None:
            self.windows.active.scroll += max(1, self.scrollback.height - 2)
            self.invalidate()

        @kb.add("pagedown")
        def _(event: KeyPressEvent) -> None:
            window = self.windows.active
            window.scroll = max(0, window.scroll - max(1, self.scrollback.height - 2))
            self.invalidate()

        return kb


def complete_nick(text: str, cursor: int, nicks: List[str]) -> Optional[Tuple[str, int]]:
    """Tab: the word before the cursor completed to the first nick it begins (any case), as
    irssi does: `bo` -> `bob: ` at the start of the line, `bob ` elsewhere. None if no nick fits."""
    start = cursor
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:cursor]
    if not word or word.startswith("/"):
        return None
    matches = sorted((n for n in nicks if n.lower().startswith(word.lower())), key=str.lower)
    if not matches:
        return None
    tail = ": " if start == 0 else " "
    done = matches[0] + tail
    return text[:start] + done + text[cursor:], start + len(done)


def asks_secret(text: str) -> bool:
    """A line that will ask for a password: /register, /password, /login NAME."""
    words = text.split()
    if not words:
        return False
    word = words[0].lower()
    return (word in ("/register", "/password") and len(words) == 1) or (word == "/login" and len(words) == 2)


def _secret_line(text: str) -> bool:
    """A line that may hold a password (`/login alice hunter22`): never kept in the history."""
    word = text.split(" ", 1)[0].lower()
    return word in ("/login", "/register", "/password") and len(text.split()) > (2 if word == "/login" else 1)
