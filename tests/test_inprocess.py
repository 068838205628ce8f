"""The listener, admission and the whole server, run inside the test process with a fake clock.

Real loopback sockets, but no subprocess and no waiting for time to pass: the test owns the
reactor, drives it with `run_once(timeout=...)` between its own reads and writes, and moves the
clock by hand for the handshake timeout, pings and the shutdown grace.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from selchat.config import ServerConfig
from selchat.core.store import MemoryStore, StoreError
from selchat.defaults import ACCEPT_PAUSE, ACCEPT_PER_PASS
from selchat.doors.framed import codec
from selchat.loop.listener import Admission, Listener, bind
from selchat.loop.reactor import Reactor
from selchat.loop.transport import State
from selchat.server import Server

DEADLINE = 5.0  # real seconds any pumping loop may take


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def wait_until(cond: Callable[[], bool], step: Callable[[], None]) -> None:
    end = time.monotonic() + DEADLINE
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached before the deadline")
        step()


# --- the listener ---------------------------------------------------------------------------


class ShortOfFiles:
    """A listening socket whose accept fails with EMFILE the first `failures` times."""

    def __init__(self, sock: socket.socket, failures: int = 1,
                 code: int = errno.EMFILE) -> None:
        self.sock = sock
        self.failures = failures
        self.code = code
        self.attempts = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def accept(self) -> Tuple[socket.socket, Any]:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise OSError(self.code, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reactor(clock: FakeClock) -> Iterator[Reactor]:
    r = Reactor(clock=clock)
    yield r
    r.close()


def _registered(reactor: Reactor, fileobj: Any) -> bool:
    return any(key.fileobj is fileobj for key in reactor.selector.get_map().values())


def test_listener_accepts_and_hands_over(reactor: Reactor) -> None:
    accepted: List[socket.socket] = []
    listener = Listener(reactor, bind("127.0.0.1", 0), lambda s, a: accepted.append(s))
    clients = [socket.create_connection(listener.address, timeout=DEADLINE) for _ in range(3)]
    try:
        wait_until(lambda: len(accepted) == 3, lambda: reactor.run_once(timeout=0.01))
        ours = {s.getpeername() for s in accepted}
        assert ours == {c.getsockname() for c in clients}
    finally:
        for s in accepted + clients:
            s.close()
        listener.close()
    assert not _registered(reactor, listener.sock)
    listener.close()  # twice is harmless


def test_listener_accepts_a_bounded_number_per_pass(reactor: Reactor) -> None:
    accepted: List[socket.socket] = []
    listener = Listener(reactor, bind("127.0.0.1", 0), lambda s, a: accepted.append(s))
    clients: List[socket.socket] = []
    try:
        for _ in range(ACCEPT_PER_PASS + 10):
            # A blocking connect returns once the connection waits in the accept queue.
            clients.append(socket.create_connection(listener.address, timeout=DEADLINE))
        reactor.run_once(timeout=1.0)
        assert len(accepted) == ACCEPT_PER_PASS  # the rest wait for the next pass
        wait_until(lambda: len(accepted) == len(clients), lambda: reactor.run_once(timeout=0.01))
    finally:
        for s in accepted + clients:
            s.close()
        listener.close()


def test_emfile_pauses_accepting_until_accept_pause(reactor: Reactor, clock: FakeClock,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    accepted: List[socket.socket] = []
    flaky = ShortOfFiles(bind("127.0.0.1", 0), failures=1)
    listener = Listener(reactor, flaky, lambda s, a: accepted.append(s))  # type: ignore[arg-type]
    client = socket.create_connection(listener.address, timeout=DEADLINE)
    try:
        with caplog.at_level(logging.WARNING, logger="selchat.server"):
            wait_until(lambda: flaky.attempts >= 1, lambda: reactor.run_once(timeout=0.01))
        assert accepted == []
        assert not _registered(reactor, flaky)  # paused: the ready listener no longer spins the loop
        assert any("pausing accepts" in r.getMessage() for r in caplog.records)
        attempts = flaky.attempts
        for _ in range(3):
            reactor.run_once(timeout=0)
        assert flaky.attempts == attempts and accepted == []
        clock.advance(ACCEPT_PAUSE * 0.9)
        reactor.run_once(timeout=0)
        assert not _registered(reactor, flaky)
        clock.advance(ACCEPT_PAUSE * 0.2)
        wait_until(lambda: len(accepted) == 1, lambda: reactor.run_once(timeout=0.01))
        assert _registered(reactor, flaky)
        assert accepted[0].getpeername() == client.getsockname()
    finally:
        client.close()
        for s in accepted:
            s.close()
        listener.close()


def test_other_accept_errors_do_not_pause(reactor: Reactor) -> None:
    accepted: List[socket.socket] = []
    flaky = ShortOfFiles(bind("127.0.0.1", 0), failures=1, code=errno.ECONNABORTED)
    listener = Listener(reactor, flaky, lambda s, a: accepted.append(s))  # type: ignore[arg-type]
    client = socket.create_connection(listener.address, timeout=DEADLINE)
    try:
        wait_until(lambda: len(accepted) == 1, lambda: reactor.run_once(timeout=0.01))
        assert _registered(reactor, flaky)
    finally:
        client.close()
        for s in accepted:
            s.close()
        listener.close()


def test_listener_closed_while_paused_stays_closed(reactor: Reactor, clock: FakeClock) -> None:
    flaky = ShortOfFiles(bind("127.0.0.1", 0), failures=1)
    listener = Listener(reactor, flaky, lambda s, a: s.close())  # type: ignore[arg-type]
    client = socket.create_connection(listener.address, timeout=DEADLINE)
    try:
        wait_until(lambda: flaky.attempts >= 1, lambda: reactor.run_once(timeout=0.01))
        listener.close()
        clock.advance(ACCEPT_PAUSE * 2)
        reactor.run_once(timeout=0)  # the resume timer fires and must not re-register
        assert not _registered(reactor, flaky)
    finally:
        client.close()


# --- admission ------------------------------------------------------------------------------


def test_admission_counts_in_all_and_per_address() -> None:
    adm = Admission(max_clients=3, max_per_ip=2)
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") is None
    assert adm.admit("10.0.0.1") == "too_many_connections"
    assert adm.admit("10.0.0.2") is None
    assert adm.admit("10.0.0.3") == "server_full"
    assert adm.count == 3 and adm.per_ip == {"10.0.0.1": 2, "10.0.0.2": 1}
    adm.release("10.0.0.1")
    assert adm.admit("10.0.0.3") is None
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        adm.release(ip)
    assert adm.count == 0 and adm.per_ip == {}  # no empty entries left behind


def test_admission_without_a_per_address_limit() -> None:
    adm = Admission(max_clients=100, max_per_ip=0)
    for _ in range(50):
        assert adm.admit("10.0.0.1") is None
    assert adm.per_ip["10.0.0.1"] == 50


# --- the whole server, in process --------------------------------------------------------------


class Client:
    """A loopback client: non-blocking socket, frames decoded as they come."""

    def __init__(self, address: Tuple[str, int], rcvbuf: Optional[int] = None) -> None:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(DEADLINE)
        sock.connect(address)
        sock.setblocking(False)
        self.sock = sock
        self.decoder = codec.FrameDecoder(1 << 24)
        self.raw: List[bytes] = []  # every frame as it came, prefix included
        self.events: List[Dict[str, Any]] = []
        self.eof = False
        self.reading = True

    def send(self, obj: Dict[str, Any]) -> None:
        self.send_bytes(codec.encode(obj))

    def send_bytes(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.settimeout(DEADLINE)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def poll(self) -> None:
        if not self.reading or self.eof or self.sock.fileno() == -1:
            return
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self.decoder.feed(chunk)
        while True:
            payload = self.decoder.next_frame()
            if payload is None:
                break
            self.raw.append(codec.frame(payload, 1 << 24))
            self.events.append(codec.decode(payload))

    def of(self, kind: str) -> List[Dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def close(self) -> None:
        self.sock.close()


class Harness:
    """A server on port 0 with a fake clock, its clients, and a pump between them."""

    def __init__(self, **options: Any) -> None:
        store = options.pop("store", None)
        config = ServerConfig(port=0)
        config.rate = 0.0  # flood control is tested elsewhere; here it would only add noise
        for name, value in options.items():
            setattr(config, name, value)
        self.clock = FakeClock()
        self.config = config
        self.store = store if store is not None else MemoryStore()
        self.server = Server(config, self.store, reactor=Reactor(clock=self.clock))
        self.reactor = self.server.reactor
        self.server.listen()
        self.clients: List[Client] = []
        self.finished = False

    def connect(self, rcvbuf: Optional[int] = None) -> Client:
        client = Client(self.server.address, rcvbuf)
        self.clients.append(client)
        before = self.server.accepted
        self.pump(lambda: self.server.accepted > before)
        return client

    def transport_of(self, client: Client) -> Any:
        port = client.sock.getsockname()[1]
        for t in self.server.transports.values():
            if t.peer.endswith(f":{port}"):
                return t
        return None

    def step(self) -> None:
        self.reactor.run_once(timeout=0.002)
        for c in self.clients:
            c.poll()

    def pump(self, cond: Callable[[], bool]) -> None:
        wait_until(cond, self.step)

    def settle(self, passes: int = 5) -> None:
        for _ in range(passes):
            self.step()

    def hello(self, nick: str, ref: Any = None, **kw: Any) -> Client:
        c = self.connect(**kw)
        req: Dict[str, Any] = {"type": "hello", "nick": nick}
        if ref is not None:
            req["ref"] = ref
        c.send(req)
        self.pump(lambda: bool(c.of("history")))  # welcome, join, names, then history
        return c

    def serving(self) -> bool:
        """serve_forever's loop condition."""
        srv = self.server
        return not (srv._stopping and (not srv.transports or self.reactor.now >= srv._stop_deadline))  # noqa: SLF001

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.server._finish()  # noqa: SLF001

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.finish()


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    made: List[Harness] = []

    def factory(**options: Any) -> Harness:
        h = Harness(**options)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


