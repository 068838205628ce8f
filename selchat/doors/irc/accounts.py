"""Accounts at the IRC door: SASL (PLAIN, SCRAM-SHA-256), REGISTER, OPER and KILL.

Every rule is the core's: the hub checks passwords (off the loop, in the KDF's workers) and
throttles failed logins; the chat decides who may register, who is a server operator and who
may be killed. Here IRC's lines become those requests and the answers become numerics:

* SASL (IRCv3 `sasl` 3.2) before registration: `AUTHENTICATE PLAIN` hands the password to
  the hub; `AUTHENTICATE SCRAM-SHA-256` runs the exchange with the account's stored SCRAM
  credentials (`selchat.core.passwords.ScramServer`), so the password never crosses the wire.
  Success is 900 and 903, and the connection registers logged in; failure 904.
* `REGISTER * * password` (draft/account-registration) after registration: the current nick
  becomes an account (`REGISTER SUCCESS`, 900), or `FAIL REGISTER <code>`.
* `OPER name password`: the server's operators are accounts (`--operators`); OPER logs the
  connection into that account and answers 381 when the account is an operator, 464 for a
  wrong password, 491 for an account that is no operator.
* `KILL nick reason`: the core's `kill` (server operators only; 481 otherwise).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING, List, Optional

from selchat.core import events
from selchat.core.names import fold
from selchat.core.passwords import ScramError, ScramServer
from selchat.core.requests import Kill, Login, Register
from selchat.doors.irc.numerics import Numeric as N
from selchat.doors.irc.parser import Line
from selchat.hub import ChatError
from selchat.loop.transport import State

if TYPE_CHECKING:
    from selchat.doors.irc.session import IrcSession

log = logging.getLogger("selchat.server")

MECHANISMS = ("PLAIN", "SCRAM-SHA-256")
CHUNK = 400  # bytes of base64 one AUTHENTICATE line carries (IRCv3 sasl-3.1)
SASL_MAX = 8192  # base64 bytes one SASL message may take in all

RPL_LOGGEDIN = 900
RPL_LOGGEDOUT = 901
RPL_SASLSUCCESS = 903
ERR_SASLFAIL = 904
ERR_SASLTOOLONG = 905
ERR_SASLABORTED = 906
ERR_SASLALREADY = 907
RPL_SASLMECHS = 908
RPL_YOUREOPER = 381
ERR_NOPRIVILEGES = 481
ERR_NOOPERHOST = 491


def caps_values(version: int) -> List[str]:
    """The account capabilities as CAP LS shows them (values from CAP LS 302 on)."""
    sasl = "sasl=" + ",".join(MECHANISMS) if version >= 302 else "sasl"
    return [sasl, "draft/account-registration", "account-notify", "account-tag", "extended-join"]


# --- SASL ---------------------------------------------------------------------------------------


class Sasl:
    """One AUTHENTICATE exchange: its mechanism, the message being received, SCRAM's state."""

    __slots__ = ("mechanism", "received", "scram", "step")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.received = ""  # base64 of the client message being sent in 400-byte chunks
        self.scram: Optional[ScramServer] = ScramServer() if mechanism == "SCRAM-SHA-256" else None
        self.step = 0  # SCRAM: 0 client-first, 1 client-final, 2 the closing "+"


def authenticate(s: "IrcSession", line: Line) -> None:
    param = line.params[0]
    if "sasl" not in s.caps:
        s.numeric(ERR_SASLFAIL, "SASL authentication failed: ask for the sasl capability first")
        return
    exchange = s.sasl
    if exchange is None:
        if s.account is not None:
            s.numeric(ERR_SASLALREADY, "You have already authenticated using SASL")
            return
        mechanism = param.upper()
        if mechanism == "*":
            s.numeric(ERR_SASLABORTED, "SASL authentication aborted")
            return
        if mechanism not in MECHANISMS:
            s.numeric(RPL_SASLMECHS, ",".join(MECHANISMS), "are available SASL mechanisms")
            s.numeric(ERR_SASLFAIL, "SASL authentication failed")
            return
        s.sasl = Sasl(mechanism)
        s.reg.auth_started()
        s.send_line("AUTHENTICATE +")
        return
    if param == "*":
        _end(s)
        s.numeric(ERR_SASLABORTED, "SASL authentication aborted")
        return
    if len(param) > CHUNK:
        _end(s)
        s.numeric(ERR_SASLTOOLONG, "SASL message too long")
        return
    if param != "+":
        exchange.received += param
        if len(exchange.received) > SASL_MAX:
            _end(s)
            s.numeric(ERR_SASLTOOLONG, "SASL message too long")
            return
        if len(param) == CHUNK:
            return  # more of the same message follows
    data, exchange.received = exchange.received, ""
    try:
        message = base64.b64decode(data, validate=True) if data else b""
    except (binascii.Error, ValueError):
        _fail(s)
        return
    if exchange.scram is None:
        _plain(s, message)
    else:
        _scram(s, exchange, message)


