"""Accounts and rooms that can be run, at the IRC door (contract 11.3), with real sockets.

SASL PLAIN and SCRAM-SHA-256, REGISTER, a reserved nick, OPER and KILL, TOPIC, KICK, INVITE,
MODE with its refusals, one account on two connections, a message to an offline account read
at its next login, private CHATHISTORY. The rules are the core's; these check what an IRC
client sees of them.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ircwire import IrcClient, describe  # noqa: E402
from selchat.core.passwords import ScramClient  # noqa: E402
from test_irc_gateway import Irc  # noqa: E402
from selchat.doors.irc.parser import Line  # noqa: E402

SERVER_NAME = "irc.accounts.test"
PASSWORD = "correct horse"


class Env(Irc):
    """The gateway tests' server-and-clients, with accounts: REGISTER and SASL."""

    def account(self, nick: str, caps: tuple = ()) -> IrcClient:
        """A user that registers its nick as an account (REGISTER) and stays connected."""
        c = self.user(nick, caps)
        c.send(f"REGISTER * * :{PASSWORD}")
        c.wait_for("REGISTER", "SUCCESS")
        c.wait_for("900")
        return c

    def sasl(self, nick: str, account: str, password: str = PASSWORD, caps: tuple = (),
             mechanism: str = "PLAIN") -> IrcClient:
        c = self.connect(nick)
        c.send("CAP LS 302")
        c.cap_ls()
        c.send("CAP REQ :" + " ".join(("sasl",) + caps))
        c.expect("CAP", None, "ACK")
        c.send(f"NICK {nick}")
        c.send("USER u 0 * :Real Name")
        assert sasl_exchange(c, account, password, mechanism) == "903"
        c.send("CAP END")
        c.nick = nick
        c.until_numeric("376")
        return c


def sasl_exchange(c: IrcClient, account: str, password: str, mechanism: str) -> str:
    """Run AUTHENTICATE; the numeric it ends with (903 success, 904 failure)."""
    c.send(f"AUTHENTICATE {mechanism}")
    c.expect("AUTHENTICATE", "+")
    if mechanism == "PLAIN":
        c.send("AUTHENTICATE " + base64.b64encode(f"\0{account}\0{password}".encode()).decode())
    else:
        client = ScramClient(account, password)
        c.send("AUTHENTICATE " + base64.b64encode(client.first().encode()).decode())
        line, _ = c.wait_for("AUTHENTICATE")
        if line.params[0] != "+":
            server_first = base64.b64decode(line.params[0]).decode()
            c.send("AUTHENTICATE " + base64.b64encode(client.final(server_first).encode()).decode())
            line = c.collect_until(lambda x: x.command in ("AUTHENTICATE", "904"))[-1]
            if line.command == "904":
                return "904"
            assert client.verify(base64.b64decode(line.params[0]).decode())
            c.send("AUTHENTICATE +")
    return c.collect_until(lambda x: x.command in ("903", "904"))[-1].command


@pytest.fixture
def env(start_server: Callable[..., object], tmp_path: Path) -> Iterator[Env]:
    operators = tmp_path / "operators"
    operators.write_text("boss\n")
    e = Env(start_server("--irc-port", "0", "--rate", "0", "--max-per-ip", "0",
                         "--server-name", SERVER_NAME, "--kdf-workers", "0",
                         "--register-rate", "0", "--operators", str(operators)))
    yield e
    e.close()


def commands(lines: List[Line]) -> List[str]:
    return [x.command for x in lines]


def test_cap_ls_offers_sasl_mechanisms_and_account_caps(env: Env) -> None:
    c = env.connect()
    c.send("CAP LS 302")
    offered = c.cap_ls()
    assert offered["sasl"] == "PLAIN,SCRAM-SHA-256"
    for cap in ("draft/account-registration", "account-notify", "account-tag", "extended-join"):
        assert cap in offered


def test_register_then_the_nick_is_reserved(env: Env) -> None:
    env.account("alice")
    bob = env.user("bob")
    bob.send("NICK alice")
    line, _ = bob.wait_for("433")
    assert "reserved" in line.params[-1] or "use" in line.params[-1]
    late = env.connect("late")
    late.send("NICK alice")
    late.send("USER u 0 * :x")
    late.wait_for("433")


