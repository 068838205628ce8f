"""The message store: paging, durability, schema versions, and every way a database can be bad."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.core.events import Message
from selchat.core.store import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    MemoryStore,
    SQLiteStore,
    StoreError,
)

REPO = Path(__file__).resolve().parent.parent


def msg(id: int, room: str = "#lobby", text: Optional[str] = None, sender: str = "alice") -> Message:
    return Message(id=id, ts=1_700_000_000_000 + id, sender=sender, text=text or f"m{id}", room=room)


def ids(page: Tuple[List[Message], bool]) -> Tuple[List[int], bool]:
    messages, more = page
    return [m.id for m in messages], more


@pytest.fixture(params=["memory", "sqlite-memory", "sqlite-file"])
def store(request, tmp_path) -> Iterator:
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite-memory":
        s = SQLiteStore(":memory:")
    else:
        s = SQLiteStore(tmp_path / "chat.db")
    yield s
    s.close()


def fill(store, n: int, room: str = "#lobby", first: int = 1, commit: bool = True) -> None:
    for i in range(first, first + n):
        store.add(msg(i, room))
    if commit:
        store.commit()


# -- paging -------------------------------------------------------------------------------------


def test_empty_store(store):
    assert store.last_id() == 0
    assert store.recent("#lobby", None, 50) == ([], False)
    assert store.recent("#lobby", 10, 50) == ([], False)
    assert store.commit() == 0


def test_before_none_gives_the_newest_oldest_first(store):
    fill(store, 10)
    assert ids(store.recent("#lobby", None, 3)) == ([8, 9, 10], True)
    assert ids(store.recent("#lobby", None, 9)) == ([2, 3, 4, 5, 6, 7, 8, 9, 10], True)
    assert ids(store.recent("#lobby", None, 10)) == (list(range(1, 11)), False)
    assert ids(store.recent("#lobby", None, 11)) == (list(range(1, 11)), False)


def test_before_edges(store):
    fill(store, 10)
    assert ids(store.recent("#lobby", 1, 50)) == ([], False)  # before the smallest id
    assert ids(store.recent("#lobby", 0, 50)) == ([], False)
    assert ids(store.recent("#lobby", -5, 50)) == ([], False)
    assert ids(store.recent("#lobby", 2, 50)) == ([1], False)
    assert ids(store.recent("#lobby", 2, 1)) == ([1], False)  # exactly limit, nothing older
    assert ids(store.recent("#lobby", 3, 1)) == ([2], True)
    assert ids(store.recent("#lobby", 10, 50)) == (list(range(1, 10)), False)
    assert ids(store.recent("#lobby", 11, 3)) == ([8, 9, 10], True)
    # before beyond the newest (even beyond what SQLite can hold) is the same as None
    assert store.recent("#lobby", 1000, 3) == store.recent("#lobby", None, 3)
    assert store.recent("#lobby", 1 << 70, 3) == store.recent("#lobby", None, 3)


def test_limit_edges(store):
    fill(store, 250)
    assert ids(store.recent("#lobby", None, 1)) == ([250], True)
    page, more = store.recent("#lobby", None, 200)
    assert [m.id for m in page] == list(range(51, 251)) and more
    page, more = store.recent("#lobby", 51, 200)
    assert [m.id for m in page] == list(range(1, 51)) and not more
    page, more = store.recent("#lobby", 201, 200)
    assert [m.id for m in page] == list(range(1, 201)) and not more
    # limit 0 asks only whether anything exists (history_on_join = 0)
    assert store.recent("#lobby", None, 0) == ([], True)
    assert store.recent("#lobby", 1, 0) == ([], False)
    with pytest.raises(ValueError):
        store.recent("#lobby", None, -1)


def test_paging_back_visits_every_message_once(store):
    for i in range(1, 101):
        store.add(msg(i, "#a" if i % 3 else "#b"))
    store.commit()
    seen: List[int] = []
    before, more = None, True
    while more:
        page, more = store.recent("#A", before, 7)
        assert page, "a page with more=True is never empty"
        seen[:0] = [m.id for m in page]
        before = page[0].id
    assert seen == [i for i in range(1, 101) if i % 3]


def test_rooms_are_case_insensitive_and_keep_their_spelling(store):
    store.add(msg(1, "#Lobby"))
    store.add(msg(2, "#LOBBY"))
    store.add(msg(3, "#other"))
    store.add(msg(4, "#lobby"))
    store.commit()
    for spelling in ("#lobby", "#LoBbY", "#LOBBY"):
        assert ids(store.recent(spelling, None, 50)) == ([1, 2, 4], False)
    assert [m.room for m in store.recent("#lobby", None, 50)[0]] == ["#Lobby", "#LOBBY", "#lobby"]
    assert ids(store.recent("#OTHER", None, 50)) == ([3], False)
    assert store.recent("#nowhere", None, 50) == ([], False)


def test_messages_come_back_whole(store):
    original = Message(id=7, ts=1_700_000_123_456, sender="Zoë", text="multi\nline\t✓ 🙂", room="#Room")
    store.add(original)
    store.commit()
    assert store.recent("#room", None, 1) == ([original], False)


def test_private_messages_are_refused(store):
    with pytest.raises(ValueError):
        store.add(Message(id=1, ts=1, sender="alice", text="psst", to="bob"))
    with pytest.raises(ValueError):
        store.add(Message(id=1, ts=1, sender="alice", text="psst", room="#lobby", to="bob"))
    assert store.commit() == 0
    assert store.last_id() == 0


def test_queued_messages_are_visible_before_commit(store):
    fill(store, 5)
    fill(store, 3, first=6, commit=False)
    store.add(msg(9, "#other"))
    assert ids(store.recent("#lobby", None, 4)) == ([5, 6, 7, 8], True)
    assert ids(store.recent("#lobby", 7, 50)) == ([1, 2, 3, 4, 5, 6], False)
    assert ids(store.recent("#lobby", None, 2)) == ([7, 8], True)
    before = store.recent("#lobby", None, 50)
    assert store.commit() == 4
    assert store.recent("#lobby", None, 50) == before
    assert store.commit() == 0


def test_only_queued_messages(store):
    store.add(msg(1))
    store.add(msg(2))
    assert ids(store.recent("#LOBBY", None, 1)) == ([2], True)
    assert ids(store.recent("#lobby", None, 2)) == ([1, 2], False)


def test_commit_counts_and_stats(store):
    fill(store, 3, commit=False)
    assert store.stats()["pending"] == 3
    assert store.commit() == 3
    fill(store, 2, first=4, commit=False)
    assert store.commit() == 2
    stats = store.stats()
    assert (stats["commits"], stats["messages"], stats["failures"], stats["pending"]) == (2, 5, 0, 0)


# -- MemoryStore ----------------------------------------------------------------------------------


def test_memory_store_keeps_the_newest_per_room():
    store = MemoryStore(cap_per_room=3)
    fill(store, 5)
    fill(store, 2, room="#other", first=6)
    assert ids(store.recent("#lobby", None, 50)) == ([3, 4, 5], False)  # older ones are gone
    assert ids(store.recent("#lobby", None, 2)) == ([4, 5], True)
    assert ids(store.recent("#other", None, 50)) == ([6, 7], False)
    assert store.last_id() == 7
    with pytest.raises(ValueError):
        MemoryStore(cap_per_room=0)


# -- SQLite: restart and durability ---------------------------------------------------------------


def test_rows_and_last_id_survive_a_restart(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 20)
    fill(store, 5, room="#b", first=21)
    store.close()
    store = SQLiteStore(str(path))
    assert store.last_id() == 25
    assert ids(store.recent("#lobby", None, 50)) == (list(range(1, 21)), False)
    assert ids(store.recent("#B", None, 2)) == ([24, 25], True)
    store.close()


def test_close_commits_what_is_queued(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 3, commit=False)
    store.close()
    store.close()  # idempotent
    store = SQLiteStore(path)
    assert store.last_id() == 3
    store.close()


def test_committed_messages_survive_kill_9(tmp_path):
    """The protocol's promise: a commit that returned is on disk even if the process dies now."""
    path = tmp_path / "chat.db"
    script = (
        "import os, signal, sys\n"
        "from selchat.core.events import Message\n"
        "from selchat.core.store import SQLiteStore\n"
        "s = SQLiteStore(sys.argv[1])\n"
        "for i in range(1, 51):\n"
        "    s.add(Message(i, i, 'al', 'm%d' % i, '#lobby'))\n"
        "    if i % 10 == 0:\n"
        "        s.commit()\n"
        "s.add(Message(51, 51, 'al', 'queued only', '#lobby'))\n"
        "print('committed', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout == "committed\n"
    assert os.path.getsize(str(path) + "-wal") > 0  # the rows are in the WAL, not checkpointed
    store = SQLiteStore(path)
    assert store.last_id() == 50
    assert ids(store.recent("#lobby", None, 200)) == (list(range(1, 51)), False)
    store.close()


def test_pragmas(tmp_path):
    store = SQLiteStore(tmp_path / "a.db")
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    store = SQLiteStore(tmp_path / "b.db", synchronous="full")
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "c.db", synchronous="OFF")