def test_hello_gets_welcome_join_names_history(make: Callable[..., Harness]) -> None:
    h = make()
    alice = h.hello("alice", ref=7)
    kinds = [e["type"] for e in alice.events]
    assert kinds == ["welcome", "join", "names", "history"]
    welcome = alice.events[0]
    assert welcome["nick"] == "alice" and welcome["ref"] == 7
    assert welcome["limits"]["max_frame"] == h.config.max_frame
    assert alice.events[1] == {"type": "join", "room": "#lobby", "nick": "alice", "ref": 7}
    assert alice.events[2]["nicks"] == ["alice"]
    assert h.server.admission.count == 1


def test_requests_before_hello_are_refused(make: Callable[..., Harness]) -> None:
    h = make()
    c = h.connect()
    c.send({"type": "say", "room": "#lobby", "text": "hi", "ref": "r"})
    c.send({"type": "ping", "token": "t"})
    h.pump(lambda: len(c.events) >= 2)
    assert c.events[0]["type"] == "error" and c.events[0]["code"] == "not_registered"
    assert c.events[0]["ref"] == "r"
    assert c.events[1] == {"type": "pong", "token": "t"}


def test_room_message_fans_out_the_same_bytes_to_everyone(make: Callable[..., Harness]) -> None:
    h = make()
    alice, bob, carol = h.hello("alice"), h.hello("bob"), h.hello("carol")
    h.settle()
    for c in (alice, bob, carol):
        c.raw.clear()
        c.events.clear()
    alice.send({"type": "say", "room": "#lobby", "text": "hello all", "ref": "a-1"})
    h.pump(lambda: all(c.of("message") for c in (alice, bob, carol)))
    h.settle()
    assert bob.raw == carol.raw and len(bob.raw) == 1  # byte for byte the same frame
    shared = bob.events[0]
    assert shared == {"type": "message", "id": shared["id"], "ts": shared["ts"], "from": "alice",
                      "room": "#lobby", "text": "hello all"}
    assert "ref" not in shared  # copies for others never carry the sender's ref
    own = alice.of("message")
    assert len(own) == 1
    assert own[0] == dict(shared, ref="a-1")  # the sender's own copy: same event, its ref


