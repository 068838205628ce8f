"""Reference peer (a): one thread per connection, blocking sockets, a locked member list.

This is the classic design as a careful engineer writes it, so that selchat is compared with
something fair rather than a strawman:

* each connection has its own thread reading frames through a buffered file (`makefile`),
  so one `recv` serves many small frames;
* a broadcast encodes its frame once, then `sendall`s it to every member while holding the
  room lock: holding the lock keeps frames from two broadcasters from interleaving on a
  socket and gives every member the same message order, as the protocol requires;
* sends carry a kernel timeout (SO_SNDTIMEO; reads stay plainly blocking, so idle members are
  fine), so a member that stops reading is dropped instead of stalling the room for ever (it
  still stalls it for up to the timeout: that is the price of the design).

It speaks the benchmark subset of the selchat protocol: hello -> welcome (the newcomer is in
#lobby), say -> message to every member of the room (the sender too), ping -> pong.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import socket
import struct
import sys
import threading
import time
from typing import Dict, List, Optional

LOBBY = "#lobby"
MAX_FRAME = 65536
MAX_TEXT = 4096
SERVER_NAME = "threaded-peer/1"
_LEN = struct.Struct(">I")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(obj: dict) -> bytes:
    payload = _dumps(obj).encode("utf-8")
    return _LEN.pack(len(payload)) + payload


class Client:
    """One connection: its socket and, once registered, its nick."""

    __slots__ = ("sock", "nick", "alive")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.nick: Optional[str] = None
        self.alive = True


class Server:
    """The shared state: members of #lobby and the nicks in use, behind one lock."""

    def __init__(self, send_timeout: float) -> None:
        self.lock = threading.Lock()
        self.members: List[Client] = []
        self.nicks: Dict[str, Client] = {}
        self.next_id = 1
        self.send_timeout = send_timeout

    def register(self, client: Client, nick: str) -> bool:
        key = nick.lower()
        with self.lock:
            if key in self.nicks:
                return False
            self.nicks[key] = client
            client.nick = nick
            self.members.append(client)
        return True

    def remove(self, client: Client) -> None:
        with self.lock:
            client.alive = False
            if client.nick is not None:
                self.nicks.pop(client.nick.lower(), None)
                try:
                    self.members.remove(client)
                except ValueError:
                    pass

    def broadcast_message(self, sender: Client, room: str, text: str) -> None:
        """Encode once, send to every member under the lock (one order for everybody)."""
        dead: List[Client] = []
        with self.lock:
            msg_id = self.next_id
            self.next_id += 1
            data = encode(
                {
                    "type": "message",
                    "id": msg_id,
                    "ts": int(time.time() * 1000),
                    "from": sender.nick,
                    "room": room,
                    "text": text,
                }
            )
            for member in self.members:
                try:
                    member.sock.sendall(data)
                except OSError:  # EAGAIN after SO_SNDTIMEO: a member that stopped reading
                    dead.append(member)
        for member in dead:
            self.remove(member)
            try:
                member.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def send_own(client: Client, server: Server, obj: dict) -> None:
    """Reply to the requester only; take the lock so it never interleaves with a broadcast."""
    data = encode(obj)
    with server.lock:
        client.sock.sendall(data)


def read_frame(f: "io.BufferedReader") -> Optional[bytes]:
    header = f.read(4)
    if len(header) < 4:
        return None
    (n,) = _LEN.unpack(header)
    if n == 0 or n > MAX_FRAME:
        raise ValueError("bad frame length")
    payload = f.read(n)
    if len(payload) < n:
        return None
    return payload


def serve_client(server: Server, sock: socket.socket) -> None:
    client = Client(sock)
    f: io.BufferedReader = sock.makefile("rb", buffering=65536)  # type: ignore[assignment]
    try:
        while client.alive:
            try:
                payload = read_frame(f)
            except ValueError:
                send_own(client, server, {"type": "error", "code": "bad_frame", "message": "bad length"})
                return
            if payload is None:
                return
            try:
                req = json.loads(payload)
                kind = req["type"]
                if not isinstance(kind, str):
                    raise TypeError
            except (ValueError, TypeError, KeyError):
                send_own(client, server, {"type": "error", "code": "bad_json", "message": "not a JSON object with a type"})
                continue
            handle(server, client, kind, req)
    except OSError:
        pass
    finally:
        server.remove(client)
        try:
            f.close()
            sock.close()
        except OSError:
            pass


def handle(server: Server, client: Client, kind: str, req: dict) -> None:
    if kind == "say":
        room, text = req.get("room"), req.get("text")
        if client.nick is None:
            send_own(client, server, {"type": "error", "code": "not_registered", "message": "say hello first"})
        elif not isinstance(room, str) or not isinstance(text, str) or not text or len(text) > MAX_TEXT:
            send_own(client, server, {"type": "error", "code": "bad_request", "message": "say needs room and text"})
        elif room.lower() != LOBBY:
            send_own(client, server, {"type": "error", "code": "not_in_room", "message": "only #lobby here"})
        else:
            server.broadcast_message(client, LOBBY, text)
    elif kind == "ping":
        send_own(client, server, {"type": "pong", "token": req.get("token")})
    elif kind == "pong":
        pass
    elif kind == "hello":
        nick = req.get("nick")
        if client.nick is not None:
            send_own(client, server, {"type": "error", "code": "already_registered", "message": "already registered"})
        elif not isinstance(nick, str) or not 1 <= len(nick) <= 32:
            send_own(client, server, {"type": "error", "code": "bad_nick", "message": "bad nick"})
        elif not server.register(client, nick):
            send_own(client, server, {"type": "error", "code": "nick_taken", "message": "nick taken"})
        else:
            send_own(
                client,
                server,
                {
                    "type": "welcome",
                    "nick": nick,
                    "server": SERVER_NAME,
                    "motd": "benchmark peer: thread per connection",
                    "limits": {"max_frame": MAX_FRAME, "max_text": MAX_TEXT},
                },
            )
    elif kind == "quit":
        client.alive = False
    else:
        send_own(client, server, {"type": "error", "code": "unknown_type", "message": kind[:64]})


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--send-timeout", type=float, default=10.0, help="seconds before a member that does not read is dropped")
    ap.add_argument("--stack-kib", type=int, default=256, help="thread stack size; the 8 MiB default makes 10k threads needlessly heavy")
    args = ap.parse_args(argv)
    raise_nofile()
    threading.stack_size(args.stack_kib * 1024)
    server = Server(args.send_timeout)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.host, args.port))
    lsock.listen(4096)
    host, port = lsock.getsockname()[:2]
    print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                sock, _ = lsock.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                print(f"accept failed: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.1)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            secs = int(args.send_timeout)
            usecs = int((args.send_timeout - secs) * 1e6)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", secs, usecs))
            try:
                threading.Thread(target=serve_client, args=(server, sock), daemon=True).start()
            except RuntimeError as exc:  # can't start new thread
                print(f"thread start failed: {exc}", file=sys.stderr, flush=True)
                sock.close()
    except KeyboardInterrupt:
        pass
    finally:
        lsock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
