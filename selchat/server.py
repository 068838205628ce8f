"""The server: options in, one reactor with a hub and a listener per front door, until a signal.

This module only assembles; each part keeps its own promises:

* `selchat.loop` moves bytes and time (one selector, timers, transports, listeners) and knows
  nothing of chat;
* `selchat.hub` owns the chat state and the store: one commit per pass, before any byte of
  that pass is written; condemned sessions removed between requests;
* `selchat.fanout` encodes each event once per wire format and queues the same bytes for
  every recipient of that format;
* each door (`selchat.doors.framed`, `selchat.doors.irc`, `selchat.doors.web`) is a session
  over a transport.

One pass of the loop: wait in `select`; read what is ready and serve every complete request
in it (deliveries are queued, nothing is sent); run due timers and next-pass callbacks; then,
before sleeping, flush the room batches and drop condemned sessions, commit the pass's
messages, and only then write each dirty transport with one gather write.
"""

from __future__ import annotations

import gc
import logging
import resource
import socket
import ssl
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from selchat import SERVER_NAME
from selchat.config import ServerConfig, parse_args
from selchat.core.chat import Chat
from selchat.core.store import SQLiteStore, StoreError
from selchat.doors.framed.session import FramedDoor
from selchat.doors.irc.session import IrcDoor
from selchat.doors.web import static as web_static
from selchat.doors.web.http import Site
from selchat.doors.web.session import WebDoor
from selchat.hub import Hub
from selchat.loop import ratelog
from selchat.ops import notify
from selchat.ops.reload import file_digest
from selchat.loop.listener import Admission, Listener, ProxyGate, bind
from selchat.loop.proxyproto import TrustedProxies, normal_ip
from selchat.loop.pacing import Pacer
from selchat.loop.reactor import Reactor
from selchat.loop.transport import State, TLSTransport, Transport, Writer, kind_of
from selchat.core.accounts import read_operators
from selchat.core.names import fold
from selchat.kdf import make_kdf
from selchat.password import read_password_file

REFUSING_MAX = 256  # connections beyond --max-clients that may be in the middle of a refusal

log = logging.getLogger("selchat.server")
_listening_log = logging.getLogger("selchat.server.listening")
_listening_log.setLevel(logging.INFO)


