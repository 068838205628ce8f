"""selchat.loop.worker with real child processes (tests/worker_child.py), in a real reactor.

Every wait is a loop of reactor passes until a condition holds or a deadline passes; nothing
sleeps. What is pinned: answers come back in order, `done` is called exactly once and never
from inside `submit`, a full queue is refused, a child that dies, hangs, fails a job or talks
nonsense costs only its own jobs and is replaced, `close()` leaves no process behind, and
the loop keeps running while a child works.
"""

from __future__ import annotations

import os
import select
import signal
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.loop.reactor import Reactor
from selchat.loop.worker import WorkerPool

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEADLINE = 20.0


def child_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def run_until(reactor: Reactor, cond: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        reactor.run_once(timeout=0.05)


def gone(pid: int) -> bool:
    """The process no longer exists (reaped: not even a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def make_pool(reactor: Reactor) -> Iterator[Callable[..., WorkerPool]]:
    made: List[WorkerPool] = []

    def make(**kwargs: object) -> WorkerPool:
        env = kwargs.pop("env", None) or child_env()
        kwargs.setdefault("restart_min", 0.05)
        pool = WorkerPool(reactor, kwargs.pop("module", "worker_child"), env=env,  # type: ignore[arg-type]
                          cwd=str(TESTS), **kwargs)  # type: ignore[arg-type]
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


class Answers:
    """Collects answers by job name, and proves each job is answered once."""

    def __init__(self) -> None:
        self.got: Dict[str, Optional[bytes]] = {}
        self.order: List[str] = []

    def __call__(self, name: str) -> Callable[[Optional[bytes]], None]:
        def done(answer: Optional[bytes]) -> None:
            assert name not in self.got, f"{name} answered twice"
            self.got[name] = answer
            self.order.append(name)
        return done

    def has(self, *names: str) -> Callable[[], bool]:
        return lambda: all(n in self.got for n in names)


def test_answers_come_back_in_order(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()
    names = [f"j{i}" for i in range(50)]
    for name in names:
        assert pool.submit(b"echo:" + name.encode(), answers(name))
    assert answers.got == {}  # never from inside submit
    run_until(reactor, answers.has(*names))
    assert answers.order == names
    assert all(answers.got[n] == n.encode() for n in names)
    assert pool.pending == 0 and pool.answered == 50


def test_a_large_request_and_answer_cross_the_pipes(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()
    big = os.urandom(300_000).hex().encode()[:500_000]  # far beyond a pipe's 64 KiB
    assert pool.submit(b"echo:" + big, answers("big"))
    run_until(reactor, answers.has("big"))
    assert answers.got["big"] == big


def test_killing_a_child_mid_job_fails_its_jobs_and_the_next_job_works(
        reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()
    pool.submit(b"pid", answers("pid"))
    run_until(reactor, answers.has("pid"))
    pid = int(answers.got["pid"] or b"0")
    assert pool.pids() == [pid]
    pool.submit(b"sleep:30", answers("slow"))
    pool.submit(b"echo:behind", answers("behind"))
    reactor.run_once(timeout=0.05)  # the jobs are in the pipe
    os.kill(pid, signal.SIGKILL)
    run_until(reactor, answers.has("slow", "behind"))
    assert answers.got["slow"] is None and answers.got["behind"] is None
    pool.submit(b"echo:after", answers("after"))
    run_until(reactor, answers.has("after"))
    assert answers.got["after"] == b"after"
    assert pool.restarts == 1 and pool.pids() != [pid]
    run_until(reactor, lambda: gone(pid))  # the dead child was reaped, not left a zombie


def test_a_full_queue_is_refused(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(max_pending=3)
    answers = Answers()
    for i in range(3):
        assert pool.submit(b"sleep:0.2", answers(f"s{i}"))
    refused = Answers()
    assert not pool.submit(b"echo:x", refused("x"))
    assert pool.pending == 3
    run_until(reactor, answers.has("s0"))
    assert pool.submit(b"echo:y", answers("y"))  # room again
    run_until(reactor, answers.has("s1", "s2", "y"))
    assert refused.got == {}  # a refused job is never answered


def test_close_fails_what_is_pending_and_leaves_no_child(
        reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(workers=3)
    answers = Answers()
    for i in range(3):
        pool.submit(b"pid", answers(f"p{i}"))
    run_until(reactor, answers.has("p0", "p1", "p2"))
    pids = pool.pids()
    assert len(set(pids)) == 3
    for i in range(8):
        pool.submit(b"sleep:30", answers(f"s{i}"))
    reactor.run_once(timeout=0.05)
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 2.0
    assert all(answers.got[f"s{i}"] is None for i in range(8))
    assert all(gone(pid) for pid in pids)
    assert pool.pids() == []
    assert not pool.submit(b"echo:late", answers("late"))


def test_a_job_that_raises_fails_alone(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()
    pool.submit(b"pid", answers("before"))
    pool.submit(b"raise", answers("bad"))
    pool.submit(b"pid", answers("after"))
    run_until(reactor, answers.has("before", "bad", "after"))
    assert answers.got["bad"] is None
    assert answers.got["before"] == answers.got["after"]  # the same child served on
    assert pool.restarts == 0


def test_a_child_that_exits_fails_its_jobs_and_is_replaced(
        reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()
    pool.submit(b"exit", answers("exit"))
    run_until(reactor, answers.has("exit"))
    assert answers.got["exit"] is None
    pool.submit(b"echo:ok", answers("ok"))
    run_until(reactor, answers.has("ok"))
    assert answers.got["ok"] == b"ok"


def test_a_hung_child_is_killed_at_the_job_timeout(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(job_timeout=1.0)
    answers = Answers()
    pool.submit(b"pid", answers("up"))
    run_until(reactor, answers.has("up"))
    pid = int(answers.got["up"] or b"0")
    pool.submit(b"sleep:60", answers("hung"))
    run_until(reactor, answers.has("hung"), timeout=10)
    assert answers.got["hung"] is None
    run_until(reactor, lambda: gone(pid))
    # The next job goes to a new child. (The timeout counts from the job's sending, a new
    # child's start-up included: on a loaded machine that can take a try or two.)
    for attempt in range(5):
        pool.submit(b"echo:next", answers(f"next{attempt}"))
        run_until(reactor, answers.has(f"next{attempt}"))
        if answers.got[f"next{attempt}"] == b"next":
            break
    else:
        pytest.fail("no job worked after the hung child")


def test_a_child_that_sends_garbage_is_replaced(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(env=child_env(WORKER_CHILD_GARBAGE="1"))
    answers = Answers()
    pool.submit(b"echo:a", answers("a"))
    run_until(reactor, answers.has("a"))
    assert answers.got["a"] is None
    assert pool.restarts >= 1


def test_a_child_that_cannot_start_fails_jobs_instead_of_holding_them(
        reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(module="no_such_module_here", restart_min=0.05, restart_max=0.2)
    answers = Answers()
    names = [f"j{i}" for i in range(6)]
    for name in names:
        assert pool.submit(b"echo:x", answers(name))
    run_until(reactor, answers.has(*names))
    assert all(answers.got[n] is None for n in names)
    assert pool.pending == 0


def test_jobs_go_to_a_free_child(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(workers=2, pipeline=1)
    answers = Answers()
    pool.submit(b"pid", answers("up1"))
    pool.submit(b"pid", answers("up2"))
    run_until(reactor, answers.has("up1", "up2"))  # both children are up
    assert answers.got["up1"] != answers.got["up2"]
    pool.submit(b"sleep:3", answers("a"))
    pool.submit(b"pid", answers("b"))  # not behind the sleeper: the other child is free
    run_until(reactor, answers.has("b"))
    assert "a" not in answers.got
    run_until(reactor, answers.has("a"))


def test_the_loop_runs_on_while_a_child_works(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()
    pool.submit(b"pid", answers("warm"))
    run_until(reactor, answers.has("warm"))  # the child is up
    ticks: List[float] = []

    def tick(_: object) -> None:
        ticks.append(time.monotonic())
        if "spin" not in answers.got:
            reactor.call_later(0.01, tick)

    pool.submit(b"spin:0.5", answers("spin"))
    reactor.call_later(0.01, tick)
    run_until(reactor, answers.has("spin"))
    assert answers.got["spin"] == b"spun"
    assert len(ticks) >= 10  # timers kept firing through half a second of the child's CPU
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.45  # never held for the child's 0.5 s


def test_a_callback_that_raises_does_not_break_the_pool(
        reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool()
    answers = Answers()

    def bad(answer: Optional[bytes]) -> None:
        raise RuntimeError("a bug in the caller")

    pool.submit(b"echo:1", bad)
    pool.submit(b"echo:2", answers("2"))
    run_until(reactor, answers.has("2"))
    assert answers.got["2"] == b"2" and pool.pending == 0


def test_a_request_over_the_size_limit_is_a_caller_error(make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(max_message=100)
    with pytest.raises(ValueError):
        pool.submit(b"x" * 101, lambda answer: None)
    assert pool.pending == 0


_frames = st.lists(st.one_of(
    st.binary(max_size=12),  # anything
    st.tuples(st.integers(0, 40), st.sampled_from([0, 1, 2, 255]), st.binary(max_size=40)).map(
        lambda t: t[0].to_bytes(4, "big") + bytes([t[1]]) + t[2]),  # frame-shaped, lengths often wrong
), max_size=4).map(b"".join)


@settings(max_examples=15, deadline=None)
@given(_frames)
def test_whatever_a_child_writes_every_job_is_answered_once(prefix: bytes) -> None:
    """Bytes a child writes before its answers (a stray print, a broken child) never raise in
    the parent: each job is answered exactly once, with a child's answer or None. (A stray
    half header puts the parent out of step, waiting for a frame that never ends: the job
    timeout is what ends that.)"""
    reactor = Reactor()
    pool = WorkerPool(reactor, "worker_child", env=child_env(WORKER_CHILD_PREFIX=prefix.hex()),
                      cwd=str(TESTS), restart_min=0.05, restart_max=0.1, job_timeout=1.5)
    try:
        answers = Answers()
        for i in range(3):
            assert pool.submit(b"echo:%d" % i, answers(f"j{i}"))
        run_until(reactor, answers.has("j0", "j1", "j2"))
        if not prefix:
            assert [answers.got[f"j{i}"] for i in range(3)] == [b"0", b"1", b"2"]
        assert pool.pending == 0
    finally:
        pool.close()
        reactor.close()


def test_children_run_in_a_session_of_their_own(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    """A terminal's Ctrl-C (sent to the foreground process group) reaches only the parent."""
    pool = make_pool()
    [pid] = pool.pids()
    assert os.getsid(pid) == pid != os.getsid(0)


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for whoever inherited it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


