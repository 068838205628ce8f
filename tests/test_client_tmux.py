"""The interactive client in a real terminal: tmux runs it, sends keys as a person types them,
and reads the screen back (capture-pane). Windows, the act list, mentions and the bell,
/history, presence, the nick prompt after connecting, and keys typed before the screen is up.

Every wait polls the screen until what we expect is there, with a deadline; a failure shows
the screen. Skipped when tmux is not installed (never when it is). Each test runs its own tmux
server (-L), so nothing touches a tmux session of the person running the tests.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0
WIDTH, HEIGHT = 100, 24


# Window 3 in the status line ("[3:alice]", "3:alice"); not the clock ("[23:02]", "[13:05]").
WINDOW_3 = re.compile(r"(?<![\d:])3:(?!\d)")


class Pane:
    """One client in a tmux session of its own."""

    def __init__(self, socket_name: str, name: str, args: List[str], log: Path) -> None:
        self.socket_name, self.name = socket_name, name
        env = f"PYTHONPATH={shlex.quote(str(ROOT))} TERM=xterm-256color"
        client = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "selchat.client", *args])
        # After the client ends, say how, and keep the pane so its last words can be read.
        command = f"cd {shlex.quote(str(ROOT))} && env {env} {client}; echo CLIENT-EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", name, "-x", str(WIDTH), "-y", str(HEIGHT), command)
        self.output = log
        # Every byte the client writes to its terminal, to count bells.
        self.tmux("pipe-pane", "-t", name, "-o", f"cat >> {shlex.quote(str(log))}")

    def tmux(self, *args: str) -> str:
        assert TMUX is not None
        done = subprocess.run([TMUX, "-L", self.socket_name, *args], capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    def keys(self, *keys: str) -> None:
        """tmux key names: Enter, M-2, M-Left, PageUp, C-c."""
        self.tmux("send-keys", "-t", self.name + ":", *keys)

    def type(self, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", self.name + ":", "-l", text)
        if enter:
            self.keys("Enter")

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-J", *(["-e"] if escapes else []), "-t", self.name + ":")

    def wait(self, check: Callable[[str], bool], what: str, timeout: float = WAIT, escapes: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(escapes)
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout} s; the screen:\n{screen}")
            time.sleep(0.05)  # polling the screen, under the deadline above

    def wait_for(self, pattern: str, timeout: float = WAIT, escapes: bool = False) -> str:
        rx = re.compile(pattern, re.M)
        return self.wait(lambda s: rx.search(s) is not None, repr(pattern), timeout, escapes)

    def status(self) -> str:
        """The status line: the second line from the bottom."""
        return self.screen().rstrip("\n").split("\n")[-2]

    def bells(self) -> int:
        data = self.output.read_bytes() if self.output.exists() else b""
        data = re.sub(rb"\x1b\][^\x07\x1b]*(\x07|\x1b\\)", b"", data)  # OSC strings end in BEL too
        return data.count(b"\x07")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Callable[..., Pane]]:
    socket_name = f"selchat-test-{os.getpid()}-{tmp_path.name}"
    panes: List[Pane] = []

    def start(name: str, *args: str) -> Pane:
        pane = Pane(socket_name, name, list(args), tmp_path / f"{name}.out")
        panes.append(pane)
        return pane

    yield start
    if TMUX is not None:
        subprocess.run([TMUX, "-L", socket_name, "kill-server"], capture_output=True, timeout=WAIT)


def chat(tmux: Callable[..., Pane], port: int, nick: str, *extra: str) -> Pane:
    """A client registered as `nick`, its screen up in #lobby."""
    pane = tmux(nick, "--port", str(port), "--nick", nick, *extra)
    pane.wait_for(rf"\[{re.escape(nick)}\] \[2:#lobby\]")
    return pane


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- before the screen ----------------------------------------------------------------------


def test_nothing_listening_says_what_to_do_before_asking_anything(tmux: Callable[..., Pane]) -> None:
    port = free_port()
    pane = tmux("lonely", "--port", str(port))
    screen = pane.wait_for(r"CLIENT-EXIT=1")
    assert f"is selchat-server running on port {port}?" in screen
    assert "nickname" not in screen  # it did not ask for a nick first


