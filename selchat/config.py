"""The server's settings and its command line; the one place where options and their defaults meet."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, replace
from typing import AbstractSet, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from selchat import SERVER_NAME
from selchat.ops.configfile import ConfigError
from selchat.defaults import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    HANDSHAKE_TIMEOUT,
    HISTORY_ON_JOIN,
    MAX_FRAME,
    MAX_OUTBUF,
    MAX_PRESENCE,
    MAX_TEXT,
    NICK_MAX,
    PING_INTERVAL,
    PING_TIMEOUT,
    SHUTDOWN_GRACE,
    RATE,
    BURST,
    MAX_CLIENTS,
    MAX_ACCOUNTS,
    MAX_PER_IP,
    REGISTER_RATE,
    REGISTER_BURST,
    MOTD,
    FRAME_LENGTH_MAX,
    TEXT_LIMIT_MAX,
    SECONDS_MAX,
)

log = logging.getLogger(__name__)

DEFAULT_DB = "selchat.db"


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_frame: int = MAX_FRAME
    max_text: int = MAX_TEXT
    max_outbuf: int = MAX_OUTBUF
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    max_presence: int = MAX_PRESENCE
    motd: str = MOTD
    log_level: str = "info"
    shutdown_grace: float = SHUTDOWN_GRACE
    db: str = DEFAULT_DB
    history_on_join: int = HISTORY_ON_JOIN
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    password_file: Optional[str] = None
    rate: float = RATE
    burst: int = BURST
    max_clients: int = MAX_CLIENTS
    max_per_ip: int = MAX_PER_IP
    register_rate: float = REGISTER_RATE
    register_burst: int = REGISTER_BURST
    irc_port: Optional[int] = None
    server_name: str = ""  # the IRC server name; "" means the machine's host name
    web_port: Optional[int] = None  # HTTP and WebSocket (the web client); off unless given
    web_origin: Tuple[str, ...] = ()  # origins allowed to open a WebSocket besides the server's own
    trusted_proxy: Tuple[str, ...] = ()  # addresses or CIDR blocks of proxies that say who the client is
    forwarded_header: str = "x-forwarded-for"  # which header a trusted proxy names the client in
    operators: Optional[str] = None  # file naming the server operators' accounts, one a line
    registration: bool = True  # whether `register` makes new accounts
    max_accounts: int = MAX_ACCOUNTS  # accounts kept (each lives in memory); past it, closed
    kdf_workers: int = 1  # processes that hash and check passwords; 0: in the loop (tests)
    metrics_port: Optional[int] = None  # Prometheus metrics and the health check; off unless given
    redis: Optional[str] = None  # redis://host:port[/db]: one chat with every process on that Redis
    config: Optional[str] = None  # --config: the TOML file these came from (SIGHUP reads it again)

    @property
    def high_water(self) -> int:
        """Above this many queued bytes we stop reading the client's requests."""
        return max(self.max_outbuf // 4, 1)

    @property
    def low_water(self) -> int:
        """Below this we read again (a gap between the marks avoids flapping)."""
        return self.high_water // 4


def min_frame_for(max_text: int) -> int:
    """The smallest max_frame that still carries a `message` of max_text code points.

    UTF-8 takes at most 4 bytes per code point, and JSON escaping of the allowed characters
    (quote, backslash, tab, newline) at most 2; then the envelope (names, id, ts) and room for
    at least a small `ref` (a larger max_frame leaves room for larger refs: `ref_limit`).
    """
    from selchat.doors.framed.protocol import ANSWER_ENVELOPE, REF_MIN_BYTES

    return 4 * max_text + ANSWER_ENVELOPE + REF_MIN_BYTES


def welcome_size(config: "ServerConfig") -> int:
    """Bytes of the largest `welcome` this configuration can send (longest nick and ref).

    Measured on the wire form that docs/protocol.md gives for `welcome`, built here rather than
    through the frame protocol's event records, so that reshaping those records cannot silently
    move the limits the server starts with.
    """
    from selchat.doors.framed.codec import encode_json
    from selchat.doors.framed.protocol import ref_limit

    limits: Dict[str, Any] = {"max_frame": config.max_frame, "max_text": config.max_text}
    if config.rate:
        limits["rate"] = config.rate
        limits["burst"] = config.burst
    longest_ref = "r" * max(0, ref_limit(config.max_frame, config.max_text) - 2)  # JSON adds 2 quotes
    welcome = {"type": "welcome", "nick": "N" * NICK_MAX, "server": SERVER_NAME, "motd": config.motd,
               "limits": limits, "ref": longest_ref}
    return len(encode_json(welcome))


class OptionConflict(ValueError):
    """Options given on the command line that cannot all hold; str() is the line to print."""


class _Refused(Exception):
    """A check of the derivation failed: `option` is too small for `others` (all given)."""

    def __init__(self, option: str, others: Sequence[str] = ()) -> None:
        super().__init__(option)
        self.option = option
        self.others = tuple(others)


# The options whose defaults follow from other options (see derive_limits).
DERIVED_OPTIONS = ("max_frame", "max_text", "max_outbuf", "motd", "ping_interval", "ping_timeout")


def derive_limits(config: ServerConfig, given: AbstractSet[str]) -> ServerConfig:
    """The values in force: those in `given` (field names) as the operator gave them, the rest
    derived from them, so that every option works on its own.

    Rules (an option that was given is never changed):

      option           when not given
      ---------------  ----------------------------------------------------------------
      --max-frame      65536, raised to what --max-text needs (4 x max_text + 215),
                       lowered to max_outbuf / 4 when --max-outbuf is given, and raised
                       until the welcome fits (the --motd given and the longest ref)
      --max-text       4096, lowered to the most one message frame carries:
                       (max_frame - 215) / 4
      --max-outbuf     1048576, raised to 4 x max_frame
      --motd           "Welcome to selchat.", dropped (empty) when the welcome would not fit
      --ping-interval  60, lowered to half a given --ping-timeout of 60 or less
      --ping-timeout   120, raised to twice a given --ping-interval of 120 or more

    Only options given can conflict; the server then stops at start with one line naming them
    and what would do (exit status 2):

      --max-frame below 4 x --max-text + 215; --max-outbuf below 4 x --max-frame, or below
      4 x what --max-text or --motd need; a --max-frame that cannot hold the welcome (with the
      --motd given); --ping-timeout not longer than --ping-interval; and, alone, a --max-frame
      (or a quarter of --max-outbuf) too small for a one-character message and the welcome.
    """
    try:
        return _derive(config, given)
    except _Refused as refused:
        raise OptionConflict(_refusal_line(config, given, refused)) from None


def _derive(config: ServerConfig, given: AbstractSet[str]) -> ServerConfig:
    c = replace(config)
    _derive_ping(c, given)
    gf, gt, go, gm = (name in given for name in ("max_frame", "max_text", "max_outbuf", "motd"))
    # The largest max_frame the options allow: a quarter of the output cap keeps one answer
    # (a frame) from ever dropping a client that reads (backpressure starts at a quarter).
    cap = min(FRAME_LENGTH_MAX, c.max_outbuf // 4) if go else FRAME_LENGTH_MAX
    if gf:
        if go and c.max_outbuf < 4 * c.max_frame:
            raise _Refused("max_outbuf", ("max_frame",))
        if gt and c.max_frame < min_frame_for(c.max_text):
            raise _Refused("max_frame", ("max_text",))
    else:
        frame = max(MAX_FRAME, min_frame_for(c.max_text)) if gt else MAX_FRAME
        if frame > cap:
            if gt and min_frame_for(c.max_text) > cap:
                raise _Refused("max_outbuf", ("max_text",))
            frame = cap
        c.max_frame = frame
    if not gt:
        c.max_text = min(MAX_TEXT, (c.max_frame - min_frame_for(0)) // 4)
        if c.max_text < 1:
            raise _Refused("max_frame" if gf else "max_outbuf")
    if not gm and welcome_size(c) > c.max_frame:
        c.motd = ""
    if welcome_size(c) > c.max_frame:
        others = [name for name in ("max_text", "motd") if name in given]
        if gf:
            raise _Refused("max_frame", others)
        frame = _frame_for_welcome(c)
        if frame > cap:
            raise _Refused("max_outbuf", others) if go else _Refused(others[-1] if others else "max_frame")
        c.max_frame = frame
    if not go:
        c.max_outbuf = max(MAX_OUTBUF, 4 * c.max_frame)
    return c


def _derive_ping(c: ServerConfig, given: AbstractSet[str]) -> None:
    """Keep the default ratio (timeout = 2 x interval) when only one of the two is given."""
    ratio = PING_TIMEOUT / PING_INTERVAL
    interval_given, timeout_given = "ping_interval" in given, "ping_timeout" in given
    if interval_given and timeout_given:
        if c.ping_timeout <= c.ping_interval:
            raise OptionConflict(f"--ping-timeout {_number_text(c.ping_timeout)} must be longer than "
                                 f"--ping-interval {_number_text(c.ping_interval)}")
    elif interval_given:
        if c.ping_interval >= c.ping_timeout:
            c.ping_timeout = c.ping_interval * ratio
    elif timeout_given:
        if c.ping_timeout <= c.ping_interval:
            c.ping_interval = c.ping_timeout / ratio


def _frame_for_welcome(c: ServerConfig) -> int:
    """The smallest max_frame from c.max_frame up whose welcome fits, max_text kept.

    While refs are below their cap, a larger frame allows a longer ref in the welcome and the
    welcome grows with the frame: no frame fits until the ref reaches its cap, so start there.
    """
    from selchat.doors.framed.protocol import ANSWER_ENVELOPE, REF_MAX_BYTES

    probe = replace(c, max_frame=max(c.max_frame, 4 * c.max_text + ANSWER_ENVELOPE + REF_MAX_BYTES))
    while True:
        size = welcome_size(probe)
        if size <= probe.max_frame:
            return probe.max_frame
        probe.max_frame = size


def _refusal_line(config: ServerConfig, given: AbstractSet[str], refused: _Refused) -> str:
    """One line: which given option is too small, for which others, and a value that would do."""
    line = f"{_describe(config, refused.option)} is too small"
    if refused.others:
        line += " for " + " and ".join(_describe(config, name) for name in refused.others)
    need = _least_accepted(config, given, refused.option) if refused.option != "motd" else None
    if need is not None:
        line += f" (needs at least {need})"
    return line


def _describe(config: ServerConfig, name: str) -> str:
    if name == "motd":
        return f"--motd of {len(config.motd.encode('utf-8'))} bytes"
    return f"{_flag(name)} {getattr(config, name)}"


def _least_accepted(config: ServerConfig, given: AbstractSet[str], name: str) -> Optional[int]:
    """The smallest value of option `name` (with the others as given) the derivation accepts.

    Found by search rather than by formula so the number printed is one that works. Acceptance
    grows with the value except at rare digit-count steps; the search returns a value that was
    accepted in any case.
    """
    given = set(given) | {name}

    def accepted(value: int) -> bool:
        try:
            _derive(replace(config, **{name: value}), given)
        except (_Refused, OptionConflict):
            return False
        return True

    low = getattr(config, name)
    limit = FRAME_LENGTH_MAX if name == "max_frame" else 4 * FRAME_LENGTH_MAX
    high = max(2 * low, 1)
    while not accepted(min(high, limit)):
        if high >= limit:
            return None
        high *= 2
    high = min(high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        if accepted(middle):
            high = middle
        else:
            low = middle
    return high


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (with a pointer to --help), not a screenful of usage; or, when
    `raising` (a reload), the line as a ConfigError, for the running server to log."""

    raising = False

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        if self.raising:
            raise ConfigError(message)
        self.exit(2, f"{self.prog}: {message} (see --help)\n")

    def fail(self, line: str) -> "NoReturn":
        """Stop with `line` (exit status 2), or raise it when `raising`."""
        if self.raising:
            raise ConfigError(line)
        self.exit(2, f"{self.prog}: {line}\n")

    def _get_values(self, action: argparse.Action, arg_strings: List[str]) -> Any:
        # argparse drops a "--" given as an option's value (`--motd=--`) and hands the option
        # an empty list instead of a string, which no check after expects: refuse it here.
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument, "
                       "not '--'")
        return super()._get_values(action, arg_strings)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """One line an option where the terminal allows: its default after it (none for options
    that are off, or derived, unless their help says it)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=max(100, _terminal_width()))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" not in text and default not in (None, False, (), "", argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns


# The sections of --help; an option not named here is listed under "other".
HELP_GROUPS = (
    ("network", ("host", "port", "irc_port", "web_port", "metrics_port", "trusted_proxy",
                 "forwarded_header")),
    ("doors", ("server_name", "web_origin", "motd", "handshake_timeout", "ping_interval",
               "ping_timeout")),
    ("limits", ("max_frame", "max_text", "max_outbuf", "rate", "burst", "max_clients", "max_per_ip",
                "register_rate", "register_burst", "max_presence", "history_on_join")),
    ("security", ("tls_cert", "tls_key", "password_file", "operators", "registration", "max_accounts",
                  "kdf_workers")),
    ("storage", ("db", "backup", "redis")),
    ("running", ("config", "check_config", "log_level", "shutdown_grace")),
)

_EPILOG = ("* derived from the other limits when not given: docs/protocol.md, \"Options\".\n"
           "Every option is also a key of --config FILE.toml (docs/selchat.example.toml).")


def _group_options(parser: argparse.ArgumentParser) -> None:
    """Sort the options into the sections of HELP_GROUPS (only how --help lays them out)."""
    section_of = {dest: title for title, dests in HELP_GROUPS for dest in dests}
    sections = {title: parser.add_argument_group(title) for title, _ in HELP_GROUPS}
    other = None
    general = parser._optionals
    for action in list(general._group_actions):
        if action.dest == "help":
            continue
        if action.metavar is None and action.nargs != 0:  # short names keep each option one line
            if action.choices is not None:
                choices = "|".join(map(str, action.choices))
                if len(choices) > 14:
                    action.help = f"{action.help} ({', '.join(map(str, action.choices))})"
                    choices = "WORD"
                action.metavar = choices
            elif action.dest == "port" or action.dest.endswith("_port"):
                action.metavar = "PORT"
            elif action.dest in ("host", "db"):
                action.metavar = "ADDRESS" if action.dest == "host" else "FILE"
            else:
                action.metavar = "N" if action.type not in (None, str) else "TEXT"
        title = section_of.get(action.dest)
        if title is None:
            if other is None:
                other = parser.add_argument_group("other")
            group = other
        else:
            group = sections[title]
        general._group_actions.remove(action)
        group._group_actions.append(action)


def _int_in(minimum: int, maximum: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} must be at most {maximum}")
        return value

    return parse


_positive_int = _int_in(1)
_non_negative_int = _int_in(0)


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535; 0 picks a free one)")
    return value


def _number(what: str, zero_allowed: bool, maximum: float = float("inf")) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number{what}") from None
        if not (value >= 0 if zero_allowed else value > 0) or value == float("inf"):
            bound = "0 (off) or a positive number" if zero_allowed else f"a positive number{what}"
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{text} must be at most {_number_text(maximum)}")
        return value

    return parse


# Seconds are bounded: a timer that far off would ask the selector for a wait it cannot express
# (epoll takes at most 2**31 - 1 ms), and the derived ping timeout is twice a given interval.
_seconds = _number(" of seconds", zero_allowed=False, maximum=SECONDS_MAX)
_rate = _number("", zero_allowed=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="selchat-server",
        description=f"{SERVER_NAME}: a multi-user chat server (one thread, one selectors loop).",
        epilog=_EPILOG,
        formatter_class=_HelpFormatter,
    )
    d = ServerConfig()
    derived = argparse.SUPPRESS  # no default here: derive_limits must see which options were given
    p.add_argument("--host", default=d.host,
                   help="address to listen on (0.0.0.0 or :: for the network)")
    p.add_argument("--port", type=_port, default=d.port, help="native protocol port (0: a free one)")
    p.add_argument("--max-frame", type=_int_in(1, FRAME_LENGTH_MAX), default=derived,
                   help=f"largest frame in bytes (default: {d.max_frame}, or derived *)")
    p.add_argument("--max-text", type=_int_in(1, TEXT_LIMIT_MAX), default=derived,
                   help=f"longest message in code points (default: {d.max_text}, or derived *)")
    p.add_argument("--max-outbuf", type=_positive_int, default=derived,
                   help=f"bytes queued for a client before it is dropped (default: {d.max_outbuf}, or derived *)")
    p.add_argument("--handshake-timeout", type=_seconds, default=d.handshake_timeout,
                   help="seconds a new connection has to register")
    p.add_argument("--ping-interval", type=_seconds, default=derived,
                   help=f"seconds of silence before a ping (default: {_number_text(d.ping_interval)}, or derived *)")
    p.add_argument("--ping-timeout", type=_seconds, default=derived,
                   help=f"seconds of silence before a disconnect (default: {_number_text(d.ping_timeout)}, or derived *)")
    p.add_argument("--max-presence", type=_non_negative_int, default=d.max_presence,
                   help="rooms bigger than this stop announcing join/part/quit")
    p.add_argument("--motd", default=derived,
                   help=f"message of the day (default: {d.motd!r}, or none if it cannot fit *)")
    p.add_argument("--shutdown-grace", type=_seconds, default=d.shutdown_grace,
                   help="seconds to flush clients' queues at shutdown")
    p.add_argument("--db", default=d.db,
                   help="SQLite history file, made if missing (:memory: keeps nothing)")
    p.add_argument("--history-on-join", type=_non_negative_int, default=d.history_on_join,
                   help="room messages a client gets when it joins")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="PEM certificate chain: TLS on the native port (with --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the server password")
    p.add_argument("--operators", metavar="FILE",
                   help="file of the server operators' accounts, one a line")
    p.add_argument("--registration", choices=("open", "closed"), default="open",
                   help="whether anyone may register an account")
    p.add_argument("--max-accounts", type=_positive_int, default=d.max_accounts,
                   help="accounts the server keeps; past it `register` answers registration_closed")
    p.add_argument("--kdf-workers", type=_non_negative_int, default=d.kdf_workers,
                   help="processes hashing passwords off the loop (0: in the loop)")
    p.add_argument("--rate", type=_rate, default=d.rate,
                   help="requests a second per client, on average (0: no flood control)")
    p.add_argument("--burst", type=_positive_int, default=d.burst,
                   help="requests a client may send at once")
    p.add_argument("--max-clients", type=_positive_int, default=d.max_clients,
                   help="connections in all (more get server_full)")
    p.add_argument("--max-per-ip", type=_non_negative_int, default=d.max_per_ip,
                   help="connections from one address (0: no limit)")
    p.add_argument("--register-rate", type=_rate, default=d.register_rate,
                   help="registrations a second per address past its burst (0: no pacing)")
    p.add_argument("--register-burst", type=_positive_int, default=d.register_burst,
                   help="registrations from one address at once")
    p.add_argument("--irc-port", type=_port, default=None, metavar="PORT",
                   help="also speak IRC on this port (0: a free one)")
    p.add_argument("--server-name", default="", metavar="NAME",
                   help="the server's name on IRC (default: this machine's host name)")
    p.add_argument("--web-port", type=_port, default=None, metavar="PORT",
                   help="also serve the web client and its WebSocket on this port")
    p.add_argument("--web-origin", action="append", default=None, metavar="ORIGIN",
                   help="another origin whose pages may open the WebSocket; repeatable")
    p.add_argument("--trusted-proxy", action="append", default=None, metavar="CIDR",
                   help="a proxy (address or CIDR) believed about who the client is; repeatable")
    p.add_argument("--forwarded-header", choices=["x-forwarded-for", "forwarded"],
                   default=d.forwarded_header,
                   help="the header a trusted proxy names web clients in")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="redis://[:password@]host[:port][/db]: share one chat with every "
                        "selchat process on that Redis (docs/cluster.md)")
    p.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                   help="serve /metrics (Prometheus) and /healthz on this port")
    p.add_argument("--log-level", default=d.log_level,
                   choices=["debug", "info", "warning", "error", "critical"], help="logging threshold")
    p.add_argument("--config", metavar="FILE",
                   help="read options from this TOML file (the command line wins)")
    p.add_argument("--check-config", action="store_true",
                   help="print the values in force, and where each came from, and exit")
    p.add_argument("--backup", metavar="FILE",  # (the last option: _group_options follows)
                   help="copy the history database to FILE, even while a server runs, and exit")
    _group_options(p)
    return p


