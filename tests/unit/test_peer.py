"""The TLS peer port, server and client, over real TLS on 127.0.0.1.

No mocks of ssl or requests: a throw-away PKI is generated per session, the
server runs on an asyncio loop in a background thread, and a small in-test
handler object (the documented injection point) plays the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import json
import shutil
import socket
import ssl
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scistreamd import __version__
from scistreamd.errors import (
    AccessDenied,
    ConfigError,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PeerUnreachable,
    ScistreamError,
)
from scistreamd.model import HostPort
from scistreamd.peerclient import (
    _CONTEXTS_KEPT,
    PeerClient,
    claim_endpoint,
    endpoint_state,
    health,
)
from scistreamd.peerident import PeerIdentity
from scistreamd.peerserver import PeerServer
from scistreamd.peerwire import MSG_PEER_REFUSED, EndpointState, PeerEndpoint

LOCAL = ipaddress.ip_address("127.0.0.1")
UID = "bd9f1a7e-04d7-41f0-b44c-946dae415862"
UID2 = "0c2d4f6a-1111-4222-8333-444455556666"
UNKNOWN_UID = "ffffffff-ffff-4fff-bfff-ffffffffffff"
PSK = "ab" * 32
SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
GUARD = 10.0  # failure guard only: never asserted as a duration


# ---------------------------------------------------------------------------
# throw-away PKI


@dataclass
class Pair:
    cert: Path
    key: Path

    @property
    def pem(self) -> str:
        return self.cert.read_text()


@dataclass
class PKI:
    ca: Path
    other_ca: Path
    server: Pair  # SAN 127.0.0.1 and ::1, issued by ca
    wrong_ip_server: Pair  # SAN 127.0.0.2 only, issued by ca
    other_server: Pair  # SAN 127.0.0.1, issued by other_ca
    self_signed_server: Pair  # SAN 127.0.0.1, its own issuer
    client: Pair  # CN gateway-b, issued by ca
    other_client: Pair  # CN intruder, issued by other_ca
    named_client: Pair  # CN gateway-c, SAN IP 127.0.0.1, ::1, DNS Gw-C.Example.org, by ca


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    ips: Tuple[str, ...] = (),
    usage: x509.ObjectIdentifier | None = None,
    key_usage: bool = True,
    dns: Tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name = issuer[0].subject if issuer else _name(cn)
    signer = issuer[1] if issuer else key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if key_usage:
        ku = x509.KeyUsage(
            digital_signature=not ca,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        )
        b = b.add_extension(ku, critical=True)
    if ips or dns:
        names: List[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        names += [x509.DNSName(d) for d in dns]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> Pair:
    c, k = directory / f"{name}.crt", directory / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    k.chmod(0o600)
    return Pair(c, k)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, other_key = key(), key()
    ca = _issue("test CA", ca_key, None, ca=True)
    other = _issue("other CA", other_key, None, ca=True)
    srv = ExtendedKeyUsageOID.SERVER_AUTH
    cli = ExtendedKeyUsageOID.CLIENT_AUTH

    def leaf(name: str, cn: str, issuer: Any, ips: Tuple[str, ...], usage: Any) -> Pair:
        k = key()
        return _write(d, name, _issue(cn, k, issuer, ips=ips, usage=usage), k)

    ss_key, named_key = key(), key()
    # Like `openssl req -x509` makes them (the guide's server.crt): CA:TRUE, no key usage.
    self_signed = _issue(
        "self-signed gateway", ss_key, None, ca=True, ips=("127.0.0.1",), key_usage=False
    )
    return PKI(
        ca=_write(d, "ca", ca, ca_key).cert,
        other_ca=_write(d, "other-ca", other, other_key).cert,
        server=leaf("server", "gateway-a", (ca, ca_key), ("127.0.0.1", "::1"), srv),
        wrong_ip_server=leaf("wrong-ip", "gateway-x", (ca, ca_key), ("127.0.0.2",), srv),
        other_server=leaf("other-server", "gateway-o", (other, other_key), ("127.0.0.1",), srv),
        self_signed_server=_write(d, "self-signed", self_signed, ss_key),
        client=leaf("client", "gateway-b", (ca, ca_key), (), cli),
        other_client=leaf("other-client", "intruder", (other, other_key), (), cli),
        named_client=_write(
            d, "named-client",
            _issue("gateway-c", named_key, (ca, ca_key), ips=("127.0.0.1", "::1"),
                   dns=("Gw-C.Example.org",), usage=cli),
            named_key,
        ),
    )


# ---------------------------------------------------------------------------
# the handler (injection point) and a server on a background loop


class Gateway:
    """Plays the manager: endpoints by uid, the key handed out once."""

    def __init__(self) -> None:
        self.endpoints: Dict[str, List[str]] = {
            UID: ["192.168.150.1:5100", "[2001:db8::1]:5101"],
            UID2: ["192.168.150.1:5102"],
        }
        self.claims: Dict[str, str] = {}
        self.identities: Dict[str, PeerIdentity] = {}
        self.fail: BaseException | None = None
        self.stall = False

    async def claim(self, uid: str, claimant: PeerIdentity, listeners: Any = ()) -> Dict[str, Any]:
        if self.stall:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        if uid not in self.endpoints:
            raise NotFound(f"no inbound endpoint {uid} on this host")
        if uid in self.claims:
            raise PeerRejected(f"endpoint {uid} was already claimed by {self.claims[uid]}")
        unknown = [str(h) for h in listeners if str(h) not in self.endpoints[uid]]
        if unknown:
            raise PeerRejected(f"{unknown} are not listeners of {uid}")
        self.claims[uid] = str(claimant)
        self.identities[uid] = claimant
        return {"uid": uid, "listeners": self.endpoints[uid], "psk": PSK, "cipher_suites": SUITES}

    async def health(self) -> Dict[str, Any]:
        return {"endpoints": len(self.endpoints)}

    async def endpoint_state(self, uid: str) -> Dict[str, Any]:
        if uid not in self.endpoints:
            raise NotFound(f"no inbound endpoint {uid} on this host")
        return {"uid": uid, "state": "active"}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, name="test-loop", daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(GUARD)
    lp.close()


def on_loop(lp: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, lp).result(GUARD)


@pytest.fixture
def gateway() -> Gateway:
    return Gateway()


@pytest.fixture
def make_server(
    pki: PKI, loop: asyncio.AbstractEventLoop, gateway: Gateway
) -> Iterator[Callable[..., PeerServer]]:
    started: List[PeerServer] = []

    def make(
        host: str = "127.0.0.1",
        pair: Pair | None = None,
        client_ca: Path | None = None,
        require_client_cert: bool = False,
        **kw: Any,
    ) -> PeerServer:
        pair = pair or pki.server
        srv = PeerServer(
            ipaddress.ip_address(host), 0, pair.cert, pair.key, client_ca, gateway,
            require_client_cert=require_client_cert, **kw,
        )
        on_loop(loop, srv.start())
        started.append(srv)
        return srv

    yield make
    for srv in started:
        on_loop(loop, srv.stop())


@pytest.fixture
def server(make_server: Callable[..., PeerServer]) -> PeerServer:
    return make_server()


def https(
    srv: PeerServer,
    pki: PKI,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Dict[str, str] | None = None,
    client: Pair | None = None,
) -> Tuple[int, Dict[str, str], bytes]:
    """A hand-made HTTPS request (http.client: full control over headers)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.address.port, context=ctx, timeout=GUARD)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def claim(srv: PeerServer, pki: PKI, uid: str = UID, **kw: Any) -> PeerEndpoint:
    kw.setdefault("trust_file", pki.ca)
    kw.setdefault("timeout", GUARD)
    return claim_endpoint(srv.address, uid, **kw)


