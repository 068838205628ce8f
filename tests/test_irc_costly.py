"""Expensive IRC answers are bounded by the client's buffer and weighed by what they cost.

Issue 10, findings 4 and 5, for the IRC door: a LIST of thousands of rooms used to be written
at once, past `--max-outbuf`, and the client that asked was dropped as a slow consumer; and
flood control charged one token a line whatever the answer cost. Now LIST streams as the
client reads ("safelist"), NAMES and WHO of a huge room are cut at the same budget (416, then
their end numeric), and the bytes an answer queued beyond its first few KiB are billed, so the
lines after it wait (fake lag), never refused.

Most tests build the server in-process (real sockets on 127.0.0.1, port 0) so that rooms by
the thousand can be made straight in the chat state (one address may create only 500), and
so that the session's queue and bucket can be looked at. The loop and the clients take turns
in the test's thread, and the loop's clock is the test's: it moves only when the test moves
it, so what flood control does is measured on the bucket and the timers, never on wall-clock
time (waits for bytes still have real deadlines). One test runs the real server process with
a tiny `--max-outbuf`.
"""

from __future__ import annotations

import gc
import socket
import struct
import sys
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ircwire import IrcClient, describe, irc_port  # noqa: E402
from selchat.config import ServerConfig  # noqa: E402
from selchat.core.chat import User  # noqa: E402
from selchat.core.names import fold  # noqa: E402
from selchat.core.store import MemoryStore  # noqa: E402
from selchat.doors.irc.parser import Line  # noqa: E402
from selchat.doors.irc.session import RECVQ, IrcSession  # noqa: E402
from selchat.loop.reactor import Reactor  # noqa: E402
from selchat.loop.transport import State, Transport  # noqa: E402
from selchat.server import Server  # noqa: E402

SERVER = "irc.costly.test"
MAX_OUTBUF = 65536
PAD = "-" + "x" * 30  # long room names: 8,500 of them make a LIST of over half a megabyte


def room_name(i: int, tag: str = "a") -> str:
    return f"#room{i:05d}{tag}{PAD}"


class Rig:
    """An in-process server with its IRC door; the test's thread runs the loop in turns."""

    def __init__(self, rate: float = 0.0, burst: int = 20, max_outbuf: int = MAX_OUTBUF,
                 tick: float = 0.0) -> None:
        self.clock = 1000.0
        self.tick = tick  # seconds the loop's clock moves at each turn
        self.reactor = Reactor(clock=lambda: self.clock)
        config = ServerConfig(port=0, irc_port=0, db=":memory:", max_per_ip=0, server_name=SERVER,
                              max_outbuf=max_outbuf, max_frame=max_outbuf // 4, rate=rate,
                              burst=burst)
        self.server = Server(config, MemoryStore(), reactor=self.reactor)
        self.server.listen()
        self.port = self.server.irc_address[1]
        self.chat = self.server.chat
        self.clients: List[IrcClient] = []
        self.owners: Dict[str, User] = {}  # room key -> the filler user who is its one member
        self._fillers = 0

    # --- rooms, made straight in the chat state ------------------------------------------------

    def filler(self) -> User:
        self._fillers += 1
        user, _ = self.chat.register(f"filler{self._fillers}", None, join_lobby=False)
        return user

    def make_rooms(self, names: List[str]) -> None:
        """Each room with one member; a filler user holds up to 100 of them."""
        user: Optional[User] = None
        for name in names:
            if user is None or len(user.rooms) >= 100:
                user = self.filler()
            self.chat.join(user, name)
            self.owners[fold(name)] = user

    def remove_room(self, name: str) -> None:
        owner = self.owners.pop(fold(name))
        self.chat.part(owner, name)  # its only member leaves: the room is gone
        assert fold(name) not in self.chat.rooms

    # --- clients and the loop --------------------------------------------------------------------

    def connect(self, label: str = "") -> IrcClient:
        c = IrcClient(self.port, label=label)
        self.clients.append(c)
        return c

    def turn(self, readers: Tuple[IrcClient, ...] = ()) -> None:
        """One pass of the loop, then whatever has arrived for the reading clients."""
        self.clock += self.tick
        self.reactor.run_once(0.002)
        for c in readers:
            while not c.closed and c._fill(0):
                pass

    def collect(self, client: IrcClient, done: Callable[[Line], bool], timeout: float = 20.0,
                between: Optional[Callable[[], None]] = None) -> List[Line]:
        """Lines up to the first for which `done` is true, the loop running meanwhile."""
        got: List[Line] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.turn((client,))
            while client.pending:
                line = client.pending.pop(0)
                got.append(line)
                if done(line):
                    return got
            if between is not None:
                between()
        raise AssertionError(f"{client.label}: not done within {timeout}s; last: "
                             + "; ".join(describe(x) for x in got[-5:]))

    def register(self, nick: str, caps: Tuple[str, ...] = ()) -> IrcClient:
        c = self.connect(nick)
        if caps:
            c.send("CAP REQ :" + " ".join(caps))
        c.send(f"NICK {nick}")
        c.send(f"USER {nick} 0 * :{nick}")
        if caps:
            c.send("CAP END")
        self.collect(c, lambda x: x.command in ("376", "422"))
        return c

    def session(self, nick: str) -> IrcSession:
        session = self.chat.users[fold(nick)].session
        assert isinstance(session, IrcSession)
        return session

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.server.request_stop()
        self.server._finish()


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    rigs: List[Rig] = []

    def make(**options: object) -> Rig:
        rig = Rig(**options)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


