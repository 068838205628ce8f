"""Integration tests: the real server process over loopback sockets, held to the protocol contract.

Section numbers in test names and docstrings (test_s1_...) are the contract's: 1 Frames,
2 Session, 3 Names, 4 Requests, 5 Events, 6 Liveness and limits, 7 History, 8 Access and abuse
limits, which are the headings of docs/protocol.md, in that order. Tests on the shared `server`
fixture are followed by a health check (see conftest.py): the server is alive, a client in no
room received nothing, and a new client can register. Tests that need options start their own
server with `start(...)`; a server that dies during such a test fails it.
"""

from __future__ import annotations

import json
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from conftest import ROOT, server_command, server_env, unique_nick, unique_room
from wire import ABSENT, ANY, LOBBY, Client, ConnectionClosed, encode, frame, matches

MAX_FRAME = 65536
MAX_TEXT = 4096


@pytest.fixture
def start(start_server):
    """A dedicated server with flood control (section 8) off and no per-address connection limit,
    since these tests send bursts on purpose and open many connections from 127.0.0.1."""

    def start_(*options: str):
        return start_server("--rate", "0", "--max-per-ip", "0", *options)

    return start_


def header(n: int) -> bytes:
    return struct.pack(">I", n)


def ping_payload_of_size(size: int, token: str = "big") -> bytes:
    """A ping of exactly `size` payload bytes, padded with a member the server must ignore."""
    base = b'{"type":"ping","token":"%s","pad":""}' % token.encode()
    payload = base[:-2] + b"p" * (size - len(base)) + b'"}'
    assert len(payload) == size
    return payload


def fold_sorted(nicks):
    return sorted(nicks, key=str.lower)


def lonely_client(server, nick=None):
    """A registered client in no room (it parted #lobby), so it hears nothing of others."""
    c = server.registered(nick)
    c.send(type="part", room=LOBBY)
    c.expect("part", room=LOBBY, nick=c.nick)
    return c


def crowd(srv, nicks, rooms=(), options=None):
    """Registered clients, all in #lobby and in `rooms`, with the setup traffic drained: from
    the return on, every event each of them receives is the test's to check.
    `options` maps a nick to extra Client arguments (e.g. a small receive buffer)."""
    options = options or {}
    clients = []
    for n in nicks:
        c = srv.client(label=n, **options.get(n, {}))
        c.register(n, names=None)  # a small --max-presence may make the lobby large meanwhile
        clients.append(c)
    for c in clients:
        c.barrier()
    for room in rooms:
        for c in clients:
            c.join(room, names=None)
        for c in clients:
            c.barrier()
    return clients


def pair_in_room(server, room=None):
    """Two registered clients sharing a fresh room; b's join already seen by a."""
    room = room or unique_room()
    a = server.registered()
    b = server.registered()
    a.expect("join", room=LOBBY, nick=b.nick)
    a.join(room)
    b.join(room)
    a.expect("join", room=room, nick=b.nick, ref=ABSENT)
    return a, b, room


# =================================================================================================
# Section 1: framing and bad input
# =================================================================================================


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "unregistered"])
def test_s1_zero_length_frame_gets_bad_frame_then_close(server, registered):
    room = unique_room()
    obs = server.registered()
    obs.join(room)
    bad = server.client()
    if registered:
        bad.register(unique_nick())
        obs.expect("join", room=LOBBY, nick=bad.nick)
        bad.join(room)
        obs.expect("join", room=room, nick=bad.nick)
    bad.send_raw(header(0))
    got = bad.assert_closed()
    assert [e.get("type") for e in got] == ["error"], got
    assert matches(got[0], "error", code="bad_frame"), got
    if registered:
        # Section 5 names the reason for this case: `protocol error`; sent once, not per room.
        obs.expect("quit", nick=bad.nick, reason="protocol error", ref=ABSENT)
    obs.assert_quiet()


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 0xFFFFFFFF])
def test_s1_oversized_frame_gets_frame_too_large_then_close(server, length):
    room = unique_room()
    obs = server.registered()
    obs.join(room)
    bad = server.registered()
    obs.expect("join", room=LOBBY, nick=bad.nick)
    bad.join(room)
    obs.expect("join", room=room, nick=bad.nick)
    # Only the header and a little of the announced payload: the server must not wait for the rest.
    bad.send_raw(header(length) + b'{"type":"ping"')
    got = bad.assert_closed()
    assert len(got) == 1 and matches(got[0], "error", code="frame_too_large"), got
    obs.expect("quit", nick=bad.nick, reason="protocol error")
    obs.assert_quiet()


def test_s1_frames_before_a_bad_length_are_served_then_error_then_close(server):
    c = server.registered()
    c.send_raw(encode({"type": "ping", "token": "first"}) + header(0) + encode({"type": "ping", "token": "never"}))
    got = c.assert_closed()
    assert len(got) == 2, got
    assert matches(got[0], "pong", token="first"), got
    assert matches(got[1], "error", code="bad_frame"), got


def test_s1_bad_json_between_good_frames_in_one_send(server):
    c = server.registered()
    c.send_raw(encode({"type": "ping", "token": 1}) + frame(b"{oops") + encode({"type": "ping", "token": 2}))
    c.expect("pong", token=1)
    c.expect_error("bad_json")
    c.expect("pong", token=2)
    c.assert_quiet()


def test_s1_frame_of_exactly_max_frame_is_accepted(server):
    c = server.registered()
    c.send_payload(ping_payload_of_size(MAX_FRAME, "exact"))
    c.expect("pong", token="exact")
    c.assert_quiet()


BAD_JSON = {
    "not_utf8": b"\xff\xfe\xfd",
    "truncated_utf8_in_string": b'{"type":"ping","token":"\xc3"}',
    "overlong_utf8": b'{"type":"\xc0\xafping"}',
    "utf8_encoded_surrogate": b'{"type":"ping","token":"\xed\xa0\x80"}',
    "not_json_word": b"hello",
    "truncated_object": b'{"type":"ping"',
    "trailing_comma": b'{"type":"ping",}',
    "single_quotes": b"{'type':'ping'}",
    "nan": b'{"type":"ping","token":NaN}',
    "infinity": b'{"type":"ping","token":-Infinity}',
    "two_values": b'{"type":"ping"} {"type":"ping"}',
    "raw_control_char_in_string": b'{"type":"ping","token":"a\x01b"}',
    "whitespace_only": b"   ",
    "nul_byte": b"\x00",
    "array": b'[{"type":"ping"}]',
    "string": b'"ping"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "empty_object": b"{}",
    "type_number": b'{"type":5}',
    "type_null": b'{"type":null}',
    "type_list": b'{"type":["ping"]}',
    "type_object": b'{"type":{"a":1}}',
    "type_bool": b'{"type":true}',
    "Type_capitalised_member": b'{"Type":"ping"}',
    "deeply_nested_array_unclosed": b"[" * 60000,
    "deeply_nested_object_unclosed": b'{"type":"ping","a":' + b'{"a":' * 12000,
}


@pytest.mark.parametrize("payload", list(BAD_JSON.values()), ids=list(BAD_JSON))
def test_s1_bad_json_is_answered_and_connection_kept(server, payload):
    c = server.registered()
    c.send_payload(payload)
    c.expect_error("bad_json")
    # The frame boundary was intact: the very next frame is served, and the client is still registered.
    c.send(type="ping", token="after", ref="r1")
    c.expect("pong", token="after", ref="r1")
    c.send(type="say", room=LOBBY, text="still here")
    c.expect("message", room=LOBBY, text="still here", **{"from": c.nick})
    c.assert_quiet()


def test_s1_bad_json_before_hello_is_answered_and_connection_kept(server):
    c = server.client()
    c.send_payload(b"{nope")
    c.expect_error("bad_json")
    c.register(unique_nick())


def test_s1_valid_but_deeply_nested_json_does_not_harm_the_server(server):
    """RFC 8259 lets a parser limit nesting depth: either answer is fine, a crash is not."""
    c = server.registered()
    c.send_payload(b'{"type":"ping","token":"deep","x":' + b"[" * 30000 + b"]" * 30000 + b"}")
    ev = c.recv_event()
    assert matches(ev, "pong", token="deep") or matches(ev, "error", code="bad_json"), ev
    c.assert_quiet()


@pytest.mark.parametrize("kind", ["frobnicate", "", "PING", "Say", "welcome", "message", "notice", "error", "names"])
def test_s1_unknown_type_is_answered_and_connection_kept(server, kind):
    c = server.registered()
    c.send(type=kind, ref="u1")
    c.expect_error("unknown_type", ref="u1")
    c.send(type=kind, ref=77, room=LOBBY, text="x")
    c.expect_error("unknown_type", ref=77)
    c.assert_quiet()


