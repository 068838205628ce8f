"""`selchat-server --backup FILE`: a consistent copy of the history database, while it is in use.

The running server keeps its database locked (`locking_mode=EXCLUSIVE`, see
selchat/core/store.py: one server per file), so no other process can read it meanwhile. So:

* with no server on the file, `--backup` copies it itself with SQLite's online backup API;
* with a server on it (found in /proc/locks, by the file's inode), `--backup` sends that
  server SIGUSR1 and waits for the copy it makes: the server runs the same backup API on its
  own connection between two passes (a pause of the loop about as long as the copy: a few ms
  per MB), into `<db>.backup` next to the database, and `--backup` then moves that to FILE.

Either way the copy is one consistent snapshot of what was committed (a pass's messages are
in it whole or not at all), checked with `PRAGMA quick_check`, synced, and renamed into place,
so FILE is always either the previous backup or a whole new one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from typing import Optional, Tuple

log = logging.getLogger("selchat.server")

SERVER_WAIT = 120.0  # seconds `--backup` waits for a running server's copy


class BackupError(Exception):
    """Why no backup was made; str() is the one line to print."""


def sibling(db: str) -> str:
    """Where a running server writes the backup it is asked for (SIGUSR1)."""
    return db + ".backup"


def copy_into(source: sqlite3.Connection, target: str) -> Tuple[int, int]:
    """The online backup of `source` into `target` (atomically); (pages, bytes). Raises
    sqlite3.Error or OSError, or BackupError when the copy does not check out."""
    folder = os.path.dirname(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(prefix=".selchat-backup-", suffix=".db", dir=folder)
    os.close(handle)
    try:
        dst = sqlite3.connect(temporary)
        try:
            source.backup(dst)  # in one step: one snapshot
            pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise BackupError(f"the copy does not check out: {check}")
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return pages, os.path.getsize(target)


def serve_backup(store: object, db: str) -> Optional[str]:
    """In the running server (SIGUSR1): copy the store's database to `sibling(db)`; the line
    to log, or None when there is nothing to copy (`:memory:`)."""
    conn = getattr(store, "_conn", None)  # (the store's own connection: the file is locked to it)
    if conn is None or db == ":memory:":
        return None
    started = time.perf_counter()
    try:
        pages, size = copy_into(conn, sibling(db))
    except (sqlite3.Error, OSError, BackupError) as exc:
        raise BackupError(f"backup of {db} failed: {exc}") from None
    return (f"backup of {db} written to {sibling(db)} ({pages} pages, {size} bytes, "
            f"{(time.perf_counter() - started) * 1000:.0f} ms)")


def backup(db: str, target: str) -> Tuple[int, int]:
    """`--backup`: copy the database at `db` to `target`; (pages, bytes); BackupError."""
    if db == ":memory:":
        raise BackupError("--db :memory: keeps nothing to back up")
    if not os.path.exists(db):
        raise BackupError(f"no database at {db} (--db)")
    holder = lock_holder(db)
    if holder is not None:
        return _ask_server(holder, db, target)
    try:
        source = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=1.0)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {db}: {exc}") from None
    try:
        return copy_into(source, target)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise BackupError(f"{db} is locked by another program (no server found holding it)") from None
        raise BackupError(f"backup of {db} to {target} failed: {exc}") from None
    except (sqlite3.Error, OSError) as exc:
        raise BackupError(f"backup of {db} to {target} failed: {exc}") from None
    finally:
        source.close()


def lock_holder(path: str) -> Optional[int]:
    """The process holding a lock on `path` (another than this one), from /proc/locks."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        pid, where = parts[4], parts[5]
        if where.rsplit(":", 1)[-1] == str(inode) and pid.isdigit() and int(pid) != os.getpid():
            return int(pid)
    return None


def _ask_server(pid: int, db: str, target: str) -> Tuple[int, int]:
    made = sibling(db)
    before = os.stat(made).st_mtime_ns if os.path.exists(made) else None
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        raise BackupError(f"{db} is in use by process {pid}, which cannot be asked for a backup: "
                          f"{exc.strerror or exc}") from None
    deadline = time.monotonic() + SERVER_WAIT
    while True:
        now = os.stat(made).st_mtime_ns if os.path.exists(made) else None
        if now is not None and now != before:
            break
        if time.monotonic() > deadline:
            raise BackupError(f"the server (process {pid}) wrote no backup to {made} within "
                              f"{SERVER_WAIT:.0f} s; see its log")
        time.sleep(0.05)
    conn = sqlite3.connect(made)
    try:
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    finally:
        conn.close()
    if os.path.abspath(made) != os.path.abspath(target):
        shutil.move(made, target)
    return pages, os.path.getsize(target)
