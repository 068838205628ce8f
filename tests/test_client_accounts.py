"""Accounts and running a room with the real client against a real server (contract 1.2,
section 11, as docs/client.md tells a user to use it): script mode, end to end."""

from __future__ import annotations

import re
from pathlib import Path

from test_client_script import Listener, run


def pw_file(tmp_path: Path, name: str, password: str) -> str:
    path = tmp_path / f"{name}.pw"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return str(path)


def register(port: int, nick: str, password: str) -> None:
    done = run(port, "--nick", nick, lines=f"/register {password}\n")
    assert done.returncode == 0, done.stderr
    assert f"your nick is now the account {nick}" in done.stdout, done.stdout


def test_register_then_log_in_with_a_password_file(start_server, tmp_path: Path) -> None:
    srv = start_server("--kdf-workers", "0")
    register(srv.port, "dana", "dana-password")
    done = run(srv.port, "--account", "dana", "--account-password-file", pw_file(tmp_path, "dana", "dana-password"), lines="hello\n")
    assert done.returncode == 0, done.stderr
    assert re.search(r"\* welcome, dana \(.*\), logged in as dana", done.stdout), done.stdout
    assert re.search(r"#lobby <dana> hello", done.stdout), done.stdout


def test_a_wrong_password_and_a_reserved_nick_are_refused_in_words(start_server, tmp_path: Path) -> None:
    srv = start_server("--kdf-workers", "0")
    register(srv.port, "erin", "erin-password")
    done = run(srv.port, "--account", "erin", "--account-password-file", pw_file(tmp_path, "erin", "not-her-password"))
    assert done.returncode == 1 and "login refused: login_failed" in done.stderr, done.stderr
    done = run(srv.port, "--nick", "erin")
    assert done.returncode == 1, done.stderr
    assert "erin is a registered account: log in with --account erin" in done.stderr, done.stderr


def test_script_mode_needs_the_password_file_for_an_account(start_server) -> None:
    srv = start_server("--kdf-workers", "0")
    done = run(srv.port, "--account", "erin")
    assert done.returncode == 2 and "--account-password-file" in done.stderr


def test_an_operator_runs_a_room_and_a_member_sees_it_in_words(start_server, tmp_path: Path) -> None:
    srv = start_server("--kdf-workers", "0")
    register(srv.port, "olga", "olga-password")
    guest = Listener(srv.port, "gus")
    try:
        guest.send("/join #ops")
        guest.out.wait_for(r"#ops \* gus joined")
        # gus made #ops: he is its operator; olga joins, gus makes her one too
        olga = Listener(srv.port, "olga", "--account", "olga", "--account-password-file", pw_file(tmp_path, "olga", "olga-password"))
        try:
            olga.send("/join #ops")
            olga.out.wait_for(r"#ops \* 2 here: @gus olga|#ops \* 2 here: olga @gus")
            guest.send("/op olga")
            olga.out.wait_for(r"#ops \* gus set op olga")
            olga.send("/topic release on friday")
            guest.out.wait_for(r"#ops \* olga set the topic: release on friday")
            olga.send("/voice gus")
            guest.out.wait_for(r"#ops \* olga set voice gus")
            olga.send("/mode +m")
            guest.out.wait_for(r"#ops \* olga set moderated on")
            olga.send("/who")
            olga.out.wait_for(r"#ops \* 2 here: (@gus @olga|@olga @gus)")
            olga.send("/mode")
            olga.out.wait_for(r"#ops \* modes: moderated, topic lock; bans: none")
            olga.send("/deop gus")
            olga.send("/kick gus time out")
            guest.out.wait_for(r"#ops \* you were kicked by olga: time out")
            olga.out.wait_for(r"#ops \* gus was kicked by olga: time out")
            olga.send("/ban gus")
            olga.out.wait_for(r"#ops \* olga set ban gus")
            guest.send("/join #ops")
            guest.out.wait_for(r"error banned: .*\(line \d+\)")
            olga.send("/invite gus")
            guest.out.wait_for(r"olga invites you to #ops \(/join #ops\)")
        finally:
            assert olga.finish() == 0
    finally:
        assert guest.finish() == 0


def test_messages_to_an_offline_account_come_at_its_next_login(start_server, tmp_path: Path) -> None:
    srv = start_server("--kdf-workers", "0")
    register(srv.port, "pia", "pia-password")
    register(srv.port, "quin", "quin-password")
    quin = pw_file(tmp_path, "quin", "quin-password")
    done = run(srv.port, "--account", "quin", "--account-password-file", quin, lines="/msg pia are you there?\n/msg pia call me\n")
    assert done.returncode == 0, done.stderr
    done = run(srv.port, "--account", "pia", "--account-password-file", pw_file(tmp_path, "pia", "pia-password"),
               lines="/query quin\n/history\n")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "-- 2 messages from your conversation with quin while you were away --" in out, out
    assert re.search(r"private <quin -> pia> are you there\?\n.*private <quin -> pia> call me", out), out
    assert "all 2 messages of your conversation with quin are shown" in out + done.stderr, (out, done.stderr)


def test_a_server_operator_kills_and_others_see_why(start_server, tmp_path: Path) -> None:
    operators = tmp_path / "operators"
    operators.write_text("root\n")
    srv = start_server("--kdf-workers", "0", "--operators", str(operators))
    register(srv.port, "root", "root-password")
    witness = Listener(srv.port, "wit")
    victim = Listener(srv.port, "vic")
    try:
        witness.out.wait_for(r"#lobby \* vic joined")
        done = run(srv.port, "--account", "root", "--account-password-file", pw_file(tmp_path, "root", "root-password"),
                   lines="/kill vic flooding\n")
        assert done.returncode == 0, done.stderr
        witness.out.wait_for(r"\* vic quit \(killed by root: flooding\)")
        assert victim.proc.wait(timeout=15) == 1
        denied = run(srv.port, "--nick", "nobody", lines="/kill wit\n")
        assert re.search(r"error not_operator: .*\(line 1\)", denied.stdout), denied.stdout
    finally:
        assert witness.finish() == 0