def test_s1_unknown_type_before_hello(server):
    c = server.client()
    c.send(type="frobnicate", ref=5)
    c.expect_error("unknown_type", ref=5)
    c.register(unique_nick())


def test_s1_unknown_members_are_ignored(server):
    c = server.registered()
    c.send(type="ping", token="t", future={"x": [1, 2, None]}, flag=True)
    c.expect("pong", token="t")
    c.send(type="say", room=LOBBY, text="hi", priority=9, extra=None)
    c.expect("message", room=LOBBY, text="hi")


BAD_REQUESTS = {
    "say_no_room": {"type": "say", "text": "hi"},
    "say_no_text": {"type": "say", "room": LOBBY},
    "say_room_int": {"type": "say", "room": 5, "text": "hi"},
    "say_room_null": {"type": "say", "room": None, "text": "hi"},
    "say_text_list": {"type": "say", "room": LOBBY, "text": ["hi"]},
    "say_text_int": {"type": "say", "room": LOBBY, "text": 3},
    "msg_no_to": {"type": "msg", "text": "hi"},
    "msg_no_text": {"type": "msg", "to": "someone"},
    "msg_to_int": {"type": "msg", "to": 5, "text": "hi"},
    "msg_text_object": {"type": "msg", "to": "someone", "text": {"a": 1}},
    "join_no_room": {"type": "join"},
    "join_room_list": {"type": "join", "room": ["#a"]},
    "part_no_room": {"type": "part"},
    "part_room_int": {"type": "part", "room": 1},
    "nick_no_nick": {"type": "nick"},
    "nick_nick_int": {"type": "nick", "nick": 1},
    "nick_nick_null": {"type": "nick", "nick": None},
    "who_no_room": {"type": "who"},
    "who_room_bool": {"type": "who", "room": True},
    "quit_reason_int": {"type": "quit", "reason": 5},
    "quit_reason_list": {"type": "quit", "reason": ["bye"]},
}


