"""A connection's outbound bytes: a queue of shared chunks and an offset into the first.

A broadcast appends the same `bytes` object to many buffers, so queuing costs no copy; a partial
send advances the offset instead of slicing the unsent tail (which would copy it every time).
All queued chunks go out in one `sendmsg` per flush, as a gather write.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from itertools import islice
from typing import Any, Deque, List

try:
    _IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError, AttributeError):  # pragma: no cover - not on Linux
    _IOV_MAX = 16


TLS_JOIN = 1 << 16  # bytes joined into one TLS write


class OutBuffer:
    __slots__ = ("chunks", "offset", "size")

    def __init__(self) -> None:
        self.chunks: Deque[bytes] = deque()
        self.offset = 0  # bytes of chunks[0] already sent
        self.size = 0  # unsent bytes in all

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def clear(self) -> None:
        self.chunks.clear()
        self.offset = 0
        self.size = 0

    def _send_joined(self, sock: socket.socket) -> int:
        total = 0
        chunks = self.chunks
        while self.size:
            if len(chunks) == 1 or len(chunks[0]) - self.offset >= TLS_JOIN:
                data: Any = memoryview(chunks[0])[self.offset :]
            else:
                # Each retry after a would-block joins at least what the last try did (the queue
                # only grows at its tail), which is what TLS asks of a retried write.
                parts = []
                size = 0
                for chunk in chunks:
                    parts.append(chunk)
                    size += len(chunk)
                    if size >= TLS_JOIN:
                        break
                data = b"".join(parts)[self.offset :]
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            self.consume(sent)
            total += sent
            if sent < len(data):
                break
        return total

    def pending(self, limit: int = _IOV_MAX) -> List[Any]:
        """Up to `limit` buffers ready for a gather write, the first one past the offset."""
        chunks = self.chunks
        # The chunks themselves go to sendmsg (any bytes-like will do); only a partly sent
        # first chunk needs a view past its offset.
        views: List[Any] = list(chunks) if len(chunks) <= limit else list(islice(chunks, limit))
        if self.offset:
            views[0] = memoryview(views[0])[self.offset :]
        return views

    def consume(self, sent: int) -> None:
        """Forget `sent` bytes from the front."""
        if sent == self.size:  # the usual case: everything went; no walk over the chunks
            self.chunks.clear()
            self.offset = 0
            self.size = 0
            return
        self.size -= sent
        chunks = self.chunks
        offset = self.offset + sent
        while chunks and offset >= len(chunks[0]):
            offset -= len(chunks.popleft())
        self.offset = offset if chunks else 0

    def send_to(self, sock: socket.socket, gather: bool = True) -> int:
        """Write as much as the socket takes without blocking; return bytes sent.

        `gather=False` is for TLS sockets, which have no `sendmsg`: up to TLS_JOIN bytes of
        chunks are joined into one `send` instead. Raises OSError (other than would-block,
        including TLS's want-read/want-write) for the caller to treat as a dead peer.
        """
        if not gather:
            return self._send_joined(sock)
        total = 0
        chunks = self.chunks
        while self.size:
            try:
                if len(chunks) == 1:
                    attempted = self.size
                    first = chunks[0]
                    sent = sock.send(memoryview(first)[self.offset :] if self.offset else first)
                else:
                    views = self.pending()
                    attempted = self.size if len(chunks) <= _IOV_MAX else sum(map(len, views))
                    sent = sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                break
            self.consume(sent)
            total += sent
            if sent < attempted:  # a short write: the kernel's buffer is full for now
                break
        return total
