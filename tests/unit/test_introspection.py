"""scistreamd.introspection: RFC 7662 and Globus Auth answers parsed, and the
daemon's policy applied (scope, audience, times), each refusal by reason."""

from __future__ import annotations

import json

import pytest

from scistreamd.errors import AccessDenied, AuthUnavailable
from scistreamd.identity import Identity
from scistreamd.introspection import (
    Introspection,
    Policy,
    TokenDenied,
    cache_until,
    check_token_syntax,
    judge,
    parse_answer,
    parse_response,
    token_key,
)

NOW = 1_800_000_000.0

#: An answer of Globus Auth's introspection endpoint (its documented shape).
GLOBUS = {
    "active": True,
    "scope": "urn:globus:auth:scope:transfer.api.globus.org:all openid",
    "client_id": "d430e6c8-b06f-4446-a60c-7d1ea0c1ee2c",
    "sub": "ae341a98-d274-11e5-b888-dbae3a8ba545",
    "username": "user1@example.org",
    "aud": ["d430e6c8-b06f-4446-a60c-7d1ea0c1ee2c", "transfer.api.globus.org"],
    "iss": "https://auth.globus.org",
    "exp": NOW + 3600,
    "iat": NOW - 10,
    "nbf": NOW - 10,
    "email": "user1@example.org",
    "name": "User One",
    "identity_set": ["ae341a98-d274-11e5-b888-dbae3a8ba545",
                     "b0ae0c3e-d274-11e5-8fb1-0b6e4a4a5bb7"],
}


def test_globus_answer_parsed() -> None:
    intro = parse_answer(GLOBUS)
    assert intro.active and intro.sub == GLOBUS["sub"]
    assert intro.username == "user1@example.org"
    assert intro.scopes == ("urn:globus:auth:scope:transfer.api.globus.org:all", "openid")
    assert intro.audiences == tuple(GLOBUS["aud"])
    assert intro.identity_set == tuple(GLOBUS["identity_set"])
    assert (intro.exp, intro.iat, intro.iss) == (NOW + 3600, NOW - 10, "https://auth.globus.org")


def test_generic_rfc7662_answer_parsed() -> None:
    doc = {"active": True, "sub": "Z5O3upPC88QrAjx00dis", "scope": "read write",
           "client_id": "l238j323ds-23ij4", "username": "jdoe", "token_type": "Bearer",
           "exp": 1419356238, "iat": 1419350238, "aud": "https://protected.example.net/resource",
           "iss": "https://server.example.com/", "extension_field": "twenty-seven"}
    intro = parse_answer(doc)
    assert intro.audiences == ("https://protected.example.net/resource",)
    assert intro.scopes == ("read", "write") and intro.token_type == "Bearer"
    assert intro.identity_set == ()


def test_identity_set_detail_objects_give_their_sub() -> None:
    doc = dict(GLOBUS, identity_set=[{"sub": "a", "username": "x@y"}, {"sub": "b"}])
    assert parse_answer(doc).identity_set == ("a", "b")


def test_inactive_answer_ignores_everything_else() -> None:
    assert parse_answer({"active": False, "sub": ["garbage"]}) == Introspection(active=False)


@pytest.mark.parametrize("doc", [
    [], "active", None, {}, {"active": "true"}, {"active": 1},
    dict(GLOBUS, sub=7), dict(GLOBUS, sub="x\ny"), dict(GLOBUS, sub="x" * 600),
    dict(GLOBUS, scope=["a"]), dict(GLOBUS, scope='a "b"'),
    dict(GLOBUS, aud=7), dict(GLOBUS, aud=[1]), dict(GLOBUS, aud=[""]),
    dict(GLOBUS, exp="soon"), dict(GLOBUS, exp=True), dict(GLOBUS, exp=-1),
    dict(GLOBUS, exp=NOW * 1000), dict(GLOBUS, exp=float("nan")),
    dict(GLOBUS, identity_set="a"), dict(GLOBUS, identity_set=[None]),
    dict(GLOBUS, identity_set=["x"] * 300), dict(GLOBUS, username={"a": 1}),
])
def test_garbage_answers_are_auth_unavailable(doc: object) -> None:
    with pytest.raises(AuthUnavailable) as info:
        parse_answer(doc)
    assert "introspection server answered" in str(info.value)