@pytest.mark.parametrize("request_obj", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_s1_bad_request_is_answered_and_connection_kept(server, request_obj):
    room = unique_room()
    obs = server.registered()
    obs.join(room)
    c = server.registered()
    obs.expect("join", room=LOBBY, nick=c.nick)
    c.join(room)
    obs.expect("join", room=room, nick=c.nick)
    c.send(request_obj, ref="bad-1")
    c.expect_error("bad_request", ref="bad-1")
    c.send(type="ping", token="after")
    c.expect("pong", token="after")
    c.assert_quiet()
    obs.assert_quiet()  # nothing was carried out (no quit, no message, no nick)


BAD_HELLOS = {
    "hello_no_nick": {"type": "hello"},
    "hello_nick_int": {"type": "hello", "nick": 5},
    "hello_nick_list": {"type": "hello", "nick": ["a"]},
    "hello_client_int": {"type": "hello", "nick": "okname", "client": 5},
}


@pytest.mark.parametrize("request_obj", list(BAD_HELLOS.values()), ids=list(BAD_HELLOS))
def test_s1_bad_hello_is_bad_request_and_connection_kept(server, request_obj):
    c = server.client()
    c.send(request_obj, ref=9)
    c.expect_error("bad_request", ref=9)
    c.register(unique_nick())


@pytest.mark.parametrize("ref", [1.5, True, False, None, [1], {"a": 1}], ids=["float", "true", "false", "null", "list", "object"])
def test_s4_ref_of_other_type_is_bad_request(server, ref):
    a, b, room = pair_in_room(server)
    a.send(type="ping", token="t", ref=ref)
    a.expect_error("bad_request")
    a.send(type="say", room=room, text="should not be said", ref=ref)
    a.expect_error("bad_request")
    a.assert_quiet()
    b.assert_quiet()  # the refused say was not carried out


@pytest.mark.parametrize("cut", ["header", "payload"])
def test_s1_peer_closes_mid_frame_registered(server, cut):
    a, b, room = pair_in_room(server)
    data = encode({"type": "say", "room": room, "text": "never finished"})
    b.send_raw(data[:2] if cut == "header" else data[:-3])
    b.close()
    a.expect("quit", nick=b.nick, reason="connection closed", ref=ABSENT)
    a.assert_quiet()


def test_s1_peer_resets_connection(server):
    """A reset (RST) instead of a clean close: others see `quit` `connection closed`."""
    a, b, room = pair_in_room(server)
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.send_raw(encode({"type": "say", "room": room, "text": "cut"})[:5])
    b.close()
    a.expect("quit", nick=b.nick, reason="connection closed")
    a.assert_quiet()


def test_s1_peer_closes_mid_frame_unregistered(server):
    a = server.registered()
    b = server.client()
    b.send_raw(encode({"type": "hello", "nick": unique_nick()})[:-1])
    b.close()
    a.assert_quiet()


def test_s1_frame_sent_byte_by_byte(server):
    """Every split must be handled: one byte per send, with a round trip on another connection
    between bytes so the server's loop runs in between (no sleeps)."""
    other = lonely_client(server)
    c = server.registered()
    text = "héllo wörld 😀 ✓"  # multi-byte UTF-8 split across reads
    data = encode({"type": "say", "room": LOBBY, "text": text, "ref": "bb"})
    data += encode({"type": "ping", "token": "tail", "ref": 2})
    for i in range(len(data)):
        c.send_raw(data[i : i + 1])
        other.send(type="ping", token=i)
        other.expect("pong", token=i)
    c.expect("message", room=LOBBY, text=text, ref="bb", **{"from": c.nick})
    c.expect("pong", token="tail", ref=2)
    c.assert_quiet()
    other.assert_quiet()


def test_s1_many_frames_in_one_send_answered_in_order(server):
    c = server.registered()
    want = []
    blob = bytearray()
    for i in range(600):
        if i % 100 == 50:
            blob += encode({"type": "say", "room": LOBBY, "text": f"m{i}", "ref": i})
            want.append(("message", i))
        else:
            blob += encode({"type": "ping", "token": i})
            want.append(("pong", i))
    c.send_raw(bytes(blob))
    for kind, i in want:
        if kind == "pong":
            c.expect("pong", token=i, ref=ABSENT)
        else:
            c.expect("message", text=f"m{i}", ref=i)
    c.assert_quiet()


def test_s1_frames_split_at_random_points_answered_in_order(server):
    c = server.registered()
    other = server.registered()
    c.expect("join", room=LOBBY, nick=other.nick)
    blob = b"".join(encode({"type": "ping", "token": f"t{i}", "ref": i}) for i in range(300))
    rng = random.Random(1234)
    pos = 0
    while pos < len(blob):
        n = rng.choice([1, 2, 3, 5, 7, 11, 64, 333, 1000])
        c.send_raw(blob[pos : pos + n])
        pos += n
        if rng.random() < 0.2:
            other.assert_quiet()  # lets the server's loop run between pieces
    for i in range(300):
        c.expect("pong", token=f"t{i}", ref=i)
    c.assert_quiet()


# =================================================================================================
# Section 2: session
# =================================================================================================

PRE_HELLO_REQUESTS = [
    {"type": "say", "room": LOBBY, "text": "hi"},
    {"type": "msg", "to": "someone", "text": "hi"},
    {"type": "join", "room": "#x"},
    {"type": "part", "room": LOBBY},
    {"type": "nick", "nick": "newnick"},
    {"type": "who", "room": LOBBY},
    {"type": "rooms"},
    {"type": "history", "room": LOBBY},
]


def test_s2_requests_before_hello_get_not_registered(server):
    c = server.client()
    for i, req in enumerate(PRE_HELLO_REQUESTS):
        c.send(req, ref=f"pre{i}")
        c.expect_error("not_registered", ref=f"pre{i}")
    c.register(unique_nick())  # the connection is still good


def test_s2_ping_and_pong_served_before_hello(server):
    c = server.client()
    c.send(type="ping", token="early", ref="p")
    c.expect("pong", token="early", ref="p")
    c.send(type="pong", token="unsolicited")
    c.assert_quiet()  # a pong gets no reply
    c.register(unique_nick())


def test_s2_quit_before_hello_closes(server):
    obs = server.registered()
    c = server.client()
    c.send(type="quit", reason="changed my mind")
    got = c.assert_closed()
    assert got == [], got
    obs.assert_quiet()


def test_s2_handshake_timeout_closes(start):
    srv = start("--handshake-timeout", "0.5")
    reg = srv.registered()
    t0 = time.monotonic()
    silent = srv.client()
    chatty = srv.client()  # pings, but never says hello: still closed
    chatty.send(type="ping", token=1)
    chatty.expect("pong", token=1)
    got = silent.assert_closed(3.0)
    elapsed = time.monotonic() - t0
    assert got == [], got
    assert elapsed >= 0.4, f"closed after {elapsed:.2f}s, before the handshake timeout"
    got = chatty.assert_closed(3.0)
    assert all(e.get("type") != "welcome" for e in got), got
    # A registered client is not subject to the handshake timeout.
    reg.send(type="ping", token="alive")
    reg.expect("pong", token="alive")


def test_s2_nick_taken_is_case_insensitive_and_retry_works(server):
    base = unique_nick("Alice")
    a = server.registered(base)
    b = server.client()
    b.send(type="hello", nick=base.upper(), ref="h1")
    b.expect_error("nick_taken", ref="h1")
    b.send(type="hello", nick=base.lower(), ref="h2")
    b.expect_error("nick_taken", ref="h2")
    a.assert_quiet()
    chosen = unique_nick("MiXeD")
    b.register(chosen, ref="h3")  # welcome keeps the spelling the user chose
    a.expect("join", room=LOBBY, nick=chosen, ref=ABSENT)


def test_s2_bad_nick_then_retry(server):
    c = server.client()
    for i, nick in enumerate(["1abc", "", "-x", "a b", "x" * 33]):
        c.send(type="hello", nick=nick, ref=i)
        c.expect_error("bad_nick", ref=i)
    c.register(unique_nick())


def test_s2_welcome_fields_default_limits(server):
    c = server.client()
    w = c.register(unique_nick())
    assert isinstance(w.get("server"), str) and "/" in w["server"], f"server is not name/version: {w!r}"
    assert isinstance(w.get("motd"), str), w
    limits = w.get("limits")
    assert isinstance(limits, dict), w
    assert limits.get("max_frame") == MAX_FRAME and limits.get("max_text") == MAX_TEXT, w
    assert type(limits["max_frame"]) is int and type(limits["max_text"]) is int


def test_s2_welcome_fields_configured_limits(start):
    srv = start("--max-frame", "70000", "--max-text", "2000", "--motd", "Hello there, testers")
    c = srv.client()
    w = c.register("tester", ref=1)
    assert w["nick"] == "tester" and w["ref"] == 1
    assert w["motd"] == "Hello there, testers"
    assert w["limits"]["max_frame"] == 70000 and w["limits"]["max_text"] == 2000, w
    # ...and the announced limits are the ones in force.
    c.send(type="say", room=LOBBY, text="y" * 2000)
    c.expect("message", text="y" * 2000)
    c.send(type="say", room=LOBBY, text="y" * 2001)
    c.expect_error("bad_text")
    c.send_payload(ping_payload_of_size(70000, "t70k"))
    c.expect("pong", token="t70k")


def test_s2_every_lobby_member_gets_join(start):
    srv = start()
    a = srv.registered("Anna")
    b = srv.client()
    b.register("bert")
    a.expect("join", room=LOBBY, nick="bert")
    c = srv.client()
    c.send(type="hello", nick="Carl")
    c.expect("welcome", nick="Carl")
    c.expect("join", room=LOBBY, nick="Carl")
    names = c.expect_names(LOBBY)
    assert names == ["Anna", "bert", "Carl"]
    c.expect("history", room=LOBBY)
    a.expect("join", room=LOBBY, nick="Carl")
    b.expect("join", room=LOBBY, nick="Carl")
    for x in (a, b, c):
        x.assert_quiet()


def test_s2_second_hello_is_already_registered(server):
    a, b, room = pair_in_room(server)
    a.send(type="hello", nick=unique_nick(), ref="again")
    a.expect_error("already_registered", ref="again")
    a.send(type="say", room=room, text="same me")
    a.expect("message", text="same me", **{"from": a.nick})
    b.expect("message", text="same me", **{"from": a.nick})
    a.assert_quiet()
    b.assert_quiet()


# =================================================================================================
# Section 3: names and text
# =================================================================================================

GOOD_NICKS = [
    "n" * 32, "Z", "_", "[", "]x", "{}", "\\", "|", "^", "a-b", "x0123456789",
    "A_-[]{}\\|^z", "_9",
]
BAD_NICKS = [
    "m" * 33, "1abc", "-abc", "", " ", "a b", "é", "ab.c", "a#b", "a\n", "a@b", "a!b", "ａ",
    "ab\u0000", "a/b", "a'b", '"a', "a,b", "a:b", "9",
]


@pytest.mark.parametrize("nick", GOOD_NICKS)
def test_s3_valid_nick_accepted(server, nick):
    c = server.client()
    c.register(nick, ref="ok")


@pytest.mark.parametrize("nick", BAD_NICKS, ids=[repr(n)[:20] for n in BAD_NICKS])
def test_s3_invalid_nick_rejected(server, nick):
    c = server.client()
    c.send(type="hello", nick=nick, ref="bad")
    c.expect_error("bad_nick", ref="bad")
    a = server.registered()
    a.send(type="nick", nick=nick, ref="bad2")
    a.expect_error("bad_nick", ref="bad2")
    a.assert_quiet()


def test_s3_nick_change_edges(server):
    a = server.registered()
    for i, bad in enumerate(["q" * 33, "9x", "-x"]):
        a.send(type="nick", nick=bad, ref=i)
        a.expect_error("bad_nick", ref=i)
    new = unique_nick("L").ljust(32, "l")
    a.send(type="nick", nick=new, ref="ok")
    a.expect("nick", old=a.nick, new=new, ref="ok")


GOOD_ROOMS = ["#" + "r" * 50, "#a", "#A-_9z", "#-", "#_", "#0"]
BAD_ROOMS = ["#" + "s" * 51, "#", "lobby", "##a", "#a b", "#é", "#a.b", "#a[b", "&a", "", " #a", "#a\n", "#a,b"]


@pytest.mark.parametrize("room", GOOD_ROOMS)
def test_s3_valid_room_accepted(server, room):
    c = server.registered()
    c.send(type="join", room=room, ref="j")
    c.expect("join", room=room, nick=c.nick, ref="j")
    c.expect_names(room, ref="j")
    c.expect("history", room=room, ref="j")


@pytest.mark.parametrize("room", BAD_ROOMS, ids=[repr(r)[:20] for r in BAD_ROOMS])
def test_s3_invalid_room_rejected(server, room):
    c = server.registered()
    for i, req in enumerate([
        {"type": "join", "room": room},
        {"type": "part", "room": room},
        {"type": "who", "room": room},
        {"type": "say", "room": room, "text": "hi"},
    ]):
        c.send(req, ref=i)
        c.expect_error("bad_room", ref=i)
    c.assert_quiet()


def test_s3_room_is_case_insensitive_first_spelling_kept(server):
    base = unique_room("CaseRoom")
    a = server.registered()
    b = server.registered()
    a.expect("join", room=LOBBY, nick=b.nick)
    a.join(base)
    b.send(type="join", room=base.upper())
    b.expect("join", room=base, nick=b.nick)
    assert b.expect_names(base) == fold_sorted([a.nick, b.nick])
    b.expect("history", room=base)
    a.expect("join", room=base, nick=b.nick)
    b.send(type="say", room=base.lower(), text="any case")
    a.expect("message", room=base, text="any case")
    b.expect("message", room=base, text="any case")
    a.send(type="who", room=base.swapcase(), ref=1)
    a.expect("names", room=base, ref=1, more=False)
    a.send(type="rooms", ref=2)
    rooms = a.expect("rooms", ref=2)["rooms"]
    assert [r for r in rooms if r["name"].lower() == base.lower()] == [{"name": base, "members": 2}]
    # The room goes when its last member leaves; the next first joiner's spelling is kept.
    a.send(type="part", room=base.upper())
    a.expect("part", room=base, nick=a.nick)
    b.expect("part", room=base, nick=a.nick)
    b.send(type="part", room=base)
    b.expect("part", room=base, nick=b.nick)
    new_spelling = base.lower()
    a.send(type="join", room=new_spelling)
    a.expect("join", room=new_spelling, nick=a.nick)


BAD_TEXTS = {
    "empty": "",
    "space": " ",
    "whitespace_mix": "  \n\t  \n",
    "unicode_whitespace_only": "\u00a0\u2003\u3000",
    "too_long": "a" * (MAX_TEXT + 1),
    "too_long_astral": "😀" * (MAX_TEXT + 1),
}
for _c in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)):
    if chr(_c) not in "\n\t":
        BAD_TEXTS[f"U+{_c:04X}"] = f"a{chr(_c)}b"


@pytest.mark.parametrize("text", list(BAD_TEXTS.values()), ids=list(BAD_TEXTS))
def test_s3_bad_text_rejected_in_say_and_msg(server, text):
    a, b, room = pair_in_room(server)
    a.send(type="say", room=room, text=text, ref="s")
    a.expect_error("bad_text", ref="s")
    a.send(type="msg", to=b.nick, text=text, ref="m")
    a.expect_error("bad_text", ref="m")
    a.assert_quiet()
    b.assert_quiet()  # nothing reached the other user


