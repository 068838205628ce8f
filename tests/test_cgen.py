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
    the Python generator's, welcomes, pings with a token, and echoes each say as a message
    (unless `echo` is false: then a window-mode sender stops at its window)."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
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
                    elif obj["type"] == "say" and self.echo:
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


# ---- rate mode (--rate): a fixed offered rate, paced from the load's start, every message timed ----


def _stamps(says: List[bytes]) -> List[int]:
    head, _ = text_parts(100)
    return [int(say[len(head) + 1 : len(head) + 17]) for say in says]


def test_rate_mode_keeps_sending_without_echoes_and_stamps_each_message(binary: Path) -> None:
    """No window: a server that echoes nothing still gets rate x time messages, each stamped
    when it went out (a window-mode sender would stop at its window of 2)."""
    stub = FramedStub(echo=False)
    cfg = cgen.CgenConfig(port=stub.port, receivers=0, senders=1, window=2, duration=0.5, warmup=0.2, rate=100, drain_quiet=0.2)
    r = cgen.run(binary, cfg)
    stub.thread.join(20)
    assert not stub.errors and r["rate"] == 100 and r["sample_every"] == 1
    says = stub.frames[2:]
    assert len(says) == r["sent_total"]
    assert abs(r["sent_total"] - 100 * 0.7) <= 100 * 0.7 * 0.15 + 3, r["sent_total"]
    stamps = _stamps(says)
    assert stamps == sorted(stamps) and len(set(stamps)) > len(stamps) * 0.9  # not one stamp for a burst
    span_s = (stamps[-1] - stamps[0]) / 1e6
    assert 0.5 <= span_s <= 1.0, span_s  # paced over the load, not sent at once
    assert r["samples"] == 0 and r["p50_ms"] is None  # nothing came back, nothing timed


def _rate_run(binary: Path, port: int, protocol: str) -> dict:
    cfg = cgen.CgenConfig(
        port=port, protocol=protocol, receivers=8, senders=3, duration=1.0, warmup=0.3, rate=200,
        drain_quiet=0.5, register_timeout=20, probes=2, bulk_ms=5.0,  # 3 senders, 2 probes, 6 bulk (IRC: 3 counters)
    )
    r = cgen.run(binary, cfg)
    assert r["ok"] and r["complete"] and r["errors"] == {} and r["dropped"] == 0, r
    assert r["rate"] == 200 and r["sample_every"] == 1 and r["protocol"] == protocol
    # the generator's own pacing: message k at t_send + k/200, for warmup + duration seconds
    assert abs(r["sent_total"] - 200 * 1.3) <= 200 * 1.3 * 0.1 + 5, r["sent_total"]
    assert abs(r["sent_per_s"] - 200) <= 200 * 0.15, r["sent_per_s"]
    assert r["samples"] > 0 and r["p50_ms"] is not None and 0 <= r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    return r


def test_rate_mode_against_the_native_door(binary: Path, native_server: RunningServer) -> None:
    r = _rate_run(binary, native_server.port, "native")
    # every message timed at the 3 senders (their echoes) and the 2 probes: ~5 per message in the window
    in_window = r["sent_per_s"] * r["duration"]
    assert abs(r["samples"] - 5 * in_window) <= 5 * (0.1 * in_window + 10), (r["samples"], in_window)
    assert r["received_total"] == r["sent_total"] * 11


def test_rate_mode_against_the_irc_door(binary: Path, irc_server: RunningServer) -> None:
    r = _rate_run(binary, irc_server.irc_port, "irc")
    # timed: receivers 0, 3, 5 (the counters) and 0, 4 (the probes) get every message, each
    # sender the others' (2 of 3)
    in_window = r["sent_per_s"] * r["duration"]
    want = (4 + 3 * 2 / 3) * in_window
    assert abs(r["samples"] - want) <= 0.1 * want + 70, (r["samples"], want)
    assert r["received_total"] == r["sent_total"] * 8 + r["sent_total"] * 2


def test_window_mode_is_unchanged_by_the_rate_option() -> None:
    argv = cgen.CgenConfig(port=1).argv(Path("/bin/cgen"))
    assert "--rate" not in argv and "--sample-every" not in argv  # the program's defaults: window, every 4th
    argv = cgen.CgenConfig(port=1, rate=250, sample_every=2).argv(Path("/bin/cgen"))
    assert argv[argv.index("--rate") + 1] == "250.0" and argv[argv.index("--sample-every") + 1] == "2"


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
    assert runner.uses_cgen(runner.Case("latency", 100), spec, opts)  # rate mode
    assert runner.uses_cgen(runner.Case("irclatency", 100), launcher.known_servers()["inspircd"], opts)
    assert not runner.uses_cgen(runner.Case("latency", 100), launcher.known_servers()["selchat-acct"], opts)
    assert not runner.uses_cgen(runner.Case("wsfanout", 100), spec, opts)
    assert not runner.uses_cgen(runner.Case("idle", 100), spec, opts)


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


# ---- the latency points: native and IRC at a fixed rate, one generator, side by side ------------