def peer_threads() -> List[threading.Thread]:
    """Threads of the peer port's server: there are none (it runs on the event loop)."""
    return [t for t in threading.enumerate() if t.name.startswith("scistreamd-peer")]


# ---------------------------------------------------------------------------
# claims


def test_claim_returns_parsed_endpoint(server: PeerServer, pki: PKI, gateway: Gateway) -> None:
    ep = claim(server, pki)
    assert ep.uid == UID
    assert [str(h) for h in ep.listeners] == ["192.168.150.1:5100", "[2001:db8::1]:5101"]
    assert all(isinstance(h, HostPort) for h in ep.listeners)
    assert ep.psk == PSK
    assert ep.cipher_suites == SUITES
    assert PSK not in repr(ep)  # the key never shows up in logs
    # No client certificate: the claimant is just the peer's address.
    assert not gateway.identities[UID].verified
    ip, _, port = gateway.claims[UID].partition(":")
    assert ip == "127.0.0.1" and port.isdigit()


def test_claim_sends_listeners_and_a_wrong_one_keeps_the_key(
    server: PeerServer, pki: PKI, gateway: Gateway
) -> None:
    wrong = HostPort(ipaddress.ip_address("192.168.150.1"), 5999)
    with pytest.raises(PeerRejected, match="not listeners"):
        claim(server, pki, listeners=[wrong])
    assert UID not in gateway.claims  # the one claim is not used up
    right = HostPort(ipaddress.ip_address("192.168.150.1"), 5100)
    assert claim(server, pki, listeners=[right]).psk == PSK


def test_claim_refuses_unknown_fields_and_bad_listeners(server: PeerServer, pki: PKI) -> None:
    for body in (b'{"listeners": ["1.2.3.4:5100\\nx"]}', b'{"listeners": "x"}', b'{"nope": 1}'):
        status, _headers, data = https(
            server, pki, "POST", f"/v1/endpoints/{UID}/claim", body,
            {"Content-Length": str(len(body)), "Content-Type": "application/json"},
        )
        assert status == 400, data


def test_endpoint_state(server: PeerServer, pki: PKI) -> None:
    assert endpoint_state(server.address, UID, trust_file=pki.ca, timeout=GUARD) == "active"
    with pytest.raises(NotFound):
        endpoint_state(server.address, str(uuid.uuid4()), trust_file=pki.ca, timeout=GUARD)


@pytest.mark.parametrize("answer, outcome", [
    ({"state": "active", "key_generation": 5}, EndpointState(UID, "active", 5)),
    ({"state": "active"}, EndpointState(UID, "active", 0)),  # a peer of an earlier version
    ({"state": "active", "key_generation": "5"}, "key_generation"),
    ({"state": "active", "key_generation": 1, "uid": UID2}, f"for endpoint {UID2}, not {UID}"),
])
def test_endpoint_info_carries_the_key_generation(server: PeerServer, pki: PKI,
                                                  gateway: Gateway, answer: Dict[str, Any],
                                                  outcome: Any) -> None:
    async def state(uid: str) -> Dict[str, Any]:
        return {"uid": uid, **answer}

    gateway.endpoint_state = state  # type: ignore[method-assign]
    client = PeerClient(trust_file=pki.ca, timeout=GUARD)
    if isinstance(outcome, EndpointState):
        assert client.endpoint_info(server.address, UID) == outcome
    else:
        with pytest.raises(PeerRejected, match=outcome):
            client.endpoint_info(server.address, UID)