def test_history_is_an_index_range_query():
    store = SQLiteStore(":memory:")
    plan = " ".join(
        row[-1]
        for row in store._conn.execute(
            "EXPLAIN QUERY PLAN SELECT id, ts, sender, text, room FROM messages"
            " WHERE room_key = ? AND id < ? ORDER BY id DESC LIMIT ?",
            ("#lobby", 100, 51),
        )
    )
    assert "USING INDEX messages_room" in plan and "TEMP B-TREE" not in plan, plan
    store.close()


def test_one_server_per_file(tmp_path):
    path = tmp_path / "chat.db"
    first = SQLiteStore(path)
    with pytest.raises(StoreError, match="locked"):
        SQLiteStore(path, lock_timeout=0)
    first.close()
    SQLiteStore(path, lock_timeout=0).close()  # free again once the first one is closed


# -- SQLite: schema versions ----------------------------------------------------------------------

V2 = MIGRATIONS + (
    (
        "ALTER TABLE messages ADD COLUMN edited INTEGER",
        "CREATE INDEX messages_sender ON messages (sender, id)",
    ),
)


def user_version(path) -> int:
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_upgrade_keeps_rows(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 30)
    store.close()
    assert user_version(path) == SCHEMA_VERSION
    store = SQLiteStore(path, migrations=V2)
    assert store.schema_version() == SCHEMA_VERSION + 1
    assert store.last_id() == 30
    assert ids(store.recent("#lobby", None, 100)) == (list(range(1, 31)), False)
    columns = [row[1] for row in store._conn.execute("PRAGMA table_info(messages)")]
    assert columns[-1] == "edited"
    fill(store, 1, first=31)
    store.close()
    # The code that only knows version 1 now refuses the file instead of misreading it.
    with pytest.raises(StoreError, match="newer") as info:
        SQLiteStore(path)
    assert str(path) in str(info.value)


