"""IRCv3 extensions of the IRC door that are IRC's alone: away-notify, setname, extended-monitor.

Real sockets against a server process; the account-related ones are in test_irc_accounts.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_irc_accounts import Env  # noqa: E402


@pytest.fixture
def env(start_server: Callable[..., object]) -> Iterator[Env]:
    e = Env(start_server("--irc-port", "0", "--rate", "0", "--max-per-ip", "0",
                         "--server-name", "irc.ext.test", "--register-rate", "0"))
    yield e
    e.close()


def test_away_notify_to_room_mates_and_on_join(env: Env) -> None:
    ann = env.user("ann", ("away-notify",))
    plain = env.user("plain")
    bob = env.user("bob")
    for c in (ann, plain, bob):
        c.send("JOIN #a")
        c.wait_for("366")
    for c in (ann, plain):
        c.barrier()  # the others' JOINs
    bob.send("AWAY :lunch")
    bob.wait_for("306")
    line, _ = ann.wait_for("AWAY")
    assert line.source.startswith("bob!") and line.params == ["lunch"]
    plain.assert_quiet()  # no away-notify: nothing
    bob.send("AWAY")
    line, _ = ann.wait_for("AWAY")
    assert line.params == []
    bob.send("AWAY :again")
    ann.wait_for("AWAY")
    bob.send("JOIN #b")
    bob.wait_for("366")
    ann.send("JOIN #b")
    ann.wait_for("366")
    bob.send("PART #b")
    bob.wait_for("PART")
    bob.send("JOIN #b")  # an away user joins: those with away-notify are told after the JOIN
    line, before = ann.wait_for("AWAY")
    assert [x.command for x in before][-1:] == ["JOIN"] and line.params == ["again"]


def test_setname_and_extended_monitor(env: Env) -> None:
    watcher = env.user("watcher", ("extended-monitor", "setname", "away-notify"))
    mate = env.user("mate", ("setname",))
    sam = env.user("sam", ("setname",))
    watcher.send("MONITOR + sam")
    watcher.wait_for("730")
    for c in (mate, sam):
        c.send("JOIN #s")
        c.wait_for("366")
    sam.send("SETNAME :Samuel Q")
    line, _ = sam.wait_for("SETNAME")
    assert line.params == ["Samuel Q"]
    for c in (mate, watcher):
        line, _ = c.wait_for("SETNAME")
        assert line.source.startswith("sam!") and line.params == ["Samuel Q"]
    sam.send("AWAY :gone")
    line, _ = watcher.wait_for("AWAY")  # shares no room: told as a watcher
    assert line.params == ["gone"]
    mate.send("WHOIS sam")
    line, _ = mate.wait_for("311")
    assert line.params[-1] == "Samuel Q"
