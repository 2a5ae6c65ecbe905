"""Two-gateway tunnels on the real test bed (issue 4, items 3 and 4).

server1 (192.168.150.1) holds the inbound endpoint in front of the server
application, server2 (192.168.150.2) the outbound endpoint the client
application connects to; both daemons are the real scistreamd under the real
systemd of each emulated host, and the data plane is stunnel. Clients only
ever connect from inside a host. No mocks; no timed assertions: every wait is
"until the condition holds", with a generous guard that only turns a hang
into a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from typing import Dict, List, Sequence, Tuple

from tests.integration.conftest import (
    HOSTTOOL,
    SignalWatch,
    dbus,
    endpoint_properties,
    parse_request_output,
    residue,
    tool,
    wait_until,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
#: The guide's --server_cert of the inbound side (ignored there), and of the outbound side
#: (the trust file the peer's certificate is checked against).
HOST_CERT = "/etc/scistream/server.crt"
PEER_CA = "/etc/scistream/peer-ca.crt"
ERR = "org.scistream.Tunnel1.Error."
ENDPOINT_PREFIX = "/org/scistream/Tunnel1/endpoint"
MIB = 1024 * 1024


# --------------------------------------------------------------------------
# helpers

def inbound(host, ports: Sequence[int], num_conn: int = 1) -> Tuple[str, List[str]]:
    """scistreamctl inbound-request on ``host`` towards its own address; (uid, listeners)."""
    r = host.ctl("inbound-request", "--remote_ip", host.ip, "--receiver_ports",
                 ",".join(map(str, ports)), "--num_conn", str(num_conn))
    assert r.returncode == 0, f"inbound-request failed ({r.returncode}): {r.stderr}"
    uid, _s2cs, role, listeners = parse_request_output(r.stdout)
    assert role == "PROD"
    return uid, listeners


def outbound(host, uid: str, listeners: Sequence[str], *args: str) -> subprocess.CompletedProcess:
    """scistreamctl outbound-request on ``host`` (not checked: the caller asserts)."""
    return host.ctl("outbound-request", *args, uid, *listeners)


def outbound_ok(host, uid: str, listeners: Sequence[str], *args: str) -> List[str]:
    r = outbound(host, uid, listeners, *args)
    assert r.returncode == 0, f"outbound-request failed ({r.returncode}): {r.stderr}"
    got_uid, _s2cs, role, local = parse_request_output(r.stdout)
    assert (got_uid, role) == (uid, "CONS")
    return local


def hostport(listener: str) -> Tuple[str, int]:
    host, _, port = listener.rpartition(":")
    return host, int(port)


def request(host, listener: str, text: str, timeout: float = 15) -> str:
    """One line through ``listener`` from inside ``host``: the reply, or EOF/RESET/TIMEOUT."""
    ip, port = hostport(listener)
    return tool(host, "request", ip, str(port), text, "--timeout", str(timeout),
                check=False).stdout.strip()


def claimed_by(host, uid: str) -> str:
    props = endpoint_properties(host, uid, "inbound")
    assert props is not None, f"no inbound endpoint {uid} on {host.name}"
    return props["ClaimedBy"]


def iperf_client(host, listener: str, *extra: str) -> dict:
    ip, port = hostport(listener)
    r = host.run(["iperf3", "-c", ip, "-p", str(port), "-t", "2", "-J", *extra], check=False)
    doc = json.loads(r.stdout) if r.stdout.strip() else {}
    assert r.returncode == 0 and "error" not in doc, (
        f"iperf3 through {listener} failed ({r.returncode}): {doc.get('error')} {r.stderr}")
    return doc


def received_bytes(doc: dict) -> int:
    return int(doc["end"]["sum_received"]["bytes"])


def listening_process(host, listener: str) -> Tuple[str, int] | None:
    """(process name, pid) that `ss -tlpn` shows listening on exactly ``listener``."""
    for line in host.run(["ss", "-Htlpn"]).stdout.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[3] == listener:
            m = re.search(r'users:\(\("([^"]+)",pid=(\d+)', line)
            if m:
                return m.group(1), int(m.group(2))
    return None


def main_pid(host, unit: str) -> int:
    return int(host.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip())


def list_endpoints(host) -> List[Tuple[str, str, str, List[str]]]:
    out = dbus(host, "ListEndpoints", "", [])
    assert "reply" in out, out
    return [tuple(row) for row in out["reply"][0]]


def release(host, uid: str) -> None:
    r = host.ctl("release", uid)
    assert r.returncode == 0, f"release on {host.name} failed: {r.stderr}"
    assert r.stdout.strip() == f"Released {uid}."


# --------------------------------------------------------------------------
# 1. the guide, exactly

def test_guide_scenario_end_to_end(clean, s1, s2, apps):
    apps.start(s1, "iperf3-server", "iperf3", "-s", "-p", "5300")

    r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S1_IP}:5000",
               "--receiver_ports", "5300", "--num_conn", "1", f"--server_cert={HOST_CERT}")
    assert r.returncode == 0, r.stderr
    uid, s2cs, role, listeners = parse_request_output(r.stdout)
    assert str(uuid.UUID(uid)) == uid and uuid.UUID(uid).version == 4
    assert (s2cs, role) == (f"{S1_IP}:5000", "PROD")
    assert r.stdout.splitlines()[1] == f"{uid} {S1_IP}:5000 INVALID_TOKEN PROD"
    assert r.stdout.splitlines()[2] == "Listeners: ['192.168.150.1:5100']"

    r = s2.ctl("outbound-request", "--remote_ip", S1_IP, "--s2cs", f"{S2_IP}:5000",
               "--receiver_ports", "5100", "--num_conn", "1", f"--server_cert={PEER_CA}",
               uid, "192.168.150.1:5100")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "uid; s2cs; access_token; role",
        f"{uid} {S2_IP}:5000 INVALID_TOKEN CONS",
        "Listeners: ['192.168.150.2:5100']",
    ]

    # `ss -tlpn` on each host: stunnel, and precisely the relay unit's process.
    for host, listener, role_name in ((s1, f"{S1_IP}:5100", "inbound"),
                                      (s2, f"{S2_IP}:5100", "outbound")):
        found = listening_process(host, listener)
        assert found is not None, host.run(["ss", "-tlpn"]).stdout
        name, pid = found
        # The default stunnel = /usr/bin/stunnel (Debian's link to stunnel4): the
        # kernel names the process after the path it was started by.
        assert name == "stunnel"
        # The relay unit is named by an opaque id (never the uid): its Unit property.
        unit = endpoint_properties(host, uid, role_name)["Unit"]
        assert re.fullmatch(rf"scistream-{role_name}-[0-9a-f]{{16}}\.service", unit), unit
        assert pid == main_pid(host, unit)

    doc = iperf_client(s2, f"{S2_IP}:5100")
    # sum_received is what the iperf3 server on server1 counted: the application got it.
    assert received_bytes(doc) > 0

    release(s1, uid)
    release(s2, uid)
    assert residue(s1) == []
    assert residue(s2) == []


# --------------------------------------------------------------------------
# 2. bulk data, bit for bit

def test_64mib_random_payload_arrives_intact(clean, s1, s2, apps):
    out = "/run/tunnel-sink.digest"
    s1.run(["rm", "-f", out])
    apps.start(s1, "tunnel-sink", "python3", HOSTTOOL, "sink", "5300", out)
    uid, listeners = inbound(s1, [5300])
    local = outbound_ok(s2, uid, listeners, "--receiver_ports", "5100")
    ip, port = hostport(local[0])

    nbytes = 64 * MIB
    sent = tool(s2, "send", ip, str(port), str(nbytes), timeout=300).stdout.split()
    assert sent[1] == str(nbytes)

    def digest():
        r = s1.run(["cat", out], check=False)
        return r.stdout.split() if r.returncode == 0 else None

    got = wait_until(digest, 60, f"the sink on server1 to write {out}")
    assert got == sent, f"sent sha256/bytes {sent}, received {got}"

    release(s1, uid)
    release(s2, uid)
    s1.run(["rm", "-f", out])
    assert residue(s1) == [] and residue(s2) == []


# --------------------------------------------------------------------------
# 3. num_conn=4: four mappings, each to its own receiver

def test_four_mappings_each_reach_their_receiver_and_carry_iperf(clean, s1, s2, apps):
    receivers = [5300 + i for i in range(4)]
    for i, port in enumerate(receivers):
        apps.start(s1, f"tagged-echo-{i}", "python3", HOSTTOOL, "echo", str(port),
                   "--tag", f"receiver{i}:")
    uid, remote = inbound(s1, receivers, num_conn=4)
    assert remote == [f"{S1_IP}:{5100 + i}" for i in range(4)]
    inb = endpoint_properties(s1, uid, "inbound")
    assert inb["Targets"] == [f"{S1_IP}:{p}" for p in receivers]
    assert inb["NumConn"] == 4

    local = outbound_ok(s2, uid, remote, "--num_conn", "4")
    assert len(local) == len(set(local)) == 4
    assert all(hostport(x)[0] == S2_IP for x in local)
    out = endpoint_properties(s2, uid, "outbound")
    assert out["Targets"] == remote and out["NumConn"] == 4 and out["State"] == "active"

    # Mapping i: local listener i -> inbound listener i -> receiver i.
    for i, listener in enumerate(local):
        assert request(s2, listener, f"hello{i}") == f"receiver{i}:hello{i}"

    # Same mappings, now four concurrent iperf3 clients with four streams each.
    apps.stop_all()
    for i, port in enumerate(receivers):
        apps.start(s1, f"iperf3-server-{i}", "iperf3", "-s", "-p", str(port))
    script = " ".join(
        f"iperf3 -c {hostport(x)[0]} -p {hostport(x)[1]} -t 2 -P 4 -J > /run/iperf-{i}.json 2>&1 &"
        for i, x in enumerate(local)) + " wait"
    s2.sh(script, timeout=120)
    for i, listener in enumerate(local):
        doc = json.loads(s2.run(["cat", f"/run/iperf-{i}.json"]).stdout)
        assert "error" not in doc, f"iperf3 through {listener}: {doc['error']}"
        assert doc["start"]["test_start"]["num_streams"] == 4
        assert len(doc["start"]["connected"]) == 4
        assert received_bytes(doc) > 0, f"no data through {listener}"
        assert all(s["receiver"]["bytes"] > 0 for s in doc["end"]["streams"])
    s2.run(["sh", "-c", "rm -f /run/iperf-*.json"])

    release(s1, uid)
    release(s2, uid)
    assert residue(s1) == [] and residue(s2) == []


# --------------------------------------------------------------------------
# 4. both endpoints of one uid on a single host

def test_both_endpoints_of_one_uid_on_one_host(clean, s1, s2, apps):
    apps.start(s1, "single-host-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "single:")
    uid, remote = inbound(s1, [5300])
    # No local ports: allocated from port_range, next to the inbound listener.
    r = outbound(s1, uid, remote)
    assert r.returncode == 0, (
        f"outbound-request for a uid whose inbound half is on the same host failed "
        f"({r.returncode}): {r.stderr.strip()}")
    local = parse_request_output(r.stdout)[3]
    assert len(local) == 1
    ip, port = hostport(local[0])
    assert ip == S1_IP and 5100 <= port <= 5200 and local[0] not in remote

    assert request(s1, local[0], "ping") == "single:ping"
    rows = [row for row in list_endpoints(s1) if row[0] == uid]
    assert sorted((row[1], row[2]) for row in rows) == [("inbound", "active"),
                                                         ("outbound", "active")]
    assert claimed_by(s1, uid).startswith(f"{S1_IP}:")
    assert list_endpoints(s2) == []

    release(s1, uid)  # one release, both roles
    assert [row for row in list_endpoints(s1) if row[0] == uid] == []
    assert residue(s1) == [] and residue(s2) == []


# --------------------------------------------------------------------------
# 5. one side released while the other still exists

def test_survivor_refuses_connections_and_reports_failed(clean, s1, s2, apps):
    apps.start(s1, "survivor-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "up:")
    uid, remote = inbound(s1, [5300])
    local = outbound_ok(s2, uid, remote, "--receiver_ports", "5100")
    assert request(s2, local[0], "before") == "up:before"
    assert endpoint_properties(s2, uid, "outbound")["State"] == "active"

    watch = SignalWatch(s2, ENDPOINT_PREFIX, until='State="failed"', timeout=60)
    try:
        release(s1, uid)
        # A client of the survivor is told at once, not left hanging.
        answer = request(s2, local[0], "after", timeout=20)
        assert answer in ("EOF", "RESET"), f"client got {answer!r} through a released tunnel"

        # The daemon notices on its own (peer_check_interval = 2 s) and says so.
        events = watch.events(timeout=90)
    finally:
        watch.close()
    assert not watch.timed_out, f"outbound endpoint never became failed; signals: {events}"
    changed = [e["body"][1] for e in events if e["member"] == "PropertiesChanged"
               and e["body"][1].get("State") == "failed"]
    assert "released" in changed[0].get("StateDetail", ""), changed

    props = endpoint_properties(s2, uid, "outbound")
    assert props["State"] == "failed"
    assert "released" in props["StateDetail"] and f"scistreamctl release {uid}" in props[
        "StateDetail"]
    st = s2.ctl("status", uid)
    assert st.returncode == 0 and re.search(r"^State:\s+failed$", st.stdout, re.M), st.stdout
    assert [row[2] for row in list_endpoints(s2) if row[0] == uid] == ["failed"]

    release(s2, uid)
    assert residue(s1) == [] and residue(s2) == []


# --------------------------------------------------------------------------
# 6. the key is handed out once

def test_claim_once_rearm_and_listener_check(clean, s1, s2, apps):
    apps.start(s1, "claim-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "app:")
    uid, remote = inbound(s1, [5300])
    assert claimed_by(s1, uid) == ""
    local = outbound_ok(s2, uid, remote, "--receiver_ports", "5100")
    assert request(s2, local[0], "one") == "app:one"

    st = s1.ctl("status", uid)
    assert st.returncode == 0, st.stderr
    # The claimant's address and the identity its (verified) client certificate gave.
    assert re.search(r"^ClaimedBy:\s+192\.168\.150\.2:\d+ cert IP:192\.168\.150\.2$",
                     st.stdout, re.M), st.stdout
    assert not re.search(r"^ClaimedAt:\s+never$", st.stdout, re.M), st.stdout
    first_claim = claimed_by(s1, uid)

    # A second claim, from another gateway role (server1 as outbound): refused.
    before_s1 = residue(s1)
    r = outbound(s1, uid, remote)
    assert r.returncode == 7, (r.returncode, r.stderr)
    assert "already claimed" in r.stderr
    raw = dbus(s1, "OutboundRequest", "sasaqua{sv}", [uid, remote, [], 1, {}])
    assert raw.get("error") == ERR + "PeerRejected", raw
    assert residue(s1) == before_s1
    assert claimed_by(s1, uid) == first_claim
    # server2 already has its outbound half: refused locally, before any claim.
    r = outbound(s2, uid, remote, "--receiver_ports", "5101")
    assert r.returncode == 4, (r.returncode, r.stderr)

    # Re-arm (the manager's method, as busctl): a new key; the old claimant stops working.
    s1.run(["busctl", "call", "org.scistream.Tunnel1", "/org/scistream/Tunnel1",
            "org.scistream.Tunnel1.Manager", "RearmEndpoint", "s", uid])
    assert claimed_by(s1, uid) == ""
    assert endpoint_properties(s1, uid, "inbound")["State"] == "active"
    stale = request(s2, local[0], "stale")
    assert stale in ("EOF", "RESET"), f"the old key still passes data after re-arm: {stale!r}"
    release(s2, uid)
    assert residue(s2) == []

    # A claim naming a listener the endpoint does not have: refused, claim not used up.
    wrong = [f"{S1_IP}:5101"]
    r = outbound(s2, uid, wrong, "--receiver_ports", "5100")
    assert r.returncode == 11, (r.returncode, r.stderr)  # WrongListener: nothing was claimed
    assert "not a listener" in r.stderr
    raw = dbus(s2, "OutboundRequest", "sasaqua{sv}", [uid, wrong, [5100], 1, {}])
    assert raw.get("error") == ERR + "WrongListener", raw
    assert claimed_by(s1, uid) == ""
    assert residue(s2) == []

    local = outbound_ok(s2, uid, remote, "--receiver_ports", "5100")
    assert request(s2, local[0], "two") == "app:two"
    assert claimed_by(s1, uid).startswith(f"{S2_IP}:")

    # The endpoint object's own Rearm does the same.
    inb_path = endpoint_properties(s1, uid, "inbound")["Path"]
    out = dbus(s1, "Rearm", "", [], path=inb_path, iface="org.scistream.Tunnel1.Endpoint")
    assert "reply" in out, out
    assert claimed_by(s1, uid) == ""
    release(s2, uid)
    local = outbound_ok(s2, uid, remote, "--receiver_ports", "5100")
    assert request(s2, local[0], "three") == "app:three"

    release(s1, uid)
    release(s2, uid)
    assert residue(s1) == [] and residue(s2) == []


def test_concurrent_claims_exactly_one_wins(clean, s1, s2, apps):
    """server1 (same host as the inbound half) and server2 claim at once: one key, one winner."""
    apps.start(s1, "race-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "race:")
    uid, remote = inbound(s1, [5300])
    procs: Dict[str, subprocess.Popen] = {
        h.name: subprocess.Popen(h.nsenter() + ["scistreamctl", "outbound-request", uid,
                                                *remote],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for h in (s1, s2)}
    results = {name: (p.wait(timeout=120), p.stdout.read(), p.stderr.read())
               for name, p in procs.items()}
    codes = sorted(code for code, _out, _err in results.values())
    assert codes == [0, 7], results
    winner = next(n for n, (code, _o, _e) in results.items() if code == 0)
    winner_host = s1 if winner == "server1" else s2
    loser_host = s2 if winner == "server1" else s1
    assert claimed_by(s1, uid).startswith(f"{winner_host.ip}:")
    local = parse_request_output(results[winner][1])[3]
    assert request(winner_host, local[0], "x") == "race:x"
    assert endpoint_properties(loser_host, uid, "outbound") is None

    release(s1, uid)
    if winner_host is s2:
        release(s2, uid)
    assert residue(s1) == [] and residue(s2) == []
