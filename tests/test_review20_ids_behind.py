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

The fix: the process that sees the loss raises Redis's counter itself at once (RAISE_IDS), so
B's next command, ordered after that, takes an id above the clock floor. B publishing in the
moment before A's raise lands can still take a lost id (docs/cluster.md says so)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Tuple

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
    # A raised Redis's counter as it saw the loss (a script on the ids key, to its floor).
    raises = [x for x in link_a.sent if x[0] == "EVALSHA" and x[3] == a.ids_key]
    assert raises and int(raises[-1][-1]) >= a._id_floor > 10, raises
    redis_counter = max(8, int(raises[-1][-1]))
    # B's first change after the restart; the script gives it max(INCR(ids), floor + 1).
    hub_b.admit("carol", Session(), None, lambda user, error: None)
    floor = _floor(link_b.sent[-1])
    next_id = max(redis_counter + 1, floor + 1)
    assert next_id > 10, (
        f"B's command would get id {next_id}, which A gave to a message at offset "
        f"{next_id} before Redis lost it (B's floor {floor}, A's {a._id_floor})")


def test_a_snapshot_without_a_newer_rule_is_taken_at_its_default() -> None:
    """A newcomer of this release joins a cluster whose snapshot predates `max_accounts` (a
    rolling upgrade): the missing rule counts as its default, not as a difference."""
    node, _, _ = _node("n", 0)
    theirs = node.rules()
    del theirs["max_accounts"]
    assert node.rules_problem(theirs) == ""
    theirs["max_accounts"] = 5
    assert "max_accounts" in node.rules_problem(theirs)


def test_the_accounts_cap_changes_in_every_copy_through_the_order() -> None:
    node, link, _ = _node("n", 0)
    node.set_rules([], True, 7)
    assert link.sent[-1][0] == "EVALSHA" and b'"max_accounts":7' in link.sent[-1][7]
    node._apply(1, b'1 {"k":"rules","ops":[],"reg":true,"max_accounts":7,"n":"x","q":1}')
    assert node.chat.accounts.max_accounts == 7
