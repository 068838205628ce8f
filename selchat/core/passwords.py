"""Passwords: the rule, the stored verifier, and SCRAM-SHA-256 (RFC 5802, RFC 7677).

Pure functions and one small sans-I/O class: no sockets, no files, no clock, nothing logged
(a password or a verifier never reaches a log line from here). Randomness comes from
`os.urandom` (salts, nonces).

A verifier is one line of text that holds two things derived from one password:

    $scrypt$n=8192,r=5,p=1$SALT$HASH$scram-sha-256$i=16384$SALT$STOREDKEY$SERVERKEY

* the scrypt hash (standard library `hashlib.scrypt`), which `check_password` recomputes: the
  cost parameters travel in the record, so a later release can raise them and still check
  the passwords hashed before (`needs_rehash` says when a record is below today's cost);
* SCRAM-SHA-256 credentials (RFC 5802 section 3, RFC 7677), so the IRC door can run SASL
  SCRAM-SHA-256 without ever seeing the password. They are left out when the password does
  not survive SASLprep (RFC 4013), which SCRAM requires of both sides; such an account logs
  in with PLAIN only (`scram_credentials` answers None).

Every field is standard base64 with padding (what SCRAM itself puts on the wire), and every
number is bounded when read, so a corrupt or hostile record costs at most a bounded
computation and is otherwise simply a failed check, never an exception.

The SCRAM credentials are the weaker half against someone who steals the database: PBKDF2 is
cheaper to guess on a GPU than scrypt. Their iteration count is raised above RFC 7677's 4096
for that reason; what it costs is paid by the client at each SCRAM login and by the server
once per registration (see docs/design.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import stringprep
import unicodedata
from typing import List, NamedTuple, Optional, Tuple, Union

MIN_BYTES = 8
MAX_BYTES = 256

# Today's cost (docs/design.md has the measurements): one check about 13 ms on the reference
# machine, 5 MiB of memory.
SCRYPT_N = 8192
SCRYPT_R = 5
SCRYPT_P = 1
SCRAM_ITERATIONS = 16384
SALT_BYTES = 16
HASH_BYTES = 32

# What a record may ask for when read back: more is a broken record, not a slow check.
MAX_SCRYPT_MEMORY = 128 << 20  # bytes that OpenSSL's scrypt allocates: 128 * r * (n + p + 2)
MAX_SCRYPT_WORK = 1 << 22  # n * r * p: about a hundred times today's cost
MAX_SCRYPT_R = 64
MAX_SCRYPT_P = 16
MIN_SCRAM_ITERATIONS = 4096  # RFC 7677's floor
MAX_SCRAM_ITERATIONS = 1 << 24
MAX_VERIFIER = 1024  # characters
MAX_SCRAM_MESSAGE = 4096  # characters of one SCRAM message

_SCRYPT_TAG = "scrypt"
_SCRAM_TAG = "scram-sha-256"
_NUMBER = re.compile(r"[1-9][0-9]{0,9}\Z")


# --- the rule -----------------------------------------------------------------------------


def password_problem(password: object) -> Optional[str]:
    """What is wrong with `password` as a new password, in words; None when it is acceptable."""
    if not isinstance(password, str):
        return "a password is text"
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        return "a password must be valid Unicode text"
    if size < MIN_BYTES:
        return f"a password has at least {MIN_BYTES} bytes in UTF-8"
    if size > MAX_BYTES:
        return f"a password has at most {MAX_BYTES} bytes in UTF-8"
    return None


# --- the record ---------------------------------------------------------------------------


class ScramCredentials(NamedTuple):
    """What SCRAM-SHA-256's server keeps for a user (RFC 5802 section 3)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


