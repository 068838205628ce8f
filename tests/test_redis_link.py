"""selchat.links.redis and selchat.links.scripts against a real redis-server (tests/redisserver.py).

Each test starts its own redis-server on a free loopback port in a temporary directory, with the
append-only file on; the fixture skips the test only when redis-server is not installed. Every
wait is a loop of reactor passes until a condition holds or a deadline passes. What is pinned:
replies reach their callbacks in order under a long pipeline; every callback is answered
exactly once, with `Unavailable` when the link cannot carry it (down, buffer full, dropped);
pub/sub messages arrive in order; the publication script gives one gap-free order to
interleaved publishers; after Redis is killed and restarted with its AOF the links come back,
resubscribe before `on_up`, and the catch-up by (epoch, offset) is exact; a Redis back empty
is a new epoch; a stalled Redis never stalls the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from redisserver import REDIS_SERVER, RedisServer
from selchat.links.redis import LinkState, RedisLink, Unavailable
from selchat.links.resp import ReplyError
from selchat.links.scripts import Missed, Publication, RoomStreams, parse_message
from selchat.loop.reactor import Reactor

DEADLINE = 15.0


def run_until(reactor: Reactor, cond: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        reactor.run_once(timeout=0.02)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def make_link(reactor: Reactor) -> Iterator[Callable[..., RedisLink]]:
    made: List[RedisLink] = []

    def make(url: str, up: bool = True, **kwargs: Any) -> RedisLink:
        kwargs.setdefault("backoff_min", 0.02)
        kwargs.setdefault("backoff_max", 0.2)
        link = RedisLink(reactor, url, **kwargs)
        made.append(link)
        if up:
            run_until(reactor, lambda: link.state is LinkState.UP)
        return link

    yield make
    for link in made:
        link.close()


class Answers:
    """Callbacks that record their reply and prove each is called once."""

    def __init__(self) -> None:
        self.got: Dict[Any, Any] = {}

    def __call__(self, key: Any) -> Callable[[Any], None]:
        def done(reply: Any) -> None:
            assert key not in self.got, f"{key!r} answered twice"
            self.got[key] = reply
        return done

    def __len__(self) -> int:
        return len(self.got)

    def unavailable(self) -> List[Any]:
        return [k for k, v in self.got.items() if isinstance(v, Unavailable)]


# --- commands -----------------------------------------------------------------------------------


def test_pipelined_replies_come_back_in_order(redis: RedisServer, reactor: Reactor,
                                              make_link: Callable[..., RedisLink]) -> None:
    link = make_link(redis.url)
    answers = Answers()
    total = 0
    for burst in range(20):  # bursts of one pass each, several passes in flight at once
        for i in range(250):
            n = burst * 250 + i
            if n % 2:
                assert link.execute("ECHO", f"e{n}", done=answers(n))
            else:
                assert link.execute("INCR", "counter", done=answers(n))
            total += 1
        reactor.run_once(timeout=0)
    run_until(reactor, lambda: len(answers) == total)
    for n in range(total):
        reply = answers.got[n]
        assert reply == (f"e{n}".encode() if n % 2 else n // 2 + 1), (n, reply)
    assert link.pending == 0


def test_error_replies_are_values_and_the_link_goes_on(redis: RedisServer, reactor: Reactor,
                                                       make_link: Callable[..., RedisLink]) -> None:
    link = make_link(redis.url)
    answers = Answers()
    link.execute("SET", "k", "v", done=answers(0))
    link.execute("NOSUCHCOMMAND", done=answers(1))
    link.execute("INCR", "k", done=answers(2))
    link.execute("GET", "k", done=answers(3))
    run_until(reactor, lambda: len(answers) == 4)
    assert answers.got[0] == b"OK"
    assert isinstance(answers.got[1], ReplyError) and not isinstance(answers.got[1], Unavailable)
    assert isinstance(answers.got[2], ReplyError)
    assert answers.got[3] == b"v" and link.state is LinkState.UP


def test_select_db_from_the_url(redis: RedisServer, reactor: Reactor,
                                make_link: Callable[..., RedisLink]) -> None:
    five, zero = make_link(redis.url + "/5"), make_link(redis.url)
    answers = Answers()
    five.execute("SET", "where", "five", done=answers("set"))
    run_until(reactor, lambda: len(answers) == 1)
    zero.execute("GET", "where", done=answers(0))
    five.execute("GET", "where", done=answers(5))
    run_until(reactor, lambda: len(answers) == 3)
    assert answers.got[0] is None and answers.got[5] == b"five" and five.db == 5


def test_a_refused_command_is_answered_from_the_loop_not_inside_execute(
        redis: RedisServer, reactor: Reactor, make_link: Callable[..., RedisLink]) -> None:
    link = make_link(redis.url, up=False)
    assert link.state is not LinkState.UP
    answers = Answers()
    assert link.execute("PING", done=answers(0)) is False
    assert len(answers) == 0
    reactor.run_once(timeout=0)
    assert isinstance(answers.got[0], Unavailable) and answers.got[0].sent is False


def test_password_from_the_url(tmp_path: Path, reactor: Reactor,
                               make_link: Callable[..., RedisLink], caplog: Any) -> None:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "r", extra=["--requirepass", "s3cret"]).start()
    try:
        good = make_link(f"redis://:s3cret@127.0.0.1:{server.port}/1")
        answers = Answers()
        good.execute("PING", done=answers(0))
        run_until(reactor, lambda: len(answers) == 1)
        assert answers.got[0] == b"PONG"
        with caplog.at_level(logging.INFO, logger="selchat.links.redis"):
            bad = make_link(f"redis://:wrong@127.0.0.1:{server.port}", up=False)
            run_until(reactor, lambda: bad.failures >= 2)
        assert bad.state is not LinkState.UP
        assert "AUTH refused" in caplog.text and "s3cret" not in caplog.text and "wrong" not in caplog.text
    finally:
        server.stop()


# --- pub/sub ------------------------------------------------------------------------------------


def test_messages_and_pattern_messages_in_order(redis: RedisServer, reactor: Reactor,
                                                make_link: Callable[..., RedisLink]) -> None:
    got: List[Tuple[bytes, bytes, Optional[bytes]]] = []
    at_up: List[set] = []
    sub = make_link(redis.url, up=False, on_message=lambda c, d, p: got.append((c, d, p)),
                    on_up=lambda: at_up.append(set(sub.subscribed)))
    sub.subscribe("news")  # before the link connects: part of the handshake
    run_until(reactor, lambda: sub.state is LinkState.CONNECTING)
    sub.psubscribe("room:*")  # while it connects: after the handshake's own, still before on_up
    run_until(reactor, lambda: sub.state is LinkState.UP)
    assert at_up == [{b"news", b"room:*"}]  # on_up after both confirmations
    pub = make_link(redis.url)
    answers = Answers()
    for i in range(200):
        pub.execute("PUBLISH", "news" if i % 2 else f"room:{i % 3}", f"m{i}", done=answers(i))
    run_until(reactor, lambda: len(got) == 200)
    assert all(answers.got[i] == 1 for i in range(200))  # one subscriber each time
    for i, (channel, data, pattern) in enumerate(got):
        assert data == f"m{i}".encode()
        assert (channel, pattern) == ((b"news", None) if i % 2 else (f"room:{i % 3}".encode(), b"room:*"))
    sub.unsubscribe("news")
    run_until(reactor, lambda: b"news" not in sub.subscribed)
    assert sub.subscribed == {b"room:*"}


# --- the publication script -----------------------------------------------------------------


def test_interleaved_publishers_get_one_gap_free_order(redis: RedisServer, reactor: Reactor,
                                                       make_link: Callable[..., RedisLink]) -> None:
    live: List[Publication] = []
    watcher = make_link(redis.url, up=False, on_message=lambda c, d, p: live.append(parse_message(d)))
    rooms_w = RoomStreams(watcher)
    watcher.subscribe(rooms_w.channel("#same"))
    run_until(reactor, lambda: watcher.state is LinkState.UP)
    publishers = [RoomStreams(make_link(redis.url)) for _ in range(3)]
    answers = Answers()
    per_link, batch = 300, 7
    for start in range(0, per_link, batch):  # every pass, each publisher sends a batch
        for p, rooms in enumerate(publishers):
            for i in range(start, min(start + batch, per_link)):
                assert rooms.publish("#same", f"p{p}-{i}-".encode() + b"x" * 50, answers((p, i)))
        reactor.run_once(timeout=0)
    total = 3 * per_link
    run_until(reactor, lambda: len(answers) == total and len(live) == total)
    replies: Dict[int, bytes] = {}
    for (p, i), pub in answers.got.items():
        assert isinstance(pub, Publication), pub
        assert pub.offset not in replies
        replies[pub.offset] = pub.payload
    assert sorted(replies) == list(range(1, total + 1))  # gap-free, each offset once
    for p in range(3):  # each publisher's own commands kept their order
        offsets = [answers.got[(p, i)].offset for i in range(per_link)]
        assert offsets == sorted(offsets)
    assert [m.offset for m in live] == list(range(1, total + 1))  # the channel's order is it
    assert all(m.payload == replies[m.offset] for m in live)
    assert len({m.epoch for m in live}) == 1
    pages: List[Any] = []
    rooms_w.since("#same", "", 0, pages.append, count=total)
    run_until(reactor, lambda: len(pages) == 1)
    history = pages[0]
    assert isinstance(history, Missed) and not history.more and history.top == total
    assert [(m.offset, m.payload) for m in history.entries] == [(m.offset, m.payload) for m in live]


def test_a_trimmed_stream_is_a_gap_said_not_assumed(redis: RedisServer, reactor: Reactor,
                                                    make_link: Callable[..., RedisLink], caplog: Any) -> None:
    rooms = RoomStreams(make_link(redis.url), maxlen=20)
    answers = Answers()
    for i in range(400):
        rooms.publish("#busy", b"%d" % i, answers(i))
    run_until(reactor, lambda: len(answers) == 400)
    epoch = answers.got[0].epoch
    found: List[Any] = []
    with caplog.at_level(logging.WARNING):
        rooms.since("#busy", epoch, 5, found.append, count=1000)
        rooms.since("#busy", epoch, 395, found.append)
        rooms.since("#busy", epoch, 400, found.append)
        run_until(reactor, lambda: len(found) == 3)
    gap, recent, none = found
    assert gap.status == "gap" and gap.top == 400 and 20 <= len(gap.entries) < 400
    assert [m.offset for m in gap.entries] == list(range(gap.entries[0].offset, 401))
    assert gap.entries[0].offset > 6 and "fell out of the capped stream" in caplog.text
    assert recent.status == "ok" and [m.payload for m in recent.entries] == [b"395", b"396", b"397", b"398", b"399"]
    assert none.status == "ok" and none.entries == [] and not none.more


def test_noscript_falls_back_to_eval(redis: RedisServer, reactor: Reactor,
                                     make_link: Callable[..., RedisLink], caplog: Any) -> None:
    link = make_link(redis.url)
    rooms = RoomStreams(link)
    answers = Answers()
    link.execute("SCRIPT", "FLUSH", done=answers("flush"))
    with caplog.at_level(logging.WARNING):
        rooms.publish("#r", b"after a flush", answers(1))
        run_until(reactor, lambda: len(answers) == 2)
    assert isinstance(answers.got[1], Publication) and answers.got[1].offset == 1
    assert "sent again as EVAL" in caplog.text


# --- faults -------------------------------------------------------------------------------------


def test_redis_killed_and_restarted_with_its_aof(redis: RedisServer, reactor: Reactor,
                                                 make_link: Callable[..., RedisLink], caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="selchat.links")
    live: List[Publication] = []
    events: List[str] = []
    catchups: List[Any] = []
    pub = make_link(redis.url, name="pub")
    rooms_p = RoomStreams(pub)
    answers = Answers()

    def on_sub_up() -> None:
        events.append(f"up {sorted(sub.subscribed)}")
        if len(events) > 1:  # the reconnection: read what was missed, and publish one more now
            rooms_s.since("#r", live[-1].epoch, live[-1].offset, catchups.append)
            rooms_p.publish("#r", b"at up", answers("at up"))

    # The follower comes back slowly (1-2 s), the publisher quickly, so there is something to miss.
    sub = make_link(redis.url, up=False, name="sub", backoff_min=2.0, backoff_max=2.0, on_up=on_sub_up,
                    on_message=lambda c, d, p: live.append(parse_message(d)))
    rooms_s = RoomStreams(sub)
    sub.subscribe(rooms_s.channel("#r"))
    run_until(reactor, lambda: sub.state is LinkState.UP)
    for i in range(50):
        rooms_p.publish("#r", b"before %d" % i, answers(("before", i)))
    run_until(reactor, lambda: len(answers) == 50 and len(live) == 50)
    assert [m.offset for m in live] == list(range(1, 51))

    redis.kill(signal.SIGSTOP)  # commands in flight, unanswered, then Redis dies
    for i in range(10):
        rooms_p.publish("#r", b"lost %d" % i, answers(("lost", i)))
    pub.execute("INCR", "x", done=answers("incr"))
    reactor.run_once(timeout=0)
    assert pub.pending == 11
    redis.kill(signal.SIGKILL)
    run_until(reactor, lambda: pub.state is LinkState.DOWN and sub.state is LinkState.DOWN)
    lost: List[Any] = [("lost", i) for i in range(10)] + ["incr"]
    assert sorted(answers.unavailable(), key=str) == sorted(lost, key=str)
    assert all(answers.got[k].sent for k in lost)  # written: they might have run (they did not)
    assert execute_refused(pub, reactor)

    redis.start()  # same port, same directory: the AOF is read back

    def on_pub_up() -> None:
        for i in range(20):
            rooms_p.publish("#r", b"missed %d" % i, answers(("missed", i)))

    pub.on_up = on_pub_up
    run_until(reactor, lambda: pub.state is LinkState.UP)
    run_until(reactor, lambda: all(("missed", i) in answers.got for i in range(20)))
    assert sub.state is not LinkState.UP, "the follower came back too early to miss anything"
    assert [answers.got[("missed", i)].offset for i in range(20)] == list(range(51, 71))
    run_until(reactor, lambda: len(catchups) == 1 and "at up" in answers.got)
    run_until(reactor, lambda: live[-1].offset == 71)
    assert events[0] == events[1] == f"up [{rooms_s.channel('#r')!r}]"  # resubscribed before on_up
    missed = catchups[0]
    assert missed.status == "ok" and missed.epoch == live[0].epoch
    # Exact: what followed offset 50 (the ten lost ones never ran), maybe the one said at up.
    offsets = [m.offset for m in missed.entries]
    assert offsets in (list(range(51, 71)), list(range(51, 72)))
    assert [m.payload for m in missed.entries[:20]] == [b"missed %d" % i for i in range(20)]
    merged = {m.offset: m.payload for m in live}
    merged.update((m.offset, m.payload) for m in missed.entries)
    assert sorted(merged) == list(range(1, 72)) and merged[71] == b"at up"
    lines = [r.getMessage() for r in caplog.records if r.name == "selchat.links.redis"]
    for who in ("pub", "sub"):
        mine = [line.split(": ", 1)[1] for line in lines if line.startswith(who + " ")]
        assert mine[0] == "connecting" and mine[1].startswith("up")
        assert any(m.startswith("down (") for m in mine)
        assert any(m.startswith("reconnecting (attempt") for m in mine) and mine[-1].startswith("up")


def test_redis_killed_under_load_exact_accounting(redis: RedisServer, reactor: Reactor,
                                                  make_link: Callable[..., RedisLink]) -> None:
    """SIGKILL while publications stream in: after the restart, the room's stream holds every
    acknowledged publication at its offset, gap-free; what was never sent is not there; what
    was sent and lost with the connection is there at most once; and a follower's live
    messages plus its catch-up are exactly the stream."""
    live: Dict[int, bytes] = {}
    caught: List[Any] = []
    follower = make_link(redis.url, up=False, on_message=lambda c, d, p: live.__setitem__(
        parse_message(d).offset, parse_message(d).payload))
    rooms_f = RoomStreams(follower)
    follower.subscribe(rooms_f.channel("#load"))
    run_until(reactor, lambda: follower.state is LinkState.UP)
    rooms = RoomStreams(make_link(redis.url))
    answers = Answers()
    epoch: List[str] = []
    follower.on_up = lambda: rooms_f.since("#load", epoch[0], max(live, default=0), caught.append,
                                              count=10000)
    sent = 0
    deadline = time.monotonic() + DEADLINE
    while sent < 600:  # 20 a pass; Redis dies after 300 went out
        assert time.monotonic() < deadline
        for _ in range(20):
            rooms.publish("#load", b"m%d" % sent, answers(sent))
            sent += 1
        reactor.run_once(timeout=0)
        if sent == 300:
            run_until(reactor, lambda: any(isinstance(r, Publication) for r in answers.got.values()))
            epoch.append(next(r.epoch for r in answers.got.values() if isinstance(r, Publication)))
            redis.kill(signal.SIGKILL)
    run_until(reactor, lambda: len(answers) == 600)
    redis.start()
    run_until(reactor, lambda: follower.state is LinkState.UP and len(caught) == 1)
    whole: List[Any] = []
    rooms_f.since("#load", "", 0, whole.append, count=10000)
    run_until(reactor, lambda: len(whole) == 1)
    stream = {m.offset: m.payload for m in whole[0].entries}
    assert whole[0].epoch == epoch[0] and not whole[0].more
    assert sorted(stream) == list(range(1, len(stream) + 1))  # gap-free
    assert len(set(stream.values())) == len(stream)  # nothing twice
    acked = {r.offset: r.payload for r in answers.got.values() if isinstance(r, Publication)}
    assert all(stream.get(offset) == payload for offset, payload in acked.items())
    unsent = {b"m%d" % i for i, r in answers.got.items() if isinstance(r, Unavailable) and not r.sent}
    maybe = {b"m%d" % i for i, r in answers.got.items() if isinstance(r, Unavailable) and r.sent}
    assert not unsent & set(stream.values())
    assert set(stream.values()) <= set(acked.values()) | maybe
    assert unsent and acked  # the kill fell in the middle
    missed = caught[0]
    assert missed.status == "ok"
    merged = dict(live)
    merged.update((m.offset, m.payload) for m in missed.entries)
    assert merged == stream


def execute_refused(link: RedisLink, reactor: Reactor) -> bool:
    got: List[Any] = []
    refused = link.execute("PING", done=got.append) is False
    reactor.run_once(timeout=0)
    return refused and isinstance(got[0], Unavailable) and not got[0].sent


def test_redis_back_empty_is_a_new_epoch(redis: RedisServer, reactor: Reactor,
                                         make_link: Callable[..., RedisLink], caplog: Any) -> None:
    link = make_link(redis.url)
    rooms = RoomStreams(link)
    answers = Answers()
    for i in range(5):
        rooms.publish("#r", b"%d" % i, answers(i))
    run_until(reactor, lambda: len(answers) == 5)
    old = answers.got[0].epoch
    redis.kill(signal.SIGKILL)
    redis.wipe()
    redis.start()
    run_until(reactor, lambda: link.state is LinkState.DOWN)
    run_until(reactor, lambda: link.state is LinkState.UP)
    found: List[Any] = []
    with caplog.at_level(logging.WARNING):
        rooms.since("#r", old, 5, found.append)
        rooms.publish("#r", b"new", answers("new"))
        run_until(reactor, lambda: len(found) == 1 and "new" in answers.got)
    assert found[0].status == "epoch" and found[0].epoch != old and found[0].entries == []
    assert answers.got["new"].epoch == found[0].epoch and answers.got["new"].offset == 1
    assert "has a new epoch" in caplog.text


def test_a_stalled_redis_never_stalls_the_loop(redis: RedisServer, reactor: Reactor,
                                               make_link: Callable[..., RedisLink]) -> None:
    link = make_link(redis.url, max_outbuf=256 << 10, reply_timeout=2.0)
    ticks: List[float] = []

    def tick(_: Any) -> None:
        ticks.append(time.monotonic())
        reactor.call_later(0.01, tick)

    tick(None)
    redis.kill(signal.SIGSTOP)
    answers = Answers()
    value = b"v" * 65536
    accepted = 0
    refused_at: Optional[int] = None
    for i in range(2000):  # until the kernel's buffers and ours are full, at most 128 MB
        if not link.execute("SET", f"k{i}", value, done=answers(i)):
            refused_at = i
            break
        accepted += 1
        reactor.run_once(timeout=0)
    assert refused_at is not None, "the outgoing buffer never filled"
    assert refused_at not in answers.got  # answered from the loop, not inside execute
    reactor.run_once(timeout=0)
    refusal = answers.got[refused_at]
    assert isinstance(refusal, Unavailable) and "buffer full" in refusal.reason and not refusal.sent
    assert link.state is LinkState.UP and len(answers) == 1  # the link holds what it accepted
    run_until(reactor, lambda: link.state is LinkState.DOWN)  # the reply deadline
    assert len(answers) == accepted + 1
    assert all(isinstance(r, Unavailable) for r in answers.got.values())
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 50 and max(gaps) < 0.5, max(gaps)  # the timer kept firing
    redis.kill(signal.SIGCONT)
    run_until(reactor, lambda: link.state is LinkState.UP)
    more = Answers()
    link.execute("PING", done=more(0))
    run_until(reactor, lambda: len(more) == 1)
    assert more.got[0] == b"PONG"


def test_close_fails_what_is_pending_once(redis: RedisServer, reactor: Reactor,
                                          make_link: Callable[..., RedisLink]) -> None:
    states: List[LinkState] = []
    link = make_link(redis.url, on_state=states.append)
    redis.kill(signal.SIGSTOP)
    answers = Answers()
    for i in range(5):
        link.execute("INCR", "n", done=answers(i))
    reactor.run_once(timeout=0)
    fds = len(reactor.selector.get_map())
    link.close()
    assert len(answers) == 5 and all(isinstance(r, Unavailable) and r.sent for r in answers.got.values())
    assert len(reactor.selector.get_map()) == fds - 2  # both sockets out of the selector
    assert states == [LinkState.CONNECTING, LinkState.UP, LinkState.CLOSED]
    link.close()
    for _ in range(3):
        reactor.run_once(timeout=0)
    assert len(answers) == 5


# --- without a real Redis: the URL, a server that breaks RESP, one that is not there ----------


@pytest.mark.parametrize("url, host, port, db, user, password", [
    ("redis://127.0.0.1", "127.0.0.1", 6379, 0, None, None),
    ("redis://localhost:7000/3", "localhost", 7000, 3, None, None),
    ("redis://:p%40ss@127.0.0.1/1", "127.0.0.1", 6379, 1, None, "p@ss"),
    ("redis://me:pw@[::1]:6380", "::1", 6380, 0, "me", "pw"),
])
def test_the_url(url: str, host: str, port: int, db: int, user: Optional[str], password: Optional[str]) -> None:
    from selchat.links.redis import RedisAddress
    address = RedisAddress(url)
    assert (address.host, address.port, address.db, address.username, address.password) == (
        host, port, db, user, password)


@pytest.mark.parametrize("url", ["http://127.0.0.1", "redis://", "redis://127.0.0.1/x",
                                 "redis://127.0.0.1/?db=2", "rediss://127.0.0.1",
                                 "redis://no-such-host.invalid:6379"])
def test_a_bad_url_is_refused(url: str) -> None:
    from selchat.links.redis import RedisAddress
    with pytest.raises(ValueError):
        RedisAddress(url)


class FakeRedis:
    """A loopback listener in the test's reactor that answers PING and misbehaves on cue:
    GARBAGE -> bytes that are not RESP; EXTRA -> two replies for one command; HALF -> half
    a reply, then the connection closed."""

    def __init__(self, reactor: Reactor) -> None:
        import socket
        from selchat.links.resp import ReplyReader
        self.reactor = reactor
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.conns: List[Any] = []
        self._reader = ReplyReader
        reactor.register(self.listener, 1, self._accept)

    def _accept(self, mask: int) -> None:
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        self.accepted += 1
        reader = self._reader()
        self.conns.append(sock)
        self.reactor.register(sock, 1, lambda m: self._serve(sock, reader))

    def _serve(self, sock: Any, reader: Any) -> None:
        data = sock.recv(65536)
        if not data:
            self.reactor.unregister(sock)
            sock.close()
            return
        reader.feed(data)
        for command in reader.replies():
            verb = command[0].upper()
            answer = {b"PING": b"+PONG\r\n", b"GARBAGE": b"?nonsense\r\n", b"EXTRA": b"+a\r\n+b\r\n",
                      b"HALF": b"$10\r\nab"}.get(verb, b"-ERR unknown\r\n")
            sock.sendall(answer)
            if verb == b"HALF":
                self.reactor.unregister(sock)
                sock.close()
                return

    def close(self) -> None:
        for sock in [self.listener, *self.conns]:
            try:
                self.reactor.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()


@pytest.mark.parametrize("verb, reason", [("GARBAGE", "protocol error"),
                                          ("EXTRA", "a reply nobody asked for"),
                                          ("HALF", "Redis closed the connection")])
def test_a_broken_server_drops_the_link_and_it_comes_back(
        reactor: Reactor, make_link: Callable[..., RedisLink], caplog: Any, verb: str, reason: str) -> None:
    fake = FakeRedis(reactor)
    try:
        link = make_link(f"redis://127.0.0.1:{fake.port}")
        answers = Answers()
        with caplog.at_level(logging.WARNING, logger="selchat.links.redis"):
            link.execute(verb, done=answers(0))
            link.execute("PING", done=answers(1))
            run_until(reactor, lambda: link.state is LinkState.DOWN)
        assert reason in caplog.text
        if verb == "EXTRA":
            # RESP has no ids: an extra reply shifts the rest and is seen only when one is left over.
            assert answers.got == {0: b"a", 1: b"b"}
        else:
            assert all(isinstance(r, Unavailable) and r.sent for r in answers.got.values()) and len(answers) == 2
        run_until(reactor, lambda: link.state is LinkState.UP)
        assert fake.accepted == 4  # two connections, twice
    finally:
        fake.close()


def test_reconnect_backoff_doubles_capped_with_jitter(reactor: Reactor,
                                                      make_link: Callable[..., RedisLink]) -> None:
    from redisserver import free_port
    tries: List[float] = []
    link = make_link(f"redis://127.0.0.1:{free_port()}", up=False, backoff_min=0.01, backoff_max=0.08,
                     on_state=lambda s: tries.append(time.monotonic()) if s is LinkState.CONNECTING else None)
    run_until(reactor, lambda: len(tries) >= 9)
    waits = [b - a for a, b in zip(tries, tries[1:])]
    # The n-th wait is drawn from [d/2, d] with d = min(0.08, 0.01 * 2**(n-1)), plus a pass or two.
    for n, wait in enumerate(waits, start=1):
        d = min(0.08, 0.01 * 2 ** (n - 1))
        assert d / 2 - 0.02 <= wait <= d + 0.25, (n, wait)
    assert link.state is not LinkState.UP and link.failures >= 8
    assert len({round(w, 3) for w in waits[4:]}) > 1  # capped, and not all the same: jitter


def test_closing_from_a_callback_answers_the_rest_once(redis: RedisServer, reactor: Reactor,
                                                       make_link: Callable[..., RedisLink]) -> None:
    link = make_link(redis.url)
    answers = Answers()
    first = answers(0)

    def close_on_reply(reply: Any) -> None:
        first(reply)
        link.close()

    link.execute("PING", done=close_on_reply)
    for i in range(1, 6):
        link.execute("INCR", "n", done=answers(i))
    run_until(reactor, lambda: len(answers) == 6)
    for _ in range(5):
        reactor.run_once(timeout=0.01)
    assert answers.got[0] == b"PONG" and link.state is LinkState.CLOSED
    assert all(isinstance(answers.got[i], Unavailable) for i in range(1, 6))
