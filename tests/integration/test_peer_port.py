"""The asyncio peer port on the real test bed (issue 12, item 1).

- A flood of plain TCP connections that never start TLS, reopened as the
  server closes them, from two sources, does not keep a third from claiming.
- Concurrent claims do not wait for each other: 30 claims against a peer that
  accepts and never answers are all at that peer at once.
- A wrong listener, a claimed key, an unknown uid and a released tunnel each
  get their own error and the one right fix; after a wrong listener nothing
  was claimed and the right listener works.
No mocks; waits are conditions with failure guards, never timing claims.
"""

from __future__ import annotations

import uuid

import pytest

from tests.integration.conftest import (
    HOSTTOOL,
    DBusBatch,
    LineTool,
    daemon_status,
    dbus,
    endpoint_properties,
    journal_since,
    parse_request_output,
    residue,
    tool,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
#: A second address of server2: a flood source other than server1.
S2_SECONDARY = "192.168.150.12"
PEER_PORT = 5000
ERR = "org.scistream.Tunnel1.Error."
OUTBOUND_SIG = "sasaqua{sv}"
#: Per-source share of the peer port is 64 connections: each flood source exceeds it.
FLOOD = 128
CONCURRENT = 30


def inbound(s1, app_port: str) -> tuple:
    r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", app_port)
    assert r.returncode == 0, r.stderr
    uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
    return uid, listeners


def outbound_passes_data(s2, uid: str, listeners: list, text: str) -> None:
    r = s2.ctl("outbound-request", uid, *listeners)
    assert r.returncode == 0, f"outbound-request failed: {r.stderr}"
    ip, _, port = parse_request_output(r.stdout)[3][0].rpartition(":")
    assert tool(s2, "request", ip, port, text, check=False).stdout.strip() == f"ok:{text}"


def one_line_failure(r, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scistreamctl: "), r.stderr
    assert "Traceback" not in r.stderr and "/usr/lib" not in r.stderr
    return lines[0]


@pytest.fixture
def echo(clean, s1, apps):
    apps.start(s1, "peerport-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "ok:")
    return "5300"


def test_wrong_listener_is_its_own_error_and_the_right_one_works(clean, s1, s2, echo):
    uid, listeners = inbound(s1, echo)
    wrong = f"{S1_IP}:5999"
    assert wrong not in listeners
    r = s2.ctl("outbound-request", uid, wrong)
    line = one_line_failure(r, 11)
    assert f"{wrong} is not a listener of tunnel {uid}" in line, line
    assert "nothing was claimed" in line and "listeners the inbound request printed" in line
    assert "already claimed" not in line and "release" not in line, line
    raw = dbus(s2, "OutboundRequest", OUTBOUND_SIG, [uid, [wrong], [], 1, {}])
    assert raw.get("error") == ERR + "WrongListener", raw
    assert "nothing was claimed" in raw["message"], raw
    assert endpoint_properties(s1, uid, "inbound")["ClaimedBy"] == ""
    assert residue(s2) == []
    outbound_passes_data(s2, uid, listeners, "right")
    assert endpoint_properties(s1, uid, "inbound")["ClaimedBy"].startswith(f"{S2_IP}:")


def test_claimed_unknown_and_released_each_name_their_fix(clean, s1, s2, echo):
    uid, listeners = inbound(s1, echo)
    outbound_passes_data(s2, uid, listeners, "first")
    # Claimed: a second claimant (server1 as outbound) is told to have it re-armed.
    claimed = one_line_failure(s1.ctl("outbound-request", uid, *listeners), 7)
    assert "already claimed" in claimed and f"scistreamctl rearm {uid}" in claimed, claimed
    # Unknown uid: check the uid.
    unknown_uid = str(uuid.uuid4())
    unknown = one_line_failure(s2.ctl("outbound-request", unknown_uid, *listeners), 3)
    assert f"no inbound endpoint {unknown_uid}" in unknown and "check the uid" in unknown
    # Released: a new inbound request is the only way.
    assert s2.ctl("release", uid).returncode == 0
    assert s1.ctl("release", uid).returncode == 0
    released = one_line_failure(s2.ctl("outbound-request", uid, *listeners), 3)
    assert f"tunnel {uid} was released" in released and "new inbound request" in released
    assert len({claimed.replace(uid, "U"), unknown.replace(unknown_uid, "U"),
                released.replace(uid, "U")}) == 3
    assert residue(s1) == [] and residue(s2) == []


def test_silent_connection_flood_does_not_starve_claims(clean, s1, s2, apps, echo):
    """(a) Plain TCP connections that never start TLS, reopened as the server closes
    them, from server1 itself and from a second address of server2: every claim of
    server2 (its primary address) still succeeds."""
    s2.run(["ip", "addr", "add", f"{S2_SECONDARY}/24", "dev", "eth0"])
    pid = daemon_status(s1)["MainPID"]
    floods = []
    try:
        floods.append(LineTool(s1, "reflood", S1_IP, str(PEER_PORT), str(FLOOD),
                               "--source", S1_IP, ready=False))
        floods.append(LineTool(s2, "reflood", S1_IP, str(PEER_PORT), str(FLOOD),
                               "--source", S2_SECONDARY, ready=False))
        for f in floods:
            assert f.read() == {"connected": FLOOD}
        for i in range(3):
            uid, listeners = inbound(s1, echo)
            outbound_passes_data(s2, uid, listeners, f"during-flood-{i}")
        # This daemon's refusals (one line per 10 s at most).
        refusals = journal_since(s1, "", "-u", "scistreamd.service", f"_PID={pid}",
                                 "--grep", "refused")
        for f in floods:
            f.send("stop")
        reopened = [f.read()["reopened"] for f in floods]
    finally:
        for f in floods:
            f.close()
        s2.run(["ip", "addr", "del", f"{S2_SECONDARY}/24", "dev", "eth0"], check=False)
    # The floods were real: beyond their share, the server closed their connections
    # and they came back.
    assert "max_connections" in refusals and "per address" in refusals, refusals[-2000:]
    assert all(n > 0 for n in reopened), reopened


def test_concurrent_claims_are_all_in_flight_at_once(clean, s1, s2):
    """(b) 30 claims against a peer that accepts and never answers: all 30 are at
    the dead peer at the same time (none waits for a thread of another), each
    ends PeerUnreachable and returns its port."""
    counter = LineTool(s1, "deadpeer", "5993")
    bus = DBusBatch(s2, timeout=300)
    try:
        calls = [bus.request("OutboundRequest", OUTBOUND_SIG,
                             [str(uuid.uuid4()), [f"{S1_IP}:5100"], [], 1,
                              {"peer": ["s", f"{S1_IP}:5993"]}])
                 for _ in range(CONCURRENT)]
        answers = bus.calls(calls)
        counts = counter.ask({"count": True})
    finally:
        bus.close()
        counter.close()
    assert [a.get("error") for a in answers] == [ERR + "PeerUnreachable"] * CONCURRENT, answers
    assert all("no answer within" in a["message"] for a in answers), answers[0]
    assert counts["total"] == CONCURRENT, counts
    assert counts["most"] == CONCURRENT, (
        f"only {counts['most']} of {CONCURRENT} claims were at the peer at once: the others "
        "waited for a thread")
    assert residue(s2) == []
