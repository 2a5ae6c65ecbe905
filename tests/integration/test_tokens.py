"""Bearer token verification against a real OAuth 2.0 server in the test bed.

tests/oauth_server.py (python3-authlib) runs as a unit on server2 over HTTPS
with a CA of this test's own; the verifier (scistreamd.tokens.TokenVerifier)
runs on server1 inside tests/integration/tokendriver.py with the host's
python, built from scistreamd.toml keys exactly as the daemon builds it.
Tokens are issued by the server (client credentials grant), never made up
here, except the garbage ones.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Dict, Optional

import pytest

from scistreamd.tokens import MSG_AUTH_UNAVAILABLE, MSG_TOKEN_DENIED
from tests.integration.conftest import restart_daemon
from tests.oauthbed import (
    OAUTH,
    OAUTH_PORT,
    SCOPE,
    Driver,
    OAuth,
    config,
    journal_entries,
    put,
)


@pytest.fixture(scope="module")
def driver(bed):
    d = Driver(bed["server1"])
    yield d
    d.close()


@pytest.fixture(scope="module")
def oauth(bed, driver):
    o = OAuth(bed, driver)
    o.start()
    yield o
    o.remove()


_names = iter(range(1_000_000))


def verifier(driver: Driver, **over: Any) -> str:
    """A new verifier in the driver (fresh cache); its name."""
    name = f"v{next(_names)}"
    out = driver.ask(op="new", name=name, config=config(**over))
    assert out == {"ok": True}, out
    return name


def verify(driver: Driver, name: str, token: str, n: int = 1, parallel: bool = False) -> list:
    out = driver.ask(op="verify", name=name, token=token, n=n, parallel=parallel)
    assert "results" in out, out
    return out["results"]


def one(driver: Driver, name: str, token: str) -> Dict[str, Any]:
    return verify(driver, name, token)[0]


def test_valid_token_gives_the_identity_of_its_subject(oauth, driver) -> None:
    v = verifier(driver)
    got = one(driver, v, oauth.issue())
    assert got.get("identity") == {
        "kind": "token", "subject": oauth.alice["sub"], "username": oauth.alice["username"],
        "groups": oauth.alice["identity_set"], "scopes": [SCOPE]}, got
    assert got["owner"] == f"token:{oauth.alice['sub']}"


def test_one_introspection_per_100_checks_of_a_token(oauth, driver) -> None:
    v = verifier(driver)
    for parallel in (False, True):
        token = oauth.issue()
        before = oauth.stats()["introspect"]
        results = verify(driver, v, token, n=100, parallel=parallel)
        assert all("identity" in r for r in results), results[:3]
        assert oauth.stats()["introspect"] - before == 1, f"parallel={parallel}"
    # The verifier's own count agrees; the 99 sequential repeats were cache hits
    # (the 99 parallel ones waited for the one request in flight instead).
    assert driver.ask(op="counts", name=v) == {"introspections": 2, "cache_hits": 99}


REFUSALS = {
    "wrong scope": (lambda o: o.issue(scope="other"), "scope"),
    "wrong audience": (lambda o: o.issue(audience="other-service"), "audience"),
    "revoked": (lambda o: _revoked(o), "inactive"),
    "garbage": (lambda o: "Zm9vYmFyLWdhcmJhZ2UtdG9rZW4", "inactive"),
    "malformed": (lambda o: "not a token", "malformed"),
}


def _revoked(o: OAuth) -> str:
    token = o.issue()
    o.revoke(token)
    return token


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_tokens_name_the_reason(oauth, driver, case: str) -> None:
    make, reason = REFUSALS[case]
    v = verifier(driver)
    token = make(oauth)
    before = oauth.stats()["introspect"]
    got = one(driver, v, token)
    assert (got.get("error"), got.get("reason")) == ("AccessDenied", reason), got
    assert token not in got["message"]
    asked = oauth.stats()["introspect"] - before
    # A malformed token is refused without asking the server.
    assert asked == (0 if reason == "malformed" else 1)


def test_expired_token_is_refused_once_its_exp_passes_even_when_cached(oauth, driver) -> None:
    v = verifier(driver)
    token = oauth.issue(expires_in=2)
    assert "identity" in one(driver, v, token)
    time.sleep(3)  # past exp: the cache entry ended with it
    got = one(driver, v, token)
    assert (got.get("error"), got.get("reason")) == ("AccessDenied", "inactive"), got


def test_revoked_token_is_refused_when_its_cache_entry_ends(oauth, driver) -> None:
    v = verifier(driver, token_cache_max_seconds=2)
    token = oauth.issue()
    assert "identity" in one(driver, v, token)
    oauth.revoke(token)
    time.sleep(2.5)
    got = one(driver, v, token)
    assert (got.get("error"), got.get("reason")) == ("AccessDenied", "inactive"), got


def test_negative_answers_are_cached_only_briefly(oauth, driver) -> None:
    v = verifier(driver, token_negative_cache_seconds=2)
    token = "bm90LWEtdG9rZW4tb2YtdGhpcy1zZXJ2ZXI"
    before = oauth.stats()["introspect"]
    results = verify(driver, v, token, n=20)
    assert {r.get("reason") for r in results} == {"inactive"}
    assert oauth.stats()["introspect"] - before == 1
    time.sleep(2.5)
    assert one(driver, v, token).get("reason") == "inactive"
    assert oauth.stats()["introspect"] - before == 2


@pytest.mark.parametrize("path", ["/bad/html", "/bad/json", "/bad/500"])
def test_a_garbage_answer_is_auth_unavailable(oauth, driver, path: str) -> None:
    v = verifier(driver, token_introspection_url=OAUTH + path)
    before = oauth.stats()["bad"]
    for _ in range(2):  # never cached
        got = one(driver, v, oauth.issue())
        assert got.get("error") == "AuthUnavailable", got
        assert "try again later" in got["message"]
    assert oauth.stats()["bad"] - before == 2


def test_an_untrusted_server_certificate_is_auth_unavailable(oauth, driver) -> None:
    v = verifier(driver, token_ca_file="")  # the system CAs do not know the test CA
    got = one(driver, v, oauth.issue())
    assert got.get("error") == "AuthUnavailable", got


def test_a_wrong_client_secret_is_auth_unavailable(oauth, driver, s1) -> None:
    put(s1, "/etc/scistream/token-wrong-secret", "not-the-secret\n")
    try:
        v = verifier(driver, token_client_secret_file="/etc/scistream/token-wrong-secret")
        got = one(driver, v, oauth.issue())
        assert got.get("error") == "AuthUnavailable", got
    finally:
        s1.run(["rm", "-f", "/etc/scistream/token-wrong-secret"])


def test_server_down_fails_closed_and_cached_tokens_keep_working(oauth, driver, s1) -> None:
    v = verifier(driver)
    cached, fresh = oauth.issue(), oauth.issue()
    assert "identity" in one(driver, v, cached)
    logged = len(journal_entries(s1, MSG_AUTH_UNAVAILABLE))
    oauth.stop()
    try:
        got = one(driver, v, fresh)
        assert got.get("error") == "AuthUnavailable", got
        assert "identity" in one(driver, v, cached)
        down = verifier(driver, token_introspection_url=f"https://192.168.150.2:{OAUTH_PORT + 1}"
                                                        "/introspect")
        assert one(driver, down, fresh).get("error") == "AuthUnavailable"
    finally:
        oauth.start()
    # The server forgot its tokens when it stopped: a new one works again.
    assert "identity" in one(driver, v, oauth.issue())
    new = journal_entries(s1, MSG_AUTH_UNAVAILABLE)[logged:]
    assert len(new) == 2, new  # the stopped server, and the port where none listens
    assert all("could not be checked" in e["MESSAGE"] and fresh not in json.dumps(e)
               for e in new)


def test_the_client_secret_file_must_be_root_only(oauth, driver, s1) -> None:
    path = "/etc/scistream/token-open-secret"
    put(s1, path, oauth.daemon_secret + "\n", "0644")
    conf = "/etc/scistream/token-check.toml"
    toml_text = "".join(f"{k} = {json.dumps(val)}\n" for k, val in
                        config(token_client_secret_file=path).items())
    put(s1, conf, toml_text, "0644")
    try:
        out = driver.ask(op="new", name="open", config=config(token_client_secret_file=path))
        assert out.get("error") == "ConfigError" and "chmod 0600" in out["message"], out
        check = s1.run(["env", "PYTHONPATH=/run/testbed/src", "/usr/bin/python3", "-m",
                        "scistreamd.daemon", "--config", conf, "--check-config"], check=False)
        assert check.returncode == 78, check
        assert path in check.stderr and "chmod 0600" in check.stderr
        assert oauth.daemon_secret not in check.stderr + check.stdout
        s1.run(["chmod", "0600", path])
        check = s1.run(["env", "PYTHONPATH=/run/testbed/src", "/usr/bin/python3", "-m",
                        "scistreamd.daemon", "--config", conf, "--check-config"], check=False)
        assert check.returncode == 0, check
    finally:
        s1.run(["rm", "-f", path, conf])


def test_denials_are_journaled_with_subject_and_reason_never_the_token(oauth, driver,
                                                                       bed) -> None:
    s1 = bed["server1"]
    v = verifier(driver)
    wrong_scope = oauth.issue(scope="other")
    garbage = "Z2FyYmFnZS10b2tlbi1mb3ItdGhlLWpvdXJuYWw"
    good = oauth.issue()
    assert one(driver, v, wrong_scope).get("reason") == "scope"
    assert one(driver, v, garbage).get("reason") == "inactive"
    assert "identity" in one(driver, v, good)
    # Each line names a digest prefix of its token (never the token): find ours.
    digests = {hashlib.sha256(t.encode()).hexdigest()[:12]: t
               for t in (wrong_scope, garbage, good)}
    entries = [e for e in journal_entries(s1, MSG_TOKEN_DENIED)
               if e.get("SCISTREAM_TOKEN_SHA256") in digests]
    by_reason = {e["SCISTREAM_DENIAL_REASON"]: e for e in entries}
    assert len(entries) == 2 and set(by_reason) == {"scope", "inactive"}, entries
    assert digests[by_reason["scope"]["SCISTREAM_TOKEN_SHA256"]] == wrong_scope
    assert by_reason["scope"]["SCISTREAM_IDENTITY"] == f"token:{oauth.alice['sub']}"
    assert oauth.alice["sub"] in by_reason["scope"]["MESSAGE"]
    assert "SCISTREAM_IDENTITY" not in by_reason["inactive"]
    for host in bed.hosts.values():
        everything = host.run(["journalctl", "--no-pager", "-o", "json"]).stdout
        for secret in (wrong_scope, garbage, good, oauth.daemon_secret,
                       oauth.alice["client_secret"]):
            assert secret not in everything, f"a secret is in the journal of {host.name}"


# --------------------------------------------------------------------------
# The daemon: server1's scistreamd checks the bearer tokens of its user API.

USER_API = "https://192.168.150.1:5000/v1/tunnels"
PEER_CA = "/etc/scistream/peer-ca.crt"  # the test bed's CA: both daemons' certificates
DAEMON_DROPIN = "/etc/scistream/conf.d/60-test-tokens.toml"
APP_PORT = 5300


@pytest.fixture(scope="module")
def remote(bed):
    """The remote user's side: a driver on server2 that calls server1's user API."""
    d = Driver(bed["server2"])
    yield d
    d.close()


@pytest.fixture(scope="module")
def daemon(bed, oauth):
    """server1's scistreamd with token introspection and a rule for alice's robot."""
    s1 = bed["server1"]
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in config().items())
    rules = "".join(
        f'\n[[user_rules]]\nname = "{name}"\nidentities = ["{ident}"]\n'
        f'inbound_targets = ["192.168.150.1 {APP_PORT}"]\nmax_endpoints = 4\n'
        for name, ident in (("alice", f"token:{oauth.alice['sub']}"),
                            ("bob", f"username:{oauth.users['bob']['username']}"),
                            ("group", f"group:{oauth.group}")))
    put(s1, DAEMON_DROPIN, "# written by test_tokens.py; removed when its tests end\n" + keys +
        rules, "0644")
    restart_daemon(s1)
    try:
        yield s1
    finally:
        s1.ctl("release", "--all")
        s1.run(["rm", "-f", DAEMON_DROPIN])
        restart_daemon(s1)


def user_call(remote: Driver, method: str, path: str = "", token: Optional[str] = None,
              body: Optional[dict] = None) -> Dict[str, Any]:
    out = remote.ask(op="user", method=method, url=USER_API + path, ca=PEER_CA, token=token,
                     body=body)
    assert "status" in out, out
    return out


def create_inbound(remote: Driver, token: Optional[str]) -> Dict[str, Any]:
    return user_call(remote, "POST", "/inbound", token, {
        "remote_ip": "192.168.150.1", "receiver_ports": [APP_PORT], "num_conn": 1})


def test_daemon_without_introspection_accepts_no_tokens(oauth, remote, bed, clean) -> None:
    """Runs before the tests that configure introspection (module fixture `daemon`)."""
    token = oauth.issue()
    out = create_inbound(remote, token)
    assert out["status"] in (401, 403) and out["body"].get("error") == "AccessDenied", out
    assert "no bearer tokens" in out["body"]["message"] or \
        "no user tokens" in out["body"]["message"], out


def test_daemon_valid_token_creates_a_tunnel_that_carries_data(daemon, oauth, remote, bed,
                                                               clean, apps) -> None:
    from tests.integration.conftest import HOSTTOOL, endpoint_properties, residue
    from tests.integration.test_tunnel import outbound_ok, request

    s1, s2 = bed["server1"], bed["server2"]
    apps.start(s1, "token-echo", "python3", HOSTTOOL, "echo", str(APP_PORT), "--tag", "tok:")
    token = oauth.issue()
    out = create_inbound(remote, token)
    assert out["status"] == 201, out
    uid, listeners = out["body"]["uid"], out["body"]["listeners"]
    assert endpoint_properties(s1, uid, "inbound")["Owner"] == f"token:{oauth.alice['sub']}"
    local = outbound_ok(s2, uid, listeners, "--receiver_ports", "5100")
    assert request(s2, local[0], "hello") == "tok:hello"
    mine = user_call(remote, "GET", "", token)
    assert mine["status"] == 200 and [t["uid"] for t in mine["body"]["tunnels"]] == [uid], mine

    # The authorization server goes down: uncached tokens are refused with
    # AuthUnavailable (503) and nothing is created; the tunnel keeps flowing,
    # and the token checked before the outage still lists its tunnels.
    fresh = oauth.issue()
    before = residue(s1)
    oauth.stop()
    try:
        down = create_inbound(remote, fresh)
        assert (down["status"], down["body"].get("error")) == (503, "AuthUnavailable"), down
        assert residue(s1) == before
        assert request(s2, local[0], "still") == "tok:still"
        assert user_call(remote, "GET", "", token)["status"] == 200
    finally:
        oauth.start()
    assert request(s2, local[0], "after") == "tok:after"
    released = user_call(remote, "DELETE", f"/{uid}", token)
    assert released["status"] == 200, released
    s2.ctl("release", uid)


DAEMON_REFUSALS = {
    "expired": lambda o: _expired(o),
    "revoked": lambda o: _revoked(o),
    "wrong scope": lambda o: o.issue(scope="other"),
    "wrong audience": lambda o: o.issue(audience="other-service"),
    "garbage": lambda o: "Z2FyYmFnZS10b2tlbi1mb3ItdGhlLWRhZW1vbg",
    "missing header": lambda o: None,
}


def _expired(o: OAuth) -> str:
    token = o.issue(expires_in=1)
    time.sleep(2)
    return token


@pytest.mark.parametrize("case", sorted(DAEMON_REFUSALS))
def test_daemon_refuses_bad_tokens_by_name_and_creates_nothing(daemon, oauth, remote, bed,
                                                               clean, case: str) -> None:
    from tests.integration.conftest import residue

    s1 = bed["server1"]
    token = DAEMON_REFUSALS[case](oauth)
    before = residue(s1)
    out = create_inbound(remote, token)
    assert out["status"] in (401, 403), out
    assert out["body"].get("error") == "AccessDenied", out
    if token:
        assert token not in json.dumps(out)
    if case == "wrong scope":
        assert "scope" in out["body"]["message"]
    if case == "wrong audience":
        assert "audience" in out["body"]["message"]
    assert residue(s1) == before == []
    listing = user_call(remote, "GET", "", token)
    assert listing["status"] in (401, 403) and listing["body"].get("error") == "AccessDenied"


def test_daemon_keeps_token_and_client_secret_out_of_journal_units_bus_and_argv(
        daemon, oauth, remote, bed, clean) -> None:
    from tests.integration.conftest import HOSTTOOL, dbus

    s1 = bed["server1"]
    good, bad = oauth.issue(), oauth.issue(scope="other")
    create_inbound(remote, bad)
    out = create_inbound(remote, good)
    assert out["status"] == 201, out
    secrets_ = {"a good token": good, "a refused token": bad,
                "the client secret": oauth.daemon_secret}
    places = {
        "the journal": s1.run(["journalctl", "--no-pager", "-o", "json"]).stdout,
        "unit properties": s1.run(["systemctl", "show", "--all", "scistreamd.service",
                                   "scistream-*.service", "scistream-*.socket"]).stdout,
        "D-Bus objects": json.dumps(dbus(s1, "GetManagedObjects", "", [],
                                         iface="org.freedesktop.DBus.ObjectManager")),
        "D-Bus manager properties": json.dumps(dbus(
            s1, "GetAll", "s", ["org.scistream.Tunnel1.Manager"],
            iface="org.freedesktop.DBus.Properties")),
        "process command lines": s1.sh("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout,
        "the daemon's environment": s1.sh(
            "tr '\\0' '\\n' < /proc/$(systemctl show -P MainPID scistreamd)/environ").stdout,
        "state files": s1.sh("cat /var/lib/scistream/endpoints/* 2>/dev/null; true").stdout,
    }
    assert HOSTTOOL  # the D-Bus calls above ran inside the host
    for where, text in places.items():
        assert text, f"nothing read from {where}"
        for what, value in secrets_.items():
            assert value not in text, f"{what} is in {where}"
    user_call(remote, "DELETE", f"/{out['body']['uid']}", good)


def test_daemon_asks_the_server_once_for_100_requests_of_one_token(daemon, oauth, remote,
                                                                    clean) -> None:
    token = oauth.issue()
    before = oauth.stats()["introspect"]
    statuses = {user_call(remote, "GET", "", token)["status"] for _ in range(100)}
    assert statuses == {200}
    assert oauth.stats()["introspect"] - before == 1


def test_daemon_refuses_to_start_with_a_readable_client_secret_and_tunnels_keep_flowing(
        daemon, oauth, remote, bed, clean, apps) -> None:
    from tests.integration.conftest import HOSTTOOL, daemon_status
    from tests.integration.test_tunnel import outbound_ok, request

    s1, s2 = bed["server1"], bed["server2"]
    apps.start(s1, "secret-echo", "python3", HOSTTOOL, "echo", str(APP_PORT), "--tag", "sec:")
    token = oauth.issue()
    out = create_inbound(remote, token)
    assert out["status"] == 201, out
    uid = out["body"]["uid"]
    local = outbound_ok(s2, uid, out["body"]["listeners"], "--receiver_ports", "5100")
    s1.run(["chmod", "0644", "/etc/scistream/token-client-secret"])
    try:
        r = s1.run(["systemctl", "restart", "scistreamd.service"], check=False, timeout=120)
        assert r.returncode != 0
        status = daemon_status(s1)
        code = s1.run(["systemctl", "show", "-P", "ExecMainStatus", "scistreamd"]).stdout
        # EX_CONFIG, which the unit does not restart on (RestartPreventExitStatus=78).
        assert (status["ActiveState"], code.strip()) == ("failed", "78"), (status, code)
        log = s1.run(["journalctl", "--no-pager", "-o", "cat", "-u", "scistreamd",
                      "-n", "20"]).stdout
        assert "token_client_secret_file" in log and "chmod 0600" in log, log
        assert oauth.daemon_secret not in log
        # The relays are units of their own: the tunnel carries data without its daemon.
        assert request(s2, local[0], "orphan") == "sec:orphan"
    finally:
        s1.run(["chmod", "0600", "/etc/scistream/token-client-secret"])
        s1.run(["systemctl", "reset-failed", "scistreamd.service"], check=False)
        restart_daemon(s1)
    assert request(s2, local[0], "back") == "sec:back"
    assert user_call(remote, "DELETE", f"/{uid}", oauth.issue())["status"] == 200
    s2.ctl("release", uid)


def test_daemon_token_identities_own_their_tunnels_and_identity_set_groups_match_rules(
        daemon, oauth, remote, bed, clean) -> None:
    """alice (rule by sub), bob (rule by username) and carol (rule by a group of her
    Globus-like identity_set): each sees, inspects and releases only its own."""
    from tests.integration.conftest import endpoint_properties

    s1 = bed["server1"]
    tokens = {who: oauth.issue(who=who) for who in ("alice", "bob", "carol")}
    uids = {}
    for who, token in tokens.items():
        out = create_inbound(remote, token)
        assert out["status"] == 201, (who, out)
        uids[who] = out["body"]["uid"]
        owner = endpoint_properties(s1, uids[who], "inbound")["Owner"]
        assert owner == f"token:{oauth.users[who]['sub']}"
    for who, token in tokens.items():
        listed = user_call(remote, "GET", "", token)
        assert [t["uid"] for t in listed["body"]["tunnels"]] == [uids[who]], (who, listed)
        for other, uid in uids.items():
            if other == who:
                continue
            for method in ("GET", "DELETE"):
                out = user_call(remote, method, f"/{uid}", token)
                assert (out["status"], out["body"].get("error")) == (404, "NotFound"), out
    for who, token in tokens.items():
        assert user_call(remote, "DELETE", f"/{uids[who]}", token)["status"] == 200
