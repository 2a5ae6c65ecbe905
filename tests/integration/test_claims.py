"""Daemon-to-daemon claims that survive a crash, and a re-arm the old claimant hears of
(issue 14, items 6 and 7), on the real two-host test bed.

server1 holds the inbound half, server2 the outbound half. The outbound daemon
is made to fail after it claimed the key and before its relay runs, by real
parts only: the relays' slice (scistream.slice) is made to wait for a start job
the test holds (a oneshot unit that never finishes, ordered before the slice by
a drop-in in the host's private /run). The relay's start job then waits for as
long as the test likes, with no change to any code path of the daemon; the test
either lets the daemon's own relay_start_timeout run out (a rolled-back request)
or kills the daemon with SIGKILL while it waits. systemd then queues the
daemon's restart behind that relay start job (relays are ordered
Before=scistreamd.service): the test lets the relay start, daemon-less, as it
would on a real host, and the restarted daemon rolls the half-made endpoint
back. No timed assertions: every wait is "until the condition holds", its
timeout only a failure guard.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scistreamd import certs
from tests.integration.conftest import (
    HOSTTOOL,
    LineTool,
    endpoint_properties,
    journal_cursor,
    journal_since,
    parse_request_output,
    residue,
    tool,
    wait_until,
)

pytestmark = pytest.mark.testbed

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
PEER_PORT = "5000"
SERVICE = "scistreamd.service"
MIB = 1 << 20
#: server2's own peer certificate: the identity its daemon claims with.
HOST_CERT = ("--cert", "/etc/scistream/server.crt", "--key", "/etc/scistream/server.key")
CERT_DIR = "/run/claims-test"
HOLD = "claims-hold.service"
HOLD_DROPIN_DIR = "/run/systemd/system/scistream.slice.d"
HOLD_DROPIN = f"{HOLD_DROPIN_DIR}/50-claims-hold.conf"
#: server2 waits for its relay far longer than the test needs to kill it.
PATIENT = "/etc/scistream/conf.d/60-claims-patient.toml"
MSG_CLAIM = "5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a74"
REARMED = "the peer re-armed tunnel {uid}; make a new outbound request"


# --------------------------------------------------------------------------
# helpers

def inbound(host, port: int) -> Tuple[str, List[str]]:
    r = host.ctl("inbound-request", "--remote_ip", host.ip, "--receiver_ports", str(port))
    assert r.returncode == 0, f"inbound-request failed ({r.returncode}): {r.stderr}"
    uid, _s2cs, role, listeners = parse_request_output(r.stdout)
    assert role == "PROD"
    return uid, listeners


def outbound_ok(host, uid: str, listeners: List[str]) -> List[str]:
    r = host.ctl("outbound-request", uid, *listeners)
    assert r.returncode == 0, f"outbound-request failed ({r.returncode}): {r.stderr}"
    got, _s2cs, role, local = parse_request_output(r.stdout)
    assert (got, role) == (uid, "CONS")
    return local


def props(host, uid: str, role: str) -> dict:
    p = endpoint_properties(host, uid, role)
    assert p is not None, f"no {role} endpoint {uid} on {host.name}"
    return p


def daemon(host) -> dict:
    out = host.run(["systemctl", "show", SERVICE, "-p", "MainPID,NRestarts,ActiveState"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def jobs(host) -> str:
    return host.run(["systemctl", "list-jobs", "--no-legend", "--no-pager"], check=False).stdout


def key_of(host, uid: str) -> str:
    """The endpoint's PSK as stored on ``host`` (root only)."""
    out = host.run(["grep", "-rhoE", f"^{uid}:[0-9a-f]{{64}}", "/var/lib/scistream/keys"],
                   check=False).stdout.split()
    assert len(out) == 1, f"cannot find the key of {uid} on {host.name}: {out}"
    return out[0].split(":", 1)[1]


def claims_since(host, cursor: str) -> List[str]:
    """Messages with the claim MESSAGE_ID after ``cursor``. Filtered here: systemd 252's
    --after-cursor with a match skips the first match when the cursor's entry does not."""
    text = journal_since(host, cursor, "-o", "json")
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [e["MESSAGE"] for e in entries
            if e.get("MESSAGE_ID") == MSG_CLAIM and isinstance(e.get("MESSAGE"), str)]


_sinks = iter(range(1, 1 << 30))


def transfer(s1, s2, apps, local: str, port: int, nbytes: int = 8 * MIB) -> None:
    """``nbytes`` random bytes from server2 through the tunnel to a sink on server1
    (application port ``port``); the sha256 and count must match."""
    name = f"claims-sink-{next(_sinks)}"
    out = f"/run/{name}.digest"
    s1.run(["rm", "-f", out])
    apps.start(s1, name, "python3", HOSTTOOL, "sink", str(port), out)
    ip, _, lport = local.rpartition(":")
    sent = tool(s2, "send", ip, lport, str(nbytes), timeout=300).stdout.split()
    assert sent[1] == str(nbytes)

    def digest():
        r = s1.run(["cat", out], check=False)
        return r.stdout.split() if r.returncode == 0 else None

    got = wait_until(digest, 60, f"the sink on server1 to write {out}")
    assert got == sent, f"sent sha256/bytes {sent}, received {got}"


