"""Review 19 of the cluster's ids after Redis lost its data, without sockets: a ClusterNode on
the stub link of tests/test_review17_unit.py, Redis's answers given by hand.

The review found the first design (every process publishes its highest id and waits for the
others') stalling on processes that were gone, losing a floor with the link, skipping one in
the 'behind' case, and letting a newcomer in with a floor of 0. The design now: once a process
has seen Redis lose ids, its floor is its clock (ms x 1000), kept in the process, handed to
newcomers in the snapshot; nobody waits. These tests hold it to that."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_review17_unit import Session, live_node  # noqa: E402

from selchat.links.redis import LinkState  # noqa: E402


def _floor(sent: Tuple[Any, ...]) -> int:
    """The id floor of a recorded publication (EVALSHA sha 3 meta stream ids channel payload
    maxlen epoch FLOOR)."""
    return int(sent[-1])


def _clock_floor() -> int:
    return int(time.time() * 1000) * 1000


def test_the_clock_floor_outlives_another_drop_of_the_link() -> None:
    """Seen once, the loss stays known: a later reconnection in the same (new) epoch, which
    detects nothing, still publishes above the clock floor (the floor is not a message that
    a falling link could lose)."""
    node, link, hub = live_node()
    node._on_state(LinkState.DOWN)
    node._on_up()
    before = _clock_floor()
    link.dones[-1]([b"e2", 0, b"epoch", []])
    assert node.live
    node._on_state(LinkState.DOWN)
    node._on_up()
    link.dones[-1]([b"e2", 0, b"ok", []])  # back in the same epoch: nothing new to see
    assert node.live
    hub.admit("carol", Session(), None, lambda user, error: None)
    assert _floor(link.sent[-1]) >= before


def test_behind_raises_the_floor_and_serves_at_once() -> None:
    """Redis lost acknowledged writes (its top below our offset): ids it gave may come again
    from its counter, so the floor goes above the clock; nobody is waited for."""
    node, link, hub = live_node()
    node.offset = 40
    node._on_state(LinkState.DOWN)
    node._on_up()
    before = _clock_floor()
    link.dones[-1]([b"e", 30, b"behind", []])
    assert node.live and node.offset == 30
    hub.admit("carol", Session(), None, lambda user, error: None)
    assert _floor(link.sent[-1]) >= before


def test_a_newcomer_takes_the_floor_with_the_snapshot() -> None:
    """A process that starts after the loss, from a snapshot, publishes above what the sender
    of its snapshot knew (its highest id and its clock floor), not above its own empty file."""
    old, _, _ = live_node()
    old._high_id = 57
    old._id_floor = 1_765_000_000_000_000
    snapshot = old.snapshot()
    new, link, hub = live_node()
    new.load(snapshot)
    hub.admit("erin", Session(), None, lambda user, error: None)
    assert _floor(link.sent[-1]) >= 1_765_000_000_000_000


def test_before_any_loss_ids_are_not_clock_based() -> None:
    node, link, hub = live_node()
    hub.admit("frank", Session(), None, lambda user, error: None)
    assert _floor(link.sent[-1]) < 1000
