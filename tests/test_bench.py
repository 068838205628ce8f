"""Smoke tests of the benchmark instrument: it must count right, whatever it measures.

The load generator never decodes JSON on its hot path, so these tests check its counting
against what the protocol implies: every `say` reaches every member of #lobby (the sender
too), so after the drain each member has exactly as many messages as were sent in all.
The frame scanner is also checked against the project's own decoder on random streams.
"""

from __future__ import annotations

import os
import random
import subprocess
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


# ---- IRC: config templates, the workload against a stub server, finding the IRC door ------

import selectors  # noqa: E402
import socket  # noqa: E402
import string  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

from selchat.bench import ircload, launcher, runner  # noqa: E402


class IrcStub:
    """A tiny IRC server in a thread: registration, one channel, PRIVMSG relay, PING both ways.

    Just enough of RFC 2812 for the generator: NICK/USER -> 001, JOIN -> JOIN to all
    members + 353 + 366, PRIVMSG #chan -> relayed to every other member (no echo, as plain
    IRC servers do), PING -> PONG. It also pings every member every `ping_every` seconds
    and counts the PONGs, so the generator's answers are checked mid-load (the interval is
    above the generator's quiet periods, or settling and draining would never end).
    """

    def __init__(self, ping_every: float = 0.4, hold: bool = False) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ)
        self.clients: Dict[socket.socket, Dict] = {}
        self.members: List[socket.socket] = []
        self.pongs = 0
        self.relayed = 0
        self.ping_every = ping_every
        self.hold = hold  # take PRIVMSGs but relay none (a server that stalls)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _send(self, s: socket.socket, data: bytes) -> None:
        c = self.clients.get(s)
        if c is None:
            return
        c["out"] += data
        self._flush(s)

    def _flush(self, s: socket.socket) -> None:
        c = self.clients[s]
        try:
            n = s.send(c["out"])
            del c["out"][:n]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(s)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c["out"] else 0)
        self.sel.modify(s, events)

    def _drop(self, s: socket.socket) -> None:
        if s in self.clients:
            self.sel.unregister(s)
            del self.clients[s]
            if s in self.members:
                self.members.remove(s)
            s.close()

    def _line(self, s: socket.socket, line: bytes) -> None:
        c = self.clients[s]
        cmd, _, rest = line.partition(b" ")
        cmd = cmd.upper()
        if cmd == b"NICK":
            c["nick"] = rest.strip()
        elif cmd == b"USER":
            self._send(s, b":stub 001 " + c["nick"] + b" :Welcome\r\n:stub 005 " + c["nick"] + b" CHANTYPES=# :ok\r\n")
        elif cmd == b"JOIN":
            chan = rest.strip()
            self.members.append(s)
            prefix = b":" + c["nick"] + b"!u@127.0.0.1"
            for m in self.members:
                self._send(m, prefix + b" JOIN :" + chan + b"\r\n")
            names = b" ".join(self.clients[m]["nick"] for m in self.members)
            self._send(s, b":stub 353 " + c["nick"] + b" = " + chan + b" :" + names + b"\r\n")
            self._send(s, b":stub 366 " + c["nick"] + b" " + chan + b" :End of /NAMES list.\r\n")
        elif cmd == b"PRIVMSG":
            relay = b":" + c["nick"] + b"!u@127.0.0.1 PRIVMSG " + rest + b"\r\n"
            for m in list(self.members):
                if m is not s and not self.hold:
                    self._send(m, relay)
            self.relayed += 1
        elif cmd == b"PING":
            self._send(s, b":stub PONG stub " + rest + b"\r\n")
        elif cmd == b"PONG":
            self.pongs += 1

    def _run(self) -> None:
        next_ping = time.monotonic() + self.ping_every
        while not self.stopping:
            for key, events in self.sel.select(0.05):
                s = key.fileobj
                if s is self.lsock:
                    try:
                        conn, _ = self.lsock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.clients[conn] = {"nick": b"*", "in": bytearray(), "out": bytearray()}
                    self.sel.register(conn, selectors.EVENT_READ)
                    continue
                if s not in self.clients:
                    continue
                if events & selectors.EVENT_WRITE:
                    self._flush(s)
                    if s not in self.clients:
                        continue
                if events & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(s)
                        continue
                    buf = self.clients[s]["in"]
                    buf += data
                    *lines, rest = bytes(buf).split(b"\n")
                    buf[:] = rest
                    for line in lines:
                        if s in self.clients:
                            self._line(s, line.rstrip(b"\r"))
            if time.monotonic() >= next_ping:
                next_ping += self.ping_every
                for m in list(self.members):
                    self._send(m, b"PING :stub\r\n")

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for s in list(self.clients):
            self._drop(s)
        self.lsock.close()


