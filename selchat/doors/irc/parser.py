"""IRC lines on the wire: cut a byte stream into lines, parse one line, build one line.

Sans-I/O: nothing here touches a socket or knows about the chat server.

Public API
----------
* ``LineDecoder(max_body=510, max_tags=4096)``: incremental splitter. ``feed(data)`` then
  iterate it (``for item in decoder``); each item is either the raw ``bytes`` of one complete
  line (line ending removed, never empty) or the ``TOO_LONG`` sentinel (an instance of
  ``TooLong``) standing in, at its place in the stream, for a line over the limit, so the
  session can answer ``417`` and go on with the next line. The decoder never raises.
  ``decoder.buffered`` is the number of bytes held.
* ``parse_line(raw: bytes) -> Line``; raises ``IrcParseError`` and nothing else.
* ``Line(tags, source, command, params)``: ``tags`` is ``dict[str, str]`` (values unescaped,
  a tag without value maps to ``""``), ``source`` is ``str | None``, ``command`` is upper-cased,
  ``params`` is ``list[str]`` with the trailing parameter (if any) as the last item.
* ``format_line(command, *params, source=None, tags=None, trailing=False) -> bytes``: one wire
  line ending in CRLF. ``command`` may be an ``int`` (a numeric, written as 3 digits). The last
  parameter gets a ``:`` when it needs one (empty, contains a space, starts with ``:``) or when
  ``trailing=True``. Raises ``ValueError`` for what cannot be a line (CR, LF or NUL anywhere,
  a bad middle parameter): that is a bug of the caller, never of the peer.
* ``body_budget(command, *middle, source=None) -> int``: bytes left for the trailing
  parameter so that ``format_line(command, *middle, text, source=source)`` stays within 512
  bytes (tags not counted, as the limit does not count them).
* ``escape_tag_value(s)`` / ``unescape_tag_value(s)``: IRCv3 tag value escaping.

Limits
------
RFC 1459 allows 512 bytes per line including CRLF, so 510 bytes of content. IRCv3
``message-tags`` puts the tag section outside that count: a client may send up to 4094
bytes of tag data, i.e. a tag section of 4096 bytes counting its leading ``@`` and the space
that ends it (https://ircv3.net/specs/extensions/message-tags). A line is accepted when its
tag section (if any) is at most ``max_tags`` bytes and the rest at most ``max_body`` bytes.

How the decoder stays bounded
-----------------------------
Lines are cut lazily while the caller iterates, so the decoder keeps no list of lines at all
(the cap on kept lines is zero): only the raw bytes not yet iterated are held. The unfinished
line at the end of the buffer is held up to the largest size a valid line can have plus two
bytes; past that it is cut to that stub, and everything up to its LF is dropped as it arrives
without being stored. When the LF comes, the stub is reported as ``TOO_LONG`` in its place.
So what the decoder holds is what the caller fed and did not drain, plus at most
``max_tags + max_body + 2`` bytes. A session that stops iterating early (for fairness) can
resume later; it should stop reading the socket while ``buffered`` is large.

Decoding
--------
A line is decoded as UTF-8; if that fails the whole line is decoded as latin-1 (as many
servers do), so bytes above 0x7f never raise here: they just make a nick or channel fail
name validation later.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Union

__all__ = [
    "MAX_BODY",
    "MAX_TAGS",
    "IrcParseError",
    "Line",
    "TooLong",
    "TOO_LONG",
    "LineDecoder",
    "parse_line",
    "format_line",
    "body_budget",
    "escape_tag_value",
    "unescape_tag_value",
]

MAX_BODY = 510  # RFC 1459: 512 bytes including CRLF
MAX_TAGS = 4096  # IRCv3 client tag data (4094) plus the leading '@' and the trailing space

_LF = 10
_CR = 13
_AT = 64
_COMPACT_AT = 1 << 15  # consumed bytes kept in front of the buffer before shifting them out


class IrcParseError(ValueError):
    """A line that is not an IRC message (empty, no command, bad tags, CR/LF/NUL inside)."""


class TooLong:
    """Stands in for one line over the length limit; the session answers 417 (ERR_INPUTTOOLONG)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = TooLong()


class Line:
    """One parsed IRC message."""

    __slots__ = ("tags", "source", "command", "params")

    def __init__(
        self,
        tags: Dict[str, str],
        source: Optional[str],
        command: str,
        params: List[str],
    ) -> None:
        self.tags = tags
        self.source = source
        self.command = command
        self.params = params

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Line):
            return NotImplemented
        return (
            self.command == other.command
            and self.params == other.params
            and self.source == other.source
            and self.tags == other.tags
        )

    __hash__ = None  # type: ignore[assignment]  # mutable record

    def __repr__(self) -> str:
        return f"Line(tags={self.tags!r}, source={self.source!r}, command={self.command!r}, params={self.params!r})"


