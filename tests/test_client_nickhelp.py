"""Nick refusals in words, and the nick the client offers instead (selchat/client/nickhelp.py)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from selchat.client.app import explain_refusal
from selchat.client.nickhelp import explain, suggest, taken_suggestion
from selchat.core.names import valid_nick
from selchat.defaults import NICK_MAX


def test_the_issue_examples() -> None:
    assert explain("john smith") == ["a nick cannot contain spaces"]
    assert suggest("john smith") == "john_smith"
    assert suggest("zoë😀") == "zoe"
    problems = explain("zoë😀")
    assert len(problems) == 1 and "'ë'" in problems[0] and "'😀'" in problems[0]


def test_each_rule_has_its_own_words() -> None:
    assert explain("2cool") == ["a nick cannot start with a digit"]
    assert explain("-dash") == ["a nick cannot start with '-'"]
    assert explain("") == ["a nick cannot be empty"]
    assert explain("a" * (NICK_MAX + 1)) == [f"a nick is at most {NICK_MAX} characters long (this one has {NICK_MAX + 1})"]
    assert explain("bob") == []
    # several problems at once are all named
    assert len(explain("9 lives of zoë" + "x" * 40)) == 4


def test_suggestions_stay_close_to_what_was_typed() -> None:
    assert suggest("  john   smith ") == "john_smith"
    assert suggest("2cool") == "cool"
    assert suggest("42") == "n42"
    assert suggest("😀") == "guest"
    assert suggest("ｆｕｌｌ") == "full"  # full-width letters fold to ASCII
    assert len(suggest("a" * 100)) == NICK_MAX
    assert suggest("bob") == "bob"
    assert taken_suggestion("bob") == "bob_"
    assert taken_suggestion("a" * NICK_MAX) == "a" * (NICK_MAX - 1) + "_"


def test_a_refusal_is_explained_with_a_suggestion() -> None:
    text = explain_refusal("john smith", {"type": "error", "code": "bad_nick", "message": "nick must be ..."})
    assert text == "'john smith' cannot be a nick: a nick cannot contain spaces. Try john_smith"
    text = explain_refusal("bob", {"type": "error", "code": "nick_taken", "message": "taken"})
    assert "taken" in text and "bob_" in text
    text = explain_refusal("alice", {"type": "error", "code": "nick_reserved", "message": "reserved"})
    assert "--account alice" in text


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
@example("")
@example(" ")
@example("-")
@example("0")
@example("_" * 40)
@example("\u0301")  # a lone combining mark
@example("ǅ")  # a title-case digraph that NFKD splits
def test_the_suggestion_is_always_a_valid_nick(nick: str) -> None:
    assert valid_nick(suggest(nick))
    assert valid_nick(taken_suggestion(nick))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_explain_finds_a_problem_exactly_when_the_server_would(nick: str) -> None:
    assert (explain(nick) == []) == valid_nick(nick)


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z_\[\]{}\\|^][A-Za-z0-9_\-\[\]{}\\|^]{0,31}", fullmatch=True))
def test_a_valid_nick_is_suggested_unchanged(nick: str) -> None:
    assert suggest(nick) == nick
