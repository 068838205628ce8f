"""benchmarks/pass_cost.py runs end to end at a tiny size and prints its one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "pass_cost.py"
LINE = re.compile(r"(native|irc) db=file R=3 S=2 W=2: (\d+) us/pass, ([\d.]+) us CPU/msg, .*"
                  r"sends ([\d.]+), commit ([\d.]+), rest ([\d.]+) us/msg")


@pytest.mark.parametrize("door", [[], ["--irc"]])
def test_pass_cost_prints_the_split(door) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "-R", "3", "-S", "2", "-W", "2",
                           "--cycles", "5", *door], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    m = LINE.search(done.stdout)
    assert m is not None, done.stdout
    assert m.group(1) == ("irc" if door else "native")
    assert float(m.group(3)) > 0 and float(m.group(4)) > 0 and float(m.group(5)) > 0