def _given_only(argv: Optional[List[str]]) -> Dict[str, Any]:
    """The options given on the command line, and nothing else (no defaults): argparse sets a
    default only where the namespace has nothing yet, so what still holds the mark was not
    given. (This parse is also the one that answers --help.)"""
    parser = build_parser()
    unset = object()
    repeatable = {action.dest for action in parser._actions if isinstance(action, argparse._AppendAction)}
    namespace = argparse.Namespace(**{action.dest: None if action.dest in repeatable else unset
                                      for action in parser._actions if action.dest != "help"})
    given = vars(parser.parse_args(argv, namespace=namespace))  # (a list grows from None)
    return {dest: value for dest, value in given.items()
            if value is not unset and not (dest in repeatable and value is None)}


def _has_control_characters(text: str) -> bool:
    from selchat.core.names import has_control_characters

    return has_control_characters(text)


def parse_args(argv: Optional[List[str]] = None, raising: bool = False,
               command: Optional[Dict[str, Any]] = None) -> ServerConfig:
    """The configuration in force: the defaults, then the --config file's settings, then the
    options given on the command line, and the defaults derived from them.

    Exits with status 2 and one line on stderr for a bad option, a bad file or options that
    conflict (with `raising`, raises ConfigError with that line instead: a reload). What is
    not a setting (`--backup`, `--check-config`) goes into `command`; `--check-config` prints
    the values in force and exits.
    """
    from selchat.ops import configfile

    parser = build_parser()
    parser.raising = raising
    values = vars(parser.parse_args([]))  # the defaults (none for the derived options)
    cli = _given_only(argv)
    path = cli.get("config")
    file_values: Dict[str, Any] = {}
    if path:
        try:
            file_values = configfile.read(path, parser)
        except ConfigError as error:
            parser.fail(str(error))
    values.update(file_values)
    values.update(cli)
    flags = {action.dest: key for key, action in configfile.file_options(parser).items()}

    def where(dest: str) -> str:
        """How the operator gave `dest`: a flag, or the file and its key."""
        if dest in file_values and dest not in cli:
            return f"{path}: {flags.get(dest, dest)}"
        return "--" + flags.get(dest, dest)

    check = bool(values.pop("check_config", False))
    backup = values.pop("backup", None)
    if command is not None:
        command.update(check_config=check, backup=backup, given=cli, file_values=file_values)
    given = frozenset(name for name in DERIVED_OPTIONS if name in values)
    values["web_origin"] = tuple(values.get("web_origin") or ())
    values["trusted_proxy"] = tuple(values.get("trusted_proxy") or ())
    if "registration" in values:
        values["registration"] = values["registration"] != "closed"
    config = ServerConfig(**values)  # options not given take the dataclass defaults
    if (config.tls_cert is None) != (config.tls_key is None):
        parser.error(f"{where('tls_cert' if config.tls_cert else 'tls_key')}: --tls-cert and "
                     "--tls-key go together" if path else "--tls-cert and --tls-key go together")
    if _has_control_characters(config.motd):
        parser.error(f"{where('motd')} must be printable text (no control characters but newline and tab)")
    if config.server_name and (len(config.server_name) > 63 or any(
            not (ch.isascii() and (ch.isalnum() or ch in ".-_")) for ch in config.server_name)):
        parser.error(f"{where('server_name')} {config.server_name[:70]!r} must be a host name "
                     "(letters, digits, '.', '-', '_'; at most 63)")
    if config.web_origin:
        from selchat.doors.web.http import parse_origin

        for origin in config.web_origin:
            if parse_origin(origin) is None:
                parser.error(f"{where('web_origin')} {origin[:70]!r} must be scheme://host[:port] "
                             "(http or https, nothing after the port)")
    from selchat.loop.proxyproto import parse_network

    if config.redis is not None:
        from selchat.links.redis import RedisAddress
        try:
            RedisAddress(config.redis)
        except ValueError as exc:
            parser.error(f"{where('redis')} {config.redis[:70]!r}: {exc}")
    for network in config.trusted_proxy:
        try:
            parse_network(network)
        except ValueError:
            parser.error(f"{where('trusted_proxy')} {network[:70]!r} must be an address or a CIDR block "
                         "(192.0.2.10, 10.0.0.0/8, fd00::/8)")
    try:
        config = derive_limits(config, given)
    except OptionConflict as conflict:
        parser.fail(f"{path}: {conflict}" if path and not (given & set(cli)) else str(conflict))
    if check:
        derived = tuple(name for name in DERIVED_OPTIONS if name not in given)
        sources = configfile.sources_of(values, file_values, cli, path, derived)
        sys.stdout.write(configfile.render(config, sources, parser))
        parser.exit(0)
    log.debug("limits in force: max_frame=%d max_text=%d max_outbuf=%d ping %g/%g s",
              config.max_frame, config.max_text, config.max_outbuf,
              config.ping_interval, config.ping_timeout)
    return config
