"""Review of a57b371 (cluster: the `floor` exchange after Redis lost its ids), without sockets:
a ClusterNode on the stub link of tests/test_review17_unit.py, Redis's answers given by hand.

Each xfail(strict=True) test fails now and passes once the problem it names is fixed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_review17_unit import live_node  # noqa: E402

from selchat.links.redis import LinkState, Unavailable  # noqa: E402


def _floors(sent: List[Tuple[Any, ...]]) -> List[dict]:
    """The floor commands this process published (EVALSHA sha 3 meta stream ids channel
    PAYLOAD maxlen epoch floor)."""
    out = []
    for s in sent:
        if s and s[0] == "EVALSHA" and len(s) > 7 and isinstance(s[7], bytes):
            try:
                body = json.loads(s[7])
            except ValueError:
                continue
            if body.get("k") == "floor":
                out.append(body)
    return out


@pytest.mark.xfail(strict=True, reason="review 19: a floor publication the link lost is never "
                   "sent again: the others wait FLOOR_WAIT and then take ids below this "
                   "process's highest (cluster.py _exchange_floors publishes with _ignore)")
def test_a_floor_lost_with_the_link_is_published_again() -> None:
    node, link, hub = live_node()
    node.nodes["other"] = None  # another process of the cluster
    node._current_id = 41
    node._high_id = 41  # the highest id this process saw
    # Redis comes back empty: the catch-up finds a new epoch; the floor goes out...
    node._on_state(LinkState.DOWN)
    node._on_up()
    link.dones[-1]([b"e2", 0, b"epoch", []])
    assert len(_floors(link.sent)) == 1
    at = max(i for i, s in enumerate(link.sent) if s and s[0] == "EVALSHA"
             and b'"k":"floor"' in (s[7] if len(s) > 7 and isinstance(s[7], bytes) else b""))
    # ... and the link falls before Redis got it (it certainly did not run).
    link.dones[at](Unavailable("connection lost", sent=False))
    node._on_state(LinkState.DOWN)
    # The link is back; Redis still has epoch e2 and nothing in it (our floor never came).
    node._on_up()
    link.dones[-1]([b"e2", 0, b"ok", []])
    assert len(_floors(link.sent)) >= 2, (
        "the floor Redis never got is not published again: the other process gives up "
        "waiting after 12 s and its next message may take an id this process already holds")


@pytest.mark.xfail(strict=True, reason="review 19: in the 'behind' case the catch-up jumps "
                   "to Redis's top, past another process's floor published meanwhile: this "
                   "process waits the whole FLOOR_WAIT for a floor it skipped")
def test_behind_does_not_skip_a_floor_another_process_published_first() -> None:
    node, link, hub = live_node()
    node.nodes["other"] = None
    node.offset = 10  # both processes had applied offsets 1..10
    node._high_id = node._current_id = 30
    # Redis comes back from its append-only file without offsets 8..10 (top 7). The other
    # process reconnected first: it was behind too, set its offset to 7 and published its
    # floor, which took offset 8. Now this one reads: Redis's top (8) is below 10.
    node._on_state(LinkState.DOWN)
    node._on_up()
    link.dones[-1]([b"e", 8, b"behind", []])
    assert node._floors_from == {"other"}
    # The other's floor (offset 8) and ours (offset 9) come round on the channel.
    node._arrived("e", 8, b'31 {"k":"floor","f":30,"n":"other","q":7}')
    node._arrived("e", 9, b'32 {"k":"floor","f":30,"n":"me","q":%d}' % node._seq)
    hub.reactor.run_once(0)
    assert "other" not in node._floors_from and node.live, (
        "the other's floor at offset 8 was taken as seen (offset = Redis's top): live only "
        "after FLOOR_WAIT")


@pytest.mark.xfail(strict=True, reason="review 19: a process that loads a snapshot while the "
                   "others still wait for floors goes live at once, its floor its own file's "
                   "last id: the snapshot carries neither the sender's highest id nor the wait")
def test_a_newcomer_during_the_floor_exchange_does_not_take_ids_before_it_ends() -> None:
    from selchat.core.chat import Chat
    from selchat.core.store import MemoryStore
    from selchat.hub import Hub
    from selchat.links.cluster import ClusterNode
    from selchat.loop.reactor import Reactor
    from test_review17_unit import StubLink

    old, link, hub = live_node()
    old.nodes["other"] = None  # a process that saw ids up to 90; its link is still coming back
    old._high_id = old._current_id = 50  # this one saw ids up to 50
    old._on_state(LinkState.DOWN)
    old._on_up()
    link.dones[-1]([b"e2", 0, b"epoch", []])  # Redis came back empty
    assert not old.live and old._floors_from == {"other"}
    # A process starts now: its hello is offset 2 of the new epoch (our floor was 1), and
    # this process sends it the state as it stands there.
    old.epoch, old.offset = "e2", 1
    snapshot = old.snapshot()
    snapshot["offset"] = 2
    hub2 = Hub(Chat(MemoryStore()), Reactor())
    link2 = StubLink()
    new = ClusterNode(hub2, link2, node_id="new")  # type: ignore[arg-type]
    hub2.cluster = new
    new.epoch, new._hello_at = "e2", 2
    new.load(snapshot)
    new._become_synced("e2", 2)
    link2.dones[-1]([b"e2", 2, b"ok", []])  # nothing after its hello yet
    hub2.reactor.run_once(0)
    # It must not take an id before "other"'s floor came round (nor with a floor below 50).
    floor_given = max(new._high_id, new.chat.last_id)
    assert not new.live and floor_given >= 50, (
        f"the newcomer is live={new.live} and would give Redis the floor {floor_given}, "
        "while the others still wait for a process that saw id 90")
