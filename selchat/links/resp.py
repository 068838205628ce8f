"""RESP2, the protocol Redis speaks: commands out as bytes, replies in through `hiredis.Reader`.

Sans-I/O, like the web door's h11: bytes in, values out, no socket. Commands are arrays of
bulk strings; a pipeline is the concatenation of its commands, sent as one `bytes` object.
Replies come out as Python values (bytes, int, None, lists); an error reply is a value too,
a `ReplyError` instance, because in a pipeline one command's error is an answer for that
command only. A reply that is not RESP at all is the peer breaking the protocol:
`RespProtocolError`, after which the reader is dead (the stream cannot be resynchronised, so
its owner drops the connection). Misusing the API (an argument that is not bytes, str or
int) raises TypeError instead.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Sequence, Union

import hiredis

ReplyError = hiredis.ReplyError  # an error reply ("-ERR ...", "-NOSCRIPT ..."), given as a value

Arg = Union[bytes, bytearray, memoryview, str, int]

DEFAULT_MAX_REPLY = 64 << 20  # bytes buffered for one reply before it counts as broken


class RespProtocolError(Exception):
    """The peer sent something that is not RESP (or a reply larger than the reader's cap)."""


def _arg_bytes(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode("utf-8")
    if isinstance(arg, bool):  # a bool is an int to Python, but never what a caller meant here
        raise TypeError("a RESP argument is bytes, str or int, not bool")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, (bytearray, memoryview)):
        return bytes(arg)
    raise TypeError(f"a RESP argument is bytes, str or int, not {type(arg).__name__}")


def _encode_into(parts: List[bytes], args: Sequence[Arg]) -> None:
    if not args:
        raise ValueError("a command has at least one argument (its name)")
    parts.append(b"*%d\r\n" % len(args))
    for arg in args:
        data = _arg_bytes(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")


def encode_command(*args: Arg) -> bytes:
    """One command as RESP: `encode_command("SET", "k", 1)`."""
    parts: List[bytes] = []
    _encode_into(parts, args)
    return b"".join(parts)


def encode_pipeline(commands: Iterable[Sequence[Arg]]) -> bytes:
    """Several commands as one bytes object, in order (one write, replies in the same order)."""
    parts: List[bytes] = []
    for args in commands:
        _encode_into(parts, args)
    return b"".join(parts)


_INCOMPLETE = object()


class ReplyReader:
    """Bytes from Redis in (`feed`), complete replies out (`replies`), in order.

    `max_reply` caps what one reply may buffer: a peer that sends an endless bulk string is
    a broken peer, not a reason to grow without bound.
    """

    __slots__ = ("_reader", "_pending", "max_reply", "failed")

    def __init__(self, max_reply: int = DEFAULT_MAX_REPLY) -> None:
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        # Bytes fed since the last complete reply: what the reply under way holds, give or
        # take the tail of the read that completed the one before.
        self._pending = 0
        self.max_reply = max_reply
        self.failed = False

    def feed(self, data: bytes) -> None:
        if self.failed:
            raise RespProtocolError("the reader failed earlier; the connection must be dropped")
        self._reader.feed(data)
        self._pending += len(data)

    def replies(self) -> Iterator[Any]:
        """Every reply complete so far, oldest first; errors are `ReplyError` values."""
        reader = self._reader
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.failed = True
                raise RespProtocolError(str(exc)) from None
            if reply is _INCOMPLETE:
                if self._pending > self.max_reply:
                    self.failed = True
                    raise RespProtocolError(f"a reply of more than {self.max_reply} bytes")
                return
            self._pending = 0
            yield reply