@pytest.fixture
def irc_stub():
    stub = IrcStub()
    yield stub
    stub.close()


def test_config_templates_render_with_throughput_settings(tmp_path: Path) -> None:
    ng = Path(launcher.render_config(launcher.PEERS_DIR / "ngircd.conf.tmpl", str(tmp_path), "127.0.0.1", 40123))
    text = ng.read_text()
    assert ng.name == "ngircd.conf"
    assert "Listen = 127.0.0.1" in text and "Ports = 40123" in text
    for setting in ("MaxConnectionsIP = 0", "MaxConnections = 0", "MaxPenaltyTime = 0", "DNS = no", "Ident = no", "DefaultUserModes = F"):
        assert setting in text
    ins = Path(launcher.render_config(launcher.PEERS_DIR / "inspircd.conf.tmpl", str(tmp_path), "127.0.0.1", 40124))
    text = ins.read_text()
    assert '<bind address="127.0.0.1" port="40124" type="clients">' in text
    for setting in ('fakelag="no"', 'localmax="1000000"', 'globalmax="1000000"', 'resolvehostnames="no"', 'useident="no"'):
        assert setting in text
    for path in (ng, ins):
        assert "${" not in path.read_text()


def test_a_template_without_its_values_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "x.conf.tmpl"
    bad.write_text("port ${port} ${nonesuch}\n")
    with pytest.raises(KeyError):
        launcher.render_config(bad, str(tmp_path), "127.0.0.1", 1)


def test_irc_shares_put_one_counter_per_sender_with_the_senders() -> None:
    cfg = loadgen.LoadConfig(receivers=1000, senders=10, protocol="irc")
    shares = ircload.plan_irc_shares(cfg)
    assert len(shares) == 3
    fast = shares[0]
    counters = sorted(-2 - sid for _, sid in fast if sid <= -2)
    assert counters == list(range(10))
    assert sorted(sid for _, sid in fast if sid >= 0) == list(range(10))
    everyone = [nick for share in shares for nick, _ in share]
    assert len(everyone) == len(set(everyone)) == 1010
    assert all(sid == -1 for share in shares[1:] for _, sid in share)
    with pytest.raises(ValueError):
        ircload.plan_irc_shares(loadgen.LoadConfig(receivers=3, senders=4, protocol="irc"))


def test_irc_workload_counts_every_line_and_answers_pings(irc_stub: IrcStub) -> None:
    cfg = loadgen.LoadConfig(
        port=irc_stub.port, receivers=6, senders=3, duration=1.0, warmup=0.2, drain_quiet=0.3, protocol="irc",
    )
    res = loadgen.run_load(cfg)
    assert res.protocol == "irc"
    assert res.sent_total > 0 and res.sent_total == irc_stub.relayed
    assert res.errors == {} and res.dropped == 0
    # every member holds every message (a sender is credited its own, which IRC never echoes)
    assert res.per_member_min == res.per_member_max == res.sent_total
    assert res.lost == 0 and res.complete
    # in the window each message reaches R + S - 1 members, up to what was in flight at the edges
    members = cfg.receivers + cfg.senders - 1
    slack = 2 * cfg.window * cfg.senders * members
    assert abs(res.deliveries - res.sent_per_s * res.duration * members) <= slack
    # lines include the stub's PINGs, which are not deliveries; a line is ~150 bytes here
    assert res.lines_per_s >= res.deliveries_per_s
    assert 100 * res.lines_per_s < res.rx_bytes_per_s < 200 * res.lines_per_s
    assert irc_stub.pongs > 0
    assert res.samples > 0 and res.p50_ms is not None and res.p50_ms >= 0