def test_latency_points_are_planned_labelled_and_take_turns() -> None:
    opts = runner.parse_args(["--points", "irclatency,latency,ircfanout", "--fanout-receivers", "10", "--latency-receivers", "50"])
    cases = runner.plan(opts)
    assert [c.label for c in cases] == ["IRC fan-out R=10", "latency R=50", "IRC latency R=50"]
    assert "irclatency" in runner.ALL_POINTS and runner.Case("irclatency", 5).protocol == "irc"
    specs = launcher.known_servers()
    assert [c.runs_on(specs["inspircd"]) for c in cases] == [True, False, True]
    groups = runner.interleave_groups(cases, ["selchat", "selchat-irc", "inspircd", "ngircd"], specs)
    assert [[(c.label, n) for c, n in g] for g in groups] == [
        [("IRC fan-out R=10", "selchat-irc"), ("IRC fan-out R=10", "inspircd"), ("IRC fan-out R=10", "ngircd")],
        [("latency R=50", "selchat"), ("IRC latency R=50", "selchat-irc"), ("IRC latency R=50", "inspircd"),
         ("IRC latency R=50", "ngircd")],
    ]


def test_latency_comparison_says_whether_selchat_is_no_worse() -> None:
    nat, irc = runner.Case("latency", 100), runner.Case("irclatency", 100)

    def lat(p50: float, p99: float, gen_c: float = 1.0) -> runner.Outcome:
        return runner.Outcome(metrics=_m(p50_ms=p50, p99_ms=p99, rate=200.0, gen_c=gen_c, gen_bound=0.0, server_cores=0.05))

    results = {
        (nat, "selchat"): lat(0.20, 0.90),
        (irc, "selchat-irc"): lat(0.30, 1.50),
        (irc, "inspircd"): lat(0.25, 1.00),
    }
    servers = ["selchat", "selchat-irc", "inspircd"]
    lines = runner.latency_ratios([nat, irc], servers, results)
    assert lines == [
        "* selchat (native) / inspircd latency at R=100, 200 msg/s: p50 0.200 / 0.250 ms, p99 0.900 / 1.000 ms: **no worse**",
        "* selchat-irc (IRC door) / inspircd latency at R=100, 200 msg/s: p50 0.300 / 0.250 ms, p99 1.500 / 1.000 ms: "
        "**worse** (p50 1.20x, p99 1.50x)",
    ]
    text = runner.table([nat, irc], servers, results)
    assert "not CPU-bound" not in text  # a fixed rate never uses the server up: no such note
    results[(nat, "selchat")] = lat(0.20, 0.90, gen_c=0.0)  # selchat-acct style: the Python generator
    assert runner.latency_ratios([nat], servers, results)[0].endswith("(not the same generator: C and Python)")
    assert runner.latency_ratios([nat, irc], ["selchat", "selchat-irc"], results) == []  # no peer, no line
    results[(irc, "inspircd")].metrics["gen_bound"] = 1.0  # its generator's CPU was full: no verdict
    lines = runner.latency_ratios([nat, irc], servers, results)
    assert len(lines) == 2 and all(ln.endswith(runner.LAT_GEN_BOUND_SHOWN) and "worse" not in ln for ln in lines)


def test_runner_latency_points_end_to_end(cache: Path, capsys: pytest.CaptureFixture) -> None:
    """selchat-bench itself: native latency on selchat and irclatency on selchat-irc (and
    InspIRCd when installed), both with the C generator at a fixed rate, tiny sizes."""
    code = runner.main([
        "--servers", "selchat,selchat-irc,inspircd", "--points", "irclatency,latency", "--repeat", "1",
        "--duration", "0.6", "--warmup", "0.2", "--latency-receivers", "4", "--latency-senders", "2",
        "--latency-rate", "100", "--no-write", "--plot", "",
    ])
    assert code == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[2].strip(): ln for ln in out.splitlines() if ln.startswith("| latency R=4 ") or ln.startswith("| IRC latency R=4 ")}
    assert set(rows) >= {"selchat", "selchat-irc"}, out
    for name, row in rows.items():
        cells = [c.strip() for c in row.split("|")]
        assert cells[1] == ("latency R=4" if name == "selchat" else "IRC latency R=4")
        p50, p99 = float(cells[6]), float(cells[7])
        assert 0 <= p50 <= p99, row
        assert "n/a" not in row and "incomplete" not in row and "Python generator" not in row, row
    assert "the senders together offer 100 messages/s" in out and "Generator: C in its rate mode" in out
    if "inspircd" in rows:
        assert "* selchat (native) / inspircd latency at R=4, 100 msg/s: p50 " in out
        assert "* selchat-irc (IRC door) / inspircd latency at R=4, 100 msg/s: p50 " in out


def test_runner_irclatency_point_measures_at_the_rate(cache: Path) -> None:
    opts = runner.parse_args([
        "--points", "irclatency", "--latency-receivers", "3", "--latency-senders", "2", "--latency-rate", "100",
        "--duration", "0.6", "--warmup", "0.2",
    ])
    (case,) = runner.plan(opts)
    spec = launcher.known_servers()["selchat-irc"]
    launcher.resolve_flags(spec)
    if spec.unavailable:
        pytest.skip(spec.unavailable)
    out = runner.run_case(case, spec, opts)
    assert out.failed is None, out.failed
    m = out.metrics
    assert m["gen_c"] == 1.0 and m["rate"] == 100.0 and m["samples"] > 0
    assert abs(m["sent_per_s"] - 100) <= 15, m["sent_per_s"]
    assert 0 <= m["p50_ms"] <= m["p99_ms"] and m["lines_per_s"] > 0
    assert not any(n.startswith("incomplete") or n.startswith("errors") for n in out.notes), out.notes
