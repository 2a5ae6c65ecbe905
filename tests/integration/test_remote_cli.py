"""scistreamctl remote mode and the one-command tunnel, against the real user API.

Both gateways get ``user_client_ca`` (a CA made here, not the test bed's peer
CA) and ``user_rules`` from a conf.d drop-in; the identities are client
certificates from that CA (``--client-cert``/``--client-key``):

- robot-a: may create inbound endpoints to 192.168.150.0/24 ports 5300-5310 and
  outbound endpoints;
- robot-c: inbound only (no outbound right: the second half of a tunnel fails);
- robot-d: named by no rule (may do nothing).

Commands run inside the hosts as users run them: ``scistreamctl`` as root, or as
sstest-user (no local permission at all: whatever works for it went through the
user API, not D-Bus). The daemons are verified with the test bed CA
(``--server_cert /etc/scistream/peer-ca.crt``).
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from scistreamd import certs
from tests.integration.conftest import (
    HOSTTOOL,
    endpoint_properties,
    journal_cursor,
    journal_since,
    parse_request_output,
    residue,
    restart_daemon,
    run_as,
    tool,
)

DROPIN = "/etc/scistream/conf.d/71-test-remotecli.toml"
USER_CA = "/etc/scistream/test-remotecli-user-ca.crt"
DIR = "/run/test-remotecli"
PEER_CA = "/etc/scistream/peer-ca.crt"
S1, S2 = "192.168.150.1", "192.168.150.2"
A, C, D = "robot-a.example.org", "robot-c.example.org", "robot-d.example.org"
USER = "sstest-user"
ECHO_PORT = 5302
TOKEN = "rcTok-9f8e7d6c5b4a39281706f5e4d3c2b1a0"

RULES = f"""# written by test_remote_cli.py; removed when its tests end
user_client_ca = "{USER_CA}"

[[user_rules]]
name = "robot-a-rule"
identities = ["cert:{A}"]
inbound_targets = ["192.168.150.0/24 5300-5310"]
outbound = true
max_endpoints = 8

