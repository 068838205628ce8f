"""The server's memory bound under slow consumers (the hardening work: a proof that memory stays bounded).

Per connection the server holds at most `max_outbuf` queued bytes, one partial frame
(<= max_frame + 4), one recv buffer (65536) and a few KiB of fixed state, so with C connections
its memory stays below base + C * (max_outbuf + max_frame + 4 + 64 KiB + 4 KiB); kernel socket
buffers come on top and are not in the process's RSS.

The test makes each part of that bound real: C slow consumers each park a partial frame of
~15 KB in the server (its decoder must hold it) and then never read, while a fast sender floods
a room they are in (shared frames) and sends each of them private messages (frames of their own,
so their queues hold distinct bytes). Each slow consumer must be dropped with `quit`
`slow consumer`, and the server's peak RSS (VmHWM in /proc/PID/status) must stay under the
bound, measured from a base taken after a warm-up (plus twice the bytes of history the flood
itself adds, since the store's page cache may keep them: that is not per-connection memory).
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Dict, List, Set

import pytest

from conftest import unique_nick
from wire import Client, encode

MAX_OUTBUF = 65536
MAX_FRAME = 16384  # the server wants max_outbuf >= 4 * max_frame
RECV_SIZE = 65536
FIXED_STATE = 4096
PER_CONNECTION = MAX_OUTBUF + MAX_FRAME + 4 + RECV_SIZE + FIXED_STATE
SLOW = 24
PARTIAL = 15000  # bytes of a frame that announces 16000: held by the server's decoder
TEXT = 4000
ROOM_TEXT = 500  # room messages are also history: SQLite's page cache may keep them (see below)


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_slow_consumers_are_dropped_and_memory_stays_under_the_bound(start_server, tmp_path: Path) -> None:
    started = time.monotonic()
    srv = start_server("--max-outbuf", str(MAX_OUTBUF), "--max-frame", str(MAX_FRAME),
                       "--max-text", str(TEXT + 40), "--rate", "0",
                       "--max-per-ip", "0", "--db", str(tmp_path / "history.db"))
    pid = srv.proc.pid
    room = "#flood"
    sender = srv.registered(unique_nick("fast"))
    sender.send(type="part", room="#lobby")
    sender.expect("part", room="#lobby")
    sender.join("#warm")
    # Warm-up: ~2.4 MB of history, so SQLite's page cache (2 MB by default) is at its size
    # before the base is taken; Python's allocator has seen frames of this size too.
    filler = "w" * TEXT
    for k in range(0, 600, 20):
        sender.send_raw(b"".join(encode({"type": "say", "room": "#warm", "text": filler}) for _ in range(20)))
        for _ in range(20):
            sender.expect("message", room="#warm")
    sender.join(room)
    sender.assert_quiet()
    base = proc_status_kib(pid, "VmRSS")

    slow: List[Client] = []
    for i in range(SLOW):
        c = srv.registered(unique_nick("slow"), rcvbuf=4096)
        c.join(room)
        sender.expect("join", room=room, nick=c.nick)
        # A partial frame the server must buffer; then this client neither sends nor reads.
        c.send_raw(struct.pack(">I", PARTIAL + 1000) + b"p" * PARTIAL)
        slow.append(c)
    sender.assert_quiet()

    alive: Set[str] = {c.nick for c in slow}  # type: ignore[misc]
    quits: Dict[str, str] = {}
    peak_sampled = 0
    room_bytes = 0
    deadline = time.monotonic() + 30.0  # a deadline, not a speed: a loaded CI machine floods slowly
    n = 0
    while alive and time.monotonic() < deadline:
        room_text = f"{n} " + "r" * ROOM_TEXT
        room_bytes += len(room_text) + 200  # the row and index entry the history store keeps
        batch = [{"type": "say", "room": room, "text": room_text, "ref": f"s{n}"}]
        for nick in sorted(alive):
            n += 1
            batch.append({"type": "msg", "to": nick, "text": f"{n} {nick} " + "p" * TEXT, "ref": f"m{n}"})
        # At most 8 requests (~33 KB of answers) at a time: the sender's own queue must stay
        # under max_outbuf, because one pass serves everything one read brought in.
        for k in range(0, len(batch), 8):
            group = batch[k : k + 8]
            sender.send_raw(b"".join(encode(r) for r in group))
            # Read the answers (echoes, or no_such_nick for one dropped meanwhile) and the
            # quits that came with them; the sender itself never falls behind.
            refs = {r["ref"] for r in group}
            while refs:
                ev = sender.recv_event(5.0)
                if ev.get("type") == "quit":
                    quits[ev["nick"]] = ev["reason"]
                    alive.discard(ev["nick"])
                elif ev.get("ref") in refs:
                    assert ev["type"] == "message" or ev.get("code") == "no_such_nick", ev
                    refs.discard(ev["ref"])
                else:
                    assert ev.get("type") == "message" and ev.get("room") == room, ev
        peak_sampled = max(peak_sampled, proc_status_kib(pid, "VmRSS"))
    assert not alive, f"slow consumers never dropped within 30 s: {sorted(alive)}"
    assert quits == {c.nick: "slow consumer" for c in slow}, quits
    for c in slow:
        # The server closed it at once (its log says so). Not checked by reading to EOF: the data
        # the kernel still holds for a 4 KiB receive window trickles out under TCP's persist
        # timer, which has backed off for seconds by now.
        srv.wait_log(r"closed: 127\.0\.0\.1:%d: slow consumer" % c.sock.getsockname()[1], 5.0)
        c.close()
    sender.send(type="ping", token="after")
    sender.expect("pong", token="after")  # the fast sender was never slowed down or dropped

    # VmHWM is the kernel's high-water mark; it can lag the last sample, so take the larger.
    peak = max(proc_status_kib(pid, "VmHWM"), peak_sampled)
    connections = SLOW + 1
    # History is not per-connection memory: what the flood added to the store (which SQLite's page
    # cache, 32 MiB, may keep in memory) is allowed for on top, twice over.
    history_kib = 2 * room_bytes // 1024
    bound_kib = base + connections * PER_CONNECTION // 1024 + history_kib
    print(f"\nbase {base} KiB, peak {peak} KiB (+{peak - base} KiB; sampled RSS max {peak_sampled} KiB), "
          f"bound {bound_kib} KiB (+{bound_kib - base - history_kib} KiB for {connections} connections, "
          f"+{history_kib} KiB for history), "
          f"{n} private messages, {time.monotonic() - started:.1f} s")
    assert peak <= bound_kib, (
        f"server peak RSS {peak} KiB is above base {base} KiB + {connections} x {PER_CONNECTION} B "
        f"+ {history_kib} KiB of history = {bound_kib} KiB")
    assert srv.alive()
    assert "Traceback" not in srv.log() and " ERROR " not in srv.log()