def _end(s: "IrcSession") -> None:
    s.sasl = None
    s.reg.auth_ended()


def _fail(s: "IrcSession", detail: str = "") -> None:
    _end(s)
    s.numeric(ERR_SASLFAIL, "SASL authentication failed" + (f": {detail}" if detail else ""))


def _succeed(s: "IrcSession", account: str) -> None:
    _end(s)
    s.account = account
    reg = s.reg
    mask = f"{reg.nick or '*'}!{reg.ident or '*'}@{s.host}"
    s.numeric(RPL_LOGGEDIN, mask, account, f"You are now logged in as {account}")
    s.numeric(RPL_SASLSUCCESS, "SASL authentication successful")
    log.info("sasl: %s logged in as %s", s.transport.peer, account)


def _plain(s: "IrcSession", message: bytes) -> None:
    parts = message.split(b"\0")
    if len(parts) != 3:
        _fail(s)
        return
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        _fail(s)
        return
    if not authcid or (authzid and fold(authzid) != fold(authcid)):
        _fail(s)  # acting as another account is not offered
        return
    finished = False
    waited = False

    def proved(account: Optional[str], error: Optional[ChatError]) -> None:
        nonlocal finished
        finished = True
        if s.transport is None or s.transport.state is not State.OPEN:
            return
        if account is None:
            assert error is not None
            _fail(s, error.message if error.code != "login_failed" else "")
        else:
            _succeed(s, account)
        if waited:
            s.job_done()

    s.hub.authenticate(authcid, password, None, s.transport.ip, proved)
    if not finished:
        waited = True
        s.wait_for_job()


def _scram(s: "IrcSession", exchange: Sasl, message: bytes) -> None:
    scram = exchange.scram
    assert scram is not None
    try:
        if exchange.step == 0:
            username = scram.client_first(message)
            if scram.authzid and fold(scram.authzid) != fold(username):
                raise ScramError("other-error", "authzid")
            credentials = s.hub.scram_credentials(username, s.transport.ip)
            _send_sasl(s, scram.server_first(credentials).encode("utf-8"))
            exchange.step = 1
        elif exchange.step == 1:
            try:
                final = scram.client_final(message)
            except ScramError:
                s.hub.login_failed(scram.username, s.transport.ip)
                raise
            _send_sasl(s, final.encode("utf-8"))
            exchange.step = 2
        else:
            name = s.hub.account_name(scram.username)
            if name is None:
                raise ScramError("unknown-user")
            _succeed(s, name)
    except ScramError:
        _fail(s)
    except ChatError as exc:  # login_throttled
        _fail(s, exc.message)


def _send_sasl(s: "IrcSession", data: bytes) -> None:
    text = base64.b64encode(data).decode("ascii")
    for start in range(0, len(text), CHUNK):
        s.send_line(f"AUTHENTICATE {text[start:start + CHUNK]}")
    if len(text) % CHUNK == 0:
        s.send_line("AUTHENTICATE +")


# --- REGISTER, OPER, KILL -------------------------------------------------------------------


def register(s: "IrcSession", line: Line) -> None:
    user = s.user
    if user is None:
        s.fail("REGISTER", "COMPLETE_CONNECTION_REQUIRED", "*",
               text="Finish connecting before you register an account")
        return
    account, password = line.params[0], line.params[-1]
    if account != "*" and fold(account) != user.key:
        s.fail("REGISTER", "ACCOUNT_NAME_MUST_BE_NICK", account[:64],
               text="The account's name is your current nick")
        return
    try:
        s.ask(Register(password), pending="REGISTER")
    except ChatError as exc:
        pending_failed(s, exc.code, exc.message, "REGISTER")


