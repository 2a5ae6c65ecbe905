"""Peer authentication on the real test bed (issue 11: the uid is not enough to get the key).

By default the peer port hands a key only to a peer daemon whose client
certificate chains to the host's peer trust file; an inbound endpoint may
name the one peer (by certificate IP or DNS subjectAltName) that may claim it;
a refused claim consumes nothing; /v1/health tells an unauthenticated client
only that the port is up. The lab opt-out (peer_require_client_cert = false)
accepts claims without a certificate. Claims are made from inside the hosts:
raw HTTPS with or without a client certificate (hosttool peerhttp), and the
real daemons' outbound-request. No timed assertions.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from scistreamd import certs
from tests.integration.conftest import (
    HOSTTOOL,
    LineTool,
    daemon_status,
    dbus,
    endpoint_properties,
    journal_cursor,
    journal_since,
    parse_request_output,
    residue,
    tool,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
PEER_PORT = "5000"
HOST_CERT = ("--cert", "/etc/scistream/server.crt", "--key", "/etc/scistream/server.key")
#: Test certificates live in the host's private /run (gone with the host).
CERT_DIR = "/run/sectest-peer"
LAB_DROPIN = "/etc/scistream/conf.d/50-sectest-lab.toml"
#: journald MESSAGE_ID of a refused claim (scistreamd.peerwire.MSG_PEER_REFUSED).
MSG_REFUSED = "5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a75"


# --------------------------------------------------------------------------
# helpers

def write_pair(host, name: str, pair: certs.KeyPair) -> Tuple[str, str]:
    """Install a certificate and key inside ``host``; (cert path, key path) there."""
    host.run(["install", "-d", "-m", "0700", CERT_DIR])
    cert, key = f"{CERT_DIR}/{name}.crt", f"{CERT_DIR}/{name}.key"
    host.run(["sh", "-c", f"umask 077 && cat > {key}"], input=pair.key_pem().decode())
    host.run(["sh", "-c", f"cat > {cert}"], input=pair.cert_pem().decode())
    return cert, key


@pytest.fixture(scope="module")
def test_ca(bed) -> certs.KeyPair:
    """The test bed's CA (its key is kept next to the bed's record), to issue more peers."""
    root = Path(bed.root)
    cert = x509.load_pem_x509_certificate((root / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), None)
    return certs.KeyPair(cert, key)


@pytest.fixture(scope="module")
def other_peers(bed, test_ca) -> dict:
    """Certificates on server2 that server1 trusts but that are not server2's identity,
    and one that server1 does not trust at all; name -> (cert, key) paths on server2."""
    s2 = bed["server2"]
    made = {
        # Trusted (signed by the test bed CA), another IP SAN.
        "trusted-other-ip": certs.make_host_cert(
            "gateway-x", [ipaddress.ip_address("192.168.150.99")], issuer=test_ca),
        # Trusted, a DNS SAN only (and server2's name as CN, which never counts).
        "trusted-dns": certs.make_host_cert(
            "server2", [], dns_names=["gw2.example.org"], issuer=test_ca),
        # Not trusted: self-signed, yet naming server2's own IP.
        "untrusted-self-signed": certs.make_host_cert(
            "server2", [ipaddress.ip_address(S2_IP)]),
    }
    return {name: write_pair(s2, name, pair) for name, pair in made.items()}


def inbound(host, port: int, *extra: str) -> Tuple[str, List[str]]:
    r = host.ctl("inbound-request", "--remote_ip", host.ip, "--receiver_ports", str(port),
                 *extra)
    assert r.returncode == 0, f"inbound-request failed ({r.returncode}): {r.stderr}"
    uid, _s2cs, role, listeners = parse_request_output(r.stdout)
    assert role == "PROD"
    return uid, listeners


def outbound(host, uid: str, listeners: List[str]):
    return host.ctl("outbound-request", uid, *listeners)


def request(host, listener: str, text: str) -> str:
    ip, _, port = listener.rpartition(":")
    return tool(host, "request", ip, port, text, "--timeout", "15", check=False).stdout.strip()


def raw_claim(host, uid: str, listeners: List[str], *cert: str) -> dict:
    """POST /v1/endpoints/<uid>/claim to server1's peer port from inside ``host``."""
    c = LineTool(host, "peerhttp", S1_IP, PEER_PORT, *cert)
    try:
        return c.ask({"method": "POST", "path": f"/v1/endpoints/{uid}/claim",
                      "body": json.dumps({"listeners": listeners})})
    finally:
        c.close()