# --------------------------------------------------------------------------- decoding


class LineDecoder:
    """Incremental line splitter with the RFC 1459 / IRCv3 length limits; never raises.

    ``feed(data)`` stores bytes; iterating yields ``bytes`` lines and ``TOO_LONG`` items in
    stream order. Lines end at LF; one CR right before the LF is removed; empty lines are
    skipped.
    """

    __slots__ = ("max_body", "max_tags", "_buf", "_pos", "_tail", "_hard", "_discarding")

    def __init__(self, max_body: int = MAX_BODY, max_tags: int = MAX_TAGS) -> None:
        self.max_body = max_body
        self.max_tags = max_tags
        self._buf = bytearray()
        self._pos = 0  # start of the first line not yet handed out
        self._tail = 0  # start of the unfinished line (after the last LF in the buffer)
        # An unfinished line longer than this cannot become valid (+1 for a CR, +1 to be over).
        self._hard = max_tags + max_body + 2
        self._discarding = False  # dropping the rest of an overlong line up to its LF

    @property
    def buffered(self) -> int:
        """Bytes held: fed but not yet handed out (the unfinished line included)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Take bytes from the peer; cut into lines later, while the caller iterates."""
        if self._discarding:
            i = data.find(b"\n")
            if i < 0:
                return
            self._discarding = False
            self._buf.append(_LF)  # ends the stub of the overlong line: reported in its place
            self._tail = len(self._buf)
            data = data[i + 1 :]
            if not data:
                return
        buf = self._buf
        if self._pos and self._pos == len(buf):
            buf.clear()  # cheap compaction when everything was handed out
            self._pos = self._tail = 0
        base = len(buf)
        buf += data
        last = data.rfind(b"\n")
        if last >= 0:
            self._tail = base + last + 1
        if len(buf) - self._tail > self._hard:
            del buf[self._tail + self._hard :]
            self._discarding = True

    def __iter__(self) -> Iterator[Union[bytes, TooLong]]:
        return self

    def __next__(self) -> Union[bytes, TooLong]:
        buf = self._buf
        pos = self._pos
        end_of_lines = self._tail
        max_body = self.max_body
        while pos < end_of_lines:
            nl = buf.find(b"\n", pos, end_of_lines)
            end = nl
            if end > pos and buf[end - 1] == _CR:
                end -= 1
            start = pos
            pos = nl + 1
            n = end - start
            if n == 0:
                continue
            self._pos = pos
            if n <= max_body:
                return bytes(buf[start:end])
            if buf[start] == _AT:
                # tag section: '@' up to and including the first space, at most max_tags bytes
                sp = buf.find(b" ", start, min(end, start + self.max_tags))
                if sp >= 0 and end - sp - 1 <= max_body:
                    return bytes(buf[start:end])
            return TOO_LONG
        self._pos = pos
        if pos >= _COMPACT_AT:
            del buf[:pos]
            self._tail -= pos
            self._pos = 0
        raise StopIteration


# --------------------------------------------------------------------------- tags

_UNESCAPE = {":": ";", "s": " ", "\\": "\\", "r": "\r", "n": "\n"}
_ESCAPE_TABLE = str.maketrans({";": "\\:", " ": "\\s", "\\": "\\\\", "\r": "\\r", "\n": "\\n"})
# key = [ '+' ] [ vendor '/' ] 1*( letter / digit / '-' ), vendor a host name
_TAG_KEY = re.compile(r"\+?(?:[A-Za-z0-9][A-Za-z0-9.-]*/)?[A-Za-z0-9-]+")


def escape_tag_value(value: str) -> str:
    """Escape a tag value for the wire (IRCv3: ``;`` space ``\\`` CR LF)."""
    return value.translate(_ESCAPE_TABLE)


