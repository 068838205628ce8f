"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of one JSON object.

This module knows nothing of sockets, of the rest of the project, or of what the objects mean.
Two kinds of peer fault are kept apart because the server treats them differently:

* `FrameError`: the length prefix itself is wrong; the stream cannot be trusted any more.
* `PayloadError`: the frame boundary is intact but its bytes are not a JSON object with a
  string `type`; the connection can carry on with the next frame.

`EncodeError` is ours, not the peer's: we asked to send something that cannot be a frame.
"""

from __future__ import annotations

import json
import json.scanner
import re
from json import encoder as _json_encoder
import struct
from typing import Any, Dict, Optional

from selchat.defaults import MAX_FRAME

__all__ = [
    "HEADER",
    "FrameError",
    "PayloadError",
    "EncodeError",
    "FrameDecoder",
    "encode",
    "frame",
    "decode",
    "encode_json",
]

_LENGTH = struct.Struct(">I")
HEADER = _LENGTH.size
_COMPACT_AT = 1 << 16  # consumed bytes kept in front of the buffer before we shift them out


class FrameError(Exception):
    """The peer sent a length prefix that breaks the framing; `code` is the protocol error word."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PayloadError(Exception):
    """A well-framed payload that is not a JSON object with a string `type` (protocol word `bad_json`)."""

    code = "bad_json"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EncodeError(ValueError):
    """We tried to encode something that does not fit in a frame; a bug of the caller, not the peer."""


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, take complete payloads out.

    Bytes are appended to one buffer and read through an offset, so draining many frames
    costs no copying of the tail; consumed bytes are cut off the front only now and then.
    A length prefix is checked as soon as its four bytes are here, so a peer announcing a
    huge frame is refused before we buffer any of it.
    """

    __slots__ = ("max_frame", "_buf", "_pos")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be at least 1")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (an incomplete frame, if any)."""
        return len(self._buf) - self._pos

    @property
    def ready(self) -> bool:
        """`next_frame` has something to give: a whole frame, or a bad length to raise."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < HEADER:
            return False
        (length,) = _LENGTH.unpack_from(buf, pos)
        return length == 0 or length > self.max_frame or pos + HEADER + length <= len(buf)

    def clear(self) -> None:
        """Drop whatever is buffered (the connection is gone)."""
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if self._pos and (self._pos >= len(buf) or self._pos >= _COMPACT_AT):
            del buf[: self._pos]
            self._pos = 0
        buf += data

    def next_frame(self) -> Optional[bytes]:
        """Return the next complete payload, or None when more bytes are needed.

        Raises FrameError on a bad length prefix; the decoder is then unusable, as the stream is.
        """
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < HEADER:
            return None
        (length,) = _LENGTH.unpack_from(buf, pos)
        if length == 0:
            raise FrameError("bad_frame", "frame length 0 is not allowed")
        if length > self.max_frame:
            raise FrameError(
                "frame_too_large", f"frame length {length} exceeds max_frame {self.max_frame}"
            )
        end = pos + HEADER + length
        if end > len(buf):
            return None
        payload = bytes(buf[pos + HEADER : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return payload


def frame(payload: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """Prefix an already-encoded payload with its length."""
    n = len(payload)
    if not 1 <= n <= max_frame:
        raise EncodeError(f"payload of {n} bytes does not fit in a frame (1..{max_frame})")
    return _LENGTH.pack(n) + payload


def _make_dumps() -> Any:
    """A compact, UTF-8-friendly JSON writer made once, not per call.

    `json.dumps` with non-default options builds a new encoder on every call, which costs as
    much as the encoding of a chat message itself; the C encoder can be built once and reused
    (no circular-reference check: our frames are plain trees).
    """
    from json import encoder as _encoder

    make = getattr(_encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - Pythons without the C accelerator
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
    def not_json(value: Any) -> Any:
        raise TypeError(f"{type(value).__name__} is not JSON")

    c_encode = make(None, not_json, _encoder.encode_basestring, None, ":", ",", False, False, False)

    def dumps(obj: Any) -> str:
        if isinstance(obj, str):
            return _encoder.encode_basestring(obj)
        return "".join(c_encode(obj, 0))

    return dumps


_dumps = _make_dumps()


def encode_json(value: Any) -> bytes:
    """Any JSON value as the compact UTF-8 bytes a frame would carry (no length prefix)."""
    return _dumps(value).encode("utf-8")


# A str as a JSON string, as every frame writes it (`_dumps` uses the same function).
quote_json = _json_encoder.encode_basestring


def encode_payload(text: str, max_frame: int = MAX_FRAME) -> bytes:
    """A payload already written as JSON text (by template) as a complete frame."""
    try:
        payload = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate
        raise EncodeError(f"cannot encode frame: {exc}") from exc
    return frame(payload, max_frame)


def encode(obj: Dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """Encode one JSON object as a complete frame (prefix included)."""
    try:
        payload = _dumps(obj).encode("utf-8")
    except (TypeError, ValueError) as exc:  # not JSON-able, NaN, or a lone surrogate
        raise EncodeError(f"cannot encode frame: {exc}") from exc
    return frame(payload, max_frame)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Made once: `json.loads` with an option builds a new decoder per call.
_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_decode_json = _decoder.decode
# The decoder's C scanner, called directly for a payload that is one object and nothing else
# (every request of a well-behaved client): the same parse without `decode`'s two Python
# layers. Anything else (whitespace around it, garbage) takes `_decode_json`, which says why.
_scan = json.scanner.make_scanner(_decoder)

# A JSON escape that names half of a surrogate pair. Python's json accepts it and yields a str
# that cannot be written back as UTF-8, so such payloads are refused as not being valid text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def decode(payload: bytes) -> Dict[str, Any]:
    """Parse one payload into a dict that has a string `type`, or raise PayloadError."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload is not valid UTF-8") from None
    try:
        obj, end = _scan(text, 0) if text[:1] == "{" else (None, -1)
        if end != len(text):
            obj = _decode_json(text)
    except (StopIteration, ValueError, RecursionError):
        raise PayloadError("payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise PayloadError("payload is not a JSON object")
    if not isinstance(obj.get("type"), str):
        raise PayloadError("payload has no string member 'type'")
    if payload.find(b"\\u") >= 0 and _SURROGATE_ESCAPE.search(payload):
        try:
            lone = _has_lone_surrogate(obj)
        except RecursionError:
            lone = True
        if lone:
            raise PayloadError("payload holds an unpaired surrogate escape")
    return obj
