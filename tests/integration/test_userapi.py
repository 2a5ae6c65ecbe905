"""The user API on the peer port (/v1/tunnels) with user client certificates, on the test bed.

Both gateways get ``user_client_ca`` (a CA of their own, made here: not the
test bed's peer CA) and ``user_rules`` from a conf.d drop-in. Identities are
client certificates issued by that CA: robot-a and robot-b (named by rules),
robot-c (named by none). Requests are made from inside server2 with a small
HTTPS client (below), as a remote user's program would.
"""

from __future__ import annotations

import json
import uuid

import pytest

from scistreamd import certs
from tests.integration.conftest import (
    HOSTTOOL,
    dbus,
    endpoint_properties,
    journal_cursor,
    parse_request_output,
    residue,
    restart_daemon,
    run_as,
    tool,
    wait_listening,
    wait_until,
)

DROPIN = "/etc/scistream/conf.d/70-test-userapi.toml"
USER_CA = "/etc/scistream/test-user-ca.crt"
CLIENT_DIR = "/run/test-userapi"
MSG_USER_REFUSED = "5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a76"
A, B, C = "robot-a.example.org", "robot-b.example.org", "robot-c.example.org"
LIMIT_A = 2
SINK_PORT = 5301

RULES = f"""# written by test_userapi.py; removed when its tests end
user_client_ca = "{USER_CA}"

[[user_rules]]
name = "robot-a-rule"
identities = ["cert:{A}"]
inbound_targets = ["192.168.150.0/24 5300-5310"]
outbound = true
max_endpoints = {LIMIT_A}

[[user_rules]]
name = "robot-b-rule"
identities = ["cert:{B}"]
inbound_targets = ["192.168.150.0/24 5300-5310"]
outbound = true
outbound_peers = ["192.168.150.1"]
max_endpoints = 4
"""

#: An HTTPS client run inside a host: argv = host port method path [body-json];
#: env CERT/KEY (client certificate), TOKEN (bearer). Prints {"status", "body"}
#: or {"tls_error"}.
CLIENT = r"""
import http.client, json, os, ssl, sys
host, port, method, path = sys.argv[1:5]
body = sys.argv[5] if len(sys.argv) > 5 else None
ctx = ssl.create_default_context(cafile="/etc/scistream/peer-ca.crt")
if os.environ.get("CERT"):
    ctx.load_cert_chain(os.environ["CERT"], os.environ["KEY"])
headers = {"Content-Type": "application/json"}
if os.environ.get("TOKEN"):
    headers["Authorization"] = "Bearer " + os.environ["TOKEN"]
try:
    c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=60)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    print(json.dumps({"status": r.status, "body": json.loads(data) if data else None,
                      "www_authenticate": r.getheader("WWW-Authenticate")}))
except (ssl.SSLError, ConnectionError) as e:
    print(json.dumps({"tls_error": str(e)}))
"""


@pytest.fixture(scope="module")
def users(bed):
    """Both gateways with user_client_ca and user_rules; client certificates on server2."""
    s1, s2 = bed["server1"], bed["server2"]
    user_ca = certs.make_ca("test user CA")
    other_ca = certs.make_ca("an unrelated CA")
    for host in (s1, s2):
        host.write_file(USER_CA, user_ca.cert_pem())
        host.write_file(DROPIN, RULES.encode())
        host.ctl("release", "--all")
        restart_daemon(host)
    for name, issuer in ((A, user_ca), (B, user_ca), (C, user_ca), ("stranger", other_ca)):
        pair = certs.make_host_cert(name, [], [name] if "." in name else [], issuer=issuer)
        s2.write_file(f"{CLIENT_DIR}/{name}.crt", pair.cert_pem())
        s2.write_file(f"{CLIENT_DIR}/{name}.key", pair.key_pem(), "0600")
    try:
        yield s1, s2
    finally:
        for host in (s1, s2):
            host.ctl("release", "--all")
            host.run(["rm", "-f", DROPIN, USER_CA])
            restart_daemon(host)
        s2.run(["rm", "-rf", CLIENT_DIR])