def test_http_layer() -> None:
    body = json.dumps(GLOBUS).encode()
    assert parse_response(200, "application/json; charset=utf-8", body).sub == GLOBUS["sub"]
    for status, ctype, data, needle in [
        (401, "application/json", b'{"error": "invalid_client"}', "client credentials"),
        (403, "text/html", b"no", "token_client_secret_file"),
        (500, "application/json", body, "HTTP 500"),
        (302, "text/html", b"", "HTTP 302"),
        (200, "text/html", b"<html>", "text/html"),
        (200, "", body, "no content type"),
        (200, "application/json", b"\xff\xfe", "not JSON"),
        (200, "application/json", b"{", "not JSON"),
        (200, "application/json", b" " * (64 * 1024 + 1), "more than"),
    ]:
        with pytest.raises(AuthUnavailable) as info:
            parse_response(status, ctype, data)
        assert needle in str(info.value), (status, ctype)


NO_POLICY = Policy()


def _denied(intro: Introspection, policy: Policy = NO_POLICY, now: float = NOW) -> TokenDenied:
    with pytest.raises(TokenDenied) as info:
        judge(intro, policy, now)
    assert isinstance(info.value, AccessDenied)
    return info.value


def test_judge_gives_the_identity() -> None:
    ident = judge(parse_answer(GLOBUS), Policy(("openid",), "transfer.api.globus.org"), NOW)
    assert ident == Identity(kind="token", subject=GLOBUS["sub"], username="user1@example.org",
                             groups=tuple(GLOBUS["identity_set"]),
                             scopes=("urn:globus:auth:scope:transfer.api.globus.org:all",
                                     "openid"))
    assert ident.owner == f"token:{GLOBUS['sub']}"


def test_judge_refusals_name_their_reason_and_subject() -> None:
    good = parse_answer(GLOBUS)
    sub = GLOBUS["sub"]
    cases = [
        (Introspection(active=False), Policy(), "inactive", ""),
        (parse_answer(dict(GLOBUS, exp=NOW - 60)), Policy(), "expired", sub),
        (parse_answer(dict(GLOBUS, nbf=NOW + 600)), Policy(), "not_yet_valid", sub),
        (parse_answer(dict(GLOBUS, sub=None)), Policy(), "no_subject", ""),
        (good, Policy(("tunnels",)), "scope", sub),
        (good, Policy(("openid", "tunnels")), "scope", sub),
        (good, Policy(audience="scistreamd-s1"), "audience", sub),
        (parse_answer(dict(GLOBUS, aud=None)), Policy(audience="x"), "audience", sub),
    ]
    for intro, policy, reason, subject in cases:
        err = _denied(intro, policy)
        assert (err.reason, err.subject) == (reason, subject), err
        assert ": " in str(err)  # problem and fix


def test_names_an_identity_cannot_hold() -> None:
    err = _denied(parse_answer(dict(GLOBUS, sub="John Doe")))
    assert err.reason == "bad_subject" and "John Doe" not in str(err)
    ident = judge(parse_answer(dict(GLOBUS, username="John Doe", identity_set=["a b", "c"])),
                  Policy(), NOW)
    assert (ident.username, ident.groups) == ("", ("c",))


def test_clock_leeway_is_small() -> None:
    judge(parse_answer(dict(GLOBUS, exp=NOW - 5)), Policy(), NOW)
    assert _denied(parse_answer(dict(GLOBUS, exp=NOW - 31))).reason == "expired"


def test_cache_until_is_exp_or_the_maximum_whichever_sooner() -> None:
    assert cache_until(parse_answer(dict(GLOBUS, exp=NOW + 10)), NOW, 60) == NOW + 10
    assert cache_until(parse_answer(dict(GLOBUS, exp=NOW + 100)), NOW, 60) == NOW + 60
    assert cache_until(parse_answer(dict(GLOBUS, exp=None)), NOW, 60) == NOW + 60


def test_token_syntax() -> None:
    for good in ("abc", "AQ.b-c_d~e+f/g==", "x" * 8192):
        assert check_token_syntax(good) == good
    for bad in ("", "a b", "a\nb", "é", "a=b", "x" * 8193, None):
        with pytest.raises(TokenDenied) as info:
            check_token_syntax(bad)  # type: ignore[arg-type]
        assert info.value.reason == "malformed"
        if bad:
            assert str(bad) not in str(info.value)


def test_token_key_is_a_digest_not_the_token() -> None:
    key = token_key("secret-token")
    assert len(key) == 32 and b"secret-token" not in key
    assert key == token_key("secret-token") != token_key("secret-token2")