def unescape_tag_value(value: str) -> str:
    """Undo IRCv3 tag value escaping; an unknown ``\\x`` is ``x``, a lone trailing ``\\`` is dropped."""
    if "\\" not in value:
        return value
    out: List[str] = []
    i = 0
    n = len(value)
    while i < n:
        j = value.find("\\", i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        if j + 1 < n:
            c = value[j + 1]
            out.append(_UNESCAPE.get(c, c))
        i = j + 2
    return "".join(out)


def _parse_tags(section: str) -> Dict[str, str]:
    tags: Dict[str, str] = {}
    for item in section.split(";"):
        if not item:
            continue  # tolerate "@a;;b" and a trailing ';'
        key, sep, value = item.partition("=")
        if not _TAG_KEY.fullmatch(key):
            raise IrcParseError(f"bad tag key {key!r}")
        tags[key] = unescape_tag_value(value) if sep else ""  # a repeated key: the last wins
    return tags


def _format_tags(tags: Dict[str, str]) -> str:
    parts = []
    for key, value in tags.items():
        if not value:
            parts.append(key)
        elif ";" in value or " " in value or "\\" in value or "\r" in value or "\n" in value:
            parts.append(key + "=" + value.translate(_ESCAPE_TABLE))
        else:  # the usual msgid/time values need no escaping; translate() is slow
            parts.append(key + "=" + value)
    return ";".join(parts)


# --------------------------------------------------------------------------- parsing


def parse_line(raw: bytes) -> Line:
    """Parse one line (without its line ending). Raises only ``IrcParseError``."""
    try:
        if b"\0" in raw or b"\r" in raw or b"\n" in raw:
            raise IrcParseError("NUL, CR or LF inside a line")
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            s = raw.decode("latin-1")
        return _parse(s)
    except IrcParseError:
        raise
    except Exception as exc:  # not bytes-like, or a bug: still only our error type
        raise IrcParseError(f"unparsable line: {exc}") from None


def _parse(s: str) -> Line:
    tags: Dict[str, str] = {}
    if s[:1] == "@":
        section, _, s = s.partition(" ")
        if not s:
            raise IrcParseError("tags without a command")
        tags = _parse_tags(section[1:])
    s = s.lstrip(" ")
    source: Optional[str] = None
    if s[:1] == ":":
        source, _, s = s.partition(" ")
        source = source[1:]
        if not source:
            raise IrcParseError("empty source")
        s = s.lstrip(" ")
    # middle parameters never start with ':', so the first " :" starts the trailing one
    i = s.find(" :")
    if i >= 0:
        words = s[:i].split(" ")
        trailing: Optional[str] = s[i + 2 :]
    else:
        words = s.split(" ")
        trailing = None
    command = words[0]
    # Letters (and '_', as in NONEXISTENT_COMMAND, so that the session can answer 421 with
    # the line's label) or a 3-digit numeric.
    if not command.isascii() or not (command.replace("_", "").isalpha()
                                     or (len(command) == 3 and command.isdigit())):
        raise IrcParseError(f"bad command {command[:20]!r}" if command else "no command")
    if len(words) > 1:
        params = [w for w in words[1:] if w]
    else:
        params = []
    if trailing is not None:
        params.append(trailing)
    return Line(tags, source, command.upper(), params)


# --------------------------------------------------------------------------- formatting


def format_line(
    command: Union[str, int],
    *params: str,
    source: Optional[str] = None,
    tags: Optional[Dict[str, str]] = None,
    trailing: bool = False,
) -> bytes:
    """Build one wire line ending in CRLF (see the module docstring)."""
    # f-strings build each string in one allocation; chained '+' would copy the text each time
    if isinstance(command, int):
        command = "%03d" % command
    head = command if source is None else f":{source} {command}"
    if tags:
        head = f"@{_format_tags(tags)} {head}"
    n = len(params)
    if n:
        last = params[-1]
        sep = " :" if (trailing or not last or last[0] == ":" or " " in last) else " "
        if n == 1:
            s = f"{head}{sep}{last}"
        else:
            for p in params[:-1]:
                if not p or " " in p or p[0] == ":":
                    raise ValueError(f"bad middle parameter {p!r}")
            middle = params[0] if n == 2 else " ".join(params[:-1])
            s = f"{head} {middle}{sep}{last}"
    else:
        s = head
    if "\r" in s or "\n" in s or "\0" in s:
        raise ValueError("CR, LF or NUL in an IRC line")
    return s.encode("utf-8") + b"\r\n"


def body_budget(command: Union[str, int], *middle: str, source: Optional[str] = None) -> int:
    """Bytes left for a trailing parameter within 512 (CRLF and the ``" :"`` counted, tags not)."""
    used = 3 if isinstance(command, int) else len(command.encode("utf-8"))
    for p in middle:
        used += 1 + len(p.encode("utf-8"))
    if source is not None:
        used += 2 + len(source.encode("utf-8"))  # ':' source ' '
    return MAX_BODY - used - 2  # ' :' before the trailing parameter
