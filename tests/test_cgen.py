"""The C load generator (selchat/bench/cgen): it builds, speaks both protocols byte for byte
as the Python generator does, counts exactly, and the runner never quotes a figure it limited.

Real sockets on 127.0.0.1, real selchat servers (native door and IRC door), short bounded
runs; nothing here asserts a speed. Skipped without a C compiler.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from selchat.bench import cgen, launcher, runner
from selchat.bench.launcher import RunningServer
from selchat.bench.worker import text_parts

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the generator uses epoll and /proc"),
    pytest.mark.skipif(cgen.find_cc() is None, reason="no C compiler (cc) to build the generator"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A build cache of this module's own; the runner's lazy build finds it through the env."""
    path = tmp_path_factory.mktemp("cgen-cache")
    old = os.environ.get("SELCHAT_BENCH_CACHE")
    os.environ["SELCHAT_BENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SELCHAT_BENCH_CACHE", None)
    else:
        os.environ["SELCHAT_BENCH_CACHE"] = old


@pytest.fixture(scope="module")
def binary(cache: Path) -> Path:
    return cgen.build(cache)


def _selchat(name: str) -> Iterator[RunningServer]:
    spec = launcher.known_servers()[name]
    launcher.resolve_flags(spec)
    if spec.unavailable:
        pytest.skip(spec.unavailable)
    with RunningServer(spec) as srv:
        yield srv


@pytest.fixture(scope="module")
def native_server() -> Iterator[RunningServer]:
    yield from _selchat("selchat")


@pytest.fixture(scope="module")
def irc_server() -> Iterator[RunningServer]:
    yield from _selchat("selchat-irc")


def test_it_builds_once_per_source(cache: Path, binary: Path) -> None:
    assert os.access(binary, os.X_OK) and binary.parent == cache
    stamp = binary.stat().st_mtime_ns
    assert cgen.build(cache) == binary and binary.stat().st_mtime_ns == stamp  # cached, not rebuilt


def test_a_missing_compiler_is_said_in_one_line_and_python_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SELCHAT_BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cgen.CgenUnavailable):
        cgen.build()
    opts = runner.parse_args(["--points", "fanout"])
    assert opts.generator == "c"
    assert runner.cgen_binary(opts) is None
    assert opts.generator == "python"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "using the Python generator" in err[0]
    spec = launcher.known_servers()["selchat"]
    assert not runner.uses_cgen(runner.Case("fanout", 100), spec, opts)


@pytest.mark.parametrize("bulk_ms", [0.0, 5.0])
def test_native_counts_are_exact(binary: Path, native_server: RunningServer, bulk_ms: float) -> None:
    edges: List[str] = []
    cfg = cgen.CgenConfig(
        port=native_server.port, receivers=12, senders=3, window=4, duration=0.3, warmup=0.1,
        messages=40, drain_quiet=0.3, register_timeout=20, bulk_ms=bulk_ms, probes=2,  # 10 bulk receivers
    )
    r = cgen.run(binary, cfg, edges.append)
    assert edges == ["start", "end"]
    assert r["ok"] and r["complete"] and r["errors"] == {} and r["dropped"] == 0
    assert r["registered"] == 15 and r["sent_total"] == 3 * 40
    # every say reaches every member, its sender too (selchat echoes): 120 messages x 15 members
    assert r["per_member_min"] == r["per_member_max"] == 120
    assert r["received_total"] == 120 * 15 and r["lost"] == 0
    assert r["deliveries"] <= 120 * 15
    assert 0 <= r["gen_cpu_proc"] < 2 and r["generator"] == "c"


def test_native_load_without_a_count_is_complete(binary: Path, native_server: RunningServer) -> None:
    cfg = cgen.CgenConfig(port=native_server.port, receivers=5, senders=2, duration=0.5, warmup=0.2, drain_quiet=0.3)
    r = cgen.run(binary, cfg)
    assert r["complete"] and r["sent_total"] > 0 and r["received_total"] == r["sent_total"] * 7
    # inside the window, deliveries are what was sent times the members, up to what was in
    # flight at the window's edges (at most `window` per sender at each edge)
    sent_in_window = r["sent_per_s"] * r["duration"]
    assert abs(r["deliveries"] - sent_in_window * 7) <= 2 * cfg.window * cfg.senders * 7
    assert r["samples"] > 0 and r["p50_ms"] is not None and 0 <= r["p50_ms"] <= r["p99_ms"]


def test_irc_counts_are_exact(binary: Path, irc_server: RunningServer) -> None:
    cfg = cgen.CgenConfig(
        port=irc_server.irc_port, protocol="irc", receivers=4, senders=3, window=4, duration=0.3, warmup=0.1,
        messages=40, drain_quiet=0.5, register_timeout=20,
    )
    r = cgen.run(binary, cfg)
    assert r["ok"] and r["complete"] and r["errors"] == {} and r["protocol"] == "irc"
    assert r["sent_total"] == 120
    # IRC does not echo: receivers get all 120, each sender the 80 of the other two
    assert r["received_total"] == 120 * 4 + 80 * 3
    assert r["per_member_min"] == r["per_member_max"] == 120  # a sender is credited its own
    assert r["lines_per_s"] >= r["deliveries_per_s"] >= 0  # all 120 may be sent before the window opens


