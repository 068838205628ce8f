"""Child processes that do CPU work for the one-thread loop, without ever blocking it.

A `WorkerPool` runs `sys.executable -m MODULE` children, talks to each over its stdin and
stdout pipes (non-blocking, watched by the reactor's selector like any socket) and hands
them opaque requests. It knows nothing of what the work is: the child's module calls `serve`
with a function from request bytes to answer bytes.

Wire, both ways: a 4-byte big-endian length, then that many bytes. An answer's first byte
is its status (0: the handler's bytes follow; 1: the handler raised, this job failed). Each
child answers its jobs in the order it got them, so the parent keeps, per child, a queue of
callbacks in sending order.

Every fate is defined:
  * `submit` returns False when `max_pending` jobs are already accepted and unanswered (the
    caller refuses whatever it was asked); otherwise `done` is called exactly once, later,
    from the loop (never from inside `submit`), with the answer or with None;
  * a child that exits, sends garbage or an oversized frame, or takes longer than
    `job_timeout` over one job is killed; the jobs it held get done(None) and it is started
    again after a pause that doubles on each failure in a row (`restart_min`..`restart_max`);
    jobs waiting for a child fail too when no child is left running;
  * a job that waited `max_wait` seconds without reaching a child is answered None without
    being done: when the children fall behind (a machine busy with other work), the work
    whose asker has likely given up is shed rather than done late;
  * `close()` fails whatever is unanswered (done(None), at once) and kills the children,
    waiting for each at most a moment.
A child is given at most `pipeline` jobs at a time, so jobs go to whichever child is free
and a dying child takes few jobs with it.

Children run in a session of their own. A terminal's Ctrl-C then reaches only the parent,
which decides how its shutdown goes (and a child exits when its stdin closes, so a parent
killed outright leaves none behind). And where the kernel groups processes by session for
scheduling (autogroup, on by default in most distributions), a busy child's CPU is not taken
from the loop's group's share: measured with `selchat-bench --points loginstorm` on a machine
loaded by other work, the bystanders' median during a login storm stayed at its quiet
figure (about 1 ms) in a session of its own, and went to 6-8 ms in the loop's session.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, List, Mapping, Optional, Tuple

from selchat.loop.reactor import Reactor
from selchat.loop.timers import Timer

log = logging.getLogger(__name__)

Done = Callable[[Optional[bytes]], None]

_HEADER = struct.Struct(">I")
STATUS_OK = 0
STATUS_FAILED = 1
DEFAULT_MAX_MESSAGE = 1 << 20
READ_SIZE = 65536
REAP_INTERVAL = 0.05  # seconds between looks at a killed child until it is reaped
KILL_WAIT = 1.0  # seconds close() waits for one killed child


class _Child:
    """One running child: its process, its pipes, its unanswered jobs in sending order."""

    __slots__ = ("pool", "name", "proc", "rfd", "wfd", "out", "inbuf", "jobs", "head_since", "timer",
                 "writing", "answered")

    def __init__(self, pool: "WorkerPool", proc: subprocess.Popen) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.pool = pool
        self.name = f"{pool.name} {proc.pid}"  # what a slow-pass log line calls it
        self.proc = proc
        self.rfd = proc.stdout.fileno()
        self.wfd = proc.stdin.fileno()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)
        self.out = bytearray()  # frames not yet taken by the pipe
        self.inbuf = bytearray()
        self.jobs: Deque[Done] = deque()
        self.head_since = 0.0  # when the oldest job became the one the child works on
        self.timer: Optional[Timer] = None
        self.writing = False  # the write end is registered with the selector
        self.answered = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def on_readable(self, mask: int) -> None:
        self.pool._on_readable(self)

    def on_writable(self, mask: int) -> None:
        self.pool._write(self)


class WorkerPool:
    """`workers` children of `python -m module`; jobs in, answers out, all from the loop."""

    def __init__(self, reactor: Reactor, module: str, *, workers: int = 1, max_pending: int = 256,
                 pipeline: int = 2, max_message: int = DEFAULT_MAX_MESSAGE, job_timeout: float = 30.0,
                 restart_min: float = 0.1, restart_max: float = 5.0, max_wait: Optional[float] = None,
                 env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                 name: str = "worker") -> None:
        if workers < 1 or max_pending < 1 or pipeline < 1:
            raise ValueError("workers, max_pending and pipeline are at least 1")
        self.reactor = reactor
        self.module = module
        self.max_pending = max_pending
        self.pipeline = pipeline
        self.max_message = max_message
        self.job_timeout = job_timeout
        self.restart_min = restart_min
        self.restart_max = restart_max
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name
        self.closed = False
        self.max_wait = max_wait
        # accepted, not yet given to a child: (request, done, when accepted)
        self.waiting: Deque[Tuple[bytes, Done, float]] = deque()
        self._sweeper: Optional[Timer] = None
        self.children: List[Optional[_Child]] = [None] * workers  # None: down, restart timed
        self._delay = [restart_min] * workers  # the next restart's pause, per slot
        self._restart: List[Optional[Timer]] = [None] * workers
        self._dying: List[subprocess.Popen] = []  # killed, not yet reaped
        self._reaper: Optional[Timer] = None
        self.unanswered = 0  # accepted jobs whose `done` has not been called
        self.answered = 0
        self.failed = 0
        self.restarts = 0
        self.shed = 0  # jobs answered None after waiting max_wait
        for slot in range(workers):
            self._start(slot)

    # --- the caller's side ------------------------------------------------------------------

    def submit(self, request: bytes, done: Done) -> bool:
        """Queue a job; False (and `done` never called) when the pool is full or closed."""
        if len(request) > self.max_message:
            raise ValueError(f"a request has at most {self.max_message} bytes")
        if self.closed or self.unanswered >= self.max_pending:
            return False
        self.unanswered += 1
        self.waiting.append((bytes(request), done, self.reactor.clock()))
        self._dispatch()
        if self.waiting and self.max_wait is not None and self._sweeper is None:
            self._sweeper = self.reactor.call_at(self.waiting[0][2] + self.max_wait, self._sweep)
        return True

    @property
    def pending(self) -> int:
        return self.unanswered

    def pids(self) -> List[int]:
        """The running children's process ids (for CPU accounting)."""
        return [c.pid for c in self.children if c is not None]

    def close(self) -> None:
        """Fail what is unanswered, kill every child and reap it (a moment each at most)."""
        if self.closed:
            return
        self.closed = True
        failed: List[Done] = []
        for slot, child in enumerate(self.children):
            timer = self._restart[slot]
            if timer is not None:
                timer.cancel()
                self._restart[slot] = None
            if child is not None:
                self.children[slot] = None
                failed.extend(child.jobs)
                child.jobs.clear()
                self._detach(child)
                self._dying.append(child.proc)
        failed.extend(done for _, done, _ in self.waiting)
        self.waiting.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for proc in self._dying:
            _kill(proc)
        deadline = time.monotonic() + KILL_WAIT
        for proc in self._dying:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s: child %d not reaped at close", self.name, proc.pid)
        self._dying.clear()
        for done in failed:
            self._answer(done, None)

    # --- children ---------------------------------------------------------------------------

    def _start(self, slot: int) -> None:
        self._restart[slot] = None
        if self.closed:
            return
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                bufsize=0, env=self.env, cwd=self.cwd, close_fds=True, start_new_session=True,
            )
        except OSError as exc:
            log.warning("%s: cannot start a child: %s", self.name, exc.strerror or exc)
            self._retry(slot)
            return
        child = _Child(self, proc)
        self.children[slot] = child
        self.reactor.register(child.rfd, selectors.EVENT_READ, child.on_readable)
        log.info("%s: child %d started (python -m %s)", self.name, proc.pid, self.module)
        self._dispatch()

    def _retry(self, slot: int) -> None:
        """Start the slot again after its pause; fail the waiting jobs if no child is left."""
        delay = self._delay[slot]
        self._delay[slot] = min(delay * 2, self.restart_max)
        self.restarts += 1
        self._restart[slot] = self.reactor.call_later(delay, lambda _: self._start(slot))
        if not any(c is not None for c in self.children):
            waiting, self.waiting = self.waiting, deque()
            for _, done, _ in waiting:
                self.reactor.call_soon(self._answer, done, None)

    def _fail(self, child: _Child, why: str) -> None:
        """The child is done for: kill it, fail its jobs, start another later."""
        try:
            slot = self.children.index(child)
        except ValueError:
            return  # already failed
        self.children[slot] = None
        log.warning("%s: child %d %s; %d job(s) failed; restart in %.1f s", self.name, child.pid,
                    why, len(child.jobs), self._delay[slot])
        self._detach(child)
        _kill(child.proc)
        self._reap_later(child.proc)
        jobs, child.jobs = child.jobs, deque()
        for done in jobs:
            self.reactor.call_soon(self._answer, done, None)
        self._retry(slot)

    def _detach(self, child: _Child) -> None:
        """Out of the selector, pipes closed, timer cancelled."""
        for fd in (child.rfd, child.wfd) if child.writing else (child.rfd,):
            try:
                self.reactor.unregister(fd)
            except Exception:  # at shutdown the selector may be closed already
                pass
        child.writing = False
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        for pipe in (child.proc.stdin, child.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass

    def _reap_later(self, proc: subprocess.Popen) -> None:
        self._dying.append(proc)
        if self._reaper is None:
            self._reaper = self.reactor.call_later(REAP_INTERVAL, self._reap)

    def _reap(self, _: Any = None) -> None:
        self._reaper = None
        self._dying = [proc for proc in self._dying if proc.poll() is None]
        if self._dying:
            self._reaper = self.reactor.call_later(REAP_INTERVAL, self._reap)

    # --- jobs -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Give waiting jobs to the least busy children, up to `pipeline` each."""
        while self.waiting:
            best: Optional[_Child] = None
            for child in self.children:
                if child is not None and len(child.jobs) < self.pipeline and (
                        best is None or len(child.jobs) < len(best.jobs)):
                    best = child
            if best is None:
                return
            request, done, _ = self.waiting.popleft()
            if not best.jobs:
                best.head_since = self.reactor.clock()
                self._arm(best)
            best.jobs.append(done)
            best.out += _HEADER.pack(len(request))
            best.out += request
            self._write(best)

    def _write(self, child: _Child) -> None:
        if child.out:
            try:
                sent = os.write(child.wfd, child.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(child, f"stopped reading ({exc.strerror or exc})")
                return
            del child.out[:sent]
        want = bool(child.out)
        if want != child.writing:
            if want:
                self.reactor.register(child.wfd, selectors.EVENT_WRITE, child.on_writable)
            else:
                self.reactor.unregister(child.wfd)
            child.writing = want

    def _on_readable(self, child: _Child) -> None:
        try:
            data = os.read(child.rfd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(child, f"read failed ({exc.strerror or exc})")
            return
        if not data:
            code = child.proc.poll()
            self._fail(child, "exited" if code is None else f"exited with status {code}")
            return
        buf = child.inbuf
        buf += data
        while len(buf) >= 4:
            size = _HEADER.unpack_from(buf)[0]
            if size < 1 or size > self.max_message + 1:
                self._fail(child, f"sent a frame of {size} bytes")
                return
            if len(buf) < 4 + size:
                break
            if not child.jobs:
                self._fail(child, "answered a job it was not given")
                return
            status = buf[4]
            answer = bytes(buf[5:4 + size])
            del buf[:4 + size]
            done = child.jobs.popleft()
            child.answered += 1
            slot = self.children.index(child)
            self._delay[slot] = self.restart_min  # it works: the next failure restarts quickly
            child.head_since = self.reactor.clock()
            self._answer(done, answer if status == STATUS_OK else None)
            if self.children[slot] is not child:
                return  # `done` closed the pool
        self._dispatch()

    def _answer(self, done: Done, answer: Optional[bytes]) -> None:
        self.unanswered -= 1
        if answer is None:
            self.failed += 1
        else:
            self.answered += 1
        try:
            done(answer)
        except Exception:
            log.exception("%s: a job's callback failed; the pool goes on", self.name)

    def _sweep(self, _: Any = None) -> None:
        """Answer None to the jobs that waited `max_wait` (the oldest are first in line)."""
        self._sweeper = None
        assert self.max_wait is not None
        now = self.reactor.clock()
        waiting = self.waiting
        while waiting and now - waiting[0][2] >= self.max_wait:
            self.shed += 1
            self._answer(waiting.popleft()[1], None)
        if waiting and self._sweeper is None and not self.closed:
            self._sweeper = self.reactor.call_at(waiting[0][2] + self.max_wait, self._sweep)

    def _arm(self, child: _Child) -> None:
        if child.timer is None:
            child.timer = self.reactor.call_at(child.head_since + self.job_timeout,
                                               lambda _: self._deadline(child))

    def _deadline(self, child: _Child) -> None:
        child.timer = None
        if child not in self.children or not child.jobs:
            return
        if self.reactor.clock() >= child.head_since + self.job_timeout:
            self._fail(child, f"took over {self.job_timeout:g} s over one job")
        else:
            self._arm(child)


def _kill(proc: subprocess.Popen) -> None:
    try:
        proc.kill()
    except OSError:
        pass


# --- the child's side -------------------------------------------------------------------------


def _read_exact(fd: int, size: int) -> Optional[bytes]:
    chunks: List[bytes] = []
    left = size
    while left:
        data = os.read(fd, left)
        if not data:
            return None
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve(handle: Callable[[bytes], bytes], max_message: int = DEFAULT_MAX_MESSAGE, nice: int = 0) -> int:
    """The child's loop: requests on stdin, answers on stdout, until stdin ends.

    The parent owns shutdown: a terminal's Ctrl-C reaches the whole process group, so SIGINT is
    ignored here (the parent finishes its graceful shutdown, then closes our stdin or kills us).
    Anything printed goes to stderr: stdout carries only frames. `nice` lowers this process's
    CPU priority by that much: work in the background of a loop that must stay responsive.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    out_fd = os.dup(1)
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr: stray prints go nowhere
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    sys.stdout = sys.stderr
    in_fd = 0
    while True:
        header = _read_exact(in_fd, 4)
        if header is None:
            return 0
        size = _HEADER.unpack(header)[0]
        if size > max_message:
            print(f"worker: a request of {size} bytes; leaving", file=sys.stderr)
            return 2
        request = _read_exact(in_fd, size) if size else b""
        if request is None:
            return 0
        try:
            answer = bytes([STATUS_OK]) + handle(request)
        except Exception:
            traceback.print_exc()
            answer = bytes([STATUS_FAILED])
        if len(answer) > max_message + 1:
            answer = bytes([STATUS_FAILED])
        try:
            _write_all(out_fd, _HEADER.pack(len(answer)) + answer)
        except BrokenPipeError:
            return 0

