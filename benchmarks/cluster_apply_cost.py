"""What one cluster process spends per message when none of the room's members is on it.

    python benchmarks/cluster_apply_cost.py [--receivers 10,100] [--duration 5] [--repeat 3]

With --redis every process applies every change (docs/cluster.md): a message is decided,
stored in its history and fanned out to its local members by each process. This runs the
cluster point's set-up (selchat/bench/cluster.py: its own redis-server, AOF everysec, three
`selchat-server --redis`) with every member on processes 1 and 2 and none on process 3, for
the flow phase only, and prints each process's CPU (user + system, /proc) per message sent:
process 3's is the cost of applying a change with nobody to deliver it to, the floor each
process pays for every message of the whole cluster. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selchat.bench import cluster  # noqa: E402
from selchat.bench.launcher import RunningServer  # noqa: E402


def one_run(receivers: int, duration: float) -> Dict[str, float]:
    redis = cluster.RedisProcess()
    servers: List[RunningServer] = []
    try:
        redis.start()
        spec = cluster._selchat_spec(redis.url)
        for _ in range(cluster.PROCESSES):
            servers.append(RunningServer(spec))
            cluster._wait_in_cluster(servers[-1])
        # members of "process 2" go to process 0: the third process has none
        ports = [servers[0].port, servers[1].port, servers[0].port]
        res = cluster.SetupResult("cluster")
        cfg = cluster.ClusterConfig(receivers=receivers, duration=duration, warmup=1.0, rate=0, idle=1.0)
        cluster._measure(cfg, servers, redis, ports, res)  # type: ignore[arg-type]
        if res.metrics.get("flow_lost"):
            raise SystemExit(f"lost {res.metrics['flow_lost']} deliveries")
        return res.metrics
    finally:
        for s in servers:
            s.stop()
        redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--receivers", default="10,100")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    opts = ap.parse_args()
    if not cluster.redis_available():
        raise SystemExit("redis-server is not installed")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for r in (int(x) for x in opts.receivers.split(",")):
        runs = [one_run(r, min(opts.duration, cluster.MAX_DURATION)) for _ in range(max(opts.repeat, 1))]
        med = {k: statistics.median(m[k] for m in runs) for k in ("sent_per_s", "p0_cpu_us_per_msg",
                                                                  "p1_cpu_us_per_msg", "p2_cpu_us_per_msg",
                                                                  "redis_us_per_pub")}
        print(f"R={r}: {med['sent_per_s']:,.0f} messages/s; CPU per message sent, us: process 1 "
              f"{med['p0_cpu_us_per_msg']:.0f}, process 2 {med['p1_cpu_us_per_msg']:.0f}, process 3 (no member) "
              f"{med['p2_cpu_us_per_msg']:.0f}; Redis {med['redis_us_per_pub']:.0f} per publication "
              f"(medians of {len(runs)})")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