def raw_claim(host, uid: str, listeners: List[str], *cert: str) -> Tuple[int, str, str]:
    """POST /v1/endpoints/<uid>/claim to server1 from ``host``: (status, error, message)."""
    c = LineTool(host, "peerhttp", S1_IP, PEER_PORT, *cert)
    try:
        out = c.ask({"method": "POST", "path": f"/v1/endpoints/{uid}/claim",
                     "body": json.dumps({"listeners": listeners})})
    finally:
        c.close()
    assert "status" in out, f"no HTTP answer: {out}"
    doc = json.loads(out["body"])
    return out["status"], doc.get("error", ""), doc.get("message", "")


@pytest.fixture(scope="module")
def other_identity(bed) -> Tuple[str, str]:
    """A certificate on server2 that server1 trusts (the bed's CA signed it) but that
    names another gateway (IP SAN 192.168.150.99): (cert, key) paths on server2."""
    root = Path(bed.root)
    ca = certs.KeyPair(x509.load_pem_x509_certificate((root / "ca.crt").read_bytes()),
                       serialization.load_pem_private_key((root / "ca.key").read_bytes(), None))
    pair = certs.make_host_cert("gateway-x", [ipaddress.ip_address("192.168.150.99")],
                                issuer=ca)
    s2 = bed["server2"]
    s2.run(["install", "-d", "-m", "0700", CERT_DIR])
    cert, key = f"{CERT_DIR}/other.crt", f"{CERT_DIR}/other.key"
    s2.run(["sh", "-c", f"umask 077 && cat > {key}"], input=pair.key_pem().decode())
    s2.run(["sh", "-c", f"cat > {cert}"], input=pair.cert_pem().decode())
    return cert, key


@contextlib.contextmanager
def slice_held(host) -> Iterator[None]:
    """Until the block ends, no relay on ``host`` can start: scistream.slice is stopped
    (no relay runs there) and ordered after a oneshot unit that never finishes, so
    the start job of the next relay waits for the slice's, which waits for ours."""
    try:
        host.run(["systemctl", "stop", "scistream.slice"])
        host.run(["mkdir", "-p", HOLD_DROPIN_DIR])
        host.run(["sh", "-c", f"printf '[Unit]\\nAfter={HOLD}\\n' > {HOLD_DROPIN}"])
        host.run(["systemctl", "daemon-reload"])
        host.run(["systemd-run", f"--unit={HOLD}", "--no-block", "--quiet", "--collect",
                  "-p", "Type=oneshot",
                  "-p", "TimeoutStartSec=infinity", "/bin/sleep", "infinity"])
        wait_until(lambda: f"{HOLD} start running" in " ".join(jobs(host).split()), 30,
                   "the hold's start job to run")
        yield
    finally:
        host.run(["systemctl", "stop", HOLD], check=False)
        host.run(["systemctl", "reset-failed", HOLD], check=False)
        host.run(["rm", "-f", HOLD_DROPIN], check=False)
        host.run(["systemctl", "daemon-reload"], check=False)


def waiting_relay(host) -> bool:
    """Whether a relay's start job waits (for the held slice)."""
    return any(line.split()[1].startswith("scistream-outbound-") and "waiting" in line
               for line in jobs(host).splitlines() if len(line.split()) > 1)


@pytest.fixture
def patient_s2(s2) -> Iterator[None]:
    """server2 with relay_start_timeout = 300 (a conf.d drop-in): its daemon waits for the
    held relay until the test kills it, never rolling back on its own first."""
    s2.run(["sh", "-c", f"printf 'relay_start_timeout = 300\\n' > {PATIENT}"])
    s2.run(["systemctl", "restart", SERVICE])
    try:
        yield
    finally:
        s2.run(["rm", "-f", PATIENT])
        s2.run(["systemctl", "reset-failed", SERVICE], check=False)
        s2.run(["systemctl", "restart", SERVICE])


# --------------------------------------------------------------------------
# item 6: a claim is not lost by a crash

