"""Review of 2168506 (secret rooms hidden from non-members): what the IRC door still shows of
a secret (+s) channel to someone outside it. RFC 2811 4.2.6: for a secret channel the server
acts "as if the channel does not exist for queries like the TOPIC, LIST, NAMES commands";
`Chat.may_see`'s own docstring says "IRC's NAMES shows nothing".

Both leaks are closed; these tests keep them closed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable


sys.path.insert(0, str(Path(__file__).resolve().parent))

from ircwire import irc_port  # noqa: E402
from test_irc_secret import secret_channel  # noqa: E402

OPTIONS = ("--irc-port", "0", "--rate", "0", "--max-per-ip", "0")


def test_names_of_a_secret_channel_shows_nobody_outside_it(start_server: Callable[..., object]) -> None:
    port = irc_port(start_server(*OPTIONS))
    op, out, room = secret_channel(port)
    try:
        out.send(f"NAMES {room}")
        lines = out.until_numeric("366")
        assert [x for x in lines if x.command == "353"] == [], lines
        # The several-channel form, too.
        out.send(f"NAMES {room},#nothing-here")
        lines = out.until_numeric("366")
        assert [x for x in lines if x.command == "353"] == [], lines
    finally:
        op.close()
        out.close()


def test_topic_of_a_secret_channel_is_not_shown_outside_it(start_server: Callable[..., object]) -> None:
    port = irc_port(start_server(*OPTIONS))
    op, out, room = secret_channel(port, topic="the plan nobody may read")
    try:
        out.send(f"TOPIC {room}")
        lines = out.barrier()
        assert [x for x in lines if x.command in ("332", "333")] == [], lines
    finally:
        op.close()
        out.close()
