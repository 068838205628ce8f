"""Accounts: who owns which name, remember-me tokens, and the limits on guessing passwords.

No I/O and no clock: the store's `Directory` keeps the records (durable at the next commit),
the caller passes the time. Passwords themselves are never seen here: the hub runs the slow
key derivation off the loop (`selchat.kdf`) and hands in only what it decided.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Dict, Iterable, List, Optional, Set, Tuple

from selchat.core.names import fold
from selchat.defaults import MAX_ACCOUNTS

TOKENS_PER_ACCOUNT = 20  # remember-me tokens one account keeps; a new one past it drops the oldest

# Failed logins, as token buckets (docs/protocol.md, "Accounts"). Per account: 5 tries, then
# one a minute (60 guesses an hour, at most, however many addresses guess). Per address: 20,
# then one every 20 s. A try is refused (`login_throttled`) before any password work is done.
ACCOUNT_TRIES = 5
ACCOUNT_REFILL = 60.0  # seconds per try regained
ADDRESS_TRIES = 20
ADDRESS_REFILL = 20.0
THROTTLE_TABLE = 10000  # keys each table holds; the least recently failed go first


class _Tries:
    """Failed-login buckets by key, bounded: a full table forgets its least recent entry."""

    __slots__ = ("tries", "refill", "table")

    def __init__(self, tries: int, refill: float) -> None:
        self.tries = tries
        self.refill = refill
        self.table: Dict[str, Tuple[float, float]] = {}  # key -> (tries left, when counted)

    def left(self, key: str, now: float) -> float:
        entry = self.table.get(key)
        if entry is None:
            return float(self.tries)
        tries, then = entry
        return min(float(self.tries), tries + max(0.0, now - then) / self.refill)

    def fail(self, key: str, now: float) -> None:
        left = self.left(key, now) - 1.0
        table = self.table
        table.pop(key, None)
        if len(table) >= THROTTLE_TABLE:
            del table[next(iter(table))]
        table[key] = (max(0.0, left), now)

    def refund(self, key: str, now: float) -> None:
        """A try taken back (where the key sits in the table does not change)."""
        if key in self.table:
            self.table[key] = (min(float(self.tries), self.left(key, now) + 1.0), now)

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` may try again (0 when it may now)."""
        left = self.left(key, now)
        return 0.0 if left >= 1.0 else (1.0 - left) * self.refill


class LoginThrottle:
    """Failed logins limited per address and per account, so a guesser pays in hours."""

    def __init__(self) -> None:
        self.by_account = _Tries(ACCOUNT_TRIES, ACCOUNT_REFILL)
        self.by_address = _Tries(ADDRESS_TRIES, ADDRESS_REFILL)

    def wait(self, account_key: Optional[str], address: str, now: float) -> float:
        """Seconds until a login may be tried (`account_key` None: per address only)."""
        by_account = self.by_account.wait(account_key, now) if account_key is not None else 0.0
        return max(by_account, self.by_address.wait(address, now))

    def failed(self, account_key: Optional[str], address: str, now: float) -> None:
        """A failed login; `account_key` None when the name is no account (nothing there to
        protect, and made-up names must not push real accounts out of the table)."""
        if account_key is not None:
            self.by_account.fail(account_key, now)
        if address:
            self.by_address.fail(address, now)

    def refund(self, account_key: Optional[str], address: str, now: float) -> None:
        """A try charged before the password work, given back (see Hub.authenticate)."""
        if account_key is not None:
            self.by_account.refund(account_key, now)
        if address:
            self.by_address.refund(address, now)


def token_digest(token: str) -> str:
    """Tokens are kept only as digests: a copy of the database opens no account. A token is
    32 random bytes, so a fast hash is enough (nothing to guess)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Accounts:
    """The accounts the server knows, over the store's directory."""

    def __init__(self, directory: object, operators: Iterable[str] = (),
                 registration: bool = True, max_accounts: int = MAX_ACCOUNTS) -> None:
        self.directory = directory
        self.operators: Set[str] = {fold(name) for name in operators}
        self.registration = registration
        self.max_accounts = max_accounts
        self.throttle = LoginThrottle()
        # The next token to issue, when it was drawn elsewhere (with --redis, by the process
        # that asked: every process's copy keeps the same one); None: drawn here.
        self.next_token: Optional[str] = None

    def full(self) -> bool:
        return len(self.directory.accounts) >= self.max_accounts  # type: ignore[attr-defined]

    def exists(self, key: str) -> bool:
        return key in self.directory.accounts  # type: ignore[attr-defined]

    def name(self, key: str) -> Optional[str]:
        record = self.directory.accounts.get(key)  # type: ignore[attr-defined]
        return record[0] if record is not None else None

    def verifier(self, key: str) -> Optional[str]:
        record = self.directory.accounts.get(key)  # type: ignore[attr-defined]
        return record[1] if record is not None else None

    def create(self, name: str, verifier: str, now_ms: int) -> None:
        self.directory.save_account(fold(name), name, verifier, now_ms)  # type: ignore[attr-defined]

    def set_verifier(self, key: str, verifier: str) -> None:
        name, _, created = self.directory.accounts[key]  # type: ignore[attr-defined]
        self.directory.save_account(key, name, verifier, created)  # type: ignore[attr-defined]

    def is_operator(self, key: Optional[str]) -> bool:
        return key is not None and key in self.operators

    # --- remember-me tokens -------------------------------------------------------------------

    def issue_token(self, key: str, now_ms: int) -> str:
        directory = self.directory
        token = self.next_token or secrets.token_urlsafe(32)
        self.next_token = None
        mine: List[Tuple[int, str]] = sorted(
            (created, digest)
            for digest, created in directory.tokens_by_account.get(key, {}).items())  # type: ignore[attr-defined]
        for _, digest in mine[: max(0, len(mine) - TOKENS_PER_ACCOUNT + 1)]:
            directory.drop_token(digest)  # type: ignore[attr-defined]
        directory.save_token(token_digest(token), key, now_ms)  # type: ignore[attr-defined]
        return token

    def token_matches(self, key: str, token: str) -> bool:
        entry = self.directory.tokens.get(token_digest(token))  # type: ignore[attr-defined]
        return entry is not None and hmac.compare_digest(entry[0], key)

    def revoke(self, key: str, token: Optional[str]) -> None:
        """Forget `token` (when it is `key`'s), or, without one, every token of `key`."""
        directory = self.directory
        if token is not None:
            digest = token_digest(token)
            entry = directory.tokens.get(digest)  # type: ignore[attr-defined]
            if entry is not None and entry[0] == key:
                directory.drop_token(digest)  # type: ignore[attr-defined]
            return
        for digest in list(directory.tokens_by_account.get(key, ())):  # type: ignore[attr-defined]
            directory.drop_token(digest)  # type: ignore[attr-defined]


def read_operators(path: str) -> List[str]:
    """The operators file: one account name a line; blank lines and '#' comments ignored."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    return names