[[user_rules]]
name = "robot-c-inbound-only"
identities = ["cert:{C}"]
inbound_targets = ["192.168.150.0/24 5300-5310"]
outbound = false
max_endpoints = 8
"""


@pytest.fixture(scope="module")
def users(bed):
    """Both gateways with user_client_ca and user_rules; identities on both hosts."""
    s1, s2 = bed["server1"], bed["server2"]
    user_ca = certs.make_ca("remotecli user CA")
    other_ca = certs.make_ca("an unrelated CA")
    for host in (s1, s2):
        host.write_file(USER_CA, user_ca.cert_pem())
        host.write_file(DROPIN, RULES.encode())
        host.ctl("release", "--all")
        restart_daemon(host)
        host.run(["mkdir", "-p", DIR])
        host.run(["chmod", "0755", DIR])
        for name in (A, C, D):
            pair = certs.make_host_cert(name, [], [name], issuer=user_ca)
            host.write_file(f"{DIR}/{name}.crt", pair.cert_pem(), owner=USER)
            host.write_file(f"{DIR}/{name}.key", pair.key_pem(), "0600", owner=USER)
        host.write_file(f"{DIR}/other-ca.crt", other_ca.cert_pem())
    try:
        yield s1, s2
    finally:
        for host in (s1, s2):
            host.run(["systemctl", "start", "scistreamd"], check=False)
            host.ctl("release", "--all")
            host.run(["rm", "-rf", DROPIN, USER_CA, DIR])
            restart_daemon(host)


@pytest.fixture
def clean_users(users):
    s1, s2 = users
    for host in (s1, s2):
        host.ctl("release", "--all")
    yield s1, s2
    for host in (s1, s2):
        host.run(["systemctl", "start", "scistreamd"], check=False)
        host.ctl("release", "--all")


def ident(name: str = A) -> list:
    return ["--client-cert", f"{DIR}/{name}.crt", "--client-key", f"{DIR}/{name}.key",
            "--server_cert", PEER_CA]


def ctl(host, *args: str, user: str = "", env: str = ""):
    """scistreamctl inside ``host`` (as ``user``; ``env`` e.g. 'SCISTREAM_TOKEN=x')."""
    cmd = ["env", *shlex.split(env)] if env else ["env"]
    if user:  # setpriv keeps root's HOME: the user's own (none here)
        return run_as(host, user, [*cmd, "HOME=/nonexistent", "scistreamctl", *args])
    return host.run([*cmd, "scistreamctl", *args], check=False)


def echo_through(apps, s1, s2, listener: str, tag: str) -> None:
    """A line from server2 through ``listener`` comes back from the echo server on server1."""
    name = f"remotecli-echo-{tag}"
    apps.start(s1, name, "python3", HOSTTOOL, "echo", str(ECHO_PORT), "--tag", f"{tag}:",
               "--host", S1)
    host, port = listener.rsplit(":", 1)
    got = tool(s2, "request", host, port, "hello", check=False)
    assert got.stdout.strip() == f"{tag}:hello", (got.stdout, got.stderr)


GUIDE_IN = ("inbound-request --remote_ip 192.168.150.1 --s2cs {s2cs} --receiver_ports "
            f"{ECHO_PORT} --num_conn 1")
GUIDE_OUT = ("outbound-request --remote_ip 192.168.150.1 --s2cs {s2cs} --receiver_ports 5100 "
             "--num_conn 1 {uid} {listener}")


# ---------------------------------------------------------------------------
# The guide's commands


def test_guide_commands_with_s2cs_of_the_other_host_go_to_its_user_api(clean_users, apps):
    """As sstest-user (no local permission): inbound on server1 typed on server2, outbound
    on server2 typed on server1, each through the other daemon's user API; data flows;
    list, status and release work remotely too."""
    s1, s2 = clean_users
    r = ctl(s2, *shlex.split(GUIDE_IN.format(s2cs=f"{S1}:5000")), *ident(), user=USER)
    assert r.returncode == 0, r.stderr
    uid, s2cs, role, listeners = parse_request_output(r.stdout)  # token column INVALID_TOKEN
    assert (s2cs, role, len(listeners)) == (f"{S1}:5000", "PROD", 1)
    props = endpoint_properties(s1, uid, "inbound")
    assert props["Owner"] == f"cert:{A}" and props["Targets"] == [f"{S1}:{ECHO_PORT}"]
    assert residue(s2) == []

    r = ctl(s1, *shlex.split(GUIDE_OUT.format(s2cs=f"{S2}:5000", uid=uid,
                                              listener=listeners[0])), *ident(), user=USER)
    assert r.returncode == 0, r.stderr
    got_uid, s2cs, role, local = parse_request_output(r.stdout)
    assert (got_uid, s2cs, role, local) == (uid, f"{S2}:5000", "CONS", [f"{S2}:5100"])
    assert endpoint_properties(s2, uid, "outbound")["Owner"] == f"cert:{A}"
    echo_through(apps, s1, s2, local[0], "guide")

    # list / status / release through the user API (from the host that is not it)
    r = ctl(s2, "list", "--s2cs", f"{S1}:5000", "--json", *ident(), user=USER)
    assert r.returncode == 0, r.stderr
    assert [(e["uid"], e["role"]) for e in json.loads(r.stdout)] == [(uid, "inbound")]
    r = ctl(s2, "status", uid[:8], "--s2cs", f"{S1}:5000", *ident(), user=USER)
    assert r.returncode == 0, r.stderr
    assert "Uid:" in r.stdout and uid in r.stdout and f"cert:{A}" in r.stdout
    # another identity sees nothing of it
    r = ctl(s2, "status", uid, "--s2cs", f"{S1}:5000", *ident(C), user=USER)
    assert r.returncode == 3, r.stdout + r.stderr
    for host, other in ((s2, S1), (s1, S2)):
        r = ctl(host, "release", uid, "--s2cs", f"{other}:5000", *ident(), user=USER)
        assert (r.returncode, r.stdout) == (0, f"Released {uid} at {other}:5000.\n"), r.stderr
    assert residue(s1) == [] and residue(s2) == []


def test_guide_commands_unchanged_locally(clean_users, apps):
    """--s2cs naming this host's own daemon (or none) stays D-Bus: the endpoint's owner is
    the local caller, and a user without local permission gets the local refusal."""
    s1, s2 = clean_users
    r = ctl(s1, *shlex.split(GUIDE_IN.format(s2cs=f"{S1}:5000")),
            "--server_cert=/etc/scistream/server.crt")
    assert r.returncode == 0, r.stderr
    uid, s2cs, _role, listeners = parse_request_output(r.stdout)
    assert s2cs == f"{S1}:5000"
    assert endpoint_properties(s1, uid, "inbound")["Owner"] == "local:uid=0"
    r = ctl(s2, *shlex.split(GUIDE_OUT.format(s2cs=f"{S2}:5000", uid=uid,
                                              listener=listeners[0])),
            f"--server_cert={PEER_CA}")
    assert r.returncode == 0, r.stderr
    _uid, _s2cs, _role, local = parse_request_output(r.stdout)
    assert endpoint_properties(s2, uid, "outbound")["Owner"] == "local:uid=0"
    echo_through(apps, s1, s2, local[0], "local")
    # sstest-user with a user certificate, naming this host's daemon: still D-Bus,
    # refused by the local policy, although the certificate would be accepted remotely
    r = ctl(s1, "list", "--s2cs", f"{S1}:5000", *ident(), user=USER)
    assert r.returncode == 9 and "group 'scistream'" in r.stderr, r.stderr
    # ... unless the user API is asked for explicitly
    r = ctl(s1, "list", "--s2cs", f"{S1}:5000", "--remote", *ident(), user=USER)
    assert (r.returncode, r.stdout) == (0, "No endpoints.\n"), r.stderr
    for host in (s1, s2):
        assert host.ctl("release", uid).returncode == 0
    assert residue(s1) == [] and residue(s2) == []


# ---------------------------------------------------------------------------
# Refusals by name, as over D-Bus


def test_remote_refusals_have_the_dbus_exit_codes_and_change_nothing(clean_users):
    s1, s2 = clean_users
    base = shlex.split(GUIDE_IN.format(s2cs=f"{S1}:5000"))
    cases = [
        (ident(D), base, 9, "AccessDenied"),                      # no rule names robot-d
        (ident(A), [*base[:-4], "--receiver_ports", "22"], 9, "AccessDenied"),  # target
        (ident(A), [*base, "--num_conn", "0"], 2, "InvalidArgument"),
        (["--server_cert", PEER_CA], base, 9, "AccessDenied"),  # no identity at all
        (ident(A)[:4], base, 1, "UntrustedServer"),  # no CA for the daemon: system store
    ]
    for identity, argv, code, name in cases:
        r = ctl(s2, "--json", *argv, *identity, user=USER)
        assert r.returncode == code, (argv, identity, r.stdout, r.stderr)
        assert json.loads(r.stdout)["error"] == name, r.stdout
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = ctl(s2, "release", "0b0e4a7c-7d0c-4f43-9d5e-0d6f3b9a1c22", "--s2cs", f"{S1}:5000",
            *ident(), user=USER)
    assert r.returncode == 3, r.stderr
    assert residue(s1) == [] and residue(s2) == []


def test_token_is_sent_and_never_shown(clean_users):
    """A token (from $SCISTREAM_TOKEN or a 0600 file) goes in the Authorization header and
    appears in no output or journal line; this daemon has no token verifier
    configured, so it refuses the token by name (AccessDenied). A token file others can
    read is refused before anything is sent."""
    s1, s2 = clean_users
    base = shlex.split(GUIDE_IN.format(s2cs=f"{S1}:5000")) + ["--server_cert", PEER_CA]
    r = ctl(s2, *base, user=USER, env=f"SCISTREAM_TOKEN={TOKEN}")
    assert r.returncode == 9, r.stdout + r.stderr
    assert TOKEN not in r.stdout + r.stderr
    s2.write_file(f"{DIR}/token", TOKEN.encode(), "0600", owner=USER)
    r = ctl(s2, *base, "--token-file", f"{DIR}/token", user=USER)
    assert r.returncode == 9 and TOKEN not in r.stdout + r.stderr, r.stderr
    s2.write_file(f"{DIR}/token", TOKEN.encode(), "0644", owner=USER)
    r = ctl(s2, *base, "--token-file", f"{DIR}/token", user=USER)
    assert r.returncode == 2 and f"chmod 600 {DIR}/token" in r.stderr, r.stderr
    assert TOKEN not in r.stdout + r.stderr
    s2.run(["rm", "-f", f"{DIR}/token"])
    for host in (s1, s2):
        assert TOKEN not in host.journal("--no-pager")
    assert residue(s1) == [] and residue(s2) == []


# ---------------------------------------------------------------------------
# One command for both ends


def _tunnel_args(*extra: str) -> list:
    return ["tunnel", "--server-s2cs", f"{S1}:5000", "--client-s2cs", f"{S2}:5000",
            "--remote_ip", S1, "--receiver_ports", str(ECHO_PORT), *extra]


def _tunnel_output(stdout: str):
    lines = stdout.splitlines()
    assert len(lines) == 4 and lines[0] == "uid; s2cs; access_token; role", stdout
    uid, s2cs_a, _tok, role_a = lines[1].split()
    uid_b, s2cs_b, _tok, role_b = lines[2].split()
    assert (uid_b, s2cs_a, role_a, s2cs_b, role_b) == (uid, f"{S1}:5000", "PROD",
                                                       f"{S2}:5000", "CONS"), stdout
    assert lines[3].startswith("Listeners: ["), stdout
    return uid, json.loads(lines[3][len("Listeners: "):].replace("'", '"'))


@pytest.mark.parametrize("who", ["root", USER])
def test_one_command_tunnel_from_server2(clean_users, apps, who):
    """From server2, naming both daemons: root reaches its own daemon over D-Bus and
    server1 through the user API; sstest-user (with --remote) both through the user API.
    Data flows; 'release UID' naming both releases both."""
    s1, s2 = clean_users
    user = "" if who == "root" else USER
    more = [] if who == "root" else ["--remote"]
    r = ctl(s2, *_tunnel_args("--local-ports", "5150"), *more, *ident(), user=user)
    assert r.returncode == 0, r.stderr
    uid, local = _tunnel_output(r.stdout)
    assert local == [f"{S2}:5150"]
    inbound = endpoint_properties(s1, uid, "inbound")
    assert inbound["Owner"] == f"cert:{A}"
    assert inbound["AllowedPeer"] == S2  # only the client side's gateway may claim the key
    assert inbound["ClaimedBy"]
    owner_b = "local:uid=0" if who == "root" else f"cert:{A}"
    assert endpoint_properties(s2, uid, "outbound")["Owner"] == owner_b
    echo_through(apps, s1, s2, local[0], f"tunnel-{who.replace('-', '')}")
    r = ctl(s2, "release", uid, "--server-s2cs", f"{S1}:5000", "--client-s2cs", f"{S2}:5000",
            *more, *ident(), user=user)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"Released {uid} at {S2}:5000 and {S1}:5000.\n"
    assert residue(s1) == [] and residue(s2) == []


def test_one_command_tunnel_from_the_server_side(clean_users, apps):
    """From server1 as root: its own daemon over D-Bus (inbound), server2's through the
    user API (outbound, robot-a), which claims from server1; data flows; both released."""
    s1, s2 = clean_users
    r = ctl(s1, *_tunnel_args(), *ident())
    assert r.returncode == 0, r.stderr
    uid, local = _tunnel_output(r.stdout)
    assert endpoint_properties(s1, uid, "inbound")["Owner"] == "local:uid=0"
    assert endpoint_properties(s2, uid, "outbound")["Owner"] == f"cert:{A}"
    echo_through(apps, s1, s2, local[0], "fromserver1")
    r = ctl(s1, "release", uid, "--server-s2cs", f"{S1}:5000", "--client-s2cs", f"{S2}:5000",
            *ident())
    assert r.returncode == 0, r.stderr
    assert residue(s1) == [] and residue(s2) == []


def test_one_command_tunnel_json(clean_users):
    s1, s2 = clean_users
    r = ctl(s2, "--json", *_tunnel_args("--num_conn", "2"), "--remote", *ident(), user=USER)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["server"]["s2cs"] == f"{S1}:5000" and doc["client"]["s2cs"] == f"{S2}:5000"
    assert len(doc["listeners"]) == 2 and doc["listeners"] == doc["client"]["listeners"]
    assert doc["server"]["endpoint"]["uid"] == doc["uid"]
    assert doc["client"]["endpoint"]["role"] == "outbound"
    # release --all with --s2cs: every endpoint of this identity there, and only those
    r = s1.ctl("inbound-request", "--remote_ip", S1, "--receiver_ports", str(ECHO_PORT))
    assert r.returncode == 0, r.stderr
    theirs, _s2cs, _role, _listeners = parse_request_output(r.stdout)
    for ip in (S1, S2):
        r = ctl(s2, "release", "--all", "--s2cs", f"{ip}:5000", "--remote", *ident(),
                user=USER)
        assert (r.returncode, r.stdout) == (0, f"Released 1 endpoint at {ip}:5000.\n"), r.stderr
    assert endpoint_properties(s1, theirs, "inbound")["Owner"] == "local:uid=0"
    assert s1.ctl("release", theirs).returncode == 0
    assert residue(s1) == [] and residue(s2) == []


ROLLBACKS = {
    # server2's daemon cannot verify server1's certificate: the claim fails
    "wrong-trust": (["--peer-trust", f"{DIR}/other-ca.crt"], A, 7, "PeerRejected"),
    # the client side's daemon refuses the outbound half (robot-c may not)
    "outbound-not-allowed": ([], C, 9, "AccessDenied"),
    # the client side's port is taken by a relay already there
    "local-port-taken": (["--local-ports", "5160"], A, None, None),
    # the client side's daemon is down
    "client-daemon-down": ([], A, 10, "DaemonUnreachable"),
}


@pytest.mark.parametrize("case", sorted(ROLLBACKS))
@pytest.mark.parametrize("who", ["root", USER])
def test_one_command_tunnel_rolls_back_when_the_outbound_half_fails(clean_users, case, who):
    s1, s2 = clean_users
    extra, identity, code, name = ROLLBACKS[case]
    user = "" if who == "root" else USER
    more = [] if who == "root" else ["--remote"]
    if case == "outbound-not-allowed" and who == "root":
        pytest.skip("root's outbound half goes over D-Bus, where it is allowed")
    keep = None
    if case == "local-port-taken":
        r = ctl(s2, *_tunnel_args("--local-ports", "5160"), *more, *ident(), user=user)
        assert r.returncode == 0, r.stderr
        keep, _ = _tunnel_output(r.stdout)
    if case == "client-daemon-down":
        s2.run(["systemctl", "stop", "scistreamd"])
    cursor = journal_cursor(s1)
    try:
        r = ctl(s2, "--json", *_tunnel_args(*extra), *more, *ident(identity), user=user)
    finally:
        if case == "client-daemon-down":
            s2.run(["systemctl", "start", "scistreamd"])
    assert r.returncode != 0, r.stdout
    doc = json.loads(r.stdout)
    if code is not None:
        assert (r.returncode, doc["error"]) == (code, name), r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert f"inbound half at {S1}:5000 was released: nothing is left" in r.stderr, r.stderr
    # The inbound half was made on server1, then released by the rollback.
    # (no journalctl match here: with --after-cursor, systemd 252 skips the first match)
    log = journal_since(s1, cursor)
    made = re.findall(r"user API: .* created inbound endpoint ([0-9a-f-]{36})", log)
    assert len(made) == 1 and f"released {made[0]} (1 endpoint(s))" in log, log
    assert endpoint_properties(s1, made[0], "inbound") is None
    if keep is not None:
        # only the first tunnel is left, untouched, on both sides
        assert endpoint_properties(s1, keep, "inbound")["State"] == "active"
        r = ctl(s2, "release", keep, "--server-s2cs", f"{S1}:5000", "--client-s2cs",
                f"{S2}:5000", *more, *ident(), user=user)
        assert r.returncode == 0, r.stderr
    assert residue(s1) == [] and residue(s2) == []


# The test bed's own unit directory (where its relay hardening drop-in is too).
BROKEN_RELAY = "/run/testbed/units/scistream-inbound-.service.d/99-test-broken.conf"


@pytest.mark.parametrize("who", ["root", USER, "server1-root"])
def test_one_command_tunnel_whose_server_relay_fails_after_the_answer(clean_users, who):
    """The server side answers while its relay starts (early) and the client side
    makes its half meanwhile; a server relay that then fails to start (here: a
    drop-in on server1's inbound relays whose ExecStartPre fails) fails the command,
    by name, with nothing left on either side. From server2 (server1 through its user
    API) and from server1 as root (its own daemon over D-Bus: option early, then
    WaitStarted)."""
    s1, s2 = clean_users
    user = USER if who == USER else ""
    more = ["--remote"] if who == USER else []
    where = s1 if who == "server1-root" else s2
    s1.write_file(BROKEN_RELAY, "[Service]\nExecStartPre=/bin/false\n")
    s1.run(["systemctl", "daemon-reload"])
    cursor = journal_cursor(s1)
    try:
        r = ctl(where, "--json", *_tunnel_args(), *more, *ident(), user=user)
    finally:
        s1.run(["rm", "-rf", BROKEN_RELAY.rsplit("/", 1)[0]])
        s1.run(["systemctl", "daemon-reload"])
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    log = journal_since(s1, cursor)
    (uid,) = set(re.findall(r"inbound request for ([0-9a-f-]{36}) failed, rolled back", log))
    if who != "server1-root":
        assert f"created inbound endpoint {uid} (its relay starting)" in log, log
    doc = json.loads(r.stdout)
    if doc["error"] == "RelayFailed":  # the client side's half was made first
        assert f"the inbound half of tunnel {uid} at {S1}:5000 did not start" in r.stderr
        assert f"its outbound half at {S2}:5000 was released: nothing is left" in r.stderr
        assert "(job failed)" in r.stderr and "in use" not in r.stderr, r.stderr
    else:  # the start had failed before the client side claimed the key
        assert "failed to start, and the inbound side rolled it back" in r.stderr, r.stderr
    assert endpoint_properties(s1, uid, "inbound") is None
    assert endpoint_properties(s2, uid, "outbound") is None
    assert residue(s1) == [] and residue(s2) == []
    # The next tunnel works as before.
    r = ctl(where, *_tunnel_args(), *more, *ident(), user=user)
    assert r.returncode == 0, r.stderr
    uid, _ = _tunnel_output(r.stdout)
    assert endpoint_properties(s1, uid, "inbound")["State"] == "active"


# ---------------------------------------------------------------------------
# With a token from the test bed's OAuth 2.0 server (tests/oauthbed.py)


@pytest.fixture(scope="module")
def tokened(users, bed):
    """server1's daemon also checks bearer tokens (introspection) and has a rule for the
    token robot 'alice' (inbound to 192.168.150.1 port 5302 only); tokens are issued by
    the OAuth server on server2 for alice's client."""
    from tests.oauthbed import Driver, OAuth, config

    s1, _s2 = users
    driver = Driver(s1)
    oauth = OAuth(bed, driver)
    oauth.start()
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in config().items())
    rules = RULES + (f'\n[[user_rules]]\nname = "alice"\nidentities = ["token:'
                     f'{oauth.alice["sub"]}"]\ninbound_targets = ["{S1} {ECHO_PORT}"]\n'
                     "max_endpoints = 4\n")
    # one drop-in: user_rules in a later file would replace these
    s1.write_file(DROPIN, (keys + rules).encode())
    restart_daemon(s1)
    try:
        yield oauth
    finally:
        s1.write_file(DROPIN, RULES.encode())
        restart_daemon(s1)
        oauth.remove()
        driver.close()


