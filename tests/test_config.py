"""The command line: every limit option works alone (docs/protocol.md, "Options").

Defaults that would conflict with an option the operator gave are derived from it; only two
given options that contradict each other stop the server, with one line naming both. The unit
tests drive `parse_args`; the last ones start the real server and read `welcome.limits`.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, server_env, unique_nick
from selchat.config import (
    DERIVED_OPTIONS,
    ServerConfig,
    build_parser,
    derive_limits,
    min_frame_for,
    parse_args,
    welcome_size,
)
from selchat.defaults import (
    FRAME_LENGTH_MAX,
    MAX_FRAME,
    MAX_OUTBUF,
    MAX_TEXT,
    MOTD,
    PING_INTERVAL,
    PING_TIMEOUT,
    SECONDS_MAX,
)

ENVELOPE = min_frame_for(0)  # what a message frame needs beyond 4 bytes per code point


def refused(argv: List[str]) -> str:
    """parse_args must exit with status 2; the one line it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("selchat-server: "), lines
    return lines[0]


def assert_invariants(c: ServerConfig) -> None:
    """What the server relies on, whatever the options."""
    assert 1 <= c.max_text and c.max_frame <= FRAME_LENGTH_MAX
    assert c.max_frame >= min_frame_for(c.max_text), "a full-length message would not fit a frame"
    assert c.max_outbuf >= 4 * c.max_frame, "one answer could drop a client that reads"
    assert c.high_water >= c.max_frame
    assert welcome_size(c) <= c.max_frame, "the welcome would not fit a frame"
    assert 0 < c.ping_interval < c.ping_timeout


# --- each rule, one option given ------------------------------------------------------------------


def test_no_options_gives_the_documented_defaults() -> None:
    c = parse_args([])
    assert (c.max_frame, c.max_text, c.max_outbuf, c.motd) == (MAX_FRAME, MAX_TEXT, MAX_OUTBUF, MOTD)
    assert (c.ping_interval, c.ping_timeout) == (PING_INTERVAL, PING_TIMEOUT)
    assert_invariants(c)


def test_a_small_max_frame_alone_lowers_max_text_to_what_fits() -> None:
    c = parse_args(["--max-frame", "1024"])
    assert c.max_frame == 1024
    assert c.max_text == (1024 - ENVELOPE) // 4
    assert min_frame_for(c.max_text + 1) > 1024  # the largest that fits, not just one that does
    assert c.max_outbuf == MAX_OUTBUF
    assert_invariants(c)


def test_the_smallest_max_frame_alone_still_carries_one_character() -> None:
    c = parse_args(["--max-frame", str(min_frame_for(1))])
    assert c.max_text == 1
    assert_invariants(c)


def test_a_large_max_frame_alone_raises_max_outbuf() -> None:
    c = parse_args(["--max-frame", "1000000"])
    assert (c.max_frame, c.max_text, c.max_outbuf) == (1000000, MAX_TEXT, 4000000)
    assert_invariants(c)


def test_a_small_max_outbuf_alone_lowers_max_frame_and_max_text() -> None:
    c = parse_args(["--max-outbuf", "65536"])
    assert (c.max_outbuf, c.max_frame) == (65536, 16384)
    assert c.max_text == (16384 - ENVELOPE) // 4
    assert_invariants(c)


def test_a_large_max_outbuf_alone_changes_nothing_else() -> None:
    c = parse_args(["--max-outbuf", str(8 * MAX_OUTBUF)])
    assert (c.max_frame, c.max_text, c.max_outbuf) == (MAX_FRAME, MAX_TEXT, 8 * MAX_OUTBUF)


def test_a_large_max_text_alone_raises_max_frame_and_max_outbuf() -> None:
    c = parse_args(["--max-text", "100000"])
    assert c.max_text == 100000
    assert c.max_frame >= min_frame_for(100000) and c.max_outbuf == 4 * c.max_frame
    assert_invariants(c)