def api(s2, server_ip: str, method: str, path: str, body=None, *, cert: str = "",
        token: str = "") -> dict:
    """One user API request from inside server2, as identity ``cert`` (a name above)."""
    env = ["env"]
    if cert == "peer":  # server2's own peer certificate (test bed CA)
        env += ["CERT=/etc/scistream/server.crt", "KEY=/etc/scistream/server.key"]
    elif cert:
        env += [f"CERT={CLIENT_DIR}/{cert}.crt", f"KEY={CLIENT_DIR}/{cert}.key"]
    if token:
        env += [f"TOKEN={token}"]
    args = [server_ip, "5000", method, path] + ([json.dumps(body)] if body is not None else [])
    out = s2.run(env + ["python3", "-c", CLIENT, *args], check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def journal_lines(host, cursor: str, text: str, *match: str) -> str:
    """The journal lines after ``cursor`` matching ``match``, once ``text`` is among them
    (journald stores a line a moment after the daemon sent it)."""
    # Matches are applied here, not by journalctl: with matches, --after-cursor also
    # skips the first matching entry after the cursor.
    found = {}
    fields = dict(m.split("=", 1) for m in match)

    def seen() -> bool:
        host.run(["journalctl", "--sync"], check=False)
        out = host.run(["journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}"],
                       check=False).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        found["lines"] = "\n".join(
            str(e.get("MESSAGE")) for e in entries
            if all(e.get(k) == v for k, v in fields.items()))
        return text in found["lines"]

    wait_until(seen, 30, f"a journal line with {text!r} ({' '.join(match)})")
    return found["lines"]


def inbound(s1, s2, cert: str, port: int = SINK_PORT, **extra) -> dict:
    body = {"remote_ip": s1.ip, "receiver_ports": [port], "num_conn": 1, **extra}
    return api(s2, s1.ip, "POST", "/v1/tunnels/inbound", body, cert=cert)


def refused(answer: dict, status: int, name: str) -> str:
    assert answer.get("status") == status, answer
    assert answer["body"]["error"] == name, answer
    assert "Traceback" not in answer["body"]["message"]
    return answer["body"]["message"]


def test_allowed_target_works_end_to_end(users, apps):
    """robot-a: inbound on server1 and outbound on server2, both over the user API;
    bytes arrive intact; Owner names robot-a on both; released over the API."""
    s1, s2 = users
    cursor = journal_cursor(s1)
    apps.start(s1, "userapi-sink", "python3", HOSTTOOL, "sink", str(SINK_PORT),
               "/run/userapi-sink.sha", "--host", s1.ip)
    wait_listening(s1, SINK_PORT)
    a = inbound(s1, s2, A)
    assert a["status"] == 201, a
    uid, listeners = a["body"]["uid"], a["body"]["listeners"]
    ep = a["body"]["endpoint"]
    assert ep["uid"] == uid and ep["role"] == "inbound" and ep["owner"] == f"cert:{A}"
    assert ep["targets"] == [f"{s1.ip}:{SINK_PORT}"] and ep["listeners"] == listeners
    assert ep["created_at"].endswith("Z") and ep["claimed_at"] is None
    o = api(s2, s2.ip, "POST", "/v1/tunnels/outbound",
            {"uid": uid, "remote_listeners": listeners, "num_conn": 1}, cert=A)
    assert o["status"] == 201, o
    local = o["body"]["listeners"]
    assert o["body"]["endpoint"]["owner"] == f"cert:{A}"
    assert endpoint_properties(s1, uid, "inbound")["Owner"] == f"cert:{A}"
    assert endpoint_properties(s2, uid, "outbound")["Owner"] == f"cert:{A}"
    # The journal's tunnel events carry the owner too (journalctl SCISTREAM_OWNER=...).
    journal_lines(s1, cursor, uid, "MESSAGE_ID=5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a71",
                  f"SCISTREAM_OWNER=cert:{A}")
    host, port = local[0].rsplit(":", 1)
    sent = tool(s2, "send", host, port, str(4 * 1024 * 1024)).stdout.strip()
    got = s1.run(["sh", "-c", "for i in $(seq 200); do test -s /run/userapi-sink.sha && "
                              "cat /run/userapi-sink.sha && exit 0; sleep 0.1; done; exit 1"])
    assert got.stdout.strip() == sent and sent.endswith(" 4194304") and len(sent) == 72
    # The owner sees it, in list and status.
    listed = api(s2, s1.ip, "GET", "/v1/tunnels", cert=A)
    assert [t["uid"] for t in listed["body"]["tunnels"]] == [uid]
    status = api(s2, s1.ip, "GET", f"/v1/tunnels/{uid}", cert=A)
    assert status["status"] == 200 and status["body"]["tunnels"][0]["claimed_by"]
    for ip in (s2.ip, s1.ip):
        rel = api(s2, ip, "DELETE", f"/v1/tunnels/{uid}", cert=A)
        assert rel == {"status": 200, "body": {"released": 1}, "www_authenticate": None}, rel
    assert residue(s1) == [] and residue(s2) == []


def test_target_outside_the_rule_is_refused_and_nothing_created(users):
    s1, s2 = users
    cursor = journal_cursor(s1)
    msg = refused(inbound(s1, s2, A, port=5400), 403, "AccessDenied")
    assert "robot-a-rule" in msg and f"{s1.ip}:5400" in msg, msg
    assert residue(s1) == []
    lines = journal_lines(s1, cursor, "robot-a-rule", f"MESSAGE_ID={MSG_USER_REFUSED}",
                          f"SCISTREAM_IDENTITY=cert:{A}")
    assert f"{s1.ip}:5400" in lines, lines
    # An identity no rule names may do nothing (the default).
    msg = refused(inbound(s1, s2, C), 403, "AccessDenied")
    assert "no rule of user_rules names" in msg and f"cert:{C}" in msg, msg
    msg = refused(api(s2, s2.ip, "POST", "/v1/tunnels/outbound",
                      {"uid": str(uuid.uuid4()), "remote_listeners": [f"{s1.ip}:5100"],
                       "num_conn": 1}, cert=C), 403, "AccessDenied")
    # robot-b may reach peers in 192.168.150.1 only: towards server2 itself it is refused
    # before anything is claimed or created.
    msg = refused(api(s2, s2.ip, "POST", "/v1/tunnels/outbound",
                      {"uid": str(uuid.uuid4()), "remote_listeners": [f"{s2.ip}:5100"],
                       "num_conn": 1}, cert=B), 403, "AccessDenied")
    assert "outbound_peers of rule 'robot-b-rule'" in msg and s2.ip in msg, msg
    assert residue(s1) == [] and residue(s2) == []


def test_requests_without_user_credentials_are_refused_by_name(users):
    s1, s2 = users
    cursor = journal_cursor(s1)
    none = inbound(s1, s2, "")
    msg = refused(none, 401, "AccessDenied")
    assert "no credentials" in msg and none["www_authenticate"].startswith("Bearer"), none
    # A peer daemon's certificate (test bed CA) is not a user's.
    refused(inbound(s1, s2, "peer"), 401, "AccessDenied")
    # No token verifier is configured: a bearer token is refused by name, and never echoed.
    tok = api(s2, s1.ip, "GET", "/v1/tunnels", token="not-a-real-token-1234")
    assert "not-a-real-token" not in refused(tok, 401, "AccessDenied")
    # A certificate of an unrelated CA does not complete the handshake.
    stranger = inbound(s1, s2, "stranger")
    assert "tls_error" in stranger, stranger
    assert residue(s1) == []
    journal_lines(s1, cursor, "no credentials", f"MESSAGE_ID={MSG_USER_REFUSED}")
    journal_lines(s1, cursor, "is not trusted", "MESSAGE_ID=5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a75")
    assert "not-a-real-token" not in s1.journal("-u", "scistreamd")


def test_unknown_request_fields_are_refused_by_name(users):
    s1, s2 = users
    msg = refused(inbound(s1, s2, A, options={"x": 1}), 400, "InvalidArgument")
    assert "options" in msg, msg
    msg = refused(api(s2, s1.ip, "POST", "/v1/tunnels/inbound",
                      {"remote_ip": s1.ip, "receiver_ports": [True], "num_conn": 1}, cert=A),
                  400, "InvalidArgument")
    refused(api(s2, s1.ip, "PUT", "/v1/tunnels/inbound", {}, cert=A), 405, "MethodNotAllowed")
    assert residue(s1) == []


def test_an_identity_sees_and_releases_only_its_own(users, clean):
    s1, s2 = users
    a = inbound(s1, s2, A)
    assert a["status"] == 201, a
    uid = a["body"]["uid"]
    assert api(s2, s1.ip, "GET", "/v1/tunnels", cert=B)["body"] == {"tunnels": []}
    nobody = str(uuid.uuid4())
    unknown = refused(api(s2, s1.ip, "GET", f"/v1/tunnels/{nobody}", cert=B), 404, "NotFound")
    others = refused(api(s2, s1.ip, "GET", f"/v1/tunnels/{uid}", cert=B), 404, "NotFound")
    # Existence does not leak: the same answer as for a uid that does not exist.
    assert others == unknown.replace(nobody, uid), (others, unknown)
    refused(api(s2, s1.ip, "DELETE", f"/v1/tunnels/{uid}", cert=B), 404, "NotFound")
    assert endpoint_properties(s1, uid, "inbound")["State"] == "active"
    # A user's certificate claims no key over the daemon-to-daemon path.
    claim = api(s2, s1.ip, "POST", f"/v1/endpoints/{uid}/claim", {}, cert=A)
    refused(claim, 403, "AccessDenied")
    assert endpoint_properties(s1, uid, "inbound")["ClaimedBy"] == ""
    assert api(s2, s1.ip, "DELETE", f"/v1/tunnels/{uid}", cert=A)["body"] == {"released": 1}
    assert residue(s1) == []


def test_early_answer_and_its_wait_are_the_owners_only(users, clean):
    """?early=1 answers while the relay starts; ?wait=1 then answers its owner once the
    start is over, and another identity as for a uid that does not exist (it is not
    even made to wait). Other query parameters are refused by name."""
    s1, s2 = users
    a = api(s2, s1.ip, "POST", "/v1/tunnels/inbound?early=1",
            {"remote_ip": s1.ip, "receiver_ports": [SINK_PORT], "num_conn": 1}, cert=A)
    assert a["status"] == 201 and a["body"]["endpoint"]["state"] == "starting", a
    uid = a["body"]["uid"]
    nobody = str(uuid.uuid4())
    unknown = refused(api(s2, s1.ip, "GET", f"/v1/tunnels/{nobody}?wait=1", cert=B), 404,
                      "NotFound")
    others = refused(api(s2, s1.ip, "GET", f"/v1/tunnels/{uid}?wait=1", cert=B), 404,
                     "NotFound")
    assert others == unknown.replace(nobody, uid), (others, unknown)
    mine = api(s2, s1.ip, "GET", f"/v1/tunnels/{uid}?wait=1", cert=A)
    assert mine["status"] == 200, mine
    assert [e["state"] for e in mine["body"]["tunnels"]] == ["active"]
    assert endpoint_properties(s1, uid, "inbound")["State"] == "active"
    msg = refused(api(s2, s1.ip, "GET", f"/v1/tunnels/{uid}?wait=yes", cert=A), 400,
                  "InvalidArgument")
    assert "wait=1 or wait=0" in msg, msg
    refused(api(s2, s1.ip, "POST", "/v1/tunnels/inbound?now=1",
                {"remote_ip": s1.ip, "receiver_ports": [SINK_PORT], "num_conn": 1}, cert=A),
            400, "InvalidArgument")
    assert api(s2, s1.ip, "DELETE", f"/v1/tunnels/{uid}", cert=A)["body"] == {"released": 1}
    assert residue(s1) == []


def test_per_identity_limit(users, clean):
    s1, s2 = users
    made = [inbound(s1, s2, A) for _ in range(LIMIT_A)]
    assert [m["status"] for m in made] == [201] * LIMIT_A, made
    msg = refused(inbound(s1, s2, A), 403, "AccessDenied")
    assert "robot-a-rule" in msg and f"at most {LIMIT_A}" in msg, msg
    assert len(s1.ctl("list").stdout.strip().splitlines()) == 1 + LIMIT_A  # + header
    # Another identity's endpoints and local ones count for their own owners only.
    assert inbound(s1, s2, B)["status"] == 201
    assert s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports",
                  str(SINK_PORT)).returncode == 0
    assert refused(inbound(s1, s2, A), 403, "AccessDenied")
    uid = made[0]["body"]["uid"]
    assert api(s2, s1.ip, "DELETE", f"/v1/tunnels/{uid}", cert=A)["status"] == 200
    assert inbound(s1, s2, A)["status"] == 201