def test_uid_is_canonicalised_before_asking(server: PeerServer, pki: PKI) -> None:
    assert claim(server, pki, UID.upper()).uid == UID


def test_second_claim_is_refused(server: PeerServer, pki: PKI, gateway: Gateway) -> None:
    claim(server, pki)
    with pytest.raises(PeerRejected, match="already claimed"):
        claim(server, pki)
    # Other endpoints are unaffected.
    assert claim(server, pki, UID2).uid == UID2


def test_unknown_uid_is_not_found(server: PeerServer, pki: PKI) -> None:
    with pytest.raises(NotFound, match=UNKNOWN_UID):
        claim(server, pki, UNKNOWN_UID)


def test_bad_uid_in_path_is_400(server: PeerServer, pki: PKI, gateway: Gateway) -> None:
    status, hdrs, body = https(server, pki, "POST", "/v1/endpoints/not-a-uid/claim", b"{}",
                               {"Content-Length": "2"})  # fmt: skip
    assert status == 400
    assert json.loads(body)["error"] == "InvalidArgument"
    assert hdrs["content-type"] == "application/json"
    assert not gateway.claims


def test_client_rejects_bad_uid_before_any_traffic(pki: PKI) -> None:
    # Port 1 on loopback: would be PeerUnreachable if anything were sent.
    with pytest.raises(InvalidArgument):
        claim_endpoint(HostPort(LOCAL, 1), "../../etc", trust_file=pki.ca)


def test_trust_pem_takes_precedence(server: PeerServer, pki: PKI) -> None:
    ep = claim(server, pki, trust_pem=pki.ca.read_text(), trust_file=pki.other_ca)
    assert ep.uid == UID


def test_peer_leaf_certificate_can_be_pinned(server: PeerServer, pki: PKI) -> None:
    # Trusting just the peer's own CA-issued certificate (partial chain) works.
    assert claim(server, pki, trust_pem=pki.server.pem).uid == UID


def test_self_signed_peer_certificate(make_server: Any, pki: PKI) -> None:
    srv = make_server(pair=pki.self_signed_server)
    assert claim(srv, pki, trust_file=pki.self_signed_server.cert).uid == UID


def test_health_without_client_certificate_reveals_nothing(server: PeerServer, pki: PKI) -> None:
    assert health(server.address, trust_file=pki.ca, timeout=GUARD) == {"status": "ok"}


def test_health_with_verified_client_certificate(make_server: Any, pki: PKI) -> None:
    for required in (True, False):
        srv = make_server(client_ca=pki.ca, require_client_cert=required)
        assert health(srv.address, trust_file=pki.ca, timeout=GUARD) == {"status": "ok"}
        info = health(srv.address, trust_file=pki.ca, client_cert=pki.client.cert,
                      client_key=pki.client.key, timeout=GUARD)
        assert info["status"] == "ok"
        assert info["version"] == __version__
        assert info["endpoints"] == 2


# ---------------------------------------------------------------------------
# server certificate verification and reachability


def test_untrusted_server_certificate(make_server: Any, pki: PKI, gateway: Gateway) -> None:
    srv = make_server(pair=pki.other_server)
    with pytest.raises(PeerRejected, match="not trusted by .*ca.crt.*--server_cert"):
        claim(srv, pki)
    assert not gateway.claims  # nothing was sent to an unverified server


def test_untrusted_by_given_pem(server: PeerServer, pki: PKI) -> None:
    with pytest.raises(PeerRejected, match="not trusted by the certificate given with"):
        claim(server, pki, trust_pem=pki.other_server.pem)


def test_certificate_for_another_ip(make_server: Any, pki: PKI, gateway: Gateway) -> None:
    srv = make_server(pair=pki.wrong_ip_server)
    with pytest.raises(PeerRejected, match="not valid for 127.0.0.1"):
        claim(srv, pki)
    assert not gateway.claims


def test_nothing_listening_is_unreachable(pki: PKI) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port} is not reachable.*peer_port"):
        claim_endpoint(HostPort(LOCAL, port), UID, trust_file=pki.ca, timeout=GUARD)


def test_unloadable_trust_material(server: PeerServer, pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="--server_cert"):
        claim(server, pki, trust_pem="not a certificate")
    with pytest.raises(InvalidArgument, match="missing.pem"):
        claim(server, pki, trust_file=tmp_path / "missing.pem")
    with pytest.raises(InvalidArgument, match="client certificate"):
        claim(server, pki, client_cert=pki.client.cert, client_key=pki.other_client.key)


# ---------------------------------------------------------------------------
# mTLS