@pytest.fixture
def peak(monkeypatch: pytest.MonkeyPatch) -> Dict[int, int]:
    """The most bytes ever queued on each transport (by fd), sampled at every write."""
    seen: Dict[int, int] = {}
    write = Transport.write

    def watched(self: Transport, data: bytes) -> None:
        write(self, data)
        if self.out.size > seen.get(self.fd, 0):
            seen[self.fd] = self.out.size

    monkeypatch.setattr(Transport, "write", watched)
    return seen


def listed(lines: List[Line]) -> List[str]:
    return [x.params[1] for x in lines if x.command == "322"]


def read_list(rig: Rig, client: IrcClient, between: Optional[Callable[[], None]] = None) -> List[Line]:
    client.send("LIST")
    got = rig.collect(client, lambda x: x.command == "323", between=between)
    assert got[0].command == "321", describe(got[0])
    assert all(x.command == "322" for x in got[1:-1]), [describe(x) for x in got if x.command != "322"][:5]
    return got


# ------------------------------------------------------------------------------------ LIST


def test_a_list_larger_than_the_output_buffer_reaches_a_reading_client_whole(rig_factory, peak) -> None:
    rig = rig_factory()
    names = [room_name(i) for i in range(8500)]
    rig.make_rooms(names)
    c = rig.register("reader")
    session = rig.session("reader")
    got = read_list(rig, c)
    size = sum(len(raw) + 2 for raw in c.raw_received[-len(got):])
    assert size > 8 * MAX_OUTBUF, f"the list ({size} bytes) should dwarf max_outbuf"
    assert listed(got) == sorted(names, key=fold), "every room once, in name order"
    assert not session.doomed and session.transport.state is State.OPEN
    assert peak[session.transport.fd] <= session._answer_budget() + 600 < MAX_OUTBUF
    # Served again after the list, in order.
    c.send("PING after")
    assert rig.collect(c, lambda x: x.command == "PONG")[-1].params[-1] == "after"


def test_lines_sent_behind_a_list_are_answered_after_it_in_order(rig_factory) -> None:
    rig = rig_factory()
    rig.make_rooms([room_name(i) for i in range(3000)])
    c = rig.register("orderly")
    c.send_raw(b"LIST\r\nPING one\r\nLIST #nosuch\r\nPING two\r\n")
    got = rig.collect(c, lambda x: x.command == "PONG" and x.params[-1] == "two")
    cmds = [x.command for x in got]
    first_end = cmds.index("323")
    assert cmds[0] == "321" and set(cmds[1:first_end]) == {"322"}
    assert cmds[first_end + 1:] == ["PONG", "321", "323", "PONG"], cmds[first_end:]