def test_concurrent_requests_cannot_pass_the_limit(users, clean):
    """Six creations of one identity at once, limit 2: exactly two succeed."""
    s1, s2 = users
    body = json.dumps({"remote_ip": s1.ip, "receiver_ports": [SINK_PORT], "num_conn": 1})
    env = f"CERT={CLIENT_DIR}/{A}.crt KEY={CLIENT_DIR}/{A}.key"
    script = (f"cat > {CLIENT_DIR}/client.py; for i in 1 2 3 4 5 6; do env {env} python3 "
              f"{CLIENT_DIR}/client.py {s1.ip} 5000 POST /v1/tunnels/inbound '{body}' "
              f"> {CLIENT_DIR}/out.$i & done; wait; cat {CLIENT_DIR}/out.*")
    out = s2.run(["sh", "-c", script], input=CLIENT).stdout
    answers = [json.loads(line) for line in out.splitlines()]
    assert sorted(a["status"] for a in answers) == [201] * LIMIT_A + [403] * (6 - LIMIT_A), out
    assert all(a["body"]["error"] == "AccessDenied" for a in answers if a["status"] == 403)
    listed = api(s2, s1.ip, "GET", "/v1/tunnels", cert=A)["body"]["tunnels"]
    assert len(listed) == LIMIT_A