PARENT = """
import sys, time
from selchat.loop.reactor import Reactor
from selchat.loop.worker import WorkerPool
reactor = Reactor()
pool = WorkerPool(reactor, "worker_child", env=None, cwd=sys.argv[1])
got = []
pool.submit(b"pid", got.append)
while not got:
    reactor.run_once(timeout=0.05)
print(got[0].decode(), flush=True)
time.sleep(60)
"""


def test_a_parent_killed_outright_leaves_no_child_behind() -> None:
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(TESTS)], stdout=subprocess.PIPE,
                              env=child_env(), cwd=str(TESTS), text=True)
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], DEADLINE)
        assert ready, "the parent did not report its child"
        child = int(parent.stdout.readline())
        assert not _exited(child)
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + DEADLINE
    while not _exited(child):  # its stdin closed with the parent: it leaves by itself
        assert time.monotonic() < deadline, "the orphaned child is still running"
        time.sleep(0.02)


def test_a_job_that_waits_too_long_is_shed(reactor: Reactor, make_pool: Callable[..., WorkerPool]) -> None:
    pool = make_pool(pipeline=1, max_wait=0.5)
    answers = Answers()
    pool.submit(b"pid", answers("up"))
    run_until(reactor, answers.has("up"))
    pool.submit(b"sleep:3", answers("busy"))  # the only child is busy for 3 s
    pool.submit(b"echo:late", answers("late"))
    pool.submit(b"echo:later", answers("later"))
    run_until(reactor, answers.has("late", "later"), timeout=2.5)
    assert "busy" not in answers.got  # shed after half a second, not after the sleeper
    assert answers.got["late"] is None and answers.got["later"] is None
    assert pool.shed == 2
    run_until(reactor, answers.has("busy"))
    pool.submit(b"echo:fresh", answers("fresh"))
    run_until(reactor, answers.has("fresh"))
    assert answers.got["fresh"] == b"fresh"
