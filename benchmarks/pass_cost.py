"""Where a busy pass's time goes: the sends, the history commit, and everything else.

The fan-out benchmark keeps S x W messages in flight, and the server runs in lock step with
its generator: each pass takes in every message in flight, commits them, and writes each
member once. This script reproduces that pass in one process, so that its parts can be timed
without the generator's noise: a real server (its own loop, doors and SQLite store) on
loopback ports, R receivers and S senders connected to it over TCP; each cycle the senders
write W messages each, the server runs one pass, and the clients are drained outside the
timing. The writer's and the commit's before-sleep hooks are timed apart (thread CPU time).

    python benchmarks/pass_cost.py [-R 100] [-S 10] [-W 8] [--irc] [--db file|memory]
                                   [--cycles 400] [--profile]

Prints one line: per pass, per message and per delivery, and the sends / commit / rest split
per message. Loopback only; the run is bounded by --cycles (and 50 settling passes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selchat.config import parse_args  # noqa: E402
from selchat.server import Server, bind_ports, open_store  # noqa: E402


def frame(obj: Any) -> bytes:
    payload = json.dumps(obj).encode()
    return struct.pack(">I", len(payload)) + payload


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--irc", action="store_true", help="clients on the IRC door")
    ap.add_argument("--db", choices=("file", "memory"), default="file")
    ap.add_argument("-R", type=int, default=100, help="receivers")
    ap.add_argument("-S", type=int, default=10, help="senders")
    ap.add_argument("-W", type=int, default=8, help="messages per sender per pass")
    ap.add_argument("--cycles", type=int, default=400)
    ap.add_argument("--profile", action="store_true", help="cProfile the timed passes")
    a = ap.parse_args()
    if not (1 <= a.R + a.S <= 2000 and 1 <= a.cycles <= 100000):
        ap.error("1..2000 clients, 1..100000 cycles")
    folder = tempfile.mkdtemp(prefix="pass_cost.")
    db = os.path.join(folder, "h.db") if a.db == "file" else ":memory:"
    argv = ["--port", "0", "--host", "127.0.0.1", "--db", db, "--rate", "0", "--max-per-ip", "0",
            "--register-rate", "0", "--max-clients", "20000", "--log-level", "warning",
            "--max-presence", "500"] + (["--irc-port", "0"] if a.irc else [])
    config = parse_args(argv)
    bound = bind_ports(config)
    port = bound["irc" if a.irc else "native"].getsockname()[1]
    server = Server(config, open_store(config.db))
    server.listen(bound)
    reactor = server.reactor

    spent = {"flush_all": 0.0, "_commit": 0.0}

    def timed(hook: Callable[[], Any], name: str) -> Callable[[], None]:
        def run() -> None:
            started = time.thread_time()
            hook()
            spent[name] += time.thread_time() - started
        return run

    for i, (order, seq, hook) in enumerate(reactor._hooks):
        name = getattr(hook, "__name__", "")
        if name in spent:
            reactor._hooks[i] = (order, seq, timed(hook, name))

    clients: List[socket.socket] = []
    for i in range(a.R + a.S):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        nick = f"u{i:04d}"
        s.send(f"NICK {nick}\r\nUSER {nick} 0 * :x\r\nJOIN #lobby\r\n".encode() if a.irc
               else frame({"type": "hello", "nick": nick}))
        clients.append(s)
        for _ in range(3):
            reactor.run_once(0)

    def drain() -> int:
        total = 0
        for s in clients:
            while True:
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    break
                if not data:
                    break
                total += len(data)
        return total

    for _ in range(50):
        reactor.run_once(0)
        drain()
    senders = clients[-a.S:]
    text = "~@" + "x" * 98
    one = (f"PRIVMSG #lobby :{text}\r\n".encode() if a.irc
           else frame({"type": "say", "room": "#lobby", "text": text}))
    batch = one * a.W

    def cycle() -> "tuple[float, float]":
        for s in senders:
            s.send(batch)
        t0, c0 = time.perf_counter(), time.thread_time()
        reactor.run_once(0)
        return time.perf_counter() - t0, time.thread_time() - c0

    for _ in range(30):
        cycle()
        drain()
    for name in spent:
        spent[name] = 0.0
    prof = cProfile.Profile() if a.profile else None
    wall = cpu = 0.0
    out = 0
    for _ in range(a.cycles):
        if prof:
            prof.enable()
        w, c = cycle()
        if prof:
            prof.disable()
        wall += w
        cpu += c
        out += drain()
    msgs = a.cycles * a.S * a.W
    us = 1e6 / msgs
    print(f"{'irc' if a.irc else 'native'} db={a.db} R={a.R} S={a.S} W={a.W}: "
          f"{wall / a.cycles * 1e6:.0f} us/pass, {cpu * us:.2f} us CPU/msg, "
          f"{cpu * us / (a.R + a.S):.3f} us CPU/delivery, {out / a.cycles / 1024:.0f} KiB out/pass; "
          f"sends {spent['flush_all'] * us:.2f}, commit {spent['_commit'] * us:.2f}, "
          f"rest {(cpu - spent['flush_all'] - spent['_commit']) * us:.2f} us/msg")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    for s in clients:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
