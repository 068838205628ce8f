"""The native door: length-prefixed JSON frames (docs/protocol.md)."""
