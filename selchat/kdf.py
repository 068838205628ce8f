"""Password hashing for the server, so that a login storm never stalls the one-thread loop.

One scrypt check costs about 13 ms of CPU (selchat.core.passwords, docs/design.md): done in
the loop, 50 logins a second would take two thirds of its time. `ProcessKdf` hands the work to
child processes (selchat.loop.worker) and calls back from the loop when they answer, so the
loop only moves a few hundred bytes per login; `InlineKdf` computes in-process (tests,
`--kdf-workers 0`). Both have the same methods and the same promises:

  * `hash(password, done) -> bool`: later `done(verifier)`, or `done(None)` when the work
    failed (a worker died, or the password breaks the rule: check `password_problem` first);
  * `verify(password, verifier, done) -> bool`: later `done(True/False)`, or `done(None)` when
    the work failed (a worker died, or the job waited `MAX_WAIT` seconds for one). A verifier that does not parse (None included: an unknown account) is
    checked against a record no password opens, at the same cost, and answers False, so the
    time taken does not tell unknown accounts from wrong passwords;
  * both return False, and never call `done`, when the bounded queue is full: the caller
    refuses the request. `done` is never called from inside `hash`/`verify`;
  * nothing raises into the loop on bad input;
  * `close()` (at shutdown) answers what is pending `done(None)` at once, then stops the
    workers.

`python -m selchat.kdf` is the worker's child: requests on stdin, answers on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable, List, Optional, Protocol

from selchat.core.passwords import (
    MAX_BYTES, MAX_VERIFIER, UNKNOWN_VERIFIER, check_password, make_verifier, password_problem, verifier_ok,
)
from selchat.loop.reactor import Reactor
from selchat.loop.worker import WorkerPool, serve

log = logging.getLogger(__name__)

HashDone = Callable[[Optional[str]], None]
VerifyDone = Callable[[Optional[bool]], None]

MAX_REQUEST = 4 * MAX_BYTES + MAX_VERIFIER + 64  # bytes of one request to the child
JOB_TIMEOUT = 10.0  # seconds one job may take before its child is taken for hung
# Seconds a job may wait for a worker before it is answered None undone: well inside the
# handshake timeout (10 s), so a login that cannot be checked in time hears so, and the
# workers do not go on hashing for clients that have left.
MAX_WAIT = 5.0


class Kdf(Protocol):
    def hash(self, password: str, done: HashDone) -> bool: ...
    def verify(self, password: str, verifier: Optional[str], done: VerifyDone) -> bool: ...
    def close(self) -> None: ...


def _checkable(password: object) -> bool:
    """A password some account could have: text that UTF-8 carries, not over the rule's size."""
    if not isinstance(password, str):
        return False
    try:
        return len(password.encode("utf-8")) <= MAX_BYTES
    except UnicodeEncodeError:
        return False


def _record(verifier: object) -> str:
    return verifier if isinstance(verifier, str) and verifier_ok(verifier) else UNKNOWN_VERIFIER


class InlineKdf:
    """Computes in the calling process; answers in the next loop pass via `call_soon`."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor

    def hash(self, password: str, done: HashDone) -> bool:
        verifier: Optional[str] = None
        if password_problem(password) is None:
            try:
                verifier = make_verifier(password)
            except Exception:  # MemoryError from OpenSSL, say: a failed job, not a crash
                log.exception("kdf: hashing failed")
        self.reactor.call_soon(done, verifier)
        return True

    def verify(self, password: str, verifier: Optional[str], done: VerifyDone) -> bool:
        ok = False
        if _checkable(password):
            record = _record(verifier)
            ok = check_password(password, record) and record is not UNKNOWN_VERIFIER
        self.reactor.call_soon(done, ok)
        return True

    def pids(self) -> List[int]:
        return []

    def close(self) -> None:
        pass


class ProcessKdf:
    """Hands the work to `workers` child processes (`python -m selchat.kdf`)."""

    def __init__(self, reactor: Reactor, workers: int = 1, max_pending: int = 256,
                 job_timeout: float = JOB_TIMEOUT, max_wait: float = MAX_WAIT) -> None:
        self.reactor = reactor
        # The children import this very package: run them from the folder that holds it.
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.pool = WorkerPool(reactor, "selchat.kdf", workers=workers, max_pending=max_pending,
                               max_message=MAX_REQUEST, job_timeout=job_timeout, max_wait=max_wait,
                               cwd=here, name="kdf")

    def hash(self, password: str, done: HashDone) -> bool:
        if password_problem(password) is not None:
            self.reactor.call_soon(done, None)
            return True

        def answered(answer: Optional[bytes]) -> None:
            verifier = None
            if answer is not None:
                text = answer.decode("ascii", "replace")
                verifier = text if verifier_ok(text) else None
            done(verifier)

        return self.pool.submit(_request("hash", password), answered)

    def verify(self, password: str, verifier: Optional[str], done: VerifyDone) -> bool:
        if not _checkable(password):
            self.reactor.call_soon(done, False)
            return True
        record = _record(verifier)
        unknown = record is UNKNOWN_VERIFIER

        def answered(answer: Optional[bytes]) -> None:
            done(None if answer is None else answer == b"1" and not unknown)

        return self.pool.submit(_request("verify", password, record), answered)

    def pids(self) -> List[int]:
        """The worker processes' ids (for CPU accounting)."""
        return self.pool.pids()

    @property
    def pending(self) -> int:
        return self.pool.pending

    def close(self) -> None:
        self.pool.close()


def make_kdf(reactor: Reactor, workers: int, max_pending: int = 256) -> Kdf:
    """`workers` children, or in-process with 0."""
    if workers <= 0:
        return InlineKdf(reactor)
    return ProcessKdf(reactor, workers=workers, max_pending=max_pending)


# --- the child ---------------------------------------------------------------------------------


def _request(*fields: str) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


def handle(request: bytes) -> bytes:
    """One job in the child: ["hash", password] -> verifier; ["verify", password, verifier] -> b"1"/b"0"."""
    fields = json.loads(request.decode("utf-8"))
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
        raise ValueError("a request is a list of strings")
    if fields[0] == "hash" and len(fields) == 2:
        return make_verifier(fields[1]).encode("ascii")
    if fields[0] == "verify" and len(fields) == 3:
        return b"1" if check_password(fields[1], fields[2]) else b"0"
    raise ValueError(f"unknown request {fields[0]!r}")


def main() -> int:
    return serve(handle, max_message=MAX_REQUEST)


if __name__ == "__main__":
    sys.exit(main())