def test_irc_senders_stop_at_their_window_when_nothing_is_delivered() -> None:
    """A sender never has more than `window` lines beyond what its counter has seen."""
    stub = IrcStub(ping_every=30.0, hold=True)
    try:
        cfg = loadgen.LoadConfig(
            port=stub.port, receivers=4, senders=3, duration=0.5, warmup=0.1, window=5, protocol="irc", drain_quiet=0.2,
        )
        res = loadgen.run_load(cfg)
    finally:
        stub.close()
    assert res.sent_total == stub.relayed == cfg.window * cfg.senders
    assert not res.complete and res.deliveries == 0
    # every receiver misses all 15; each sender misses the other two senders' 10
    assert res.lost == 4 * 15 + 3 * 10


def test_speaks_irc_tells_the_doors_apart(irc_stub: IrcStub, asyncio_peer: RunningServer) -> None:
    assert launcher.speaks_irc("127.0.0.1", irc_stub.port)
    assert not launcher.speaks_irc("127.0.0.1", asyncio_peer.port)


_TWO_DOORS = string.Template('''
import socket, sys, time
native = socket.create_server(("127.0.0.1", 0))
irc = socket.create_server(("127.0.0.1", 0))
if ${say}:
    print("irc listening on 127.0.0.1:%d" % irc.getsockname()[1], file=sys.stderr, flush=True)
native.settimeout(0.05)
irc.settimeout(0.05)
end = time.monotonic() + 30
while time.monotonic() < end:
    for s, reply in ((native, b"\\x00\\x00\\x00\\x02{}"), (irc, b":fake NOTICE * :hello\\r\\n")):
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.sendall(reply)
        c.close()
''')


@pytest.mark.parametrize("say", [True, False], ids=["log-line", "proc-and-probe"])
def test_the_irc_door_is_found_with_or_without_its_log_line(tmp_path: Path, say: bool) -> None:
    script = tmp_path / "two_doors.py"
    script.write_text(_TWO_DOORS.substitute(say=say))
    spec = ServerSpec("two-doors", [sys.executable, str(script)], protocols=(launcher.IRC,))
    with RunningServer(spec) as srv:
        assert srv.port and srv.irc_port and srv.port != srv.irc_port
        assert srv.irc_port in launcher.listening_ports(srv.pid)
        assert launcher.speaks_irc("127.0.0.1", srv.irc_port)
        assert not launcher.speaks_irc("127.0.0.1", srv.port)


def test_native_line_is_not_taken_for_the_irc_one() -> None:
    text = "INFO irc listening on 127.0.0.1:7001\nINFO listening on 127.0.0.1:7000\n"
    assert launcher._LISTENING.search(text).group(2) == "7000"
    assert launcher._IRC_LISTENING.search(text).group(2) == "7001"


def test_plan_and_table_carry_both_kinds() -> None:
    opts = runner.parse_args(["--points", "ircfanout,fanout", "--fanout-receivers", "100,1000"])
    cases = runner.plan(opts)
    assert [c.label for c in cases] == ["fan-out R=100", "fan-out R=1000", "IRC fan-out R=100", "IRC fan-out R=1000"]
    assert {c.protocol for c in cases} == {"native", "irc"}
    m = {"deliveries_per_s": 1000.0, "cpu_us_per_delivery": 1.0, "server_cores": 0.5, "gen_cpu": 0.1, "other_cores": 0.0, "softirq_cores": 0.0}
    results = {(cases[0], "selchat-base"): runner.Outcome(metrics=dict(m)), (cases[2], "ngircd"): runner.Outcome(metrics=dict(m))}
    text = runner.table(cases, ["selchat-base", "ngircd"], results, {"selchat-base": "selchat-base@abc1234"})
    rows = text.splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| fan-out R=100 | selchat-base@abc1234 | 1,000 |")
    assert rows[1].startswith("| IRC fan-out R=100 | ngircd | 1,000 |")
    assert rows[0].count("|") == rows[1].count("|") == text.splitlines()[0].count("|")


