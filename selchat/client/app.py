"""`selchat-client`: the command line, script mode, and the interactive terminal UI.

Both modes run on asyncio: one task reads events from the server, another reads lines (a
prompt_toolkit prompt, or a thread reading stdin), and the sans-I/O `ClientSession` decides
what each line and each event means. This module only moves bytes and lines between them.

Exit codes: 0 after a clean end (end of input, /quit, Ctrl-C/Ctrl-D at the prompt); 1 when
the server cannot be reached, fails TLS verification, refuses the nick or the password, or closes
the connection unexpectedly; 2 for a usage error (bad options, script mode without --nick, an
unusable --ca or --password-file); 130 for Ctrl-C in script mode.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import errno
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, NoReturn, Optional, TextIO, TypeVar

from selchat import __version__
from selchat.client.connection import Connection, ConnectionClosed, connect
from selchat.client.render import escape, escape_json_line, plain, render
from selchat.client.security import (
    INSECURE_WARNING,
    OptionError,
    describe_tls_error,
    is_certificate_error,
    make_tls_context,
    read_password_file,
)
from selchat.client.nickhelp import explain, suggest, taken_suggestion
from selchat.client.session import (
    COMMANDS,
    Action,
    Ask,
    ClientSession,
    Item,
    Local,
    Reaction,
    Send,
    Ui,
    backoff_delays,
)
from selchat.defaults import DEFAULT_HOST, DEFAULT_PORT, HANDSHAKE_TIMEOUT

log = logging.getLogger("selchat.client")

PROG = "selchat-client"
REGISTER_TIMEOUT = HANDSHAKE_TIMEOUT + 5.0  # the server gives up at HANDSHAKE_TIMEOUT; we wait a bit longer
UNAVAILABLE_TRIES = 15  # hellos answered `unavailable` before the client gives up
UNAVAILABLE_WAIT = 2.0  # seconds between them
QUIT_GRACE = 5.0  # seconds to wait for the server to close after our quit
STDIN_QUEUE = 256  # lines read ahead of what has been sent; the reader thread blocks beyond it

OnEvent = Callable[[Dict[str, Any], bytes, Reaction], None]
T = TypeVar("T")


# ----- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    width = max(len(usage) for usage, _ in COMMANDS.values()) + 1
    commands = "\n".join(f"  {usage:<{width}} {what}" for usage, what in COMMANDS.values())
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Chat on a selchat server. On a terminal it is interactive; with stdin from a pipe or\n"
            "a file it runs in script mode: each input line is sent, each event is printed on\n"
            "stdout, and at the end of input it waits for the server's answers before quitting."
        ),
        epilog=(
            "On a terminal: a window per room and private conversation (Alt+1..9, Alt+Left/Right,\n"
            "PageUp/PageDown, Tab completes a nick). Lines are said in the current window\n"
            "(#lobby at first); //text says /text. Commands:\n"
            f"{commands}\n\n"
            "exit status: 0 clean end, 1 cannot connect / certificate not verified / nick or\n"
            "password refused / connection lost in script mode, 2 usage error (e.g. script mode\n"
            "without --nick, unreadable --ca or --password-file), 130 Ctrl-C in script mode.\n"
            "See docs/client.md."
        ),
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="server address (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="server port (default: %(default)s)")
    parser.add_argument(
        "--nick",
        help="nickname; asked for interactively when missing, required in script mode "
        "(1-32 of A-Z a-z 0-9 _ - [ ] { } \\ | ^, not starting with a digit or -)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print every frame the server sends as one JSON object per line, unchanged, "
        "instead of formatted lines",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="diagnostics on stderr (default: %(default)s; debug shows every frame)",
    )
    parser.add_argument(
        "--no-bell",
        action="store_true",
        help="do not ring the terminal bell on mentions and private messages (/bell on|off too)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    acct = parser.add_argument_group("account")
    acct.add_argument(
        "--account",
        metavar="NAME",
        help="log in to this account (its name is the nick unless --nick says otherwise); the "
        "password is asked without echo after connecting, or read from --account-password-file",
    )
    acct.add_argument(
        "--account-password-file",
        metavar="FILE",
        help="the account's password is the first line of FILE (required with --account in script mode)",
    )
    secure = parser.add_argument_group("TLS and password")
    secure.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS; the server's certificate must be trusted by the system's CAs "
        "and valid for --host",
    )
    trust = secure.add_mutually_exclusive_group()
    trust.add_argument(
        "--ca",
        metavar="FILE",
        help="trust only the CA or self-signed certificate(s) in this PEM file (implies --tls)",
    )
    trust.add_argument(
        "--insecure",
        action="store_true",
        help="TLS without verifying the certificate at all; a warning is printed at every "
        "connection (implies --tls)",
    )
    secure.add_argument(
        "--password-file",
        metavar="FILE",
        help="the server password is the first line of FILE. Without it, interactive mode asks "
        "(without echo) when the server wants one; it is never taken on the command line",
    )
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1..65535: {port}")
    return port


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the moment, so logs go through patch_stdout's proxy
    (above the prompt) in interactive mode instead of through the line being typed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _setup_logging(level: str) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("selchat")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    interactive = sys.stdin.isatty()
    if not interactive and not (args.nick or args.account):
        print(f"{PROG}: --nick is required when stdin is not a terminal", file=sys.stderr)
        return 2
    if args.account_password_file and not args.account:
        print(f"{PROG}: --account-password-file needs --account NAME", file=sys.stderr)
        return 2
    if not interactive and args.account and not args.account_password_file:
        print(f"{PROG}: --account needs --account-password-file FILE when stdin is not a terminal", file=sys.stderr)
        return 2
    try:
        _secure_options(args)
    except OptionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        if interactive:
            terminal = QuietTerminal(sys.stdin)
            terminal.start()  # first thing: keys typed from now on are not echoed twice
            try:
                return asyncio.run(Interactive(args, terminal).run())
            finally:
                terminal.restore()
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
        return asyncio.run(Script(args, sys.stdin, sys.stdout, sys.stderr).run())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


def _secure_options(args: argparse.Namespace) -> None:
    """Turn --tls/--ca/--insecure into `args.tls_context` and --password-file into `args.password`
    (None when absent); raises OptionError for a file that cannot be used."""
    args.tls = bool(args.tls or args.ca or args.insecure)
    args.tls_context = make_tls_context(args.ca, args.insecure) if args.tls else None
    args.password = read_password_file(args.password_file) if args.password_file else None
    account_file = getattr(args, "account_password_file", None)
    args.login = (
        {"account": args.account, "password": read_password_file(account_file)} if account_file else None
    )


# ----- shared by both modes ---------------------------------------------------------------


async def open_connection(args: argparse.Namespace, warn: Callable[[str], None]) -> Connection:
    """Connect as the options say; with --insecure, `warn` every single time it succeeds."""
    conn = await connect(args.host, args.port, ssl_context=getattr(args, "tls_context", None))
    if getattr(args, "insecure", False):
        warn(INSECURE_WARNING)
    return conn


def _describe(exc: BaseException, ca: Optional[str] = None) -> str:
    """An OSError in a few words, without the errno prefix noise (`ca`: the --ca file)."""
    tls = describe_tls_error(exc, ca)
    if tls is not None:
        return tls  # before errno: an SSLError carries OpenSSL's error number there
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror  # host lookup: "Name or service not known"
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)  # asyncio's own text names the address again; this does not
    return str(exc) or type(exc).__name__


async def _apply(conn: Connection, event: Mapping[str, Any], reaction: Reaction) -> None:
    """Follow the limits a welcome announces, and send what the session asked to send back:
    pongs at once (they do not count as requests), anything else (rejoins) paced."""
    if reaction.welcome:
        limits = event.get("limits")
        if isinstance(limits, Mapping):
            conn.set_max_frame(limits.get("max_frame"))
        conn.pacer.configure(limits, time.monotonic())
    for reply in reaction.replies:
        if reply.get("type") == "pong":
            conn.send(reply)
            await conn.drain()
        else:
            await conn.send_paced(reply)


async def register(
    conn: Connection, session: ClientSession, nick: str, on_event: OnEvent, ref: Any = None
) -> Optional[Mapping[str, Any]]:
    """Send hello and read until it is answered: None on welcome, else the error that refused it.

    Raises ConnectionClosed if the server hangs up first (full, or it timed us out).
    """
    conn.send(session.hello(nick, ref=ref))
    await conn.drain()
    while True:
        event, raw = await conn.recv()
        reaction = session.handle_event(event)
        on_event(event, raw, reaction)
        await _apply(conn, event, reaction)
        if reaction.welcome:
            return None
        if reaction.refused is not None:
            return reaction.refused


async def pump(conn: Connection, session: ClientSession, on_event: OnEvent) -> NoReturn:
    """Receive, update the session, show, answer; until the connection ends (ConnectionClosed)."""
    while True:
        event, raw = await conn.recv()
        reaction = session.handle_event(event)
        on_event(event, raw, reaction)
        await _apply(conn, event, reaction)


async def _until(aw: Awaitable[T], guard: "asyncio.Task[Any]") -> T:
    """Await `aw` unless `guard` (the receiving task) ends first, which raises ConnectionClosed."""
    task = asyncio.ensure_future(aw)
    await asyncio.wait({task, guard}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    exc = guard.exception() if not guard.cancelled() else None
    raise exc if exc is not None else ConnectionClosed("connection closed")


def _closed_reason(exc: BaseException) -> str:
    """Why a ConnectionClosed happened, in a few words ("Connection reset by peer")."""
    cause = exc.__cause__
    return _describe(cause) if isinstance(cause, OSError) else str(exc) or "connection closed"


def _refusal(nick: str, error: Mapping[str, Any], password_file: Optional[str] = None) -> str:
    """One line for a refused hello: the nick, or the password (from `password_file`, or none)."""
    code = escape(str(error.get("code")))
    reason = f"{code}: {escape(str(error.get('message', '')))}"
    if error.get("code") == "bad_password":
        if password_file is not None:
            return f"password from {escape(password_file)} refused: {reason}"
        return f"the server wants a password: {reason} (give it with --password-file FILE)"
    if error.get("code") in ("bad_nick", "nick_taken", "nick_reserved"):
        return f"nick {escape(nick)!r} refused: {reason}: {explain_refusal(nick, error)}"
    if error.get("code") == "unavailable":
        return f"the server cannot take anyone right now: {reason}"
    if error.get("code") in ("login_failed", "login_throttled"):
        return f"login refused: {reason}"
    return f"nick {escape(nick)!r} refused: {reason}"


def _is_bad_password(error: Mapping[str, Any]) -> bool:
    return error.get("code") == "bad_password"


# ----- script mode ----------------------------------------------------------------------------


class Script:
    """stdin lines in, one printed line per event out; see docs/client.md for the contract."""

    def __init__(self, args: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.session = ClientSession()
        self.session.password = getattr(args, "password", None)
        self.session.login = getattr(args, "login", None)
        self._eof_token: Optional[str] = None
        self._eof_pong = asyncio.Event()
        self._events = 0

    def _err(self, text: str) -> None:
        self.stderr.write(f"{PROG}: {text}\n")
        self.stderr.flush()

    def _show(self, items: List[Item], stream: TextIO, suffix: str = "", prefix: str = "") -> None:
        for item in items:
            stream.write(prefix + plain(render(item, clock=not prefix)) + suffix + "\n")
        stream.flush()

    def _on_event(self, event: Dict[str, Any], raw: bytes, reaction: Reaction) -> None:
        self._events += 1
        if self.args.json:
            self.stdout.write(escape_json_line(raw.decode("utf-8")) + "\n")
            self.stdout.flush()
        elif reaction.refused is None:  # a refused hello goes to stderr, once, by run()
            ref = event.get("ref")
            # Requests made from input lines carry the line number as their ref.
            line_no = event.get("type") == "error" and isinstance(ref, int) and not isinstance(ref, bool)
            self._show(reaction.items, self.stdout, suffix=f" (line {ref})" if line_no else "")
        if event.get("type") == "pong" and self._eof_token is not None and event.get("token") == self._eof_token:
            self._eof_pong.set()

    def _closed(self, exc: BaseException) -> int:
        reason = self.session.close_reason or _closed_reason(exc)
        if not self._events and not getattr(self.args, "tls", False):
            reason = f"before any answer: {reason} (if the server speaks TLS, use --tls or --ca FILE)"
        self._err(f"connection closed by server: {escape(reason)}")
        return 1

    async def run(self) -> int:
        host, port = self.args.host, self.args.port
        try:
            conn = await open_connection(self.args, self._err)
        except OSError as exc:
            self._err(_cannot_connect(host, port, exc, getattr(self.args, "ca", None)))
            return 1
        try:
            return await self._run(conn)
        finally:
            await conn.close()

    async def _run(self, conn: Connection) -> int:
        nick = self.args.nick or self.args.account
        for tries in range(UNAVAILABLE_TRIES + 1):
            try:
                refused = await asyncio.wait_for(
                    register(conn, self.session, nick, self._on_event, ref="hello"), REGISTER_TIMEOUT
                )
            except ConnectionClosed as exc:
                return self._closed(exc)
            except asyncio.TimeoutError:
                self._err(f"no answer to hello within {REGISTER_TIMEOUT:g} s")
                return 1
            if refused is None or refused.get("code") != "unavailable" or tries == UNAVAILABLE_TRIES:
                break
            # (with --redis, a process still starting or without its Redis): the same hello soon
            self._err(_refusal(nick, refused) + f": trying again in {UNAVAILABLE_WAIT:.0f} s")
            await asyncio.sleep(UNAVAILABLE_WAIT)
        if refused is not None:
            self._err(_refusal(nick, refused, getattr(self.args, "password_file", None)))
            return 1

        receiver = asyncio.ensure_future(pump(conn, self.session, self._on_event))
        lines = _stdin_lines(asyncio.get_running_loop(), self.stdin)
        line_no = 0
        try:
            while True:
                line = await _until(lines.get(), receiver)
                if line is None:
                    break
                line_no += 1
                action = self.session.parse_line(line, ref=line_no)
                if isinstance(action, Ask):
                    action = Local([self.session.note(
                        "script mode cannot ask for a password: give it on the line "
                        "(/login ACCOUNT PASSWORD, /register PASSWORD, /password OLD NEW) "
                        "or log in with --account and --account-password-file")])
                elif isinstance(action, Ui):
                    action = Local([self.session.note(f"/{action.name} is for the interactive screen")])
                if isinstance(action, Local):
                    # stderr keeps stdout to events (and valid --json)
                    self._show(action.items, self.stderr, prefix=f"line {line_no}: ")
                elif isinstance(action, Send):
                    await _until(conn.send_paced(action.request), receiver)
                    if action.quit:
                        await self._wait_close(receiver)
                        return 0
            # End of input: a ping's pong comes after the answers to everything sent before it.
            ping = self.session.ping(ref="eof")
            self._eof_token = ping["token"]
            await _until(conn.send_paced(ping), receiver)
            await _until(self._eof_pong.wait(), receiver)
            await _until(conn.send_paced(self.session.quit(ref="eof")), receiver)
            await self._wait_close(receiver)
            return 0
        except ConnectionClosed as exc:
            return self._closed(exc)
        finally:
            receiver.cancel()
            if receiver.done() and not receiver.cancelled():
                receiver.exception()  # seen: ConnectionClosed is how it always ends

    async def _wait_close(self, receiver: "asyncio.Task[Any]") -> None:
        """After our quit the server flushes and closes; wait for that, but not forever."""
        await asyncio.wait({receiver}, timeout=QUIT_GRACE)


def _stdin_lines(loop: asyncio.AbstractEventLoop, stream: TextIO) -> "asyncio.Queue[Optional[str]]":
    """Lines of a blocking stream, read by a daemon thread into a bounded queue; None at the end.

    A thread because asyncio cannot watch a regular file (stdin redirected from one), and
    bounded so a huge input is read no faster than the server takes it.
    """
    queue: "asyncio.Queue[Optional[str]]" = asyncio.Queue(STDIN_QUEUE)

    def put(item: Optional[str]) -> None:
        try:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
        except (RuntimeError, asyncio.CancelledError):  # the loop is gone: we are exiting
            raise SystemExit from None

    def read() -> None:
        try:
            fd: Optional[int] = stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        try:
            if fd is None:
                for line in iter(stream.readline, ""):
                    put(line)
            else:
                # Raw reads on the descriptor: a thread blocked inside the buffered object would
                # hold its lock, and interpreter shutdown can trip over a lock a daemon thread holds.
                decoder = codecs.getincrementaldecoder(getattr(stream, "encoding", None) or "utf-8")("replace")
                pending = ""
                while True:
                    chunk = os.read(fd, 65536)
                    pending += decoder.decode(chunk, final=not chunk)
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        put(line + "\n")
                    if not chunk:
                        break
                if pending:
                    put(pending)
        except (OSError, ValueError) as exc:
            log.warning("reading stdin failed: %s", exc)
        put(None)

    threading.Thread(target=read, name="stdin-reader", daemon=True).start()
    return queue


# ----- interactive mode -------------------------------------------------------------------


class _Stop(Exception):
    """The interactive client cannot go on (a certificate failed verification on reconnecting,
    the password from --password-file was refused): the message goes to stderr, exit status 1."""


class QuietTerminal:
    """Keys typed before the screen is up stay unechoed in the terminal's queue, so they show
    once, on the input line, when prompt_toolkit reads them (the terminal would otherwise echo
    them at once, and the input line show them again).

    Started first thing in interactive mode; `suspended` gives getpass the terminal as it was
    (line editing on); `restore` puts it back as we found it at exit.
    """

    def __init__(self, stream: TextIO) -> None:
        self._fd: Optional[int] = None
        self._saved: Optional[List[Any]] = None
        try:
            import termios

            fd = stream.fileno()
            self._saved = termios.tcgetattr(fd)
            self._fd = fd
        except (ImportError, OSError, ValueError, AttributeError):
            pass  # not a terminal we can set: nothing to do

    def start(self) -> None:
        if self._fd is None or self._saved is None:
            return
        import termios

        quiet = [list(x) if isinstance(x, list) else x for x in self._saved]
        quiet[3] &= ~(termios.ECHO | termios.ICANON)  # lflag: no echo, no line editing
        quiet[6][termios.VMIN] = 1
        quiet[6][termios.VTIME] = 0
        try:
            termios.tcsetattr(self._fd, termios.TCSANOW, quiet)
        except OSError:
            pass

    def restore(self) -> None:
        if self._fd is None or self._saved is None:
            return
        import termios

        try:
            termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)
        except OSError:
            pass

    async def getpass(self, prompt: str) -> str:
        """`getpass.getpass` with the terminal as we found it (it turns echo off itself); in a
        thread, so the connection is still read meanwhile."""
        import getpass

        self.restore()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, getpass.getpass, prompt)
        finally:
            self.start()


class Interactive:
    """Connect, ask for a nick, then the full screen (windows, status line, input line), and
    reconnect when the link drops."""

    def __init__(self, args: argparse.Namespace, terminal: Optional[QuietTerminal] = None) -> None:
        from selchat.client.screen import Screen

        self.args = args
        self.terminal = terminal or QuietTerminal(sys.stdin)
        self.session = ClientSession()
        self.session.password = getattr(args, "password", None)
        self.session.login = getattr(args, "login", None)
        self.conn: Optional[Connection] = None
        self.quitting = False
        self._stopped: Optional[_Stop] = None  # set when reconnecting must not go on
        self._lines: "asyncio.Queue[str]" = asyncio.Queue()
        self._keeper: "Optional[asyncio.Task[None]]" = None
        self.screen = Screen(self.session, self._lines.put_nowait, self._interrupted, bell=not args.no_bell)

    # output

    def _print(self, text: str) -> None:
        """A line before the screen is up (or after it is gone)."""
        print(text, flush=True)

    def _warn(self, text: str) -> None:
        """A line on stderr before the screen is up; on the screen's status window after."""
        if self.screen.app.is_running:
            self.screen.note(text)
        else:
            print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    def _note(self, text: str) -> None:
        self.screen.note(text)

    def _on_event(self, event: Dict[str, Any], raw: bytes, reaction: Reaction) -> None:
        items = list(reaction.items) if reaction.refused is None else []  # a refusal is explained apart
        if self.args.json:
            items.append(Item("info", time.time(), {"text": escape_json_line(raw.decode("utf-8"))}, targets=("(status)",)))
        self.screen.show(items)
        self.screen.windows.follow(self.session.focus)

    # lifecycle

    async def run(self) -> int:
        host, port = self.args.host, self.args.port
        try:
            conn: Optional[Connection] = await self._connect()
        except OSError as exc:
            self._warn(_cannot_connect(host, port, exc, getattr(self.args, "ca", None)))
            return 1
        if not await self._first_registration(conn):
            return 0 if self.quitting else 1
        handler = self.screen.log_handler()
        root = logging.getLogger("selchat")
        saved_handlers = root.handlers[:]
        root.handlers[:] = [handler]
        self._keeper = asyncio.ensure_future(self._keep_connected())
        consumer = asyncio.ensure_future(self._consume_lines())
        try:
            await self.screen.app.run_async()
        finally:
            root.handlers[:] = saved_handlers
            consumer.cancel()
            self._keeper.cancel()
            if self.conn is not None:
                await self.conn.close()
        if self._stopped is not None:
            self._warn(str(self._stopped))
            return 1
        keeper = self._keeper
        if keeper.done() and not keeper.cancelled() and keeper.exception() is not None:
            log.error("reconnecting failed", exc_info=keeper.exception())
            return 1
        return 0

    async def _connect(self) -> Connection:
        return await open_connection(self.args, self._warn)

    async def _ask_nick(self, default: str = "") -> Optional[str]:
        from prompt_toolkit import PromptSession

        asker: PromptSession = PromptSession()
        while True:
            try:
                nick = (await asker.prompt_async("nickname: ", default=default)).strip()
            except (EOFError, KeyboardInterrupt):
                return None
            if nick:
                return nick

    async def _ask_server_password(self) -> bool:
        """Ask for the server password without echo before the screen is up; False if the user
        gives up."""
        from prompt_toolkit import PromptSession

        asker: PromptSession = PromptSession(is_password=True)
        while True:
            try:
                password = await asker.prompt_async("server password: ")
            except (EOFError, KeyboardInterrupt):
                return False
            if password:
                self.session.password = password
                return True

    async def _account_password(self) -> bool:
        """--account without --account-password-file: asked (getpass, no echo) after connecting."""
        account = self.args.account
        try:
            password = await self.terminal.getpass(f"password for account {account}: ")
        except (EOFError, KeyboardInterrupt):
            return False
        if not password:
            return False
        self.session.login = {"account": account, "password": password}
        return True

    async def _first_registration(self, conn: Optional[Connection]) -> bool:
        """Ask for a nick (after connecting) until the server takes one, explaining a refusal
        and offering a nick it would take; ask for the server's or the account's password when
        needed. While we wait for the person, the server may drop the unregistered connection
        (its handshake timeout): then we connect again, once per hello, without a word."""
        nick: Optional[str] = self.args.nick or self.args.account
        host, port = self.args.host, self.args.port
        suggestion = ""
        if self.args.account and self.session.login is None:
            if not await self._account_password():
                self.quitting = True
                return False
        connected_at = time.monotonic()
        busy_tries = 0
        while True:
            waited = False
            if nick is None:
                nick = await self._ask_nick(suggestion)
                waited = True
                if nick is None:
                    self.quitting = True
                    return False
            for attempt in (1, 2):
                if conn is None or (attempt == 1 and time.monotonic() - connected_at > STALE_AFTER):
                    if conn is not None:
                        await conn.close()
                    try:
                        conn = await self._connect()
                    except OSError as exc:
                        self._warn(_cannot_connect(host, port, exc, getattr(self.args, "ca", None)))
                        return False
                    connected_at = time.monotonic()
                try:
                    refused = await asyncio.wait_for(register(conn, self.session, nick, self._on_event), REGISTER_TIMEOUT)
                    break
                except (ConnectionClosed, asyncio.TimeoutError) as exc:
                    await conn.close()
                    conn = None
                    reason = self.session.close_reason
                    self.session.connection_lost()
                    if attempt == 1 and (waited or not reason) and isinstance(exc, ConnectionClosed):
                        continue  # it timed us out while we asked: once more, on a fresh connection
                    if reason is None:
                        reason = _closed_reason(exc) if isinstance(exc, ConnectionClosed) else "no answer"
                        if isinstance(exc, ConnectionClosed) and not getattr(self.args, "tls", False):
                            reason += " (if the server speaks TLS, use --tls or --ca FILE)"
                    self._warn(f"connection closed by server: {escape(reason)}")
                    return False
            if refused is None:
                self.conn = conn
                return True
            code = refused.get("code")
            if code == "unavailable" and busy_tries < UNAVAILABLE_TRIES:
                # A server that cannot register anyone for a moment (with --redis: starting,
                # or its Redis is down): the connection stays; the same hello again shortly.
                busy_tries += 1
                self._print(f"the server cannot take anyone right now "
                            f"({escape(str(refused.get('message', '')))}): trying again in "
                            f"{UNAVAILABLE_WAIT:.0f} s")
                await asyncio.sleep(UNAVAILABLE_WAIT)
                continue
            if code in ("bad_nick", "nick_taken", "nick_reserved"):
                self._print(explain_refusal(nick, refused))  # the connection stays: hello again
                suggestion = suggestion_for(nick, refused)
                nick = None
                continue
            if code in ("login_failed", "login_throttled"):
                self._warn(f"login as {escape(str(self.args.account))} refused: {escape(str(code))}: "
                           f"{escape(str(refused.get('message', '')))}")
                if self.args.account_password_file is not None or code == "login_throttled":
                    return False
                if not await self._account_password():
                    self.quitting = True
                    return False
                continue
            if conn is not None:
                await conn.close()
                conn = None
            self.session.connection_lost()
            if not _is_bad_password(refused):
                self._warn(_refusal(nick, refused))
                return False
            if self.args.password_file is not None:
                self._warn(_refusal(nick, refused, self.args.password_file))
                return False
            self._print(_refusal(nick, refused))
            if not await self._ask_server_password():  # then again with the same nick
                self.quitting = True
                return False

    async def _keep_connected(self) -> None:
        """Run the receiver; when the connection drops, reconnect with backoff, same nick, same rooms.

        Sets `_stopped` when reconnecting must not go on (see `_reconnect`), and ends the screen."""
        while True:
            assert self.conn is not None
            try:
                await pump(self.conn, self.session, self._on_event)
            except ConnectionClosed as exc:
                reason = self.session.close_reason or str(exc)
            except Exception:  # a bug of ours: say so, and carry on with a fresh connection
                log.exception("receiving failed")
                reason = "internal error, see the log"
            if self.quitting:
                self._exit()
                return
            await self.conn.close()
            self.conn = None
            self.session.connection_lost()
            self.screen.offline = True
            self.screen.invalidate()
            try:
                conn = await self._reconnect(f"connection lost ({escape(reason)})")
            except _Stop as stop:
                self._stopped = stop
                self._exit()
                return
            if conn is None:  # the user gave up at the password prompt, and is quitting
                self.quitting = True
                self._exit()
                return
            self.conn = conn
            self.screen.offline = False
            self._note("reconnected")

    async def _reconnect(self, why: str) -> Optional[Connection]:
        """Try again and again, one line per attempt; the same nick, the session rejoins rooms.

        A certificate that fails verification is not a dropped connection: _Stop, no retry (it
        means the server's certificate changed, or someone is in the middle). A refused password
        asks the user for one (None if they give up), or is _Stop when it came from a file.
        """
        nick = self.session.nick or ""
        host, port = self.args.host, self.args.port
        delays = backoff_delays()
        while True:
            delay = next(delays)
            self._note(f"{why}; next attempt in {delay:.1f} s")
            await asyncio.sleep(delay)
            try:
                conn = await self._connect()
            except OSError as exc:
                if is_certificate_error(exc):
                    raise _Stop(
                        f"cannot reconnect to {host}:{port}: {_describe(exc, getattr(self.args, 'ca', None))}; not retrying "
                        "(a certificate that fails verification is not a dropped connection)"
                    ) from None
                why = f"cannot connect ({_describe(exc)})"
                continue
            try:
                refused = await asyncio.wait_for(register(conn, self.session, nick, self._on_event), REGISTER_TIMEOUT)
            except (ConnectionClosed, asyncio.TimeoutError) as exc:
                why = f"the server did not take us back ({escape(str(exc) or 'no answer')})"
                await conn.close()
                self.session.connection_lost()
                continue
            if refused is None:
                return conn
            await conn.close()
            self.session.connection_lost()
            code = refused.get("code")
            if _is_bad_password(refused):
                if self.args.password_file is not None:
                    raise _Stop(f"on reconnecting, {_refusal(nick, refused, self.args.password_file)}")
                self._note(_refusal(nick, refused))
                password = await self._secret("server password: ")
                if not password:
                    return None
                self.session.password = password
                why = "trying the password"
                delays = backoff_delays()
                continue
            if code in ("login_failed", "login_throttled") and self.session.login is not None:
                if self.args.account_password_file is not None:
                    raise _Stop(f"on reconnecting, login as {self.session.login['account']} refused: {code}")
                password = await self._secret(f"password for account {self.session.login['account']}: ")
                if not password:
                    return None
                self.session.login = dict(self.session.login, password=password)
                why = "trying the password"
                delays = backoff_delays()
                continue
            # Usually our old connection still holds the nick until the server notices it is dead.
            why = f"nick {escape(nick)} not free yet"

    async def _secret(self, prompt: str) -> Optional[str]:
        """One question on the screen's password line (the reconnecting task asks this way)."""
        try:
            return await self.screen.ask_secret(prompt)
        finally:
            self.screen.end_secret()

    def _exit(self) -> None:
        if self.screen.app.is_running:
            try:
                self.screen.app.exit()
            except Exception:  # already exiting
                pass

    def _interrupted(self) -> None:
        """Ctrl-C, or Ctrl-D on an empty line: quit."""
        if not self.quitting:
            asyncio.ensure_future(self._quit(self.session.quit()))

    async def _consume_lines(self) -> None:
        """One typed line at a time, in order (pacing may hold one back)."""
        from selchat.client.screen import asks_secret

        while True:
            line = await self._lines.get()
            try:
                await self._do(self.session.parse_line(line), masked=asks_secret(line))
            except Exception:  # a bug of ours must not end the input
                log.exception("handling a line failed")
            self.screen.windows.follow(self.session.focus)
            self.screen.invalidate()

    async def _do(self, action: Action, masked: bool = False) -> None:
        """Do what a line asks. `masked`: the screen turned the input line into a password
        field as the line was entered (it will ask); it goes back to a chat line here."""
        try:
            while isinstance(action, Ask):
                secret = await self.screen.ask_secret(action.prompt)
                if secret is None:
                    self._note("cancelled: nothing sent")
                    return
                action = action.then(secret)
                masked = True
        finally:
            if masked:
                self.screen.end_secret()
        if isinstance(action, Local):
            self.screen.show(action.items)
        elif isinstance(action, Ui):
            await self._ui(action)
        elif isinstance(action, Send):
            if action.quit:
                await self._quit(action.request)
                return
            await self._send(action.request)

    async def _send(self, request: Dict[str, Any]) -> None:
        if self.conn is None:
            self._note("not connected: that line was not sent")
            return
        try:
            await self.conn.send_paced(request)
        except ConnectionClosed:
            self._note("not connected: that line was not sent")

    async def _ui(self, action: Ui) -> None:
        screen, windows = self.screen, self.screen.windows
        window = windows.active
        if action.name == "win":
            if not screen.windows.switch(int(action.arg) - 1):
                self._note(f"there is no window {action.arg} (1..{len(windows.windows)})")
            self.session.set_focus(windows.focus_key())
        elif action.name == "close":
            if windows.current == 0:
                self._note("the status window stays open (/quit leaves the chat)")
                return
            if window.is_room and window.key.lower() in self.session.rooms:
                part = self.session.parse_line(f"/part {window.key}")
                if isinstance(part, Send):
                    await self._send(part.request)
            windows.close()
            self.session.set_focus(windows.focus_key())
        elif action.name == "presence":
            if not window.is_room:
                self._note("/presence works in a room's window")
                return
            window.hide_presence = {"on": False, "off": True}.get(action.arg, not window.hide_presence)
            state = "hidden" if window.hide_presence else "shown"
            self._note(f"join, part and quit lines are {state} in {window.key} "
                       f"(/presence {'on' if window.hide_presence else 'off'} to change)")
        elif action.name == "bell":
            screen.bell = {"on": True, "off": False}.get(action.arg, not screen.bell)
            self._note(f"the bell is {'on' if screen.bell else 'off'} for mentions and private messages")
        screen.invalidate()

    async def _quit(self, request: Dict[str, Any]) -> None:
        """Say goodbye if we can, and give the server a moment to pass it on before we hang up."""
        self.quitting = True
        if self.conn is not None:
            try:
                await self.conn.send_paced(request)
            except ConnectionClosed:
                pass
            else:
                if self._keeper is not None:
                    await asyncio.wait({self._keeper}, timeout=2.0)
        self._exit()


