"""Servers under test: how to start each one, wait until it listens, sample it, stop it.

Two sorts of server:

* Our own (selchat, the reference peers, the baseline checkout) take `--host 127.0.0.1
  --port 0` and print `listening on HOST:PORT` when ready; with the log level raised the
  line never comes and /proc tells which port the process listens on. `selchat-irc` also
  gets `--irc-port 0`; its IRC port comes from the `irc listening on HOST:PORT` line, or,
  without it, from the ports /proc lists, told apart by asking each one an IRC question.
* Third-party IRC daemons (ngIRCd, InspIRCd) cannot take port 0 on the command line: a
  config template from benchmarks/peers is rendered into a temporary directory with a port
  that was free a moment ago, and the daemon counts as ready once /proc shows it listening
  there (a lost race for the port is retried).

CPU time and RSS are read from /proc/PID, which counts every thread of the process, so the
thread-per-connection peer is charged for all of its threads.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

log = logging.getLogger(__name__)

def _find_repo() -> Path:
    """The checkout holding benchmarks/peers: next to this package, else the working directory."""
    here = Path(__file__).resolve().parents[2]
    for candidate in (here, Path.cwd()):
        if (candidate / "benchmarks" / "peers").is_dir():
            return candidate
    return here


REPO = _find_repo()
PEERS_DIR = REPO / "benchmarks" / "peers"
_LISTENING = re.compile(r"(?<!irc )(?<!web )listening on (\S+):(\d+)")  # the native door
_IRC_LISTENING = re.compile(r"irc listening on (\S+):(\d+)")
_WEB_LISTENING = re.compile(r"web listening on (\S+):(\d+)")
NATIVE, IRC, WS = "native", "irc", "ws"  # the protocols a server can be measured with
NGIRCD = "/usr/sbin/ngircd"
INSPIRCD = "/usr/sbin/inspircd"
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Flags selchat is meant to be measured with; a flag its --help does not list yet is dropped
# (and reported), so the harness keeps working while the server grows its options.
SELCHAT_WANTED_FLAGS: List[str] = [
    "--log-level", "warning",
    "--max-outbuf", "1048576",  # the protocol's default cap, stated so RESULTS.md shows it
    "--max-presence", "500",
    "--rate", "0",  # flood control off: the senders are meant to be fast
    "--db", ":memory:",  # history kept, but no disk in the measurement
    "--max-per-ip", "0",  # every benchmark client comes from 127.0.0.1
    "--register-rate", "0",  # and registers at once (the peers' throttles are off too)
    "--max-clients", "20000",  # the idle point holds 10,000 + 100 joiners
]


CONF_PLACEHOLDER = "{conf}"  # in argv of a templated server: the rendered config file


@dataclass
class ServerSpec:
    """A named way to start a server.

    Our own servers get `argv + extra + --host H --port 0`. A templated one (`template` set)
    gets `argv` with `{conf}` replaced by its rendered config file and no port flags.
    `root` is the checkout it runs from (cwd and PYTHONPATH; the repository by default);
    `protocols` says which points it can be measured with; `unavailable` says why it cannot
    run here (binary missing, flag not there yet), and then the runner skips it.
    """

    name: str
    argv: List[str]
    extra: List[str] = field(default_factory=list)
    note: str = ""
    protocols: Tuple[str, ...] = (NATIVE,)
    template: Optional[Path] = None
    root: Optional[Path] = None
    label: str = ""  # shown in the table instead of the name (the baseline's git hash)
    unavailable: str = ""
    fixed_flags: bool = False  # `extra` came from --server-args: used as given
    accounts: bool = False  # every benchmark client registers an account (selchat-acct)

    @property
    def shown(self) -> str:
        return self.label or self.name

    def command(self, host: str = "127.0.0.1", port: int = 0, conf: str = "") -> List[str]:
        if self.template is not None:
            return [conf or f"<{self.template.name} rendered>" if a == CONF_PLACEHOLDER else a for a in self.argv] + self.extra
        return self.argv + self.extra + ["--host", host, "--port", str(port)]

    def describe(self) -> str:
        """The command line as RESULTS.md shows it (repository paths made relative)."""
        text = " ".join(shlex.quote(a) for a in self.command("127.0.0.1", 0))
        if self.template is not None:
            text += f" (config: {self.template.relative_to(REPO) if self.template.is_relative_to(REPO) else self.template})"
        if self.root is not None:
            text = f"cd {self.root} && PYTHONPATH={self.root} " + text
        return text.replace(str(REPO) + "/", "")


def _supported(argv: Sequence[str], flags: Sequence[str], timeout: float = 20.0, root: Optional[Path] = None) -> tuple:
    """Keep the (flag, value) pairs the program's --help mentions; return (kept, dropped)."""
    try:
        out = subprocess.run(
            list(argv) + ["--help"], capture_output=True, text=True, timeout=timeout, cwd=root or REPO, env=_env(root)
        )
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    kept: List[str] = []
    dropped: List[str] = []
    i = 0
    while i < len(flags):
        flag = flags[i]
        value = [flags[i + 1]] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else []
        i += 1 + len(value)
        if re.search(re.escape(flag) + r"\b", text):
            kept += [flag] + value
        else:
            dropped += [flag] + value
    return kept, dropped


