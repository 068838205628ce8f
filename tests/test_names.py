"""The text rules of docs/protocol.md, "Names and text": invisible-only text, bidi controls."""

from __future__ import annotations

import unicodedata
from typing import Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selchat.core.names import log_safe, text_problem, valid_nick

INVISIBLE = ["\u200b", "\u2060", "\ufeff", "\u00ad", "\u200c", "\u200d", "\u034f", "\u180e",
             "\u3164", "\u115f", "\ufe0f", "\U000e0041", "\u2800", "\u2061", "\ufff9"]
BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]


def problem(text: str) -> Optional[str]:
    return text_problem(text, 4096)


@pytest.mark.parametrize("char", INVISIBLE)
def test_text_of_invisible_characters_only_is_empty(char: str) -> None:
    assert problem(char) == "text is only whitespace or invisible"
    assert problem(char * 5) == "text is only whitespace or invisible"
    assert problem(f" {char}\n\t{char}\u3000") == "text is only whitespace or invisible"


def test_all_invisible_characters_together_are_still_empty() -> None:
    assert problem("".join(INVISIBLE) + " \u00a0\u2003") == "text is only whitespace or invisible"


@pytest.mark.parametrize("char", INVISIBLE)
def test_invisible_characters_beside_visible_ones_are_allowed(char: str) -> None:
    assert problem(f"a{char}b") is None


def test_joiners_and_selectors_that_real_text_needs_are_allowed() -> None:
    assert problem("\U0001F468\u200d\U0001F469\u200d\U0001F467") is None  # a family emoji (ZWJ)
    assert problem("\u2764\ufe0f") is None  # a heart in emoji style (VS16)
    assert problem("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645") is None  # Persian (ZWNJ)


@pytest.mark.parametrize("char", BIDI)
def test_bidi_embeddings_overrides_and_isolates_are_refused(char: str) -> None:
    why = problem(f"look at this: {char}txt.exe")
    assert why == f"text holds a bidirectional control character (U+{ord(char):04X})"
    assert problem(char) is not None


def test_bidi_marks_and_plain_rtl_text_are_allowed() -> None:
    assert problem("\u05e9\u05dc\u05d5\u05dd world") is None  # Hebrew beside Latin
    assert problem("price: 100\u200e$") is None  # LRM
    assert problem("\u200f\u0645\u0631\u062d\u0628\u0627") is None  # RLM then Arabic
    assert problem("\u061c\u0661\u0662") is None  # ALM


def test_the_old_rules_still_hold_for_non_ascii_text() -> None:
    assert problem("\u00e9\x00") == "text holds a control character"
    assert problem("\u00e9\x85") == "text holds a control character"  # C1 (NEL)
    assert problem("\u00a0\u2003") == "text is only whitespace or invisible"
    assert problem("\u00a0ok") is None
    assert problem("\U0001F600" * 4096) is None
    assert problem("\U0001F600" * 4097) == "text is longer than 4096 characters"


def test_plain_ascii_keeps_its_words() -> None:
    assert problem("") == "text is empty"
    assert problem(" \n\t") == "text is only whitespace"
    assert problem("a\x1b[31m") == "text holds a control character"
    assert problem("a\nb\tc") is None


def test_nicks_refuse_bidi_and_invisible_characters() -> None:
    assert valid_nick("alice")
    for char in BIDI + INVISIBLE:
        assert not valid_nick("ali" + char + "ce")
        assert not valid_nick(char + "alice")


def test_log_safe_neutralises_bidi_controls_too() -> None:
    assert log_safe("a\u202eb\u2066c\x1bd") == "a?b?c?d"
    assert log_safe("\u200e\u00e9") == "\u200e\u00e9"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=50))
def test_text_with_a_letter_or_digit_and_no_forbidden_character_is_allowed(text: str) -> None:
    forbidden = any((ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f
                    or c in BIDI for c in text)
    visible = any(unicodedata.category(c)[0] in "LNPS" and not c.isspace()
                  and c not in "\u3164\u115f\u1160\uffa0\u2800" for c in text)
    if not forbidden and visible:
        assert problem(text) is None
    if forbidden:
        assert problem(text) is not None


@given(st.lists(st.sampled_from(INVISIBLE + [" ", "\n", "\t", "\u00a0", "\u3000"]),
                min_size=1, max_size=30))
def test_any_mix_of_invisible_and_whitespace_is_empty(chars: list) -> None:
    assert problem("".join(chars)) is not None
