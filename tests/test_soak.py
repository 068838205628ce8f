"""benchmarks/soak.py: its bookkeeping (pure functions, by property) and one short real run.

The run is a smoke test of the driver, not a benchmark: a few seconds with every attacker
kind at a small size, checked for what must hold whatever the machine's load (nothing lost,
no well-behaved client refused or dropped, the same stalls in both runs, the hoarders held to
their address's share, newcomers still able to create a room, the server alive). Latency is
machine-dependent and is only checked to be reported.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

from hypothesis import given, strategies as st

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
assert _spec is not None and _spec.loader is not None
soak: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

spans = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**4)), max_size=8)


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**3)), max_size=50), spans,
       st.integers(0, 10**4))
def test_outside_windows_keeps_exactly_the_deliveries_that_touch_no_window(
        deliveries: List[Tuple[int, int]], windows: List[Tuple[int, int]], settle: int) -> None:
    wins = [(a, a + n) for a, n in windows]
    send = [t for t, _ in deliveries]
    lat = [v for _, v in deliveries]
    kept = soak.outside_windows(send, lat, wins, settle)
    expected = [v for t, v in deliveries
                if all(not (t < b + settle and t + v * 1000 > a) for a, b in wins)]
    assert kept == expected
    if not wins:
        assert kept == lat


@given(st.floats(0.5, 600), st.floats(0.1, 60), st.floats(0.1, 10))
def test_stall_schedule_stays_inside_the_run_and_is_spaced(duration: float, every: float, length: float) -> None:
    sched = soak.stall_schedule(duration, every, length)
    for offset, seconds in sched:
        assert 0 < offset and offset + seconds <= duration + 1e-9
        assert seconds <= length
    for (a, _), (b, _) in zip(sched, sched[1:]):
        assert abs((b - a) - every) < 1e-6
    assert soak.stall_schedule(duration, 0, length) == []


@given(st.floats(0.1, 9.9), st.floats(0, 5), st.integers(1, 50))
def test_parse_rates_spreads_a_range_evenly(lo: float, width: float, n: int) -> None:
    rates = soak.parse_rates(f"{lo}-{lo + width}", n)
    assert len(rates) == n
    assert all(lo - 1e-9 <= r <= lo + width + 1e-9 for r in rates)
    assert rates == sorted(rates)
    assert soak.parse_rates(str(lo), n) == [lo] * n


def test_memory_bound_is_the_readme_formula() -> None:
    kib = 1024
    assert soak.memory_bound_bytes(0, 65536, 16384) == 62 * 1024 * kib
    assert soak.memory_bound_bytes(10, 65536, 16384) == 62 * 1024 * kib + 10 * (64 + 16 + 64 + 4) * kib


def test_a_short_run_with_every_attacker(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "3", "--clients", "6",
           "--fill-rooms", "30", "--long-messages", "5", "--hoard-addresses", "2", "--hoard-conns", "2",
           "--churn-rate", "50", "--rooms-askers", "1", "--history-askers", "1", "--pong-flooders", "1",
           "--stall-every", "2", "--stall-for", "0.5", "--no-write", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=str(ROOT))
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1 only for a check, e.g. p99 on a busy machine
    assert out.exists(), proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    assert [r["abusers"] for r in runs] == [True, False]
    for r in runs:
        good = r["good"]
        assert "error" not in good, good
        assert good["lost"] == 0 and good["delivered"] == good["expected"] > 0
        assert good["refused"] == 0 and good["well_behaved_closed"] == 0 and not good["other_errors"]
        assert good["latency_ms"]["p99"] is not None and good["latency_outside_ms"]["p99"] is not None
        assert r["alive"] and r["exit_code"] == 0 and not r["server_errors"]
        assert r["peak_rss_kib"] <= r["bound_kib"]
        assert len(r["stall_windows"]) == len(r["stall_schedule"]) == 1  # both runs: the same stall
    dirty = runs[0]
    facts = dirty["abusers_result"]["facts"]
    assert facts["filled"] == 30 and facts["long_messages"] == 5
    assert set(facts["newcomers"].values()) == {"joined"}
    assert facts["hoard_max_per_address"] <= soak.ROOMS_PER_ADDRESS
    kinds = dirty["abusers_result"]["kinds"]
    for kind in ("pong flooder", "pre-registration bad hello flood", "pre-registration bad JSON flood",
                 "pre-registration ping flood"):
        assert kind in kinds, sorted(kinds)
    assert dirty["churn_result"]["connections"] > 0
    assert dirty["abusers_result"]["facts"]["askers"]["rooms pager"]["answers"] > 0
    assert "| **deliveries lost** (must be 0) | **0** | **0** |" in proc.stdout
    assert "README bound" in proc.stdout and "Checks:" in proc.stdout