def test_version_1_file_gains_the_id_high_water_mark(tmp_path):
    """A file from the first release (no `meta` table) is upgraded and keeps its rows and ids."""
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, migrations=MIGRATIONS[:1])
    fill(store, 7)
    store.close()
    assert user_version(path) == 1
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION and store.last_id() == 7
    assert ids(store.recent("#lobby", None, 100)) == (list(range(1, 8)), False)
    store.close()


def test_ids_of_private_messages_are_not_reused_after_a_restart(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 3)
    store.note_id(4)  # two private messages, never stored
    store.note_id(5)
    assert store.commit() == 0
    store.close()
    store = SQLiteStore(path)
    assert store.last_id() == 5
    store.note_id(6)
    fill(store, 1, first=7)  # a room message in the same pass keeps the higher mark
    store.note_id(9)
    store.commit()
    store.close()
    assert SQLiteStore(path).last_id() == 9


def test_a_failed_write_still_keeps_its_ids_from_coming_back(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 2)
    store._conn.execute("PRAGMA max_page_count = 1")  # the next write fails: disk full
    store.add(Message(id=3, ts=0, sender="a", text="x" * 5000, room="#lobby"))
    with pytest.raises(StoreError):
        store.commit()
    store._conn.execute("PRAGMA max_page_count = 1000000")
    fill(store, 1, first=4)
    store.close()
    assert SQLiteStore(path).last_id() == 4


def test_failed_upgrade_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 5)
    store.close()
    broken = MIGRATIONS + (("ALTER TABLE messages ADD COLUMN extra INTEGER", "THIS IS NOT SQL"),)
    with pytest.raises(StoreError):
        SQLiteStore(path, migrations=broken)
    assert user_version(path) == SCHEMA_VERSION
    store = SQLiteStore(path)
    assert "extra" not in [row[1] for row in store._conn.execute("PRAGMA table_info(messages)")]
    assert store.last_id() == 5
    store.close()


def test_version_0_file_is_upgraded(tmp_path):
    """An empty file is a valid SQLite database at version 0 (e.g. `touch selchat.db`)."""
    path = tmp_path / "chat.db"
    path.touch()
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION
    fill(store, 2)
    store.close()


def test_newer_version_is_refused(tmp_path):
    path = tmp_path / "chat.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="99") as info:
        SQLiteStore(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert user_version(path) == 99


def test_another_programs_database_is_refused(tmp_path):
    foreign = tmp_path / "other.db"
    conn = sqlite3.connect(str(foreign))
    conn.execute("CREATE TABLE accounts (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a selchat database"):
        SQLiteStore(foreign)
    conn = sqlite3.connect(str(foreign))
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["accounts"]
    conn.close()

    marked = tmp_path / "marked.db"
    conn = sqlite3.connect(str(marked))
    conn.execute("PRAGMA application_id = 42")
    conn.close()
    with pytest.raises(StoreError, match="not a selchat database"):
        SQLiteStore(marked)


# -- SQLite: unusable files fail at open ----------------------------------------------------------


def assert_refused(path, **kwargs) -> StoreError:
    with pytest.raises(StoreError) as info:
        SQLiteStore(path, **kwargs)
    text = str(info.value)
    assert str(path) in text and "\n" not in text, text
    return info.value


def test_bad_paths_are_refused(tmp_path):
    assert_refused(tmp_path / "no" / "such" / "dir" / "chat.db")
    assert_refused(tmp_path)  # a directory
    (tmp_path / "plain").write_text("x")
    assert_refused(tmp_path / "plain" / "chat.db")  # a parent that is a file
    assert_refused("")
    assert not (tmp_path / "no").exists()


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "chat.db"
    data = os.urandom(8192)
    path.write_bytes(data)
    assert "not a database" in str(assert_refused(path))
    assert path.read_bytes() == data


def test_corrupt_database_is_refused(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 500)
    store.close()
    raw = bytearray(path.read_bytes())
    page_size = int.from_bytes(raw[16:18], "big")
    raw[page_size:] = b"\xff" * (len(raw) - page_size)  # every page but the header page
    path.write_bytes(bytes(raw))
    assert_refused(path)


def run_unprivileged(check: Callable[[], str]) -> str:
    """Run `check` where file permissions apply: as is, or in a forked child as `nobody` if we
    are root (root writes read-only files anyway, so chmod alone proves nothing)."""
    if os.geteuid() != 0:
        return check()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_fd, check().encode())
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(write_fd, f"child failed: {exc!r}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def open_outcome(path: str) -> str:
    try:
        SQLiteStore(path, lock_timeout=0).close()
    except StoreError as exc:
        return f"StoreError: {exc}"
    return "opened"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged child can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="selchat-store-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop root")
