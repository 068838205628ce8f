"""What the history store costs the loop: time per commit under fan-out load, with an SQLite file.

Starts `selchat-server --db FILE` (a fresh temporary file), runs the project's load generator
against it (R receivers, S senders, as fast as the server accepts), stops the server, and reads
the store's own counters from the server's last log line: commits, messages, total and longest
time spent committing. Prints a markdown table row; `--append` adds it to benchmarks/RESULTS.md.

    python benchmarks/commit_cost.py -R 100 -S 10 --duration 5 [--append]

Loopback only; the run is bounded by --duration plus start-up and shutdown deadlines.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from selchat.bench import loadgen  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-R", "--receivers", type=int, default=100)
    ap.add_argument("-S", "--senders", type=int, default=10)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    opts = ap.parse_args()

    folder = tempfile.mkdtemp(prefix="selchat-commit-cost-")
    db = os.path.join(folder, "history.db")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen(
        [sys.executable, "-m", "selchat.server", "--port", "0", "--db", db, "--rate", "0",
         "--max-per-ip", "0", "--log-level", "info"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        match = re.search(r"listening on \S+:(\d+)", line)
        if not match:
            raise SystemExit(f"server did not start: {line.strip()}")
        port = int(match.group(1))
        cfg = loadgen.LoadConfig(port=port, receivers=opts.receivers, senders=opts.senders,
                                 duration=opts.duration)
        result = loadgen.run_load(cfg)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            log = server.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            server.kill()
            log = server.communicate()[1]
    stats_line = re.search(r"history store closed: (\{.*\})", log)
    if not stats_line:
        raise SystemExit("no store statistics in the server's log")
    stats = ast.literal_eval(stats_line.group(1))
    commits = max(1, int(stats["commits"]))
    row = (
        f"| R={opts.receivers}, S={opts.senders} | {result.deliveries_per_s:,.0f} | {stats['messages']:,} | "
        f"{commits:,} | {stats['messages'] / commits:.1f} | {1000 * stats['commit_seconds'] / commits:.3f} | "
        f"{1000 * stats['max_commit_seconds']:.2f} |"
    )
    table = "\n".join([
        "| load | deliveries/s | messages stored | commits | messages per commit | ms per commit (mean) | ms per commit (max) |",
        "|---|---|---|---|---|---|---|",
        row,
    ])
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    text = (
        f"\n## {datetime.datetime.now():%Y-%m-%d %H:%M} — history store: time per commit\n\n"
        f"Command: `python benchmarks/commit_cost.py -R {opts.receivers} -S {opts.senders} "
        f"--duration {opts.duration:g}{' --append' if opts.append else ''}`  \n"
        f"Machine: {os.cpu_count()} CPUs, {cpu}, Python {platform.python_version()}  \n"
        f"The server commits once per loop pass, before it writes that pass's messages to any socket;"
        f" the counters are the store's own (SQLite file, WAL, synchronous=NORMAL).\n\n{table}\n"
    )
    print(text)
    if opts.append:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
