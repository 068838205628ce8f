"""Appending a benchmark's table to benchmarks/RESULTS.md: one way for every point."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Benchmark results\n\nAppended by `selchat-bench`; see benchmarks/README.md for what "
          "each column means.\n\n")


def append_results(path: Path, text: str) -> None:
    """Append `text` as a section of its own: the file's header first when it is new, a blank
    line before it when the file does not end with one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        lead = HEADER
    else:
        lead = "" if path.read_text().endswith("\n\n") else "\n"
    with path.open("a") as f:
        f.write(lead + text + "\n")
