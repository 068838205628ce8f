"""Properties of the frame codec: round trips, any split of the stream, any garbage, the edges."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.doors.framed.codec import EncodeError, FrameDecoder, FrameError, PayloadError, decode, encode, frame

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
messages = st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(
    lambda d: {**d, "type": d.get("type") if isinstance(d.get("type"), str) else "x"}
)


def drain(decoder: FrameDecoder) -> list:
    frames = []
    while True:
        payload = decoder.next_frame()
        if payload is None:
            return frames
        frames.append(payload)


@given(messages)
def test_round_trip(obj: dict) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(obj))
    (payload,) = drain(decoder)
    assert decode(payload) == obj
    assert decoder.buffered == 0


@given(st.lists(messages, min_size=1, max_size=8), st.data())
def test_any_split_gives_the_same_frames(objs: list, data: st.DataObject) -> None:
    stream = b"".join(encode(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = FrameDecoder()
    got = []
    last = 0
    for cut in cuts + [len(stream)]:
        decoder.feed(stream[last:cut])
        got.extend(drain(decoder))
        last = cut
    assert [decode(p) for p in got] == objs


@given(st.binary(max_size=64), st.integers(1, 40))
def test_ready_says_whether_next_frame_has_something(stream: bytes, max_frame: int) -> None:
    """What a session asks before it takes a share of the pass for a request: True exactly
    when `next_frame` gives a frame or raises, never for part of a frame."""
    decoder = FrameDecoder(max_frame)
    for k in range(len(stream) + 1):
        if k:
            decoder.feed(stream[k - 1:k])
        while True:
            ready = decoder.ready
            try:
                got = decoder.next_frame()
            except FrameError:
                assert ready
                return
            assert ready == (got is not None)
            if got is None:
                break


def test_byte_by_byte_and_coalesced() -> None:
    objs = [{"type": "say", "n": i} for i in range(300)]
    stream = b"".join(encode(o) for o in objs)
    one = FrameDecoder()
    got = []
    for i in range(len(stream)):
        one.feed(stream[i : i + 1])
        got.extend(drain(one))
    assert [decode(p) for p in got] == objs
    together = FrameDecoder()
    together.feed(stream)
    assert [decode(p) for p in drain(together)] == objs


@settings(max_examples=300)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_garbage_raises_only_codec_errors(junk: bytes, max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    decoder.feed(junk)
    try:
        for payload in drain(decoder):
            try:
                decode(payload)
            except PayloadError as exc:
                assert exc.code == "bad_json"
    except FrameError as exc:
        assert exc.code in ("bad_frame", "frame_too_large")


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=200))
def test_decode_of_any_payload_is_a_dict_with_type_or_payload_error(payload: bytes) -> None:
    try:
        obj = decode(payload)
    except PayloadError:
        return
    assert isinstance(obj, dict) and isinstance(obj["type"], str)
    encode(obj)  # whatever we accept we can also write back as UTF-8


@pytest.mark.parametrize("max_frame", [1, 16, 65536])
def test_length_limits_at_their_edges(max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    decoder.feed(struct.pack(">I", max_frame) + b"x" * max_frame)
    assert decoder.next_frame() == b"x" * max_frame
    decoder.feed(struct.pack(">I", max_frame + 1))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code == "frame_too_large"


def test_length_zero_is_bad_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\0\0\0\0")
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code == "bad_frame"


def test_oversized_length_is_refused_before_its_payload_arrives() -> None:
    decoder = FrameDecoder(100)
    decoder.feed(struct.pack(">I", 10**9))
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_encoder_respects_max_frame() -> None:
    obj = {"type": "x", "t": "a" * 100}
    size = len(json.dumps(obj, separators=(",", ":")))
    assert len(encode(obj, max_frame=size)) == size + 4
    with pytest.raises(EncodeError):
        encode(obj, max_frame=size - 1)
    with pytest.raises(EncodeError):
        frame(b"")


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",  # not UTF-8
        b"{not json}",
        b"[1,2]",  # not an object
        b'{"kind":"say"}',  # no type
        b'{"type":7}',  # type not a string
        b'{"type":"x","v":NaN}',  # not RFC 8259
        b'{"type":"x","v":"\\ud800"}',  # a lone surrogate cannot become UTF-8 again
        b"[" * 100000,  # nesting deep enough to exhaust the recursion limit
        "\ufeff{\"type\":\"x\"}".encode("utf-8"),  # byte-order mark
        b'{"type":"x"} trailing',
    ],
)
def test_bad_payloads(payload: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(payload)


def test_paired_surrogate_escape_is_fine() -> None:
    assert decode(b'{"type":"x","e":"\\ud83d\\ude00"}')["e"] == "\U0001F600"