GOOD_TEXTS = {
    "max_text_ascii": "a" * MAX_TEXT,
    "max_text_astral_code_points": "😀" * MAX_TEXT,
    "max_text_two_byte": "é" * MAX_TEXT,
    "newline_and_tab": "line one\n\tline two",
    "surrounding_space_kept": "  hi  ",
    "single_char": "x",
    "json_specials": 'quote " backslash \\ slash /',
    "u00a0_after_controls": "a\u00a0b",  # first code point after the C1 range
    "line_separator": "a\u2028b",
}


@pytest.mark.parametrize("text", list(GOOD_TEXTS.values()), ids=list(GOOD_TEXTS))
def test_s3_good_text_carried_exactly(server, text):
    a, b, room = pair_in_room(server)
    a.send(type="say", room=room, text=text)
    a.expect("message", room=room, text=text)
    b.expect("message", room=room, text=text)
    a.send(type="msg", to=b.nick, text=text)
    a.expect("message", to=b.nick, text=text)
    b.expect("message", to=b.nick, text=text)


# =================================================================================================
# Section 4: requests
# =================================================================================================


def test_s4_ref_copied_to_requester_only(server):
    room = unique_room()
    a = server.registered()
    b = server.client()
    b.register(unique_nick(), ref="hello-ref")  # welcome, join, names, history all carry it
    a.expect("join", room=LOBBY, nick=b.nick, ref=ABSENT)
    b.join(room)
    # join: own join, names and history carry ref; the other member's copy does not.
    a.send(type="join", room=room, ref="j1")
    a.expect("join", room=room, nick=a.nick, ref="j1")
    assert set(a.expect_names(room, ref="j1")) == {a.nick, b.nick}
    a.expect("history", room=room, ref="j1")
    b.expect("join", room=room, nick=a.nick, ref=ABSENT)
    # say
    a.send(type="say", room=room, text="hi", ref=5)
    a.expect("message", room=room, text="hi", ref=5)
    b.expect("message", room=room, text="hi", ref=ABSENT)
    # msg
    a.send(type="msg", to=b.nick, text="psst", ref="m")
    a.expect("message", to=b.nick, text="psst", ref="m")
    b.expect("message", to=b.nick, text="psst", ref=ABSENT)
    # who, rooms, ping
    a.send(type="who", room=room, ref=1)
    a.expect("names", room=room, ref=1)
    a.send(type="rooms", ref="rr")
    a.expect("rooms", ref="rr")
    a.send(type="ping", token="tk", ref=-3)
    a.expect("pong", token="tk", ref=-3)
    # nick
    new = unique_nick("N")
    a.send(type="nick", nick=new, ref="n")
    a.expect("nick", old=a.nick, new=new, ref="n")
    b.expect("nick", old=a.nick, new=new, ref=ABSENT)
    a.nick = new
    # errors
    a.send(type="say", room=unique_room(), text="x", ref="e1")
    a.expect_error("not_in_room", ref="e1")
    a.send(type="msg", to=unique_nick("ghost"), text="x", ref=404)
    a.expect_error("no_such_nick", ref=404)
    # part
    a.send(type="part", room=room, ref="p")
    a.expect("part", room=room, nick=a.nick, ref="p")
    b.expect("part", room=room, nick=a.nick, ref=ABSENT)
    # quit: the others' copy never carries it
    a.send(type="quit", reason="done", ref="q")
    assert a.assert_closed() == []
    b.expect("quit", nick=a.nick, reason="done", ref=ABSENT)
    b.assert_quiet()


@pytest.mark.parametrize("ref", [0, -1, 2**53 - 1, -(2**53) + 1, 2**63 - 1, "", "x" * 200, "é✓😀", "0"], ids=str)
def test_s4_ref_values_echoed_exactly(server, ref):
    c = server.registered()
    c.send(type="ping", token="t", ref=ref)
    c.expect("pong", token="t", ref=ref)
    c.send(type="rooms", ref=ref)
    c.expect("rooms", ref=ref)


@pytest.mark.parametrize("ref", ["L" * 1000, 2**64, -(2**70)], ids=["string_1000", "int_2_64", "int_minus_2_70"])
def test_s4_any_string_or_integer_ref_echoed(server, ref):
    """Section 4: `ref` is 'a string or integer chosen by the client; any other type is
    bad_request'. The page sets no length or range; a server bound would need to be written
    into the contract first."""
    c = server.registered()
    c.send(type="ping", token="t", ref=ref)
    c.expect("pong", token="t", ref=ref)


def test_s4_join_noop_still_answers_names(server):
    a, b, room = pair_in_room(server)
    a.send(type="join", room=room.upper(), ref="again")
    names = a.expect_names(room, ref="again")
    assert names == fold_sorted([a.nick, b.nick])
    a.assert_quiet()  # no join, no history
    b.assert_quiet()  # nobody else hears of it


def test_s4_part_and_not_in_room(server):
    a, b, room = pair_in_room(server)
    a.send(type="part", room=room)
    a.expect("part", room=room, nick=a.nick)
    b.expect("part", room=room, nick=a.nick)
    a.send(type="say", room=room, text="hello?", ref=1)
    a.expect_error("not_in_room", ref=1)
    a.send(type="part", room=room, ref=2)
    a.expect_error("not_in_room", ref=2)
    a.send(type="part", room=unique_room("never"), ref=3)
    a.expect_error("not_in_room", ref=3)
    b.send(type="who", room=room)
    assert b.expect_names(room) == [b.nick]
    # The last member leaves: the room no longer exists.
    b.send(type="part", room=room)
    b.expect("part", room=room, nick=b.nick)
    b.send(type="rooms")
    assert all(r["name"].lower() != room.lower() for r in b.expect("rooms")["rooms"])
    b.send(type="who", room=room)
    b.expect("names", room=room, nicks=[], more=False)
    a.assert_quiet()
    b.assert_quiet()


def test_s4_nick_change_seen_by_everyone_sharing_a_room(server):
    r1, r2 = unique_room(), unique_room()
    a, b, c, d = (lonely_client(server) for _ in range(4))
    a.join(r1)
    a.join(r2)
    b.join(r1)
    a.expect("join", room=r1, nick=b.nick)
    b.join(r2)
    a.expect("join", room=r2, nick=b.nick)
    c.join(r2)
    a.expect("join", room=r2, nick=c.nick)
    b.expect("join", room=r2, nick=c.nick)
    old, new = a.nick, unique_nick("Renamed")
    a.send(type="nick", nick=new)
    a.expect("nick", old=old, new=new)
    b.expect("nick", old=old, new=new)  # once, though b shares two rooms with a
    c.expect("nick", old=old, new=new)
    for x in (a, b, c, d):
        x.assert_quiet()  # d shares no room: nothing
    a.nick = new
    # The new nick is in use, the old one is free.
    c.send(type="msg", to=new, text="hi new")
    c.expect("message", to=new, text="hi new")
    a.expect("message", to=new, text="hi new", **{"from": c.nick})
    c.send(type="msg", to=old, text="hi old", ref="o")
    c.expect_error("no_such_nick", ref="o")
    b.send(type="who", room=r1)
    assert b.expect_names(r1) == fold_sorted([new, b.nick])
    d.send(type="nick", nick=new.upper(), ref="t")
    d.expect_error("nick_taken", ref="t")
    e = server.client()
    e.register(old)  # the old nick is free for someone else
    for x in (a, b, c, d):
        x.assert_quiet()


def test_s4_nick_change_to_own_nick_in_other_case(server):
    """Ambiguous in the contract; the user's own nick does not make it 'taken'."""
    a = server.registered(unique_nick("casey"))
    new = a.nick.upper()
    a.send(type="nick", nick=new, ref=1)
    a.expect("nick", old=a.nick, new=new, ref=1)