def test_a_list_while_rooms_come_and_go_lists_none_twice_and_ends(rig_factory) -> None:
    rig = rig_factory()
    stable = [room_name(i) for i in range(0, 6000, 2)]
    doomed = [room_name(i) for i in range(1, 6000, 2)]
    rig.make_rooms(stable + doomed)
    c = rig.register("churner")
    session = rig.session("churner")
    expect_absent: List[str] = []  # removed, or created behind the cursor: never listed
    expect_present: List[str] = []  # created ahead of the cursor and kept: listed
    removed_behind: List[str] = []  # removed once listed: listed once
    made = [0]
    cursors: List[str] = []

    def churn() -> None:
        stream = session._listing
        if stream is None or not stream.after:
            return
        cursor = stream.after
        cursors.append(cursor)
        ahead = [n for n in doomed if fold(n) > cursor and fold(n) in rig.chat.rooms]
        behind = [n for n in doomed if fold(n) <= cursor and fold(n) in rig.chat.rooms]
        if len(ahead) > 10:
            rig.remove_room(ahead[5])
            expect_absent.append(ahead[5])
        if behind:
            rig.remove_room(behind[0])
            removed_behind.append(behind[0])
        made[0] += 1
        i = int(cursor[5:10])  # the number in the cursor's name
        if i + 20 < 6000:
            new = room_name(i + 20, f"n{made[0]}")
            rig.make_rooms([new])
            expect_present.append(new)
        if i > 10:
            old = room_name(i - 10, f"o{made[0]}")
            rig.make_rooms([old])
            expect_absent.append(old)

    got = read_list(rig, c, between=churn)
    names = listed(got)
    keys = [fold(n) for n in names]
    assert len(set(cursors)) > 5, "the rooms did not change between chunks"
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "a room listed twice, or out of order"
    shown = set(names)
    assert set(stable) <= shown, "a room that stayed was left out"
    assert not shown & set(expect_absent), sorted(shown & set(expect_absent))[:5]
    assert set(expect_present) <= shown
    assert set(removed_behind) <= shown
    assert not session.doomed