def test_baseline_is_labelled_with_its_git_hash(tmp_path: Path) -> None:
    specs = launcher.known_servers(baseline=None)
    assert specs["selchat-base"].unavailable
    checkout = tmp_path / "old"
    (checkout / "selchat").mkdir(parents=True)
    (checkout / "selchat" / "server.py").write_text("")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ["PATH"]}
    for cmd in (["init", "-q"], ["add", "selchat/server.py"], ["commit", "-q", "-m", "old"]):
        subprocess.run(["git", "-C", str(checkout)] + cmd, check=True, env=env, capture_output=True)
    short = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    spec = launcher.known_servers(baseline=checkout)["selchat-base"]
    assert not spec.unavailable
    assert spec.label == f"selchat-base@{short}"
    assert spec.root == checkout and f"cd {checkout} && PYTHONPATH={checkout} " in spec.describe()
    (checkout / "selchat" / "server.py").write_text("# changed\n")
    assert launcher.git_label(checkout) == short + "+dirty"
    env_of = launcher._env(checkout)
    assert env_of["PYTHONPATH"].split(os.pathsep)[0] == str(checkout)
    assert str(launcher.REPO) not in env_of["PYTHONPATH"].split(os.pathsep)


@pytest.mark.parametrize("name", ["ngircd", "inspircd"])
def test_installed_irc_daemons_run_the_irc_workload(name: str) -> None:
    spec = launcher.known_servers()[name]
    if spec.unavailable:
        pytest.skip(spec.unavailable)
    with RunningServer(spec) as srv:
        assert srv.irc_port and srv.irc_port in launcher.listening_ports(srv.pid)
        cfg = loadgen.LoadConfig(
            port=srv.irc_port, receivers=5, senders=2, duration=0.5, warmup=0.1, protocol="irc", drain_quiet=1.0,
        )
        res = loadgen.run_load(cfg)
        assert res.complete and res.errors == {} and res.sent_total > 0
        assert srv.cpu_seconds() >= 0 and srv.rss_kib() > 0
    assert not srv.alive()


# ---- WebSocket: the frame scanner, client frames, the workload against selchat's web door ----

import json  # noqa: E402
import multiprocessing  # noqa: E402
import select as _select  # noqa: E402

from wsproto.frame_protocol import FrameProtocol  # noqa: E402

from selchat.bench import wsload  # noqa: E402


def _server_frames(objs: list, rng: random.Random) -> tuple:
    """Server frames (unmasked, as selchat's web door writes them) and the pings among them."""
    proto = FrameProtocol(client=False, extensions=[])
    out = bytearray()
    pings = []
    for o in objs:
        if o is None:
            token = str(rng.randrange(10**12)).encode()
            pings.append(token)
            out += bytes((0x89, len(token))) + token
        else:
            out += proto.send_data(json.dumps(o, separators=(",", ":")))
    return bytes(out), pings