def test_s4_who_and_rooms(start):
    srv = start()
    a = srv.registered("ann")
    b = srv.registered("Bob")
    a.expect("join", room=LOBBY, nick="Bob")
    a.join("#Dev")
    b.join("#dev")
    a.expect("join", room="#Dev", nick="Bob")
    b.join("#other")
    for who_asks in (a, b):
        who_asks.send(type="who", room="#DEV", ref="w")
        assert who_asks.expect_names("#Dev", ref="w") == ["ann", "Bob"]
    # who from a non-member works too; a room that does not exist is empty
    a.send(type="who", room="#other")
    assert a.expect_names("#other") == ["Bob"]
    a.send(type="who", room="#Nowhere", ref=7)
    a.expect("names", room="#Nowhere", nicks=[], more=False, ref=7)
    a.send(type="rooms", ref="r")
    rooms = a.expect("rooms", ref="r")["rooms"]
    assert sorted(rooms, key=lambda r: r["name"].lower()) == [
        {"name": "#Dev", "members": 2},
        {"name": "#lobby", "members": 2},
        {"name": "#other", "members": 1},
    ]
    # #lobby always exists, even empty.
    a.send(type="part", room=LOBBY)
    a.expect("part", room=LOBBY, nick="ann")
    b.expect("part", room=LOBBY, nick="ann")
    b.send(type="part", room=LOBBY)
    b.expect("part", room=LOBBY, nick="Bob")
    a.send(type="rooms")
    rooms = a.expect("rooms")["rooms"]
    assert {"name": "#lobby", "members": 0} in rooms, rooms
    a.send(type="who", room=LOBBY)
    a.expect("names", room=LOBBY, nicks=[], more=False)


@pytest.mark.parametrize("token", ["abc", 123, 0, "", -7, "é😀"], ids=repr)
def test_s4_ping_token_echoed(server, token):
    c = server.registered()
    c.send(type="ping", token=token, ref="p")
    c.expect("pong", token=token, ref="p")


def test_s4_long_ping_token_echoed(server):
    """Section 4: 'answer pong with the same token'; the page sets no type or length for it."""
    c = server.registered()
    token = "T" * 1000
    c.send(type="ping", token=token)
    c.expect("pong", token=token)


def test_s4_ping_without_token(server):
    c = server.registered()
    c.send(type="ping", ref=1)
    ev = c.expect("pong", ref=1)
    assert ev.get("token") is None, ev


def test_s4_pong_gets_no_reply(server):
    c = server.registered()
    c.send(type="pong", token="whatever", ref=3)
    c.send(type="pong")
    c.assert_quiet()


def test_s4_quit_with_reason_flushes_then_closes(server):
    a, b, room = pair_in_room(server)
    # A message and the quit in one send: the echo queued before the quit must still arrive.
    a.send_raw(
        encode({"type": "say", "room": room, "text": "last words", "ref": 1})
        + encode({"type": "quit", "reason": "bye now", "ref": 2})
    )
    got = a.assert_closed()
    assert len(got) == 1 and matches(got[0], "message", text="last words", ref=1), got
    b.expect("message", room=room, text="last words")
    b.expect("quit", nick=a.nick, reason="bye now", ref=ABSENT)  # once, though two rooms shared
    b.assert_quiet()


def test_s4_nothing_is_served_after_quit(server):
    a, b, room = pair_in_room(server)
    a.send_raw(encode({"type": "quit", "reason": "off"}) + encode({"type": "say", "room": room, "text": "ghost"}))
    assert a.assert_closed() == []
    b.expect("quit", nick=a.nick, reason="off")
    b.assert_quiet()


def test_s4_quit_without_reason(server):
    a, b, room = pair_in_room(server)
    a.send(type="quit")
    assert a.assert_closed() == []
    b.expect("quit", nick=a.nick, reason="quit")
    b.assert_quiet()


@pytest.mark.parametrize("reason", ["\x1b[2Jgotcha", "", "   ", "a\x85b"], ids=["escape", "empty", "blank", "C1"])
def test_s4_quit_reason_follows_text_rules(server, reason):
    """Section 5: the user's own reason follows the text rules. A bad one must never reach
    others as is; the server refuses it (bad_text, connection kept)."""
    a, b, room = pair_in_room(server)
    a.send(type="quit", reason=reason, ref="q")
    a.expect_error("bad_text", ref="q")
    a.assert_quiet()
    b.assert_quiet()


def test_s4_quit_reason_up_to_max_text(server):
    """The reason follows the text rules: up to max_text code points."""
    a, b, room = pair_in_room(server)
    reason = "r" * 1000
    a.send(type="quit", reason=reason, ref="q")
    got = a.assert_closed()
    assert got == [], got
    b.expect("quit", nick=a.nick, reason=reason)


# =================================================================================================
# Section 5: events
# =================================================================================================


def test_s5_message_fields_ids_and_timestamps(server):
    a, b, room = pair_in_room(server)
    room2 = unique_room()
    a.join(room2)
    b.join(room2)
    a.expect("join", room=room2, nick=b.nick)
    ids = []
    plan = [(a, "say", room), (b, "say", room), (a, "say", room2), (a, "msg", b.nick), (b, "msg", a.nick), (b, "say", room2)]
    for i, (sender, kind, where) in enumerate(plan):
        other = b if sender is a else a
        text = f"text {i}"
        before = int(time.time() * 1000)
        if kind == "say":
            sender.send(type="say", room=where, text=text)
        else:
            sender.send(type="msg", to=where, text=text)
        mine = sender.expect("message", text=text)
        theirs = other.expect("message", text=text)
        after = int(time.time() * 1000)
        for ev in (mine, theirs):
            assert type(ev["id"]) is int and type(ev["ts"]) is int, ev
            assert before - 2000 <= ev["ts"] <= after + 2000, (before, ev, after)
            assert ev["from"] == sender.nick
            if kind == "say":
                assert ev["room"] == where and "to" not in ev, ev
            else:
                assert ev["to"] == where and "room" not in ev, ev
        assert mine["id"] == theirs["id"] and mine["ts"] == theirs["ts"]
        ids.append(mine["id"])
    assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"


def test_s5_private_message(server):
    c = lonely_client(server)
    a, b, room = pair_in_room(server)
    a.send(type="msg", to=b.nick, text="secret", ref="m")
    echo = a.expect("message", to=b.nick, text="secret", ref="m", **{"from": a.nick})
    got = b.expect("message", to=b.nick, text="secret", ref=ABSENT, **{"from": a.nick})
    assert echo["id"] == got["id"]
    # Nick lookup is case-insensitive, like uniqueness.
    a.send(type="msg", to=b.nick.upper(), text="shout")
    a.expect("message", text="shout")
    b.expect("message", text="shout", **{"from": a.nick})
    a.send(type="msg", to=unique_nick("nobody"), text="hello?", ref=1)
    a.expect_error("no_such_nick", ref=1)
    for x in (a, b, c):
        x.assert_quiet()


def test_s5_names_sorted_case_insensitively(server):
    room = unique_room()
    sfx = unique_nick("_")
    # Letters only: whether '_' or '[' sorts before or after letters depends on folding to
    # lower or upper case, which the contract does not say.
    nicks = ["bob" + sfx, "Alice" + sfx, "carol" + sfx, "Dave" + sfx, "Eve" + sfx]
    clients = [lonely_client(server, n) for n in nicks]
    for c in clients[:-1]:
        c.join(room)
    for x in clients[:-1]:
        x.barrier()
    last = clients[-1]
    names = last.join(room)
    want = ["Alice" + sfx, "bob" + sfx, "carol" + sfx, "Dave" + sfx, "Eve" + sfx]
    assert names == want, names
    last.send(type="who", room=room, ref=1)
    last.expect("names", room=room, nicks=want, more=False, ref=1)


def test_s5_names_over_1000_come_in_chunks(start):
    srv = start("--max-presence", "0", "--register-rate", "0")  # 1001 users from one address
    clients = []
    nicks = []
    t0 = time.monotonic()
    for batch in range(0, 1001, 250):
        group = []
        for i in range(batch, min(batch + 250, 1001)):
            nick = f"{'AbCd'[i % 4]}n{i:04d}"
            c = Client(srv.port, label=nick)
            c.send(type="hello", nick=nick)
            group.append((c, nick))
        for c, nick in group:
            c.expect("welcome", nick=nick, timeout=10)
            c.expect("join", room=LOBBY, nick=nick, timeout=10)
            c.expect("history", room=LOBBY, timeout=10)
            c.nick = nick
            clients.append(c)
            nicks.append(nick)
        srv.clients.extend(c for c, _ in group)
        if len(clients) == 1000:
            break
    asker = clients[0]
    asker.send(type="who", room=LOBBY, ref="k")
    first = asker.expect("names", room=LOBBY, ref="k", more=False)
    assert first["nicks"] == fold_sorted(nicks) and len(first["nicks"]) == 1000
    last = Client(srv.port, label="n1000")
    srv.clients.append(last)
    last.register("zn1000", names=False)  # a large room: no automatic names
    nicks.append("zn1000")
    asker.send(type="who", room=LOBBY, ref="k2")
    c1 = asker.expect("names", room=LOBBY, ref="k2", more=True)
    c2 = asker.expect("names", room=LOBBY, ref="k2", more=False)
    assert len(c1["nicks"]) == 1000 and len(c2["nicks"]) == 1
    assert c1["nicks"] + c2["nicks"] == fold_sorted(nicks)
    asker.assert_quiet()
    assert time.monotonic() - t0 < 20