class _Record(NamedTuple):
    n: int
    r: int
    p: int
    salt: bytes
    hash: bytes
    scram: Optional[ScramCredentials]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, low: int, high: int) -> Optional[bytes]:
    """Canonical standard base64 of `low`..`high` bytes, or None."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    if not low <= len(data) <= high or _b64(data) != text:
        return None
    return data


def _number(text: str) -> Optional[int]:
    return int(text) if _NUMBER.match(text) else None


def _scrypt_params_ok(n: int, r: int, p: int) -> bool:
    return (n >= 2 and n & (n - 1) == 0 and 1 <= r <= MAX_SCRYPT_R and 1 <= p <= MAX_SCRYPT_P
            and n * r * p <= MAX_SCRYPT_WORK and 128 * r * (n + p + 2) <= MAX_SCRYPT_MEMORY)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, size: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=size,
                          maxmem=MAX_SCRYPT_MEMORY + (1 << 20))


def _parse(verifier: object) -> Optional[_Record]:
    if not isinstance(verifier, str) or len(verifier) > MAX_VERIFIER:
        return None
    parts = verifier.split("$")
    if len(parts) not in (5, 10) or parts[0] != "" or parts[1] != _SCRYPT_TAG:
        return None
    params = parts[2].split(",")
    if len(params) != 3 or not all(len(kv) > 2 and kv[1] == "=" for kv in params):
        return None
    if [kv[0] for kv in params] != ["n", "r", "p"]:
        return None
    n, r, p = (_number(kv[2:]) for kv in params)
    if n is None or r is None or p is None or not _scrypt_params_ok(n, r, p):
        return None
    salt = _unb64(parts[3], 8, 64)
    digest = _unb64(parts[4], 16, 64)
    if salt is None or digest is None:
        return None
    scram = None
    if len(parts) == 10:
        if parts[5] != _SCRAM_TAG or not parts[6].startswith("i="):
            return None
        iterations = _number(parts[6][2:])
        if iterations is None or not MIN_SCRAM_ITERATIONS <= iterations <= MAX_SCRAM_ITERATIONS:
            return None
        scram_salt = _unb64(parts[7], 8, 64)
        stored = _unb64(parts[8], 32, 32)
        server = _unb64(parts[9], 32, 32)
        if scram_salt is None or stored is None or server is None:
            return None
        scram = ScramCredentials(scram_salt, iterations, stored, server)
    return _Record(n, r, p, salt, digest, scram)


def scram_keys(password: str, salt: bytes, iterations: int) -> Tuple[bytes, bytes]:
    """(StoredKey, ServerKey) for `password` (SASLprep'd here; ValueError if it cannot be)."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password).encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return hashlib.sha256(client_key).digest(), server_key


def make_verifier(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
                  iterations: int = SCRAM_ITERATIONS) -> str:
    """The record to store for `password` (ValueError if the rule refuses it, or bad costs)."""
    problem = password_problem(password)
    if problem is not None:
        raise ValueError(problem)
    if not _scrypt_params_ok(n, r, p):
        raise ValueError("scrypt cost out of bounds")
    if not MIN_SCRAM_ITERATIONS <= iterations <= MAX_SCRAM_ITERATIONS:
        raise ValueError("SCRAM iteration count out of bounds")
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, n, r, p, HASH_BYTES)
    record = f"${_SCRYPT_TAG}$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"
    scram_salt = os.urandom(SALT_BYTES)
    try:
        stored, server = scram_keys(password, scram_salt, iterations)
    except ValueError:  # not SASLprep-able: PLAIN only
        return record
    return record + f"${_SCRAM_TAG}$i={iterations}${_b64(scram_salt)}${_b64(stored)}${_b64(server)}"


# A record at today's cost that no password opens (its hash is not scrypt's output for its
# salt, but-for odds of 2**-256): checking against it costs what a real check costs, so an
# unknown account can be answered after the same work as a wrong password.
UNKNOWN_VERIFIER = (f"${_SCRYPT_TAG}$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}$"
                    f"{_b64(bytes(SALT_BYTES))}${_b64(bytes(HASH_BYTES))}")


def verifier_ok(verifier: object) -> bool:
    """The record parses (cheap: no hashing)."""
    return _parse(verifier) is not None


def check_password(password: object, verifier: object) -> bool:
    """Whether `password` opens `verifier`; False for anything that does not parse."""
    record = _parse(verifier)
    if record is None or not isinstance(password, str):
        return False
    try:
        secret = password.encode("utf-8")
        digest = _scrypt(secret, record.salt, record.n, record.r, record.p, len(record.hash))
    except (UnicodeEncodeError, ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest, record.hash)


def needs_rehash(verifier: object) -> bool:
    """The record is below today's cost (or unreadable): worth rewriting at the next login."""
    record = _parse(verifier)
    if record is None:
        return True
    return (record.n * record.r * record.p < SCRYPT_N * SCRYPT_R * SCRYPT_P
            or (record.scram is not None and record.scram.iterations < SCRAM_ITERATIONS))


def scram_credentials(verifier: object) -> Optional[ScramCredentials]:
    """The record's SCRAM-SHA-256 credentials; None when it has none or does not parse."""
    record = _parse(verifier)
    return record.scram if record is not None else None


# --- SASLprep (RFC 4013), which SCRAM applies to the password -----------------------------

_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
    stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
    stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
)