def test_register_twice_fails_and_a_short_password_is_refused(env: Env) -> None:
    a = env.account("carol")
    a.send(f"REGISTER * * :{PASSWORD}")
    line, _ = a.wait_for("FAIL")
    assert line.params[:2] == ["REGISTER", "ALREADY_AUTHENTICATED"], describe(line)
    d = env.user("dave")
    d.send("REGISTER * * :short")
    line, _ = d.wait_for("FAIL")
    assert line.params[:2] == ["REGISTER", "UNACCEPTABLE_PASSWORD"], describe(line)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_sasl_login_and_failure(env: Env, mechanism: str) -> None:
    env.account("erin").send("QUIT :bye")
    c = env.sasl("erin", "erin", mechanism=mechanism)
    c.send("WHOIS erin")
    lines = c.until_numeric("318")
    assert any(x.command == "330" and x.params[2] == "erin" for x in lines), [describe(x) for x in lines]
    bad = env.connect("bad")
    bad.send("CAP REQ :sasl")
    bad.expect("CAP", None, "ACK")
    bad.send("NICK erin2")
    bad.send("USER u 0 * :x")
    assert sasl_exchange(bad, "erin", "wrong password", mechanism) == "904"


def test_unknown_mechanism_lists_the_mechanisms(env: Env) -> None:
    c = env.connect()
    c.send("CAP REQ :sasl")
    c.expect("CAP", None, "ACK")
    c.send("AUTHENTICATE EXTERNAL")
    line, _ = c.wait_for("908")
    assert line.params[1] == "PLAIN,SCRAM-SHA-256"
    c.wait_for("904")


def test_oper_and_kill(env: Env) -> None:
    env.account("boss").send("QUIT :bye")
    op = env.user("opal")
    victim = env.user("vic")
    watcher = env.user("wat")
    for c in (op, victim, watcher):
        c.send("JOIN #k")
        c.wait_for("366")
    op.send("OPER boss wrongpassword")
    op.wait_for("464")
    victim.send("KILL wat :no")
    victim.wait_for("481")
    op.send(f"OPER boss :{PASSWORD}")
    op.wait_for("381")
    op.send("KILL vic :go away")
    victim.assert_closed()
    line, _ = watcher.wait_for("QUIT")
    assert line.source.startswith("vic!") and "go away" in line.params[-1], describe(line)


def test_topic_kick_invite_and_modes(env: Env) -> None:
    ann = env.user("ann", ("multi-prefix",))
    ben = env.user("ben")
    ann.send("JOIN #room")
    ann.wait_for("366")
    ann.send("TOPIC #room :the topic")
    line, _ = ann.wait_for("TOPIC")
    assert line.params == ["#room", "the topic"]
    ben.send("JOIN #room")
    lines = ben.until_numeric("366")
    assert commands(lines)[:3] == ["JOIN", "332", "333"], [describe(x) for x in lines]
    ben.send("TOPIC #room :mine")
    ben.wait_for("482")
    ann.send("MODE #room")
    line, _ = ann.wait_for("324")
    assert line.params[2] == "+nt", describe(line)
    ann.send("MODE #room +v ben")
    line, _ = ben.wait_for("MODE")
    assert line.params == ["#room", "+v", "ben"]
    ann.send("MODE #room +m")
    ben.wait_for("MODE")
    ann.send("MODE #room -v ben")
    ben.wait_for("MODE")
    ben.send("PRIVMSG #room :may I?")
    line, _ = ben.wait_for("404")
    ann.send("KICK #room ben :out")
    line, _ = ben.wait_for("KICK")
    assert line.params == ["#room", "ben", "out"]
    ann.send("MODE #room +i")
    ann.wait_for("MODE")
    ben.send("JOIN #room")
    ben.wait_for("473")
    ann.send("INVITE ben #room")
    ann.wait_for("341")
    line, _ = ben.wait_for("INVITE")
    assert line.params == ["ben", "#room"]
    ben.send("JOIN #room")
    ben.wait_for("366")
    ann.send("KICK #room ben")
    ben.wait_for("KICK")
    ann.send("MODE #room -i+k sesame")
    ann.wait_for("MODE")
    ben.send("JOIN #room wrong")
    ben.wait_for("475")
    ann.send("MODE #room -k+l * 1")
    ann.wait_for("MODE")
    ben.send("JOIN #room")
    ben.wait_for("471")
    ann.send("MODE #room -l+b ben")
    ann.wait_for("MODE")
    ben.send("JOIN #room")
    ben.wait_for("474")
    ann.send("MODE #room b")
    lines = ann.until_numeric("368")
    assert [x.params[2] for x in lines if x.command == "367"] == ["ben!*@*"]
    ann.send("MODE #room +z")
    ann.wait_for("472")
    ann.send("MODE #room +k :has space")
    line, _ = ann.wait_for("696")


