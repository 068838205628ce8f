"""selchat.core.passwords: the rule, the verifier record, SASLprep and SCRAM-SHA-256.

The SCRAM exchange is pinned to RFC 7677's own example (user 'user', password 'pencil'); the
record and the SCRAM parsers are fed garbage by hypothesis, which must only ever get False,
None or ScramError back. Records are made at a low cost here (n=16) except where today's
cost itself is the point.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selchat.core import passwords as pw
from selchat.core.passwords import ScramClient, ScramCredentials, ScramError, ScramServer

CHEAP = {"n": 16, "r": 1, "p": 1, "iterations": 4096}

# RFC 7677 section 3.
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = ("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_credentials() -> ScramCredentials:
    stored, server = pw.scram_keys("pencil", RFC_SALT, 4096)
    return ScramCredentials(RFC_SALT, 4096, stored, server)


# --- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("password, ok", [
    ("", False), ("1234567", False), ("12345678", True), ("x" * 256, True), ("x" * 257, False),
    ("é" * 4, True),  # 8 bytes in UTF-8, 4 characters
    ("é" * 3 + "x", False),  # 7 bytes
    ("€" * 85 + "x", True),  # 256 bytes
    ("€" * 86, False),  # 258 bytes
    ("abcdefg\ud800", False),  # a lone surrogate is not text that UTF-8 can carry
])
def test_the_rule_counts_utf8_bytes(password: str, ok: bool) -> None:
    problem = pw.password_problem(password)
    assert (problem is None) is ok
    if not ok:
        assert isinstance(problem, str) and problem


def test_the_rule_refuses_what_is_not_text() -> None:
    assert pw.password_problem(None) is not None
    assert pw.password_problem(b"12345678") is not None


def test_make_verifier_refuses_a_password_the_rule_refuses() -> None:
    with pytest.raises(ValueError):
        pw.make_verifier("short", **CHEAP)
    with pytest.raises(ValueError):
        pw.make_verifier("long enough", n=3, r=1, p=1)  # n must be a power of two


# --- the record ------------------------------------------------------------------------------


def test_a_record_at_todays_cost_checks_its_password_only() -> None:
    v = pw.make_verifier("correct horse")
    assert v.startswith(f"$scrypt$n={pw.SCRYPT_N},r={pw.SCRYPT_R},p={pw.SCRYPT_P}$")
    assert "correct horse" not in v
    assert pw.check_password("correct horse", v)
    assert not pw.check_password("correct horsE", v)
    assert not pw.needs_rehash(v)
    creds = pw.scram_credentials(v)
    assert creds is not None and creds.iterations == pw.SCRAM_ITERATIONS
    assert len(creds.stored_key) == len(creds.server_key) == 32


def test_two_records_of_one_password_differ_by_their_salts() -> None:
    a, b = pw.make_verifier("same password", **CHEAP), pw.make_verifier("same password", **CHEAP)
    assert a != b
    assert pw.check_password("same password", a) and pw.check_password("same password", b)


def test_the_cost_travels_in_the_record() -> None:
    """A record made at another cost is checked at its own cost, and flagged for a rehash."""
    v = pw.make_verifier("an older password", **CHEAP)
    assert "$scrypt$n=16,r=1,p=1$" in v and "$i=4096$" in v
    assert pw.check_password("an older password", v)
    assert pw.needs_rehash(v)


def test_a_password_saslprep_refuses_gets_no_scram_credentials() -> None:
    v = pw.make_verifier("bell\u0007bell", **CHEAP)  # a control character: prohibited
    assert pw.scram_credentials(v) is None
    assert pw.check_password("bell\u0007bell", v)  # PLAIN still works


def test_scram_credentials_are_those_of_the_saslprepped_password() -> None:
    v = pw.make_verifier("pass\u00a0word!", **CHEAP)  # a no-break space maps to a space
    creds = pw.scram_credentials(v)
    assert creds is not None
    assert pw.scram_keys("pass word!", creds.salt, creds.iterations) == (creds.stored_key, creds.server_key)
    assert not pw.check_password("pass word!", v)  # scrypt hashes the password as typed


@pytest.mark.parametrize("broken", [
    "", "$", "$scrypt", "$bcrypt$n=16,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",
    "$scrypt$n=15,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",  # not a power of two
    "$scrypt$n=1048576,r=64,p=16$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",  # far too costly
    "$scrypt$n=016,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",  # not canonical
    "$scrypt$r=1,n=16,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==",
    "$scrypt$n=16,r=1,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==",  # salt too short
    "$scrypt$n=16,r=1,p=1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA==",  # padding missing
    "$scrypt$n=16,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==$scram-sha-256$i=4095$AAAAAAAAAAA=$"
    + "A" * 43 + "=$" + "A" * 43 + "=",  # below RFC 7677's iteration floor
])
def test_a_broken_record_is_a_failed_check_not_an_error(broken: str) -> None:
    assert not pw.check_password("whatever password", broken)
    assert pw.scram_credentials(broken) is None
    assert not pw.verifier_ok(broken)
    assert pw.needs_rehash(broken)


def test_a_record_that_is_not_text_is_a_failed_check() -> None:
    for thing in (None, 42, b"$scrypt$", ["$scrypt$"]):
        assert not pw.check_password("whatever password", thing)
        assert pw.scram_credentials(thing) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_a_record_never_raises(text: str) -> None:
    assert pw.check_password("whatever password", text) in (True, False)
    assert pw.scram_credentials(text) is None or isinstance(pw.scram_credentials(text), ScramCredentials)


_b64_field = st.binary(min_size=0, max_size=70).map(lambda b: base64.b64encode(b).decode())
_numberish = st.one_of(st.integers(-5, 1 << 21).map(str), st.text("0123456789xn=,", max_size=8))


@settings(max_examples=300, deadline=None)
@given(_numberish, _numberish, _numberish, _b64_field, _b64_field,
       st.one_of(st.none(), st.tuples(_numberish, _b64_field, _b64_field, _b64_field)))
def test_records_of_the_right_shape_with_wrong_fields_never_raise(
        n: str, r: str, p: str, salt: str, digest: str, scram: object) -> None:
    record = f"$scrypt$n={n},r={r},p={p}${salt}${digest}"
    if scram is not None:
        i, s, k1, k2 = scram  # type: ignore[misc]
        record += f"$scram-sha-256$i={i}${s}${k1}${k2}"
    assert pw.check_password("whatever password", record) in (True, False)
    creds = pw.scram_credentials(record)
    assert creds is None or 4096 <= creds.iterations <= pw.MAX_SCRAM_ITERATIONS


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda s: pw.password_problem(s) is None))
def test_any_acceptable_password_round_trips(password: str) -> None:
    v = pw.make_verifier(password, **CHEAP)
    assert pw.verifier_ok(v)
    assert pw.check_password(password, v)
    assert not pw.check_password(password + "x", v)


# --- SASLprep ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, prepped", [
    ("I\u00adX", "IX"),  # RFC 4013's examples: soft hyphen mapped to nothing
    ("user", "user"),
    ("USER", "USER"),  # case is kept
    ("\u00aa", "a"),  # NFKC
    ("\u2168", "IX"),
])
def test_saslprep_rfc4013_examples(text: str, prepped: str) -> None:
    assert pw.saslprep(text) == prepped


@pytest.mark.parametrize("text", ["\u0007", "\u0627\u0031", "", "\u00ad"])
def test_saslprep_refuses_rfc4013_examples(text: str) -> None:
    with pytest.raises(ValueError):
        pw.saslprep(text)


# --- SCRAM-SHA-256 ----------------------------------------------------------------------------


def test_rfc7677_exchange() -> None:
    server = ScramServer(nonce=RFC_SERVER_NONCE)
    assert server.client_first(RFC_CLIENT_FIRST) == "user"
    assert server.authzid == ""
    assert server.server_first(rfc_credentials()) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.authenticated


def test_rfc7677_client_side() -> None:
    client = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert client.first() == RFC_CLIENT_FIRST
    assert client.final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert client.verify(RFC_SERVER_FINAL)
    assert not client.verify("v=" + "A" * 43 + "=")


def test_a_wrong_password_fails_at_the_proof() -> None:
    server = ScramServer()
    client = ScramClient("user", "pencils")
    server.client_first(client.first())
    first = server.server_first(rfc_credentials())
    with pytest.raises(ScramError) as err:
        server.client_final(client.final(first))
    assert err.value.code == "invalid-proof"
    assert not server.authenticated


def test_an_unknown_user_goes_through_to_the_proof_with_a_stable_salt() -> None:
    firsts = []
    for _ in range(2):
        server = ScramServer()
        client = ScramClient("nobody", "pencil")
        server.client_first(client.first())
        first = server.server_first(None)
        firsts.append(first.split(",")[1:])
        with pytest.raises(ScramError) as err:
            server.client_final(client.final(first))
        assert err.value.code == "invalid-proof"
    assert firsts[0] == firsts[1]  # the same salt and count each time: nothing to tell


def test_a_record_made_here_logs_in_by_scram() -> None:
    v = pw.make_verifier("ünïcode pässword", **CHEAP)
    server, client = ScramServer(), ScramClient("al=ice,x", "ünïcode pässword")
    assert server.client_first(client.first()) == "al=ice,x"  # saslname escapes undone
    final = server.client_final(client.final(server.server_first(pw.scram_credentials(v))))
    assert client.verify(final)


@pytest.mark.parametrize("message, code", [
    ("p=tls-unique,,n=user,r=abc", "channel-binding-not-supported"),
    ("n,,m=ext,n=user,r=abc", "extensions-not-supported"),
    ("n,,n=us=2Xer,r=abc", "invalid-username-encoding"),
    ("n,,n=,r=abc", "invalid-username-encoding"),
    ("n,,n=user", "other-error"),
    ("n,,n=user,r=", "other-error"),
    ("n,,n=user,r=a b", "other-error"),
    ("x,,n=user,r=abc", "other-error"),
    ("n,b=x,n=user,r=abc", "other-error"),
    ("n,,r=abc,n=user", "other-error"),
    ("n=user,r=abc", "other-error"),
    (b"n,,n=\xff,r=abc", "invalid-encoding"),
    ("n,,n=\ud800,r=abc", "invalid-encoding"),
    ("n,,n=us\0er,r=abc", "invalid-encoding"),
])
def test_bad_client_first_messages(message: object, code: str) -> None:
    with pytest.raises(ScramError) as err:
        ScramServer().client_first(message)  # type: ignore[arg-type]
    assert err.value.code == code


def test_authzid_and_extensions_in_client_first() -> None:
    server = ScramServer()
    assert server.client_first("y,a=admin=2Cx,n=user,r=abc,x=ignored") == "user"
    assert server.authzid == "admin,x"


@pytest.mark.parametrize("final, code", [
    ("c=eSws,r={nonce},p=" + "A" * 43 + "=", "channel-bindings-dont-match"),  # 'y,,' for 'n,,'
    ("c=biws,r={nonce}x,p=" + "A" * 43 + "=", "other-error"),
    ("c=biws,r={nonce},p=AAAA", "invalid-proof"),
    ("c=biws,r={nonce}", "other-error"),
    ("c=biws,p=x,r={nonce}", "other-error"),
])
def test_bad_client_final_messages(final: str, code: str) -> None:
    server = ScramServer()
    server.client_first(RFC_CLIENT_FIRST)
    nonce = server.server_first(rfc_credentials()).split(",")[0][2:]
    with pytest.raises(ScramError) as err:
        server.client_final(final.format(nonce=nonce))
    assert err.value.code == code


def test_messages_out_of_order_end_the_exchange() -> None:
    server = ScramServer()
    with pytest.raises(ScramError):
        server.client_final(RFC_CLIENT_FINAL)
    with pytest.raises(ScramError):
        server.client_first(RFC_CLIENT_FIRST)  # failed is final
    server = ScramServer(nonce=RFC_SERVER_NONCE)
    server.client_first(RFC_CLIENT_FIRST)
    server.server_first(rfc_credentials())
    server.client_final(RFC_CLIENT_FINAL)
    with pytest.raises(ScramError):
        server.client_final(RFC_CLIENT_FINAL)  # a replay within the exchange


def test_a_message_too_long_is_refused() -> None:
    with pytest.raises(ScramError):
        ScramServer().client_first("n,,n=user,r=" + "a" * pw.MAX_SCRAM_MESSAGE)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.lists(st.sampled_from(["n", "y", "p=x", "a=u", "n=user", "r=abc", "m=x", "=", "==3D",
                                           "=2C", "x=1", "", ",", "\0"]), max_size=8).map(",".join)))
def test_any_client_first_gives_a_name_or_a_scram_error(message: object) -> None:
    server = ScramServer()
    try:
        name = server.client_first(message)  # type: ignore[arg-type]
    except ScramError as exc:
        assert isinstance(exc.code, str) and exc.code
    else:
        assert isinstance(name, str) and name


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200),
                 st.lists(st.sampled_from(["c=biws", "c=eSws", "r=rOprNGfwEbeRWgbNEkqO", "p=AAAA",
                                           "p=" + "A" * 43 + "=", "x=y", "", "c", "=", "p="]),
                          max_size=6).map(",".join)))
def test_any_client_final_is_a_scram_error(message: object) -> None:
    server = ScramServer(nonce=RFC_SERVER_NONCE)
    server.client_first(RFC_CLIENT_FIRST)
    server.server_first(rfc_credentials())
    with pytest.raises(ScramError):
        server.client_final(message)  # type: ignore[arg-type]
