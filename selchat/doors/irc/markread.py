"""IRCv3 `draft/read-marker`: MARKREAD, where a client has read up to in each conversation.

`MARKREAD target` asks, `MARKREAD target timestamp=...` sets (a marker only ever moves
forward: an older one is answered with the one kept); a JOIN tells the marker before 366.
Markers are kept by the connection, at most MARKERS_KEPT of them (the oldest go), in memory:
(our choice) they are not shared by an account's other connections nor kept across restarts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from selchat.core.names import fold
from selchat.doors.irc.parser import Line
from selchat.doors.irc.wire import iso_time, parse_time

if TYPE_CHECKING:
    from selchat.doors.irc.session import IrcSession

CAP = "draft/read-marker"
MARKERS_KEPT = 200


def markread(s: "IrcSession", line: Line) -> None:
    if not line.params:
        s.fail("MARKREAD", "NEED_MORE_PARAMS", text="Missing parameters")
        return
    target = line.params[0]
    key = fold(target)
    if len(line.params) > 1:
        value = line.params[1]
        ms = parse_time(value[10:]) if value.startswith("timestamp=") else None
        if ms is None:
            s.fail("MARKREAD", "INVALID_PARAMS", target[:64], text="Bad timestamp")
            return
        markers = s.read_markers
        if ms > markers.get(key, -1):
            markers.pop(key, None)
            markers[key] = ms
            while len(markers) > MARKERS_KEPT:
                del markers[next(iter(markers))]
    tell(s, target)


def tell(s: "IrcSession", target: str) -> None:
    """MARKREAD target timestamp=... (or `*`), to a client that took the capability."""
    if CAP not in s.caps:
        return
    ms = s.read_markers.get(fold(target))
    s.send_line(f":{s.server} MARKREAD {target} " + (f"timestamp={iso_time(ms)}" if ms is not None else "*"))
