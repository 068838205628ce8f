"""irctest controller for selchat's IRC door (see /work/shared/IRC_TESTING.md).

irctest imports this module by name (``--controller selchat_controller``, with this folder on
PYTHONPATH) and calls ``get_irctest_controller_class()``. Each test gets a fresh server
process: history in memory, flood control and the per-address limit off (irctest opens many
connections from 127.0.0.1 and sends bursts, as the IRC servers' own controllers allow), and
the name ``My.Little.Server`` that irctest's assertions expect.

Accounts: the server's operators are accounts (``--operators``), so the controller names
``operuser`` in that file and, once the port is open, registers that account with the password
``operpassword`` that irctest's OPER tests send (IRCv3 ``REGISTER`` on the IRC door itself).
``registerUser`` makes an account the same way, which irctest's SASL and account tests ask for;
SASL offers ``PLAIN`` and ``SCRAM-SHA-256``. Passwords are checked in the loop
(``--kdf-workers 0``): no worker process for a server that lives for one test.

The server always listens on 127.0.0.1, whatever host irctest picked (it binds ``("", 0)``
to choose a port and then connects to ``0.0.0.0``, which Linux routes to loopback): the
suite must never open a port on another interface.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Set, Type, Union

from irctest import patma
from irctest.basecontrollers import BaseServerController, DirectoryBasedController
from irctest.runner import NotImplementedByController
from irctest.specifications import Capabilities, OptionalBehaviors

log = logging.getLogger("selchat.irctest")

SERVER_NAME = "My.Little.Server"
LISTEN_HOST = "127.0.0.1"
START_TIMEOUT = 20.0  # a loaded 2-core machine running two xdist workers
CHECK_TIMEOUT = 5.0
OPER_NAME = "operuser"  # the account irctest's OPER tests use, named in --operators
OPER_PASSWORD = "operpassword"


def project_root() -> Path:
    """The selchat checkout: $SELCHAT_ROOT (set by run_irctest.sh), else two levels up."""
    env = os.environ.get("SELCHAT_ROOT")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2]


def server_python() -> str:
    """The interpreter that runs the server: $SELCHAT_PYTHON, else the base of irctest's venv.

    Not irctest's own interpreter: its virtualenv holds irctest's requirements, not the
    project's (the server's dependencies are installed for the system Python).
    """
    env = os.environ.get("SELCHAT_PYTHON")
    if env:
        return env
    return getattr(sys, "_base_executable", None) or sys.executable


class SelchatController(BaseServerController, DirectoryBasedController):
    """Starts ``python -m selchat.server`` with the IRC door on irctest's port."""

    software_name = "selchat"
    supported_sasl_mechanisms: Set[str] = {"PLAIN", "SCRAM-SHA-256"}
    supports_sts = False
    _port_wait_interval = 0.02

    # What PROTOCOL.md 10.1 promises (message-tags, server-time, echo-message, batch) and what
    # the door advertises besides: a NAK for one of these is a failure, not a skip.
    capabilities: FrozenSet[Capabilities] = frozenset(
        (
            Capabilities.ACCOUNT_NOTIFY,
            Capabilities.ACCOUNT_TAG,
            Capabilities.BATCH,
            Capabilities.ECHO_MESSAGE,
            Capabilities.EXTENDED_JOIN,
            Capabilities.LABELED_RESPONSE,
            Capabilities.MESSAGE_TAGS,
            Capabilities.MULTI_PREFIX,
            Capabilities.SERVER_TIME,
        )
    )
    optional_behaviors: FrozenSet[OptionalBehaviors] = frozenset(
        (OptionalBehaviors.MULTI_JOIN,)
    )
    # The ISUPPORT values the door promises (irctest's isupport tests skip without them).
    isupport: Dict[str, Union[str, patma.Operator, None]] = {
        "CASEMAPPING": "ascii",
        "CHANTYPES": "#",
        "NICKLEN": "32",
        "CHANNELLEN": "51",
    }

    def run(
        self,
        hostname: str,
        port: int,
        *,
        password: Optional[str],
        ssl: bool,
        run_services: bool,
        faketime: Optional[str],
        websocket_hostname: Optional[str],
        websocket_port: Optional[int],
    ) -> None:
        if websocket_hostname is not None or websocket_port is not None:
            raise NotImplementedByController("Websocket")
        if run_services:
            raise NotImplementedByController("services")
        assert self.proc is None
        self.port = port
        self.hostname = hostname
        self.password = password
        self.port_open = False
        self.create_config()
        assert self.directory is not None
        directory = self.directory

        command = [
            server_python(), "-m", "selchat.server",
            "--host", LISTEN_HOST, "--port", "0",
            "--irc-port", str(port),
            "--db", ":memory:",
            "--rate", "0",
            "--server-name", SERVER_NAME,
            "--max-per-ip", "0",
            "--register-rate", "0",  # registration pacing off, as the peers' throttles are
            "--log-level", "warning",
            "--kdf-workers", "0",
            "--operators", str(self._operators_file(directory)),
        ]
        if password is not None:
            pw_file = directory / "password.txt"
            pw_file.write_text(password + "\n", encoding="utf-8")
            command += ["--password-file", str(pw_file)]
        if ssl:
            cert, key = self._make_certificate(directory)
            command += ["--tls-cert", str(cert), "--tls-key", str(key)]

        root = project_root()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = directory / "server.log"
        log.debug("starting %s (log in %s)", " ".join(command), self.log_path)
        if self.debug_mode:
            self.proc = self.execute(command, proc_name="selchat", cwd=str(root), env=env)
        else:
            with self.log_path.open("wb") as logfile:
                self.proc = self.execute(
                    command, proc_name="selchat", cwd=str(root), env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logfile,
                )
        self.wait_for_port()
        self.registerUser(None, OPER_NAME, OPER_PASSWORD)

    @staticmethod
    def _operators_file(directory: Path) -> Path:
        path = directory / "operators.txt"
        path.write_text(OPER_NAME + "\n", encoding="utf-8")
        return path

    def registerUser(self, case: object, username: str, password: Optional[str] = None) -> None:
        """Make the account `username` (with `password`): connect as that nick and REGISTER."""
        if password is None:
            password = username + "-password"
        with self._connect() as sock:
            reader = _Lines(sock)
            hello = f"NICK {username}\r\nUSER {username} 0 * :{username}\r\n"
            if self.password is not None:
                hello = f"PASS {self.password}\r\n" + hello
            sock.sendall(hello.encode())
            reader.wait(lambda parts: parts[1:2] == ["001"], "001")
            sock.sendall(f"REGISTER * * :{password}\r\n".encode())
            reader.wait(lambda parts: parts[1:3] == ["REGISTER", "SUCCESS"], "REGISTER SUCCESS")
            sock.sendall(b"QUIT :registered\r\n")
            reader.wait(lambda parts: parts[1:2] == ["ERROR"], "ERROR")

    def _connect(self) -> "socket.socket":
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                sock = socket.create_connection((LISTEN_HOST, self.port), timeout=CHECK_TIMEOUT * 4)
                break
            except OSError:
                # Say why when the server is gone; else (a loaded machine) try again a while.
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"selchat exited (rc={self.proc.returncode}):\n"
                                       + self._server_log()) from None
                if time.monotonic() >= deadline:
                    raise
                time.sleep(self._port_wait_interval)
        if self._tls_enabled():
            import ssl

            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock, server_hostname=SERVER_NAME)
        return sock

    def _make_certificate(self, directory: Path) -> "tuple[Path, Path]":
        """A throw-away self-signed certificate for the TLS tests."""
        cert = directory / "cert.pem"
        key = directory / "key.pem"
        openssl = getattr(self, "openssl_bin", None) or shutil.which("openssl") or "openssl"
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", f"/CN={SERVER_NAME}", "-batch",
            ],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        return cert, key

    def _server_log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-3000:]
        except (OSError, AttributeError):
            return ""

    def wait_for_port(self) -> None:
        """Block until the IRC port accepts a connection (deadline), then leave it cleanly.

        The probe says QUIT and reads until the server closes, so that it is gone before the
        test starts and never counts in LUSERS or NAMES. With TLS the TCP connect is enough.
        """
        if self.port_open:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"selchat exited (rc={self.proc.returncode}) before opening port {self.port}:\n"
                    + self._server_log()
                )
            try:
                probe = socket.create_connection((LISTEN_HOST, self.port), timeout=1.0)
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"selchat did not open port {self.port} within {START_TIMEOUT}s:\n" + self._server_log()
                    ) from None
                time.sleep(self._port_wait_interval)
                continue
            break
        with probe:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._tls_enabled():
                self._quit_probe(probe)
        self.port_open = True

    def _tls_enabled(self) -> bool:
        return self.directory is not None and (self.directory / "cert.pem").exists()

    @staticmethod
    def _quit_probe(probe: socket.socket) -> None:
        probe.settimeout(CHECK_TIMEOUT)
        try:
            probe.sendall(b"QUIT :chkport\r\n")
            end = time.monotonic() + CHECK_TIMEOUT
            while time.monotonic() < end:
                if not probe.recv(4096):
                    return  # closed by the server: the probe is gone
        except OSError:
            return


class _Lines:
    """Lines from the server, read until one matches (a deadline, never a bare sleep)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def wait(self, matches: "Callable[[List[str]], bool]", what: str) -> None:
        deadline = time.monotonic() + CHECK_TIMEOUT * 4
        while time.monotonic() < deadline:
            while b"\r\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\r\n", 1)
                text = raw.decode("utf-8", "replace")
                if text.startswith("@"):
                    text = text.split(" ", 1)[1] if " " in text else ""
                parts = text.split()
                if parts and not parts[0].startswith(":"):
                    parts.insert(0, "")
                if parts and matches(parts):
                    return
                if len(parts) > 1 and parts[1] in ("FAIL", "464", "433"):
                    raise RuntimeError(f"selchat refused the account: {text}")
            data = self.sock.recv(4096)
            if not data:
                if what == "ERROR":
                    return
                raise RuntimeError(f"selchat closed the connection before {what}")
            self.buffer += data
        raise RuntimeError(f"no {what} from selchat within the deadline")


def get_irctest_controller_class() -> Type[SelchatController]:
    return SelchatController