def test_s5_two_concurrent_senders_same_order_everywhere(server):
    room = unique_room()
    a, b, c = (lonely_client(server) for _ in range(3))
    for x in (a, b, c):
        x.join(room)
    for x in (a, b, c):
        x.barrier()  # drops the joins of those who came after
    n = 150
    sent = {a.nick: [], b.nick: []}
    for start in range(0, n, 10):
        for sender in (a, b):
            texts = [f"{sender.nick}:{i}" for i in range(start, start + 10)]
            sent[sender.nick] += texts
            sender.send_raw(b"".join(encode({"type": "say", "room": room, "text": t}) for t in texts))
    seqs = {}
    for x in (a, b, c):
        got = [x.expect("message", room=room, timeout=5) for _ in range(2 * n)]
        seqs[x.label] = [e["id"] for e in got]
        ids = seqs[x.label]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), "not in the order produced"
        for who in (a.nick, b.nick):
            assert [e["text"] for e in got if e["from"] == who] == sent[who]
        x.assert_quiet()
    assert seqs[a.label] == seqs[b.label] == seqs[c.label]


def test_s5_messages_to_two_rooms_in_one_send_all_delivered(server):
    """say #r1, say #r2, say #r1 pipelined: every member of each room gets each message."""
    r1, r2 = unique_room(), unique_room()
    a, b = lonely_client(server), lonely_client(server)
    a.join(r1)
    a.join(r2)
    b.join(r2)
    a.expect("join", room=r2, nick=b.nick)
    a.send_raw(
        encode({"type": "say", "room": r1, "text": "one", "ref": 1})
        + encode({"type": "say", "room": r2, "text": "two", "ref": 2})
        + encode({"type": "say", "room": r1, "text": "three", "ref": 3})
    )
    a.expect("message", room=r1, text="one", ref=1)
    a.expect("message", room=r2, text="two", ref=2)
    a.expect("message", room=r1, text="three", ref=3)
    b.expect("message", room=r2, text="two", ref=ABSENT)
    a.assert_quiet()
    b.assert_quiet()


def test_s5_mixed_requests_keep_their_order_at_every_receiver(server):
    """Pipelined requests of several kinds from two senders at once: each receiver gets each
    sender's events in the order of its requests, message ids ascending in arrival order, and
    a sender's own answers (echoes, join/names/history) come in the order it asked."""
    r1, r2, r3 = unique_room(), unique_room(), unique_room()
    a, b, c = (lonely_client(server) for _ in range(3))
    for x in (a, b, c):
        x.join(r1)
    for x in (a, b, c):
        x.barrier()  # drops the joins of those who came after
    for x in (a, b):
        x.join(r2)
    for x in (a, b, c):
        x.barrier()
    plan_a, plan_b = [], []
    for i in range(30):
        plan_a.append({"type": "say", "room": r1, "text": f"a{i}", "ref": f"a{i}"})
        plan_a.append({"type": "say", "room": r2, "text": f"a{i}r2", "ref": f"a{i}r2"})
        plan_a.append({"type": "msg", "to": b.nick, "text": f"a{i}pm", "ref": f"a{i}pm"})
        if i == 10:
            plan_a.append({"type": "join", "room": r3, "ref": "aj"})
        if i == 20:
            plan_a.append({"type": "part", "room": r3, "ref": "ap"})
        plan_b.append({"type": "say", "room": r1, "text": f"b{i}", "ref": f"b{i}"})
        plan_b.append({"type": "msg", "to": a.nick, "text": f"b{i}pm", "ref": f"b{i}pm"})
    for k in range(0, 100, 10):
        a.send_raw(b"".join(encode(r) for r in plan_a[k : k + 10]))
        b.send_raw(b"".join(encode(r) for r in plan_b[k : k + 10]))
    # What each sender must see of its own requests, in order (by ref).
    own_a = []
    for r in plan_a:
        own_a += [r["ref"]] * (3 if r["type"] == "join" else 1)
    own_b = [r["ref"] for r in plan_b]

    def take(x, count):
        return [x.recv_event(5) for _ in range(count)]

    got_a = take(a, len(own_a) + 30 + 30)  # own answers + b's r1 messages + b's private ones
    got_b = take(b, len(own_b) + 30 + 30 + 30)  # own + a's r1, r2 and private messages
    got_c = take(c, 60)  # a's and b's r1 messages
    for x in (a, b, c):
        x.assert_quiet()
    assert [e.get("ref") for e in got_a if "ref" in e] == own_a
    assert [e.get("ref") for e in got_b if "ref" in e] == own_b
    for got in (got_a, got_b, got_c):
        ids = [e["id"] for e in got if e["type"] == "message"]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), "messages out of production order"
    for got, sender, plan in ((got_b, a.nick, plan_a), (got_c, a.nick, plan_a), (got_a, b.nick, plan_b), (got_c, b.nick, plan_b)):
        seen = [e["text"] for e in got if e["type"] == "message" and e["from"] == sender and "ref" not in e]
        member_of = {r1, r2} if got is got_b else {r1}
        wanted = [r["text"] for r in plan if "text" in r and (r.get("room") in member_of or r.get("to") in (a.nick, b.nick) and got is not got_c)]
        assert seen == wanted


# =================================================================================================
# Section 6: liveness and limits
# =================================================================================================


def answer_pings_until(client, pred, timeout):
    """Collect events, answering server pings, until pred(event); returns the non-ping events."""
    deadline = time.monotonic() + timeout
    got = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"{client.label}: condition not met within {timeout}s; got {got!r}"
        ev = client.recv_event(left)
        if ev.get("type") == "ping":
            client.send(type="pong", token=ev.get("token"))
            continue
        got.append(ev)
        if pred(ev):
            return got


def test_s6_server_pings_after_silence_and_answers_keep_connection(start):
    srv = start("--ping-interval", "0.25", "--ping-timeout", "0.6")
    c = srv.registered()
    t0 = time.monotonic()
    ev = c.expect("ping", timeout=3)
    assert time.monotonic() - t0 >= 0.2
    assert isinstance(ev.get("token"), (str, int)), ev
    c.send(type="pong", token=ev["token"])
    # Keep answering for well past the ping timeout: the connection stays.
    pings = 1
    while time.monotonic() - t0 < 1.3:
        try:
            ev = c.recv_event(0.2)
        except AssertionError:
            continue
        assert ev.get("type") == "ping", ev
        pings += 1
        c.send(type="pong", token=ev["token"])
    assert pings >= 3
    c.send(type="ping", token="still")
    answer_pings_until(c, lambda e: matches(e, "pong", token="still"), 2)


def test_s6_no_ping_while_client_talks(start):
    srv = start("--ping-interval", "0.3", "--ping-timeout", "2")
    c = srv.registered()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.8:
        c.idle(0.1)  # asserts that nothing (no ping) arrives
        c.send(type="pong", token="keepalive")  # traffic resets the silence


def test_s6_ping_timeout_closes_and_others_see_quit(start):
    srv = start("--ping-interval", "0.2", "--ping-timeout", "0.6")
    obs = srv.registered()
    victim = srv.registered()
    obs.expect("join", room=LOBBY, nick=victim.nick)
    t0 = time.monotonic()
    answer_pings_until(obs, lambda e: matches(e, "quit", nick=victim.nick, reason="ping timeout"), 4)
    assert time.monotonic() - t0 >= 0.45
    got = victim.assert_closed(2)
    assert [e["type"] for e in got if e["type"] != "ping"] == [], got
    assert any(e["type"] == "ping" for e in got), "the victim was never pinged"
    obs.send(type="ping", token="ok")
    answer_pings_until(obs, lambda e: matches(e, "pong", token="ok"), 2)


def drain_batch(client, want_ids_count, room, sink, others_sink, timeout=5.0):
    """Read until `want_ids_count` messages of `room` have arrived (in total in sink)."""
    deadline = time.monotonic() + timeout
    while len(sink) < want_ids_count:
        left = deadline - time.monotonic()
        assert left > 0, f"{client.label}: only {len(sink)} of {want_ids_count} messages"
        ev = client.recv_event(left)
        if matches(ev, "message", room=room):
            sink.append(ev)
        else:
            others_sink.append(ev)