def test_one_account_on_two_connections(env: Env) -> None:
    env.account("gus").send("QUIT :bye")
    one = env.sasl("gus", "gus")
    two = env.sasl("gus2", "gus")  # the same user: it takes the user's nick
    friend = env.user("hal")
    friend.send("PRIVMSG gus :hello both")
    one.wait_for("PRIVMSG", "gus")
    two.wait_for("PRIVMSG", "gus")
    one.send("JOIN #dev")
    one.wait_for("366")
    line, _ = two.wait_for("JOIN")
    assert line.params[0] == "#dev"
    one.send("QUIT :one goes")
    friend.send("JOIN #dev")
    friend.wait_for("366")
    friend.send("NAMES #dev")
    lines = friend.until_numeric("366")
    assert "gus" in " ".join(x.params[-1] for x in lines if x.command == "353")


def test_offline_message_is_delivered_at_login_and_is_history(env: Env) -> None:
    env.account("ivy").send("QUIT :bye")
    jon = env.account("jon", ("batch", "draft/chathistory", "server-time", "message-tags"))
    jon.barrier()
    jon.send("PRIVMSG ivy :while you were away")
    jon.barrier()
    ivy = env.sasl("ivy", "ivy")
    line, _ = ivy.wait_for("PRIVMSG")
    # (ivy took no server-time: the line says when it was said, "[HH:MM UTC] ...")
    assert line.params[0] == "ivy" and line.params[1].endswith("] while you were away")
    assert line.source.startswith("jon")
    jon.send("CHATHISTORY LATEST ivy * 10")
    lines = jon.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    texts = [x.params[-1] for x in lines if x.command == "PRIVMSG"]
    assert texts == ["while you were away"], [describe(x) for x in lines]
    # TARGETS lists the conversation (and rooms with messages in the window, none here).
    jon.send("CHATHISTORY TARGETS timestamp=2100-01-01T00:00:00.000Z "
             "timestamp=2000-01-01T00:00:00.000Z 10")
    lines = jon.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    targets = [x.params for x in lines if x.command == "CHATHISTORY"]
    assert [t[:2] for t in targets] == [["TARGETS", "ivy"]], [describe(x) for x in lines]
    assert targets[0][2].endswith("Z")
    # With a room that has a message too: the order is by newest message, and the limit counts
    # from the first time given.
    jon.send("JOIN #targets")
    jon.wait_for("366")
    jon.send("PRIVMSG #targets :later than the conversation")
    jon.barrier()
    jon.send("CHATHISTORY TARGETS timestamp=2000-01-01T00:00:00.000Z "
             "timestamp=2100-01-01T00:00:00.000Z 1")
    lines = jon.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    assert [x.params[1] for x in lines if x.command == "CHATHISTORY"] == ["ivy"]
    jon.send("CHATHISTORY TARGETS timestamp=2100-01-01T00:00:00.000Z "
             "timestamp=2000-01-01T00:00:00.000Z 1")
    lines = jon.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    assert [x.params[1] for x in lines if x.command == "CHATHISTORY"] == ["#targets"]
    # A window before the conversation lists nothing.
    jon.send("CHATHISTORY TARGETS timestamp=2000-01-01T00:00:00.000Z "
             "timestamp=2001-01-01T00:00:00.000Z 10")
    lines = jon.collect_until(lambda x: x.command == "BATCH" and x.params[0].startswith("-"))
    assert not [x for x in lines if x.command == "CHATHISTORY"], [describe(x) for x in lines]


def test_account_notify_tag_and_extended_join(env: Env) -> None:
    env.account("kim").send("QUIT :bye")
    caps = ("account-notify", "account-tag", "extended-join", "message-tags")
    lee = env.user("lee", caps)
    lee.send("JOIN #x")
    lee.wait_for("366")
    kim = env.sasl("kim", "kim")
    kim.send("JOIN #x")
    line, _ = lee.wait_for("JOIN")
    assert line.params == ["#x", "kim", "Real Name"], describe(line)
    kim.send("PRIVMSG #x :tagged")
    line, _ = lee.wait_for("PRIVMSG")
    assert line.tags.get("account") == "kim"
    guest = env.user("max")
    guest.send("JOIN #x")
    line, _ = lee.wait_for("JOIN")
    assert line.params[:2] == ["#x", "*"]
    guest.send(f"REGISTER * * :{PASSWORD}")
    guest.wait_for("REGISTER", "SUCCESS")
    line, _ = lee.wait_for("ACCOUNT")
    assert line.params == ["max"] and line.source.startswith("max!")