def test_dbus_created_endpoints_show_a_local_owner(users, clean):
    s1, s2 = users
    out = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", str(SINK_PORT))
    assert out.returncode == 0, out.stderr
    uid = parse_request_output(out.stdout)[0]
    assert endpoint_properties(s1, uid, "inbound")["Owner"] == "local:uid=0"
    member_uid = s1.run(["id", "-u", "sstest-member"]).stdout.strip()
    out = run_as(s1, "sstest-member", ["scistreamctl", "inbound-request", "--remote_ip", s1.ip,
                                       "--receiver_ports", str(SINK_PORT)], check=False)
    assert out.returncode == 0, out.stderr
    uid2 = parse_request_output(out.stdout)[0]
    assert endpoint_properties(s1, uid2, "inbound")["Owner"] == f"local:uid={member_uid}"
    # Root sees both over D-Bus; no remote user sees either.
    listed = dbus(s1, "ListEndpoints", "", [])["reply"][0]
    assert {e[0] for e in listed} == {uid, uid2}
    assert api(s2, s1.ip, "GET", "/v1/tunnels", cert=A)["body"] == {"tunnels": []}
    refused(api(s2, s1.ip, "DELETE", f"/v1/tunnels/{uid}", cert=A), 404, "NotFound")
    # The owner survives a daemon restart (persisted in state).
    restart_daemon(s1)
    assert endpoint_properties(s1, uid2, "inbound")["Owner"] == f"local:uid={member_uid}"
