"""The login-storm scenario of selchat-bench (selchat/bench/loginstorm.py), run tiny.

It proves the instrument works against the real server: accounts get registered, the
bystanders' every message is counted in the right window, right passwords get `welcome`
and wrong ones `login_failed`, the KDF worker is found and its CPU read. No speed is
asserted (that is what benchmarks/RESULTS.md is for).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from selchat.bench import loginstorm, runner
from selchat.bench.loginstorm import StormConfig, StormResult, Window

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the scenario reads /proc")


def _server_has_accounts() -> bool:
    """The server takes --kdf-workers (accounts are wired into it)."""
    out = subprocess.run([sys.executable, "-m", "selchat.server", "--help"], capture_output=True, text=True,
                         timeout=30, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    return "--kdf-workers" in out.stdout


ROOT = Path(__file__).resolve().parent.parent


def test_a_tiny_storm_runs_end_to_end() -> None:
    if not _server_has_accounts():
        pytest.skip("selchat.server has no --kdf-workers yet")
    cfg = StormConfig(accounts=6, rate=20, wrong=0.5, bystanders=2, say_rate=5, quiet=0.5, storm=1, cycles=2,
                      gap=0.3, login_timeout=8)
    res = loginstorm.run_point(cfg)
    quiet, storm = res.windows
    assert res.registered == 6
    assert quiet.samples and storm.samples  # both windows measured
    assert res.lost == 0  # every copy of every bystander message arrived
    assert storm.logins["started"] == 40  # 20 a second, two windows of a second
    assert len(res.cycle_p99) == 2
    assert storm.logins.get("welcome", 0) > 0
    assert storm.logins.get("login_failed", 0) + storm.logins.get("login_throttled", 0) > 0
    odd = [k for k in storm.logins if "with" in k or k in ("timeout", "not_started")]
    assert odd == []  # a right password was never refused, a wrong one never let in
    assert len(storm.login_ms) == 40
    assert res.worker_pids  # the server's KDF worker was found
    assert res.ratio is not None
    text = loginstorm.table([res])
    assert "| 1 | quiet |" in text and "| 1 | storm |" in text


def _fake(workers: int) -> StormResult:
    quiet = Window("quiet", 10, samples=[1.0] * 98 + [2.0, 3.0])
    storm = Window("storm", 10, samples=[1.0] * 98 + [4.0, 6.0],
                   logins={"started": 500, "welcome": 340, "login_failed": 150, "login_throttled": 9, "timeout": 1},
                   login_ms=[20.0] * 500, server_cores=0.2, worker_cores=0.7)
    return StormResult(StormConfig(kdf_workers=workers), [quiet, storm], registered=100, register_s=3.0, sent=1000)


def test_the_report_shows_both_windows_and_the_ratio() -> None:
    text = loginstorm.report([_fake(1), _fake(0)], "selchat-bench --points loginstorm", 30)
    assert "login storm" in text and "`selchat-bench --points loginstorm`" in text
    assert "| 1 | storm | 100 | 1.00 | 6.00 | 6.00 | 500 (50.0) | 340 / 150 / 9 / 1 | 20.00 / 20.00 | 0.20 | 0.70 |" in text
    assert "| 0 (in the loop) | quiet |" in text
    assert "= **2.00x** (within 3x)" in text
    assert "timeout 1" in text


def test_selchat_bench_knows_the_point_outside_its_default() -> None:
    opts = runner.parse_args(["--points", "loginstorm", "--storm-rate", "25", "--storm-kdf-workers", "1,0"])
    assert opts.points == ["loginstorm"]
    cfg = loginstorm.config_from(opts, 0)
    assert cfg.rate == 25 and cfg.kdf_workers == 0
    assert "loginstorm" not in runner.parse_args([]).points


def test_source_addresses_are_distinct_loopback_addresses() -> None:
    addrs = {loginstorm.source_address(i, 2000) for i in range(2000)}
    assert len(addrs) == 2000
    assert all(a.startswith("127.1.") and not a.endswith(".0") and not a.endswith(".255") for a in addrs)