def test_whowas_ban_setter_info_and_time(env: Env) -> None:
    ann = env.user("ann")
    gone = env.user("gone")
    gone.send("QUIT :bye")
    gone.assert_closed()
    ann.send("WHOWAS gone")
    lines = ann.until_numeric("369")
    assert [x.command for x in lines] == ["314", "312", "369"], [describe(x) for x in lines]
    assert lines[0].params[1:3] == ["gone", "tester"]
    ann.send("WHOWAS nobody")
    assert [x.command for x in ann.until_numeric("369")] == ["406", "369"]
    ann.send("JOIN #b")
    ann.wait_for("366")
    ann.send("MODE #b +b bad!*@*")
    ann.wait_for("MODE")
    ann.send("MODE #b +b")
    line, _ = ann.wait_for("367")
    assert line.params[2] == "bad!*@*" and line.params[3].startswith("ann!") and int(line.params[4]) > 0
    ann.send("INFO")
    ann.wait_for("374")
    ann.send("TIME")
    ann.wait_for("391")


def test_minus_n_lets_outsiders_speak_and_whox(env: Env) -> None:
    ann = env.user("ann")
    out = env.user("out")
    ann.send("JOIN #n")
    ann.wait_for("366")
    out.send("PRIVMSG #n :knock")
    out.wait_for("404")
    ann.send("MODE #n -n")
    line, _ = ann.wait_for("MODE")
    assert line.params == ["#n", "-n"]
    out.send("PRIVMSG #n :from outside")
    line, _ = ann.wait_for("PRIVMSG")
    assert line.params == ["#n", "from outside"]
    ann.send("MODE #n")
    line, _ = ann.wait_for("324")
    assert line.params[2] == "+t"
    out.send("WHO ann %tnaf,42")
    line, _ = out.wait_for("354")
    assert line.params == ["out", "42", "ann", "H@", "0"], describe(line)
    out.send("HELP KICK")
    out.wait_for("704")
    out.wait_for("706")


def test_monitor_sees_nicks_of_every_door_come_and_go(env: Env) -> None:
    watcher = env.user("watcher")
    watcher.send("MONITOR + zed,yan")
    line, _ = watcher.wait_for("731")
    assert sorted(line.params[1].split(",")) == ["yan", "zed"]
    zed = env.user("zed")
    line, _ = watcher.wait_for("730")
    assert line.params[1].startswith("zed!")
    zed.send("NICK ZED")  # a change of case only: nothing
    zed.wait_for("NICK")
    watcher.assert_quiet()
    zed.send("NICK yan")
    lines = watcher.collect_until(lambda x: x.command == "730")
    assert ["731", "730"] == [x.command for x in lines if x.command in ("730", "731")]
    watcher.send("MONITOR L")
    lines = watcher.until_numeric("733")
    assert sorted(lines[0].params[1].split(",")) == ["yan", "zed"]
    zed.send("QUIT :bye")
    line, _ = watcher.wait_for("731")
    assert line.params[1] == "yan"


def test_read_marker_and_bot_mode(env: Env) -> None:
    ann = env.user("ann", ("draft/read-marker", "message-tags"))
    ann.send("JOIN #r")
    lines = ann.until_numeric("366")
    assert [x.params for x in lines if x.command == "MARKREAD"] == [["#r", "*"]]
    ann.send("MARKREAD #r timestamp=2024-01-02T03:04:05.678Z")
    line, _ = ann.wait_for("MARKREAD")
    assert line.params == ["#r", "timestamp=2024-01-02T03:04:05.678Z"]
    ann.send("MARKREAD #r timestamp=2020-01-01T00:00:00.000Z")  # never backwards
    line, _ = ann.wait_for("MARKREAD")
    assert line.params == ["#r", "timestamp=2024-01-02T03:04:05.678Z"]
    bot = env.user("robo")
    bot.send("MODE robo +B")
    line, _ = bot.wait_for("MODE")
    assert line.params == ["robo", "+B"]
    bot.send("PRIVMSG ann :beep")
    line, _ = ann.wait_for("PRIVMSG")
    assert "bot" in line.tags
    ann.send("WHOIS robo")
    ann.wait_for("335")


def test_invite_alone_lists_invitations(env: Env) -> None:
    foo = env.user("foo")
    bar = env.user("bar")
    foo.send("JOIN #chan")
    foo.wait_for("366")
    foo.send("INVITE bar #chan")
    foo.wait_for("341")
    bar.wait_for("INVITE")
    bar.send("INVITE")
    lines = bar.until_numeric("337")
    assert [x.params for x in lines] == [["bar", "#chan"], ["bar", "End of /INVITE list"]]
