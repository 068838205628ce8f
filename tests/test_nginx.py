"""Behind a real nginx (issue 18, item 1; docs/deploy.md shows the same configuration).

The test starts nginx as the current user on free loopback ports with a configuration it
writes into a temporary directory (pid file, logs and temporary files there too):

* `http`: TLS at nginx, the page and the WebSocket (`/ws`, upgrade passed on) proxied to the
  web door, with `X-Forwarded-For` / `X-Forwarded-Proto` / `Host`;
* `stream` (Debian packages the module apart: libnginx-mod-stream, loaded with
  `load_module`): the native and IRC ports passed through with `proxy_protocol on`.

Clients connect to nginx from other loopback addresses (127.0.0.2, ...) than the one nginx
uses towards the server (127.0.0.1, the only one trusted), so the address the server names
can only have come through nginx's words.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from conftest import unique_nick
from ircwire import IrcClient, irc_port
from test_web_door import WsClient, web_port
from wire import Client

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
STREAM_MODULES = ("/usr/lib/nginx/modules/ngx_stream_module.so",
                  "/usr/share/nginx/modules/ngx_stream_module.so")

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian package nginx)")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stream_module_line() -> Optional[str]:
    """What the configuration needs for the stream module: "" when nginx has it built in,
    a `load_module` line when it comes as a module (Debian), None when it is not there."""
    assert NGINX is not None
    built = subprocess.run([NGINX, "-V"], capture_output=True, text=True, timeout=10).stderr
    if re.search(r"--with-stream(\s|$)", built):
        return ""
    for path in STREAM_MODULES:
        if os.path.exists(path):
            return f"load_module {path};"
    return None


def nginx_config(folder: Path, *, web: Optional[int] = None, https: Optional[int] = None,
                 cert: Optional[Path] = None, key: Optional[Path] = None,
                 streams: Dict[int, int] = {}, stream_module: str = "") -> str:
    """The configuration of docs/deploy.md with ports and paths filled in (as one file)."""
    user = "user root;" if os.geteuid() == 0 else ""  # (workers then can read the temp folder)
    lines = [
        stream_module, user, "daemon off;", "worker_processes 1;",
        f"pid {folder}/nginx.pid;", f"error_log {folder}/error.log info;",
        "events { worker_connections 256; }",
    ]
    if web is not None:
        lines.append(f"""
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream selchat_web {{
        server 127.0.0.1:{web};
    }}
    server {{
        listen 127.0.0.1:{https} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};

        location / {{
            proxy_pass http://selchat_web;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 1h;
        }}
    }}
}}""")
    if streams:
        servers = "\n".join(f"""
    server {{
        listen 127.0.0.1:{listen};
        proxy_pass 127.0.0.1:{upstream};
        proxy_protocol on;
    }}""" for listen, upstream in streams.items())
        lines.append(f"stream {{{servers}\n}}")
    return "\n".join(lines) + "\n"


class Nginx:
    """nginx in the foreground with a written configuration; stopped by `stop()`."""

    def __init__(self, folder: Path, ports: List[int], **config: object) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nginx.conf").write_text(nginx_config(folder, **config))  # type: ignore[arg-type]
        assert NGINX is not None
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10.0
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"nginx exited ({self.proc.returncode}): {self.errors()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"nginx not listening on {port}: {self.errors()}")
                    time.sleep(0.05)

    def errors(self) -> str:
        stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
        log = (self.folder / "error.log")
        return stderr + (log.read_text(errors="replace")[-3000:] if log.exists() else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator:
    started: List[Nginx] = []

    def start(ports: List[int], **config: object) -> Nginx:
        """nginx listening on `ports`, configured by `nginx_config(folder, **config)`."""
        n = Nginx(tmp_path / f"nginx{len(started)}", ports, **config)
        started.append(n)
        return n

    yield start
    for n in started:
        n.stop()


def _from(source: str):
    """socket.socket, bound to a source address before connecting (for the test's clients)."""
    real = socket.socket

    def make(*args, **kwargs):  # type: ignore[no-untyped-def]
        sock = real(*args, **kwargs)
        sock.bind((source, 0))
        return sock

    return make


def test_the_web_door_behind_nginx_with_tls(start_server, nginx, certificate, monkeypatch) -> None:
    srv = start_server("--web-port", "0", "--trusted-proxy", "127.0.0.1", "--max-per-ip", "1",
                       "--register-rate", "0")
    https = _free_port()
    n = nginx([https], web=web_port(srv), https=https, cert=certificate["cert"], key=certificate["key"])
    context = ssl.create_default_context(cafile=str(certificate["cert"]))
    origin = f"https://localhost:{https}"
    clients: List[WsClient] = []
    try:
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.2"))
            a = WsClient(https, origin=origin, host=f"localhost:{https}", tls=context)
        clients.append(a)
        assert a.accepted, (a.rejected, a.reject_body, n.errors())
        nick = unique_nick("ng")
        a.register(nick)
        # The person's address, not nginx's: the log, and --max-per-ip 1 per person.
        srv.wait_log(rf"registered: 127\.0\.0\.2 \(via 127\.0\.0\.1\) as {nick}\b")
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.3"))
            b = WsClient(https, origin=origin, host=f"localhost:{https}", tls=context)
        clients.append(b)
        b.register(unique_nick("ng"))
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.2"))
            c = WsClient(https, origin=origin, host=f"localhost:{https}", tls=context)
        clients.append(c)
        c.expect_error("too_many_connections")
        # Another site's page is still refused behind the proxy.
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.4"))
            d = WsClient(https, origin="https://evil.example", host=f"localhost:{https}", tls=context)
        clients.append(d)
        assert d.rejected == 403
        # And the page itself comes through, with a CSP naming the wss: URL the browser uses.
        raw = context.wrap_socket(socket.create_connection(("127.0.0.1", https), timeout=5.0),
                                  server_hostname="localhost")
        raw.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{https}\r\nConnection: close\r\n\r\n".encode())
        page = b""
        while True:
            chunk = raw.recv(65536)
            if not chunk:
                break
            page += chunk
        raw.close()
        assert page.startswith(b"HTTP/1.1 200"), page[:200]
        assert f"connect-src 'self' wss://localhost:{https}".encode() in page
    finally:
        for c in clients:
            c.close()


def test_the_native_and_irc_ports_behind_nginx_stream_with_proxy_protocol(
        start_server, nginx, monkeypatch) -> None:
    module = stream_module_line()
    if module is None:
        pytest.skip("nginx's stream module is not installed (Debian package libnginx-mod-stream)")
    srv = start_server("--irc-port", "0", "--trusted-proxy", "127.0.0.1", "--max-per-ip", "1",
                       "--register-rate", "0")
    native, irc = _free_port(), _free_port()
    nginx([native, irc], streams={native: srv.port, irc: irc_port(srv)}, stream_module=module)
    opened: List[object] = []
    try:
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.5"))
            a = Client(native)
        opened.append(a)
        nick = unique_nick("ns")
        a.register(nick)
        srv.wait_log(rf"registered: 127\.0\.0\.5:\d+ as {nick}\b")
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.5"))
            b = Client(native)
        opened.append(b)
        b.expect_error("too_many_connections")  # one per person, not one per nginx
        with monkeypatch.context() as patch:
            patch.setattr(socket, "socket", _from("127.0.0.6"))
            c = IrcClient(irc)
        opened.append(c)
        inick = unique_nick("ni")
        c.register(inick)
        srv.wait_log(rf"registered: 127\.0\.0\.6:\d+ as {inick} \(irc\)")
        c.send(f"PRIVMSG {nick} :hello through two proxies")
        a.expect("message", text="hello through two proxies")
    finally:
        for x in opened:
            x.close()  # type: ignore[attr-defined]
