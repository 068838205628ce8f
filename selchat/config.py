"""The server's settings and its command line; the one place where options and their defaults meet."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, List, NoReturn, Optional

from selchat import SERVER_NAME
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
    MAX_PER_IP,
)

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
    motd: str = "Welcome to selchat."
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
    """Bytes of the largest `welcome` this configuration can send (longest nick and ref)."""
    from selchat.core import events
    from selchat.doors.framed.protocol import encode_event, ref_limit

    welcome = events.Welcome("N" * NICK_MAX, SERVER_NAME, config.motd, config.max_frame,
                             config.max_text, config.rate, config.burst)
    longest_ref = "r" * (ref_limit(config.max_frame, config.max_text) - 2)
    (frame,) = encode_event(welcome, longest_ref, 1 << 30)
    return len(frame) - 4


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (with a pointer to --help), not a screenful of usage."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535; 0 picks a free one)")
    return value


def _number(what: str, zero_allowed: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number{what}") from None
        if not (value >= 0 if zero_allowed else value > 0) or value == float("inf"):
            bound = "0 (off) or a positive number" if zero_allowed else f"a positive number{what}"
            raise argparse.ArgumentTypeError(f"{text} must be {bound}")
        return value

    return parse


_seconds = _number(" of seconds", zero_allowed=False)
_rate = _number("", zero_allowed=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="selchat-server",
        description=f"{SERVER_NAME}: a multi-user chat server (one thread, one selectors loop).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = ServerConfig()
    p.add_argument("--host", default=d.host,
                   help="address to listen on; 0.0.0.0 (or ::) to accept clients from the network")
    p.add_argument("--port", type=_port, default=d.port, help="TCP port; 0 picks a free one")
    p.add_argument("--max-frame", type=_positive_int, default=d.max_frame,
                   help="largest frame payload in bytes, both directions")
    p.add_argument("--max-text", type=_positive_int, default=d.max_text,
                   help="longest message text in Unicode code points")
    p.add_argument("--max-outbuf", type=_positive_int, default=d.max_outbuf,
                   help="bytes queued for one client before it is dropped as a slow consumer")
    p.add_argument("--handshake-timeout", type=_seconds, default=d.handshake_timeout,
                   help="seconds a new connection has to complete hello")
    p.add_argument("--ping-interval", type=_seconds, default=d.ping_interval,
                   help="seconds of silence from a client before the server pings it")
    p.add_argument("--ping-timeout", type=_seconds, default=d.ping_timeout,
                   help="seconds of silence after which the client is disconnected")
    p.add_argument("--max-presence", type=_non_negative_int, default=d.max_presence,
                   help="rooms with more members than this stop broadcasting join/part/quit")
    p.add_argument("--motd", default=d.motd, help="message of the day sent in welcome")
    p.add_argument("--shutdown-grace", type=_seconds, default=d.shutdown_grace,
                   help="seconds to flush queued output to clients at shutdown")
    p.add_argument("--db", default=d.db,
                   help="SQLite file for room history, created if missing; ':memory:' keeps nothing")
    p.add_argument("--history-on-join", type=_non_negative_int, default=d.history_on_join,
                   help="room messages sent to a client right after it joins")
    p.add_argument("--tls-cert", metavar="FILE",
                   help="PEM certificate (chain) file: speak TLS on the port (needs --tls-key)")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key file for --tls-cert")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the server password; hello must carry it")
    p.add_argument("--rate", type=_rate, default=d.rate,
                   help="requests per second each client may send on average; 0 turns flood control off")
    p.add_argument("--burst", type=_positive_int, default=d.burst,
                   help="requests a client may send at once before --rate applies")
    p.add_argument("--max-clients", type=_positive_int, default=d.max_clients,
                   help="connections in all; more get server_full")
    p.add_argument("--max-per-ip", type=_non_negative_int, default=d.max_per_ip,
                   help="connections from one address; more get too_many_connections; 0 = no limit")
    p.add_argument("--log-level", default=d.log_level,
                   choices=["debug", "info", "warning", "error", "critical"], help="logging threshold")
    return p


def parse_args(argv: Optional[List[str]] = None) -> ServerConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    config = ServerConfig(**vars(ns))
    if config.max_frame < min_frame_for(config.max_text):
        parser.error(
            f"--max-frame {config.max_frame} is too small for --max-text {config.max_text}: "
            f"needs at least {min_frame_for(config.max_text)}"
        )
    if config.max_outbuf < 4 * config.max_frame:
        # Backpressure stops serving a client at a quarter of max_outbuf; that quarter must hold
        # the largest single answer (a frame), or a client that reads could be dropped for one.
        parser.error(f"--max-outbuf {config.max_outbuf} must be at least 4 x --max-frame "
                     f"({4 * config.max_frame})")
    if (config.tls_cert is None) != (config.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if config.ping_timeout <= config.ping_interval:
        parser.error("--ping-timeout must be longer than --ping-interval")
    from selchat.doors.framed.protocol import has_control_characters

    if has_control_characters(config.motd):
        parser.error("--motd must be printable text (no control characters but newline and tab)")
    if welcome_size(config) > config.max_frame:
        parser.error(f"--motd is too long for --max-frame {config.max_frame} "
                     f"(welcome would take {welcome_size(config)} bytes)")
    return config
