"""The IRC door's response buffer (selchat.doors.irc.response): one label, one answer."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from selchat.doors.irc.response import ResponseBuffer, add_tag

SERVER = "irc.test"


def test_nothing_said_is_an_ack() -> None:
    buf = ResponseBuffer()
    buf.begin("a1")
    assert buf.finish(SERVER) == ["@label=a1 :irc.test ACK"]
    assert not buf.collecting and buf.finish(SERVER) == []


def test_one_line_carries_the_label_itself() -> None:
    buf = ResponseBuffer()
    buf.begin("a2")
    buf.add("@time=x :irc.test 001 me :hi")
    assert buf.finish(SERVER) == ["@label=a2;time=x :irc.test 001 me :hi"]


def test_several_lines_are_one_batch() -> None:
    buf = ResponseBuffer()
    buf.begin("a3")
    buf.add(":irc.test 353 me = #r :me")
    buf.add(":irc.test 366 me #r :End")
    out = buf.finish(SERVER)
    ref = out[0].split()[3][1:]
    assert out[0] == f"@label=a3 :irc.test BATCH +{ref} labeled-response"
    assert out[1:] == [f"@batch={ref} :irc.test 353 me = #r :me",
                       f"@batch={ref} :irc.test 366 me #r :End", f":irc.test BATCH -{ref}"]


def test_a_taken_label_ends_collecting() -> None:
    buf = ResponseBuffer()
    buf.begin("a4")
    assert buf.take_label() == "a4"
    assert not buf.collecting and buf.take_label() is None
    assert buf.finish(SERVER) == []


@given(st.lists(st.text(alphabet="abc :#", min_size=1, max_size=8), max_size=5))
def test_every_line_is_sent_once_and_labeled_once(lines: list) -> None:
    buf = ResponseBuffer()
    buf.begin("L")
    for line in lines:
        buf.add(line)
    out = buf.finish(SERVER)
    assert sum("label=L" in line for line in out) == 1
    assert len(out) == (1 if len(lines) <= 1 else len(lines) + 2)


def test_add_tag() -> None:
    assert add_tag(":s 001 me :x", "k=v") == "@k=v :s 001 me :x"
    assert add_tag("@a=b :s 001 me :x", "k=v") == "@k=v;a=b :s 001 me :x"