def test_ws_scan_agrees_with_the_objects_on_random_streams() -> None:
    rng = random.Random(6)
    for _ in range(200):
        objs: list = []
        for i in range(rng.randint(0, 60)):
            r = rng.random()
            if r < 0.1:
                objs.append({"type": "join", "room": "#lobby", "nick": "n" * rng.randint(1, 30)})
            elif r < 0.15:
                objs.append(None)  # a ping
            elif r < 0.17:  # long enough for a 64-bit length
                objs.append(_message(i, 1, rng.randrange(10**9), 70000))
            else:
                objs.append(_message(rng.choice([7, 70, 70000]), rng.randrange(3), rng.randrange(10**9), rng.choice([78, 78, 78, 90])))
        stream, pings = _server_frames(objs, rng)
        buf = bytearray()
        frames = msgs = 0
        samples: list = []
        cache: dict = {}
        found = wsload.Scan()
        countdown = 1
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 700)
            buf += stream[pos : pos + step]
            pos += step
            off, f, m, countdown = wsload.ws_scan(buf, 0, len(buf), countdown, 3, 10**9, samples, cache, found)
            del buf[:off]
            frames, msgs = frames + f, msgs + m
        assert not buf
        assert frames == len(objs)
        texts = [o for o in objs if o is not None]
        assert msgs == sum(o["type"] == "message" for o in texts)
        assert found.pings == pings and found.close is None
        expected = [10**9 - int(o["text"][3:19]) for i, o in enumerate(texts) if i % 3 == 0 and o["type"] == "message"]
        # a ping is a frame too: the countdown counts text frames only
        assert samples == expected


def test_ws_scan_refuses_a_masked_frame_and_stops_at_a_close() -> None:
    with pytest.raises(loadgen.BadFrame):
        wsload.ws_scan(bytearray(wsload.client_frame(wsload.OP_TEXT, b"{}")), 0, 8, 1, 0, 0, [], {}, wsload.Scan())
    found = wsload.Scan()
    data = bytearray(b"\x88\x02\x03\xe9" + b"\x81\x02{}")
    off, frames, msgs, _ = wsload.ws_scan(data, 0, len(data), 1, 0, 0, [], {}, found)
    assert (off, frames, msgs, found.close) == (4, 0, 0, 1001)


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536])
def test_client_frames_are_masked_and_parse_as_wsproto_server_reads_them(size: int) -> None:
    payload = bytes(random.Random(size).randrange(256) for _ in range(size))
    frame = wsload.client_frame(wsload.OP_BINARY, payload, b"\x01\x02\x03\x04")
    assert frame[1] & 0x80  # the mask bit
    server_side = FrameProtocol(client=False, extensions=[])  # wsproto's server parser: refuses unmasked frames
    server_side.receive_bytes(frame)
    got = list(server_side.received_frames())
    assert len(got) == 1 and bytes(got[0].payload) == payload and got[0].message_finished


def test_accept_token_is_rfc_6455s_example() -> None:
    assert wsload.accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_counting_receiver_answers_pings_with_masked_pongs() -> None:
    parent, child = multiprocessing.Pipe()
    worker = wsload.WsWorker(child, "127.0.0.1", 1, 100, 2)
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        c = wsload.WsConn(ours, "r00001", -1)
        c.state, c.upgraded, c.counting = loadgen.READY, True, True
        worker.conns[c.fd] = c
        worker.ep.register(c.fd, _select.EPOLLIN)
        proto = FrameProtocol(client=False, extensions=[])
        msg = json.dumps(_message(1, 0, 5, 78), separators=(",", ":"))
        stream = bytes(proto.send_data(msg)) * 3 + b"\x89\x0417" + b"42" + bytes(proto.send_data(msg))
        # the ping cut in two between receives
        theirs.sendall(stream[:-len(msg) - 4 - 3])
        deadline = time.monotonic() + 5
        while c.msgs < 3 and time.monotonic() < deadline:
            worker._read(c)
        theirs.sendall(stream[-len(msg) - 4 - 3 :])
        while c.msgs < 4 and time.monotonic() < deadline:
            worker._read(c)
        assert c.msgs == 4 and c.state == loadgen.READY
        theirs.settimeout(5)
        got = theirs.recv(100)
        frames = FrameProtocol(client=False, extensions=[])
        frames.receive_bytes(got)
        (pong,) = list(frames.received_frames())
        assert pong.opcode.value == wsload.OP_PONG and bytes(pong.payload) == b"1742"
        assert got[1] & 0x80  # masked, as a client must
    finally:
        ours.close()
        theirs.close()
        worker.ep.close()
        parent.close()
        child.close()


