"""The message store: room history that survives restarts (docs/protocol.md, "History").

Sans sockets and sans clocks: messages arrive with their id and timestamp already set by the
chat state, and the store only keeps them. The server loop drives it:

* the chat state calls `add()` for every room message it accepts (cheap, no I/O);
* once per loop pass, *before* any of those messages is written to a client socket, the loop
  calls `commit()`, which writes the whole batch in one transaction;
* `recent()` answers history questions and also sees messages added but not committed yet,
  because the chat state may be asked for history in the same pass a message was said.

Ids come from `allocate_id()`, room and private messages alike. The store hands them out of
blocks whose end is made durable *before* the first id of the block is returned, so a restart
resumes above every id any earlier run may have handed out, whatever the disk did meanwhile (a
full disk that failed every commit, then SIGKILL). Private messages (`room` is None) are never
stored: a nick is not an account, and whoever takes a nick later must not read what was said to
its last owner.

Two implementations: `SQLiteStore` (the server's) and `MemoryStore` (bounded deques, for tests
and for the chat-state unit tests).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections import deque
from itertools import chain
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Sequence, Set, Tuple

from selchat.core.events import Message

__all__ = [
    "StoreError",
    "ID_BLOCK",
    "MAX_ID",
    "MessageStore",
    "MemoryStore",
    "SQLiteStore",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "APPLICATION_ID",
    "DEFAULT_CAP_PER_ROOM",
]

log = logging.getLogger(__name__)

DEFAULT_CAP_PER_ROOM = 1000
# Ids reserved per durable write: one fsync'd transaction per ID_BLOCK ids, and a restart skips
# at most ID_BLOCK - 1 unused ones. Ids only have to increase, not to be dense. The fsync blocks
# the one loop thread, so reservations are made rare (what the soak run measured with smaller
# blocks: docs/design.md, "One pass of the loop"); 2**63 ids still last longer than any server.
ID_BLOCK = 65536
MAX_ID = (1 << 63) - 1  # SQLite's largest integer, hence the largest id
# Pages (4 KiB each) the WAL may grow to before a checkpoint. A checkpoint copies them into the
# database and syncs it, in the one loop thread: small ones keep every pause short, more often,
# for the same total (the soak run's figures: docs/design.md). The server runs them itself
# (`checkpoint_due`, `checkpoint`) after a pass's writes, so that no message waits for one
# between its commit and its delivery; SQLite's own, inside a commit, is only the backstop at
# WAL_BACKSTOP pages, for a store nobody checkpoints (or an estimate that fell short).
WAL_PAGES = 128
WAL_BACKSTOP = 8 * WAL_PAGES
PAGE_BYTES = 4096
CHECKPOINT_RETRY = 1.0  # seconds after a failed checkpoint before the next is tried
ROW_OVERHEAD = 96  # bytes a row takes beyond its strings, with its index entry (an over-estimate)
CACHE_KIB = 32768  # SQLite's page cache: the hot end of every room's history stays in memory

# `PRAGMA application_id` marks the file as ours, so `--db` pointed at another program's SQLite
# file is refused instead of being given a `messages` table. 0x73656c63 is "selc" in ASCII.
APPLICATION_ID = 0x73656C63

# MIGRATIONS[i] brings a database from schema version i to version i + 1: SQL statements run in
# order inside one transaction, which also sets `PRAGMA user_version`. Append, never edit: a file
# written by an older selchat is upgraded by replaying the steps it has not seen yet. Version 0 is
# an empty file (or one SQLite just created).
Migration = Sequence[str]
MIGRATIONS: Tuple[Migration, ...] = (
    # version 1: the initial schema. `id` is the rowid, so MAX(id) and id ranges are b-tree
    # lookups; (room_key, id) makes a page of one room's history an index range scan.
    (
        "CREATE TABLE messages ("
        " id INTEGER PRIMARY KEY,"
        " room_key TEXT NOT NULL,"  # room.lower(): rooms are case-insensitive
        " room TEXT NOT NULL,"  # the spelling the room had when the message was said
        " ts INTEGER NOT NULL,"  # milliseconds since the Unix epoch, server clock
        " sender TEXT NOT NULL,"
        " text TEXT NOT NULL)",
        "CREATE INDEX messages_room ON messages (room_key, id)",
        f"PRAGMA application_id = {APPLICATION_ID}",
    ),
    # version 2: the highest message id handed out, private messages included. Private messages
    # are never stored, yet their ids must not be handed out again after a restart.
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta (key, value) SELECT 'last_id', COALESCE(MAX(id), 0) FROM messages",
    ),
    # version 3: `reserved_until`, the end of the last block of ids reserved for handing out.
    # Every id handed out is <= it, and it is durable before any id of its block is used, so a
    # restart starts above it. A v2 file starts from its high-water mark (all it knows).
    (
        "INSERT OR IGNORE INTO meta (key, value)"
        " SELECT 'reserved_until', COALESCE(MAX(value), 0) FROM meta WHERE key = 'last_id'",
    ),
    # version 4: what IRC shows of a message beyond its text: the sender's ident@host, and
    # flags (1: an action, "/me"; 2: a notice), so history replays as it was seen live.
    (
        "ALTER TABLE messages ADD COLUMN userhost TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE messages ADD COLUMN flags INTEGER NOT NULL DEFAULT 0",
    ),
    # version 5: accounts and the rooms they run (contract section 11). `account` is the
    # sender's account when logged in. A private conversation between two accounts is kept in
    # `messages` too, under the room key '@a/b' (the two account keys, sorted: '/' is in no
    # name, and room keys start with '#'), its `room` column '@' + the recipient's nick. The
    # mailbox holds what was sent to an account while no connection of it was there, until
    # its next login. `tokens` are SHA-256 digests of the remember-me tokens handed out.
    # `rooms` are the registered ones: their founder and their state (topic, modes, bans,
    # operator accounts) as one JSON object.
    (
        "ALTER TABLE messages ADD COLUMN account TEXT NOT NULL DEFAULT ''",
        "CREATE TABLE accounts (key TEXT PRIMARY KEY, name TEXT NOT NULL,"
        " verifier TEXT NOT NULL, created INTEGER NOT NULL)",
        "CREATE TABLE tokens (digest TEXT PRIMARY KEY, account TEXT NOT NULL,"
        " created INTEGER NOT NULL)",
        "CREATE TABLE rooms (key TEXT PRIMARY KEY, name TEXT NOT NULL, founder TEXT NOT NULL,"
        " state TEXT NOT NULL)",
        "CREATE TABLE mailbox (seq INTEGER PRIMARY KEY, owner TEXT NOT NULL, id INTEGER NOT NULL,"
        " ts INTEGER NOT NULL, sender TEXT NOT NULL, account TEXT NOT NULL,"
        " recipient TEXT NOT NULL, text TEXT NOT NULL, flags INTEGER NOT NULL)",
        "CREATE INDEX mailbox_owner ON mailbox (owner, seq)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT = ("INSERT INTO messages (id, room_key, room, ts, sender, text, userhost, flags, account)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_V4_INSERT = ("INSERT INTO messages (id, room_key, room, ts, sender, text, userhost, flags)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_COLUMNS = "id, ts, sender, text, room, userhost, flags, account"
_V4_COLUMNS = "id, ts, sender, text, room, userhost, flags, ''"
_OLD_COLUMNS = "id, ts, sender, text, room, '', 0, ''"
_OLD_INSERT = ("INSERT INTO messages (id, room_key, room, ts, sender, text)"
               " VALUES (?, ?, ?, ?, ?, ?)")
# Rows per INSERT statement in a commit: one statement of many rows costs SQLite's VM and the
# binding less than executemany's statement per row (about 15% of a 80-message commit); 64 x 9
# columns stays far below the oldest SQLite's 999 variables.
INSERT_CHUNK = 64
_MULTI: Dict[Tuple[str, int], str] = {}


def _insert_rows(conn: sqlite3.Connection, insert: str, rows: List[Tuple[Any, ...]]) -> None:
    """`insert` (one row's VALUES) for every row, INSERT_CHUNK rows a statement."""
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start:start + INSERT_CHUNK]
        n = len(chunk)
        if n == 1:
            conn.execute(insert, chunk[0])
            continue
        statement = _MULTI.get((insert, n))
        if statement is None:
            head, _, values = insert.partition(" VALUES ")
            statement = _MULTI[(insert, n)] = head + " VALUES " + ", ".join([values] * n)
        conn.execute(statement, list(chain.from_iterable(chunk)))