def test_read_only_file_is_refused_at_open(shared_dir):
    path = shared_dir / "chat.db"
    store = SQLiteStore(path)
    fill(store, 3)
    store.close()
    path.chmod(0o444)
    outcome = run_unprivileged(lambda: open_outcome(str(path)))
    assert outcome.startswith("StoreError: ") and str(path) in outcome, outcome
    assert "not writable" in outcome, outcome


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop root")
def test_read_only_directory_is_refused_at_open(shared_dir):
    """The file is writable but the directory is not: no room for the WAL file."""
    directory = shared_dir / "ro"
    directory.mkdir()
    path = directory / "chat.db"
    store = SQLiteStore(path)
    fill(store, 3)
    store.close()
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    path.chmod(0o644)
    directory.chmod(0o555)
    outcome = run_unprivileged(lambda: open_outcome(str(path)))
    assert outcome.startswith("StoreError: ") and str(path) in outcome, outcome
    # a new file in a read-only directory
    outcome = run_unprivileged(lambda: open_outcome(str(directory / "new.db")))
    assert outcome.startswith("StoreError: ") and "directory is not writable" in outcome, outcome


# -- SQLite: a failed commit ----------------------------------------------------------------------


def test_disk_full_drops_the_batch_and_the_store_carries_on(tmp_path):
    store = SQLiteStore(tmp_path / "chat.db")
    fill(store, 3)
    conn = store._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
    for i in range(4, 14):
        store.add(msg(i, text="x" * 3000))
    with pytest.raises(StoreError, match="full") as info:
        store.commit()
    assert "10 message(s)" in str(info.value) and str(tmp_path) in str(info.value)
    assert store.stats()["pending"] == 0 and store.stats()["failures"] == 1
    assert ids(store.recent("#lobby", None, 50)) == ([1, 2, 3], False)  # nothing half-written
    assert store.commit() == 0
    conn.execute("PRAGMA max_page_count = 1073741823")  # space again
    store.add(msg(20))
    assert store.commit() == 1
    assert ids(store.recent("#lobby", None, 50)) == ([1, 2, 3, 20], False)
    store.close()


def test_a_copy_is_kept_once_in_id_order(store):
    """add_copy (a message handed over twice with --redis): the same id is one message, in
    the same pass or a later one, and a copy older than what is kept takes its place by id."""
    fill(store, 3, first=5)
    store.add_copy(msg(6), "#lobby")  # kept already
    store.add_copy(msg(2), "#lobby")  # older: filled in
    store.add_copy(msg(2), "#lobby")  # twice in one pass
    store.commit()
    assert ids(store.recent("#lobby", None, 50)) == ([2, 5, 6, 7], False)
    store.add_copy(msg(9), "#lobby")
    store.add(msg(10))
    store.commit()
    assert ids(store.recent("#lobby", None, 50)) == ([2, 5, 6, 7, 9, 10], False)


def test_duplicate_id_fails_the_whole_batch(store_kind_sqlite):
    store = store_kind_sqlite
    fill(store, 3)
    store.add(msg(4))
    store.add(msg(2))  # a chat-state bug: an id already used
    with pytest.raises(StoreError):
        store.commit()
    assert ids(store.recent("#lobby", None, 50)) == ([1, 2, 3], False)
    store.add(msg(4))
    assert store.commit() == 1


@pytest.fixture(params=["memory", "file"])
def store_kind_sqlite(request, tmp_path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:" if request.param == "memory" else tmp_path / "chat.db")
    yield s
    s.close()


def test_deleted_database_file_fails_commits(tmp_path):
    """SQLite would keep writing to the unlinked inode and lose it all at the next start."""
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 2)
    path.unlink()
    store.add(msg(3))
    with pytest.raises(StoreError, match="gone"):
        store.commit()
    assert ids(store.recent("#lobby", None, 50)) == ([1, 2], False)
    store.add(msg(4))
    with pytest.raises(StoreError, match="gone"):
        store.close()  # close() commits what is queued, and says so when it cannot


def test_replaced_database_file_fails_commits(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 2)
    path.rename(tmp_path / "moved.db")
    path.write_bytes(b"")
    store.add(msg(3))
    with pytest.raises(StoreError, match="replaced"):
        store.commit()
    with pytest.raises(StoreError, match="replaced"):
        store.close()  # it still cannot record how far ids went, and says so


# -- the two stores against a model ---------------------------------------------------------------

