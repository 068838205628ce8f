"""A child for tests/test_worker.py: `python -m worker_child` (run from tests/).

Requests: b"echo:X" -> X; b"pid" -> the child's pid; b"sleep:S" -> b"slept" after S seconds;
b"spin:S" -> b"spun" after S seconds of CPU; b"raise" -> the handler raises; b"exit" -> the
child exits at once (status 3). With WORKER_CHILD_GARBAGE=1 in its environment the child
first writes a frame header announcing 4 GiB; with WORKER_CHILD_PREFIX=HEX, those bytes.
"""

from __future__ import annotations

import os
import sys
import time

from selchat.loop.worker import serve


def handle(request: bytes) -> bytes:
    op, _, arg = request.partition(b":")
    if op == b"echo":
        return arg
    if op == b"pid":
        return str(os.getpid()).encode()
    if op == b"sleep":
        time.sleep(float(arg))
        return b"slept"
    if op == b"spin":
        end = time.monotonic() + float(arg)
        while time.monotonic() < end:
            pass
        return b"spun"
    if op == b"exit":
        os._exit(3)
    raise RuntimeError(f"asked to fail: {request!r}")


if __name__ == "__main__":
    if os.environ.get("WORKER_CHILD_GARBAGE"):
        os.write(1, b"\xff\xff\xff\xff")
    if os.environ.get("WORKER_CHILD_PREFIX"):
        os.write(1, bytes.fromhex(os.environ["WORKER_CHILD_PREFIX"]))
    sys.exit(serve(handle))