_RECENT = "SELECT {} FROM messages WHERE room_key = ? AND id < ? ORDER BY id DESC LIMIT ?"
_SAVE_LAST_ID = "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_id', ?)"
_SAVE_RESERVED = "INSERT OR REPLACE INTO meta (key, value) VALUES ('reserved_until', ?)"
_NO_UPPER_BOUND = MAX_ID  # "before" when the caller gave None, or anything beyond int64


class StoreError(Exception):
    """The store cannot open or write its database; the message is one line naming the path."""


class MessageStore(Protocol):
    """What the chat state and the server loop need from a store."""

    def last_id(self) -> int:
        """The highest id committed or noted so far, and at least every id an earlier run may
        have handed out (0 if none). Kept for callers that count ids themselves."""

    def allocate_id(self) -> int:
        """The next message id: higher than every id handed out before, in this run or any
        earlier one. StoreError (and no id) when the reservation cannot be made durable."""

    def add(self, message: Message) -> None:
        """Queue a room message for the next `commit()`; no I/O. ValueError for a private one."""

    def note_id(self, message_id: int) -> None:
        """An id was handed out without a stored message (a private one): keep it from being
        handed out again after a restart. Saved by the next `commit()`; no I/O."""

    def commit(self) -> int:
        """Write everything queued in one transaction; return how many. StoreError on failure."""

    def recent(self, room: str, before: Optional[int], limit: int,
               max_bytes: Optional[int] = None) -> Tuple[List[Message], bool]:
        """Up to `limit` messages of `room` with id < `before`, oldest first, and whether older exist."""

    def close(self) -> None:
        """Commit what is queued, then release the database."""


def _check_message(message: Message) -> None:
    """Refuse what must never be stored: the chat state passing one is a bug, hence ValueError."""
    if message.room is None:
        raise ValueError("private messages are never stored")
    if message.to is not None:
        raise ValueError("a room message has no `to`")


