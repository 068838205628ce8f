"""The interactive client's windows, as irssi has them, without a terminal.

Window 1 is the status window (the server's welcome and notices, the client's own notes);
every room we join and every private conversation gets a window of its own, numbered in the
order they opened. Items from the session land in the windows their `targets` name; a window
that is not the current one collects activity: 1 for events (topic, kick, mode...), 2 for
talk, 3 for a line that names us or a private message. The status line lists those windows
(the act list), the mentions apart.

Bounds, and what happens at them: each window keeps its last SCROLLBACK items (the oldest go);
at most MAX_WINDOWS windows (a private conversation beyond that is shown in the status window).
Day lines are not stored: `lines` puts one wherever the date changes between two items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from selchat.client.session import CURRENT, STATUS, Item

__all__ = ["Window", "Windows", "SCROLLBACK", "MAX_WINDOWS", "LEVEL_EVENT", "LEVEL_TALK", "LEVEL_MENTION"]

SCROLLBACK = 2000  # items kept per window
MAX_WINDOWS = 99
LEVEL_EVENT, LEVEL_TALK, LEVEL_MENTION = 1, 2, 3
_PRESENCE_KINDS = ("join", "part", "quit")


def _fold(name: str) -> str:
    return name.lower()


@dataclass
class Window:
    """One window: what it shows, and how the person has set it."""

    key: str  # STATUS, a room (`#dev`) or a nick (a conversation)
    items: List[Item] = field(default_factory=list)
    activity: int = 0  # the highest level seen since the person last looked
    hide_presence: bool = False
    scroll: int = 0  # screen rows above the bottom (0: following the newest)
    dropped: int = 0  # items dropped at the bound

    @property
    def name(self) -> str:
        return "status" if self.key == STATUS else self.key

    @property
    def is_room(self) -> bool:
        return self.key.startswith("#")

    def add(self, item: Item) -> None:
        self.items.append(item)
        self._bound()

    def add_earlier(self, batch: List[Item]) -> None:
        """Older messages (a history page) go before the first shown message newer than them."""
        ids = [i.data.get("id") for i in batch if i.kind == "message"]
        newest = max((x for x in ids if isinstance(x, int) and not isinstance(x, bool)), default=None)
        pos = len(self.items)
        if newest is not None:
            for index, old in enumerate(self.items):
                mid = old.data.get("id") if old.kind == "message" else None
                if isinstance(mid, int) and not isinstance(mid, bool) and mid > newest:
                    pos = index
                    # a header of the page already shown goes with its messages
                    while pos > 0 and self.items[pos - 1].kind == "history":
                        pos -= 1
                    break
        self.items[pos:pos] = batch
        self._bound()

    def _bound(self) -> None:
        excess = len(self.items) - SCROLLBACK
        if excess > 0:
            del self.items[:excess]
            self.dropped += excess

    def visible(self) -> Iterator[Item]:
        """The items the window shows (presence lines left out when the room hides them)."""
        for item in self.items:
            if self.hide_presence and item.presence and item.kind in _PRESENCE_KINDS:
                continue
            yield item

    def lines(self, localtime: Callable[[float], time.struct_time] = time.localtime,
              today: Optional[float] = None) -> List[Item]:
        """The items to draw, with a `day` item wherever the date changes (and above the first
        item when that is not today)."""
        out: List[Item] = []
        last: Optional[Tuple[int, int, int]] = None
        for item in self.visible():
            try:
                t = localtime(item.at)
                day: Optional[Tuple[int, int, int]] = (t.tm_year, t.tm_mon, t.tm_mday)
            except (OverflowError, OSError, ValueError):
                day = None
            if day is not None and day != last:
                if last is not None or (today is not None and _day(today, localtime) != day):
                    out.append(Item("day", item.at))
                last = day
            out.append(item)
        return out


def newest_first(window: "Window", localtime: Callable[[float], time.struct_time] = time.localtime,
                 today: Optional[float] = None) -> Iterator[Item]:
    """`window.lines()` from the newest backwards, computed only as far as it is read: the
    screen draws the bottom of a window of 2,000 entries without dating all of them."""
    items = list(window.visible())
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        yield item
        day = _day(item.at, localtime)
        if day is None:
            continue
        before = _day(items[index - 1].at, localtime) if index > 0 else None
        if before is not None:
            if before != day:
                yield Item("day", item.at)
        elif index == 0 and today is not None and _day(today, localtime) != day:
            yield Item("day", item.at)


def _day(at: float, localtime: Callable[[float], time.struct_time]) -> Optional[Tuple[int, int, int]]:
    try:
        t = localtime(at)
    except (OverflowError, OSError, ValueError):
        return None
    return (t.tm_year, t.tm_mon, t.tm_mday)


class Windows:
    """The list of windows and which one is current."""

    def __init__(self) -> None:
        self.windows: List[Window] = [Window(STATUS)]
        self.current = 0  # index into windows

    # finding and switching

    def find(self, key: Optional[str]) -> Optional[int]:
        if key is None:
            return 0
        folded = _fold(key)
        for index, window in enumerate(self.windows):
            if _fold(window.key) == folded:
                return index
        return None

    @property
    def active(self) -> Window:
        return self.windows[self.current]

    def focus_key(self) -> Optional[str]:
        """The session's focus for the current window (None: the status window)."""
        key = self.active.key
        return None if key == STATUS else key

    def open(self, key: str) -> Optional[int]:
        """The window for `key`, opened at the end if there is none; None when all are in use."""
        index = self.find(key)
        if index is not None:
            return index
        if len(self.windows) >= MAX_WINDOWS:
            return None
        self.windows.append(Window(key))
        return len(self.windows) - 1

    def switch(self, index: int) -> bool:
        """Go to window `index` (0-based); False if there is no such window."""
        if not 0 <= index < len(self.windows):
            return False
        self.current = index
        self.active.activity = 0
        return True

    def step(self, delta: int) -> None:
        """Alt+Left/Right: the previous or next window, round the ends."""
        self.switch((self.current + delta) % len(self.windows))

    def follow(self, key: Optional[str]) -> None:
        """Show the window of the session's focus (after /join, /query, /part), opening it."""
        if key is None:
            return
        index = self.open(key)
        if index is not None and index != self.current:
            self.switch(index)

    def close(self, index: Optional[int] = None) -> Optional[Window]:
        """Close a window (not the status window); the one before it becomes current."""
        index = self.current if index is None else index
        if index == 0 or not 0 <= index < len(self.windows):
            return None
        window = self.windows.pop(index)
        if self.current >= index:
            self.current = max(0, self.current - 1)
        self.active.activity = 0
        return window

    def rename(self, old: str, new: str) -> None:
        """A conversation partner changed nick: the window follows them (unless `new` has one)."""
        index = self.find(old)
        if index is not None and index != 0 and self.find(new) is None:
            self.windows[index].key = new

    # routing

    def add(self, item: Item) -> bool:
        """Put one item where it belongs; True when it asks for attention (the bell)."""
        if item.kind == "part" and not item.presence and item.targets:
            # We left the room (here or on another device of our account): its window closes,
            # and the line saying so is shown where the person is.
            index = self.find(item.targets[0])
            if index:
                self.close(index)
            item = Item(item.kind, item.at, item.data, targets=(CURRENT,))
        placed: List[int] = []
        for target in item.targets or (CURRENT,):
            if target == CURRENT:
                index: Optional[int] = self.current
            elif target == STATUS:
                index = 0
            else:
                index = self.open(target) if item.opens else self.find(target)
            if index is not None and index not in placed:
                placed.append(index)
        if not placed:
            placed.append(self.current if not item.opens else 0)
        if item.kind == "nick":
            old, new = item.data.get("old"), item.data.get("new")
            if isinstance(old, str) and isinstance(new, str):
                self.rename(old, new)
        attention = False
        for index in placed:
            window = self.windows[index]
            if item.earlier and item.kind in ("message", "history"):
                window.add_earlier([item])
            else:
                window.add(item)
            if index != self.current:
                level = self._level(item, window)
                if level > window.activity:
                    window.activity = level
            if item.mention:
                attention = True
        return attention

    def add_all(self, items: List[Item]) -> bool:
        """Several items of one event (a history page stays in its order); True: ring once."""
        earlier = [i for i in items if i.earlier and i.kind in ("message", "history")]
        attention = False
        if earlier:
            by_window: Dict[Optional[int], List[Item]] = {}
            for item in earlier:
                target = item.targets[0] if item.targets else CURRENT
                index = self.current if target == CURRENT else self.open(target) if item.opens else self.find(target)
                by_window.setdefault(index, []).append(item)
            for index, batch in by_window.items():
                self.windows[index if index is not None else self.current].add_earlier(batch)
        for item in items:
            if item.earlier and item.kind in ("message", "history"):
                continue
            attention = self.add(item) or attention
        return attention

    @staticmethod
    def _level(item: Item, window: Window) -> int:
        if item.presence or item.earlier or item.own:
            return 0
        if item.mention:
            return LEVEL_MENTION
        if item.kind == "message":
            return LEVEL_TALK
        if item.kind in ("topic", "kick", "mode", "invite", "account", "nick", "error", "notice"):
            return LEVEL_EVENT
        return 0

    def act_list(self) -> List[Tuple[int, int]]:
        """(window number, level) of every other window with activity, by number."""
        return [(i + 1, w.activity) for i, w in enumerate(self.windows) if w.activity and i != self.current]
