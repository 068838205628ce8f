"""One command's answer under IRCv3 `labeled-response`: every line goes through here.

A command that carries a `label` tag (from a client that took `labeled-response`) is answered
with that label exactly once: nothing at all becomes `ACK`, one line carries the label itself,
several lines are wrapped in a `labeled-response` batch. So the lines are collected while the
command runs and sent at its end (`finish`). Two answers carry the label another way and take
it (`take_label`): the echo of a PRIVMSG/NOTICE/TAGMSG (echo-message), and a LIST that streams
in its own batch; then nothing is collected any more and `finish` has nothing left to do.
Ergo does the same with its `ResponseBuffer`.
"""

from __future__ import annotations

import itertools
from typing import List, Optional

_batch_ids = itertools.count(1)


def batch_id(kind: str) -> str:
    """A reference for a BATCH of ours, unique in this process."""
    return f"{kind}{next(_batch_ids)}"


def add_tag(line: str, tag: str) -> str:
    """Add a tag to a line of ours, which may already carry some."""
    if line.startswith("@"):
        return f"@{tag};{line[1:]}"
    return f"@{tag} {line}"


class ResponseBuffer:
    """The label of the command being served and the lines collected for it."""

    __slots__ = ("label", "lines", "taken")

    def __init__(self) -> None:
        self.label: Optional[str] = None  # the label not yet used by an answer
        self.lines: Optional[List[str]] = None  # collecting while not None
        self.taken = False  # an answer took the label (an echo, a LIST's own batch)

    @property
    def collecting(self) -> bool:
        return self.lines is not None

    def begin(self, label: str) -> None:
        self.label = label
        self.lines = []
        self.taken = False

    def add(self, line: str) -> None:
        assert self.lines is not None
        self.lines.append(line)

    def take_label(self) -> Optional[str]:
        """The label, for an answer that carries it itself; what follows is not collected."""
        label, self.label = self.label, None
        if label is not None:
            self.taken = True
            self.lines = None
        return label

    def finish(self, server: str) -> List[str]:
        """The lines to send at the end of the command (none if the label was taken)."""
        lines, label = self.lines, self.label
        self.lines = self.label = None
        taken, self.taken = self.taken, False
        if taken or label is None:
            return []
        if not lines:
            return [f"@label={label} :{server} ACK"]
        if len(lines) == 1:
            return [add_tag(lines[0], f"label={label}")]
        ref = batch_id("L")
        return ([f"@label={label} :{server} BATCH +{ref} labeled-response"]
                + [add_tag(text, f"batch={ref}") for text in lines]
                + [f":{server} BATCH -{ref}"])