@pytest.fixture(scope="module")
def web_selchat():
    spec = launcher.known_servers()["selchat-web"]
    launcher.resolve_flags(spec)
    if spec.unavailable:
        pytest.skip(spec.unavailable)
    with RunningServer(spec) as srv:
        yield srv


def test_wsfanout_every_message_reaches_every_member(web_selchat: RunningServer) -> None:
    assert web_selchat.port and web_selchat.web_port and web_selchat.port != web_selchat.web_port
    cfg = loadgen.LoadConfig(
        port=web_selchat.port, ws_port=web_selchat.web_port, receivers=6, senders=2, duration=0.8, warmup=0.2,
        drain_quiet=0.2, protocol="ws",
    )
    res = loadgen.run_load(cfg)
    assert res.sent_total > 0 and res.errors == {} and res.dropped == 0
    assert res.per_member_min == res.per_member_max == res.sent_total and res.complete
    slack = 2 * cfg.window * cfg.senders * 8
    assert abs(res.deliveries - res.sent_per_s * res.duration * 8) <= slack
    assert res.samples > 0 and res.p50_ms is not None and res.p50_ms >= 0


def test_idle_clients_register_over_websocket(web_selchat: RunningServer) -> None:
    rss: dict = {}
    res = loadgen.run_idle(
        "127.0.0.1", web_selchat.web_port, 30, lambda edge: rss.setdefault(edge, web_selchat.rss_kib()),
        extra_joins=4, workers=2, protocol="ws",
    )
    assert res.registered == 30 and res.extra_joins == 4 and res.errors == {}
    assert res.join_frames >= 4 and set(rss) == {"before", "after"}


def test_a_foreign_origin_is_refused_and_counted(web_selchat: RunningServer) -> None:
    host, port = "127.0.0.1", web_selchat.web_port
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(wsload.upgrade_request(host, port, b"dGhlIHNhbXBsZSBub25jZQ==").replace(b"http://127.0.0.1", b"http://evil.example"))
        assert s.recv(100).startswith(b"HTTP/1.1 403")
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(wsload.upgrade_request(host, port, b"dGhlIHNhbXBsZSBub25jZQ=="))
        head = s.recv(1000)
        assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head


def test_the_web_line_is_not_taken_for_the_native_one() -> None:
    text = "INFO web listening on 127.0.0.1:7002\nINFO listening on 127.0.0.1:7000\n"
    assert launcher._LISTENING.search(text).group(2) == "7000"
    assert launcher._WEB_LISTENING.search(text).group(2) == "7002"


def test_wsfanout_is_planned_and_idle_runs_over_websocket_on_selchat_web() -> None:
    opts = runner.parse_args(["--points", "wsfanout,fanout,idle", "--fanout-receivers", "100,1000", "--idle-sizes", "1000"])
    cases = runner.plan(opts)
    assert [c.label for c in cases] == [
        "fan-out R=100", "fan-out R=1000", "WebSocket fan-out R=100", "WebSocket fan-out R=1000", "idle 1,000",
    ]
    specs = launcher.known_servers()
    web, native = specs["selchat-web"], specs["selchat"]
    assert [c.runs_on(web) for c in cases] == [False, False, True, True, True]
    assert [c.runs_on(native) for c in cases] == [True, True, False, False, True]
    results = {
        (cases[0], "selchat"): runner.Outcome(metrics={"deliveries_per_s": 2000.0}),
        (cases[2], "selchat-web"): runner.Outcome(metrics={"deliveries_per_s": 1500.0}),
    }
    (line,) = runner.ws_ratios(cases, ["selchat", "selchat-web"], results)
    assert "R=100" in line and "**0.75x**" in line


