"""Smoke tests of the benchmark instrument: it must count right, whatever it measures.

The load generator never decodes JSON on its hot path, so these tests check its counting
against what the protocol implies: every `say` reaches every member of #lobby (the sender
too), so after the drain each member has exactly as many messages as were sent in all.
The frame scanner is also checked against the project's own decoder on random streams.
"""

from __future__ import annotations

import random
import sys

import pytest

from selchat.bench import loadgen
from selchat.bench.launcher import PEERS_DIR, RunningServer, ServerSpec
from selchat.doors.framed.codec import FrameDecoder, decode, encode

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the generator uses epoll and /proc")


@pytest.fixture(scope="module")
def asyncio_peer():
    spec = ServerSpec("asyncio", [sys.executable, str(PEERS_DIR / "asyncio_server.py")])
    with RunningServer(spec) as srv:
        yield srv


def _message(i: int, sid: int, ts: int, pad: int) -> dict:
    text = "~@" + chr(loadgen.SID_ALPHABET[sid]) + "%016d" % ts + "x" * pad
    return {"type": "message", "id": i, "ts": 1, "from": f"s{sid:04d}", "room": "#lobby", "text": text}


def test_scan_agrees_with_the_decoder_on_random_streams() -> None:
    rng = random.Random(4)
    for _ in range(200):
        objs = []
        for i in range(rng.randint(0, 60)):
            if rng.random() < 0.15:
                objs.append({"type": "join", "room": "#lobby", "nick": "n" * rng.randint(1, 30)})
            else:
                objs.append(_message(rng.choice([7, 70, 70000]), rng.randrange(3), rng.randrange(10**9), rng.choice([78, 78, 78, 90])))
        stream = b"".join(encode(o) for o in objs)
        # feed it in random pieces, as the network would
        buf = bytearray()
        frames = msgs = mine = 0
        samples: list = []
        cache: dict = {}
        countdown = 1
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 700)
            buf += stream[pos : pos + step]
            pos += step
            off, f, m, own, countdown = loadgen.scan(
                buf, 0, len(buf), loadgen.SID_ALPHABET[1], countdown, 3, 10**9, samples, cache
            )
            del buf[:off]
            frames, msgs, mine = frames + f, msgs + m, mine + own
        assert not buf
        dec = FrameDecoder()
        dec.feed(stream)
        ref = []
        while (payload := dec.next_frame()) is not None:
            ref.append(decode(payload))
        assert frames == len(ref)
        assert msgs == sum(o["type"] == "message" for o in ref)
        assert mine == sum(o["type"] == "message" and o["from"] == "s0001" for o in ref)
        expected = [
            10**9 - int(o["text"][3:19]) for i, o in enumerate(ref) if i % 3 == 0 and o["type"] == "message"
        ]
        assert samples == expected


def test_scan_refuses_a_broken_length() -> None:
    with pytest.raises(loadgen.BadFrame):
        loadgen.scan(bytearray(b"\x00\x00\x00\x00{}"), 0, 6, 0, 1, 0, 0, [], {})


def test_every_message_reaches_every_member(asyncio_peer: RunningServer) -> None:
    cfg = loadgen.LoadConfig(port=asyncio_peer.port, receivers=5, senders=2, duration=1.0, warmup=0.2, drain_quiet=0.2)
    res = loadgen.run_load(cfg)
    assert res.sent_total > 0
    assert res.errors == {} and res.dropped == 0
    # each message reaches all 7 members, the senders' own echoes included
    assert res.per_member_min == res.per_member_max == res.expected_per_member == res.sent_total
    assert res.lost == 0 and res.complete
    # inside the window, deliveries are the messages sent times the members, up to what was
    # in flight at the window's edges (at most `window` per sender at each edge)
    slack = 2 * cfg.window * cfg.senders * 7
    sent_in_window = res.sent_per_s * res.duration
    assert abs(res.deliveries - sent_in_window * 7) <= slack
    assert res.samples > 0 and res.p50_ms is not None and res.p50_ms >= 0
    assert 0 < res.gen_cpu < 2


def test_fixed_rate_is_offered(asyncio_peer: RunningServer) -> None:
    cfg = loadgen.LoadConfig(port=asyncio_peer.port, receivers=3, senders=2, duration=1.0, warmup=0.2, rate=100.0, drain_quiet=0.2)
    res = loadgen.run_load(cfg)
    assert res.complete and res.per_member_min == res.sent_total
    assert 80 <= res.sent_per_s <= 120
    assert res.samples == res.deliveries or abs(res.samples - res.deliveries) <= 5 * 5  # every message sampled


def test_idle_connections_register_and_extra_joins_are_counted(asyncio_peer: RunningServer) -> None:
    rss: dict = {}
    res = loadgen.run_idle("127.0.0.1", asyncio_peer.port, 40, lambda edge: rss.setdefault(edge, asyncio_peer.rss_kib()), extra_joins=5, workers=2)
    assert res.registered == 40
    assert res.extra_joins == 5
    assert res.join_frames == 5  # the asyncio peer only welcomes: one frame per joiner
    assert res.join_frames_old == 0
    assert set(rss) == {"before", "after"}