def test_s6_slow_consumer_dropped_others_get_everything(start):
    srv = start("--max-outbuf", "65536", "--max-frame", "16384", "--max-text", "4040")
    room = "#flood"
    slow, f, r1, r2 = crowd(srv, ["slowpoke", "flooder", "reader1", "reader2"], [room],
                            options={"slowpoke": {"rcvbuf": 4096}})
    # From here on `slow` never reads.
    sinks = {x.label: [] for x in (f, r1, r2)}
    extra = {x.label: [] for x in (f, r1, r2)}
    text = "z" * 4000
    sent = 0
    dropped_at = None
    t0 = time.monotonic()
    while True:
        batch = 8
        f.send_raw(b"".join(encode({"type": "say", "room": room, "text": f"{sent + i}:{text}"}) for i in range(batch)))
        sent += batch
        for x in (f, r1, r2):
            drain_batch(x, sent, room, sinks[x.label], extra[x.label])
        seen_quit = [any(matches(e, "quit", nick="slowpoke") for e in extra[x.label]) for x in (r1, r2)]
        if all(seen_quit) and dropped_at is None:
            dropped_at = sent
        if dropped_at is not None and sent >= dropped_at + 40:
            break
        assert sent < 4000, "the slow consumer was never dropped (16 MB sent)"
        assert time.monotonic() - t0 < 20
    for x in (r1, r2):
        quits = [e for e in extra[x.label] if e.get("type") == "quit"]
        assert quits == [{"type": "quit", "nick": "slowpoke", "reason": "slow consumer"}], extra[x.label]
        assert [e for e in extra[x.label] if e.get("type") != "quit"] == []
    for x in (f, r1, r2):
        texts = [e["text"].split(":")[0] for e in sinks[x.label]]
        assert texts == [str(i) for i in range(sent)], "a receiver missed or reordered messages"
    # The slow client's connection is closed: what the kernel held, then EOF (or a reset); the
    # server drops its queue at once, so the last frame may be cut short.
    slow.assert_closed(10, allow_partial=True)


def test_s6_backpressure_stops_reading_and_others_are_served(start):
    srv = start("--max-outbuf", "262144")
    p = srv.client(rcvbuf=4096, label="pusher")
    p.register("pusher")
    q = srv.registered("quick")
    p.expect("join", room=LOBBY, nick="quick")
    p.barrier()
    token_pad = "p" * 240  # answers as large as requests: output grows as fast as input
    frames = (encode({"type": "ping", "token": f"{i}:{token_pad}"}) for i in range(10**7))
    sock = p.sock
    sent_frames = 0
    pending = b""
    blocked = False
    max_rtt = 0.0
    t0 = time.monotonic()
    total = 0
    while not blocked:
        if not pending:
            pending = next(frames)
            sent_frames += 1
        try:
            n = sock.send(pending)
            pending = pending[n:]
            total += n
            continue
        except BlockingIOError:
            pass
        # The server is not taking our bytes: is it for good (backpressure)?
        _, w, _ = select.select([], [sock], [], 0.5)
        if not w:
            blocked = True
        t1 = time.monotonic()
        q.send(type="ping", token="rtt")
        q.expect("pong", token="rtt", timeout=2)
        max_rtt = max(max_rtt, time.monotonic() - t1)
        assert total < 200 * 2**20, "the server never stopped reading a client that does not read"
        assert time.monotonic() - t0 < 15
    assert max_rtt < 0.5, f"another client waited {max_rtt:.2f}s for a pong"
    # Still blocked a moment later, and others still served promptly.
    for _ in range(3):
        t1 = time.monotonic()
        q.send(type="ping", token="rtt2")
        q.expect("pong", token="rtt2", timeout=2)
        assert time.monotonic() - t1 < 0.5
    _, w, _ = select.select([], [sock], [], 0.2)
    assert not w, "the server read again though the client still reads nothing"
    # Now read: reading resumes, and every request is answered, in order, none lost.
    expected = 0
    deadline = time.monotonic() + 20
    while expected < sent_frames:
        assert time.monotonic() < deadline, f"{expected} of {sent_frames} pongs"
        if pending and expected >= sent_frames - 1:
            p.send_raw(pending, timeout=5)
            pending = b""
        elif pending:
            try:
                n = sock.send(pending)
                pending = pending[n:]
            except BlockingIOError:
                pass
        ev = p.recv_event(5)
        assert ev.get("type") == "pong", ev
        assert ev["token"] == f"{expected}:{token_pad}", f"pong {ev['token'][:20]} out of order, expected {expected}"
        expected += 1
    p.send(type="ping", token="end")
    p.expect("pong", token="end", timeout=5)
    q.assert_quiet()  # p was never dropped


def test_s6_presence_in_large_rooms(start):
    srv = start("--max-presence", "2")
    # The lobby and #big cross the limit during setup (2 -> 3 members): which side of the line
    # that lands on is not what this test checks; it drains setup traffic and starts from there.
    a, b, c, d, e = crowd(srv, ["ann", "bob", "cat", "dan", "eve"])
    big, small = "#big", "#small"
    for x in (a, b, c):
        x.join(big, names=None)
    for x in (a, b, c, d, e):
        x.barrier()
    # join into a room of 3 (> 2): only the joiner hears of it, and gets no automatic names
    d.send(type="join", room=big, ref="j")
    d.expect("join", room=big, nick="dan", ref="j")
    d.expect("history", room=big, ref="j")
    for x in (a, b, c, d, e):
        x.assert_quiet()
    d.send(type="who", room=big, ref="w")
    d.expect("names", room=big, nicks=["ann", "bob", "cat", "dan"], more=False, ref="w")
    # part from a room of 4: only the leaver
    d.send(type="part", room=big, ref="p")
    d.expect("part", room=big, nick="dan", ref="p")
    for x in (a, b, c, d, e):
        x.assert_quiet()
    d.join(big, names=False)
    e.join(big, names=False)
    # messages are not presence: everyone in a large room gets them
    d.send(type="say", room=big, text="hello big room")
    for x in (a, b, c, d, e):
        x.expect("message", room=big, text="hello big room")
    # quit from rooms that are all large (#lobby and #big have 5): nobody hears of it
    e.send(type="quit", reason="gone")
    assert e.assert_closed() == []
    for x in (a, b, c, d):
        x.assert_quiet()
    # nick: to the user and members of rooms at or under the limit only
    a.join(small)
    b.join(small)
    a.expect("join", room=small, nick="bob")
    a.send(type="nick", nick="anna", ref="n")
    a.expect("nick", old="ann", new="anna", ref="n")
    b.expect("nick", old="ann", new="anna", ref=ABSENT)
    for x in (a, b, c, d):
        x.assert_quiet()  # c and d share only large rooms with her


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_s6_graceful_shutdown(start, sig):
    srv = start("--shutdown-grace", "2")
    clients = crowd(srv, ["sa", "sb", "sc"], ["#room"])
    unregistered = srv.client()
    t0 = time.monotonic()
    srv.signal(sig)
    for x in clients:
        got = x.assert_closed(3)
        assert len(got) == 1 and got[0].get("type") == "notice", got
        assert isinstance(got[0].get("text"), str) and got[0]["text"], got
    got = unregistered.assert_closed(3)
    assert all(e.get("type") == "notice" for e in got), got
    # no longer accepting
    try:
        late = socket.create_connection(("127.0.0.1", srv.port), timeout=1)
    except ConnectionRefusedError:
        pass
    else:
        late.close()
        pytest.fail("a new connection was accepted after the shutdown notice")
    rc = srv.wait_exit(3)
    assert rc == 0, srv.log()[-2000:]
    assert time.monotonic() - t0 < 2 + 1.0
    assert "Traceback" not in srv.log()


def test_s6_shutdown_within_grace_despite_stuck_client(start):
    srv = start("--shutdown-grace", "1")
    ok = srv.registered("fine")
    stuck = srv.client(rcvbuf=4096, label="stuck")
    stuck.register("stuck")
    ok.expect("join", room=LOBBY, nick="stuck")
    # ~400 KB of answers the stuck client will never read (under max_outbuf); send what the
    # kernel takes within a second (the server may stop reading it: backpressure).
    try:
        stuck.send_raw(b"".join(encode({"type": "ping", "token": "s" * 2000}) for _ in range(200)), timeout=1)
    except AssertionError:
        pass
    ok.send(type="ping", token="sync")
    ok.expect("pong", token="sync")
    t0 = time.monotonic()
    srv.signal(signal.SIGTERM)
    got = ok.assert_closed(3)
    assert [e.get("type") for e in got] == ["notice"], got
    assert time.monotonic() - t0 < 0.8, "a stuck client delayed the others' notice"
    rc = srv.wait_exit(4)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 1 + 1.0, f"exit took {elapsed:.2f}s with a 1 s grace period"


def small_frame_server(start, *extra):
    return start("--max-text", "10", "--max-frame", "400", *extra)