def test_websocket_and_native_fanout_of_one_size_take_turns() -> None:
    opts = runner.parse_args(["--points", "fanout,wsfanout,idle", "--fanout-receivers", "100,1000", "--idle-sizes", "1000"])
    specs = launcher.known_servers()
    groups = runner.interleave_groups(runner.plan(opts), ["selchat", "selchat-web"], specs)
    shown = [[(c.label, n) for c, n in g] for g in groups]
    assert shown == [
        [("fan-out R=100", "selchat"), ("WebSocket fan-out R=100", "selchat-web")],
        [("fan-out R=1000", "selchat"), ("WebSocket fan-out R=1000", "selchat-web")],
        [("idle 1,000", "selchat"), ("idle 1,000", "selchat-web")],
    ]
    alone = runner.interleave_groups(runner.plan(runner.parse_args(["--points", "wsfanout", "--fanout-receivers", "100"])), ["selchat-web"], specs)
    assert [[(c.label, n) for c, n in g] for g in alone] == [[("WebSocket fan-out R=100", "selchat-web")]]


# ---- accounts: selchat-acct logs every client into an account of its own ------------------

import math  # noqa: E402


@pytest.fixture(scope="module")
def acct_selchat():
    spec = launcher.known_servers()["selchat-acct"]
    launcher.resolve_flags(spec)
    if spec.unavailable:
        pytest.skip(spec.unavailable)
    with RunningServer(spec) as srv:
        yield srv