def selchat_available(timeout: float = 20.0, root: Optional[Path] = None) -> bool:
    """True when `python -m selchat.server --help` runs (the server has landed)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "selchat.server", "--help"],
            capture_output=True, timeout=timeout, cwd=root or REPO, env=_env(root),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def git_label(path: Path) -> str:
    """Short commit hash of a checkout (`+dirty` when it has changes), or '' if not git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


SELCHAT_NAMES = ("selchat", "selchat-db", "selchat-irc", "selchat-irc-db", "selchat-web", "selchat-base",
                 "selchat-acct")
IRC_NAMES = ("selchat-irc", "selchat-irc-db")  # measured through the IRC door (`--irc-port 0`)
DB_NAMES = ("selchat-db", "selchat-irc-db")  # history in a fresh SQLite file, not `:memory:`
# selchat-acct: two processes hash the registrations; 10,000 of them take minutes, and an idle
# client that registered first must not be pinged meanwhile (the generator answers no ping)
ACCOUNT_FLAGS = ["--kdf-workers", "2", "--ping-interval", "600"]


def known_servers(overrides: Optional[Dict[str, str]] = None, baseline: Optional[Path] = None) -> Dict[str, ServerSpec]:
    """The servers the runner knows, with per-server extra flags (`overrides` replaces them).

    Only the servers actually asked for need to be usable: each one that is not says why in
    `unavailable` rather than raising, and its --help is only run when it is looked at.
    """
    py = sys.executable
    specs = {
        "selchat": ServerSpec("selchat", [py, "-m", "selchat.server"]),
        # The same server with history in an SQLite file (WAL, a commit per loop pass), for the
        # persistence-on versus persistence-off comparison; a fresh file for every start.
        "selchat-db": ServerSpec("selchat-db", [py, "-m", "selchat.server"]),
        # The same server measured through its IRC door (`--irc-port 0`).
        "selchat-irc": ServerSpec("selchat-irc", [py, "-m", "selchat.server"], protocols=(IRC,)),
        # The IRC door with history in an SQLite file (what a deployment runs).
        "selchat-irc-db": ServerSpec("selchat-irc-db", [py, "-m", "selchat.server"], protocols=(IRC,)),
        # The same server with its receivers on the WebSocket door (`--web-port 0`); the
        # senders of `wsfanout` stay on the native port.
        "selchat-web": ServerSpec("selchat-web", [py, "-m", "selchat.server"], protocols=(WS,)),
        # The same server, with every client of every point logged into an account of its own
        # (registered after welcome, before anything is measured): logged-in against guests.
        "selchat-acct": ServerSpec("selchat-acct", [py, "-m", "selchat.server"], accounts=True),
        # The server of another checkout (--baseline PATH), for before/after in one run.
        "selchat-base": ServerSpec("selchat-base", [py, "-m", "selchat.server"], root=baseline),
        "threaded": ServerSpec("threaded", [py, str(PEERS_DIR / "threaded_server.py")]),
        "asyncio": ServerSpec("asyncio", [py, str(PEERS_DIR / "asyncio_server.py")]),
        "uvloop": ServerSpec("uvloop", [py, str(PEERS_DIR / "asyncio_server.py"), "--uvloop"]),
        "ngircd": ServerSpec(
            "ngircd", [NGIRCD, "-n", "-f", CONF_PLACEHOLDER], protocols=(IRC,), template=PEERS_DIR / "ngircd.conf.tmpl",
        ),
        "inspircd": ServerSpec(
            "inspircd",
            [INSPIRCD, "--nofork", "--nopid", "--config", CONF_PLACEHOLDER] + (["--runasroot"] if os.geteuid() == 0 else []),
            protocols=(IRC,), template=PEERS_DIR / "inspircd.conf.tmpl",
        ),
    }
    base = specs["selchat-base"]
    if baseline is None:
        base.unavailable = "no --baseline PATH given"
    elif not (baseline / "selchat" / "server.py").is_file():
        base.unavailable = f"{baseline} holds no selchat/server.py"
    else:
        base.label = f"selchat-base@{git_label(baseline)}" if git_label(baseline) else "selchat-base"
    for name in ("ngircd", "inspircd"):
        spec = specs[name]
        if not os.access(spec.argv[0], os.X_OK):
            spec.unavailable = f"{spec.argv[0]} is not installed (apt-get install {name})"
    overrides = overrides or {}
    for name, spec in specs.items():
        if name in overrides:
            spec.extra = shlex.split(overrides[name])
            spec.fixed_flags = True
            if name in IRC_NAMES and "--irc-port" not in spec.extra:
                spec.extra += ["--irc-port", "0"]
            if name == "selchat-web" and "--web-port" not in spec.extra:
                spec.extra += ["--web-port", "0"]
    return specs