def _check_query(before: Optional[int], limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, not {limit}")
    if before is not None and not isinstance(before, int):
        raise TypeError("before must be an int or None")


def _nothing_below(before: Optional[int]) -> bool:
    """Ids start at 1: `before` <= 1 has no answer. Checked in Python first, so a `before` of any
    size (a client may send -2**70) never reaches SQLite, which only binds int64."""
    return before is not None and before <= 1


def _weight(m: Message) -> int:
    """A lower bound of a message's size in an answer: its text, plus its other members."""
    return len(m.text) + len(m.sender) + 48


def _page(newest_first: List[Message], limit: int, max_bytes: Optional[int]) -> Tuple[List[Message], bool]:
    """The newest `limit` messages that weigh at most `max_bytes`, oldest first, and whether
    older ones exist. At least one message is kept (the answer's encoder cuts further)."""
    kept = newest_first[:limit]
    if max_bytes is not None:
        size = 0
        for i, m in enumerate(kept):
            size += _weight(m)
            if size > max_bytes and i > 0:
                kept = kept[:i]
                break
    more = len(newest_first) > len(kept)
    kept.reverse()
    return kept, more


def _row_message(r: Tuple) -> Message:
    flags = r[6]
    room = r[4]
    if room.startswith("@"):  # a private message: its `room` column is '@' + the recipient
        return Message(r[0], r[1], r[2], r[3], None, room[1:], bool(flags & 1), bool(flags & 2),
                       r[5], account=r[7] or None)
    return Message(r[0], r[1], r[2], r[3], room, None, bool(flags & 1), bool(flags & 2), r[5],
                   account=r[7] or None)


def pair_key(a: str, b: str) -> str:
    """Where the private conversation of two accounts (their keys) is kept: '@a/b', sorted."""
    return "@" + "/".join(sorted((a, b)))


def _text_bytes(text: str) -> int:
    """At least the UTF-8 bytes of `text` (4 a character unless it is ASCII: no encoding)."""
    return len(text) if text.isascii() else 4 * len(text)


def _pages_written(rows: List[Tuple[Any, ...]], writes: List[Tuple[str, Any]]) -> int:
    """About the WAL pages a commit of these message rows and directory writes writes, rather
    more than fewer: SQLite says nothing cheaper than a checkpoint does.

    A commit rewrites the last leaf of the table and, for each room it adds to, a leaf of the
    index; rows fill pages as their bytes do (the room three times: key, spelling and index
    entry; text and userhost at 4 bytes a character unless ASCII), counted twice for the
    splits, the pages above and a row that does not fit starting a page. Against SQLite's own
    count, one room: 80 rows of 100 characters write 9.1 pages, 12 counted; 8 rows of 400, 4.5
    and 6; one row, 2 and 5. tests/test_review21_hotpath.py holds the WAL near WAL_PAGES (plus
    one commit, for a commit that touches many rooms) with it.
    """
    # (id, room_key, room, ts, sender, text, userhost, flags, account): names are ASCII
    size = sum([3 * len(r[1]) + len(r[4]) + len(r[8]) + _text_bytes(r[5]) + _text_bytes(r[6])
                for r in rows])
    size += len(rows) * ROW_OVERHEAD
    for _, parameters in writes:
        size += ROW_OVERHEAD + sum([_text_bytes(p) for p in parameters if type(p) is str])
    # Each room (or conversation) the commit adds to has its own last leaf in the index,
    # wherever the index keeps it: a page each.
    rooms = len({r[1] for r in rows})
    return 3 + rooms + 2 * len(writes) + (2 * size + PAGE_BYTES - 1) // PAGE_BYTES


def _flags(m: Message) -> int:
    return (1 if m.action else 0) | (2 if m.notice else 0)


MAILBOX_CAP = 500  # messages one account may have waiting; then `mailbox_full`
# What all mailboxes hold at most, in bytes of text and sender (they are kept in memory and
# read whole at start): past it `mailbox_full`, whoever it is for.
MAILBOX_TOTAL_BYTES = 64 << 20
DIRECTORY_BACKLOG = 100000  # directory writes kept for the next commit while commits fail


def _mail_size(m: Message) -> int:
    return len(m.text) + len(m.sender) + 64


class Directory:
    """Accounts, their remember-me tokens, registered rooms and mailboxes, as a store keeps
    them: read whole at start (they are small), changed by queued writes that the next
    `commit()` makes durable in the same transaction as the pass's messages, so an `account`
    answer never reaches a client before the account is on disk."""

    def __init__(self) -> None:
        self.accounts: Dict[str, Tuple[str, str, int]] = {}  # key -> (name, verifier, created)
        self.tokens: Dict[str, Tuple[str, int]] = {}  # digest -> (account key, created)
        # account key -> {digest: created}: one account's tokens without a walk over all
        self.tokens_by_account: Dict[str, Dict[str, int]] = {}
        self.rooms: Dict[str, Tuple[str, str, str]] = {}  # key -> (name, founder key, state JSON)
        self.founded: Dict[str, int] = {}  # founder key -> rooms registered to it
        self.mail: Dict[str, List[Tuple[int, Message]]] = {}  # owner key -> [(seq, message)]
        self.writes: List[Tuple[str, Tuple]] = []  # (SQL, parameters), run at the next commit
        self.mail_bytes = 0  # what the mailboxes hold (MAILBOX_TOTAL_BYTES at most)
        # account key -> the accounts it has a kept private conversation with (IRC's
        # CHATHISTORY TARGETS lists them); as many entries as there are conversations
        self.partners: Dict[str, Set[str]] = {}
        self._seq = 0

    def note_conversation(self, pair: str) -> None:
        """A private message was kept under `pair` ('@a/b'): a and b have a conversation."""
        a, _, b = pair[1:].partition("/")
        self.partners.setdefault(a, set()).add(b)
        self.partners.setdefault(b, set()).add(a)

    def save_account(self, key: str, name: str, verifier: str, created: int) -> None:
        self.accounts[key] = (name, verifier, created)
        self.writes.append(("INSERT OR REPLACE INTO accounts (key, name, verifier, created)"
                            " VALUES (?, ?, ?, ?)", (key, name, verifier, created)))

    def save_token(self, digest: str, account: str, created: int) -> None:
        self.tokens[digest] = (account, created)
        self.tokens_by_account.setdefault(account, {})[digest] = created
        self.writes.append(("INSERT OR REPLACE INTO tokens (digest, account, created)"
                            " VALUES (?, ?, ?)", (digest, account, created)))

    def drop_token(self, digest: str) -> None:
        entry = self.tokens.pop(digest, None)
        if entry is not None:
            mine = self.tokens_by_account.get(entry[0])
            if mine is not None:
                mine.pop(digest, None)
                if not mine:
                    del self.tokens_by_account[entry[0]]
            self.writes.append(("DELETE FROM tokens WHERE digest = ?", (digest,)))

    def forget_account(self, key: str) -> None:
        """With --redis: an account the cluster does not have (a file left from a run alone)."""
        if self.accounts.pop(key, None) is not None:
            self.writes.append(("DELETE FROM accounts WHERE key = ?", (key,)))
        for digest in list(self.tokens_by_account.get(key, ())):
            self.drop_token(digest)

    def forget_room(self, key: str) -> None:
        """With --redis: a registered room the cluster does not have."""
        entry = self.rooms.pop(key, None)
        if entry is not None:
            left = self.founded.get(entry[1], 0) - 1
            if left > 0:
                self.founded[entry[1]] = left
            else:
                self.founded.pop(entry[1], None)
            self.writes.append(("DELETE FROM rooms WHERE key = ?", (key,)))

    def save_room(self, key: str, name: str, founder: str, state: str) -> None:
        if key not in self.rooms:
            self.founded[founder] = self.founded.get(founder, 0) + 1
        self.rooms[key] = (name, founder, state)
        self.writes.append(("INSERT OR REPLACE INTO rooms (key, name, founder, state)"
                            " VALUES (?, ?, ?, ?)", (key, name, founder, state)))

    def add_mail(self, owner: str, m: Message) -> bool:
        """Keep `m` for `owner`'s next login; False when its mailbox is full (the fate)."""
        size = _mail_size(m)
        if self.mail_bytes + size > MAILBOX_TOTAL_BYTES:
            return False
        box = self.mail.setdefault(owner, [])
        if len(box) >= MAILBOX_CAP:
            return False
        self.mail_bytes += size
        self._seq += 1
        box.append((self._seq, m))
        self.writes.append(("INSERT INTO mailbox (seq, owner, id, ts, sender, account, recipient,"
                            " text, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (self._seq, owner, m.id, m.ts, m.sender, m.account or "", m.to or "",
                             m.text, _flags(m))))
        return True

    def take_mail(self, owner: str) -> List[Message]:
        """Everything waiting for `owner`, oldest first; gone from the mailbox once committed."""
        box = self.mail.pop(owner, None)
        if not box:
            return []
        self.writes.append(("DELETE FROM mailbox WHERE owner = ?", (owner,)))
        self.mail_bytes -= sum(_mail_size(m) for _, m in box)
        return [m for _, m in box]

    def load(self, conn: "sqlite3.Connection") -> None:
        # Pair keys start with '@' (0x40) and room keys with '#': one range of the index.
        for (pair,) in conn.execute("SELECT DISTINCT room_key FROM messages"
                                    " WHERE room_key >= '@' AND room_key < 'A'"):
            self.note_conversation(pair)
        for key, name, verifier, created in conn.execute(
                "SELECT key, name, verifier, created FROM accounts"):
            self.accounts[key] = (name, verifier, created)
        for digest, account, created in conn.execute("SELECT digest, account, created FROM tokens"):
            self.tokens[digest] = (account, created)
            self.tokens_by_account.setdefault(account, {})[digest] = created
        for key, name, founder, state in conn.execute("SELECT key, name, founder, state FROM rooms"):
            self.rooms[key] = (name, founder, state)
            self.founded[founder] = self.founded.get(founder, 0) + 1
        for seq, owner, mid, ts, sender, account, recipient, text, flags in conn.execute(
                "SELECT seq, owner, id, ts, sender, account, recipient, text, flags FROM mailbox"
                " ORDER BY seq"):
            m = Message(mid, ts, sender, text, None, recipient, bool(flags & 1), bool(flags & 2),
                        account=account or None)
            self.mail.setdefault(owner, []).append((seq, m))
            self.mail_bytes += _mail_size(m)
            self._seq = max(self._seq, seq)