def test_a_small_max_text_alone_keeps_the_default_frame() -> None:
    c = parse_args(["--max-text", "10"])
    assert (c.max_text, c.max_frame, c.max_outbuf) == (10, MAX_FRAME, MAX_OUTBUF)


def test_max_text_and_a_small_max_outbuf_meet_in_the_middle() -> None:
    c = parse_args(["--max-text", "1000", "--max-outbuf", "65536"])
    assert (c.max_text, c.max_outbuf, c.max_frame) == (1000, 65536, 16384)
    assert_invariants(c)


def test_the_default_motd_is_dropped_when_the_welcome_cannot_hold_it() -> None:
    # The smallest frame, with a rate that takes many digits in welcome.limits.
    argv = ["--max-frame", str(min_frame_for(1)), "--rate", "0.123456789"]
    c = parse_args(argv)
    assert c.motd == "" and welcome_size(ServerConfig(max_frame=c.max_frame, max_text=1, rate=c.rate)) > c.max_frame
    assert_invariants(c)


def test_the_default_motd_is_kept_when_it_fits() -> None:
    assert parse_args(["--max-frame", "1024"]).motd == MOTD
    assert parse_args(["--max-outbuf", "2000"]).motd == MOTD


def test_a_long_motd_alone_raises_max_frame() -> None:
    motd = "m" * (2 * MAX_FRAME)
    c = parse_args([f"--motd={motd}"])
    assert c.motd == motd and c.max_frame > 2 * MAX_FRAME and c.max_text == MAX_TEXT
    assert_invariants(c)


def test_a_motd_given_with_a_large_enough_max_frame_is_kept() -> None:
    c = parse_args(["--max-frame", "2000", "--motd", "hello"])
    assert c.motd == "hello"


def test_a_long_ping_interval_alone_raises_the_timeout() -> None:
    c = parse_args(["--ping-interval", "500"])
    assert (c.ping_interval, c.ping_timeout) == (500.0, 500.0 * PING_TIMEOUT / PING_INTERVAL)
    assert parse_args(["--ping-interval", "100"]).ping_timeout == PING_TIMEOUT  # still longer


def test_a_short_ping_timeout_alone_lowers_the_interval() -> None:
    c = parse_args(["--ping-timeout", "10"])
    assert (c.ping_interval, c.ping_timeout) == (10.0 * PING_INTERVAL / PING_TIMEOUT, 10.0)
    assert parse_args(["--ping-timeout", "90"]).ping_interval == PING_INTERVAL


def test_options_given_are_kept_as_given() -> None:
    argv = ["--max-frame", "70000", "--max-text", "2000", "--max-outbuf", "300000",
            "--motd", "Hello there", "--ping-interval", "5", "--ping-timeout", "7"]
    c = parse_args(argv)
    assert (c.max_frame, c.max_text, c.max_outbuf, c.motd, c.ping_interval, c.ping_timeout) == (
        70000, 2000, 300000, "Hello there", 5.0, 7.0)


# --- conflicts: only between options given ------------------------------------------------------


@pytest.mark.parametrize("argv, names, need", [
    (["--max-frame", "1024", "--max-text", "4096"], ["--max-frame 1024", "--max-text 4096"],
     min_frame_for(4096)),
    (["--max-frame", "65536", "--max-outbuf", "65536"], ["--max-outbuf 65536", "--max-frame 65536"],
     4 * 65536),
    (["--max-text", "100000", "--max-outbuf", "65536"], ["--max-outbuf 65536", "--max-text 100000"], None),
    (["--max-frame", "400", "--motd", "x" * 400], ["--max-frame 400", "--motd of 400 bytes"], None),
    (["--max-outbuf", "4000", "--motd", "x" * 2000], ["--max-outbuf 4000", "--motd of 2000 bytes"], None),
])
def test_two_given_options_that_contradict_stop_the_server(argv: List[str], names: List[str],
                                                           need: Optional[int]) -> None:
    line = refused(argv)
    for name in names:
        assert name in line, line
    found = re.search(r"needs at least (\d+)", line)
    assert found, line
    if need is not None:
        assert int(found.group(1)) == need
    # The value it names is one that works.
    flag = names[0].split()[0]
    fixed = list(argv)
    fixed[fixed.index(flag) + 1] = found.group(1)
    assert_invariants(parse_args(fixed))