def resolve_flags(spec: ServerSpec) -> None:
    """Give one of the selchat servers its benchmark flags, keeping what its --help lists.

    Run only for servers that are going to be measured: each call starts a Python process.
    A selchat whose --help does not run, or a selchat-irc without --irc-port, is unavailable.
    """
    if spec.name not in SELCHAT_NAMES or spec.unavailable or spec.fixed_flags:
        return
    if not selchat_available(root=spec.root):
        spec.unavailable = "`python -m selchat.server --help` does not run" + (f" in {spec.root}" if spec.root else " yet")
        return
    wanted = list(SELCHAT_WANTED_FLAGS)
    if spec.name in IRC_NAMES:
        wanted += ["--irc-port", "0"]
    if spec.name == "selchat-web":
        wanted += ["--web-port", "0"]
    if spec.accounts:
        wanted += ACCOUNT_FLAGS
    kept, dropped = _supported(spec.argv, wanted, root=spec.root)
    if spec.name in IRC_NAMES and "--irc-port" in dropped:
        spec.unavailable = "selchat.server has no --irc-port yet"
        return
    if spec.name == "selchat-web" and "--web-port" in dropped:
        spec.unavailable = "selchat.server has no --web-port yet"
        return
    if spec.accounts and "--kdf-workers" in dropped:
        spec.unavailable = "selchat.server has no accounts (--kdf-workers) yet"
        return
    if spec.name in DB_NAMES:
        kept = [DB_PLACEHOLDER if v == ":memory:" else v for v in kept]
    spec.extra = kept
    if dropped:
        spec.note = "flags not supported, dropped: " + " ".join(dropped)


def _env(root: Optional[Path] = None) -> Dict[str, str]:
    """The environment of a started server: its checkout first on PYTHONPATH.

    For the baseline, the current repository must not be on the path at all, or the old
    server could import new modules.
    """
    env = dict(os.environ)
    top = str(root or REPO)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and (root is None or Path(p).resolve() != REPO)]
    env["PYTHONPATH"] = os.pathsep.join([top] + rest)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ServerError(RuntimeError):
    pass


