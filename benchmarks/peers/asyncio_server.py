"""Reference peer (b): idiomatic asyncio streams, optionally on uvloop (`--uvloop`).

Written the way the asyncio documentation teaches, so selchat is measured against the
ordinary choice rather than a strawman: `asyncio.start_server`, one coroutine per client
reading with `readexactly`, and a broadcast that encodes once, `write`s the frame to every
member, then awaits `drain()` on each so a slow member pushes back on the sender instead of
growing memory without bound.

It speaks the benchmark subset of the selchat protocol: hello -> welcome (the newcomer is in
#lobby), say -> message to every member of the room (the sender too), ping -> pong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import struct
import sys
import time
from typing import Any, Callable, Coroutine, Dict, List, Optional

LOBBY = "#lobby"
MAX_FRAME = 65536
MAX_TEXT = 4096
_LEN = struct.Struct(">I")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(obj: dict) -> bytes:
    payload = _dumps(obj).encode("utf-8")
    return _LEN.pack(len(payload)) + payload


class Client:
    __slots__ = ("writer", "nick")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.nick: Optional[str] = None


class Server:
    """Room state lives on the event loop thread, so it needs no lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: Dict[Client, None] = {}  # insertion-ordered set
        self.nicks: Dict[str, Client] = {}
        self.next_id = 1

    async def broadcast_message(self, sender: Client, text: str) -> None:
        msg_id = self.next_id
        self.next_id += 1
        data = encode(
            {
                "type": "message",
                "id": msg_id,
                "ts": int(time.time() * 1000),
                "from": sender.nick,
                "room": LOBBY,
                "text": text,
            }
        )
        members = list(self.members)  # the set may change while we await below
        for member in members:
            member.writer.write(data)
        for member in members:
            try:
                await member.writer.drain()
            except ConnectionError:
                self.remove(member)

    def remove(self, client: Client) -> None:
        if client.nick is not None:
            self.members.pop(client, None)
            if self.nicks.get(client.nick.lower()) is client:
                del self.nicks[client.nick.lower()]

    async def handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(writer)
        try:
            while True:
                header = await reader.readexactly(4)
                (n,) = _LEN.unpack(header)
                if n == 0 or n > MAX_FRAME:
                    writer.write(encode({"type": "error", "code": "bad_frame", "message": "bad length"}))
                    await writer.drain()
                    return
                payload = await reader.readexactly(n)
                try:
                    req = json.loads(payload)
                    kind = req["type"]
                    if not isinstance(kind, str):
                        raise TypeError
                except (ValueError, TypeError, KeyError):
                    writer.write(encode({"type": "error", "code": "bad_json", "message": "not a JSON object with a type"}))
                    await writer.drain()
                    continue
                if kind == "quit":
                    return
                await self.handle(client, kind, req)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.remove(client)
            writer.close()

    async def handle(self, client: Client, kind: str, req: dict) -> None:
        writer = client.writer
        if kind == "say":
            room, text = req.get("room"), req.get("text")
            if client.nick is None:
                writer.write(encode({"type": "error", "code": "not_registered", "message": "say hello first"}))
            elif not isinstance(room, str) or not isinstance(text, str) or not text or len(text) > MAX_TEXT:
                writer.write(encode({"type": "error", "code": "bad_request", "message": "say needs room and text"}))
            elif room.lower() != LOBBY:
                writer.write(encode({"type": "error", "code": "not_in_room", "message": "only #lobby here"}))
            else:
                await self.broadcast_message(client, text)
                return
        elif kind == "ping":
            writer.write(encode({"type": "pong", "token": req.get("token")}))
        elif kind == "pong":
            return
        elif kind == "hello":
            nick = req.get("nick")
            if client.nick is not None:
                writer.write(encode({"type": "error", "code": "already_registered", "message": "already registered"}))
            elif not isinstance(nick, str) or not 1 <= len(nick) <= 32:
                writer.write(encode({"type": "error", "code": "bad_nick", "message": "bad nick"}))
            elif nick.lower() in self.nicks:
                writer.write(encode({"type": "error", "code": "nick_taken", "message": "nick taken"}))
            else:
                client.nick = nick
                self.nicks[nick.lower()] = client
                self.members[client] = None
                writer.write(
                    encode(
                        {
                            "type": "welcome",
                            "nick": nick,
                            "server": self.name,
                            "motd": "benchmark peer: asyncio streams",
                            "limits": {"max_frame": MAX_FRAME, "max_text": MAX_TEXT},
                        }
                    )
                )
        else:
            writer.write(encode({"type": "error", "code": "unknown_type", "message": kind[:64]}))
        await writer.drain()


async def serve(host: str, port: int, name: str) -> None:
    server = Server(name)
    srv = await asyncio.start_server(server.handle_client, host, port, backlog=4096)
    sockname = srv.sockets[0].getsockname()
    print(f"listening on {sockname[0]}:{sockname[1]}", file=sys.stderr, flush=True)
    async with srv:
        await srv.serve_forever()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (exit 2 if it does not import)")
    args = ap.parse_args(argv)
    raise_nofile()
    name = "asyncio-peer/1"
    runner: Callable[[Coroutine[Any, Any, None]], None]
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("uvloop is not installed (pip install uvloop)", file=sys.stderr)
            return 2
        name = "uvloop-peer/1"
        if hasattr(uvloop, "run"):
            runner = uvloop.run
        else:  # uvloop < 0.18
            uvloop.install()
            runner = asyncio.run
    else:
        runner = asyncio.run
    try:
        runner(serve(args.host, args.port, name))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
