"""Review of issue 17: the cluster's tables, without sockets (a ClusterNode on a stub link that
records what would go to Redis; commands applied by hand in offset order, as from the stream).

Each xfail(strict=True) test shows a table that grows without a bound or a fate."""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

import pytest

from selchat.core.chat import Chat
from selchat.core.store import MemoryStore
from selchat.hub import Hub
from selchat.links.cluster import ClusterNode
from selchat.links.redis import LinkState
from selchat.loop.reactor import Reactor


class StubLink:
    """What ClusterNode asks of a RedisLink; commands are recorded, never answered."""

    db = 0
    name = "stub"

    def __init__(self) -> None:
        self.state = LinkState.UP
        self.sent: List[Tuple[Any, ...]] = []
        self.dones: List[Any] = []
        self.on_message: Any = None
        self.on_up: Any = None
        self.on_state: Any = None

    def add_script(self, source: bytes) -> str:
        return ""

    def subscribe(self, *channels: Any) -> None:
        pass

    def execute(self, *args: Any, done: Any = None) -> bool:
        self.sent.append(args)
        self.dones.append(done)
        return True


class Transport:
    accepting = True
    ip = "127.0.0.1"
    peer = "127.0.0.1:1"

    def write(self, data: bytes) -> None:
        pass


class Session:
    """A local connection as the hub sees it."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.user: Any = None
        self.errors: List[str] = []

    def reply(self, event: Any, ref: Any) -> None:
        pass

    def own_message(self, message: Any, ref: Any, shared: bytes) -> bytes:
        return b""

    def send_error(self, code: str, message: str, ref: Any = None) -> None:
        self.errors.append(code)

    def job_done(self) -> None:
        pass

    def drop(self, reason: str) -> None:
        pass


def live_node() -> Tuple[ClusterNode, StubLink, Hub]:
    hub = Hub(Chat(MemoryStore()), Reactor())
    link = StubLink()
    node = ClusterNode(hub, link, node_id="me")  # type: ignore[arg-type]
    hub.cluster = node
    node.epoch, node.offset, node.synced, node.live = "e", 0, True, True
    node.nodes["me"] = None
    return node, link, hub


def apply(node: ClusterNode, command: dict) -> None:
    node._current_id += 1
    node._apply(node.offset + 1, b"%d %s" % (node._current_id, json.dumps(command).encode()))


def reg(sid: str, nick: str, q: int = 0) -> dict:
    return {"k": "reg", "s": sid, "nick": nick, "lobby": True, "ident": "", "host": "h",
            "real": "", "door": "json", "origin": "10.0.0.1", "t": 1, "acct": None, "tok": None,
            "n": sid.partition(":")[0], "q": q}


def test_refused_remote_hellos_leave_nothing_behind() -> None:
    node, _, _ = live_node()
    apply(node, reg("other:1", "alice"))
    for n in range(2, 1002):
        apply(node, reg(f"other:{n}", "alice"))  # nick_taken, each
    assert len(node.sessions) == 1, f"{len(node.sessions)} sessions kept for one user"


def test_refused_local_hellos_leave_nothing_behind() -> None:
    node, link, hub = live_node()
    apply(node, reg("other:1", "alice"))
    answers: List[Optional[str]] = []
    for _ in range(100):
        session = Session()
        hub.admit("alice", session, None, lambda user, error: answers.append(error and error.code))
        payload = link.sent[-1][7]  # EVALSHA sha 3 meta stream ids channel PAYLOAD ...
        apply(node, json.loads(payload))
        session.transport.accepting = False  # the client gives up and goes
    assert answers == ["nick_taken"] * 100
    assert len(node._sid_of) == 0, f"{len(node._sid_of)} gone connections still held"


def _invitations_after_a_departure(collect: bool) -> bool:
    """Applies one fixed sequence of commands; True when the first invitee may then join."""
    import gc

    from selchat.core import requests as R
    from selchat.links.cluster import encode_request

    def req(sid: str, request: Any) -> dict:
        return {"k": "req", "s": sid, "r": encode_request(request), "t": 5, "n": "x", "q": 0}

    node, _, _ = live_node()
    apply(node, reg("x:0", "op"))
    apply(node, req("x:0", R.JoinRoom("#r")))
    apply(node, req("x:0", R.SetModes("#r", (("invite_only", True),))))
    for n in range(1, 101):
        apply(node, reg(f"x:{n}", f"u{n}"))
        apply(node, req("x:0", R.InviteUser("#r", f"u{n}")))
    apply(node, {"k": "leave", "s": "x:50", "r": "bye", "n": "x", "q": 0})
    if collect:
        gc.collect()  # what another process's collector may have done by now
    apply(node, reg("x:101", "u101"))
    apply(node, req("x:0", R.InviteUser("#r", "u101")))  # the 101st: one goes (MAX_INVITES)
    apply(node, req("x:1", R.JoinRoom("#r")))
    return "#r" in node.chat.users["u1"].rooms


def test_applying_the_same_commands_does_not_depend_on_the_garbage_collector() -> None:
    import gc
    gc.disable()
    try:
        assert _invitations_after_a_departure(collect=True) == _invitations_after_a_departure(collect=False)
    finally:
        gc.enable()


def _floor_of(sent: Tuple[Any, ...]) -> int:
    """The id floor of a recorded publication (EVALSHA sha 3 meta stream ids channel payload
    maxlen epoch FLOOR)."""
    return int(sent[-1])


def test_ids_keep_growing_when_redis_comes_back_empty_after_a_message_we_never_saw() -> None:
    """CI, stop 15: another process applied message 7; Redis died before this process read it
    and came back empty; this process's next message got id 1. Once it has seen Redis lose its
    data, its floor is its clock (ms x 1000): above any id given before, without waiting for
    processes that may be gone; it serves at once."""
    import time as _time

    from selchat.core import requests as R
    from selchat.links.cluster import encode_request

    node, link, hub = live_node()
    apply(node, reg("other:1", "bob"))
    node._current_id = 6
    apply(node, {"k": "req", "s": "other:1", "r": encode_request(R.JoinRoom("#r")), "t": 5,
                 "n": "other", "q": 1})  # id 7: the highest this process saw
    session = Session()
    hub.admit("carol", session, None, lambda user, error: None)
    assert 7 <= _floor_of(link.sent[-1]) < 1000, "before any loss, ids are not clock-based"
    # The link falls; Redis comes back empty: the catch-up finds a new epoch.
    node._on_state(LinkState.DOWN)
    node._on_up()
    before = int(_time.time() * 1000) * 1000
    link.dones[-1]([b"e2", 0, b"epoch", []])  # the answer to the catch-up's `since`
    assert node.live, "waits for nobody"
    hub.admit("dave", Session(), None, lambda user, error: None)
    assert _floor_of(link.sent[-1]) >= before