def test_the_conflict_line_reads_as_documented(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--max-frame", "1024", "--max-text", "4096"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"selchat-server: --max-frame 1024 is too small for --max-text 4096 "
                   f"(needs at least {min_frame_for(4096)})\n")


def test_ping_timeout_not_longer_than_ping_interval_is_a_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    for interval, timeout in (("2", "1"), ("5", "5")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--ping-interval", interval, "--ping-timeout", timeout])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err == f"selchat-server: --ping-timeout {timeout} must be longer than --ping-interval {interval}\n"


@pytest.mark.parametrize("argv, flag", [
    (["--max-frame", "100"], "--max-frame 100"),
    (["--max-outbuf", "800"], "--max-outbuf 800"),
])
def test_one_option_too_small_for_anything_says_what_would_do(argv: List[str], flag: str) -> None:
    line = refused(argv)
    assert f"{flag} is too small (needs at least" in line, line
    need = re.search(r"needs at least (\d+)", line)
    assert need
    assert_invariants(parse_args([argv[0], need.group(1)]))
    refused([argv[0], str(int(need.group(1)) - 1)])


@pytest.mark.parametrize("argv", [
    ["--max-frame", str(FRAME_LENGTH_MAX + 1)],
    ["--ping-interval", str(SECONDS_MAX * 2)],
    ["--handshake-timeout", "1e7"],
    ["--shutdown-grace", "1e300"],
])
def test_values_beyond_what_the_server_can_use_are_refused(argv: List[str]) -> None:
    """A frame length has 4 bytes; a wait of more than ~24 days overflows the selector."""
    line = refused(argv)
    assert argv[0] in line and "at most" in line, line


@pytest.mark.parametrize("argv", [["--motd=--"], ["--server-name=--"], ["--web-origin=--"],
                                  ["--burst=--"], ["--db=--"]])
def test_a_double_dash_given_as_a_value_is_refused(argv: List[str]) -> None:
    """argparse hands an option given `--` as its value an empty list, not a string (the
    property test below found `--motd=--` crashing the text check): one line and status 2."""
    line = refused(argv)
    assert argv[0].split("=")[0] in line and "'--'" in line, line


# --- one table of rules for the code, --help and the docs -------------------------------------


def test_the_rules_table_states_the_real_numbers() -> None:
    doc = derive_limits.__doc__ or ""
    for number in (MAX_FRAME, MAX_TEXT, MAX_OUTBUF, ENVELOPE, int(PING_INTERVAL), int(PING_TIMEOUT)):
        assert str(number) in doc, number
    assert MOTD in doc
    for name in DERIVED_OPTIONS:
        assert "--" + name.replace("_", "-") in doc


def test_help_shows_the_defaults_and_points_to_the_rules() -> None:
    text = build_parser().format_help()
    assert 'derived from the other limits when not given: docs/protocol.md, "Options"' in text
    assert "issue" not in text.lower()
    for section in ("network:", "doors:", "limits:", "security:", "storage:", "running:"):
        assert f"\n{section}\n" in text, section
    flat = " ".join(text.split())
    for number in (MAX_FRAME, MAX_TEXT, MAX_OUTBUF):
        assert f"default: {number}" in flat, number


def test_the_readme_and_docs_describe_the_derived_defaults() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    protocol = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    for text in (readme, protocol):
        assert "max_outbuf / 4" in text and f"(max_frame - {ENVELOPE}) / 4" in text
        assert f"4 x max_text + {ENVELOPE}" in text
    assert "## Options" in protocol


# --- property: whatever parse_args accepts, the server can live with ----------------------------

_printable = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=3000)
_seconds = st.floats(min_value=0.001, max_value=SECONDS_MAX, allow_nan=False)
_OPTIONS = {
    "--max-frame": st.one_of(st.integers(1, 5000), st.integers(1, 1 << 22)),
    "--max-text": st.one_of(st.integers(1, 1200), st.integers(1, 1 << 20)),
    "--max-outbuf": st.one_of(st.integers(1, 20000), st.integers(1, 1 << 24)),
    "--motd": _printable,
    "--ping-interval": _seconds,
    "--ping-timeout": _seconds,
    "--rate": st.sampled_from([0.0, 10.0, 0.123456789, 1e300]),
    "--burst": st.sampled_from([1, 20, 10**12]),
}