def test_guide_command_with_a_token_file_works_remotely_and_shows_it_redacted(
        clean_users, tokened, apps):
    """sstest-user on server2 with a token issued by the OAuth server in a 0600 token file
    (never on a command line): inbound on server1 through its user API, owner token:<sub>,
    the access_token column REDACTED:<sha256 prefix>; data flows through the tunnel."""
    import hashlib

    s1, s2 = clean_users
    token = tokened.issue()
    s2.write_file(f"{DIR}/alice.token", token.encode(), "0600", owner=USER)
    r = ctl(s2, *shlex.split(GUIDE_IN.format(s2cs=f"{S1}:5000")), "--server_cert", PEER_CA,
            "--token-file", f"{DIR}/alice.token", user=USER)
    assert r.returncode == 0, r.stderr
    assert token not in r.stdout + r.stderr
    lines = r.stdout.splitlines()
    uid, s2cs, shown, role = lines[1].split()
    assert (s2cs, role) == (f"{S1}:5000", "PROD")
    assert shown == "REDACTED:" + hashlib.sha256(token.encode()).hexdigest()[:8]
    assert endpoint_properties(s1, uid, "inbound")["Owner"] == f"token:{tokened.alice['sub']}"
    listeners = json.loads(lines[2][len("Listeners: "):].replace("'", '"'))
    r = s2.ctl("outbound-request", "--server_cert", PEER_CA, uid, *listeners)
    assert r.returncode == 0, r.stderr
    _uid, _s2cs, _role, local = parse_request_output(r.stdout)
    echo_through(apps, s1, s2, local[0], "token")
    # the same token from $SCISTREAM_TOKEN's place, the per-user file ($XDG_CONFIG_HOME)
    r = ctl(s2, "list", "--s2cs", f"{S1}:5000", "--server_cert", PEER_CA, user=USER,
            env=f"XDG_CONFIG_HOME={DIR}/xdg")
    assert r.returncode == 9, r.stdout + r.stderr  # no token, no certificate: refused
    s2.write_file(f"{DIR}/xdg/scistream/token", token.encode(), "0600", owner=USER)
    r = ctl(s2, "list", "--s2cs", f"{S1}:5000", "--server_cert", PEER_CA, "--json", user=USER,
            env=f"XDG_CONFIG_HOME={DIR}/xdg")
    assert r.returncode == 0, r.stderr
    assert [e["uid"] for e in json.loads(r.stdout)] == [uid]
    r = ctl(s2, "release", uid, "--s2cs", f"{S1}:5000", "--server_cert", PEER_CA,
            "--token-file", f"{DIR}/alice.token", user=USER)
    assert r.returncode == 0, r.stderr
    assert s2.ctl("release", uid).returncode == 0
    for host in (s1, s2):
        assert token not in host.journal("--no-pager")
    assert residue(s1) == [] and residue(s2) == []


def test_token_refusals_and_oauth_server_down_through_the_cli(clean_users, tokened):
    """A token of the wrong scope: AccessDenied (9); the OAuth server down: the daemon
    fails closed with AuthUnavailable, which the CLI exits with (12); nothing created."""
    s1, s2 = clean_users
    base = [*shlex.split(GUIDE_IN.format(s2cs=f"{S1}:5000")), "--server_cert", PEER_CA,
            "--token-file", f"{DIR}/t.token", "--json"]
    s2.write_file(f"{DIR}/t.token", tokened.issue(scope="other").encode(), "0600", owner=USER)
    r = ctl(s2, *base, user=USER)
    assert (r.returncode, json.loads(r.stdout)["error"]) == (9, "AccessDenied"), r.stderr
    s2.write_file(f"{DIR}/t.token", tokened.issue().encode(), "0600", owner=USER)
    tokened.stop()
    try:
        r = ctl(s2, *base, user=USER)
    finally:
        tokened.start()
    assert (r.returncode, json.loads(r.stdout)["error"]) == (12, "AuthUnavailable"), r.stderr
    assert residue(s1) == [] and residue(s2) == []