ROOMS = ["#a", "#A", "#b", "#B", "#c"]

operation = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(ROOMS), st.integers(1, 3)),  # room, id step
    st.tuples(st.just("commit")),
    st.tuples(
        st.just("recent"),
        st.sampled_from(ROOMS),
        st.one_of(st.none(), st.integers(-2, 60)),
        st.integers(0, 8),
    ),
)


class Model:
    def __init__(self) -> None:
        self.messages: List[Message] = []
        self.queued = 0

    def recent(self, room: str, before: Optional[int], limit: int) -> Tuple[List[Message], bool]:
        match = [
            m for m in self.messages if m.room.lower() == room.lower() and (before is None or m.id < before)
        ]
        return (match[-limit:] if limit else []), len(match) > limit


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=40))
def test_stores_agree_with_a_model(operations):
    model = Model()
    stores = [MemoryStore(), SQLiteStore(":memory:")]
    next_id = 0
    for op in operations:
        if op[0] == "add":
            next_id += op[2]
            message = msg(next_id, op[1])
            model.messages.append(message)
            model.queued += 1
            for s in stores:
                s.add(message)
        elif op[0] == "commit":
            for s in stores:
                assert s.commit() == model.queued
            model.queued = 0
        else:
            expected = model.recent(op[1], op[2], op[3])
            for s in stores:
                assert s.recent(op[1], op[2], op[3]) == expected
    for s in stores:
        assert s.commit() == model.queued
        assert s.last_id() == next_id
        s.close()


# -- ids: reserved in durable blocks (finding 2) --------------------------------------------------

UNCAPPED = 1073741823


def meta(store: SQLiteStore, key: str) -> Optional[int]:
    row = store._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def disk_full(store: SQLiteStore, full: bool = True) -> None:
    """Cap the file at its current size: any write needing a new page fails with SQLITE_FULL."""
    conn = store._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages if full else UNCAPPED}")


def kill(store: SQLiteStore) -> None:
    """What SIGKILL leaves: the connection gone, nothing queued committed, no close() logic."""
    store._conn.close()


def test_allocate_id_increases_and_passes_ids_it_was_told_of(store):
    first = [store.allocate_id() for _ in range(5)]
    assert first == [1, 2, 3, 4, 5]
    store.add(msg(40))  # a caller still counting ids itself
    assert store.allocate_id() == 41
    store.note_id(60)
    assert store.allocate_id() == 61
    store.commit()
    assert store.allocate_id() == 62


def test_ids_resume_above_the_reserved_block_after_a_restart(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, block_size=8)
    assert [store.allocate_id() for _ in range(3)] == [1, 2, 3]
    assert meta(store, "reserved_until") == 8  # durable before id 1 was returned
    assert store.stats()["reservations"] == 1
    kill(store)  # ids 1..3 handed out, nothing stored
    store = SQLiteStore(path, block_size=8)
    assert store.last_id() == 8
    assert store.allocate_id() == 9  # the unused rest of the block is skipped, never reused
    store.close()
    store = SQLiteStore(path, block_size=8)
    store.close()  # an open without allocation reserves nothing
    store = SQLiteStore(path, block_size=8)
    assert store.allocate_id() == 17
    assert [store.allocate_id() for _ in range(8)] == list(range(18, 26))
    assert meta(store, "reserved_until") == 32 and store.stats()["reservations"] == 2
    store.close()


def test_full_disk_then_kill_never_reissues_an_id(tmp_path):
    """Finding 2: commits fail for lack of space, the process dies, space comes back."""
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, block_size=8)
    for _ in range(3):
        store.add(msg(store.allocate_id()))
    store.commit()
    disk_full(store)
    before: List[int] = []
    stored = [1, 2, 3]
    for i in range(30):  # crosses three block ends while (almost) nothing can be stored
        message_id = store.allocate_id()
        before.append(message_id)
        if i % 3:  # a room message; every third a private one (never stored)
            store.add(msg(message_id, text="x" * 3000))
        try:
            if store.commit():
                stored.append(message_id)
        except StoreError:
            pass
    assert store.stats()["failures"] >= 15  # what fits in the last page's free space may pass
    assert meta(store, "reserved_until") == 40  # three reservations made while full
    kill(store)
    store = SQLiteStore(path, block_size=8)  # reopened uncapped: space freed
    after = [store.allocate_id() for _ in range(20)]
    assert min(after) > max(before) > 3
    assert ids(store.recent("#lobby", None, 200)) == (stored, False)
    assert len(stored) < 10
    store.close()


def test_a_reservation_that_cannot_be_written_hands_out_no_id(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, block_size=4)
    handed = [store.allocate_id(), store.allocate_id()]
    store._conn.execute("PRAGMA query_only = ON")  # from now on every write fails
    handed += [store.allocate_id(), store.allocate_id()]  # the block was durable already
    for _ in range(3):
        with pytest.raises(StoreError, match="could not reserve message ids 5") as info:
            store.allocate_id()
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    stats = store.stats()
    assert (stats["reservations"], stats["reservation_failures"], stats["reserved_until"]) == (1, 3, 4)
    store._conn.execute("PRAGMA query_only = OFF")  # writable again, same process
    handed.append(store.allocate_id())
    assert handed == [1, 2, 3, 4, 5]  # unique and increasing: the failures used none
    assert meta(store, "reserved_until") == 8
    store._conn.execute("PRAGMA query_only = ON")
    handed += [store.allocate_id() for _ in range(3)]
    with pytest.raises(StoreError):
        store.allocate_id()
    kill(store)
    store = SQLiteStore(path, block_size=4)
    assert store.allocate_id() > max(handed)
    store.close()