def test_kill9_after_the_claim_then_retry_works(clean, s1, s2, apps, patient_s2,
                                                other_identity):
    """server2's daemon claims the key, is SIGKILLed while its relay's start job waits,
    restarts and rolls the half-made endpoint back; a retry of outbound-request claims
    again (same certificate, a new key, generation 2) and data flows intact. Another
    identity is still refused, and once server2's relay has connected even server2 may
    not claim again. A re-arm on server1 then turns server2's endpoint failed."""
    uid, listeners = inbound(s1, 5301)
    assert props(s1, uid, "inbound")["KeyGeneration"] == 1
    with slice_held(s2):
        proc = subprocess.Popen(s2.nsenter() + ["scistreamctl", "outbound-request", uid,
                                                *listeners],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: props(s1, uid, "inbound")["ClaimedBy"], 60,
                       "server2's claim to reach server1")
            wait_until(lambda: (endpoint_properties(s2, uid, "outbound") or {}).get("State")
                       == "starting" and waiting_relay(s2), 60,
                       "server2's relay start job to wait for the held slice")
            before = daemon(s2)
            s2.run(["kill", "-9", before["MainPID"]])
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode != 0, out
        # systemd queues the daemon's restart behind the waiting relay (relays are
        # ordered Before=scistreamd.service): the relay starts first, daemon-less.
        wait_until(lambda: daemon(s2)["MainPID"] in ("0", "") and f"{SERVICE} start waiting"
                   in " ".join(jobs(s2).split()), 60, "the restart of scistreamd to wait")
    wait_until(lambda: daemon(s2)["NRestarts"] != before["NRestarts"]
               and daemon(s2)["ActiveState"] == "active", 60,
               "systemd to restart the killed scistreamd on server2")
    # The restarted daemon rolled the interrupted request back: nothing left.
    assert endpoint_properties(s2, uid, "outbound") is None
    log = s2.run(["journalctl", "-u", SERVICE, "-o", "cat", "--no-pager"]).stdout
    assert f"rolling back interrupted starting of outbound {uid}" in log
    assert f"outbound request for {uid} failed, rolled back" not in log
    assert residue(s2) == []
    first = props(s1, uid, "inbound")
    assert first["KeyGeneration"] == 1 and first["ClaimedBy"].startswith(f"{S2_IP}:")
    first_key = key_of(s1, uid)

    # Before: a second claim was "already claimed" until someone re-armed on server1.
    cursor = journal_cursor(s1)
    local = outbound_ok(s2, uid, listeners)
    again = props(s1, uid, "inbound")
    assert again["KeyGeneration"] == 2
    assert again["ClaimedAt"] > first["ClaimedAt"]
    assert f"cert IP:{S2_IP}" in again["ClaimedBy"]
    assert props(s2, uid, "outbound")["KeyGeneration"] == 2
    # A fresh key: whatever the lost half left behind is useless.
    assert key_of(s1, uid) != first_key and key_of(s2, uid) == key_of(s1, uid)
    assert any(f"key of {uid} claimed again by" in m for m in claims_since(s1, cursor))
    transfer(s1, s2, apps, local[0], 5301)

    # Another identity (trusted by server1, not the claimant) is still refused.
    status, name, message = raw_claim(s2, uid, listeners, "--cert", other_identity[0],
                                      "--key", other_identity[1])
    assert (status, name) == (409, "PeerRejected"), message
    assert "already claimed by another peer" in message
    # And the claimant itself, now that its relay has connected: the claim is settled.
    status, name, message = raw_claim(s2, uid, listeners, *HOST_CERT)
    assert (status, name) == (409, "PeerRejected"), message
    assert "has connected" in message and "re-arm" in message
    assert props(s1, uid, "inbound")["KeyGeneration"] == 2
    assert props(s2, uid, "outbound")["State"] == "active"
    transfer(s1, s2, apps, local[0], 5301, 1 * MIB)

    # item 7: a re-arm on server1 reaches server2 by its periodic peer check.
    assert s1.ctl("rearm", uid).returncode == 0
    assert props(s1, uid, "inbound")["KeyGeneration"] == 3
    want = REARMED.format(uid=uid)
    wait_until(lambda: props(s2, uid, "outbound")["State"] == "failed", 60,
               "server2's outbound endpoint to notice the re-arm")
    failed = props(s2, uid, "outbound")
    assert want in failed["StateDetail"], failed["StateDetail"]
    assert failed["KeyGeneration"] == 2
    status = s2.ctl("status", uid).stdout
    assert want in status, status

    # A new outbound request gets the new key and works.
    assert s2.ctl("release", uid).returncode == 0
    local = outbound_ok(s2, uid, listeners)
    assert props(s2, uid, "outbound")["KeyGeneration"] == 3
    transfer(s1, s2, apps, local[0], 5301, 1 * MIB)
    for host in (s1, s2):
        assert host.ctl("release", uid).returncode == 0
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []


def test_rolled_back_outbound_gives_its_claim_a_second_chance(clean, s1, s2, apps):
    """The outbound relay cannot start after the claim (its start job waits until
    relay_start_timeout, then the request rolls back with RelayFailed): the claim
    on server1 stays spent, and the retry claims again and works."""
    uid, listeners = inbound(s1, 5303)
    with slice_held(s2):
        r = s2.ctl("outbound-request", uid, *listeners, "--json")
        assert r.returncode != 0, r.stdout
        err = json.loads(r.stdout)
        assert err["error"] == "RelayFailed" and "did not start within" in err["message"], err
        assert endpoint_properties(s2, uid, "outbound") is None
        assert residue(s2) == []
    assert props(s1, uid, "inbound")["ClaimedBy"].startswith(f"{S2_IP}:")
    local = outbound_ok(s2, uid, listeners)
    assert props(s1, uid, "inbound")["KeyGeneration"] == 2
    transfer(s1, s2, apps, local[0], 5303, 1 * MIB)
    for host in (s1, s2):
        assert host.ctl("release", uid).returncode == 0
    apps.stop_all()
    assert residue(s1) == [] and residue(s2) == []