def listening_ports(pid: int) -> Set[int]:
    """Ports of the TCP sockets in LISTEN state owned by `pid`, read from /proc.

    selchat logs `listening on` at INFO, so with `--log-level warning` the line never comes;
    the socket table says the same thing whatever the log level.
    """
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports: Set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def listening_port(pid: int) -> int:
    """One listening port of `pid` (the lowest), or 0 if none yet."""
    ports = listening_ports(pid)
    return min(ports) if ports else 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listened on a moment ago (for daemons that cannot be given port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def speaks_irc(host: str, port: int, timeout: float = 2.0) -> bool:
    """Ask `port` an IRC question (PING) and say whether the answer is IRC text.

    Tells selchat's two doors apart when the log level hides `irc listening on`: the IRC
    door answers with a line (`:server ...`, PONG, NOTICE or ERROR), the framed door reads
    'PING' as an absurd length prefix and answers with a binary frame or closes.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING :selchat-bench\r\n")
            data = b""
            while b"\n" not in data and time.monotonic() < deadline:
                s.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    chunk = s.recv(4096)
                except socket.timeout:
                    break
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return data[:1] == b":" or data.split(b" ", 1)[0].upper() in (b"PONG", b"PING", b"NOTICE", b"ERROR")


def render_config(template: Path, directory: str, host: str, port: int) -> str:
    """Write the template with host, port and directory filled in; return the file's path."""
    text = string.Template(template.read_text()).substitute(host=host, port=port, dir=directory)
    path = os.path.join(directory, template.name[: -len(".tmpl")] if template.name.endswith(".tmpl") else template.name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(directory, 0o755)  # ngIRCd drops root for nobody and may re-read its config
    os.chmod(path, 0o644)
    return path


DB_PLACEHOLDER = "{tmpdb}"  # replaced by a fresh temporary database file at each start


class RunningServer:
    """A started server process; use as a context manager so it is always killed.

    `port` is the native door (None for a server without one), `irc_port` the IRC one,
    `web_port` the web door (HTTP and WebSocket).
    """

    def __init__(self, spec: ServerSpec, host: str = "127.0.0.1", start_timeout: float = 20.0, attempts: int = 3) -> None:
        self.spec = spec
        self.host = host
        self.dbdir: Optional[str] = None
        self.confdir: Optional[str] = None
        self.port: Optional[int] = None
        self.irc_port: Optional[int] = None
        self.web_port: Optional[int] = None
        for attempt in range(attempts):
            self._start(start_timeout)
            try:
                self._wait_listening(start_timeout)
                return
            except ServerError:
                # a templated daemon may have lost the race for its port: try another one
                if spec.template is None or attempt == attempts - 1:
                    raise
                log.warning("%s did not start on its port; retrying", spec.name)

    def _start(self, start_timeout: float) -> None:
        spec = self.spec
        self.log = tempfile.NamedTemporaryFile(prefix=f"selchat-bench-{spec.name}-", suffix=".log", delete=False)
        self.wanted_port = 0
        conf = ""
        if spec.template is not None:
            self.confdir = tempfile.mkdtemp(prefix=f"selchat-bench-{spec.name}-")
            self.wanted_port = free_port(self.host)
            conf = render_config(spec.template, self.confdir, self.host, self.wanted_port)
        command = spec.command(self.host, 0, conf)
        if DB_PLACEHOLDER in command:
            self.dbdir = tempfile.mkdtemp(prefix="selchat-bench-db-")
            command = [os.path.join(self.dbdir, "bench.db") if a == DB_PLACEHOLDER else a for a in command]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            # the IRC daemons report config errors on stdout; our servers log on stderr only
            stdout=self.log if spec.template is not None else subprocess.DEVNULL,
            stderr=self.log,
            cwd=self.confdir or spec.root or REPO,
            env=_env(spec.root),
            start_new_session=True,  # our Ctrl-C does not reach it; we stop it ourselves
        )
        self.pid = self.proc.pid

    def _wait_listening(self, timeout: float) -> None:
        """Find the door(s): log lines first, /proc when the log level hides them."""
        deadline = time.monotonic() + timeout
        templated = self.spec.template is not None
        irc_door = IRC in self.spec.protocols and not templated
        both_since = 0.0
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            ports = listening_ports(self.pid)
            if templated:
                if self.wanted_port in ports:
                    self.irc_port = self.wanted_port if IRC in self.spec.protocols else None
                    self.port = self.wanted_port if NATIVE in self.spec.protocols else None
                    return
            else:
                m = _LISTENING.search(text)
                native = int(m.group(2)) if m else 0
                if WS in self.spec.protocols:
                    # selchat says `web listening on` whatever its log level
                    mw = _WEB_LISTENING.search(text)
                    if native and mw:
                        self.port, self.web_port = native, int(mw.group(2))
                        return
                elif not irc_door:
                    # With one port open it is the native one; with more (a metrics port),
                    # only the log line can say which.
                    port = native or (next(iter(ports)) if len(ports) == 1 else 0)
                    if port:
                        self.port = port
                        return
                else:
                    mi = _IRC_LISTENING.search(text)
                    irc = int(mi.group(2)) if mi else 0
                    if irc and (native or len(ports - {irc}) == 1):
                        self.irc_port = irc
                        self.port = native or next(iter(ports - {irc}))
                        return
                    if len(ports) >= 2:
                        # give the log a moment to say it, then ask the ports themselves
                        both_since = both_since or time.monotonic()
                        if time.monotonic() - both_since > 0.3:
                            self._classify(ports, native)
                            return
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"{self.spec.name} exited with {self.proc.returncode}: {text[-2000:]}")
            time.sleep(0.02)
        text = self.log_tail()
        self.stop()
        what = f"port {self.wanted_port}" if templated else "'listening on'"
        raise ServerError(f"{self.spec.name} was not listening ({what}) within {timeout:.0f} s: {text[-1000:]!r}")

    def _classify(self, ports: Set[int], native: int) -> None:
        irc = [p for p in sorted(ports - {native}) if speaks_irc(self.host, p)]
        if len(irc) != 1:
            text = self.log_tail()
            self.stop()
            raise ServerError(f"{self.spec.name}: cannot tell its IRC port among {sorted(ports)} (IRC answers on {irc}): {text[-500:]!r}")
        self.irc_port = irc[0]
        rest = sorted(ports - {irc[0]})
        self.port = native or (rest[0] if rest else None)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def threads(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        return 0

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 7.0) -> None:
        """SIGTERM, wait for the server's own shutdown grace, then SIGKILL."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        try:
            self.log.close()
            os.unlink(self.log.name)
        except OSError:
            pass
        for attr in ("dbdir", "confdir"):
            d = getattr(self, attr)
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
                setattr(self, attr, None)
