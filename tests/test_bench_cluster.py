"""selchat-bench's cluster point (selchat/bench/cluster.py) on a tiny bounded load.

A real redis-server (its own, loopback, a temporary directory) and three selchat processes
with --redis, against one process without Redis: every phase's counts are positive and
consistent (every member got every message sent, once), the figures the report needs are
there. No assertion on speed. Skipped only when redis-server is not installed.
"""

from __future__ import annotations

import math
from typing import Dict

import pytest

from selchat.bench import cluster

pytestmark = pytest.mark.skipif(not cluster.redis_available(), reason="redis-server is not installed (Debian package redis-server)")

R, S = 6, 3  # two receivers and one sender per process


def _cfg() -> cluster.ClusterConfig:
    return cluster.ClusterConfig(receivers=R, senders=S, duration=1.0, warmup=0.3, window=4, rate=60.0,
                                 register_timeout=30.0, drain_timeout=10.0, idle=0.5)


def _consistent(m: Dict[str, float]) -> None:
    assert m["deliveries_per_s"] > 0 and m["sent_per_s"] > 0
    for phase in ("flow", "paced"):
        assert m[f"{phase}_sent"] > 0
        assert m[f"{phase}_lost"] == 0
    # every message reaches all R + S members: deliveries/s is (R + S) x messages/s, up to
    # what was in flight at the window's edges (at most `window` per sender at each edge)
    cfg = _cfg()
    slack = 2 * cfg.window * S * (R + S) / cfg.duration
    assert abs(m["deliveries_per_s"] - m["sent_per_s"] * (R + S)) <= 1.5 * slack, m
    assert m["cpu_us_per_delivery"] > 0 and m["server_cores"] > 0


def test_cluster_and_single_process_on_the_same_load() -> None:
    cfg = _cfg()
    clustered = cluster.run_setup("cluster", cfg)
    assert clustered.failed is None, clustered.failed
    m = clustered.metrics
    _consistent(m)
    # Redis ran one publication script per change: at least the messages of the window
    assert m["redis_cores"] > 0 and m["publications_per_s"] >= 0.5 * m["sent_per_s"]
    assert m["redis_us_per_msg"] > 0
    # cross-process arrivals were timed (each probe hears two other processes' senders)
    assert m["paced_cross_samples"] > 0 and m["paced_same_samples"] > 0
    assert not math.isnan(m["paced_cross_p99_ms"])
    assert m["idle_server_cores"] >= 0 and m["idle_redis_cores"] >= 0
    assert 0 < m["script_us_per_pub"] < m["redis_us_per_pub"] or math.isnan(m["redis_us_per_pub"])
    assert m["paced_cross_p50_ms"] <= m["paced_cross_p99_ms"]

    single = cluster.run_setup("single", cfg)
    assert single.failed is None, single.failed
    _consistent(single.metrics)
    assert single.metrics["paced_cross_samples"] == 0  # one process: every arrival is same-process
    assert single.metrics["paced_same_samples"] > 0
    assert "redis_cores" not in single.metrics

    text = cluster.table([R], {(R, "cluster"): clustered, (R, "single"): single})
    assert "3 processes + Redis" in text and "1 process" in text and text.count("complete") == 4  # flow and paced tables


def test_plan_spreads_receivers_and_senders_evenly() -> None:
    shares = cluster.plan_members(30, 9, 3, 2)
    members = [nick for share in shares for nick, _ in share]
    assert len(members) == len(set(members)) == 39
    per_process = [sum(1 for n in members if n[1] == str(p) and n[0] in "qr") for p in range(3)]
    assert per_process == [10, 10, 10]
    senders = [(n, sid) for n, sid in shares[0] if sid >= 0]
    assert [int(n[1]) for n, _ in senders] == [sid % 3 for _, sid in senders]
    probes = [n for n, _ in shares[0] if n[0] == "q"]
    assert sorted(int(n[1]) for n in probes) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(n[0] == "r" for share in shares[1:] for n, _ in share)


def test_options_are_bounded() -> None:
    from selchat.bench.runner import parse_args

    opts = parse_args(["--points", "cluster", "--cluster-receivers", "100000", "--no-write"])
    with pytest.raises(ValueError):
        cluster.config_from(opts)
    opts = parse_args(["--points", "cluster", "--cluster-receivers", "10,100", "--duration", "2"])
    receivers, cfg = cluster.config_from(opts)
    assert receivers == [10, 100] and cfg.duration == 2.0