def test_a_labeled_list_streams_in_its_own_batch(rig_factory) -> None:
    rig = rig_factory()
    names = [room_name(i) for i in range(2000)]
    rig.make_rooms(names)
    c = rig.register("labeler", ("labeled-response", "batch", "message-tags"))
    c.send("@label=L1 LIST")
    got = rig.collect(c, lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    opener = got[0]
    assert opener.command == "BATCH" and opener.tags.get("label") == "L1", describe(opener)
    ref = opener.params[0][1:]
    assert opener.params[1] == "labeled-response"
    body = got[1:-1]
    assert all(x.tags.get("batch") == ref for x in body), [describe(x) for x in body[:3]]
    assert [x.command for x in body][0] == "321" and body[-1].command == "323"
    assert listed(body) == sorted(names, key=fold)
    c.send("@label=L2 PING x")
    pong = rig.collect(c, lambda x: x.command == "PONG")[-1]
    assert pong.tags.get("label") == "L2"


def test_a_client_that_never_reads_a_list_holds_no_more_than_the_budget(rig_factory, peak) -> None:
    rig = rig_factory()
    rig.make_rooms([room_name(i) for i in range(8500)])
    c = rig.register("sleeper")
    session = rig.session("sleeper")
    transport = session.transport
    # A small send buffer on the server's side, so a client that does not read stalls the
    # stream (the kernel would otherwise take much of the list into its buffers).
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c.send("LIST")
    for _ in range(300):  # the loop runs; the client reads nothing
        rig.turn()
    assert session._listing is not None, "the stream should wait for the client to read"
    assert transport.state is State.OPEN and not session.doomed
    assert transport.throttled and transport.paused  # waiting for the drain, reading nothing
    budget = session._answer_budget()
    assert peak[transport.fd] <= budget + 600 < MAX_OUTBUF
    assert transport.out.size <= budget + 600
    # More lines meanwhile stay unread in the kernel: the server holds none of them.
    c.send_raw(b"PING queued\r\n" * 50)
    for _ in range(50):
        rig.turn()
    assert session.decoder.buffered == 0
    # Once it reads, it gets all of it, and the lines it sent are answered after.
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # (quicker now)
    got = rig.collect(c, lambda x: x.command == "323")
    assert len(listed(got)) == 8500
    pongs = [0]

    def fiftieth(x: Line) -> bool:
        pongs[0] += x.command == "PONG"
        return pongs[0] == 50

    rig.collect(c, fiftieth, timeout=10.0)


def test_a_client_that_closes_mid_list_leaves_nothing_behind(rig_factory) -> None:
    rig = rig_factory()
    rig.make_rooms([room_name(i) for i in range(8500)])
    c = rig.register("leaver")
    session = rig.session("leaver")
    transport = session.transport
    transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c.send("LIST")
    for _ in range(50):
        rig.turn()
    assert session._listing is not None
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # a reset, with the list half sent
    deadline = time.monotonic() + 10.0
    while transport.state is not State.CLOSED and time.monotonic() < deadline:
        rig.turn()
    assert transport.state is State.CLOSED
    assert session._listing is None and fold("leaver") not in rig.chat.users
    ref = weakref.ref(session)
    del session, transport
    for _ in range(5):
        rig.turn()
    gc.collect()
    assert ref() is None, "a timer or callback still holds the session: " + repr(gc.get_referrers(ref()))


# ------------------------------------------------------------------------------ NAMES and WHO


def test_names_and_who_of_a_huge_room_are_cut_at_the_budget_not_dropped(rig_factory, peak) -> None:
    rig = rig_factory()
    members = []
    for i in range(4000):
        user, _ = rig.chat.register(f"member{i:04d}with-a-long-nick", None, join_lobby=False)
        rig.chat.join(user, "#big")
        members.append(user.nick)
    c = rig.register("looker", ("userhost-in-names",))
    session = rig.session("looker")
    budget = session._answer_budget()
    for command, entry, end in (("NAMES #big", "353", "366"), ("WHO #big", "352", "315")):
        c.send(command)
        got = rig.collect(c, lambda x: x.command == end)
        cmds = [x.command for x in got]
        assert cmds[-2:] == ["416", end], cmds[-3:]
        assert set(cmds[:-2]) == {entry}
        size = sum(len(raw) + 2 for raw in c.raw_received[-len(got):-2])
        assert budget // 2 < size <= budget, (command, size, budget)
    # Joining it: the names on join are cut the same way, the join itself stands.
    c.send("JOIN #big")
    got = rig.collect(c, lambda x: x.command == "366")
    assert got[0].command == "JOIN" and [x.command for x in got][-2:] == ["416", "366"]
    assert not session.doomed
    assert peak[session.transport.fd] < MAX_OUTBUF // 2
    # A small room's names are whole, with no 416.
    c.send("JOIN #small")
    got = rig.collect(c, lambda x: x.command == "366")
    assert "416" not in [x.command for x in got]


# ----------------------------------------------------------------------------------- billing


def test_an_expensive_answer_leaves_a_debt_that_delays_the_next_lines(rig_factory) -> None:
    rate, burst = 20.0, 10
    rig = rig_factory(rate=rate, burst=burst)
    rig.make_rooms([room_name(i) for i in range(4000)])
    c = rig.register("payer")
    session = rig.session("payer")
    bucket = session.bucket
    assert bucket is not None
    c.send("PING cheap")
    rig.collect(c, lambda x: x.command == "PONG")
    assert bucket.tokens == bucket.count, "a cheap answer is not billed"
    read_list(rig, c)  # about 280 KB: 17 tokens' worth, more than the debt may be
    assert bucket.tokens == -burst, "the list was not billed up to the bucket's largest debt"
    assert bucket.count >= burst - 4  # while its count of lines is nowhere near a flood
    # The next line waits the debt out (fake lag); it is not refused.
    c.send("PING later")
    for _ in range(20):
        rig.turn((c,))
    wait = bucket.ready_in(rig.reactor.now)
    assert wait == pytest.approx((1 + burst) / rate)  # a whole debt, not one token's 1/rate
    assert session._lagged is not None and session.transport.paused
    rig.clock += wait / 2
    for _ in range(20):
        rig.turn((c,))
    assert not [x for x in c.pending if x.command == "PONG"], "served before the debt was paid"
    rig.clock += wait / 2 + 0.01
    pong = rig.collect(c, lambda x: x.command == "PONG", timeout=10.0)[-1]
    assert pong.params[-1] == "later"
    assert bucket.tokens >= 0.0 - 1e-9 and not session.doomed


def test_waiting_out_a_debt_is_not_an_excess_flood(rig_factory) -> None:
    rig = rig_factory(rate=20.0, burst=20, tick=0.01)
    rig.make_rooms([room_name(i) for i in range(4000)])
    c = rig.register("patient")
    read_list(rig, c)
    session = rig.session("patient")
    assert session.bucket is not None and session.bucket.tokens < 0
    # Long lines, few of them (within the burst), more bytes than RECVQ: a debt, no flood.
    lines = [f"PING {i:02d}{'y' * 455}\r\n".encode() for i in range(18)]
    assert sum(map(len, lines)) > RECVQ
    c.send_raw(b"".join(lines))
    got = rig.collect(c, lambda x: x.command == "PONG" and x.params[-1].startswith("17"), timeout=15.0)
    assert [x.params[-1][:2] for x in got if x.command == "PONG"] == [f"{i:02d}" for i in range(18)]
    assert not [x for x in got if x.command == "ERROR"]


def test_a_names_answer_past_the_free_bytes_is_billed(rig_factory) -> None:
    rig = rig_factory(rate=20.0, burst=20)
    for i in range(2000):
        user, _ = rig.chat.register(f"n{i:04d}-a-fairly-long-nick", None, join_lobby=False)
        rig.chat.join(user, "#crowd")
    c = rig.register("counter")
    bucket = rig.session("counter").bucket
    assert bucket is not None and bucket.tokens == bucket.count
    c.send("NAMES #crowd")
    rig.collect(c, lambda x: x.command == "366")
    # Cut at the budget (16 KiB here): 12 KiB past the free bytes, three quarters of a token.
    assert bucket.count - bucket.tokens == pytest.approx(0.75, abs=0.05)


def test_a_who_mask_matched_against_every_user_is_billed_its_cpu(rig_factory, monkeypatch) -> None:
    """A mask is matched against every user on the server: CPU that grows with the server,
    while the answer (here: no one matches) is a line. Billed as the native door bills its
    expensive answers, at one token per 2 ms past the first; the CPU clock is the test's."""
    from selchat.core.ratelimit import cpu_cost

    rig = rig_factory(rate=20.0, burst=20)
    for i in range(300):
        rig.chat.register(f"m{i:03d}", None, join_lobby=False)
    c = rig.register("masker")
    bucket = rig.session("masker").bucket
    assert bucket is not None
    ticks = iter(range(1000000))
    monkeypatch.setattr(time, "thread_time", lambda: next(ticks) * 0.005)  # 5 ms a look
    before = bucket.count - bucket.tokens
    c.send("WHO zz*")
    got = rig.collect(c, lambda x: x.command == "315")
    monkeypatch.undo()
    assert [x.command for x in got] == ["315"]
    assert bucket.count - bucket.tokens - before == pytest.approx(cpu_cost(0.005)) == 2.0


# ------------------------------------------------------------------------ the real process


def test_the_server_process_streams_a_list_past_a_tiny_max_outbuf(start_server) -> None:
    srv = start_server("--irc-port", "0", "--rate", "0", "--max-per-ip", "0",
                       "--max-outbuf", "16384", "--server-name", SERVER)
    port = irc_port(srv)
    makers = []
    names: List[str] = []
    for k in range(4):
        m = IrcClient(port, label=f"maker{k}")
        m.register(f"maker{k}")
        makers.append(m)
        mine = [room_name(k * 100 + i) for i in range(100)]
        names += mine
        for start in range(0, 100, 10):
            batch = mine[start:start + 10]
            m.send("JOIN " + ",".join(batch))
            for _ in batch:
                m.wait_for("366", timeout=5.0)
    reader = IrcClient(port, label="reader")
    reader.register("reader")
    assert "SAFELIST" in reader.isupport
    reader.send("LIST")
    got = reader.until_numeric("323", timeout=15.0)
    assert sum(len(raw) + 2 for raw in reader.raw_received[-len(got):]) > 16384
    assert listed(got) == sorted(names, key=fold)
    reader.send("PING alive")
    assert reader.wait_for("PONG")[0].params[-1] == "alive"
    for m in makers + [reader]:
        m.quit_and_close()