def test_mtls_refuses_client_without_certificate_by_name(
    make_server: Any, pki: PKI, gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    srv = make_server(client_ca=pki.ca, require_client_cert=True)
    with pytest.raises(AccessDenied, match="no client certificate.*peer_cert/peer_key.*trust"):
        claim(srv, pki)
    assert not gateway.claims
    # The raw answer: a named JSON error, not a TLS alert; the claim body was not needed.
    status, _, body = https(srv, pki, "POST", f"/v1/endpoints/{UID}/claim", b"{}",
                            {"Content-Length": "2"})
    assert status == 403 and json.loads(body)["error"] == "AccessDenied"
    # The state check needs the certificate too.
    with pytest.raises(AccessDenied):
        endpoint_state(srv.address, UID, trust_file=pki.ca, timeout=GUARD)
    refusals = [r for r in caplog.records if getattr(r, "MESSAGE_ID", "") == MSG_PEER_REFUSED.hex]
    assert refusals and all("127.0.0.1:" in r.getMessage() for r in refusals)
    assert all(PSK not in r.getMessage() for r in caplog.records)
    # With a trusted certificate afterwards: the claim was not used up.
    assert claim(srv, pki, client_cert=pki.client.cert, client_key=pki.client.key).psk == PSK


def test_mtls_refuses_certificate_from_other_ca(
    make_server: Any, pki: PKI, gateway: Gateway
) -> None:
    for required in (True, False):  # a presented certificate must verify, opt-out or not
        srv = make_server(client_ca=pki.ca, require_client_cert=required)
        with pytest.raises(AccessDenied, match="client certificate"):
            claim(srv, pki, client_cert=pki.other_client.cert,
                  client_key=pki.other_client.key)
        with pytest.raises(AccessDenied, match="client certificate"):
            claim(srv, pki, client_cert=pki.self_signed_server.cert,
                  client_key=pki.self_signed_server.key)
    assert not gateway.claims


def test_mtls_accepts_trusted_client_and_records_identity(
    make_server: Any, pki: PKI, gateway: Gateway
) -> None:
    srv = make_server(client_ca=pki.ca, require_client_cert=True)
    ep = claim(srv, pki, client_cert=pki.client.cert, client_key=pki.client.key)
    assert ep.psk == PSK
    assert gateway.claims[UID].startswith("127.0.0.1:")
    # No subjectAltName: the CN stands in, for the record only.
    assert gateway.claims[UID].endswith(" cert CN=gateway-b")
    ep2 = claim(srv, pki, UID2, client_cert=pki.named_client.cert,
                client_key=pki.named_client.key)
    assert ep2.uid == UID2
    who = gateway.identities[UID2]
    assert who.verified and who.common_name == "gateway-c"
    # ssl prints IPv6 SANs as 0:0:...:1: parsed into addresses, not kept as text.
    assert who.ips == (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
    assert who.dns_names == ("Gw-C.Example.org",)
    assert gateway.claims[UID2].endswith(" cert IP:127.0.0.1,IP:::1,DNS:Gw-C.Example.org")


def test_lab_opt_out_accepts_claims_without_certificate(
    make_server: Any, pki: PKI, gateway: Gateway
) -> None:
    srv = make_server(client_ca=pki.ca, require_client_cert=False)
    assert claim(srv, pki).psk == PSK
    assert not gateway.identities[UID].verified
    assert gateway.claims[UID].partition(":")[0] == "127.0.0.1"
    assert endpoint_state(srv.address, UID, trust_file=pki.ca, timeout=GUARD) == "active"


def test_required_certificate_without_ca_refuses_every_claim_by_name(
    make_server: Any, pki: PKI, gateway: Gateway
) -> None:
    # The daemon's start with a missing peer_trust_file: up, but nobody is authenticated.
    srv = make_server(client_ca=None, require_client_cert=True)
    with pytest.raises(AccessDenied, match="no CA to verify.*peer_trust_file.*reload scistreamd"):
        claim(srv, pki, client_cert=pki.client.cert, client_key=pki.client.key)
    assert not gateway.claims


# ---------------------------------------------------------------------------
# HTTP surface


def test_oversized_body_is_413_and_server_keeps_serving(server: PeerServer, pki: PKI) -> None:
    # Declared too large: refused from the header, before the body is read.
    status, _, body = https(
        server, pki, "POST", f"/v1/endpoints/{UID}/claim", b"{" * 1000,
        {"Content-Length": str(10 * 1024 * 1024)},
    )  # fmt: skip
    assert status == 413
    assert json.loads(body)["error"] == "PayloadTooLarge"
    # A client that really sends the big body still gets the 413 (no reset).
    resp = requests.post(
        f"https://127.0.0.1:{server.address.port}/v1/endpoints/{UID}/claim",
        data=b"x" * (100 * 1024),
        verify=str(pki.ca),
        timeout=GUARD,
    )
    assert resp.status_code == 413
    assert claim(server, pki).uid == UID


@pytest.mark.parametrize(
    "headers, body, status, name",
    [
        ({"Transfer-Encoding": "chunked"}, b"2\r\n{}\r\n0\r\n\r\n", 411, "LengthRequired"),
        ({}, None, 411, "LengthRequired"),
        ({"Content-Length": "2"}, b"[]", 400, "InvalidArgument"),
        ({"Content-Length": "5"}, b"nope!", 400, "InvalidArgument"),
        ({"Content-Length": "-1"}, b"", 400, "InvalidArgument"),
    ],
)
def test_malformed_claim_requests(
    server: PeerServer,
    pki: PKI,
    gateway: Gateway,
    headers: Dict[str, str],
    body: bytes | None,
    status: int,
    name: str,
) -> None:
    got, _, raw = https(server, pki, "POST", f"/v1/endpoints/{UID}/claim", body, headers)
    assert got == status
    assert json.loads(raw)["error"] == name
    assert not gateway.claims


def test_empty_body_means_no_options(server: PeerServer, pki: PKI) -> None:
    status, _, raw = https(server, pki, "POST", f"/v1/endpoints/{UID}/claim", b"",
                           {"Content-Length": "0"})  # fmt: skip
    assert status == 200
    assert json.loads(raw)["psk"] == PSK


@pytest.mark.parametrize(
    "method, path, status, name",
    [
        ("GET", "/", 404, "UnknownPath"),
        ("GET", "/v2/health", 404, "UnknownPath"),
        ("GET", f"/v1/endpoints/{UID}/keys", 404, "UnknownPath"),
        ("POST", f"/v1/endpoints/{UID}", 405, "MethodNotAllowed"),
        ("POST", "/v1/health", 405, "MethodNotAllowed"),
        ("GET", f"/v1/endpoints/{UID}/claim", 405, "MethodNotAllowed"),
        ("BREW", "/v1/health", 405, "MethodNotAllowed"),
    ],
)
def test_unknown_paths_and_methods(
    server: PeerServer, pki: PKI, method: str, path: str, status: int, name: str
) -> None:
    got, hdrs, raw = https(server, pki, method, path)
    assert got == status
    assert json.loads(raw)["error"] == name
    assert hdrs["server"] == "scistreamd"  # no Python/OS version


def test_handler_crash_is_500_without_traceback(
    server: PeerServer, pki: PKI, gateway: Gateway
) -> None:
    gateway.fail = RuntimeError("secret internals at /var/lib/scistream")
    status, _, raw = https(server, pki, "POST", f"/v1/endpoints/{UID}/claim", b"{}",
                           {"Content-Length": "2"})  # fmt: skip
    assert status == 500
    doc = json.loads(raw)
    assert doc["error"] == "Failed"
    assert "secret" not in raw.decode() and "Traceback" not in raw.decode()
    with pytest.raises(PeerRejected, match="HTTP 500"):
        claim(server, pki)


def test_stalled_event_loop_answer_is_busy(make_server: Any, pki: PKI, gateway: Gateway) -> None:
    srv = make_server(timeout=0.3)
    gateway.stall = True
    with pytest.raises(PeerUnreachable, match="busy"):
        claim(srv, pki)


# ---------------------------------------------------------------------------
# robustness


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(GUARD)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_slowloris_does_not_block_claims(server: PeerServer, pki: PKI) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.address.port)) for _ in range(5)]
    try:
        # Half a TLS request line on a finished handshake, too.
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        raw = socket.create_connection(("127.0.0.1", server.address.port))
        half = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        half.sendall(b"POST /v1/endpoints/")
        assert claim(server, pki).uid == UID
        assert health(server.address, trust_file=pki.ca, timeout=GUARD)["status"] == "ok"
        half.close()
    finally:
        for s in idle:
            s.close()