def raw_get(host, path: str, *cert: str) -> dict:
    c = LineTool(host, "peerhttp", S1_IP, PEER_PORT, *cert)
    try:
        return c.ask({"method": "GET", "path": path, "length": None})
    finally:
        c.close()


def error_of(out: dict) -> Tuple[int, str, str]:
    assert "status" in out, f"no HTTP answer: {out}"
    doc = json.loads(out["body"])
    return out["status"], doc.get("error", ""), doc.get("message", "")


def claimed_by(uid: str, host) -> str:
    props = endpoint_properties(host, uid, "inbound")
    assert props is not None, f"no inbound endpoint {uid} on {host.name}"
    return props["ClaimedBy"]


def key_of(host, uid: str) -> str:
    """The endpoint's PSK as stored on ``host`` (root only), to prove it never leaks."""
    out = host.run(["grep", "-rhoE", f"^{uid}:[0-9a-f]{{64}}", "/var/lib/scistream/keys"],
                   check=False).stdout.split()
    assert len(out) == 1, f"cannot find the key of {uid} on {host.name}: {out}"
    return out[0].split(":", 1)[1]


def refusals_since(host, cursor: str) -> str:
    """Messages with the refusal MESSAGE_ID after ``cursor``, one a line.

    Filtered here, not by journalctl: systemd 252's --after-cursor together with a
    match skips the first matching entry when the cursor's own entry does not match.
    """
    host.run(["journalctl", "--sync"], check=False)
    out = host.run(["journalctl", "--no-pager", "-o", "json", f"--after-cursor={cursor}"],
                   check=False).stdout
    lines = []
    for raw in out.splitlines():
        entry = json.loads(raw)
        if entry.get("MESSAGE_ID") == MSG_REFUSED and isinstance(entry.get("MESSAGE"), str):
            lines.append(entry["MESSAGE"])
    return "\n".join(lines) + "\n"


