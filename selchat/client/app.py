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
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Dict, List, Mapping, NoReturn, Optional, TextIO, TypeVar

from selchat import __version__
from selchat.client.connection import Connection, ConnectionClosed, connect
from selchat.client.render import escape, escape_json_line, nick_colour, plain, render
from selchat.client.security import (
    INSECURE_WARNING,
    OptionError,
    describe_tls_error,
    is_certificate_error,
    make_tls_context,
    read_password_file,
)
from selchat.client.session import COMMANDS, ClientSession, Item, Local, Reaction, Send, backoff_delays
from selchat.defaults import DEFAULT_HOST, DEFAULT_PORT, HANDSHAKE_TIMEOUT

log = logging.getLogger("selchat.client")

PROG = "selchat-client"
REGISTER_TIMEOUT = HANDSHAKE_TIMEOUT + 5.0  # the server gives up at HANDSHAKE_TIMEOUT; we wait a bit longer
QUIT_GRACE = 5.0  # seconds to wait for the server to close after our quit
STDIN_QUEUE = 256  # lines read ahead of what has been sent; the reader thread blocks beyond it

OnEvent = Callable[[Dict[str, Any], bytes, Reaction], None]
T = TypeVar("T")


# ----- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {usage:<16} {what}" for usage, what in COMMANDS.values())
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Chat on a selchat server. On a terminal it is interactive; with stdin from a pipe or\n"
            "a file it runs in script mode: each input line is sent, each event is printed on\n"
            "stdout, and at the end of input it waits for the server's answers before quitting."
        ),
        epilog=(
            "Lines are said to the current room (#lobby at first); //text says /text. Commands:\n"
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    if not interactive and not args.nick:
        print(f"{PROG}: --nick is required when stdin is not a terminal", file=sys.stderr)
        return 2
    try:
        _secure_options(args)
    except OptionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        if interactive:
            return asyncio.run(Interactive(args).run())
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
            self._err(f"cannot connect to {host}:{port}: {_describe(exc, getattr(self.args, 'ca', None))}")
            return 1
        try:
            return await self._run(conn)
        finally:
            await conn.close()

    async def _run(self, conn: Connection) -> int:
        nick = self.args.nick
        try:
            refused = await asyncio.wait_for(
                register(conn, self.session, nick, self._on_event, ref="hello"), REGISTER_TIMEOUT
            )
        except ConnectionClosed as exc:
            return self._closed(exc)
        except asyncio.TimeoutError:
            self._err(f"no answer to hello within {REGISTER_TIMEOUT:g} s")
            return 1
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


class _PasswordWanted(Exception):
    """Ends the chat prompt early so that the input loop asks for the server password."""


class Interactive:
    """A prompt at the bottom, events printed above it, and reconnecting when the link drops."""

    def __init__(self, args: argparse.Namespace) -> None:
        from prompt_toolkit import PromptSession

        self.args = args
        self.session = ClientSession()
        self.session.password = getattr(args, "password", None)
        self.conn: Optional[Connection] = None
        self.quitting = False
        # The typed line is erased once sent: the server's echo shows it, with time and room.
        self.prompt: PromptSession = PromptSession(erase_when_done=True)
        # Set by the reconnecting task when the server wants a (new) password; the input loop
        # asks for it and answers True, or False if the user gave up (Ctrl-C / Ctrl-D).
        self._password_request: "Optional[asyncio.Future[bool]]" = None
        self._stopped: Optional[_Stop] = None  # set when reconnecting must not go on

    # output

    def _show(self, items: List[Item]) -> None:
        from prompt_toolkit import print_formatted_text
        from prompt_toolkit.formatted_text import FormattedText

        for item in items:
            print_formatted_text(FormattedText(render(item)))

    def _note(self, text: str) -> None:
        self._show([self.session.note(text)])

    def _warn(self, text: str) -> None:
        """A line on stderr (above the prompt while it is up)."""
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    def _on_event(self, event: Dict[str, Any], raw: bytes, reaction: Reaction) -> None:
        if self.args.json:
            from prompt_toolkit import print_formatted_text
            from prompt_toolkit.formatted_text import FormattedText

            print_formatted_text(FormattedText([("", escape_json_line(raw.decode("utf-8")))]))
        else:
            self._show(reaction.items)
        self.prompt.app.invalidate()  # the prompt shows the current room and nick

    def _prompt_message(self) -> List[Any]:
        room = self.session.current_room
        nick = self.session.nick or ""
        state = "" if self.conn is not None else "(offline) "
        return [
            ("ansired", state),
            ("bold", f"[{escape(room) if room else 'no room'}] "),
            (f"{nick_colour(nick)} bold", escape(nick)),
            ("", "> "),
        ]

    def _interrupt_prompt(self, exc: Exception) -> None:
        """End the chat prompt now with `exc`, if it is up (else the input loop sees the state
        before it shows the next one)."""
        app = self.prompt.app
        if app.is_running:
            try:
                app.exit(exception=exc)
            except Exception:  # already exiting: the loop checks the state next time round
                pass

    # lifecycle

    async def run(self) -> int:
        from prompt_toolkit.patch_stdout import patch_stdout

        if not await self._first_registration():
            return 0 if self.quitting else 1
        with patch_stdout():
            keeper = asyncio.ensure_future(self._keep_connected())
            try:
                await self._input_loop(keeper)
            finally:
                keeper.cancel()
                if self.conn is not None:
                    await self.conn.close()
        if self._stopped is not None:
            self._warn(str(self._stopped))
            return 1
        if keeper.done() and not keeper.cancelled() and keeper.exception() is not None:
            log.error("reconnecting failed", exc_info=keeper.exception())
            return 1
        return 0

    async def _until_input_loop_sees(self, done: Callable[[], bool], exc: Callable[[], Exception]) -> None:
        """End the chat prompt with exc() until done(): the prompt may be just starting (not
        running yet) when we first try, and the input loop only looks between two lines."""
        while not done():
            self._interrupt_prompt(exc())
            await asyncio.sleep(0.2)

    async def _connect(self) -> Connection:
        return await open_connection(self.args, self._warn)

    async def _ask_nick(self) -> Optional[str]:
        while True:
            try:
                nick = (await self.prompt.prompt_async("nickname: ")).strip()
            except (EOFError, KeyboardInterrupt):
                return None
            if nick:
                return nick

    async def _ask_password(self) -> bool:
        """Ask for the server password without echo; False if the user gives up."""
        from prompt_toolkit import PromptSession

        # A session of its own: the chat prompt's history must never hold (and recall) it, and
        # arguments given to a PromptSession's prompt stick to that session.
        asker: PromptSession = PromptSession(is_password=True, erase_when_done=True)
        while True:
            try:
                password = await asker.prompt_async("server password: ")
            except (EOFError, KeyboardInterrupt):
                return False
            if password:
                self.session.password = password
                return True

    async def _first_registration(self) -> bool:
        """Ask for a nick until the server takes one, and for the password when it wants one.
        A fresh connection per try, since the server drops a connection that has not registered
        within its handshake timeout while we ask, and closes one after a wrong password."""
        nick = self.args.nick
        host, port = self.args.host, self.args.port
        while True:
            if nick is None:
                nick = await self._ask_nick()
                if nick is None:
                    self.quitting = True
                    return False
            try:
                conn = await self._connect()
            except OSError as exc:
                self._warn(f"cannot connect to {host}:{port}: {_describe(exc, getattr(self.args, 'ca', None))}")
                return False
            try:
                refused = await asyncio.wait_for(register(conn, self.session, nick, self._on_event), REGISTER_TIMEOUT)
            except (ConnectionClosed, asyncio.TimeoutError) as exc:
                await conn.close()
                if self.session.close_reason:
                    reason = self.session.close_reason
                elif isinstance(exc, ConnectionClosed):
                    reason = _closed_reason(exc)
                    if not getattr(self.args, "tls", False):
                        reason += " (if the server speaks TLS, use --tls or --ca FILE)"
                else:
                    reason = "no answer"
                self._warn(f"connection closed by server: {escape(reason)}")
                return False
            if refused is None:
                self.conn = conn
                return True
            await conn.close()
            self.session.connection_lost()
            if not _is_bad_password(refused):
                nick = None  # the error was shown by _on_event; ask again
                continue
            if self.args.password_file is not None:
                self._warn(_refusal(nick, refused, self.args.password_file))
                return False
            if not await self._ask_password():  # then again with the same nick
                self.quitting = True
                return False

    async def _keep_connected(self) -> None:
        """Run the receiver; when the connection drops, reconnect with backoff, same nick, same rooms.

        Sets `_stopped` when reconnecting must not go on (see `_reconnect`), and the input
        loop ends."""
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
                return
            await self.conn.close()
            self.conn = None
            self.session.connection_lost()
            self.prompt.app.invalidate()
            try:
                conn = await self._reconnect(f"connection lost ({escape(reason)})")
            except _Stop as stop:
                self._stopped = stop
                await self._until_input_loop_sees(lambda: False, _Stop)  # run() cancels us
                return
            if conn is None:  # the user gave up at the password prompt, and is quitting
                return
            self.conn = conn
            self._note("reconnected")
            self.prompt.app.invalidate()

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
            if _is_bad_password(refused):
                if self.args.password_file is not None:
                    raise _Stop(f"on reconnecting, {_refusal(nick, refused, self.args.password_file)}")
                if not await self._password_from_input_loop():
                    return None
                why = "trying the password"
                delays = backoff_delays()
                continue
            # Usually our old connection still holds the nick until the server notices it is dead.
            why = f"nick {escape(nick)} not free yet"

    async def _password_from_input_loop(self) -> bool:
        """Have the input loop (which owns the terminal) ask for the password; True once given."""
        request = self._password_request = asyncio.get_running_loop().create_future()
        try:
            # Once the input loop is at the password prompt the chat prompt is not running, so
            # nudging it again does nothing.
            await self._until_input_loop_sees(request.done, _PasswordWanted)
            return request.result()
        finally:
            self._password_request = None

    async def _input_loop(self, keeper: "asyncio.Task[None]") -> None:
        while True:
            if self._stopped is not None or keeper.done():
                return  # run() says why
            request = self._password_request
            if request is not None and not request.done():
                given = await self._ask_password()
                if not request.done():
                    request.set_result(given)
                if not given:
                    self.quitting = True
                    return
                continue
            try:
                line = await self.prompt.prompt_async(self._prompt_message)
            except (_PasswordWanted, _Stop):
                continue  # the top of the loop sees why
            except (EOFError, KeyboardInterrupt):
                await self._quit(self.session.quit(), keeper)
                return
            action = self.session.parse_line(line)
            if isinstance(action, Local):
                self._show(action.items)
            elif isinstance(action, Send):
                if action.quit:
                    await self._quit(action.request, keeper)
                    return
                if self.conn is None:
                    self._note("not connected: that line was not sent")
                    continue
                try:
                    await self.conn.send_paced(action.request)
                except ConnectionClosed:
                    self._note("not connected: that line was not sent")

    async def _quit(self, request: Dict[str, Any], keeper: "asyncio.Task[None]") -> None:
        """Say goodbye if we can, and give the server a moment to pass it on before we hang up."""
        self.quitting = True
        if self.conn is None:
            return
        try:
            await self.conn.send_paced(request)
        except ConnectionClosed:
            return
        await asyncio.wait({keeper}, timeout=2.0)