def test_plaintext_garbage_is_dropped(server: PeerServer, pki: PKI) -> None:
    with socket.create_connection(("127.0.0.1", server.address.port)) as s:
        s.sendall(b"GET /v1/health HTTP/1.0\r\nHost: x\r\n\r\n")
        assert _closed_by_server(s)
    with socket.create_connection(("127.0.0.1", server.address.port)) as s:
        s.sendall(bytes(range(256)) * 8)
        assert _closed_by_server(s)
    assert claim(server, pki).uid == UID


def test_connection_limit(make_server: Any, pki: PKI) -> None:
    srv = make_server(max_connections=1)
    hog = socket.create_connection(("127.0.0.1", srv.address.port))
    try:
        # The slot is taken: the next connection is closed at once.
        with pytest.raises((PeerRejected, PeerUnreachable)):
            claim(srv, pki)
    finally:
        hog.close()
    # Once the hog is gone its slot comes back (the worker notices the EOF).
    deadline = time.monotonic() + GUARD
    while True:
        try:
            assert claim(srv, pki).uid == UID
            break
        except (PeerRejected, PeerUnreachable):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_per_connection_deadline_closes_slow_clients(make_server: Any, pki: PKI) -> None:
    srv = make_server(timeout=0.2)
    with socket.create_connection(("127.0.0.1", srv.address.port)) as s:
        assert _closed_by_server(s)
    assert claim(srv, pki).uid == UID


def test_dripping_client_is_cut_at_the_connection_deadline(make_server: Any, pki: PKI) -> None:
    # Each byte arrives well within the per-read timeout, but the whole
    # connection may last at most 3 * timeout.
    srv = make_server(timeout=0.3)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    raw = socket.create_connection(("127.0.0.1", srv.address.port))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.settimeout(GUARD)
        tls.sendall(b"GET /v1/health HTTP/1.1\r\n")
        deadline = time.monotonic() + GUARD
        cut = False
        while time.monotonic() < deadline:
            try:
                tls.sendall(b"X-Drip: y\r\n")
            except OSError:
                cut = True
                break
            time.sleep(0.05)
        assert cut
    assert claim(srv, pki).uid == UID