def test_a_reservation_on_a_deleted_file_fails(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, block_size=2)
    assert [store.allocate_id(), store.allocate_id()] == [1, 2]
    path.unlink()
    with pytest.raises(StoreError, match="gone"):
        store.allocate_id()
    kill(store)


def test_failed_commits_leave_the_reservation_alone(tmp_path):
    store = SQLiteStore(tmp_path / "chat.db", block_size=4)
    store.add(msg(store.allocate_id()))
    store.commit()
    disk_full(store)
    for _ in range(3):
        store.add(msg(store.allocate_id(), text="y" * 5000))
    with pytest.raises(StoreError, match="full"):
        store.commit()
    assert meta(store, "reserved_until") == 4
    assert not store._conn.in_transaction  # the next reservation is its own transaction
    store.add(msg(store.allocate_id(), text="z" * 5000))  # id 5: a new block, while full
    assert meta(store, "reserved_until") == 8
    with pytest.raises(StoreError):
        store.commit()
    assert meta(store, "reserved_until") == 8  # the rolled-back commit did not take it along
    disk_full(store, False)
    store.add(msg(store.allocate_id()))
    assert store.commit() == 1
    assert ids(store.recent("#lobby", None, 50)) == ([1, 6], False)
    assert store.stats()["failures"] == 2
    store.close()


def test_reservation_runs_with_full_sync_and_restores_the_setting(tmp_path):
    store = SQLiteStore(tmp_path / "chat.db", block_size=2)
    seen: List[int] = []
    store._conn.set_trace_callback(lambda sql: seen.append(sql))
    store.allocate_id()
    store._conn.set_trace_callback(None)
    assert seen[0] == "PRAGMA synchronous = FULL" and seen[-1] == "PRAGMA synchronous = NORMAL", seen
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    store.close()


def test_version_2_file_is_upgraded_to_reservations(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, migrations=MIGRATIONS[:2])
    fill(store, 3)
    store.note_id(10)  # a private message, recorded by the v2 high-water mark
    store.commit()
    store.close()
    assert user_version(path) == 2
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 5
    assert meta(store, "reserved_until") == 10 and store.last_id() == 10
    assert store.allocate_id() == 11
    assert ids(store.recent("#lobby", None, 50)) == ([1, 2, 3], False)
    store.close()


def test_version_1_file_is_upgraded_to_reservations(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path, migrations=MIGRATIONS[:1])
    fill(store, 7)
    store.close()
    store = SQLiteStore(path)
    assert meta(store, "reserved_until") == 7 and meta(store, "last_id") == 7
    assert store.allocate_id() == 8
    store.close()
    with pytest.raises(StoreError, match="newer"):  # and a v3 file is refused by v2 code
        SQLiteStore(path, migrations=MIGRATIONS[:2])


def test_ids_end_at_the_int64_limit(tmp_path):
    store = SQLiteStore(tmp_path / "chat.db", block_size=1024)
    store.note_id((1 << 63) - 3)
    assert [store.allocate_id(), store.allocate_id()] == [(1 << 63) - 2, (1 << 63) - 1]
    with pytest.raises(StoreError, match="exhausted"):
        store.allocate_id()
    store.close()
    memory = MemoryStore()
    memory.note_id((1 << 63) - 1)
    with pytest.raises(StoreError, match="exhausted"):
        memory.allocate_id()
    with pytest.raises(ValueError):
        SQLiteStore(":memory:", block_size=0)


