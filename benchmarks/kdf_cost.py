"""What one password check costs, to choose the scrypt cost (docs/design.md, "Passwords").

Times `hashlib.scrypt` at a few costs around today's (selchat.core.passwords.SCRYPT_N/R/P),
PBKDF2-SHA256 at a few SCRAM iteration counts, `make_verifier`, and one worker process
behind `ProcessKdf`: verifications a second, and the loop's own CPU per verification.
Prints markdown tables. No network, no files.

    python benchmarks/kdf_cost.py [--repeat 41]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selchat.core import passwords as pw  # noqa: E402
from selchat.kdf import ProcessKdf  # noqa: E402
from selchat.loop.reactor import Reactor  # noqa: E402

PASSWORD = b"correct horse battery"


def timed(fn: Callable[[], object], repeat: int) -> List[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return sorted(out)


def row(label: str, ms: List[float], extra: str = "") -> str:
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"| {label} | {statistics.median(ms):.1f} | {ms[0]:.1f} | {p90:.1f} | {extra} |"


def worker_rate(count: int) -> str:
    reactor = Reactor()
    kdf = ProcessKdf(reactor, workers=1, max_pending=count + 1)
    verifier = pw.make_verifier(PASSWORD.decode())
    got: List[Optional[bool]] = []
    try:
        kdf.verify("warm-up password", verifier, got.append)
        while not got:
            reactor.run_once(timeout=0.05)
        got.clear()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            kdf.verify(PASSWORD.decode(), verifier, got.append)
        while len(got) < count:
            reactor.run_once(timeout=0.05)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        kdf.close()
        reactor.close()
    assert got == [True] * count
    return (f"one worker: {count / elapsed:.1f} verifications/s ({elapsed * 1000 / count:.1f} ms each, "
            f"queue included); the loop's own CPU {cpu * 1e6 / count:.0f} µs per verification")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=41)
    ap.add_argument("--worker-jobs", type=int, default=200)
    opts = ap.parse_args()
    salt = os.urandom(16)
    print(f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; Python {sys.version.split()[0]}")
    print()
    print("| scrypt (n, r, p) | median ms | min ms | p90 ms | memory |")
    print("| --- | --- | --- | --- | --- |")
    for n, r, p in ((4096, 8, 1), (8192, 4, 1), (8192, 5, 1), (8192, 6, 1), (8192, 8, 1), (16384, 8, 1)):
        ms = timed(lambda: hashlib.scrypt(PASSWORD, salt=salt, n=n, r=r, p=p, maxmem=1 << 28, dklen=32), opts.repeat)
        today = " (today)" if (n, r, p) == (pw.SCRYPT_N, pw.SCRYPT_R, pw.SCRYPT_P) else ""
        print(row(f"{n}, {r}, {p}{today}", ms, f"{128 * n * r / (1 << 20):.0f} MiB"))
    print()
    print("| PBKDF2-SHA256 iterations (SCRAM) | median ms | min ms | p90 ms | |")
    print("| --- | --- | --- | --- | --- |")
    for it in (4096, 16384, 65536):
        ms = timed(lambda: hashlib.pbkdf2_hmac("sha256", PASSWORD, salt, it), opts.repeat)
        print(row(f"{it}{' (today)' if it == pw.SCRAM_ITERATIONS else ''}", ms))
    verifier = pw.make_verifier(PASSWORD.decode())
    print()
    print("| whole operation | median ms | min ms | p90 ms | |")
    print("| --- | --- | --- | --- | --- |")
    print(row("check_password (a login)", timed(lambda: pw.check_password(PASSWORD.decode(), verifier), opts.repeat)))
    print(row("make_verifier (a registration)", timed(lambda: pw.make_verifier(PASSWORD.decode()), opts.repeat)))
    print()
    print(worker_rate(opts.worker_jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