def test_a_refused_nick_is_explained_and_a_valid_one_offered(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server()
    pane = tmux("newcomer", "--port", str(srv.port))
    pane.wait_for(r"^nickname:")
    pane.type("john smith")
    pane.wait_for(r"'john smith' cannot be a nick: a nick cannot contain spaces\. Try john_smith")
    pane.wait_for(r"^nickname: john_smith")  # already typed in for us
    pane.keys("Enter")
    pane.wait_for(r"\[john_smith\] \[2:#lobby\]")


def test_keys_typed_before_the_screen_is_up_appear_once_on_the_input_line(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server()
    pane = tmux("early", "--port", str(srv.port), "--nick", "early")
    pane.type("typed too soon", enter=False)  # the client is still starting
    screen = pane.wait_for(r"\[early\] \[2:#lobby\]")
    screen = pane.wait_for(r"^\[#lobby\] early> typed too soon")
    assert screen.count("typed too soon") == 1, screen


# ----- windows, act list, mentions ------------------------------------------------------------


def test_windows_act_list_and_mentions(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server()
    alice = chat(tmux, srv.port, "alice")
    bob = chat(tmux, srv.port, "bob")
    alice.type("/join #dev")
    alice.wait_for(r"\[3:#dev\]")
    alice.wait_for(r"^ #dev \(1 here\)")  # the topic line names the room
    bob.type("/join #dev")
    alice.wait_for(r"bob joined")
    bob.type("the build is green")
    alice.wait_for(r"<bob> the build is green")  # in #dev, where alice is
    bob.keys("M-2")
    bob.wait_for(r"\[2:#lobby\]")
    bob.type("lunch, anyone?")
    status = alice.wait_for(r"\[act: 2\]").split("\n")
    assert not any("lunch" in line for line in status)  # #lobby's talk is not in #dev's window
    bells = alice.bells()
    bob.type("ALICE: are you there?")
    alice.wait_for(r"\[act: !2\]")  # a mention, marked apart
    alice.wait(lambda s: alice.bells() == bells + 1, "one bell")
    alice.keys("M-2")
    screen = alice.wait_for(r"\[2:#lobby\]")
    assert "[act:" not in alice.status()
    assert "<bob> lunch, anyone?" in screen and "<bob> ALICE: are you there?" in screen
    colours = alice.screen(escapes=True)
    line = next(x for x in colours.split("\n") if "are you there" in x)
    assert "\x1b[35m" in line or "\x1b[1m\x1b[35m" in line or ";35m" in line, repr(line)  # highlighted
    # Alt+Right goes round, /win N goes straight
    alice.keys("M-Right")
    alice.wait_for(r"\[3:#dev\]")
    alice.type("/win 1")
    alice.wait_for(r"\[1:status\]")
    alice.keys("M-Left")
    alice.wait_for(r"\[3:#dev\]")
    alice.wait(lambda s: alice.bells() == bells + 1, "no more bells")
    alice.type("BO", enter=False)
    alice.keys("Tab")
    alice.wait_for(r"^\[#dev\] alice> bob:")  # Tab completes a member's nick


def test_a_refused_join_goes_back_and_leaves_no_window(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server()
    alice = chat(tmux, srv.port, "alice")
    alice.type("/join #no!good")
    alice.wait_for(r"error bad_room: ")
    alice.wait_for(r"\[2:#lobby\]")
    assert not WINDOW_3.search(alice.status()), alice.status()
    alice.keys("M-Right")
    alice.wait_for(r"\[1:status\]")  # round the ends: there is no window 3


def test_private_conversation_windows_and_close(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server()
    alice = chat(tmux, srv.port, "alice", "--no-bell")
    bob = chat(tmux, srv.port, "bob")
    bob.type("/query alice")
    bob.wait_for(r"\[3:alice\]")
    bob.wait_for(r"^ private conversation with alice")
    bob.type("psst")
    alice.wait_for(r"\[act: !3\]")
    assert alice.bells() == 0  # --no-bell
    alice.keys("M-3")
    alice.wait_for(r"<bob> psst")
    alice.type("what?")  # a plain line in a conversation window goes to the person
    bob.wait_for(r"<alice> what\?")
    alice.type("/close")
    alice.wait_for(r"\[2:#lobby\]")
    assert not WINDOW_3.search(alice.status()), alice.status()


def test_presence_lines_can_be_hidden_per_room(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server()
    alice = chat(tmux, srv.port, "alice")
    alice.type("/presence off")
    alice.wait_for(r"join, part and quit lines are hidden in #lobby")
    alice.wait_for(r"\[presence hidden\]")
    carol = chat(tmux, srv.port, "carol")
    carol.type("hello all")
    screen = alice.wait_for(r"<carol> hello all")
    assert "carol joined" not in screen
    alice.type("/presence on")
    alice.wait_for(r"carol joined")  # kept, only hidden


def test_history_fetches_the_older_page_then_says_all_are_shown(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server("--rate", "0")  # the talker says 60 lines at once
    talker = srv.registered("talker")
    talker.join("#old")
    for i in range(60):
        talker.send(type="say", room="#old", text=f"line {i}")
    talker.barrier()
    alice = chat(tmux, srv.port, "alice")
    alice.type("/join #old")
    alice.wait_for(r"<talker> line 59")
    alice.type("/history")
    alice.wait_for(r"that is the start of #old")
    # The older page goes above what was shown: page up to it.
    for _ in range(10):
        if "line 0" in alice.screen():
            break
        alice.keys("PageUp")
        alice.wait_for(r"more below")
    screen = alice.wait_for(r"<talker> line 0\s*$")
    assert "line 59" not in screen and "-- earlier messages in #old --" in screen
    alice.keys(*["PageDown"] * 20)
    alice.wait(lambda s: "more below" not in s, "the bottom")
    alice.type("/history")
    alice.wait_for(r"all 60 messages of #old are shown")


# ----- accounts and rooms (contract 1.2) ----------------------------------------------------------


def test_register_and_log_in_without_echo_then_run_a_room(tmux: Callable[..., Pane], start_server) -> None:
    srv = start_server("--kdf-workers", "0")
    eve = chat(tmux, srv.port, "eve")
    eve.type("/register")
    eve.wait_for(r"^password for the new account eve:")
    eve.type("eve-password-1")
    eve.wait_for(r"^the same password again:")
    eve.type("eve-password-1")
    screen = eve.wait_for(r"your nick is now the account eve")
    eve.wait_for(r"\[eve\(\+a\)\]")
    assert "eve-password-1" not in screen
    eve.type("/quit")
    eve.wait_for(r"CLIENT-EXIT=0")
    # Another terminal logs in to the account: the password is asked after connecting, unechoed.
    dev = tmux("device", "--port", str(srv.port), "--account", "eve")
    dev.wait_for(r"^password for account eve:")
    dev.type("eve-password-1")
    screen = dev.wait_for(r"\[eve\(\+a\)\] \[2:#lobby\]")
    assert "eve-password-1" not in screen
    dev.type("/join #plans")
    dev.wait_for(r"\[3:#plans\] \(@\)")  # she made the room: its operator
    dev.type("/topic ship on friday")
    dev.wait_for(r"^ #plans \(1 here\): ship on friday")
    dev.type("/who")
    dev.wait_for(r"#plans \* 1 here: @eve")


def test_after_a_server_restart_the_account_is_logged_in_again(tmux: Callable[..., Pane], start_server, tmp_path: Path) -> None:
    port, db = str(free_port()), str(tmp_path / "chat.db")
    srv = start_server("--kdf-workers", "0", "--port", port, "--db", db)
    fay = chat(tmux, srv.port, "fay")
    fay.type("/register")
    fay.type("fay-password")
    fay.type("fay-password")
    fay.wait_for(r"\[fay\(\+a\)\]")
    fay.type("/join #back")
    fay.wait_for(r"\[3:#back\]")
    srv.stop()
    fay.wait_for(r"\(offline, reconnecting\)")
    start_server("--kdf-workers", "0", "--port", port, "--db", db)
    # The nick is reserved for the account: only logging in again gets it back.
    fay.wait_for(r"-- reconnected", timeout=20)
    screen = fay.wait_for(r"\[fay\(\+a\)\] \[3:#back\] \(@\)")
    assert "offline" not in fay.status(), screen


def test_the_server_password_is_asked_without_echo(tmux: Callable[..., Pane], start_server, tmp_path: Path) -> None:
    secret = tmp_path / "server.pass"
    secret.write_text("open-sesame\n")
    srv = start_server("--password-file", str(secret))
    pane = tmux("guest", "--port", str(srv.port), "--nick", "guest")
    pane.wait_for(r"^server password:")
    pane.type("wrong-one")
    pane.wait_for(r"bad_password")
    pane.wait_for(r"^server password:\s*$")
    pane.type("open-sesame", enter=False)
    screen = pane.wait_for(r"^server password: \*{11}\s*$")  # shown as stars
    assert "open-sesame" not in screen and "wrong-one" not in screen
    pane.keys("Enter")
    pane.wait_for(r"\[guest\] \[2:#lobby\]")
