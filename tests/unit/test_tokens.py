"""scistreamd.tokens: the verifier's cache, shared requests, fail-closed errors,
denial log lines and the client secret file checks (with a scripted transport;
the real OAuth server is in tests/integration/test_tokens.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from pathlib import Path
from typing import List

import pytest

from scistreamd.config import config_from_mapping
from scistreamd.errors import AccessDenied, AuthUnavailable, ConfigError
from scistreamd.introspection import Policy, TokenDenied
from scistreamd.tokens import (
    MSG_TOKEN_DENIED,
    NO_USER_TOKENS,
    TokenSettings,
    TokenVerifier,
    basic_auth,
    read_client_secret,
)

NOW = 1_800_000_000.0
SETTINGS = TokenSettings(url="https://auth.test/introspect", client_id="daemon",
                         policy=Policy(("tunnels",), "daemon"), cache_max_seconds=60,
                         negative_cache_seconds=5)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Server:
    """A scripted introspection answer per token; counts requests."""

    def __init__(self) -> None:
        self.tokens = {}
        self.requests: List[str] = []
        self.down = False
        self.gate = None

    def grant(self, token: str, **fields) -> None:
        doc = {"active": True, "sub": f"sub-{token}", "scope": "tunnels", "aud": ["daemon"],
               "exp": NOW + 3600}
        doc.update(fields)
        self.tokens[token] = doc

    def __call__(self, token: str):
        self.requests.append(token)
        if self.gate is not None:
            self.gate.wait(10)
        if self.down:
            raise AuthUnavailable("cannot reach the token introspection server (ConnectionError)")
        doc = self.tokens.get(token, {"active": False})
        return 200, "application/json", json.dumps(doc).encode()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def verifier(server: Server, clock: Clock):
    v = TokenVerifier(SETTINGS, transport=server, clock=clock)
    yield v
    v.close()


def run(coro):
    return asyncio.run(coro)


def test_valid_token_gives_identity_and_is_cached(verifier, server, clock) -> None:
    server.grant("tok1", username="alice", identity_set=["a", "b"])

    async def many():
        return [await verifier.verify("tok1") for _ in range(100)]

    idents = run(many())
    assert {i.owner for i in idents} == {"token:sub-tok1"}
    assert idents[0].username == "alice" and idents[0].groups == ("a", "b")
    assert server.requests == ["tok1"] and verifier.introspections == 1
    assert verifier.cache_hits == 99


def test_positive_cache_ends_at_exp_or_maximum(verifier, server, clock) -> None:
    server.grant("short", exp=NOW + 10)
    server.grant("long")
    run(verifier.verify("short"))
    run(verifier.verify("long"))
    clock.now = NOW + 11
    run(verifier.verify("long"))
    assert server.requests == ["short", "long"]
    server.tokens.pop("short")  # the server now says inactive
    with pytest.raises(TokenDenied) as info:
        run(verifier.verify("short"))
    assert info.value.reason == "inactive"
    clock.now = NOW + 61
    run(verifier.verify("long"))
    assert server.requests == ["short", "long", "short", "long"]


def test_revocation_takes_effect_when_the_cache_entry_ends(verifier, server, clock) -> None:
    server.grant("rev")
    run(verifier.verify("rev"))
    server.tokens.pop("rev")
    run(verifier.verify("rev"))  # still cached: the documented cost of the cache
    clock.now = NOW + 60
    with pytest.raises(AccessDenied):
        run(verifier.verify("rev"))


def test_negative_answers_cached_a_few_seconds(verifier, server, clock) -> None:
    for _ in range(3):
        with pytest.raises(TokenDenied):
            run(verifier.verify("unknown"))
    assert server.requests == ["unknown"]
    server.grant("unknown")
    clock.now = NOW + 4
    with pytest.raises(TokenDenied):
        run(verifier.verify("unknown"))
    clock.now = NOW + 5
    assert run(verifier.verify("unknown")).subject == "sub-unknown"
    assert server.requests == ["unknown", "unknown"]


def test_policy_refusals(verifier, server) -> None:
    server.grant("noscope", scope="other")
    server.grant("noaud", aud=["someone-else"])
    server.grant("expired", exp=NOW - 3600)
    for token, reason in (("noscope", "scope"), ("noaud", "audience"), ("expired", "expired"),
                          ("garbage", "inactive"), ("a b", "malformed"), ("", "malformed")):
        with pytest.raises(TokenDenied) as info:
            run(verifier.verify(token))
        assert info.value.reason == reason
    assert "a b" not in server.requests and "" not in server.requests


def test_concurrent_checks_share_one_request(verifier, server) -> None:
    import threading

    server.grant("burst")
    server.gate = threading.Event()

    async def burst():
        tasks = [asyncio.ensure_future(verifier.verify("burst")) for _ in range(50)]
        await asyncio.sleep(0.05)
        server.gate.set()
        return await asyncio.gather(*tasks)

    idents = run(burst())
    assert len(idents) == 50 and server.requests == ["burst"]


def test_a_cancelled_caller_does_not_cancel_the_others(verifier, server) -> None:
    import threading

    server.grant("c")
    server.gate = threading.Event()

    async def scenario():
        first = asyncio.ensure_future(verifier.verify("c"))
        second = asyncio.ensure_future(verifier.verify("c"))
        await asyncio.sleep(0.05)
        first.cancel()
        server.gate.set()
        return await second

    assert run(scenario()).subject == "sub-c"
    assert server.requests == ["c"]


def test_server_down_fails_closed_and_is_not_cached(verifier, server, clock) -> None:
    server.grant("ok")
    server.grant("cached")
    run(verifier.verify("cached"))
    server.down = True
    for _ in range(2):
        with pytest.raises(AuthUnavailable) as info:
            run(verifier.verify("ok"))
        assert not isinstance(info.value, AccessDenied)
        assert "try again later" in str(info.value)
    assert server.requests.count("ok") == 2
    # A token checked before the outage stays good until its cache entry ends.
    assert run(verifier.verify("cached")).subject == "sub-cached"
    server.down = False
    assert run(verifier.verify("ok")).subject == "sub-ok"


def test_garbage_answer_is_auth_unavailable(server, clock) -> None:
    answers = iter([(200, "text/html", b"<html>"), (500, "application/json", b"{}"),
                    (200, "application/json", b'{"active": "yes"}')])
    v = TokenVerifier(SETTINGS, transport=lambda token: next(answers), clock=clock)
    for _ in range(3):
        with pytest.raises(AuthUnavailable):
            run(v.verify("tok"))
    v.close()


def test_no_url_refuses_every_token_by_name() -> None:
    v = TokenVerifier.from_config(config_from_mapping({}))
    assert not v.enabled
    with pytest.raises(TokenDenied) as info:
        run(v.verify("anything"))
    assert str(info.value) == NO_USER_TOKENS and info.value.reason == "no_user_tokens"


def test_denials_are_logged_with_id_subject_reason_and_never_the_token(
        verifier, server, caplog) -> None:
    token = "SECRETTOKENVALUE123"
    server.grant(token, scope="other", sub="alice-sub")
    caplog.set_level(logging.WARNING, logger="scistreamd.tokens")
    with pytest.raises(TokenDenied):
        run(verifier.verify(token))
    [rec] = caplog.records
    assert MSG_TOKEN_DENIED.hex == rec.MESSAGE_ID
    assert rec.SCISTREAM_DENIAL_REASON == "scope"
    assert rec.SCISTREAM_IDENTITY == "token:alice-sub"
    assert "alice-sub" in rec.getMessage() and "scope" in rec.getMessage()
    assert token not in rec.getMessage() + repr(rec.__dict__)


def test_the_daemon_cache_cap_keeps_memory_bounded(server, clock, monkeypatch) -> None:
    import scistreamd.tokens as tokens

    monkeypatch.setattr(tokens, "MAX_CACHE_ENTRIES", 10)
    v = TokenVerifier(SETTINGS, transport=server, clock=clock)
    for i in range(25):
        server.grant(f"t{i}")
        run(v.verify(f"t{i}"))
        assert len(v._cache) <= 10
    asked = len(server.requests)
    run(v.verify("t24"))  # the newest answer stayed
    assert len(server.requests) == asked
    v.close()


def test_basic_auth_sends_the_credentials_as_globus_sdk_does() -> None:
    header = basic_auth("d430e6c8-b06f-4446-a60c-7d1ea0c1ee2c", "a+b/c=:d")
    assert header.startswith("Basic ")
    assert base64.b64decode(header[6:]).decode() == \
        "d430e6c8-b06f-4446-a60c-7d1ea0c1ee2c:a+b/c=:d"


def _secret(tmp_path: Path, text: str = "s3cret\n", mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_client_secret_file_checks(tmp_path: Path) -> None:
    assert read_client_secret(_secret(tmp_path)) == "s3cret"
    assert read_client_secret(_secret(tmp_path, mode=0o400)) == "s3cret"
    for mode in (0o640, 0o604, 0o644):
        with pytest.raises(ConfigError) as info:
            read_client_secret(_secret(tmp_path, mode=mode))
        assert "chmod 0600" in str(info.value) and "s3cret" not in str(info.value)
    for text in ("", "\n", "two\nlines\n", "x" * 5000):
        with pytest.raises(ConfigError):
            read_client_secret(_secret(tmp_path, text=text))
    with pytest.raises(ConfigError) as info:
        read_client_secret(tmp_path / "missing")
    assert info.value.key == "token_client_secret_file"
    link = tmp_path / "link"
    link.symlink_to(_secret(tmp_path))
    with pytest.raises(ConfigError):
        read_client_secret(link)
    with pytest.raises(ConfigError):
        read_client_secret(tmp_path)


def test_client_secret_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    path = _secret(tmp_path)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError) as info:
        read_client_secret(path)
    assert "owned by uid 65534" in str(info.value)


def test_from_config_reads_the_secret(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    cfg = config_from_mapping({
        "token_introspection_url": "https://auth.test/introspect", "token_client_id": "d",
        "token_client_secret_file": str(secret), "token_required_scope": "tunnels",
        "token_audience": "d", "token_cache_max_seconds": 30})
    v = TokenVerifier.from_config(cfg)
    assert v.enabled and v.settings.policy == Policy(("tunnels",), "d")
    assert v.settings.cache_max_seconds == 30
    assert "s3cret" not in repr(v.__dict__)
    v.close()
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError):
        TokenVerifier.from_config(cfg)


# -- the HTTPS transport, against a loopback server of canned answers ------------

@pytest.fixture
def https(tmp_path: Path):
    """A loopback HTTPS server; ``answers[path] = (status, headers, body)``; records requests."""
    import http.server
    import ipaddress
    import ssl
    import threading

    from scistreamd import certs

    ca = certs.make_ca("unit test CA")
    pair = certs.make_host_cert("localhost", [ipaddress.ip_address("127.0.0.1")], issuer=ca)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem())
    certs.write_pair(pair, tmp_path / "s.crt", tmp_path / "s.key")
    answers: dict = {}
    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.path, dict(self.headers), body.decode()))
            status, headers, data = answers[self.path]
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"https://127.0.0.1:{httpd.server_address[1]}"
    yield base, tmp_path / "ca.crt", answers, seen
    httpd.shutdown()
    httpd.server_close()


def _transport_verifier(base: str, path: str, ca) -> TokenVerifier:
    settings = TokenSettings(url=base + path, client_id="daemon", ca_file=ca, timeout=5)
    return TokenVerifier(settings, client_secret="s3cret")


def test_transport_sends_the_rfc7662_request(https) -> None:
    base, ca, answers, seen = https
    answers["/introspect"] = (200, {"Content-Type": "application/json"},
                              json.dumps({"active": True, "sub": "alice"}).encode())
    v = _transport_verifier(base, "/introspect", ca)
    assert run(v.verify("tok-1")).subject == "alice"
    v.close()
    [(path, headers, body)] = seen
    assert headers["Authorization"] == basic_auth("daemon", "s3cret")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert sorted(body.split("&")) == ["include=identity_set", "token=tok-1",
                                       "token_type_hint=access_token"]


def test_transport_follows_no_redirect_and_reads_no_huge_answer(https) -> None:
    base, ca, answers, seen = https
    answers["/moved"] = (302, {"Location": base + "/elsewhere"}, b"")
    answers["/elsewhere"] = (200, {"Content-Type": "application/json"}, b'{"active": true}')
    answers["/huge"] = (200, {"Content-Type": "application/json"},
                        b'{"active": true, "x": "' + b"a" * 200_000 + b'"}')
    for path in ("/moved", "/huge"):
        v = _transport_verifier(base, path, ca)
        with pytest.raises(AuthUnavailable):
            run(v.verify("tok-2"))
        v.close()
    assert [p for p, _, _ in seen] == ["/moved", "/huge"]  # never /elsewhere


def test_transport_refuses_an_untrusted_certificate(https, tmp_path: Path) -> None:
    from scistreamd import certs

    base, _ca, answers, seen = https
    other = tmp_path / "other-ca.crt"
    other.write_bytes(certs.make_ca("another CA").cert_pem())
    v = _transport_verifier(base, "/introspect", other)
    with pytest.raises(AuthUnavailable):
        run(v.verify("tok-3"))
    v.close()
    assert seen == []


def test_transport_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    v = _transport_verifier(f"https://127.0.0.1:{port}", "/introspect", None)
    with pytest.raises(AuthUnavailable) as info:
        run(v.verify("tok-4"))
    assert "try again later" in str(info.value)
    v.close()


def test_a_request_whose_callers_all_gave_up_is_cleaned_up(verifier, server, caplog) -> None:
    import gc
    import threading

    server.gate = threading.Event()
    server.down = True

    async def scenario():
        caller = asyncio.ensure_future(verifier.verify("gone"))
        await asyncio.sleep(0.05)
        caller.cancel()
        server.gate.set()
        while verifier._inflight:
            await asyncio.sleep(0.01)

    caplog.set_level(logging.ERROR, logger="asyncio")
    run(scenario())
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    server.down, server.gate = False, None
    server.grant("gone")
    assert run(verifier.verify("gone")).subject == "sub-gone"
    assert server.requests == ["gone", "gone"]
