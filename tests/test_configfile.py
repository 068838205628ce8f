"""`--config selchat.toml` (issue 18, item 3): every option as a key, the command line over the
file, one line naming the file, the key and why for anything wrong, `--check-config`, and the
example file in docs/ with every key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from conftest import ROOT, server_env
from selchat.config import ServerConfig, build_parser, parse_args
from selchat.ops import configfile
from selchat.ops.configfile import ConfigError

EXAMPLE = ROOT / "docs" / "selchat.example.toml"


def run(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selchat.server", *args], cwd=str(ROOT), env=server_env(),
                          capture_output=True, text=True, timeout=timeout)


def write(tmp_path: Path, text: str, name: str = "selchat.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_file_sets_options_of_every_kind_and_the_command_line_wins(tmp_path) -> None:
    path = write(tmp_path, """
port = 0
max-outbuf = 262144            # a derived option given: the others follow from it
rate = 2.5
motd = "Hello from the file"
web-origin = ["https://a.example", "https://b.example"]
trusted-proxy = "10.0.0.0/8"   # one value for a repeatable option
irc-port = 0
log-level = "warning"
""")
    config = parse_args(["--config", path])
    assert (config.port, config.max_outbuf, config.rate, config.motd) == (0, 262144, 2.5, "Hello from the file")
    assert config.max_frame == 65536  # derived from max-outbuf as on the command line
    assert config.web_origin == ("https://a.example", "https://b.example")
    assert config.trusted_proxy == ("10.0.0.0/8",) and config.irc_port == 0
    assert config.config == path
    over = parse_args(["--config", path, "--rate", "7", "--web-origin", "https://c.example"])
    assert over.rate == 7.0 and over.web_origin == ("https://c.example",)  # the whole list replaced
    assert over.motd == "Hello from the file"


@pytest.mark.parametrize("text,expected", [
    ("max-outbuff = 3\n", r"max-outbuff: not an option \(did you mean max-outbuf\?\)"),
    ("max_outbuf = 3\n", r"max_outbuf: not an option \(did you mean max-outbuf\?\)"),
    ("max-outbuf = \"big\"\n", r"max-outbuf: 'big' is not a whole number"),
    ("port = 70000\n", r"port: 70000 is not a TCP port"),
    ("rate = -1\n", r"rate: -1 must be 0 \(off\) or a positive number"),
    ("motd = 5\n", r"motd: 5 must be text, in quotes"),
    ("log-level = \"loud\"\n", r"log-level: \"loud\" is not one of debug, info"),
    ("port = true\n", r"port: true is not a value this option takes"),
    ("port = [1, 2]\n", r"port: a list, but this option takes one value"),
    ("[limits]\nrate = 1\n", r"limits: a table; every option is a key at the top"),
    ("web-origin = \"ftp://x\"\n", r"web-origin 'ftp://x' must be scheme://host\[:port\]"),
    ("max-frame = 100000\nmax-outbuf = 16\n", r"--max-outbuf 16 is too small for --max-frame 100000"),
    ("port = \n", r"not TOML: "),
    ("tls-cert = \"a.pem\"\n", r"tls-cert: --tls-cert and --tls-key go together"),
])
def test_anything_wrong_stops_the_start_with_one_line_naming_the_file_and_the_key(
        tmp_path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    done = run("--config", path, "--db", str(tmp_path / "never.db"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"selchat-server: {path}: "), lines[0]
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "never.db").exists()  # nothing made on a failed start


def test_a_missing_file_is_one_line_too(tmp_path) -> None:
    done = run("--config", str(tmp_path / "nowhere.toml"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"selchat-server: {tmp_path / 'nowhere.toml'}: cannot read it: No such file or directory"


def test_check_config_prints_the_values_in_force_with_where_they_came_from(tmp_path) -> None:
    path = write(tmp_path, "max-outbuf = 262144\nmotd = \"hi\"\n")
    done = run("--config", path, "--check-config", "--rate", "3")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f'max-outbuf = 262144  # from {path}' in out
    assert "max-frame = 65536  # derived" in out
    assert "rate = 3.0  # command line" in out
    assert 'host = "127.0.0.1"  # default' in out
    assert "# tls-cert =  (not set; default)" in out
    # What it prints is itself a configuration that gives the same values.
    again = write(tmp_path, out, "again.toml")
    assert vars(parse_args(["--config", again])) == {
        **vars(parse_args(["--config", path, "--rate", "3"])), "config": again}


def test_a_server_starts_from_a_file(start_server, tmp_path) -> None:
    path = write(tmp_path, "web-port = 0\nirc-port = 0\nmotd = \"from a file\"\n")
    srv = start_server("--config", path)
    srv.wait_log(r"web listening on 127\.0\.0\.1:\d+")
    srv.wait_log(r"irc listening on 127\.0\.0\.1:\d+")
    c = srv.client()
    c.send(type="hello", nick="filed")
    assert c.expect("welcome")["motd"] == "from a file"


def test_every_option_is_a_key_of_the_example_file_and_its_values_are_the_defaults() -> None:
    parser = build_parser()
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^#? ?([a-z][a-z0-9-]*) =", text, re.M))
    missing = [key for key in configfile.file_options(parser) if key not in keys]
    assert not missing, (f"docs/selchat.example.toml lacks {missing}: regenerate it with "
                         "python -m selchat.ops.configfile > docs/selchat.example.toml")
    # Its settings (the lines not commented out) are the defaults, as the server reads them.
    options = configfile.file_options(parser)
    known = "\n".join(line for line in text.splitlines()
                      if not line.strip() or line.startswith("#") or line.split(" =")[0] in options)
    values = configfile.read_text(known, "example", parser)
    defaults = ServerConfig()
    for dest, value in values.items():
        got = getattr(defaults, dest)
        if isinstance(got, bool) and isinstance(value, str):
            continue  # (a choice the server keeps as a bool)
        assert got == (tuple(value) if isinstance(value, list) else value), dest


def test_read_text_and_render_round_trip() -> None:
    parser = build_parser()
    config = parse_args(["--port", "0", "--web-origin", "https://x.example", "--motd", 'quote " and \\ and \u00e9'])
    sources = {}
    text = configfile.render(config, sources, parser)
    values = configfile.read_text(text, "rendered", parser)
    assert values["motd"] == 'quote " and \\ and \u00e9'
    assert values["web_origin"] == ["https://x.example"]
    with pytest.raises(ConfigError, match="rendered: nope: not an option"):
        configfile.read_text("nope = 1\n", "rendered", parser)