def test_tls_versions(server: PeerServer, pki: PKI) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection("127.0.0.1", server.address.port, context=ctx)
    conn.request("GET", "/v1/health")
    assert conn.getresponse().status == 200
    assert conn.sock is None or conn.sock.version() == "TLSv1.2"
    conn.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # old TLS is the point here
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cafile=str(pki.ca))
        old.set_ciphers("ALL:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        raw = socket.create_connection(("127.0.0.1", server.address.port))
        with raw, pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")


def test_ipv6_loopback(make_server: Any, pki: PKI) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    srv = make_server(host="::1")
    assert str(srv.address).startswith("[::1]:")
    assert claim(srv, pki).uid == UID


# ---------------------------------------------------------------------------
# a peer that answers garbage


GOOD = {"uid": UID, "listeners": ["192.168.150.1:5100"], "psk": PSK, "cipher_suites": SUITES}


def _with(**changes: Any) -> bytes:
    doc = dict(GOOD)
    for k, v in changes.items():
        if v is None:
            del doc[k]
        else:
            doc[k] = v
    return json.dumps(doc).encode()


class RawTLSServer:
    """A TLS server that answers every connection with fixed bytes."""

    def __init__(self, pki: PKI, answer: bytes) -> None:
        self.answer = answer
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="test-raw-tls", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                conn.settimeout(GUARD)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self._read_request(tls)
                    tls.sendall(self.answer)
            except OSError:
                pass

    @staticmethod
    def _read_request(tls: ssl.SSLSocket) -> None:
        # Read it whole: closing with unread input would reset the connection.
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = tls.recv(65536)
            if not chunk:
                return
            body += chunk

    def close(self) -> None:
        self.stopping = True
        self.thread.join(GUARD)
        self.sock.close()


def _http(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


GARBAGE = {
    "text": (_http("200 OK", b"not json", "text/plain"), "garbage.*not JSON"),
    "list": (_http("200 OK", b"[1, 2]"), "not a JSON object"),
    "deep-nesting": (_http("200 OK", b"[" * 30000 + b"]" * 30000), "garbage"),
    "other-uid": (_http("200 OK", _with(uid=UID2)), "not the one asked for"),
    "bad-uid": (_http("200 OK", _with(uid="x")), "uid is malformed"),
    "no-psk": (_http("200 OK", _with(psk=None)), "lacks psk"),
    "upper-psk": (_http("200 OK", _with(psk="AB" * 32)), "64 lower-case hex"),
    "psk-newline": (_http("200 OK", _with(psk=PSK + "\n")), "64 lower-case hex"),
    "psk-number": (_http("200 OK", _with(psk=12)), "64 lower-case hex"),
    "no-listeners": (_http("200 OK", _with(listeners=[])), "listeners"),
    "listeners-str": (_http("200 OK", _with(listeners="192.168.150.1:5100")), "listeners"),
    "hostname": (_http("200 OK", _with(listeners=["evil.example:5100"])), "peer listener"),
    "wildcard": (_http("200 OK", _with(listeners=["0.0.0.0:5100"])), "peer listener"),
    "port-0": (_http("200 OK", _with(listeners=["192.168.150.1:0"])), "peer listener"),
    "enull": (_http("200 OK", _with(cipher_suites="eNULL")), "cipher_suites"),
    "injection": (
        _http("200 OK", _with(cipher_suites="TLS_AES_128_GCM_SHA256\nexec = /bin/sh")),
        "cipher_suites",
    ),
    "huge-undeclared": (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b" " * (70 * 1024) + b"{}",
        "more than 65536",
    ),
    "huge-declared": (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}", "99999999-byte"),
    "not-http": (b"SSH-2.0-OpenSSH_9.2\r\n", "closed the connection|garbage"),
    "html-404": (_http("404 Not Found", b"<html>nope</html>", "text/html"), "garbage.*HTTP 404"),
    "teapot": (
        _http("418 I'm a teapot", b'{"error": "Teapot", "message": "\\u001b[31mred"}'),
        "HTTP 418 Teapot",
    ),
    "redirect": (_http("302 Found", b"{}"), "HTTP 302"),
}


@pytest.mark.parametrize("answer, match", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_answers_are_peer_rejected(pki: PKI, answer: bytes, match: str) -> None:
    srv = RawTLSServer(pki, answer)
    try:
        with pytest.raises(PeerRejected, match=match) as err:
            claim_endpoint(HostPort(LOCAL, srv.port), UID, trust_file=pki.ca, timeout=GUARD)
        assert "\x1b" not in str(err.value)  # peer text is cleaned before it is shown
    finally:
        srv.close()


def test_garbage_health_answer(pki: PKI) -> None:
    srv = RawTLSServer(pki, _http("200 OK", b'"ok"'))
    try:
        with pytest.raises(PeerRejected, match="health"):
            health(HostPort(LOCAL, srv.port), trust_file=pki.ca, timeout=GUARD)
    finally:
        srv.close()


# ---------------------------------------------------------------------------
# life cycle


def test_stop_leaves_no_thread_and_closes_port(
    pki: PKI, loop: asyncio.AbstractEventLoop, gateway: Gateway
) -> None:
    before = set(threading.enumerate())
    srv = PeerServer(LOCAL, 0, pki.server.cert, pki.server.key, None, gateway,
                     require_client_cert=False)
    on_loop(loop, srv.start())
    port = srv.address.port
    claim(srv, pki)
    # A connection still open at stop time is cut; the server never had a thread.
    idle = socket.create_connection(("127.0.0.1", port))
    try:
        assert peer_threads() == []
        on_loop(loop, srv.stop())
        assert _closed_by_server(idle)
        assert peer_threads() == []
        assert set(threading.enumerate()) - before == set()
        with pytest.raises(PeerUnreachable):
            claim_endpoint(HostPort(LOCAL, port), UID2, trust_file=pki.ca, timeout=GUARD)
    finally:
        idle.close()
    on_loop(loop, srv.stop())  # idempotent


def test_async_context_manager(pki: PKI, loop: asyncio.AbstractEventLoop, gateway: Gateway) -> None:
    result: Dict[str, Any] = {}

    async def main() -> None:
        async with PeerServer(
            LOCAL, 0, pki.server.cert, pki.server.key, None, gateway, require_client_cert=False,
        ) as srv:
            # The blocking client runs off the loop, as the daemon does it.
            ep = await asyncio.get_running_loop().run_in_executor(
                None, lambda: claim_endpoint(srv.address, UID, trust_file=pki.ca, timeout=GUARD)
            )
            result["ep"] = ep
        result["running"] = srv.running

    on_loop(loop, main())
    assert result["ep"].uid == UID
    assert result["running"] is False
    assert peer_threads() == []


def test_port_in_use_is_a_clear_error(
    pki: PKI, loop: asyncio.AbstractEventLoop, gateway: Gateway
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        srv = PeerServer(LOCAL, port, pki.server.cert, pki.server.key, None, gateway,
                         require_client_cert=False)
        with pytest.raises(ScistreamError, match=f"127.0.0.1:{port}.*in use.*peer_port"):
            on_loop(loop, srv.start())
    assert peer_threads() == []


def test_unreadable_tls_material_is_config_error(
    pki: PKI, loop: asyncio.AbstractEventLoop, gateway: Gateway, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.crt"
    srv = PeerServer(LOCAL, 0, missing, pki.server.key, None, gateway,
                     require_client_cert=True)
    with pytest.raises(ConfigError, match="nope.crt"):
        on_loop(loop, srv.start())
    # Certificate and key that do not belong together.
    srv = PeerServer(LOCAL, 0, pki.server.cert, pki.client.key, None, gateway,
                     require_client_cert=True)
    with pytest.raises(ConfigError, match="key"):
        on_loop(loop, srv.start())
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a CA\n")
    srv = PeerServer(LOCAL, 0, pki.server.cert, pki.server.key, garbage, gateway,
                     require_client_cert=True)
    with pytest.raises(ConfigError, match="ca.pem"):
        on_loop(loop, srv.start())
    assert peer_threads() == []


# ---------------------------------------------------------------------------
# the daemon's choice of client CA, and the packages' self-signed host certificates


def test_client_ca_defaults_to_trust_file_and_tolerates_its_absence(tmp_path: Path) -> None:
    from scistreamd.config import config_from_mapping
    from scistreamd.reloader import peer_client_ca

    trust = tmp_path / "peer-ca.crt"
    cfg = config_from_mapping({"peer_trust_file": str(trust)})
    # A fresh install has no trust file yet: the daemon starts, nobody is authenticated.
    assert peer_client_ca(cfg) is None
    trust.write_text("x")
    assert peer_client_ca(cfg) == trust
    explicit = tmp_path / "clients.crt"
    cfg = config_from_mapping({"peer_trust_file": str(trust), "peer_client_ca": str(explicit)})
    # An explicit CA is used even when missing: loading it then fails the start by name.
    assert peer_client_ca(cfg) == explicit


def test_self_signed_host_certificates_authenticate_each_other(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, gateway: Gateway
) -> None:
    """The packages' setup: each gateway's --generate-cert certificate is the other's trust."""
    from scistreamd import certs

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        certs.generate_host_cert_files(d / "server.crt", d / "server.key", d.name, [LOCAL])
    srv = PeerServer(LOCAL, 0, a / "server.crt", a / "server.key", b / "server.crt", gateway,
                     require_client_cert=True)
    on_loop(loop, srv.start())
    try:
        ep = claim_endpoint(srv.address, UID, trust_file=a / "server.crt",
                            client_cert=b / "server.crt", client_key=b / "server.key",
                            timeout=GUARD)
        assert ep.psk == PSK
        assert gateway.claims[UID].endswith(" cert IP:127.0.0.1")
        # A itself is not trusted as a client by A (its trust is B's certificate).
        with pytest.raises(AccessDenied):
            claim_endpoint(srv.address, UID2, trust_file=a / "server.crt",
                           client_cert=a / "server.crt", client_key=a / "server.key",
                           timeout=GUARD)
    finally:
        on_loop(loop, srv.stop())


# ---------------------------------------------------------------------------
# the error name decides the class; connection shares; concurrent claims


class NamedGateway(Gateway):
    async def claim(self, uid: str, claimant: PeerIdentity, listeners: Any = ()) -> Dict[str, Any]:
        from scistreamd.peerside import _require_listeners

        _require_listeners(uid, listeners, [HostPort(ipaddress.ip_address("192.168.150.1"),
                                                     5100)])
        return await super().claim(uid, claimant, listeners)


def test_wrong_listener_keeps_its_name_and_message(pki: PKI, loop: Any) -> None:
    from scistreamd.errors import WrongListener

    gw = NamedGateway()
    srv = PeerServer(LOCAL, 0, pki.server.cert, pki.server.key, None, gw,
                     require_client_cert=False)
    on_loop(loop, srv.start())
    try:
        wrong = HostPort(ipaddress.ip_address("192.168.150.1"), 5999)
        with pytest.raises(WrongListener, match="5999 is not a listener.*nothing was claimed") \
                as err:
            claim(srv, pki, listeners=[wrong])
        assert "already claimed" not in str(err.value)
        assert not gw.claims
        right = HostPort(ipaddress.ip_address("192.168.150.1"), 5100)
        assert claim(srv, pki, listeners=[right]).psk == PSK
    finally:
        on_loop(loop, srv.stop())


@pytest.mark.parametrize("name, status, cls", [
    ("NotFound", 409, NotFound), ("WrongListener", 404, "WrongListener"),
    ("PeerRejected", 404, PeerRejected), ("AccessDenied", 400, AccessDenied),
    ("InvalidArgument", 403, InvalidArgument), ("Busy", 500, PeerUnreachable),
])
def test_client_class_follows_the_error_name_not_the_status(
    pki: PKI, name: str, status: int, cls: Any
) -> None:
    from scistreamd import errors

    cls = getattr(errors, cls) if isinstance(cls, str) else cls
    body = json.dumps({"error": name, "message": "the fix"}).encode()
    srv = RawTLSServer(pki, _http(f"{status} X", body))
    try:
        with pytest.raises(cls, match="the fix") as err:
            claim_endpoint(HostPort(LOCAL, srv.port), UID, trust_file=pki.ca, timeout=GUARD)
        assert type(err.value) is cls
    finally:
        srv.close()


def test_one_source_cannot_take_every_connection(make_server: Any, pki: PKI) -> None:
    # 127.0.0.2 fills its share with connections that never start TLS; 127.0.0.1 is served.
    srv = make_server(max_per_source=3, max_connections=8)
    hogs = []
    try:
        for _ in range(6):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", srv.address.port))
            hogs.append(s)
        # Beyond its share, the server closes the source's connections at once.
        assert sum(1 for s in hogs[3:] if _closed_by_server(s)) == 3
        assert claim(srv, pki).uid == UID
        assert health(srv.address, trust_file=pki.ca, timeout=GUARD)["status"] == "ok"
    finally:
        for s in hogs:
            s.close()


def test_handshake_deadline_is_short_by_default(make_server: Any, pki: PKI) -> None:
    srv = make_server(timeout=30.0)
    assert srv._handshake_timeout <= 3.0
    with socket.create_connection(("127.0.0.1", srv.address.port)) as s:
        s.settimeout(GUARD)  # guard only: the server closes it after the handshake deadline
        assert _closed_by_server(s)


class DeadPeer:
    """Accepts TCP connections and never answers; counts those open at once."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.open = 0
        self.most = 0
        self.lock = threading.Lock()
        self.conns: List[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
                self.open += 1
                self.most = max(self.most, self.open)
            threading.Thread(target=self._wait, args=(conn,), daemon=True).start()

    def _wait(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(4096):
                pass
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_concurrent_claims_do_not_wait_for_each_other(pki: PKI) -> None:
    from scistreamd.peerclient import PeerClient

    dead = DeadPeer()
    client = PeerClient(trust_file=pki.ca, timeout=5.0)

    async def main() -> List[Any]:
        peer = HostPort(LOCAL, dead.port)
        return await asyncio.gather(*(client.claim_async(peer, UID) for _ in range(30)),
                                    return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert all(isinstance(r, PeerUnreachable) for r in results), results
        # All 30 were at the dead peer at once: none queued behind another.
        assert dead.most == 30
    finally:
        client.close()
        dead.close()


# ---------------------------------------------------------------------------
# client contexts kept between claims


def test_client_context_is_kept_per_peer_and_trust(server: PeerServer, pki: PKI,
                                                   gateway: Gateway, tmp_path: Path) -> None:
    trust = tmp_path / "trust.pem"
    shutil.copy(pki.ca, trust)
    client = PeerClient(trust_file=trust, timeout=GUARD)
    client.health(server.address)
    client.health(server.address)
    assert len(client._contexts) == 1  # the second exchange built none
    client.health(server.address)
    client.claim(server.address, UID, trust_pem=pki.ca.read_text())
    assert len(client._contexts) == 2  # another trust: another context
    # The trust file now names another CA: the next exchange must use it, not a
    # context built from the old content.
    trust.write_text(pki.other_server.pem)
    with pytest.raises(PeerRejected, match="not trusted by"):
        client.health(server.address)
    # A reload pointing at other files (reloader.py sets them) is seen at once too.
    client.trust_file = pki.ca
    assert client.health(server.address)["status"] == "ok"


def test_client_context_cache_is_bounded(pki: PKI) -> None:
    client = PeerClient(trust_file=pki.ca, timeout=GUARD)
    for i in range(_CONTEXTS_KEPT + 5):
        client._context(HostPort(ipaddress.ip_address(f"127.0.0.{i + 1}"), 5000), None)
    assert len(client._contexts) == _CONTEXTS_KEPT


def test_unloadable_trust_is_not_kept(pki: PKI, tmp_path: Path) -> None:
    client = PeerClient(trust_file=tmp_path / "missing.pem", timeout=GUARD)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="missing.pem"):
            client._context(HostPort(LOCAL, 5000), None)
    assert not client._contexts