_LOW = -(1 << 63)


def _clamp(value: Optional[int], default: int) -> int:
    """A bound of any size as one SQLite can bind (int64), with the same meaning."""
    if value is None:
        return default
    return max(_LOW, min(MAX_ID, value))


def _pick(found: List[Message], limit: int, latest: bool) -> List[Message]:
    """`found` sorted by id; the `limit` newest (latest) or oldest, oldest first."""
    found.sort(key=lambda m: m.id)
    if len(found) > limit:
        found = found[len(found) - limit:] if latest else found[:limit]
    return found


def _inside(m: Message, after: int, before: int, after_ts: int, before_ts: int) -> bool:
    return after < m.id < before and after_ts < m.ts < before_ts


class MemoryStore:
    """Room history in memory: at most `cap_per_room` newest messages per room, lost on exit.

    `add()` stores at once (there is nothing to make durable), and `commit()` only reports how
    many were added since the last one, so the two stores answer the same calls the same way.
    """

    def __init__(self, cap_per_room: int = DEFAULT_CAP_PER_ROOM) -> None:
        if cap_per_room < 1:
            raise ValueError("cap_per_room must be >= 1")
        self.cap_per_room = cap_per_room
        self._rooms: Dict[str, Deque[Message]] = {}
        self._last_id = 0
        self._pending = 0
        self._pending_last_id = 0
        self._pending_ids = 0  # ids noted without a message since the last commit
        self._allocated = 0  # the last id allocate_id() returned
        self._commits = 0
        self._written = 0
        self.directory = Directory()

    def last_id(self) -> int:
        return self._last_id

    def allocate_id(self) -> int:
        """Nothing outlives this store, so there is nothing to reserve: one past the highest id
        it has seen, however it saw it (allocated, added or noted)."""
        next_id = max(self._allocated, self._last_id, self._pending_last_id) + 1
        if next_id > MAX_ID:
            raise StoreError("memory store: message ids are exhausted")
        self._allocated = next_id
        return next_id

    def add(self, message: Message) -> None:
        _check_message(message)
        key = message.room.lower()  # type: ignore[union-attr]  # checked above
        room = self._rooms.get(key)
        if room is None:
            room = self._rooms[key] = deque(maxlen=self.cap_per_room)
        room.append(message)
        if message.id > self._pending_last_id:
            self._pending_last_id = message.id
        self._pending += 1

    def note_id(self, message_id: int) -> None:
        if message_id > self._pending_last_id:
            self._pending_last_id = message_id
        self._pending_ids += 1

    def add_private(self, message: Message, pair: str) -> None:
        """A private message between two accounts, kept under their `pair_key`."""
        room = self._rooms.get(pair)
        if room is None:
            room = self._rooms[pair] = deque(maxlen=self.cap_per_room)
        room.append(message)
        self.note_id(message.id)
        self.directory.note_conversation(pair)

    def add_copy(self, message: Message, key: str) -> None:
        """A message that may be kept already (see SQLiteStore.add_copy): kept once, in id order."""
        kept = self._rooms.get(key)
        if kept is not None and any(m.id == message.id for m in kept):
            return
        if key.startswith("@"):
            self.add_private(message, key)
        else:
            self.add(message)
        kept = self._rooms[key]
        if len(kept) > 1 and kept[-2].id > message.id:
            ordered = sorted(kept, key=lambda m: m.id)
            kept.clear()
            kept.extend(ordered)

    def commit(self) -> int:
        self.directory.writes.clear()
        count, self._pending = self._pending, 0
        if count or self._pending_ids:
            self._pending_ids = 0
            self._last_id = max(self._last_id, self._pending_last_id)
        if count:
            self._commits += 1
            self._written += count
        return count

    def recent(self, room: str, before: Optional[int], limit: int,
               max_bytes: Optional[int] = None) -> Tuple[List[Message], bool]:
        _check_query(before, limit)
        messages = self._rooms.get(room.lower())
        if not messages or _nothing_below(before):
            return [], False
        # Newest first until `limit` + 1 are found (the extra one only says whether more exist)
        # or the page outweighs `max_bytes`. A linear walk: this store is for tests.
        found: List[Message] = []
        size = 0
        for message in reversed(messages):
            if before is not None and message.id >= before:
                continue
            found.append(message)
            size += _weight(message)
            if len(found) > limit or (max_bytes is not None and size > max_bytes and len(found) > 1):
                break
        return _page(found, limit, max_bytes)

    def window(self, room: str, *, after: Optional[int] = None, before: Optional[int] = None,
               after_ts: Optional[int] = None, before_ts: Optional[int] = None,
               limit: int = 50, latest: bool = True) -> List[Message]:
        """Messages of `room` strictly between the id and time bounds given, oldest first:
        the `limit` newest of them (`latest`) or the `limit` oldest (for IRC's CHATHISTORY)."""
        a, b = _clamp(after, 0), _clamp(before, MAX_ID)
        at, bt = _clamp(after_ts, _LOW), _clamp(before_ts, MAX_ID)
        found = [m for m in self._rooms.get(room.lower(), ()) if _inside(m, a, b, at, bt)]
        return _pick(found, max(0, limit), latest)

    def close(self) -> None:
        self.commit()

    def stats(self) -> Dict[str, float]:
        return {
            "commits": self._commits,
            "messages": self._written,
            "failures": 0,
            "pending": self._pending,
            "commit_seconds": 0.0,
            "max_commit_seconds": 0.0,
            "reservations": 0,
            "reservation_failures": 0,
            "reserved_until": self._allocated,
        }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _hint(path: str, exc: BaseException) -> str:
    """A likely cause for an operator, when SQLite's own words ("disk I/O error") do not say."""
    if "locked" in str(exc):
        return " (is another selchat server using it?)"
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return " (the file is not writable)"
    if os.path.isdir(directory) and not os.access(directory, os.W_OK):
        return " (its directory is not writable)"
    return ""


