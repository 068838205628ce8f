"""The IRC door's registration state machine (selchat.doors.irc.state): no I/O, one table.

The session reports what the client did; the machine says when it may register. Checked
against a small model over any sequence of what a client can make a session report.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.doors.irc.state import Phase, Registration, StateError


def test_nick_then_user_is_ready() -> None:
    reg = Registration()
    reg.nick_given("ann")
    assert reg.phase is Phase.GREETING and not reg.ready
    reg.user_given("ann", "Ann")
    assert reg.ready
    reg.registered_now()
    assert reg.registered and not reg.ready


def test_cap_negotiation_holds_registration_until_cap_end() -> None:
    reg = Registration()
    reg.cap_started(302)
    reg.nick_given("ann")
    reg.user_given("ann", "Ann")
    assert reg.negotiating and not reg.ready
    reg.cap_ended()
    assert reg.ready and reg.cap_version == 302


def test_sasl_inside_negotiation_and_cap_end_aborts_it() -> None:
    reg = Registration()
    reg.cap_started()
    reg.auth_started()
    assert reg.phase is Phase.AUTHENTICATING and reg.negotiating
    reg.auth_ended()
    assert reg.phase is Phase.NEGOTIATING
    reg.auth_started()
    reg.cap_ended()  # CAP END in the middle of an exchange ends both
    assert reg.phase is Phase.GREETING


def test_waiting_for_the_turn_then_refused_nick_goes_back() -> None:
    reg = Registration()
    reg.nick_given("ann")
    reg.user_given("ann", "Ann")
    reg.turn_asked()
    assert reg.phase is Phase.WAITING
    reg.nick_refused()
    assert reg.phase is Phase.GREETING and reg.nick is None
    reg.nick_given("bob")
    assert reg.ready


def test_a_move_the_table_lacks_is_our_bug() -> None:
    reg = Registration()
    with pytest.raises(StateError):
        reg.registered_now()  # nobody said NICK and USER
    with pytest.raises(StateError):
        reg.auth_started()  # SASL outside CAP negotiation is refused before it gets here


def test_after_registration_cap_changes_nothing() -> None:
    reg = Registration()
    reg.nick_given("ann")
    reg.user_given("ann", "Ann")
    reg.registered_now()
    reg.cap_started(302)
    reg.cap_ended()
    assert reg.registered and reg.cap_version == 302


ACTIONS = st.lists(st.sampled_from(["ls", "req", "end", "nick", "user", "auth", "auth_end",
                                    "register", "refuse"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(ACTIONS)
def test_against_a_model(actions: list) -> None:
    """What a session can report, in any order (it asks to register only when READY, and
    SASL only while negotiating): the machine never refuses it and agrees with the model."""
    reg = Registration()
    nick = ident = False
    negotiating = authenticating = registered = False
    for action in actions:
        if action in ("ls", "req"):
            reg.cap_started(302 if action == "ls" else 0)
            if not registered:
                negotiating = True
        elif action == "end":
            reg.cap_ended()
            negotiating = authenticating = False
        elif action == "nick" and not registered:
            reg.nick_given("n")
            nick = True
        elif action == "user" and not registered:
            reg.user_given("u", "r")
            ident = True
        elif action == "auth" and negotiating and not authenticating:
            reg.auth_started()
            authenticating = True
        elif action == "auth_end":
            reg.auth_ended()
            authenticating = False
        elif action == "register" and reg.ready:
            reg.registered_now()
            registered = True
        elif action == "refuse" and reg.ready:
            reg.nick_refused()
            nick = False
        assert reg.registered == registered
        assert reg.negotiating == (negotiating and not registered)
        assert reg.ready == (nick and ident and not negotiating and not registered)
        assert (reg.phase is Phase.AUTHENTICATING) == (authenticating and not registered)