def saslprep(text: str, stored: bool = True) -> str:
    """RFC 4013's profile of stringprep; ValueError for a prohibited or empty result.

    `stored` follows RFC 3454 section 7: unassigned code points are refused in what is stored
    (a later Unicode could give them a mapping), allowed in a query.
    """
    mapped = []
    for ch in text:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")  # non-ASCII space -> SPACE
        elif not stringprep.in_table_b1(ch):  # B.1: commonly mapped to nothing
            mapped.append(ch)
    result = unicodedata.normalize("NFKC", "".join(mapped))
    if not result:
        raise ValueError("empty after SASLprep")
    for ch in result:
        if any(table(ch) for table in _PROHIBITED) or (stored and stringprep.in_table_a1(ch)):
            raise ValueError("a character SASLprep prohibits")
    if any(stringprep.in_table_d1(ch) for ch in result):
        if (any(stringprep.in_table_d2(ch) for ch in result)
                or not stringprep.in_table_d1(result[0]) or not stringprep.in_table_d1(result[-1])):
            raise ValueError("mixed right-to-left text")
    return result


# --- SCRAM-SHA-256, the server's side --------------------------------------------------------


class ScramError(Exception):
    """A SCRAM exchange that cannot go on. `code` is RFC 5802's server-error-value (for `e=`)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code


_PROCESS_SECRET = os.urandom(32)  # salts made up for unknown users: stable within a process


def _text(message: Union[str, bytes]) -> str:
    if isinstance(message, (bytes, bytearray)):
        try:
            message = bytes(message).decode("utf-8")
        except UnicodeDecodeError:
            raise ScramError("invalid-encoding", "not UTF-8") from None
    if not isinstance(message, str):
        raise ScramError("other-error", "not text")
    if len(message) > MAX_SCRAM_MESSAGE:
        raise ScramError("other-error", "message too long")
    if "\0" in message:
        raise ScramError("invalid-encoding", "NUL in message")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise ScramError("invalid-encoding", "not Unicode text") from None
    return message


def _saslname(value: str) -> str:
    """RFC 5802's saslname: '=2C' is ',' and '=3D' is '='; any other '=' is an error."""
    if not value:
        raise ScramError("invalid-username-encoding", "empty name")
    out: List[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "=":
            code = value[i + 1:i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise ScramError("invalid-username-encoding", "bad '=' escape")
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _to_saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _nonce_ok(nonce: str) -> bool:
    return bool(nonce) and all("\x21" <= ch <= "\x7e" and ch != "," for ch in nonce)


def _attribute(part: str, key: str) -> str:
    if not part.startswith(key + "="):
        raise ScramError("other-error", f"expected attribute {key}")
    return part[len(key) + 1:]


def _new_nonce() -> str:
    return _b64(os.urandom(18))  # 24 characters of base64, no ',' and no padding


class ScramServer:
    """One SCRAM-SHA-256 exchange, server side, with no I/O (the door moves the messages).

    client_first(msg) -> username; look the account up; server_first(credentials or None) ->
    message to send; client_final(msg) -> server-final message to send (`v=...`) when the
    proof is right, else ScramError("invalid-proof"). Any ScramError ends the exchange (the
    door answers its failure); methods out of order raise ScramError too. For an unknown user
    pass None: the exchange goes on with made-up credentials (a salt stable for the name within
    this process) and fails at the proof, so it does not tell which accounts exist.
    """

    __slots__ = ("username", "authzid", "authenticated", "_state", "_nonce", "_bare",
                 "_gs2", "_server_first", "_creds")

    def __init__(self, nonce: Optional[str] = None) -> None:
        if nonce is not None and not _nonce_ok(nonce):
            raise ValueError("a nonce is printable ASCII without ','")
        self.username = ""
        self.authzid = ""  # the identity asked to act as; "" when it is the username's own
        self.authenticated = False
        self._state = "start"
        self._nonce = nonce if nonce is not None else _new_nonce()
        self._bare = ""
        self._gs2 = ""
        self._server_first = ""
        self._creds: Optional[ScramCredentials] = None

    def _expect(self, state: str) -> None:
        if self._state != state:
            self._state = "failed"
            raise ScramError("other-error", "message out of order")

    def client_first(self, message: Union[str, bytes]) -> str:
        """Parse client-first-message; the (decoded) user name it logs in as."""
        self._expect("start")
        self._state = "failed"  # until it parsed
        text = _text(message)
        pieces = text.split(",", 2)
        if len(pieces) != 3:
            raise ScramError("other-error", "no GS2 header")
        flag, authz, bare = pieces
        if flag.startswith("p="):
            raise ScramError("channel-binding-not-supported")
        if flag not in ("n", "y"):
            raise ScramError("other-error", "bad channel binding flag")
        authzid = _saslname(_attribute(authz, "a")) if authz else ""
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            raise ScramError("extensions-not-supported")
        if len(attrs) < 2:
            raise ScramError("other-error", "no nonce")
        username = _saslname(_attribute(attrs[0], "n"))
        nonce = _attribute(attrs[1], "r")
        if not _nonce_ok(nonce):
            raise ScramError("other-error", "bad nonce")
        for extra in attrs[2:]:  # extensions we do not know are ignored
            if len(extra) < 2 or extra[1] != "=" or not extra[0].isascii() or not extra[0].isalpha():
                raise ScramError("other-error", "bad attribute")
        self.username = username
        self.authzid = authzid
        self._gs2 = f"{flag},{authz},"
        self._bare = bare
        self._nonce = nonce + self._nonce
        self._state = "first"
        return username

    def server_first(self, credentials: Optional[ScramCredentials]) -> str:
        """server-first-message for these credentials (None: an unknown user, see the class)."""
        self._expect("first")
        if credentials is None:
            salt = hmac.new(_PROCESS_SECRET, self.username.encode("utf-8", "surrogatepass"),
                            hashlib.sha256).digest()[:SALT_BYTES]
            iterations = SCRAM_ITERATIONS
        else:
            salt, iterations = credentials.salt, credentials.iterations
            self._creds = credentials
        self._server_first = f"r={self._nonce},s={_b64(salt)},i={iterations}"
        self._state = "sent"
        return self._server_first

    def client_final(self, message: Union[str, bytes]) -> str:
        """Check client-final-message; the server-final-message (`v=...`) when the proof holds."""
        self._expect("sent")
        self._state = "failed"
        text = _text(message)
        attrs = text.split(",")
        if len(attrs) < 3:
            raise ScramError("other-error", "too few attributes")
        binding = _attribute(attrs[0], "c")
        nonce = _attribute(attrs[1], "r")
        proof_text = _attribute(attrs[-1], "p")
        for extra in attrs[2:-1]:
            if len(extra) < 2 or extra[1] != "=":
                raise ScramError("other-error", "bad attribute")
        if _unb64(binding, 1, 512) != self._gs2.encode("utf-8"):
            raise ScramError("channel-bindings-dont-match")
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("utf-8")):
            raise ScramError("other-error", "nonce mismatch")
        proof = _unb64(proof_text, 32, 32)
        if proof is None:
            raise ScramError("invalid-proof", "bad proof encoding")
        without_proof = text[:len(text) - len(attrs[-1]) - 1]
        auth = f"{self._bare},{self._server_first},{without_proof}".encode("utf-8")
        creds = self._creds
        if creds is None:  # an unknown user: the same work, and a failure
            stored_key = server_key = _PROCESS_SECRET
        else:
            stored_key, server_key = creds.stored_key, creds.server_key
        signature = hmac.new(stored_key, auth, hashlib.sha256).digest()
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        matched = hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
        if creds is None or not matched:
            raise ScramError("invalid-proof")
        self.authenticated = True
        self._state = "done"
        return "v=" + _b64(hmac.new(server_key, auth, hashlib.sha256).digest())


class ScramClient:
    """The client's side, for tests and tools: first() -> final(server_first) -> verify."""

    __slots__ = ("username", "password", "nonce", "_bare", "_server_signature")

    def __init__(self, username: str, password: str, nonce: Optional[str] = None) -> None:
        self.username = username
        self.password = password
        self.nonce = nonce if nonce is not None else _new_nonce()
        self._bare = f"n={_to_saslname(username)},r={self.nonce}"
        self._server_signature = b""

    def first(self) -> str:
        return "n,," + self._bare

    def final(self, server_first: str) -> str:
        attrs = server_first.split(",")
        if len(attrs) < 3:
            raise ScramError("other-error", "short server-first-message")
        nonce = _attribute(attrs[0], "r")
        salt = _unb64(_attribute(attrs[1], "s"), 1, 1024)
        iterations = _number(_attribute(attrs[2], "i"))
        if not nonce.startswith(self.nonce) or salt is None or iterations is None:
            raise ScramError("other-error", "bad server-first-message")
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(self.password, stored=False).encode("utf-8"),
                                     salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth = f"{self._bare},{server_first},{without_proof}".encode("utf-8")
        signature = hmac.new(stored_key, auth, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = hmac.new(server_key, auth, hashlib.sha256).digest()
        return f"{without_proof},p={_b64(proof)}"

    def verify(self, server_final: str) -> bool:
        """The server proved it knows the credentials."""
        return bool(self._server_signature) and hmac.compare_digest(
            server_final.encode("utf-8", "replace"), ("v=" + _b64(self._server_signature)).encode())