def test_a_pass_of_messages_reaches_everyone_in_one_order(make: Callable[..., Harness]) -> None:
    h = make()
    alice, bob, carol = h.hello("alice"), h.hello("bob"), h.hello("carol")
    h.settle()
    burst = b"".join(codec.encode({"type": "say", "room": "#lobby", "text": f"m{i}"})
                     for i in range(50))
    alice.send_bytes(burst)  # one read, one pass, one batch
    bob.send({"type": "say", "room": "#lobby", "text": "from bob"})
    h.pump(lambda: all(len(c.of("message")) == 51 for c in (alice, bob, carol)))
    orders = [[(m["id"], m["text"]) for m in c.of("message")] for c in (alice, bob, carol)]
    assert orders[0] == orders[1] == orders[2]
    ids = [i for i, _ in orders[0]]
    assert ids == sorted(ids) and len(set(ids)) == 51
    assert [t for _, t in orders[0] if t != "from bob"] == [f"m{i}" for i in range(50)]


def test_nothing_is_sent_before_it_is_committed(make: Callable[..., Harness]) -> None:
    """At the commit of a pass, nothing of that pass's message is on the wire yet."""

    class Watching(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.check: Optional[Callable[[], None]] = None

        def commit(self) -> int:
            if self._pending and self.check is not None:  # noqa: SLF001
                self.check()
            return super().commit()

    store = Watching()
    h = make(store=store)
    alice, bob = h.hello("alice"), h.hello("bob")
    h.settle()
    seen: List[Tuple[int, bool]] = []

    def check() -> None:
        t = h.transport_of(bob)
        try:
            on_wire = bool(bob.sock.recv(1 << 16, socket.MSG_PEEK))
        except BlockingIOError:
            on_wire = False
        seen.append((t.out.size, on_wire))

    store.check = check
    alice.send({"type": "say", "room": "#lobby", "text": "durable first"})
    h.pump(lambda: bool(bob.of("message")))
    # The commit ran with the message pending, and bob had nothing of it on the wire then (the
    # pass's room messages are sent after the commit: queued, or straight to an idle socket).
    assert seen and seen[0][1] is False
    assert bob.of("message")[0]["text"] == "durable first"


def test_store_failure_is_reported_to_the_sender(make: Callable[..., Harness]) -> None:
    class Failing(MemoryStore):
        fail = False

        def commit(self) -> int:
            if self.fail and self._pending:  # noqa: SLF001
                self._pending = 0  # noqa: SLF001
                raise StoreError("disk full")
            return super().commit()

    store = Failing()
    h = make(store=store)
    alice, bob = h.hello("alice"), h.hello("bob")
    h.settle()
    store.fail = True
    alice.send({"type": "say", "room": "#lobby", "text": "lost?", "ref": 3})
    h.pump(lambda: bool(alice.of("error")) and bool(bob.of("message")))
    err = alice.of("error")[0]
    assert err["code"] == "not_stored" and err["ref"] == 3
    # The message itself still reached everyone, the sender first and then its error.
    kinds = [e["type"] for e in alice.events]
    assert kinds.index("message") < kinds.index("error")
    assert bob.of("message")[0]["text"] == "lost?"


def _shrink_send_buffer(h: Harness, client: Client) -> None:
    t = h.transport_of(client)
    t.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def test_slow_consumer_is_dropped_and_the_others_see_why(make: Callable[..., Harness]) -> None:
    h = make(max_outbuf=256 * 1024)
    alice, bob = h.hello("alice"), h.hello("bob")
    slow = h.hello("slow", rcvbuf=4096)
    _shrink_send_buffer(h, slow)  # so the kernel holds little and our queue fills quickly
    h.settle()
    slow.reading = False  # from now on it reads nothing
    text = "x" * 4000
    said = [0]

    def step() -> None:
        if said[0] < 400:
            alice.send_bytes(b"".join(codec.encode({"type": "say", "room": "#lobby", "text": text})
                                      for _ in range(8)))
            said[0] += 8
        h.step()

    wait_until(lambda: any(q["nick"] == "slow" for q in bob.of("quit")), step)
    quit_ = [q for q in bob.of("quit") if q["nick"] == "slow"][0]
    assert quit_ == {"type": "quit", "nick": "slow", "reason": "slow consumer"}
    h.pump(lambda: any(q["nick"] == "slow" for q in alice.of("quit")))
    # Dropped at once, its place released; the others go on without a gap.
    assert h.transport_of(slow) is None
    assert h.server.admission.count == 2
    h.pump(lambda: len(bob.of("message")) == said[0] and len(alice.of("message")) == said[0])
    assert [m["id"] for m in bob.of("message")] == [m["id"] for m in alice.of("message")]
    assert not any(e["type"] == "quit" and e["nick"] in ("alice", "bob") for e in bob.events)


@pytest.mark.parametrize("count, text", [(300, "y"), (40, "z" * 900)], ids=["short", "long"])
def test_a_reading_client_is_not_dropped_for_its_own_echoes(make: Callable[..., Harness],
                                                            count: int, text: str) -> None:
    """Backpressure checks the session's queue between requests, but the echoes of `say`
    wait in the fan-out's room batch until the pass ends. One read of many says (300 short
    ones, or 40 long ones: 36 KB) once batched past --max-outbuf 16384 and dropped a client
    that reads everything at once. A pass now serves one session's requests up to the
    high-water mark of bytes (and 256 requests in all); the rest go on in the next pass."""
    h = make(max_outbuf=16384, max_frame=4096, max_text=970)  # what --max-outbuf 16384 derives
    alice, bob = h.hello("alice"), h.hello("bob")
    h.settle()
    burst = b"".join(codec.encode({"type": "say", "room": "#lobby", "text": text})
                     for _ in range(count))  # one segment, one recv, one pass
    assert len(burst) < 65536
    alice.send_bytes(burst)
    h.pump(lambda: alice.eof or len(alice.of("message")) == count)
    assert not alice.eof
    assert len(alice.of("message")) == count


def test_handshake_timeout_on_the_fake_clock(make: Callable[..., Harness]) -> None:
    h = make(handshake_timeout=10.0)
    silent = h.connect()
    registered = h.hello("alice")
    h.settle()
    assert h.server.admission.count == 2
    h.clock.advance(9.9)
    h.settle()
    assert not silent.eof
    h.clock.advance(0.2)
    h.pump(lambda: silent.eof)
    assert silent.events == []  # closed without a word
    assert h.server.admission.count == 1  # its place is given back
    assert not registered.eof  # a registered client has no handshake deadline


def test_ping_then_ping_timeout_on_the_fake_clock(make: Callable[..., Harness]) -> None:
    h = make(ping_interval=60.0, ping_timeout=120.0)
    alice, bob = h.hello("alice"), h.hello("bob")
    h.settle()
    h.clock.advance(59.0)
    h.settle()
    assert not alice.of("ping") and not bob.of("ping")
    h.clock.advance(1.5)
    h.pump(lambda: bool(alice.of("ping")) and bool(bob.of("ping")))
    token = alice.of("ping")[0]["token"]
    assert isinstance(token, str)
    alice.send({"type": "pong", "token": token})  # alice answers, bob stays silent
    h.settle()
    h.clock.advance(30.0)
    h.settle()
    assert len(bob.of("ping")) == 1  # one ping per silence, not one per check
    h.clock.advance(30.0)  # 120.5 s since bob last said anything
    h.pump(lambda: bob.eof and any(q["nick"] == "bob" for q in alice.of("quit")))
    quit_ = [q for q in alice.of("quit") if q["nick"] == "bob"][0]
    assert quit_["reason"] == "ping timeout"
    assert not alice.eof
    assert h.server.admission.count == 1


def test_admission_limits_through_the_server(make: Callable[..., Harness]) -> None:
    h = make(max_clients=2, max_per_ip=16)
    a, b = h.hello("a1"), h.hello("b1")
    refused = h.connect()
    h.pump(lambda: refused.eof)
    assert [e["code"] for e in refused.of("error")] == ["server_full"]
    assert h.server.admission.count == 2
    a.send({"type": "quit"})
    h.pump(lambda: a.eof)
    a.close()  # the server lingers until our side closes too
    h.pump(lambda: h.server.admission.count == 1)
    c = h.hello("c1")  # the freed place is usable
    assert c.of("welcome")
    assert h.server.admission.count == 2


def test_per_address_limit_through_the_server(make: Callable[..., Harness]) -> None:
    h = make(max_clients=100, max_per_ip=2)
    h.connect(), h.connect()
    third = h.connect()
    h.pump(lambda: third.eof)
    assert [e["code"] for e in third.of("error")] == ["too_many_connections"]
    assert h.server.admission.per_ip == {"127.0.0.1": 2}


def test_shutdown_tells_every_client_and_ends(make: Callable[..., Harness]) -> None:
    h = make(shutdown_grace=5.0)
    alice, bob, carol = h.hello("alice"), h.hello("bob"), h.hello("carol")
    h.settle()
    address = h.server.address
    h.server.request_stop()
    assert h.serving()  # clients are still connected: the loop goes on for now
    h.pump(lambda: all(c.eof for c in (alice, bob, carol)))
    for c in (alice, bob, carol):
        assert c.events[-1] == {"type": "notice", "text": "server shutting down"}
        assert not c.of("quit")  # everyone leaves at once: no quit storm
        c.close()
    h.pump(lambda: not h.serving())  # every peer closed: serve_forever would return
    assert h.server.transports == {}
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1.0).close()
    h.finish()