def oper(s: "IrcSession", line: Line) -> None:
    user = s.user
    assert user is not None
    name, password = line.params[0], line.params[1]
    if user.account is not None:
        if fold(name) != user.account_key:
            s.numeric(ERR_NOOPERHOST, "No O-lines for your host")
            return
        # Logged into that account already: the password is checked all the same.
        finished = False
        waited = False

        def checked(account: Optional[str], error: Optional[ChatError]) -> None:
            nonlocal finished
            finished = True
            if s.user is None:
                return
            if account is None:
                s.numeric(N.ERR_PASSWDMISMATCH, "Password incorrect")
            else:
                _oper_result(s)
            if waited:
                s.job_done()

        s.hub.authenticate(name, password, None, s.transport.ip, checked)
        if not finished:
            waited = True
            s.wait_for_job()
        return
    try:
        s.ask(Login(name, password), pending="OPER")
    except ChatError as exc:
        pending_failed(s, exc.code, exc.message, "OPER")


def _oper_result(s: "IrcSession") -> None:
    user = s.user
    if user is not None and s.hub.is_server_operator(user):
        s.numeric(RPL_YOUREOPER, "You are now an IRC operator")
        s.send_line(f":{user.nick} MODE {user.nick} :+o")
    else:
        s.numeric(ERR_NOOPERHOST, "No O-lines for your host")


def kill(s: "IrcSession", line: Line) -> None:
    nick = line.params[0]
    reason = line.params[1] if len(line.params) > 1 else ""
    def refused(exc: ChatError) -> None:
        if exc.code == "unavailable":
            s.fail("KILL", "TEMPORARILY_UNAVAILABLE", text=exc.message)
        elif exc.code == "not_operator":
            s.numeric(ERR_NOPRIVILEGES, "Permission Denied - You're not an IRC operator")
        else:
            s.numeric(N.ERR_NOSUCHNICK, nick[:64], "No such nick/channel")

    s.ask(Kill(nick, reason[:300]), refused=refused)


def wallops(s: "IrcSession", line: Line) -> None:
    """A server operator's word to every IRC connection that set +w."""
    user = s.user
    assert user is not None
    if not s.hub.is_server_operator(user):
        s.numeric(ERR_NOPRIVILEGES, "Permission Denied - You're not an IRC operator")
        return
    text = line.params[0].encode("utf-8")[:400].decode("utf-8", "ignore")
    data = f":{user.nick}!{user.userhost} WALLOPS :{text}\r\n".encode("utf-8")
    for session in list(s.door.wallops):
        if session is s:
            s.answer_lines(data)
        else:
            session.raw(data)


# --- answers --------------------------------------------------------------------------------


def account_answer(s: "IrcSession", event: events.AccountInfo) -> None:
    """`account` {account, nick}: to REGISTER, to OPER's login, or a login elsewhere."""
    pending = s.pending
    user = s.user
    mask = f"{event.nick}!{user.userhost if user is not None else '*'}"
    if event.account is None:
        s.numeric(RPL_LOGGEDOUT, mask, "You are now logged out")
        return
    if pending == "REGISTER" and not s.mirrored():
        s.send_line(f":{s.server} REGISTER SUCCESS {event.account} :Account created")
    s.numeric(RPL_LOGGEDIN, mask, event.account, f"You are now logged in as {event.account}")
    if pending == "OPER" and not s.mirrored():
        _oper_result(s)


_REGISTER_FAILS = {
    "already_registered": "ALREADY_AUTHENTICATED",
    "bad_password": "UNACCEPTABLE_PASSWORD",
    "registration_closed": "TEMPORARILY_UNAVAILABLE",
    "unavailable": "TEMPORARILY_UNAVAILABLE",
    "login_throttled": "TEMPORARILY_UNAVAILABLE",
}


def pending_failed(s: "IrcSession", code: str, message: str, pending: str = "") -> bool:
    """An error of the command waiting for an answer, in its words; False if none waits."""
    pending = pending or s.pending
    if pending == "REGISTER":
        user = s.user
        word = _REGISTER_FAILS.get(code, "TEMPORARILY_UNAVAILABLE")
        if code == "already_registered" and user is not None and user.account is None:
            word = "ACCOUNT_EXISTS"
        s.fail("REGISTER", word, user.nick if user is not None else "*", text=message)
        return True
    if pending == "OPER":
        if code in ("login_failed", "login_throttled", "unavailable"):
            s.numeric(N.ERR_PASSWDMISMATCH, "Password incorrect")
        else:
            s.numeric(ERR_NOOPERHOST, "No O-lines for your host")
        return True
    return False
