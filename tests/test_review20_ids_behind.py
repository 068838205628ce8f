"""Review 20 of 100b0b4 (cluster: after Redis loses ids, a process's floor is its clock), without
sockets: ClusterNodes on the stub link of tests/test_review17_unit.py, Redis's answers by hand.

Redis comes back *behind* (its AOF lost its last second, or a failover to a replica that lagged):
its top offset and its `ids` counter are those of offset 8, while process A had applied
offsets 9 and 10 (ids 9 and 10) just before. Process B's link was down at that moment (a
reconnection in its backoff): B had applied up to offset 8 only. When both come back, A's
catch-up says `behind` (its offset 10 > Redis's top 8) and A raises its floor to its clock;
B's says `ok` (8 == 8): B has seen no loss, so its floor stays its highest id, 8. Whoever
publishes first takes the next id from Redis's counter: if it is B, its command gets id 9,
the id of a message A holds in its store (a different message, perhaps in another room). The
docs say every id given before is below the floor once Redis lost ids; only the processes
that notice the loss keep that promise.

xfail(strict=True): it fails now, and passes once a process that did not see the loss cannot
take an id below one Redis gave before it lost it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_review17_unit import Session, StubLink  # noqa: E402

from selchat.core.chat import Chat  # noqa: E402
from selchat.core.store import MemoryStore  # noqa: E402
from selchat.hub import Hub  # noqa: E402
from selchat.links.cluster import ClusterNode  # noqa: E402
from selchat.links.redis import LinkState  # noqa: E402
from selchat.loop.reactor import Reactor  # noqa: E402


def _node(name: str, offset: int) -> Tuple[ClusterNode, StubLink, Hub]:
    hub = Hub(Chat(MemoryStore()), Reactor())
    link = StubLink()
    node = ClusterNode(hub, link, node_id=name)  # type: ignore[arg-type]
    hub.cluster = node
    node.epoch, node.offset, node.synced, node.live = "e", offset, True, True
    node.nodes.update(dict.fromkeys(("a", "b")))
    node._high_id = node._current_id = offset  # one id per command, as a plain chat gives
    return node, link, hub


def _floor(sent: Tuple[Any, ...]) -> int:
    """The id floor of a recorded publication (EVALSHA sha 3 meta stream ids channel payload
    maxlen epoch FLOOR)."""
    return int(sent[-1])


@pytest.mark.xfail(strict=True, reason="review 20: after Redis came back behind, a process "
                   "whose catch-up says 'ok' (it had not seen the lost offsets) publishes with "
                   "its own highest id as the floor; Redis's counter, behind too, then gives an "
                   "id another process already holds (cluster.py _catch_up/_publish)")
def test_a_process_that_did_not_see_the_lost_offsets_takes_no_id_given_before() -> None:
    a, link_a, _ = _node("a", 10)  # applied offsets 1..10, ids 1..10
    b, link_b, hub_b = _node("b", 8)  # its link fell before offsets 9 and 10 reached it
    # Redis restarts from an AOF that ends at offset 8 (its `ids` counter: 8).
    for node, link in ((a, link_a), (b, link_b)):
        node._on_state(LinkState.DOWN)
        node._on_up()
    link_a.dones[-1]([b"e", 8, b"behind", []])
    link_b.dones[-1]([b"e", 8, b"ok", []])
    assert a.live and b.live
    # B's first change after the restart; the script gives it max(INCR(ids), floor + 1).
    hub_b.admit("carol", Session(), None, lambda user, error: None)
    floor = _floor(link_b.sent[-1])
    redis_counter = 8
    next_id = max(redis_counter + 1, floor + 1)
    assert next_id > 10, (
        f"B's command would get id {next_id}, which A gave to a message at offset "
        f"{next_id} before Redis lost it (B's floor {floor}, A's {a._id_floor})")
