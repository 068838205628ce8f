"""What one publication costs Redis: redis-server's CPU per 10,000 publications through the script.

    python tests/redis_cost.py [--count 10000] [--size 200] [--runs 5] [--subscribers 1]

Starts its own redis-server (AOF on, as in the tests) in a temporary directory, publishes
`count` payloads of `size` bytes to one room through `RoomStreams.publish` with at most
`window` in flight (a bounded loop with a deadline), and reads the server's user+system CPU
from /proc before and after. For reference it does the same with a bare PUBLISH. Prints one
line per measure with the median over the runs. docs/cluster.md quotes its output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisserver import RedisServer  # noqa: E402
from selchat.links.redis import LinkState, RedisLink  # noqa: E402
from selchat.links.scripts import RoomStreams  # noqa: E402
from selchat.loop.reactor import Reactor  # noqa: E402

DEADLINE = 120.0


def run_until(reactor: Reactor, cond: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit("deadline passed")
        reactor.run_once(timeout=0.05)


def publish_many(reactor: Reactor, send: Callable[[int, Callable[[Any], None]], bool],
                 count: int, window: int) -> None:
    done = [0]
    errors: List[Any] = []

    def answered(reply: Any) -> None:
        done[0] += 1
        if isinstance(reply, Exception):
            errors.append(reply)

    sent = 0
    deadline = time.monotonic() + DEADLINE
    while done[0] < count:
        if time.monotonic() > deadline:
            raise SystemExit("deadline passed")
        while sent < count and sent - done[0] < window:
            if not send(sent, answered):
                raise SystemExit("a publication was refused")
            sent += 1
        reactor.run_once(timeout=0.05)
    if errors:
        raise SystemExit(f"{len(errors)} errors, first: {errors[0]}")


def ask(reactor: Reactor, link: RedisLink, *args: Any) -> Any:
    got: List[Any] = []
    link.execute(*args, done=got.append)
    run_until(reactor, lambda: bool(got))
    return got[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--maxlen", type=int, default=10000)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder), extra=["--appendfsync", "everysec"]).start()  # the default a user runs
        reactor = Reactor()
        try:
            link = RedisLink(reactor, server.url)
            rooms = RoomStreams(link, maxlen=opts.maxlen)
            received = [0]
            subs = []
            for _ in range(opts.subscribers):
                sub = RedisLink(reactor, server.url,
                                on_message=lambda c, d, p: received.__setitem__(0, received[0] + 1))
                sub.subscribe(rooms.channel("#bench"))
                subs.append(sub)
            run_until(reactor, lambda: all(x.state is LinkState.UP for x in [link, *subs]))
            payload = b"x" * opts.size
            empty = link.add_script(b"return 1")
            measures = {
                "script": lambda i, cb: rooms.publish("#bench", payload, cb),
                "bare PUBLISH": lambda i, cb: link.execute("PUBLISH", rooms.channel("#bench"),
                                                           payload, done=cb),
                "empty script": lambda i, cb: link.execute("EVALSHA", empty, 0, payload, done=cb),
            }
            publish_many(reactor, measures["script"], 2000, opts.window)  # warm up, fill the stream
            commands = {"script": "evalsha", "bare PUBLISH": "publish", "empty script": "evalsha"}
            for name, send in measures.items():
                ask(reactor, link, "CONFIG", "RESETSTAT")
                cpu: List[float] = []
                wall: List[float] = []
                for _ in range(opts.runs):
                    before, t0 = server.cpu_seconds(), time.perf_counter()
                    publish_many(reactor, send, opts.count, opts.window)
                    wall.append(time.perf_counter() - t0)
                    cpu.append(server.cpu_seconds() - before)
                per = statistics.median(cpu)
                stats = ask(reactor, link, "INFO", "commandstats").decode()
                inside = next(line.split("usec_per_call=")[1].split(",")[0] for line in stats.splitlines()
                              if line.startswith(f"cmdstat_{commands[name]}:"))
                print(f"{name}: redis-server CPU {per * 1000:.0f} ms per {opts.count} publications of "
                      f"{opts.size} bytes ({per / opts.count * 1e6:.1f} us each, so about "
                      f"{opts.count / per / 1000:.0f}k/s per core), {opts.subscribers} subscriber(s), "
                      f"AOF on; runs {', '.join(f'{c * 1000:.0f}' for c in cpu)} ms; "
                      f"wall {statistics.median(wall) * 1000:.0f} ms with {opts.window} in flight; "
                      f"Redis's own usec_per_call {inside}")
            expected = (2000 + opts.runs * opts.count * 2) * opts.subscribers
            run_until(reactor, lambda: received[0] >= expected)
            for x in [link, *subs]:
                x.close()
        finally:
            reactor.close()
            server.stop()


if __name__ == "__main__":
    main()