def test_irc_without_enough_receivers_for_the_counters_is_refused(binary: Path) -> None:
    out = subprocess.run([str(binary), "--port", "1", "--proto", "irc", "-R", "2", "-S", "3"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 2 and json.loads(out.stdout)["ok"] is False


def test_only_loopback(binary: Path) -> None:
    out = subprocess.run([str(binary), "--host", "10.1.2.3", "--port", "9"], capture_output=True, text=True, timeout=10)
    res = json.loads(out.stdout)
    assert out.returncode == 2 and not res["ok"] and "loopback" in res["error"]


def test_a_refused_connection_fails_the_point_quickly(binary: Path) -> None:
    port = launcher.free_port()  # nobody listens there now
    cfg = cgen.CgenConfig(port=port, receivers=2, senders=1, duration=0.2, warmup=0.0, register_timeout=3)
    t = time.monotonic()
    with pytest.raises(cgen.CgenFailed, match="registered 0 of 3"):
        cgen.run(binary, cfg)
    assert time.monotonic() - t < 10


class FramedStub:
    """One framed connection in a thread: checks the generator's hello and say bytes against
    the Python generator's, welcomes, pings with a token, and echoes each say as a message."""

    def __init__(self) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.frames: List[bytes] = []
        self.errors: List[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def frame(obj: dict) -> bytes:
        data = json.dumps(obj, separators=(",", ":")).encode()
        return struct.pack(">I", len(data)) + data

    def _serve(self) -> None:
        self.lsock.settimeout(10)
        try:
            conn, _ = self.lsock.accept()
        except OSError as exc:
            self.errors.append(repr(exc))
            return
        conn.settimeout(0.5)
        buf = b""
        deadline = time.monotonic() + 15
        msg_id = 0
        with conn:
            while time.monotonic() < deadline:
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = struct.unpack(">I", buf[:4])[0]
                    payload, buf = buf[4 : 4 + n], buf[4 + n :]
                    self.frames.append(payload)
                    obj = json.loads(payload)
                    if obj["type"] == "hello":
                        conn.sendall(self.frame({"type": "welcome", "nick": obj["nick"]}))
                        conn.sendall(self.frame({"type": "ping", "token": {"k": [1, "two"]}}))
                    elif obj["type"] == "say":
                        msg_id += 1
                        conn.sendall(self.frame({"type": "message", "id": msg_id, "from": "s0000", "room": obj["room"], "text": obj["text"]}))


def test_native_bytes_match_the_python_generator_and_pings_are_answered(binary: Path) -> None:
    stub = FramedStub()
    cfg = cgen.CgenConfig(port=stub.port, receivers=0, senders=1, window=2, duration=0.3, warmup=0.1, messages=5, drain_quiet=0.2)
    r = cgen.run(binary, cfg)
    stub.thread.join(20)
    assert not stub.errors and r["complete"] and r["sent_total"] == 5
    hello = json.dumps({"type": "hello", "nick": "s0000", "client": "selchat-bench"}).encode()  # as worker.py writes it
    assert stub.frames[0] == hello
    assert json.loads(stub.frames[1]) == {"type": "pong", "token": {"k": [1, "two"]}}
    head, tail = text_parts(100)
    says = stub.frames[2:]
    assert len(says) == 5
    for say in says:
        assert say.startswith(head + b"A") and say.endswith(tail) and len(say) == len(head) + 1 + 16 + len(tail)
        assert say[len(head) + 1 : len(head) + 17].isdigit()


# ---- the runner: the C generator by default, flags, no ratio of a generator-bound row ---------


def test_runner_runs_a_fanout_point_with_the_c_generator(cache: Path, native_server: RunningServer) -> None:
    opts = runner.parse_args(["--points", "fanout", "--duration", "0.4", "--warmup", "0.2", "--senders", "2"])
    spec = launcher.known_servers()["selchat"]
    launcher.resolve_flags(spec)
    case = runner.Case("fanout", 3)
    assert runner.uses_cgen(case, spec, opts)
    out = runner.run_case(case, spec, opts)
    assert out.failed is None, out.failed
    m = out.metrics
    assert m["gen_c"] == 1.0 and m["deliveries_per_s"] > 0 and not any(n.startswith("incomplete") for n in out.notes)
    assert "gen_bound" in m
    if opts.pin:  # two CPUs: both CPUs' idle time was read
        assert 0 <= m["server_cpu_idle"] <= 1 and 0 <= m["gen_cpu_idle"] <= 1
    assert not runner.uses_cgen(case, launcher.known_servers()["selchat-acct"], opts)  # accounts: Python
    assert not runner.uses_cgen(runner.Case("latency", 100), spec, opts)


def _m(**kw: float) -> dict:
    base = {"deliveries_per_s": 1e6, "cpu_us_per_delivery": 0.5, "server_cores": 0.95, "gen_cpu": 0.4, "gen_c": 1.0,
            "other_cores": 0.0, "softirq_cores": 0.1}
    base.update(kw)
    return base


def test_generator_bound_rules_on_synthetic_figures() -> None:
    gb = runner.generator_bound
    # pinned: the generator's CPU had no idle time while the server's had some
    assert gb(_m(gen_cpu=0.95, gen_cpu_idle=0.02, server_cpu_idle=0.3))
    assert gb(_m(gen_cpu=0.6, gen_cpu_idle=0.05, server_cpu_idle=0.2))  # softirq filled its CPU
    assert not gb(_m(gen_cpu=0.95, gen_cpu_idle=0.02, server_cpu_idle=0.01))  # both full: the server was at its limit
    assert not gb(_m(gen_cpu=0.5, gen_cpu_idle=0.4, server_cpu_idle=0.0))
    assert not gb(_m(gen_cpu=0.5, gen_cpu_idle=0.4, server_cpu_idle=0.5))  # neither full: round trips, not CPU
    # not pinned: the generator's own CPU and the server's
    assert gb(_m(gen_cpu=0.92, server_cores=0.6))
    assert not gb(_m(gen_cpu=0.92, server_cores=0.97))
    assert not gb(_m(gen_cpu=0.5, server_cores=0.6))
    # the Python generator keeps its rule
    assert gb(_m(gen_c=0.0, gen_cpu=0.85)) and not gb(_m(gen_c=0.0, gen_cpu=0.7))


def test_a_generator_bound_row_is_flagged_and_never_a_ratio() -> None:
    r100 = runner.Case("ircfanout", 100)
    n100 = runner.Case("fanout", 100)
    bound = _m(gen_cpu=0.97, gen_cpu_idle=0.01, server_cpu_idle=0.4, server_cores=0.6)
    bound["gen_bound"] = 1.0
    ok = _m(deliveries_per_s=2e6, gen_cpu_idle=0.3, server_cpu_idle=0.0)
    ok["gen_bound"] = 0.0
    results = {
        (n100, "selchat"): runner.Outcome(metrics=dict(ok)),
        (r100, "selchat-irc"): runner.Outcome(metrics=dict(ok)),
        (r100, "inspircd"): runner.Outcome(metrics=dict(bound)),
    }
    servers = ["selchat", "selchat-irc", "inspircd"]
    cases = [n100, r100]
    text = runner.table(cases, servers, results)
    row = [ln for ln in text.splitlines() if "| inspircd |" in ln][0]
    assert "**generator-bound" in row and "figure not valid" in row
    assert all(ln.count("|") == text.splitlines()[0].count("|") for ln in text.splitlines())
    ratios = runner.peer_ratios(cases, servers, results)
    assert len(ratios) == 2 and all("generator-bound" in ln and "x**" not in ln for ln in ratios)
    matrix = "\n".join(runner.fanout_matrix(cases, servers, results))
    assert "generator-bound (0.00 M)" not in matrix and "generator-bound (1.00 M)" in matrix
    # the same figures, not bound: a ratio
    results[(r100, "inspircd")] = runner.Outcome(metrics=dict(ok, deliveries_per_s=1e6))
    ratios = runner.peer_ratios(cases, servers, results)
    assert ratios[0].startswith("* selchat / inspircd at R=100: 2,000,000 / 1,000,000 deliveries/s = **2.00x**")


def test_one_bound_repetition_marks_the_median_row() -> None:
    runs = [runner.Outcome(metrics=_m(gen_bound=b)) for b in (0.0, 1.0, 0.0)]
    med = runner.median_outcome(runs)
    assert runner.is_generator_bound(med) and math.isclose(med.metrics["gen_bound"], 1 / 3)
    assert "generator-bound in 1 of 3 repetitions" in med.notes
    assert not runner.is_generator_bound(runner.median_outcome([runner.Outcome(metrics=_m(gen_bound=0.0))] * 3))


def test_irc_and_native_fanout_of_one_size_take_turns() -> None:
    opts = runner.parse_args(["--points", "fanout,ircfanout", "--fanout-receivers", "10,100"])
    specs = launcher.known_servers()
    groups = runner.interleave_groups(runner.plan(opts), ["selchat", "selchat-irc", "inspircd"], specs)
    assert [[(c.label, n) for c, n in g] for g in groups] == [
        [("fan-out R=10", "selchat"), ("IRC fan-out R=10", "selchat-irc"), ("IRC fan-out R=10", "inspircd")],
        [("fan-out R=100", "selchat"), ("IRC fan-out R=100", "selchat-irc"), ("IRC fan-out R=100", "inspircd")],
    ]


def test_pin_option() -> None:
    assert runner.parse_args(["--pin", "off"]).pin is None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert runner.parse_args(["--pin", f"{cpus[1]},{cpus[0]}"]).pin == (cpus[1], cpus[0])
    assert runner.parse_args(["--pin", "0,0"]).pin is None