class Server:
    def __init__(
        self,
        config: ServerConfig,
        store: Any,
        tls: Optional[ssl.SSLContext] = None,
        password: Optional[bytes] = None,
        reactor: Optional[Reactor] = None,
        operators: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.store = store
        self.tls = tls
        self.password = password
        self.reactor = reactor if reactor is not None else Reactor()
        self.writer = Writer(self.reactor)
        self.chat = Chat(
            store,
            server_name=SERVER_NAME,
            motd=config.motd,
            max_presence=config.max_presence,
            history_on_join=config.history_on_join,
            history_bytes=config.max_frame,
            started_ms=int(time.time() * 1000),
            operators=operators,
            registration=config.registration,
            max_accounts=config.max_accounts,
        )
        self.hub = Hub(self.chat, self.reactor)
        self.hub.kdf = LazyKdf(self.reactor, config.kdf_workers)
        # --redis: one chat with every process on that Redis (selchat.links.cluster). The
        # link (`redis`, which /healthz and the metrics read) lives in this loop.
        self.redis: Any = None
        self.cluster: Any = None
        if config.redis is not None:
            from selchat.links.cluster import ClusterNode
            from selchat.links.redis import RedisLink
            self.redis = RedisLink(self.reactor, config.redis)
            self.cluster = self.hub.cluster = ClusterNode(self.hub, self.redis)
            self.cluster.on_fatal = self._not_in_cluster
        self.exit_code = 0
        if config.register_rate > 0:
            # The waiting are connections, so the admission limits bound them already; a
            # waiting hello ends at the handshake timeout like any that does not get in.
            self.hub.pacer = Pacer(self.reactor, config.register_rate, config.register_burst,
                                   max_waiting=config.max_clients)
        self.admission = Admission(config.max_clients, config.max_per_ip)
        self.framed = FramedDoor(
            self.hub, self.reactor, config.max_frame, config.max_text, config.rate, config.burst,
            config.handshake_timeout, config.ping_interval, config.ping_timeout, password,
            config.high_water,
        )
        self.irc: Optional[IrcDoor] = None
        if config.irc_port is not None:
            self.irc = IrcDoor(
                self.hub, self.reactor, config.server_name or _host_name(), config.max_text,
                config.rate, config.burst, config.handshake_timeout, config.ping_interval,
                config.ping_timeout, password,
            )
        self.irc_address: tuple = ()
        # Proxies whose connections may say who the client is (a PROXY header on the native
        # and IRC ports, forwarded headers at the web door).
        self.trusted = TrustedProxies(config.trusted_proxy)
        self.gates: Dict[int, ProxyGate] = {}  # connections from them, until their header
        self.web: Optional[WebDoor] = None
        if config.web_port is not None:
            site = Site(web_static.load(), tls is not None, config.web_origin, self.trusted,
                        config.forwarded_header)
            self.web = WebDoor(
                self.hub, self.reactor, config.max_frame, config.max_text, config.rate, config.burst,
                config.handshake_timeout, config.ping_interval, config.ping_timeout, password,
                answer_budget=config.high_water, site=site,
            )
        self.web_address: tuple = ()
        self.transports: Dict[int, Transport] = {}
        self.listeners: List[Listener] = []
        self.address: tuple = ()
        self.accepted = 0
        self._stopping = False
        self._stop_deadline = 0.0
        # SIGHUP (selchat.ops.reload): the command line the configuration came from (main sets
        # it), what the certificate file held, and the reloads other parts register (each
        # `hook(new_config)` reads its file and returns how to apply it: the operators' file).
        self.argv: Optional[List[str]] = None
        self.tls_digest: Optional[str] = None
        self.reload_hooks: List[Any] = [self._reload_accounts]
        # --metrics-port: counters at once-per-request and once-per-pass points, the rest read
        # when Prometheus asks (selchat.ops.metrics); served by this loop (selchat.ops.httpd).
        self.metrics: Any = None
        self.metrics_endpoint: Any = None
        self.metrics_address: tuple = ()
        if config.metrics_port is not None:
            from selchat.ops.metrics import ServerMetrics

            self.metrics = ServerMetrics(self)
            self.metrics.install()

    def _not_in_cluster(self, why: str) -> None:
        """This process cannot be one of the cluster (its rules differ): stop, exit 1."""
        self.exit_code = 1
        self.request_stop()

    def _reload_accounts(self, new: ServerConfig) -> Optional[Any]:
        """SIGHUP: the operators' file read again (ValueError when it cannot be read), whether
        registration is open, and the accounts cap; applied together, live."""
        names = read_operators_file(new.operators) if new.operators else []
        accounts = self.chat.accounts

        def apply() -> Optional[str]:
            operators = {fold(name) for name in names}
            if self.cluster is not None:
                if (operators == accounts.operators and new.registration == accounts.registration
                        and new.max_accounts == accounts.max_accounts):
                    return None
                # Every copy must decide by the same rules: ordered like any change.
                self.cluster.set_rules(sorted(operators), new.registration, new.max_accounts)
                return "server operators, registration and the accounts cap sent to the cluster"
            said = []
            if operators != accounts.operators:
                said.append(f"server operators: {', '.join(sorted(operators)) or 'none'}")
                accounts.operators = operators
            if new.registration != accounts.registration:
                accounts.registration = new.registration
                said.append("registration " + ("open" if new.registration else "closed"))
            if new.max_accounts != accounts.max_accounts:
                accounts.max_accounts = new.max_accounts
                said.append(f"at most {new.max_accounts:,} accounts")
            return "; ".join(said) or None

        return apply

    # --- set-up -------------------------------------------------------------------------------

    def listen(self, bound: Optional[Dict[str, socket.socket]] = None) -> None:
        """Open every door's port; raises OSError (the caller says which port failed).

        `bound`: the ports `bind_ports` opened already (main opens them before anything else,
        so a busy port stops the start before the database is touched).
        """
        cfg = self.config
        bound = bound if bound is not None else bind_ports(cfg)
        sock = bound.pop("native")
        listener = Listener(self.reactor, sock,
                            lambda s, a: self._accept(self.framed, s, a, listener.arrived_after))
        self.listeners.append(listener)
        self.address = listener.address
        if self.irc is not None:
            assert cfg.irc_port is not None
            self.irc_address = self._listen_door(self.irc, bound.pop("irc"))
        if self.web is not None:
            assert cfg.web_port is not None
            self.web_address = self._listen_door(self.web, bound.pop("web"))
        if self.metrics is not None:
            from selchat.ops.httpd import MetricsEndpoint

            self.metrics_endpoint = MetricsEndpoint(self.reactor, self.writer, self.metrics,
                                                    bound.pop("metrics"))
            self.metrics_address = self.metrics_endpoint.address
        # Always said, whatever --log-level: scripts and tests read the ports from these lines.
        _listening_log.info("listening on %s:%d", self.address[0], self.address[1])
        if self.irc_address:
            _listening_log.info("irc listening on %s:%d (server name %s)", self.irc_address[0],
                                self.irc_address[1], self.irc.server_name)  # type: ignore[union-attr]
        if self.web_address:
            _listening_log.info("web listening on %s:%d", self.web_address[0], self.web_address[1])
            _listening_log.info("web client at %s", _url("https" if self.tls else "http", self.web_address))
        if self.metrics_address:  # (not "listening on": scripts take that for the native port)
            _listening_log.info("metrics at %s (and /healthz)", _url("http", self.metrics_address, "metrics"))

    def _listen_door(self, door: Any, sock: socket.socket) -> tuple:
        """One more door's port, bound already."""
        listener = Listener(self.reactor, sock,
                            lambda s, a: self._accept(door, s, a, listener.arrived_after))
        self.listeners.append(listener)
        return listener.address

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM start a graceful shutdown, SIGHUP a reload; run inside the loop."""
        import signal as _signal

        self.reactor.install_signal_handlers(
            self._on_signal, (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGUSR1))

    def _on_signal(self, signum: int) -> None:
        import signal as _signal

        if signum == _signal.SIGHUP:
            if not self._stopping:
                log.info("received SIGHUP: reloading")
                self.reload()
            return
        if signum == _signal.SIGUSR1:  # `selchat-server --backup FILE` asks (selchat.ops.backup)
            from selchat.ops.backup import BackupError, serve_backup

            try:
                said = serve_backup(self.store, self.config.db)
            except BackupError as exc:
                log.error("%s", exc)
            else:
                log.info("%s", said or "SIGUSR1: no database file to back up (--db :memory:)")
            return
        if not self._stopping:
            log.info("received %s: shutting down", _signal.Signals(signum).name)
            self.request_stop()

    # --- accepting ----------------------------------------------------------------------------

    def _accept(self, door: Any, sock: socket.socket, addr: Any, since: Optional[float] = None) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if len(self.transports) + len(self.gates) >= self.config.max_clients + REFUSING_MAX:
            # Even refusals are bounded: past this, a new connection is closed without a word.
            sock.close()
            return
        ip = normal_ip(str(addr[0])) if isinstance(addr, tuple) else str(addr)
        peer = f"{ip}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if self.trusted and self.trusted.trusted(ip):
            if door is self.web:
                self._open(door, sock, ip, peer, since, via=True)
                return
            # The PROXY header comes before anything else, TLS included: read it first.
            fd = sock.fileno()

            def passed(s: socket.socket, source: Optional[tuple], initial: bytes) -> None:
                self.gates.pop(fd, None)
                if source is not None:
                    self._open(door, s, source[0], f"{source[0]}:{source[1]}", since, initial=initial)
                else:
                    self._open(door, s, ip, peer, since, initial=initial)

            def failed(s: socket.socket, why: str) -> None:
                self.gates.pop(fd, None)
                ratelog.shared(log).log(logging.INFO, ("proxy header", kind_of(why)),
                                        "closing %s (a trusted proxy): %s", peer, why)
                s.close()

            self.gates[fd] = ProxyGate(self.reactor, sock, self.config.handshake_timeout, passed, failed)
            return
        self._open(door, sock, ip, peer, since)

    def _open(self, door: Any, sock: socket.socket, ip: str, peer: str, since: Optional[float],
              via: bool = False, initial: bytes = b"") -> None:
        """A transport and a session for a connection whose client is `ip` (with `via`, a
        trusted proxy's web connection: each request names its client)."""
        cfg = self.config
        if initial and self.tls is not None:
            sock.close()  # (bytes taken as a PROXY header's start cannot go back under TLS)
            return
        kind = Transport
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                log.info("TLS set-up failed for %s: %s", peer, exc)
                sock.close()
                return
            kind = TLSTransport
        transport = kind(self.reactor, self.writer, sock, peer, ip, cfg.max_outbuf,
                         cfg.high_water, cfg.low_water, cfg.shutdown_grace, since)
        reject = self.admission.admit(None if via else ip)
        if via and reject is None:
            transport.via = Via(self.admission, transport)
        transport.on_closed = self._forget if reject is not None else self._release
        self.transports[transport.fd] = transport
        self.accepted += 1
        if reject is not None:
            self.admission.log_refusal(peer, reject)  # one line per reason and period, with a count
            if self.metrics is not None:
                self.metrics.refused(reject)
        else:
            log.debug("connected: %s", peer)
        transport.start(door.session(reject))
        if initial and transport.session is not None:
            try:
                transport.session.data_received(initial)
            except Exception:
                transport._internal_error()

    def _forget(self, transport: Transport) -> None:
        self.transports.pop(transport.fd, None)

    def _release(self, transport: Transport) -> None:
        self.transports.pop(transport.fd, None)
        if self.metrics is not None:
            self.metrics.closed(transport.close_detail)
        via = transport.via
        self.admission.release(via.claimed if via is not None else transport.ip)

    # --- running and stopping -----------------------------------------------------------------

    def serve_forever(self) -> None:
        reactor = self.reactor
        while not (self._stopping and (not self.transports or reactor.now >= self._stop_deadline)):
            reactor.run_once()
        self._finish()

    def reload(self) -> bool:
        """Read the configuration and its files again; apply what can change live
        (selchat.ops.reload). True when the new configuration is in force."""
        from selchat.ops.reload import reload

        return reload(self)

    def request_stop(self) -> None:
        """Stop accepting, tell every client, and give them `shutdown_grace` to receive it."""
        if self._stopping:
            return
        self._stopping = True
        notify.stopping()
        reactor = self.reactor
        reactor.now = reactor.clock()
        self._stop_deadline = reactor.now + self.config.shutdown_grace
        for listener in self.listeners:
            listener.close()
        for gate in list(self.gates.values()):
            gate.close()
        self.gates.clear()  # (the metrics port stays: /healthz says 503 while this lasts)
        for transport in list(self.transports.values()):
            if transport.state is not State.CLOSED and transport.session is not None:
                transport.session.shutdown(self._stop_deadline)
        reactor.call_at(self._stop_deadline, lambda _: None)  # wake the loop at the deadline

    def _finish(self) -> None:
        for transport in list(self.transports.values()):
            transport.abort("server stopped")
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self.hub.kdf.close()
        if self.cluster is not None:
            self.cluster.close()
            self.redis.flush_now()
            self.redis.close()
        self.hub.fanout.flush()
        try:
            self.store.commit()
        except Exception as exc:
            log.error("history write failed at shutdown: %s", exc)
        self.reactor.close()
        log.info("stopped")


class Via:
    """A web connection from a trusted proxy: the client is whoever its requests name.

    Counted in all when accepted; against its client's address from the first request (and
    against another's, should a later request on the same connection name another). The
    transport's `ip` and `peer` become the client's, so every rule keyed by address and every
    log line name the person, not the proxy.
    """

    __slots__ = ("admission", "transport", "ip", "claimed")

    def __init__(self, admission: Admission, transport: Transport) -> None:
        self.admission = admission
        self.transport = transport
        self.ip = transport.ip  # the proxy's own address
        self.claimed: Optional[str] = None

    def claim(self, ip: str, port: Optional[int]) -> Optional[str]:
        transport = self.transport
        transport.peer = f"{ip}:{port}" if port else f"{ip} (via {self.ip})"
        if ip == self.claimed:
            return None
        if self.claimed is not None:
            self.admission.unclaim(self.claimed)
            self.claimed = None
        transport.ip = ip
        refused = self.admission.claim(ip)
        if refused is None:
            self.claimed = ip
        return refused


class LazyKdf:
    """The password workers (selchat.kdf), started at the first password to hash or check: a
    server nobody logs into runs no extra process."""

    def __init__(self, reactor: Reactor, workers: int) -> None:
        self.reactor = reactor
        self.workers = workers
        self.kdf: Any = None

    def _get(self) -> Any:
        if self.kdf is None:
            self.kdf = make_kdf(self.reactor, self.workers)
        return self.kdf

    def hash(self, password: str, done: Any) -> bool:
        return self._get().hash(password, done)

    def verify(self, password: str, verifier: Optional[str], done: Any) -> bool:
        return self._get().verify(password, verifier, done)

    def close(self) -> None:
        if self.kdf is not None:
            self.kdf.close()


class ListenError(OSError):
    """A port that cannot be opened; str() names it and says why."""


def bind_ports(config: ServerConfig) -> Dict[str, socket.socket]:
    """Every port the configuration asks for, bound and listening; if one cannot be, those
    bound already are closed and ListenError says which port and why."""
    wanted = [("native", config.port), ("irc", config.irc_port), ("web", config.web_port),
              ("metrics", config.metrics_port)]
    bound: Dict[str, socket.socket] = {}
    try:
        for name, port in wanted:
            if port is not None:
                bound[name] = _bind(config.host, port)
    except ListenError:
        for sock in bound.values():
            sock.close()
        raise
    return bound


def _bind(host: str, port: int) -> socket.socket:
    try:
        return bind(host, port)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _url(scheme: str, address: tuple, path: str = "") -> str:
    """A URL a person can click for a listening address (an IPv6 one in brackets)."""
    host = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
    return f"{scheme}://{host}:{address[1]}/{path}"


def _host_name() -> str:
    name = socket.gethostname() or "selchat"
    return "".join(ch for ch in name if ch.isascii() and (ch.isalnum() or ch in ".-_")) or "selchat"


def read_operators_file(path: str) -> List[str]:
    """The --operators file, or ValueError with one line naming it."""
    try:
        return read_operators(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--operators {path}: cannot read it: {exc}") from None


def read_password(path: str) -> bytes:
    return read_password_file(path).encode("utf-8")


def make_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ValueError(f"cannot load TLS certificate {cert} / key {key}: {reason}") from None
    return context


def raise_open_file_limit() -> None:
    """Each client is a file descriptor: take every one the hard limit allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit: %s", exc)


def open_store(path: str) -> Any:
    return SQLiteStore(path)


def close_store(store: Any) -> None:
    try:
        store.close()
    except StoreError as exc:
        log.error("closing the history store: %s", exc)
    else:
        log.info("history store closed: %s", store_summary(store.stats()))


def store_summary(stats: Dict[str, Any]) -> str:
    """The store's counters as one line a person reads (not a Python dict)."""
    commits, messages = int(stats.get("commits", 0)), int(stats.get("messages", 0))
    line = f"{_counted(messages, 'message')} written in {_counted(commits, 'commit')}"
    if commits:
        line += (f", {stats.get('commit_seconds', 0.0) * 1000:.1f} ms in all "
                 f"(longest {stats.get('max_commit_seconds', 0.0) * 1000:.1f} ms)")
    failures = int(stats.get("failures", 0))
    if failures:
        line += f", {failures} failed"
    checkpoints = int(stats.get("checkpoints", 0))
    if checkpoints:
        line += (f"; {_counted(checkpoints, 'checkpoint')}, "
                 f"{stats.get('checkpoint_seconds', 0.0) * 1000:.1f} ms in all")
    checkpoint_failures = int(stats.get("checkpoint_failures", 0))
    if checkpoint_failures:
        line += f", {_counted(checkpoint_failures, 'checkpoint')} failed"
    return line


def _counted(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def tune_garbage_collector() -> None:
    """Keep the cyclic collector's pauses out of everyone's latency.

    Everything made while starting (modules, classes, the options) lives as long as the
    process: frozen, a full collection no longer walks it. A closed connection leaves no cycle
    (the transport lets go of its session), so most garbage goes by reference counting and
    young collections can be rarer, which keeps survivors from being promoted towards a long
    full collection (docs/design.md, "One pass of the loop", has what the soak run measured).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def main(argv: Optional[List[str]] = None) -> int:
    command: Dict[str, Any] = {}
    config = parse_args(argv, command=command)
    if command.get("backup"):
        from selchat.ops.backup import BackupError, backup

        try:
            pages, size = backup(config.db, command["backup"])
        except BackupError as exc:
            print(f"selchat-server: {exc}", file=sys.stderr)
            return 1
        print(f"backed up {config.db} to {command['backup']} ({pages} pages, {size} bytes)")
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The ports first: a busy port stops the start before the database is opened (or made).
    try:
        bound = bind_ports(config)
    except ListenError as exc:
        print(f"selchat-server: {exc}", file=sys.stderr)
        return 1
    tls = None
    password = None
    try:
        if config.tls_cert and config.tls_key:
            tls = make_tls_context(config.tls_cert, config.tls_key)
        if config.password_file:
            password = read_password(config.password_file)
        operators = read_operators_file(config.operators) if config.operators else []
        store = open_store(config.db)  # last: nothing is made when something else is wrong
    except (ValueError, StoreError) as exc:
        for sock in bound.values():
            sock.close()
        print(f"selchat-server: {exc}", file=sys.stderr)
        return 1
    raise_open_file_limit()
    server = Server(config, store, tls, password, operators=operators)
    server.argv = list(argv) if argv is not None else sys.argv[1:]
    server.tls_digest = file_digest(config.tls_cert) if tls is not None else None
    server.listen(bound)
    server.install_signal_handlers()
    notify.ready(f"listening on {server.address[0]}:{server.address[1]}")
    tune_garbage_collector()
    try:
        server.serve_forever()
    finally:
        close_store(store)
    return server.exit_code


if __name__ == "__main__":
    sys.exit(main())
