"""Every default and limit in one place, shared by the CLI help, the server, the tests and the docs."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator asks for more, as Redis does
DEFAULT_PORT = 9090
LOBBY = "#lobby"

MAX_FRAME = 65536  # payload bytes in one frame
MAX_TEXT = 4096  # code points in one message text
MAX_OUTBUF = 1 << 20  # bytes the server holds for one slow client before dropping it
HANDSHAKE_TIMEOUT = 10.0  # seconds from connect to a successful hello
PING_INTERVAL = 60.0  # seconds of silence before the server pings
PING_TIMEOUT = 120.0  # seconds of silence before the server gives up
MAX_PRESENCE = 500  # above this many members a room stops broadcasting join/part/quit
SHUTDOWN_GRACE = 5.0  # seconds to flush queued output at shutdown
LINGER_TIMEOUT = 2.0  # seconds a closing connection may keep draining input after our last byte

NICK_MAX = 32
ROOM_MAX = 50  # characters after the '#'
NAMES_CHUNK = 1000  # nicks in one `names` event at most
HISTORY_ON_JOIN = 50
HISTORY_LIMIT_DEFAULT = 50
HISTORY_LIMIT_MAX = 200

RECV_SIZE = 65536  # one recv per readable event; a pass never holds more than this per client
LISTEN_BACKLOG = 4096
ACCEPT_PER_PASS = 32  # accepts per loop pass, so a storm cannot starve clients already connected
REQUESTS_PER_PASS = 256  # requests one loop pass serves in all; the rest wait for the next pass
# (64 kept passes shorter but split the fan-out's batches: 0.84x at R=1000; benchmarks/RESULTS.md)
ACCEPT_PAUSE = 0.1  # seconds to stop accepting after EMFILE/ENFILE
MAX_ROOMS = 10000  # rooms that may exist at once
MAX_ROOMS_PER_USER = 100  # rooms one user may be in
CLIENT_NAME_MAX = 64  # code points of the free-text `client` member kept for logs

RATE = 10.0  # requests per second per connection, on average (0 turns flood control off)
BURST = 20  # requests a connection may send at once
MAX_CLIENTS = 10000  # connections in all, registered or not
# Accounts kept (each lives in memory for the directory, for ever): past it, `register` answers
# registration_closed and logs it (--max-accounts raises it).
MAX_ACCOUNTS = 100_000
MAX_PER_IP = 16  # connections from one address (0: no limit)
REGISTER_RATE = 10.0  # registrations per second from one address past its burst (0: no pacing)
REGISTER_BURST = 32  # registrations from one address at once

# Bounds of the options themselves (selchat.config checks them; see docs/protocol.md, "Options").
MOTD = "Welcome to selchat."  # dropped when it cannot fit in the welcome and --motd was not given
FRAME_LENGTH_MAX = (1 << 32) - 1  # a frame's length prefix is 4 bytes: no max_frame above this
TEXT_LIMIT_MAX = 1 << 28  # --max-text at most this (its frames stay well under FRAME_LENGTH_MAX)
SECONDS_MAX = 1_000_000.0  # seconds options at most this (~11.6 days): twice it still fits epoll's timeout