@st.composite
def option_sets(draw: st.DrawFn) -> Tuple[List[str], Dict[str, object]]:
    chosen = draw(st.lists(st.sampled_from(sorted(_OPTIONS)), unique=True))
    values = {flag: draw(_OPTIONS[flag]) for flag in chosen}
    return [f"{flag}={value}" for flag, value in values.items()], values


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option_sets())
def test_whatever_parse_args_accepts_the_server_can_rely_on(case: Tuple[List[str], Dict[str, object]]) -> None:
    argv, values = case
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            c = parse_args(argv)
    except SystemExit as exit_info:
        assert exit_info.code == 2
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("selchat-server: "), lines
        named = set(re.findall(r"--[a-z-]+", lines[0]))
        assert named and named <= set(values), (lines[0], values)  # only options given
        return
    assert_invariants(c)
    for flag, value in values.items():
        field = flag[2:].replace("-", "_")
        assert getattr(c, field) == value, (flag, getattr(c, field), value)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 1 << 22))
def test_max_frame_alone_is_accepted_from_the_smallest_frame_up(max_frame: int) -> None:
    if max_frame < min_frame_for(1):
        refused(["--max-frame", str(max_frame)])
        return
    c = parse_args(["--max-frame", str(max_frame)])
    assert c.max_text == min(MAX_TEXT, (max_frame - ENVELOPE) // 4)
    assert_invariants(c)


@settings(max_examples=100, deadline=None)
@given(st.integers(4 * min_frame_for(1) + 100, 1 << 24))
def test_max_outbuf_alone_is_accepted_above_a_few_small_frames(max_outbuf: int) -> None:
    c = parse_args(["--max-outbuf", str(max_outbuf)])
    assert c.max_frame == min(MAX_FRAME, max_outbuf // 4)
    assert_invariants(c)


# --- the real server starts with one option and announces the derived values ------------------


@pytest.mark.parametrize("option, value", [("--max-frame", "1024"), ("--max-outbuf", "65536")])
def test_the_server_starts_with_one_option_and_announces_the_derived_limits(start_server, option: str,
                                                                             value: str) -> None:
    expected = parse_args(["--port", "0", "--db", ":memory:", option, value])
    srv = start_server(option, value)  # fails unless "listening on 127.0.0.1:PORT" comes in time
    c = srv.client()
    welcome = c.register(unique_nick("cfg"), ref="r" * 20)
    assert welcome["limits"]["max_frame"] == expected.max_frame
    assert welcome["limits"]["max_text"] == expected.max_text
    assert welcome["motd"] == expected.motd
    say = "é" * expected.max_text  # a full-length message is carried
    c.send(type="say", room="#lobby", text=say, ref=1)
    c.expect("message", room="#lobby", text=say, ref=1)
    c.send(type="say", room="#lobby", text=say + "x", ref=2)
    c.expect_error("bad_text", ref=2)


def test_the_server_refuses_two_contradicting_options_in_one_line() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "selchat.server", "--port", "0", "--db", ":memory:",
         "--max-frame", "1024", "--max-text", "4096"],
        cwd=str(ROOT), env=server_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=20,
    )
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"selchat-server: --max-frame 1024 is too small for --max-text 4096 (needs at least {min_frame_for(4096)})"]


@pytest.mark.parametrize("url", ["http://127.0.0.1", "redis://127.0.0.1/x",
                                 "redis://no-such-host.invalid:6379"])
def test_a_bad_redis_url_is_one_line(url: str) -> None:
    line = refused(["--redis", url])
    assert "--redis" in line