class SQLiteStore:
    """Room history in an SQLite file (`sqlite3` from the standard library).

    Durability: WAL journal, `synchronous=NORMAL` by default. The protocol promises that what any
    client saw survives `kill -9` of the server. The loop commits a pass's messages before it
    writes any of them to a socket, and in WAL mode COMMIT returns only after the transaction's
    frames were handed to the kernel with write(2); from then on they sit in the page cache,
    which outlives the process, and the next open replays the WAL. So NORMAL already keeps the
    promise. What NORMAL does not survive is a power cut or kernel crash in the seconds before
    the next checkpoint (the database stays consistent; the newest transactions may be gone).
    `synchronous="FULL"` closes that gap with an fsync per commit, which blocks the one loop
    thread for 0.1 to 10+ ms per pass depending on the disk, stalling every client; it is there
    for operators who want it, not the default.

    Ids: `allocate_id()` hands them out of a block `[next, reserved_until]` kept in memory. When
    the block is used up it first commits a new `meta.reserved_until` in a transaction of its
    own, with `synchronous=FULL` for that one transaction (an fsync per `block_size` ids, not per
    pass), and only then returns the first id of the new block. At open, ids resume above the
    stored `reserved_until`, so no id is handed out twice even if every commit since the
    reservation failed (disk full) and the process was killed. The reservation never carries
    messages along: `add()` only queues them in Python and `commit()` opens and closes its own
    transaction, so between calls no SQLite transaction is open and the reservation's holds
    nothing but the one `meta` row (if one were open, the reservation refuses rather than
    commit it).

    One server per file: the connection uses `locking_mode=EXCLUSIVE` and keeps the file locked
    while open. Two servers on one file would hand out ids from the same block; the second one
    is refused at open instead. (It also means other
    programs cannot read the file while the server runs; stop it or copy the file first.)

    Every way the file can be unusable (missing directory, a directory, not a database, a newer
    schema, read-only file or directory, locked by another server) raises StoreError at open:
    the schema is read and a write is tried, so a bad `--db` fails at start, not at the first
    message. A failed `commit()` raises StoreError, drops the batch, and leaves the store ready
    for the next one; it never touches `reserved_until`, so the id invariant does not depend on
    commits succeeding. A reservation that cannot be written raises StoreError from
    `allocate_id()` and hands out no id; the next call tries again.
    """

    def __init__(
        self,
        path: "str | os.PathLike[str]",
        *,
        synchronous: str = "NORMAL",
        lock_timeout: float = 1.0,
        migrations: Sequence[Migration] = MIGRATIONS,
        timer: Callable[[], float] = time.perf_counter,
        block_size: int = ID_BLOCK,
    ) -> None:
        """Open (creating if needed) and upgrade the database at `path`; ':memory:' for a throwaway.

        `lock_timeout`: seconds to wait for a file another process holds. `migrations` exists
        for the tests of the upgrade path. `timer` only measures commits for `stats()`.
        `block_size`: ids reserved per durable write (small values exist for tests).
        """
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self.path = os.fspath(path)
        synchronous = synchronous.upper()
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self._synchronous = synchronous
        self._timer = timer
        self._pending: List[Message] = []
        self._commits = 0
        self._written = 0
        self._failures = 0
        self._commit_seconds = 0.0
        self._max_commit_seconds = 0.0
        # WAL pages written since the last checkpoint, estimated; the schema's own and what a
        # crash left are not counted: the first pass's checkpoint takes them.
        self._wal_pages = WAL_PAGES
        self._checkpoints = 0
        self._checkpoint_failures = 0
        self._checkpoint_seconds = 0.0
        self._checkpoint_retry_at = 0.0  # (the timer's reading) no checkpoint before it
        self._reservations = 0
        self._reservation_failures = 0
        self._closed = False
        self._identity: Optional[Tuple[int, int]] = None
        self._private: List[Tuple[Message, str]] = []
        self.directory = Directory()
        if not self.path:
            raise StoreError("'': empty database path (use ':memory:' for a throwaway store)")
        self._memory = self.path == ":memory:"
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=lock_timeout)
        except sqlite3.Error as exc:
            reason = _one_line(exc) + _hint(self.path, exc)
            raise StoreError(f"{self.path}: cannot open database: {reason}") from exc
        try:
            self._configure()
            self._migrate(tuple(migrations))
            # Files made by tests with older migrations alone have no userhost/flags columns.
            version = len(migrations)
            self._columns = (_COLUMNS if version >= 5 else _V4_COLUMNS if version >= 4
                             else _OLD_COLUMNS)
            self._insert = _INSERT if version >= 5 else _V4_INSERT if version >= 4 else _OLD_INSERT
            if version >= 5:
                self.directory.load(self._conn)
            self._last_id, self._reserved = self._read_ids()
            self._noted = self._last_id  # the highest id handed out, as far as we know
            self._next = self._last_id + 1  # allocate_id()'s next answer, once reserved
            if not self._memory:
                self._identity = self._file_identity()
        except StoreError:
            self._conn.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._conn.close()
            reason = _one_line(exc) + _hint(self.path, exc)
            raise StoreError(f"{self.path}: cannot use database: {reason}") from exc

    # -- opening ------------------------------------------------------------------------------

    def _configure(self) -> None:
        conn = self._conn
        if not self._memory:
            # Before WAL is entered, so the WAL index lives in heap memory (no -shm file) and
            # the lock is held for as long as the connection is open.
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != ("memory" if self._memory else "wal"):
            raise StoreError(f"{self.path}: cannot switch the database to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # Checkpoints copy the WAL into the database in the loop's thread (with an fsync). Fewer,
        # larger ones cost a little less per message (0.5 -> 0.35 ms per 50-message commit at
        # 4,000 pages), but each is a pause for everyone; small ones keep every pass short.
        # WAL_PAGES bounds both the WAL file (~0.5 MiB) and the longest pause one can cause.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP}")
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

    def _migrate(self, migrations: Tuple[Migration, ...]) -> None:
        """Bring the schema to len(migrations) in one transaction, or prove the file is writable.

        BEGIN IMMEDIATE takes the write lock, so a read-only file, a read-only directory (no
        room for the WAL) or a file held by another server fails here, at start.
        """
        conn = self._conn
        target = len(migrations)
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id not in (0, APPLICATION_ID):
                raise StoreError(
                    f"{self.path}: not a selchat database (application_id {app_id:#x})"
                )
            if version > target:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this selchat knows"
                    f" ({target}); upgrade selchat or use another --db"
                )
            if version == 0:
                tables = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
                ).fetchone()[0]
                if tables:
                    raise StoreError(
                        f"{self.path}: not a selchat database (it has tables but no schema version)"
                    )
            if version == target:
                # Nothing to upgrade: write something anyway, then undo it, so that a file we
                # may read but not write is refused now rather than at the first message.
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("ROLLBACK")
                return
            for step in migrations[version:]:
                for statement in step:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback_quietly()
            raise

    def _read_ids(self) -> Tuple[int, int]:
        """(the highest id an earlier run may have handed out, the stored reservation end).

        The first covers stored rows, the recorded high-water mark and the reserved block: an
        id of that block may have reached a client although nothing of it was ever stored.
        """
        last = self._conn.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0
        reserved = 0
        has_meta = self._conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()[0]
        if has_meta:  # absent only when a test opens the file with the first migrations alone
            for key, value in self._conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('last_id', 'reserved_until')"
            ):
                if key == "reserved_until":
                    reserved = int(value)
                last = max(last, value)
        return int(last), reserved

    def _file_identity(self) -> Tuple[int, int]:
        st = os.stat(self.path)
        return st.st_dev, st.st_ino

    def _rollback_quietly(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back on its own (e.g. SQLITE_FULL) or the file is gone

    # -- the MessageStore interface -------------------------------------------------------------

    def last_id(self) -> int:
        return self._last_id

    def allocate_id(self) -> int:
        """The next id; at a block's end, first a durable reservation (see the class doc)."""
        next_id = self._next
        if next_id <= self._noted:  # ids counted by a caller that does not use allocate_id()
            next_id = self._noted + 1
        if next_id > self._reserved:
            self._reserve(next_id)
        self._next = next_id + 1
        return next_id

    def _reserve(self, first: int) -> None:
        """Make `[first, first + block_size - 1]` durable as reserved, or raise StoreError."""
        if first > MAX_ID:
            raise StoreError(f"{self.path}: message ids are exhausted")
        end = min(first + self.block_size - 1, MAX_ID)
        conn = self._conn
        try:
            if self._closed:
                raise sqlite3.ProgrammingError("the store is closed")
            if conn.in_transaction:  # never, with this class's own calls: refuse, do not commit it
                raise sqlite3.OperationalError("a transaction is already open")
            if self._identity is not None:
                self._check_file_still_there()
            if self._synchronous != "FULL":
                conn.execute("PRAGMA synchronous = FULL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(_SAVE_RESERVED, (end,))
                conn.execute("COMMIT")
            finally:
                if self._synchronous != "FULL":
                    self._rollback_quietly()
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except (sqlite3.Error, OSError) as exc:
            self._rollback_quietly()
            self._reservation_failures += 1
            raise StoreError(
                f"{self.path}: could not reserve message ids {first}..{end}: {_one_line(exc)}"
            ) from exc
        self._reserved = end
        self._reservations += 1
        log.debug("%s: reserved message ids up to %d", self.path, end)

    def add(self, message: Message) -> None:
        _check_message(message)
        self._pending.append(message)
        if message.id > self._noted:
            self._noted = message.id

    def note_id(self, message_id: int) -> None:
        if message_id > self._noted:
            self._noted = message_id

    def add_private(self, message: Message, pair: str) -> None:
        """A private message between two accounts, kept under their `pair_key`; written by the
        next commit with the room messages."""
        self._private.append((message, pair))
        self.directory.note_conversation(pair)
        if message.id > self._noted:
            self._noted = message.id

    def add_copy(self, message: Message, key: str) -> None:
        """A message that may be kept here already (with --redis, one handed over twice: by a
        snapshot and by the shared history), under its room's key or its `pair_key`. Kept
        once: unlike `add`, an id already kept is not an error (it is the same message)."""
        if key.startswith("@"):
            self.directory.note_conversation(key)
            room = "@" + (message.to or "")
        else:
            room = message.room or key
            key = room.lower()
        if message.id > self._noted:
            self._noted = message.id
        self.directory.writes.append((
            "INSERT OR IGNORE INTO messages (id, room_key, room, ts, sender, text, userhost,"
            " flags, account) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (message.id, key, room, message.ts, message.sender, message.text, message.userhost,
             _flags(message), message.account or "")))

    def commit(self) -> int:
        writes = self.directory.writes
        if not self._pending and not self._private and not writes:
            if self._noted > self._last_id:
                self._save_noted_id()
            return 0
        batch, self._pending = self._pending, []
        private, self._private = self._private, []
        self.directory.writes = []
        ids = [m.id for m in batch] + [m.id for m, _ in private]
        high = max([self._noted] + ids)
        self._noted = high  # even if this write fails, the next one records how far ids went
        rows = [(m.id, m.room.lower(), m.room, m.ts, m.sender, m.text, m.userhost,  # type: ignore[union-attr]
                 _flags(m), m.account or "") for m in batch]
        rows += [(m.id, pair, "@" + (m.to or ""), m.ts, m.sender, m.text, m.userhost, _flags(m),
                  m.account or "") for m, pair in private]
        full_rows = rows  # (what the page count reads, whatever columns this schema takes)
        started = self._timer()
        try:
            if self._identity is not None:
                self._check_file_still_there()
            self._conn.execute("BEGIN IMMEDIATE")
            if self._insert is _OLD_INSERT:
                rows = [row[:6] for row in rows]
            elif self._insert is _V4_INSERT:
                rows = [row[:8] for row in rows]
            _insert_rows(self._conn, self._insert, rows)
            # (A file made with the first migrations alone, in tests, has no directory tables:
            # its writes are dropped, not kept failing every commit.)
            for statement, parameters in writes if self._insert is _INSERT else ():
                self._conn.execute(statement, parameters)
            if high > max(ids, default=0):
                self._conn.execute(_SAVE_LAST_ID, (high,))
            self._conn.execute("COMMIT")
        except (sqlite3.Error, ValueError, OverflowError, OSError) as exc:
            # sqlite3.Error: disk full, I/O error, duplicate id. ValueError: text that is not
            # valid Unicode (the protocol layer refuses it first). OverflowError: id >= 2**63.
            self._rollback_quietly()
            self._failures += 1
            # Accounts, tokens, rooms and mailboxes live on in memory and were answered: their
            # writes wait for the next commit (disk full, file replaced), not lost for good.
            # Only the newest DIRECTORY_BACKLOG wait (full-row writes: a later one of a row
            # carries what an older one did). Not for data the database refuses (the same
            # batch would fail for ever).
            if not isinstance(exc, (ValueError, OverflowError)):
                kept = writes + self.directory.writes
                if len(kept) > DIRECTORY_BACKLOG:
                    log.error("%s: %d account/room writes waiting; the oldest are dropped",
                              self.path, len(kept))
                    kept = kept[-DIRECTORY_BACKLOG:]
                self.directory.writes = kept
            raise StoreError(
                f"{self.path}: could not write {len(batch)} message(s): {_one_line(exc)}"
            ) from exc
        elapsed = self._timer() - started
        self._wal_pages += _pages_written(full_rows, writes)
        self._commits += 1
        self._written += len(batch)
        self._last_id = max(self._last_id, high)
        self._commit_seconds += elapsed
        if elapsed > self._max_commit_seconds:
            self._max_commit_seconds = elapsed
        return len(batch)

    def checkpoint_due(self) -> bool:
        """The WAL holds about WAL_PAGES pages: time to copy them into the database (after a
        failed checkpoint, once CHECKPOINT_RETRY seconds have passed)."""
        return self._wal_pages >= WAL_PAGES and self._timer() >= self._checkpoint_retry_at

    def checkpoint(self) -> int:
        """Copy the WAL into the database (and sync it): a pause of about a millisecond, which
        the server takes after a pass's writes. The pages the WAL held; raises StoreError (and
        stays due: tried again CHECKPOINT_RETRY seconds later)."""
        if self._memory:
            self._wal_pages = 0
            return 0
        started = self._timer()
        try:
            row = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self._checkpoint_failures += 1  # (still due: tried again in CHECKPOINT_RETRY)
            self._checkpoint_retry_at = self._timer() + CHECKPOINT_RETRY
            raise StoreError(f"{self.path}: checkpoint failed: {_one_line(exc)}") from exc
        self._wal_pages = 0
        self._checkpoints += 1
        self._checkpoint_seconds += self._timer() - started
        return int(row[1]) if row else 0

    def _save_noted_id(self) -> None:
        """Only private messages this pass: record how far ids went (a failure waits for the next)."""
        try:
            if self._identity is not None:
                self._check_file_still_there()
            self._conn.execute(_SAVE_LAST_ID, (self._noted,))  # autocommit: its own transaction
        except (sqlite3.Error, OSError) as exc:
            self._failures += 1
            raise StoreError(f"{self.path}: could not record the last message id: {_one_line(exc)}") from exc
        self._last_id = self._noted

    def _check_file_still_there(self) -> None:
        """SQLite keeps writing to a deleted or replaced file through its open descriptor (the
        rows would vanish at the next start), so check the path still names our file."""
        try:
            identity = self._file_identity()
        except OSError as exc:
            raise OSError(f"database file is gone ({exc.strerror})") from exc
        if identity != self._identity:
            raise OSError("database file was replaced by another file")

    def recent(self, room: str, before: Optional[int], limit: int,
               max_bytes: Optional[int] = None) -> Tuple[List[Message], bool]:
        _check_query(before, limit)
        if _nothing_below(before):
            return [], False
        key = room.lower()
        bound = _NO_UPPER_BOUND if before is None else min(before, _NO_UPPER_BOUND)
        found: List[Message] = []
        size = 0
        try:
            # Rows are stepped one by one, newest first, so reading stops at what the answer
            # can carry: a page of 200 long messages costs what fits in one frame, not 3 MB.
            cursor = self._conn.execute(_RECENT.format(self._columns), (key, bound, min(limit + 1, MAX_ID)))
            for row in cursor:
                found.append(_row_message(row))
                size += _weight(found[-1])
                if max_bytes is not None and size > max_bytes and len(found) > 1:
                    break  # one past the budget: it tells whether older ones exist
            cursor.close()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not read history: {_one_line(exc)}") from exc
        # Messages added but not committed yet: a handful at most (one loop pass). They are
        # normally newer than anything in the file, but merging by id does not rely on that.
        queued = [
            m for m in self._pending
            if (before is None or m.id < before) and m.room.lower() == key  # type: ignore[union-attr]
        ]  # type: ignore[union-attr]
        if key.startswith("@"):
            queued = [m for m, pair in self._private
                      if pair == key and (before is None or m.id < before)]
        if queued:
            found.extend(queued)
            found.sort(key=lambda m: m.id, reverse=True)
        return _page(found, limit, max_bytes)


    def window(self, room: str, *, after: Optional[int] = None, before: Optional[int] = None,
               after_ts: Optional[int] = None, before_ts: Optional[int] = None,
               limit: int = 50, latest: bool = True) -> List[Message]:
        """As MemoryStore.window; the messages of this pass not yet committed are included."""
        a, b = _clamp(after, 0), _clamp(before, MAX_ID)
        at, bt = _clamp(after_ts, _LOW), _clamp(before_ts, MAX_ID)
        limit = max(0, min(limit, 10000))
        order = "DESC" if latest else "ASC"
        query = (f"SELECT {self._columns} FROM messages WHERE room_key = ? AND id > ?"
                 f" AND id < ? AND ts > ? AND ts < ? ORDER BY id {order} LIMIT ?")
        key = room.lower()
        try:
            rows = self._conn.execute(query, (key, a, b, at, bt, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: could not read history: {_one_line(exc)}") from exc
        found = [_row_message(r) for r in rows]
        found += [m for m in self._pending
                  if m.room.lower() == key and _inside(m, a, b, at, bt)]  # type: ignore[union-attr]
        found += [m for m, pair in self._private if pair == key and _inside(m, a, b, at, bt)]
        return _pick(found, limit, latest)

    def close(self) -> None:
        """Commit what is still queued (those messages were accepted), then close the file.

        Raises StoreError if that last commit fails; the file is closed either way.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.commit()
        finally:
            self._conn.close()

    def stats(self) -> Dict[str, float]:
        """Counters for the server's log: successful commits, messages written, failed commits,
        messages queued now, the time spent in commits (total and worst, seconds), and id
        reservations (made, failed, and the end of the current block)."""
        return {
            "commits": self._commits,
            "messages": self._written,
            "failures": self._failures,
            "pending": len(self._pending),
            "commit_seconds": self._commit_seconds,
            "max_commit_seconds": self._max_commit_seconds,
            "reservations": self._reservations,
            "reservation_failures": self._reservation_failures,
            "reserved_until": self._reserved,
            "checkpoints": self._checkpoints,
            "checkpoint_failures": self._checkpoint_failures,
            "checkpoint_seconds": self._checkpoint_seconds,
        }

    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])