def test_shutdown_grace_bounds_a_client_that_never_reads(make: Callable[..., Harness]) -> None:
    h = make(shutdown_grace=5.0, max_outbuf=1 << 22)
    alice, stuck = h.hello("alice"), h.hello("stuck", rcvbuf=4096)
    _shrink_send_buffer(h, stuck)
    h.settle()
    stuck.reading = False
    big = b"".join(codec.encode({"type": "say", "room": "#lobby", "text": "z" * 4000})
                   for _ in range(100))
    alice.send_bytes(big)  # queued for stuck, which will not take it
    h.pump(lambda: len(alice.of("message")) == 100)
    h.server.request_stop()
    h.pump(lambda: alice.eof)
    alice.close()
    h.settle()
    assert h.serving()
    assert h.transport_of(stuck) is not None
    h.clock.advance(5.0)
    h.pump(lambda: not h.serving())  # the grace is over: serve_forever would return
    h.finish()
    assert h.server.transports == {}
    stuck.reading = True
    stuck.poll()


def test_finish_aborts_what_is_left_and_commits(make: Callable[..., Harness]) -> None:
    h = make()
    alice = h.hello("alice")
    h.settle()
    t = h.transport_of(alice)
    h.finish()
    assert t.state is State.CLOSED
    assert h.server.transports == {}
    alice.poll()
    wait_until(lambda: alice.eof, alice.poll)
