"""The web door: HTTP/1.1 (h11) for the page, a WebSocket (wsproto) at /ws for the chat (docs/web.md)."""
