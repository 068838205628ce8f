"""A secret (+s) channel at the IRC door: to anyone outside it, WHO lists nobody, MODE and
its ban list answer 403, and WHO of a member names none of its secret channels."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import unique_nick, unique_room  # noqa: E402
from ircwire import IrcClient, irc_port  # noqa: E402

OPTIONS = ("--irc-port", "0", "--rate", "0", "--max-per-ip", "0")


def secret_channel(port: int, modes: str = "+s", topic: str = "") -> "tuple[IrcClient, IrcClient, str]":
    """An operator in a new channel set `modes` (+s...), with `topic`, and a registered
    outsider: (operator, outsider, channel). Each client's label is its nick."""
    op_nick, out_nick = unique_nick("sop"), unique_nick("sout")
    room = unique_room("sec")
    op = IrcClient(port, label=op_nick)
    out = IrcClient(port, label=out_nick)
    op.register(op_nick)
    out.register(out_nick)
    op.join(room)
    op.send(f"MODE {room} {modes}")
    op.wait_for("MODE", room)
    if topic:
        op.send(f"TOPIC {room} :{topic}")
        op.wait_for("TOPIC", room)
    op.barrier()
    return op, out, room


def test_a_secret_channel_is_hidden_from_who_and_mode(start_server: Callable[..., object]) -> None:
    op, out, room = secret_channel(irc_port(start_server(*OPTIONS)), "+sb *!*@banned.example")
    op_nick = op.label
    try:

        out.send(f"WHO {room}")
        lines = out.until_numeric("315")
        assert [x for x in lines if x.command == "352"] == [], lines
        out.send(f"MODE {room}")
        assert out.expect("403").params[1] == room
        out.send(f"MODE {room} b")
        assert out.expect("403").params[1] == room
        out.send(f"WHO {op_nick}")
        rows = [x for x in out.until_numeric("315") if x.command == "352"]
        assert len(rows) == 1 and rows[0].params[1] == "*", rows  # not the secret channel

        op.send(f"WHO {room}")
        rows = [x for x in op.until_numeric("315") if x.command == "352"]
        assert [x.params[5] for x in rows] == [op_nick]
        op.send(f"MODE {room}")
        assert "s" in op.expect("324").params[2]
        op.send(f"WHO {op_nick}")
        rows = [x for x in op.until_numeric("315") if x.command == "352"]
        assert rows[0].params[1].lower() == room.lower(), rows
    finally:
        op.close()
        out.close()


def test_changes_to_a_secret_channel_from_outside_answer_no_such_channel(
        start_server: Callable[..., object]) -> None:
    """PART, KICK, INVITE, TOPIC and MODE changes from a non-member get 403 (no such channel)
    as for a channel that does not exist, not 442 (which would say it does)."""
    op, out, room = secret_channel(irc_port(start_server(*OPTIONS)))
    op_nick, out_nick = op.label, out.label
    try:
        for line in (f"PART {room}", f"KICK {room} {op_nick} :x", f"INVITE {op_nick} {room}",
                     f"TOPIC {room} :new topic", f"MODE {room} +o {out_nick}"):
            out.send(line)
            answer = out.expect("403")
            assert answer.params[1] == room, (line, answer)
        out.assert_quiet()
        op.send(f"TOPIC {room} :mine")
        op.wait_for("TOPIC", room)  # a member still can
    finally:
        op.close()
        out.close()
