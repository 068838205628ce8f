"""The IRC door over real sockets: what PROTOCOL.md 10.1 and the Modern IRC documents promise.

Each test starts its own server (`start_server` from tests/conftest.py) with `--irc-port 0`,
so counts (LUSERS, LIST) and names are the test's own. Numerics are checked by number and by
the parameters the Modern IRC documents (https://modern.ircdocs.horse/) fix; free texts are
not checked. Where the documents allow several answers (401 or 403 for a channel that does
not exist) the test accepts each of them.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ircwire import IrcClient, describe, irc_port, matches, source_nick  # noqa: E402
from selchat.doors.irc.parser import Line  # noqa: E402

SERVER_NAME = "irc.test.example"
OPTIONS = ("--irc-port", "0", "--rate", "0", "--max-per-ip", "0", "--server-name", SERVER_NAME)
TIME_TAG = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


class Irc:
    """A server with its IRC port, and the IRC clients of one test (closed at teardown)."""

    def __init__(self, srv: object) -> None:
        self.srv = srv
        self.port = irc_port(srv)
        self.clients: List[IrcClient] = []

    def connect(self, label: str = "") -> IrcClient:
        c = IrcClient(self.port, label=label)
        self.clients.append(c)
        return c

    def user(self, nick: str, caps: tuple = ()) -> IrcClient:
        c = self.connect(nick)
        c.register(nick, caps)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()


@pytest.fixture
def irc(start_server: Callable[..., object]) -> Iterator[Irc]:
    env = Irc(start_server(*OPTIONS))
    yield env
    env.close()


def numerics(lines: List[Line]) -> List[str]:
    return [x.command for x in lines]


def names_of(lines: List[Line], room: str) -> List[str]:
    """Every entry of the 353 lines for `room` (prefixes kept)."""
    out: List[str] = []
    for x in lines:
        if x.command == "353" and x.params[2].lower() == room.lower():
            out += x.params[-1].split()
    return out


def privmsgs(lines: List[Line]) -> List[Line]:
    return [x for x in lines if x.command == "PRIVMSG"]


def relayed_whole_or_refused(sender: IrcClient, receiver: IrcClient, target: str, text: str) -> str:
    """An IRC text that fits the sender's line but not the relayed one (the source is added).

    Two answers keep every word: split at character boundaries (PROTOCOL.md 10.1) so it all
    arrives, or refuse it with 417 to the sender and deliver nothing (what irctest and
    defs.ircdocs.horse allow). Truncation, or half a text, is a failure. Returns "split"/"417".
    """
    first = receiver.barrier()
    mine = sender.barrier()
    if any(x.command == "417" for x in mine):
        assert first == [], [describe(x) for x in first]
        return "417"
    got = [x for x in first if x.command == "PRIVMSG"]
    parts = [x.params[-1] for x in got]
    while len("".join(parts)) < len(text):
        parts.append(receiver.expect("PRIVMSG", target).params[-1])
    assert all(x.params[0] == target for x in got), [describe(x) for x in got]
    assert "".join(parts) == text, parts
    receiver.assert_quiet()
    return "split"


# --------------------------------------------------------------------------- registration


def test_registration_sends_001_to_005_then_motd(irc: Irc) -> None:
    c = irc.connect()
    lines = c.register("Alice")
    cmds = numerics(lines)
    assert cmds[:4] == ["001", "002", "003", "004"], cmds
    assert "005" in cmds and cmds.index("005") == 4, cmds
    for x in lines:
        if re.fullmatch(r"\d{3}", x.command):
            assert x.source == SERVER_NAME, describe(x)
            assert x.params[0] == "Alice", describe(x)
    assert lines[3].params[1] == SERVER_NAME, describe(lines[3])  # 004 <client> <servername> ...
    assert c.isupport.get("CASEMAPPING") == "ascii"
    assert c.isupport.get("CHANTYPES") == "#"
    assert c.isupport.get("NICKLEN") == "32"
    assert c.isupport.get("CHANNELLEN") == "51"
    assert cmds[-1] in ("376", "422"), cmds
    if cmds[-1] == "376":
        assert "375" in cmds
    c.assert_quiet()


def test_registration_with_lf_only_line_endings(irc: Irc) -> None:
    c = irc.connect()
    c.send_raw(b"NICK Lf\nUSER lf 0 * :LF only\n")
    c.wait_for("001", "Lf")
    c.send_raw(b"PING lfonly\n")
    pong, _ = c.wait_for("PONG")
    assert pong.params[-1] == "lfonly"


@pytest.mark.parametrize("bad", ["1digit", "-dash", "a" * 33, "bad!nick", "bad@nick", "caf\u00e9"])
def test_432_for_a_nick_the_rules_refuse_and_the_connection_stays(irc: Irc, bad: str) -> None:
    c = irc.connect()
    c.send(f"NICK {bad}")
    err = c.expect("432")
    assert err.params[0] == "*" and err.params[1] == bad, describe(err)
    c.send("NICK Good")
    c.send("USER g 0 * :G")
    c.wait_for("001", "Good")


def test_433_nick_in_use_is_case_insensitive(irc: Irc) -> None:
    irc.user("Alice")
    c = irc.connect()
    c.send("NICK aLiCe")
    err = c.expect("433")
    assert err.params[:2] == ["*", "aLiCe"], describe(err)
    c.send("NICK Bob")
    c.send("USER b 0 * :B")
    c.wait_for("001", "Bob")


def test_431_or_461_for_nick_without_parameter(irc: Irc) -> None:
    c = irc.connect()
    c.send("NICK")
    err = c.recv_line()
    assert err.command in ("431", "461"), describe(err)


def test_451_before_registration(irc: Irc) -> None:
    c = irc.connect()
    for line in ("JOIN #x", "PRIVMSG #x :hi", "NAMES #x", "WHOIS x"):
        c.send(line)
        err = c.expect("451")
        assert err.params[0] == "*", describe(err)


def test_461_not_enough_parameters(irc: Irc) -> None:
    c = irc.connect()
    c.send("USER onlyone")
    err = c.expect("461")
    assert err.params[:2] == ["*", "USER"], describe(err)
    c.register("Alice")
    for cmd in ("JOIN", "PART"):
        c.send(cmd)
        err = c.expect("461")
        assert err.params[:2] == ["Alice", cmd], describe(err)


def test_461_for_an_empty_realname(irc: Irc) -> None:
    c = irc.connect()
    c.send("NICK Empty")
    c.send("USER user 0 * :")
    err = c.recv_line()
    assert err.command == "461" and err.params[:2] == ["*", "USER"], describe(err)


def test_462_user_again_after_registration(irc: Irc) -> None:
    c = irc.user("Alice")
    c.send("USER again 0 * :Again")
    err = c.expect("462")
    assert err.params[0] == "Alice", describe(err)


def test_unknown_command_421(irc: Irc) -> None:
    c = irc.user("Alice")
    c.send("FROBNICATE now")
    err = c.expect("421")
    assert err.params[:2] == ["Alice", "FROBNICATE"], describe(err)


def test_password_in_pass(start_server: Callable[..., object], tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    env = Irc(start_server(*OPTIONS, "--password-file", str(pw)))
    try:
        ok = env.connect()
        ok.register("Alice", password="s3cret")
        bad = env.connect()
        bad.send("PASS wrong")
        bad.send("NICK Bob")
        bad.send("USER b 0 * :B")
        got = bad.assert_closed(5.0)
        assert "001" not in numerics(got), [describe(x) for x in got]
        assert any(x.command in ("464", "ERROR") for x in got), [describe(x) for x in got]
        ok.send("PING still")
        ok.wait_for("PONG")
    finally:
        env.close()


# --------------------------------------------------------------------------- ping, limits, bytes


def test_ping_pong(irc: Irc) -> None:
    c = irc.user("Alice")
    c.send("PING :some token")
    pong = c.expect("PONG")
    assert pong.params[-1] == "some token" and pong.source == SERVER_NAME, describe(pong)


def test_a_silent_client_is_pinged_then_let_go_at_the_ping_timeout(start_server) -> None:
    env = Irc(start_server(*OPTIONS, "--ping-interval", "0.5", "--ping-timeout", "1.2"))
    try:
        quiet = env.user("Quiet")
        other = env.user("Other")
        quiet.send("JOIN #q")
        other.send("JOIN #q")
        quiet.wait_for("JOIN", "#q")
        other.wait_for("JOIN", "#q")
        ping, _ = quiet.wait_for("PING", timeout=5.0)
        assert ping.params[-1] == SERVER_NAME, describe(ping)
        # Other keeps talking (it is not silent); Quiet never answers.
        deadline = time.monotonic() + 5.0
        seen = None
        while seen is None and time.monotonic() < deadline:
            other.send("PING :alive")
            for line in other.collect_until(lambda x: x.command == "PONG", 2.0):
                if line.command == "QUIT":
                    seen = line
        assert seen is not None and seen.params[-1] == "ping timeout", describe(seen) if seen else "no QUIT"
        got = quiet.assert_closed(5.0)
        assert any(x.command == "ERROR" and "Ping timeout" in x.params[-1] for x in got), [describe(x) for x in got]
    finally:
        env.close()


def test_a_ping_token_as_long_as_a_line_allows_gets_a_pong_within_512_bytes(irc: Irc) -> None:
    """The token is echoed after the server's name twice: cut (at a character boundary) so
    that the PONG, too, is a line of at most 512 bytes (the test client checks every line)."""
    c = irc.user("Alice")
    token = "t" * 400 + "\u00e9" * 50  # 500 bytes: "PING :" and the token fit in 510
    c.send(f"PING :{token}")
    pong = c.expect("PONG")
    got = pong.params[-1]
    assert token.startswith(got) and len(got.encode("utf-8")) > 400, describe(pong)
    c.send("PING :after")
    assert c.expect("PONG").params[-1] == "after"


def test_417_for_a_line_over_512_bytes_and_the_connection_stays(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.wait_for("JOIN", "#r")
    long_text = "x" * 600
    a.send(f"PRIVMSG #r :{long_text}")
    err = a.expect("417")
    assert err.params[0] == "Alice", describe(err)
    b.assert_quiet()
    a.send("PRIVMSG #r :after")
    got = b.expect("PRIVMSG", "#r", "after")
    assert source_nick(got) == "Alice"
    # exactly 512 bytes with CRLF is still a line
    # Exactly 512 bytes with CRLF is still a line (no 417 for its length as sent); relayed with
    # Alice's source on top it no longer fits one line: split whole, or refused whole.
    prefix = b"PRIVMSG #r :"
    text = "y" * (510 - len(prefix))
    a.send_raw(prefix + text.encode() + b"\r\n")
    relayed_whole_or_refused(a, b, "#r", text)
    a.send("PRIVMSG #r :still here")
    b.expect("PRIVMSG", "#r", "still here")


def test_non_utf8_input_is_harmless(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.wait_for("JOIN", "#r")
    a.send_raw(b"PRIVMSG #r :caf\xe9 \xff\xfe\r\nNICK \xff\xfe\r\nJOIN #\xe9\r\n")
    a.send("PING alive")
    a.wait_for("PONG")
    # Bob may or may not get a (decoded) message; he must get nothing malformed and stay up.
    for x in b.barrier():
        assert x.command == "PRIVMSG", describe(x)
    a.send("PRIVMSG #r :fine")
    b.expect("PRIVMSG", "#r", "fine")


def test_formatting_is_stripped_on_the_way_in(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.wait_for("JOIN", "#r")
    a.send("PRIVMSG #r :\x02bold\x02 \x0304,12red\x03 \x1ditalic\x1d \x1funder\x1f \x16rev\x16 \x11mono\x11 \x0fend")
    got = b.expect("PRIVMSG", "#r")
    assert got.params[1] == "bold red italic under rev mono end", describe(got)


@pytest.mark.parametrize("ctl", ["\x07", "\x1b[31m", "\x00", "\x7f", "\x08"])
def test_other_control_characters_are_refused(irc: Irc, ctl: str) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.wait_for("JOIN", "#r")
    a.send_raw(f"PRIVMSG #r :bad{ctl}text\r\n".encode())
    if ctl != "\x00":
        reply = a.barrier()
        assert reply, "no error for a refused text"
        assert all(x.command.startswith("4") or x.command in ("FAIL", "NOTICE") for x in reply), (
            [describe(x) for x in reply]
        )
    b.assert_quiet()
    a.send("PRIVMSG #r :clean")
    b.expect("PRIVMSG", "#r", "clean")


def test_whitespace_only_text_is_not_delivered(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.wait_for("JOIN", "#r")
    a.send("PRIVMSG #r :   ")
    reply = a.barrier()
    assert reply and all(x.command.startswith("4") or x.command == "FAIL" for x in reply), (
        [describe(x) for x in reply]
    )
    b.assert_quiet()


# --------------------------------------------------------------------------- JOIN / PART


def test_join_answers_join_then_names(irc: Irc) -> None:
    a = irc.user("Alice")
    got = a.join("#Room")
    assert matches(got[0], "JOIN", ["#Room"], nick="Alice"), describe(got[0])
    assert "!" in (got[0].source or "") and "@" in (got[0].source or ""), describe(got[0])
    end = got[-1]
    assert end.params[:2] == ["Alice", "#Room"], describe(end)
    assert names_of(got, "#Room") == ["@Alice"]
    for x in got:
        if x.command == "353":
            assert x.params[0] == "Alice" and x.params[1] in ("=", "*", "@"), describe(x)


def test_join_keeps_the_first_joiners_spelling_and_others_see_it(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#Room")
    got = b.join("#ROOM")
    assert got[0].params[0] == "#Room", describe(got[0])
    assert sorted(names_of(got, "#Room")) == ["@Alice", "Bob"]
    seen = a.expect("JOIN", "#Room")
    assert source_nick(seen) == "Bob"


def test_join_comma_list(irc: Irc) -> None:
    a = irc.user("Alice")
    a.send("JOIN #a,#b")
    got = a.collect_until(lambda x: x.command == "366" and x.params[1] == "#b")
    joins = [x.params[0] for x in got if x.command == "JOIN"]
    assert joins == ["#a", "#b"], [describe(x) for x in got]
    ends = [x.params[1] for x in got if x.command == "366"]
    assert ends == ["#a", "#b"]


def test_join_0_parts_every_channel(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.send("JOIN #a,#b")
    a.collect_until(lambda x: x.command == "366" and x.params[1] == "#b")
    b.join("#a")
    a.expect("JOIN", "#a")
    a.send("JOIN 0")
    got = a.collect_until(lambda x: x.command == "PART" and x.params[0] == "#b")
    parted = sorted(x.params[0] for x in got if x.command == "PART")
    assert parted == ["#a", "#b"], [describe(x) for x in got]
    seen = b.expect("PART", "#a")
    assert source_nick(seen) == "Alice"
    a.send("NAMES #a")
    names = a.until_numeric("366")
    assert "Alice" not in [n.lstrip("@+") for n in names_of(names, "#a")]


@pytest.mark.parametrize("bad", ["#", "#bad!name", "#" + "x" * 51, "#sp\u00e9cial", "nohash", "#a.b"])
def test_join_a_name_the_rules_refuse(irc: Irc, bad: str) -> None:
    a = irc.user("Alice")
    a.send(f"JOIN {bad}")
    err = a.recv_line()
    assert err.command in ("403", "479"), describe(err)
    assert err.params[:2] == ["Alice", bad], describe(err)
    a.assert_quiet()


def test_join_a_longest_legal_name(irc: Irc) -> None:
    a = irc.user("Alice")
    room = "#" + "L" * 50
    got = a.join(room)
    assert got[0].params[0] == room


def test_part(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.expect("JOIN", "#r")
    b.send("PART #r :see you")
    mine = b.expect("PART", "#r")
    assert source_nick(mine) == "Bob"
    seen = a.expect("PART", "#r")
    assert source_nick(seen) == "Bob"
    b.send("PART #r")
    err = b.recv_line()
    assert err.command in ("442", "403"), describe(err)
    assert err.params[:2] == ["Bob", "#r"], describe(err)
    b.send("PART #never")
    err = b.recv_line()
    assert err.command in ("403", "442"), describe(err)


# --------------------------------------------------------------------------- PRIVMSG / NOTICE


def test_privmsg_and_notice_to_a_room(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.expect("JOIN", "#r")
    a.send("PRIVMSG #r :hello there")
    got = b.expect("PRIVMSG", "#r", "hello there")
    assert source_nick(got) == "Alice" and "@" in (got.source or "")
    a.send("NOTICE #r :a notice")
    got = b.expect("NOTICE", "#r", "a notice")
    assert source_nick(got) == "Alice"
    a.assert_quiet()  # no echo without echo-message


def test_privmsg_and_notice_to_a_nick(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.send("PRIVMSG bob :psst")  # nicks are case-insensitive
    got = b.expect("PRIVMSG", "Bob", "psst")
    assert source_nick(got) == "Alice"
    a.send("NOTICE Bob :n")
    b.expect("NOTICE", "Bob", "n")
    a.assert_quiet()


def test_privmsg_errors(irc: Irc) -> None:
    a = irc.user("Alice")
    irc.user("Bob").join("#theirs")
    a.send("PRIVMSG nobody :hi")
    err = a.expect("401")
    assert err.params[:2] == ["Alice", "nobody"], describe(err)
    a.send("PRIVMSG #theirs :hi")  # exists, Alice is not a member
    err = a.expect("404")
    assert err.params[:2] == ["Alice", "#theirs"], describe(err)
    a.send("PRIVMSG #nowhere :hi")
    err = a.recv_line()
    assert err.command in ("401", "403"), describe(err)
    assert err.params[:2] == ["Alice", "#nowhere"]
    a.send("PRIVMSG Bob :")
    err = a.expect("412")
    assert err.params[0] == "Alice", describe(err)
    a.send("PRIVMSG Bob")
    err = a.recv_line()
    assert err.command in ("412", "461"), describe(err)
    a.send("PRIVMSG")
    err = a.recv_line()
    assert err.command in ("411", "461"), describe(err)


def test_notice_errors_never_make_the_server_chatty_to_others(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.send("NOTICE nobody :hi")
    for x in a.barrier():
        assert x.command.startswith("4"), describe(x)
    b.assert_quiet()


# --------------------------------------------------------------------------- NAMES / WHO / LIST / TOPIC


def test_names_marks_the_creator_as_operator(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    b.send("NAMES #r")
    got = b.until_numeric("366")
    assert sorted(names_of(got, "#r")) == ["@Alice", "Bob"], [describe(x) for x in got]
    assert got[-1].params[:2] == ["Bob", "#r"]
    b.send("NAMES #nothing")
    end = b.expect("366")
    assert end.params[:2] == ["Bob", "#nothing"], describe(end)


def test_who_lists_every_member(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.send("WHO #r")
    got = a.until_numeric("315")
    rows = [x for x in got if x.command == "352"]
    assert sorted(x.params[5] for x in rows) == ["Alice", "Bob"], [describe(x) for x in got]
    for x in rows:
        assert x.params[0] == "Alice" and x.params[1] == "#r", describe(x)
        assert x.params[6][0] in "HG", describe(x)
        assert re.match(r"\d+ ", x.params[-1]), describe(x)  # "<hopcount> <realname>"
    op = [x for x in rows if x.params[5] == "Alice"][0]
    assert "@" in op.params[6], describe(op)
    assert got[-1].params[:2] == ["Alice", "#r"], describe(got[-1])


def test_who_a_nick_and_a_mask(irc: Irc) -> None:
    a = irc.user("Alice")
    irc.user("Bobby")
    a.send("WHO bobby")
    got = a.until_numeric("315")
    rows = [x for x in got if x.command == "352"]
    assert [x.params[5] for x in rows] == ["Bobby"], [describe(x) for x in got]
    assert got[-1].params[:2] == ["Alice", "bobby"], describe(got[-1])
    a.send("WHO bob*")
    got = a.until_numeric("315")
    assert [x.params[5] for x in got if x.command == "352"] == ["Bobby"], [describe(x) for x in got]


def test_list_shows_rooms_with_members_but_not_an_empty_lobby(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.join("#solo")
    a.send("LIST")
    got = a.until_numeric("323")
    rows = {x.params[1]: x for x in got if x.command == "322"}
    assert "#lobby" not in rows, [describe(x) for x in got]
    assert rows["#r"].params[2] == "2" and rows["#solo"].params[2] == "1", [describe(x) for x in got]
    assert set(numerics(got)) <= {"321", "322", "323"}


def test_topic_read(irc: Irc) -> None:
    a = irc.user("Alice")
    a.join("#r")
    a.send("TOPIC #r")
    got = a.recv_line()
    assert got.command in ("331", "332"), describe(got)
    assert got.params[:2] == ["Alice", "#r"], describe(got)


# --------------------------------------------------------------------------- server queries


def test_motd(irc: Irc) -> None:
    a = irc.user("Alice")
    a.send("MOTD")
    got = a.collect_until(lambda x: x.command in ("376", "422"))
    if got[-1].command == "376":
        assert got[0].command == "375" and all(x.command == "372" for x in got[1:-1]), [describe(x) for x in got]


def test_lusers(irc: Irc) -> None:
    a = irc.user("Alice")
    irc.user("Bob")
    a.send("LUSERS")
    got = a.until_numeric("255")
    cmds = numerics(got)
    assert cmds[0] == "251" and cmds[-1] == "255", cmds
    assert set(cmds) <= {"251", "252", "253", "254", "255"}, cmds
    assert "2" in got[0].params[-1], describe(got[0])  # "There are 2 users ..."
    a.barrier()  # optional 265/266 may follow


def test_whois(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    b.join("#r")
    a.send("WHOIS bob")
    got = a.until_numeric("318")
    user = [x for x in got if x.command == "311"]
    assert user and user[0].params[:2] == ["Alice", "Bob"], [describe(x) for x in got]
    assert user[0].params[4] == "*" and user[0].params[5] == "Test User", describe(user[0])
    chans = [x for x in got if x.command == "319"]
    assert chans and "#r" in chans[0].params[-1], [describe(x) for x in got]
    assert got[-1].params[:2] == ["Alice", "bob"] or got[-1].params[:2] == ["Alice", "Bob"]
    a.send("WHOIS nobody")
    got = a.collect_until(lambda x: x.command == "318" or x.command == "401")
    assert got[-1].command == "401" and got[-1].params[:2] == ["Alice", "nobody"], [describe(x) for x in got]
    a.barrier()  # 318 may follow


def test_away_and_301_on_privmsg(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    b.send("AWAY :out for lunch")
    b.expect("306")
    a.send("PRIVMSG Bob :are you there")
    away = a.expect("301")
    assert away.params == ["Alice", "Bob", "out for lunch"], describe(away)
    b.expect("PRIVMSG", "Bob", "are you there")
    b.send("AWAY")
    b.expect("305")
    a.send("PRIVMSG Bob :back?")
    b.expect("PRIVMSG", "Bob", "back?")
    a.assert_quiet()


def test_userhost_and_ison(irc: Irc) -> None:
    a = irc.user("Alice")
    irc.user("Bob")
    a.send("USERHOST Alice bob nobody")
    got = a.expect("302")
    replies = got.params[-1].split()
    assert len(replies) == 2, describe(got)
    for r, nick in zip(sorted(replies, key=str.lower), ["Alice", "Bob"]):
        assert re.fullmatch(re.escape(nick) + r"\*?=[+-][^@ ]+@\S+", r), r
    a.send("ISON alice nobody BOB")
    got = a.expect("303")
    assert sorted(got.params[-1].split(), key=str.lower) == ["Alice", "Bob"], describe(got)


# --------------------------------------------------------------------------- QUIT / NICK


def test_quit(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.expect("JOIN", "#r")
    b.send("QUIT :gone fishing")
    got = b.assert_closed()
    assert any(x.command == "ERROR" for x in got), [describe(x) for x in got]
    seen = a.expect("QUIT")
    assert source_nick(seen) == "Bob" and "gone fishing" in seen.params[-1], describe(seen)
    fresh = irc.user("Bob")  # the nick is free again
    fresh.assert_quiet()


def test_nick_change_seen_by_self_and_room(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob")
    c = irc.user("Carol")  # shares no room: sees nothing
    a.join("#r")
    b.join("#r")
    a.expect("JOIN", "#r")
    a.send("NICK Alicia")
    mine = a.expect("NICK", "Alicia")
    assert source_nick(mine) == "Alice"
    seen = b.expect("NICK", "Alicia")
    assert source_nick(seen) == "Alice"
    c.assert_quiet()
    a.send("NICK bob")
    err = a.expect("433")
    assert err.params[:2] == ["Alicia", "bob"], describe(err)
    a.send("NICK 9lives")
    err = a.expect("432")
    assert err.params[:2] == ["Alicia", "9lives"], describe(err)
    a.send("NICK ALICIA")  # a change of case only is allowed
    a.expect("NICK", "ALICIA")
    b.expect("NICK", "ALICIA")


# --------------------------------------------------------------------------- IRCv3


def test_cap_ls_offers_the_promised_capabilities(irc: Irc) -> None:
    c = irc.connect()
    c.send("CAP LS 302")
    offered = c.cap_ls()
    for cap in ("message-tags", "server-time", "echo-message", "batch", "draft/chathistory",
                "labeled-response", "multi-prefix", "userhost-in-names"):
        assert cap in offered, sorted(offered)
    c.send("CAP REQ :message-tags not-a-cap")
    nak = c.expect("CAP", None, "NAK")
    assert nak.params[-1].split() == ["message-tags", "not-a-cap"], describe(nak)
    c.send("CAP LIST")
    lst = c.expect("CAP", None, "LIST")
    assert lst.params[-1].split() == [], describe(lst)  # a NAK changes nothing
    c.send("CAP END")
    c.send("NICK Capper")
    c.send("USER c 0 * :C")
    c.wait_for("001")


def test_registration_waits_for_cap_end(irc: Irc) -> None:
    c = irc.connect()
    c.send("CAP LS 302")
    c.cap_ls()
    c.send("NICK Waiter")
    c.send("USER w 0 * :W")
    c.assert_quiet()
    c.send("CAP END")
    c.wait_for("001", "Waiter")


def test_message_tags_msgid_and_server_time(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob", ("message-tags", "server-time"))
    a.join("#r")
    b.join("#r")
    a.expect("JOIN", "#r")
    a.send("PRIVMSG #r :one")
    a.send("PRIVMSG #r :two")
    one = b.expect("PRIVMSG", "#r", "one")
    two = b.expect("PRIVMSG", "#r", "two")
    assert one.tags.get("msgid") and two.tags.get("msgid"), (describe(one), describe(two))
    assert one.tags["msgid"] != two.tags["msgid"]
    for m in (one, two):
        assert TIME_TAG.match(m.tags.get("time", "")), describe(m)
        when = datetime.strptime(m.tags["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        assert abs(when.timestamp() - time.time()) < 60, describe(m)
    # Alice enabled nothing: her lines carry no tags.
    b.send("PRIVMSG #r :untagged")
    got = a.expect("PRIVMSG", "#r", "untagged")
    assert got.tags == {}, describe(got)


def test_server_time_alone_gives_time_but_no_msgid(irc: Irc) -> None:
    a = irc.user("Alice")
    b = irc.user("Bob", ("server-time",))
    a.send("PRIVMSG Bob :hi")
    got = b.expect("PRIVMSG", "Bob", "hi")
    assert TIME_TAG.match(got.tags.get("time", "")) and "msgid" not in got.tags, describe(got)


def test_client_tags_are_relayed_only_to_message_tags_clients(irc: Irc) -> None:
    a = irc.user("Alice", ("message-tags",))
    b = irc.user("Bob", ("message-tags",))
    c = irc.user("Carol")
    for x in (a, b, c):
        x.join("#r")
    a.send("@+draft/react=x;+example/foo=bar PRIVMSG #r :tagged")
    got = b.wait_for("PRIVMSG", "#r", "tagged")[0]
    assert got.tags.get("msgid"), describe(got)
    # IRCv3 message-tags: client-only ('+') tags are relayed to clients that enabled it
    assert got.tags.get("+draft/react") == "x" and got.tags.get("+example/foo") == "bar", describe(got)
    plain = c.wait_for("PRIVMSG", "#r", "tagged")[0]
    assert plain.tags == {}, describe(plain)


def test_tagmsg_reaches_only_message_tags_clients(irc: Irc) -> None:
    a = irc.user("Alice", ("message-tags",))
    b = irc.user("Bob", ("message-tags",))
    c = irc.user("Carol")
    for x in (a, b, c):
        x.join("#r")
    a.send("@+typing=active TAGMSG #r")
    got = b.wait_for("TAGMSG", "#r")[0]
    assert got.tags.get("+typing") == "active" and source_nick(got) == "Alice", describe(got)
    for x in c.barrier():
        assert x.command != "TAGMSG", describe(x)


def test_echo_message(irc: Irc) -> None:
    a = irc.user("Alice", ("echo-message", "message-tags"))
    b = irc.user("Bob", ("message-tags",))
    a.join("#r")
    b.join("#r")
    a.expect("JOIN", "#r")
    a.send("PRIVMSG #r :echoed")
    mine = a.expect("PRIVMSG", "#r", "echoed")
    assert source_nick(mine) == "Alice"
    theirs = b.expect("PRIVMSG", "#r", "echoed")
    assert mine.tags.get("msgid") == theirs.tags.get("msgid") and mine.tags.get("msgid"), (
        describe(mine), describe(theirs))
    a.send("PRIVMSG Bob :private echo")
    a.expect("PRIVMSG", "Bob", "private echo")
    b.expect("PRIVMSG", "Bob", "private echo")
    a.send("NOTICE #r :notice echo")
    a.expect("NOTICE", "#r", "notice echo")


def test_labeled_response(irc: Irc) -> None:
    a = irc.user("Alice", ("labeled-response", "batch"))
    a.send("@label=p1 PING tok")
    pong = a.expect("PONG")
    assert pong.tags.get("label") == "p1" and pong.params[-1] == "tok", describe(pong)
    a.join("#r")
    a.send("@label=n1 NAMES #r")
    got = a.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    start = got[0]
    assert start.command == "BATCH" and start.params[0].startswith("+"), describe(start)
    assert start.params[1] == "labeled-response" and start.tags.get("label") == "n1", describe(start)
    ref = start.params[0][1:]
    assert got[-1].params[0] == "-" + ref
    assert [x.command for x in got[1:-1]] == ["353", "366"], [describe(x) for x in got]
    for x in got[1:-1]:
        assert x.tags.get("batch") == ref, describe(x)
    # a command with no answer gets ACK
    a.send("@label=q1 PONG whatever")
    ack = a.expect("ACK")
    assert ack.tags.get("label") == "q1", describe(ack)


def test_multi_prefix_and_userhost_in_names(irc: Irc) -> None:
    a = irc.user("Alice", ("multi-prefix", "userhost-in-names"))
    b = irc.user("Bob")
    a.join("#r")
    b.join("#r")
    a.send("NAMES #r")
    got = a.until_numeric("366")
    entries = sorted(names_of(got, "#r"), key=lambda s: s.lstrip("@").lower())
    assert len(entries) == 2, [describe(x) for x in got]
    assert re.fullmatch(r"@Alice![^@ ]+@\S+", entries[0]), entries
    assert re.fullmatch(r"Bob![^@ ]+@\S+", entries[1]), entries
    b.send("NAMES #r")  # Bob asked for neither
    got = b.until_numeric("366")
    assert sorted(names_of(got, "#r")) == ["@Alice", "Bob"]


HIST_CAPS = ("batch", "draft/chathistory", "message-tags", "server-time")


def _history(c: IrcClient, command: str) -> List[Line]:
    """Send a CHATHISTORY command; the PRIVMSGs of its `chathistory` batch, checked."""
    c.send(command)
    got = c.collect_until(lambda x: (x.command == "BATCH" and x.params[0].startswith("-")) or x.command == "FAIL")
    assert got[-1].command == "BATCH", [describe(x) for x in got]
    start = got[0]
    assert start.command == "BATCH" and start.params[0].startswith("+"), describe(start)
    assert start.params[1] == "chathistory", describe(start)
    ref = start.params[0][1:]
    assert got[-1].params[0] == "-" + ref, describe(got[-1])
    inner = got[1:-1]
    for x in inner:
        assert x.tags.get("batch") == ref, describe(x)
        assert x.tags.get("msgid") and TIME_TAG.match(x.tags.get("time", "")), describe(x)
    return inner


def _texts(lines: List[Line]) -> List[str]:
    return [x.params[-1] for x in lines if x.command in ("PRIVMSG", "NOTICE")]


def _tag_time(line: Line) -> float:
    return datetime.strptime(line.tags["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def _next_millisecond(after: float, timeout: float = 1.0) -> None:
    """Wait (on the clock, with a deadline) until the server clock shows a later millisecond."""
    deadline = time.monotonic() + timeout
    while time.time() < after + 0.002:
        assert time.monotonic() < deadline, "the clock does not advance"
        time.sleep(0.001)


def _said(irc: Irc, n: int, spaced: bool = False) -> "tuple[IrcClient, List[Line]]":
    """Alice says m0..m{n-1} in #h; Hist (with the history caps) sees them live with tags.

    `spaced`: each message in a later millisecond than the one before, for timestamp queries.
    """
    a = irc.user("Alice")
    h = irc.user("Hist", HIST_CAPS)
    a.join("#h")
    h.join("#h")
    a.expect("JOIN", "#h")
    live: List[Line] = []
    if spaced:
        for i in range(n):
            a.send(f"PRIVMSG #h :m{i}")
            live.append(h.expect("PRIVMSG", "#h", f"m{i}"))
            _next_millisecond(_tag_time(live[-1]))
        return h, live
    for i in range(n):
        a.send(f"PRIVMSG #h :m{i}")
    live = [h.expect("PRIVMSG", "#h", f"m{i}") for i in range(n)]
    return h, live


def test_chathistory_latest(irc: Irc) -> None:
    h, live = _said(irc, 10)
    assert _texts(_history(h, "CHATHISTORY LATEST #h * 3")) == ["m7", "m8", "m9"]
    got = _history(h, "CHATHISTORY LATEST #h * 100")
    assert _texts(got) == [f"m{i}" for i in range(10)]
    assert [x.tags["msgid"] for x in got] == [x.tags["msgid"] for x in live]
    assert [x.tags["time"] for x in got] == [x.tags["time"] for x in live]
    assert all(source_nick(x) == "Alice" for x in got)
    # LATEST with a bound: only what came after it
    assert _texts(_history(h, f"CHATHISTORY LATEST #h msgid={live[6].tags['msgid']} 10")) == ["m7", "m8", "m9"]


def test_chathistory_before_and_after(irc: Irc) -> None:
    h, live = _said(irc, 10)
    mid = live[5].tags["msgid"]
    assert _texts(_history(h, f"CHATHISTORY BEFORE #h msgid={mid} 2")) == ["m3", "m4"]
    assert _texts(_history(h, f"CHATHISTORY AFTER #h msgid={mid} 2")) == ["m6", "m7"]
    assert _texts(_history(h, f"CHATHISTORY BEFORE #h msgid={live[0].tags['msgid']} 5")) == []


def test_chathistory_before_and_after_timestamp(irc: Irc) -> None:
    h, live = _said(irc, 4, spaced=True)
    first, last = live[0].tags["time"], live[-1].tags["time"]
    assert _texts(_history(h, f"CHATHISTORY BEFORE #h timestamp={last} 10")) == ["m0", "m1", "m2"]
    assert _texts(_history(h, f"CHATHISTORY AFTER #h timestamp={first} 2")) == ["m1", "m2"]
    assert _texts(_history(h, f"CHATHISTORY BETWEEN #h timestamp={first} timestamp={last} 10")) == ["m1", "m2"]
    assert _texts(_history(h, f"CHATHISTORY LATEST #h timestamp={first} 10")) == ["m1", "m2", "m3"]


def test_chathistory_around(irc: Irc) -> None:
    h, live = _said(irc, 10)
    mid = live[7].tags["msgid"]
    assert _texts(_history(h, f"CHATHISTORY AROUND #h msgid={mid} 1")) == ["m7"]
    assert _texts(_history(h, f"CHATHISTORY AROUND #h msgid={mid} 3")) == ["m6", "m7", "m8"]


def test_chathistory_between(irc: Irc) -> None:
    h, live = _said(irc, 8)
    lo, hi = live[0].tags["msgid"], live[-1].tags["msgid"]
    want = [f"m{i}" for i in range(1, 7)]
    assert _texts(_history(h, f"CHATHISTORY BETWEEN #h msgid={lo} msgid={hi} 100")) == want
    assert _texts(_history(h, f"CHATHISTORY BETWEEN #h msgid={hi} msgid={lo} 100")) == want
    assert _texts(_history(h, f"CHATHISTORY BETWEEN #h msgid={lo} msgid={hi} 3")) == ["m1", "m2", "m3"]
    assert _texts(_history(h, f"CHATHISTORY BETWEEN #h msgid={hi} msgid={lo} 3")) == ["m4", "m5", "m6"]


def test_chathistory_only_for_rooms_one_is_in_and_never_private(irc: Irc) -> None:
    h, _ = _said(irc, 2)
    other = irc.user("Other")
    other.join("#elsewhere")
    other.send("PRIVMSG #elsewhere :secret")
    other.send("PRIVMSG Hist :private")
    h.wait_for("PRIVMSG", "Hist", "private")
    for target in ("#elsewhere", "Other", "Alice"):
        h.send(f"CHATHISTORY LATEST {target} * 10")
        got = h.collect_until(
            lambda x: (x.command == "BATCH" and x.params[0].startswith("-")) or x.command in ("FAIL", "403", "442")
        )
        assert not _texts(got), [describe(x) for x in got]
    h.send("CHATHISTORY FROBNICATE #h * 10")
    fail = h.expect("FAIL")
    assert fail.params[0] == "CHATHISTORY", describe(fail)


def test_server_lines_never_exceed_512_bytes(irc: Irc) -> None:
    """A long nick, a long room and a long text: every line received is checked by IrcClient."""
    a = irc.user("A" * 32)
    b = irc.user("B" * 32, ("message-tags", "server-time"))
    room = "#" + "R" * 50
    a.join(room)
    b.join(room)
    text = "\u00e9" * 224  # 448 bytes: fits Alice's 512, not the relayed line with its source
    a.send(f"PRIVMSG {room} :" + text)
    relayed_whole_or_refused(a, b, room, text)