@pytest.fixture
def echo(clean, apps, s1):
    apps.start(s1, "secpeer-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "app:")
    return "app:"


def _restart(host) -> None:
    host.run(["systemctl", "restart", "scistreamd.service"])  # Type=notify: ready on return
    assert daemon_status(host)["ActiveState"] == "active"


@pytest.fixture
def lab_opt_out(s1) -> Iterator[None]:
    """server1 with peer_require_client_cert = false (a conf.d drop-in), restored afterwards."""
    s1.run(["sh", "-c", f"cat > {LAB_DROPIN}"],
           input="# test_security_peer: lab opt-out\npeer_require_client_cert = false\n")
    try:
        _restart(s1)
        yield
    finally:
        s1.run(["rm", "-f", LAB_DROPIN])
        _restart(s1)


# --------------------------------------------------------------------------
# default configuration: mutual TLS

def test_claim_without_client_certificate_is_refused_by_name(echo, s1, s2):
    uid, listeners = inbound(s1, 5300)
    key = key_of(s1, uid)
    cursor = journal_cursor(s1)

    out = raw_claim(s2, uid, listeners)
    status, name, message = error_of(out)
    assert (status, name) == (403, "AccessDenied"), out
    assert "no client certificate" in message and "peer_cert/peer_key" in message, message
    assert key not in out["body"]
    # Nor may it ask whether the endpoint exists.
    status, name, _ = error_of(raw_get(s2, f"/v1/endpoints/{uid}"))
    assert (status, name) == (403, "AccessDenied")
    # A uid that does not exist gets the same answer: no oracle for valid uids.
    status, name, _ = error_of(raw_claim(s2, "00000000-0000-4000-8000-000000000000", listeners))
    assert (status, name) == (403, "AccessDenied")

    assert claimed_by(uid, s1) == "", "a refused claim used up the endpoint's claim"
    logged = refusals_since(s1, cursor)
    assert f"refused a claim of endpoint {uid} by {S2_IP}:" in logged, logged
    assert "no client certificate" in logged, logged
    assert key not in journal_since(s1, cursor)

    # The legitimate claim, by server2's daemon with its own certificate, still works.
    r = outbound(s2, uid, listeners)
    assert r.returncode == 0, f"outbound-request after the refused claim: {r.stderr}"
    local = parse_request_output(r.stdout)[3]
    assert request(s2, local[0], "hello") == "app:hello"
    # ClaimedBy records the certificate identity.
    assert re.fullmatch(rf"{re.escape(S2_IP)}:\d+ cert IP:{re.escape(S2_IP)}",
                        claimed_by(uid, s1)), claimed_by(uid, s1)


def test_untrusted_client_certificate_is_refused(echo, s1, s2, other_peers):
    uid, listeners = inbound(s1, 5300)
    cursor = journal_cursor(s1)
    cert, key = other_peers["untrusted-self-signed"]
    out = raw_claim(s2, uid, listeners, "--cert", cert, "--key", key)
    # The handshake fails: no HTTP answer at all, and a TLS alert naming the CA problem.
    assert "status" not in out, f"an untrusted certificate got an HTTP answer: {out}"
    assert "UNKNOWN_CA" in out.get("detail", "").upper().replace(" ", "_"), out
    assert claimed_by(uid, s1) == ""
    logged = refusals_since(s1, cursor)
    assert f"refused {S2_IP}:" in logged and "not trusted" in logged, logged

    # Also through server2's daemon: peer_cert pointing at the untrusted certificate.
    dropin = "/etc/scistream/conf.d/50-sectest-untrusted.toml"
    s2.run(["sh", "-c", f"cat > {dropin}"],
           input=f'peer_cert = "{cert}"\npeer_key = "{key}"\n')
    try:
        _restart(s2)
        r = outbound(s2, uid, listeners)
        assert r.returncode == 9, (r.returncode, r.stderr)
        assert "client certificate" in r.stderr and "trust" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        s2.run(["rm", "-f", dropin])
        _restart(s2)
    assert claimed_by(uid, s1) == ""
    assert residue(s2) == []

    r = outbound(s2, uid, listeners)
    assert r.returncode == 0, r.stderr
    assert request(s2, parse_request_output(r.stdout)[3][0], "ok") == "app:ok"


def test_health_without_certificate_reveals_nothing(clean, s1, s2):
    inbound(s1, 5300)  # one endpoint, so there is a count to hide
    out = raw_get(s2, "/v1/health")
    assert out.get("status") == 200, out
    assert json.loads(out["body"]) == {"status": "ok"}, out["body"]
    out = raw_get(s2, "/v1/health", *HOST_CERT)
    assert out.get("status") == 200, out
    doc = json.loads(out["body"])
    assert doc["status"] == "ok" and doc["endpoints"] == 1 and doc["version"], doc


# --------------------------------------------------------------------------
# per-endpoint allowed peer

def test_claim_by_trusted_peer_other_than_the_allowed_one_is_refused(echo, s1, s2,
                                                                      other_peers):
    uid, listeners = inbound(s1, 5300, "--allowed-peer", S2_IP)
    props = endpoint_properties(s1, uid, "inbound")
    assert props["AllowedPeer"] == S2_IP
    st = s1.ctl("status", uid)
    assert re.search(rf"^AllowedPeer:\s+{re.escape(S2_IP)}$", st.stdout, re.M), st.stdout
    key = key_of(s1, uid)
    cursor = journal_cursor(s1)

    # Trusted certificates (the test bed CA signed them) that do not name 192.168.150.2.
    for name, names in (("trusted-other-ip", "IP:192.168.150.99"),
                        ("trusted-dns", "DNS:gw2.example.org")):
        cert, k = other_peers[name]
        out = raw_claim(s2, uid, listeners, "--cert", cert, "--key", k)
        status, err, message = error_of(out)
        assert (status, err) == (403, "AccessDenied"), (name, out)
        assert "may be claimed only by the peer" in message, message
        assert f"certificate names {names}" in message, message
        assert S2_IP not in message, "the refusal tells a stranger which peer is allowed"
        assert key not in out["body"]
        assert claimed_by(uid, s1) == "", f"{name}: a refused claim used up the claim"

    # server1's own daemon is a trusted peer too, but not the named one: exit 9, by name.
    before = residue(s1)
    r = outbound(s1, uid, listeners)
    assert r.returncode == 9, (r.returncode, r.stderr)
    assert "may be claimed only by the peer" in r.stderr, r.stderr
    assert residue(s1) == before
    assert claimed_by(uid, s1) == ""

    logged = refusals_since(s1, cursor)
    assert logged.count(f"refused claim of {uid} by {S2_IP}:") == 2, logged
    assert "cert IP:192.168.150.99" in logged and "cert DNS:gw2.example.org" in logged, logged
    assert f"refused claim of {uid} by {S1_IP}:" in logged, logged
    assert f"not the endpoint's allowed peer {S2_IP}" in logged, logged
    assert key not in journal_since(s1, cursor)

    # The named peer claims afterwards, and data flows.
    r = outbound(s2, uid, listeners)
    assert r.returncode == 0, f"the allowed peer's outbound-request failed: {r.stderr}"
    assert request(s2, parse_request_output(r.stdout)[3][0], "mine") == "app:mine"
    assert claimed_by(uid, s1).endswith(f" cert IP:{S2_IP}")


def test_allowed_peer_by_dns_name(echo, s1, s2, other_peers):
    uid, listeners = inbound(s1, 5300, "--allowed_peer", "GW2.Example.org")
    assert endpoint_properties(s1, uid, "inbound")["AllowedPeer"] == "gw2.example.org"
    # server2's own certificate lists only its IP: not this peer.
    out = raw_claim(s2, uid, listeners, *HOST_CERT)
    assert error_of(out)[:2] == (403, "AccessDenied"), out
    cert, key = other_peers["trusted-dns"]
    out = raw_claim(s2, uid, listeners, "--cert", cert, "--key", key)
    assert out.get("status") == 200, out
    assert json.loads(out["body"])["uid"] == uid
    assert claimed_by(uid, s1).endswith(" cert DNS:gw2.example.org")


def test_allowed_peer_is_validated_and_survives_a_restart(clean, s1):
    for bad in ("*.example.org", "192.168.150.2:5000", "gw_2.example.org", "0.0.0.0"):
        r = s1.ctl("inbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5300",
                   "--allowed-peer", bad)
        assert r.returncode == 2 and "allowed_peer" in r.stderr, (bad, r.returncode, r.stderr)
    # Over D-Bus directly, bypassing the CLI's check: the daemon refuses too.
    out = dbus(s1, "InboundRequest", "saqua{sv}",
               [S1_IP, [5300], 1, {"allowed_peer": ["s", "*.example.org"]}])
    assert out.get("error") == "org.scistream.Tunnel1.Error.InvalidArgument", out
    out = dbus(s1, "InboundRequest", "saqua{sv}",
               [S1_IP, [5300], 1, {"allowed_peer": ["u", 7]}])
    assert out.get("error") == "org.scistream.Tunnel1.Error.InvalidArgument", out
    assert residue(s1) == []

    uid, _ = inbound(s1, 5300, "--allowed-peer", "2001:DB8:0:0:0:0:0:2")
    _restart(s1)
    assert endpoint_properties(s1, uid, "inbound")["AllowedPeer"] == "2001:db8::2"


# --------------------------------------------------------------------------
# the lab opt-out

def test_lab_opt_out_accepts_claims_without_certificate(echo, s1, s2, other_peers,
                                                        lab_opt_out):
    uid, listeners = inbound(s1, 5300)
    out = raw_claim(s2, uid, listeners)
    assert out.get("status") == 200, f"claim without a certificate in the lab mode: {out}"
    doc = json.loads(out["body"])
    assert doc["uid"] == uid and re.fullmatch(r"[0-9a-f]{64}", doc["psk"]), doc
    # No certificate, no identity: ClaimedBy is just the address.
    assert re.fullmatch(rf"{re.escape(S2_IP)}:\d+", claimed_by(uid, s1)), claimed_by(uid, s1)

    # A presented certificate must still verify.
    uid2, listeners2 = inbound(s1, 5300)
    cert, key = other_peers["untrusted-self-signed"]
    out = raw_claim(s2, uid2, listeners2, "--cert", cert, "--key", key)
    assert "status" not in out, out
    # An endpoint that names its peer still needs that peer's certificate.
    uid3, listeners3 = inbound(s1, 5300, "--allowed-peer", S2_IP)
    assert error_of(raw_claim(s2, uid3, listeners3))[:2] == (403, "AccessDenied")
    assert claimed_by(uid2, s1) == "" and claimed_by(uid3, s1) == ""
    r = outbound(s2, uid3, listeners3)
    assert r.returncode == 0, r.stderr
    assert request(s2, parse_request_output(r.stdout)[3][0], "lab") == "app:lab"
    # Health stays redacted without a certificate.
    assert json.loads(raw_get(s2, "/v1/health")["body"]) == {"status": "ok"}


def test_default_is_restored_after_the_opt_out(clean, s1, s2):
    """The fixture's restore works (and nothing else left the opt-out on)."""
    assert s1.run(["ls", LAB_DROPIN], check=False).returncode != 0
    uid, listeners = inbound(s1, 5300)
    assert error_of(raw_claim(s2, uid, listeners))[:2] == (403, "AccessDenied")