def test_s6_names_answer_cut_to_max_frame(start):
    srv = small_frame_server(start)
    clients = []
    for i in range(20):
        nick = f"N{i:02d}" + "x" * 29  # 32 characters
        c = srv.client(max_frame=400, label=nick)
        c.register(nick)  # the automatic names may come in several chunks too
        clients.append(c)
    clients[0].barrier()
    clients[0].send(type="who", room=LOBBY, ref="big")
    chunks = []
    while True:
        ev = clients[0].expect("names", room=LOBBY, ref="big")
        chunks.append(ev)
        if not ev["more"]:
            break
    assert len(chunks) > 1
    assert all(ch["more"] for ch in chunks[:-1])
    got = [n for ch in chunks for n in ch["nicks"]]
    assert got == fold_sorted(c.nick for c in clients)
    assert max(clients[0].frame_sizes) <= 400


def test_s6_history_answer_cut_to_max_frame(start):
    srv = small_frame_server(start)
    a = srv.client(max_frame=400)
    a.register("talker")
    ids = []
    for i in range(30):
        a.send(type="say", room=LOBBY, text=f"msg {i:05d}")
        ids.append(a.expect("message", text=f"msg {i:05d}")["id"])
    b = srv.client(max_frame=400)
    b.send(type="hello", nick="late")
    b.expect("welcome", nick="late")
    b.expect("join", room=LOBBY, nick="late")
    b.expect_names(LOBBY)
    h = b.expect("history", room=LOBBY)
    assert h["more"] is True
    got = [m["id"] for m in h["messages"]]
    assert got and got == ids[-len(got):], "history must be the newest messages, oldest first"
    assert max(b.frame_sizes) <= 400


@pytest.mark.parametrize(
    "request_obj,code",
    [
        ({"type": "x" * 380}, "unknown_type"),
        ({"type": "msg", "to": "t" * 340, "text": "hi"}, "no_such_nick"),
        ({"type": "msg", "to": "\x7f" * 330, "text": "hi"}, "no_such_nick"),
        ({"type": "say", "room": "#" + "\x01" * 50, "text": "hi"}, "bad_room"),
    ],
    ids=["long_unknown_type", "long_msg_target", "msg_target_escapes", "room_escapes"],
)
def test_s6_error_answers_fit_max_frame(start, request_obj, code):
    """An error that quotes the request must still fit in max_frame (and not kill the server)."""
    srv = small_frame_server(start)
    c = srv.client(max_frame=400)
    c.register("asker")
    payload = json.dumps(request_obj, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(payload) <= 400
    c.send_payload(payload)
    ev = c.recv_event()
    assert matches(ev, "error", code=code), ev
    c.send(type="ping", token="alive")
    c.expect("pong", token="alive")
    assert srv.alive()


def test_s6_rooms_answer_fits_max_frame(start):
    """Section 5 gives `rooms` no `more`; section 6 still forbids a frame past max_frame. The
    answer may be cut in several `rooms` events (all but the last with more: true)."""
    srv = small_frame_server(start)
    c = srv.client(max_frame=400)
    c.register("roomer")
    names = [f"#{i:02d}" + "r" * 48 for i in range(12)]  # 50 characters after '#'
    for room in names:
        c.join(room)
    c.send(type="rooms", ref="all")
    got = []
    while True:
        ev = c.expect("rooms", ref="all")
        got += ev["rooms"]
        if not ev.get("more"):
            break
    assert sorted(r["name"] for r in got) == sorted(names + [LOBBY])
    assert max(c.frame_sizes) <= 400


def test_s6_long_motd_fits_or_is_refused_at_start(start_server):
    """A motd the CLI accepts must fit in welcome; otherwise nobody could ever register.
    Either the server refuses the option at start, or every client gets a welcome that fits."""
    try:
        srv = start_server("--rate", "0", "--max-text", "10", "--max-frame", "400", "--motd", "😀" * 100)
    except AssertionError as exc:  # did not start: it must have said why, and exited non-zero
        assert "exited" in str(exc) and "Traceback" not in str(exc), exc
        return
    c = srv.client(max_frame=400)
    c.send(type="hello", nick="motd")
    w = c.expect("welcome", nick="motd")
    assert isinstance(w["motd"], str)
    assert max(c.frame_sizes) <= 400


def test_s6_error_with_long_ref_fits_smallest_max_frame(start):
    """A request that fits in max_frame, whose error answer (long fixed message + echoed ref)
    might not: the answer must still come within max_frame, and the connection stay.

    Our choice (docs/protocol.md): a `ref` is bounded by what a full-length message echo leaves
    of max_frame, so a ref the server accepts always fits in its answers; a longer one is
    `bad_request` (an error without a ref). Both sides of that bound are tried here.
    """
    srv = start("--max-text", "2", "--max-frame", "291")  # a small frame the CLI allows
    obs = srv.client(max_frame=291)
    obs.register("obs")
    c = srv.client(max_frame=291)
    c.register("asker")
    obs.expect("join", room=LOBBY, nick="asker")
    for ref, code in (("😀" * 62, "bad_request"), ("😀" * 20, "bad_nick")):
        payload = json.dumps({"type": "nick", "nick": "1", "ref": ref}, ensure_ascii=False).encode()
        assert len(payload) <= 291
        c.send_payload(payload)
        ev = c.recv_event()
        assert matches(ev, "error", code=code), ev
        assert ev.get("ref") == (ref if code == "bad_nick" else None), ev
    c.send(type="say", room=LOBBY, text="ok", ref="😀" * 20)  # the same ref fits a full echo
    c.expect("message", text="ok", ref="😀" * 20)
    obs.expect("message", text="ok")
    c.send(type="ping", token="alive")
    c.expect("pong", token="alive")
    obs.assert_quiet()


def test_s6_error_answer_fits_default_max_frame(start):
    srv = start()
    c = srv.registered()
    c.send_payload(json.dumps({"type": "y" * (MAX_FRAME - 20)}).encode())
    c.expect_error("unknown_type")
    c.send(type="ping", token="alive")
    c.expect("pong", token="alive")


def test_s6_pong_with_largest_token_fits(start):
    """A ping as large as max_frame allows: the pong (same size) must fit, or be refused."""
    srv = small_frame_server(start)
    c = srv.client(max_frame=400)
    c.register("pinger")
    token = "k" * (400 - len(b'{"type":"ping","token":""}'))
    c.send(type="ping", token=token)
    ev = c.recv_event()
    assert matches(ev, "pong", token=token) or matches(ev, "error", code="bad_request"), ev
    c.send(type="ping", token="alive")
    c.expect("pong", token="alive")


# =================================================================================================
# The command line
# =================================================================================================

BAD_OPTIONS = [
    ["--port", "70000"],
    ["--port", "-1"],
    ["--port", "http"],
    ["--max-frame", "0"],
    ["--max-text", "0"],
    ["--max-outbuf", "-5"],
    ["--handshake-timeout", "0"],
    ["--ping-interval", "nan"],
    ["--ping-interval", "2", "--ping-timeout", "1"],
    ["--log-level", "loud"],
    ["--max-frame", "1000", "--max-text", "4096"],  # two given options that contradict each other
    ["--no-such-option"],
]


def run_cli(*args, timeout=10):
    return subprocess.run(
        [sys.executable, "-m", "selchat.server", *args],
        cwd=str(ROOT), env=server_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=[" ".join(a) for a in BAD_OPTIONS])
def test_cli_rejects_bad_option(args):
    res = run_cli("--db", ":memory:", "--port", "0", *args)
    assert res.returncode != 0
    assert "listening" not in res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("selchat-server: "), res.stderr
    option = args[0] if len(args) < 3 else "--ping-timeout"
    assert option in lines[-1] or args[1] in lines[-1], f"the message does not say what is wrong: {lines[-1]}"


def test_cli_bad_option_message_is_one_line():
    """The brief asks for a one-line message; argparse adds its multi-line usage in front."""
    res = run_cli("--db", ":memory:", "--port", "70000")
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line message, got:\n{res.stderr}"


def test_cli_port_in_use(start):
    srv = start()
    res = run_cli("--db", ":memory:", "--host", "127.0.0.1", "--port", str(srv.port))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert len(lines) == 1 and str(srv.port) in lines[0], res.stderr


def test_cli_help_mentions_every_option():
    res = run_cli("--help")
    assert res.returncode == 0
    for opt in ("--host", "--port", "--db", "--max-frame", "--max-text", "--max-outbuf",
                "--handshake-timeout", "--ping-interval", "--ping-timeout", "--max-presence",
                "--shutdown-grace", "--log-level"):
        assert opt in res.stdout, f"{opt} missing from --help"


def test_s6_half_closed_client_still_gets_its_answers(server):
    """A client that sends its requests and then shuts down its sending side (as a script
    piping into a socket does) still receives every answer before the server closes."""
    c = server.registered()
    for i in range(20):
        c.send(type="ping", token=i)
    c.sock.shutdown(socket.SHUT_WR)
    events = c.assert_closed(5.0)
    assert [e.get("token") for e in events if e["type"] == "pong"] == list(range(20)), events
