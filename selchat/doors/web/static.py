"""The web client's files, read once at start into a table that requests are looked up in.

No path from a request ever reaches the file system: the table is built from the package's
`static/` folder when the server starts (top-level files whose names and types are known),
and a request either names one of its keys exactly or gets 404. So `..`, `%2e%2e`, symbolic
links and files added later cannot be served, and a request costs no system call.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from typing import Dict, NamedTuple

log = logging.getLogger("selchat.server")

PACKAGE = "selchat.doors.web"
FOLDER = "static"
INDEX = "index.html"
MAX_FILE = 4 << 20  # a file larger than this is not the web client's: left out

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".json": b"application/json",
    ".webmanifest": b"application/manifest+json",
    ".txt": b"text/plain; charset=utf-8",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class StaticFile(NamedTuple):
    content_type: bytes
    body: bytes


def load(package: str = PACKAGE, folder: str = FOLDER) -> Dict[bytes, StaticFile]:
    """Every servable file of the package's static folder, keyed by its URL path (`/` is the index)."""
    table: Dict[bytes, StaticFile] = {}
    try:
        root = resources.files(package).joinpath(folder)
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        log.warning("web client files not found (%s/%s): only the WebSocket is served", package, folder)
        return table
    for entry in sorted(entries, key=lambda e: e.name):
        name = entry.name
        dot = name.rfind(".")
        content_type = CONTENT_TYPES.get(name[dot:].lower()) if dot > 0 else None
        if content_type is None or not _NAME.fullmatch(name) or not entry.is_file():
            continue
        body = entry.read_bytes()
        if len(body) > MAX_FILE:
            log.warning("web client file %s is %d bytes: not served", name, len(body))
            continue
        table[b"/" + name.encode("ascii")] = StaticFile(content_type, body)
    index = table.get(b"/" + INDEX.encode("ascii"))
    if index is not None:
        table[b"/"] = index
    return table