def _login_answer(port: int, account: str, password: str, timeout: float = 20.0) -> dict:
    """Log in as `account` over a fresh connection: the server's first answer (welcome or error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(encode({"type": "hello", "nick": "probe", "login": {"account": account, "password": password}}))
        dec = FrameDecoder()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = s.recv(65536)
            assert data, "the server closed the connection"
            dec.feed(data)
            while (payload := dec.next_frame()) is not None:
                obj = decode(payload)
                if obj["type"] in ("welcome", "error"):
                    return obj
    raise AssertionError("no answer to the login")


def test_selchat_acct_runs_with_two_kdf_workers() -> None:
    spec = launcher.known_servers()["selchat-acct"]
    launcher.resolve_flags(spec)
    if spec.unavailable:
        pytest.skip(spec.unavailable)
    assert spec.accounts and not launcher.known_servers()["selchat"].accounts
    assert " --kdf-workers 2 " in " ".join(spec.command()) + " "


def test_every_member_logged_in_and_every_message_counted(acct_selchat: RunningServer) -> None:
    cfg = loadgen.LoadConfig(
        port=acct_selchat.port, receivers=5, senders=2, duration=0.8, warmup=0.2, drain_quiet=0.2,
        account_password=runner.ACCOUNT_PASSWORD, register_timeout=60,
    )
    res = loadgen.run_load(cfg)
    assert res.errors == {} and res.dropped == 0
    assert res.sent_total > 0 and res.complete
    assert res.per_member_min == res.per_member_max == res.sent_total
    # the accounts exist: each member's nick now opens with the password (a guest's would not)
    for nick in ("s0000", "s0001", "r00000", "r00004"):
        answer = _login_answer(acct_selchat.port, nick, runner.ACCOUNT_PASSWORD)
        assert answer["type"] == "welcome" and answer.get("account") == nick, answer
    assert _login_answer(acct_selchat.port, "r00001", "not-the-password")["code"] == "login_failed"


def test_idle_clients_log_into_their_own_accounts(acct_selchat: RunningServer) -> None:
    rss: dict = {}
    res = loadgen.run_idle(
        "127.0.0.1", acct_selchat.port, 12, lambda edge: rss.setdefault(edge, acct_selchat.rss_kib()),
        extra_joins=3, workers=2, register_timeout=60, account_password=runner.ACCOUNT_PASSWORD,
    )
    assert res.registered == 12 and res.extra_joins == 3 and res.errors == {}
    assert set(rss) == {"before", "after"}
    for nick in ("i00000", "i00011", "j00002"):
        assert _login_answer(acct_selchat.port, nick, runner.ACCOUNT_PASSWORD).get("account") == nick


def test_the_runner_measures_logged_in_against_guests_in_turns() -> None:
    opts = runner.parse_args([
        "--servers", "selchat,selchat-acct", "--points", "fanout,idle", "--fanout-receivers", "3",
        "--idle-sizes", "6", "--extra-joins", "2", "--duration", "0.5", "--warmup", "0.2", "--repeat", "1",
    ])
    specs = launcher.known_servers()
    groups = runner.interleave_groups(runner.plan(opts), opts.servers, specs)
    assert [[(c.label, n) for c, n in g] for g in groups] == [
        [("fan-out R=3", "selchat"), ("fan-out R=3", "selchat-acct")],
        [("idle 6", "selchat"), ("idle 6", "selchat-acct")],
    ]
    for name in opts.servers:
        launcher.resolve_flags(specs[name])
        if specs[name].unavailable:
            pytest.skip(specs[name].unavailable)
    results = {}
    for group in groups:
        for case, name in group:
            out = runner.run_case(case, specs[name], opts)
            assert out.failed is None, out.failed
            assert not any(n.startswith("incomplete") for n in out.notes), out.notes
            results[(case, name)] = out
    fan, idle = (g[0][0] for g in groups)
    assert results[(fan, "selchat-acct")].metrics["deliveries_per_s"] > 0
    assert results[(fan, "selchat-acct")].metrics["register_s"] > 0  # the accounts' time is shown
    assert "register_s" not in results[(fan, "selchat")].metrics
    assert all(not math.isnan(results[(idle, n)].metrics["kib_per_conn"]) for n in opts.servers)
    lines = runner.account_ratios([fan, idle], opts.servers, results)
    assert len(lines) == 2
    assert lines[0].startswith("* logged-in / guest fan-out at R=3: ") and "x** (server CPU µs/delivery " in lines[0]
    assert lines[1].startswith("* KiB per idle user at idle 6: logged in ")
    text = runner.report(opts, [fan, idle], opts.servers, specs, results, time.monotonic(), None, {})
    assert "selchat-acct: every client" in text and "logged-in / guest fan-out" in text


class RefusingAccountStub:
    """A framed server in a thread that welcomes every hello and refuses each connection's
    first `register` with `unavailable` (as selchat does when a hash waited too long for a KDF
    worker), then makes the account: the generator must send it again, not give up."""

    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.registers = 0
        self.stopping = False
        self.threads: List[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        dec = FrameDecoder()
        nick, refused = "", False
        conn.settimeout(0.2)
        with conn:
            while not self.stopping:
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                dec.feed(data)
                while (payload := dec.next_frame()) is not None:
                    obj = decode(payload)
                    if obj["type"] == "hello":
                        nick = obj["nick"]
                        conn.sendall(encode({"type": "welcome", "nick": nick, "rooms": ["#lobby"]}))
                    elif obj["type"] == "register":
                        self.registers += 1
                        if not refused:
                            refused = True
                            conn.sendall(encode({"type": "error", "code": "unavailable", "message": "try again", "ref": obj.get("ref")}))
                        else:
                            conn.sendall(encode({"type": "account", "account": nick, "nick": nick, "ref": obj.get("ref")}))

    def close(self) -> None:
        self.stopping = True
        self.lsock.close()
        for t in [self.thread] + self.threads:
            t.join(5)


def test_a_register_refused_as_unavailable_is_sent_again() -> None:
    stub = RefusingAccountStub()
    try:
        res = loadgen.run_idle(
            "127.0.0.1", stub.port, 6, extra_joins=0, workers=2, register_timeout=20, account_password="pass-word-1",
        )
        assert res.registered == 6
        assert res.errors == {"register_retried:unavailable": 6}
        assert stub.registers == 12
    finally:
        stub.close()