STALE_AFTER = HANDSHAKE_TIMEOUT - 3.0  # an unregistered connection older than this may be timed out


def _cannot_connect(host: str, port: int, exc: BaseException, ca: Optional[str]) -> str:
    """One line for a failed connect, with what to do when nothing listens there."""
    text = f"cannot connect to {host}:{port}: {_describe(exc, ca)}"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        text += f" (is selchat-server running on port {port}? Start it with: selchat-server --port {port})"
    return text


def explain_refusal(nick: str, error: Mapping[str, Any]) -> str:
    """Why the server did not take `nick`, in words, and what to try instead."""
    code = error.get("code")
    shown = escape(nick)
    if code == "bad_nick":
        problems = explain(nick) or [escape(str(error.get("message", "")))]
        return f"'{shown}' cannot be a nick: {'; '.join(escape(p) for p in problems)}. Try {escape(suggest(nick))}"
    if code == "nick_taken":
        return f"the nick {shown} is taken. Try {escape(taken_suggestion(nick))}, or another"
    if code == "nick_reserved":
        return (f"{shown} is a registered account: log in with --account {shown}, or pick another "
                f"nick, such as {escape(taken_suggestion(nick))}")
    return f"nick {shown!r} refused: {escape(str(code))}: {escape(str(error.get('message', '')))}"


def suggestion_for(nick: str, error: Mapping[str, Any]) -> str:
    return suggest(nick) if error.get("code") == "bad_nick" else taken_suggestion(nick)