def test_full_disk_then_sigkill_never_reissues_an_id(tmp_path):
    """The same as a real process: SIGKILL while the disk is full and writes fail, then restart."""
    path = tmp_path / "chat.db"
    script = (
        "import json, os, signal, sys\n"
        "from selchat.core.events import Message\n"
        "from selchat.core.store import SQLiteStore, StoreError\n"
        "s = SQLiteStore(sys.argv[1], block_size=16)\n"
        "handed = []\n"
        "def say(text):\n"
        "    i = s.allocate_id(); handed.append(i)\n"
        "    s.add(Message(i, i, 'al', text, '#lobby'))\n"
        "for n in range(10):\n"
        "    say('stored %d' % n)\n"
        "s.commit()\n"
        "pages = s._conn.execute('PRAGMA page_count').fetchone()[0]\n"
        "s._conn.execute('PRAGMA max_page_count = %d' % pages)\n"
        "failed = 0\n"
        "for n in range(60):\n"
        "    say('x' * 4000)\n"
        "    handed.append(s.allocate_id())  # a private message\n"
        "    try:\n"
        "        s.commit()\n"
        "    except StoreError:\n"
        "        failed += 1\n"
        "s._conn.execute('PRAGMA query_only = ON')\n"
        "refused = 0\n"
        "for n in range(40):\n"
        "    try:\n"
        "        handed.append(s.allocate_id())\n"
        "    except StoreError:\n"
        "        refused += 1\n"
        "print(json.dumps({'handed': handed, 'failed': failed, 'refused': refused}), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    report = json.loads(result.stdout)
    handed = report["handed"]
    assert report["failed"] >= 50 and report["refused"] > 0
    assert handed == sorted(set(handed))  # unique and increasing within the run
    store = SQLiteStore(path)
    after = [store.allocate_id() for _ in range(50)]
    assert min(after) > max(handed)
    stored = [m.id for m in store.recent("#lobby", None, 200)[0]]
    assert stored[:10] == handed[:10] and set(stored) <= set(handed)
    store.close()


id_operation = st.one_of(
    st.tuples(st.just("room"), st.integers(1, 6000)),  # allocate and queue, text of that size
    st.tuples(st.just("private")),
    st.tuples(st.just("commit")),
    st.tuples(st.just("full"), st.booleans()),
    st.tuples(st.just("readonly"), st.booleans()),
    st.tuples(st.just("kill")),
    st.tuples(st.just("close")),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(id_operation, max_size=60), st.integers(1, 6))
def test_ids_always_increase_whatever_the_disk_does(operations, block_size):
    """Any mix of full disk, unwritable file, failed commits, kills and restarts: every id is
    above every id handed out before it, and what history holds was committed."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "chat.db")
        store = SQLiteStore(path, block_size=block_size)
        handed: List[int] = []
        committed: List[int] = []
        queued: List[int] = []
        for op in operations:
            kind = op[0]
            if kind in ("room", "private"):
                try:
                    message_id = store.allocate_id()
                except StoreError:
                    continue
                assert not handed or message_id > handed[-1]
                handed.append(message_id)
                if kind == "room":
                    store.add(msg(message_id, text="t" * op[1]))
                    queued.append(message_id)
            elif kind == "commit":
                try:
                    store.commit()
                    committed += queued
                except StoreError:
                    pass
                queued = []
            elif kind == "full":
                disk_full(store, op[1])
            elif kind == "readonly":
                store._conn.execute(f"PRAGMA query_only = {'ON' if op[1] else 'OFF'}")
            else:
                if kind == "kill":
                    kill(store)
                else:
                    store._conn.execute("PRAGMA query_only = OFF")
                    store._conn.execute(f"PRAGMA max_page_count = {UNCAPPED}")
                    store.close()
                    committed += queued
                queued = []
                store = SQLiteStore(path, block_size=block_size)  # space freed
                assert [m.id for m in store.recent("#lobby", None, 1000)[0]] == committed
        kill(store)
        store = SQLiteStore(path, block_size=block_size)
        assert store.allocate_id() > max(handed, default=0)
        assert [m.id for m in store.recent("#lobby", None, 1000)[0]] == committed
        store.close()


# -- history: `before` of any size (finding 6) ----------------------------------------------------

huge_int = st.one_of(
    st.integers(),
    st.sampled_from([-(1 << 63) - 1, -(1 << 63), (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 200), 1 << 200]),
    st.integers(-3, 30),
)


@settings(max_examples=300, deadline=None)
@given(before=huge_int, limit=st.one_of(st.integers(0, 12), st.integers(0, 1 << 80)))
def test_before_and_limit_of_any_size(before, limit):
    model = Model()
    stores = [MemoryStore(), SQLiteStore(":memory:")]
    for i in range(1, 21):
        message = msg(i, "#a" if i % 4 else "#b")
        model.messages.append(message)
        for s in stores:
            s.add(message)
            if i == 15:
                s.commit()  # 16..20 stay queued: both paths of SQLiteStore.recent
    expected = model.recent("#a", before, limit)
    if before <= 1:
        assert expected == ([], False)
    if before > (1 << 63) - 1:
        assert expected == model.recent("#a", None, limit)
    for s in stores:
        assert s.recent("#A", before, limit) == expected
        s.close()


def test_version_3_file_is_upgraded_and_messages_keep_how_they_were_said(tmp_path):
    """Schema v4: an action or notice, and the sender's ident@host, come back from history as
    they went out live (IRC clients compare history with what they saw)."""
    path = tmp_path / "chat.db"
    old = SQLiteStore(path, migrations=MIGRATIONS[:3])
    fill(old, 2)
    old.close()
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 5
    said = Message(store.allocate_id(), 5000, "ann", "waves", room="#lobby", action=True,
                   userhost="ann@irc.selchat")
    store.add(said)
    store.add(Message(store.allocate_id(), 5001, "bob", "psst", room="#lobby", notice=True))
    store.commit()
    store.close()
    store = SQLiteStore(path)
    page, _ = store.recent("#lobby", None, 50)
    assert [(m.action, m.notice, m.userhost) for m in page] == [
        (False, False, ""), (False, False, ""), (True, False, "ann@irc.selchat"), (False, True, "")]
    assert store.window("#lobby", after=page[1].id, limit=1, latest=False)[0].userhost == "ann@irc.selchat"
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_page_stops_at_its_byte_budget_and_says_more(tmp_path, kind):
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "chat.db")
    for i in range(30):
        store.add(Message(store.allocate_id(), i, "w", f"{i:02d}" + "x" * 998, room="#r"))
    store.commit()
    page, more = store.recent("#r", None, 200, max_bytes=5000)
    assert [m.text[:2] for m in page] == ["26", "27", "28", "29"] and more
    whole, more = store.recent("#r", None, 200)
    assert len(whole) == 30 and not more
    one, more = store.recent("#r", None, 200, max_bytes=10)  # never less than one message
    assert [m.text[:2] for m in one] == ["29"] and more
    store.close()


# -- schema v5: accounts --------------------------------------------------------------------------


def test_a_version_4_file_gains_accounts_and_keeps_its_history(tmp_path):
    """The database of the release before accounts opens as v5: every message is still there
    (the same ids, texts and flags), and accounts, tokens, registered rooms and mailboxes are
    kept from then on."""
    from selchat.core.events import Message
    from selchat.core.store import pair_key

    path = tmp_path / "chat.db"
    old = SQLiteStore(path, migrations=MIGRATIONS[:4])
    fill(old, 30)
    before, _ = old.recent("#lobby", None, 50)
    old.close()
    assert user_version(path) == 4
    store = SQLiteStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 5
    after, more = store.recent("#lobby", None, 50)
    assert after == before and len(after) == 30 and not more
    assert all(m.account is None for m in after)
    directory = store.directory
    directory.save_account("ann", "Ann", "verifier-text", 1)
    directory.save_room("#den", "#Den", "ann", "{}")
    directory.save_token("digest", "ann", 2)
    waiting = Message(store.allocate_id(), 3, "bob", "while away", None, "Ann", account="bob")
    assert directory.add_mail("ann", waiting)
    private = Message(store.allocate_id(), 4, "Ann", "hi bob", None, "bob", account="Ann")
    store.add_private(private, pair_key("ann", "bob"))
    store.add(msg(store.allocate_id(), "#lobby"))
    assert store.commit() == 1
    store.close()
    again = SQLiteStore(path)
    assert again.directory.accounts == {"ann": ("Ann", "verifier-text", 1)}
    assert again.directory.rooms == {"#den": ("#Den", "ann", "{}")}
    assert again.directory.tokens == {"digest": ("ann", 2)}
    assert again.directory.take_mail("ann") == [waiting]
    got, _ = again.recent(pair_key("ann", "bob"), None, 10)
    assert got == [private] and got[0].to == "bob" and got[0].room is None
    # A private conversation is never served as a room's history.
    assert all(m.room == "#lobby" for m in again.recent("#lobby", None, 100)[0])
    again.close()


@pytest.mark.parametrize("count", [1, 2, 63, 64, 65, 130, 200])
def test_one_commit_of_many_messages_keeps_every_one_whole(tmp_path, count):
    """A commit writes its rows many to a statement: every count around the statement's size
    comes back whole and in order, after a restart too."""
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    for i in range(1, count + 1):
        store.add(Message(id=i, ts=1_700_000_000_000 + i, sender=f"s{i % 7}", text=f"t{i} ✓",
                          room="#lobby" if i % 3 else "#Other", userhost=f"u{i}@h"))
    assert store.commit() == count
    store.close()
    store = SQLiteStore(path)
    got = store.recent("#lobby", None, 1000)[0] + store.recent("#other", None, 1000)[0]
    assert sorted((m.id, m.sender, m.text, m.room, m.userhost) for m in got) == [
        (i, f"s{i % 7}", f"t{i} ✓", "#lobby" if i % 3 else "#Other", f"u{i}@h") for i in range(1, count + 1)]
    store.close()


def test_a_refused_row_in_a_big_commit_stores_none_of_it(tmp_path):
    path = tmp_path / "chat.db"
    store = SQLiteStore(path)
    fill(store, 10)
    for i in range(11, 111):
        store.add(msg(i))
    store.add(msg(5))  # an id already stored: the database refuses the commit
    with pytest.raises(StoreError):
        store.commit()
    assert ids(store.recent("#lobby", None, 1000)) == (list(range(1, 11)), False)
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_window_of_a_conversation_includes_this_pass_messages(tmp_path, kind):
    """CHATHISTORY of a private conversation asked in the pass a message was said: the
    message is there, committed or not (as for a room)."""
    from selchat.core.store import pair_key
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "chat.db")
    pair = pair_key("alice", "bob")
    store.add_private(Message(id=1, ts=1_700_000_000_001, sender="alice", text="one", to="bob"), pair)
    store.commit()
    store.add_private(Message(id=2, ts=1_700_000_000_002, sender="bob", text="two", to="alice"), pair)
    got = store.window(pair, limit=10)
    assert [m.id for m in got] == [1, 2]
    store.close()
