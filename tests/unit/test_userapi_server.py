"""The user API through the real peer server over real TLS on 127.0.0.1: statuses,
headers, user certificates (and that they claim nothing), tokens via a verifier.

Reuses test_peer.py's throw-away PKI and server-on-a-loop fixtures and
test_userapi.py's fake manager and verifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple

import pytest

from scistreamd import certs
from scistreamd.peerserver import PeerServer
from scistreamd.userapi import UserApi
from scistreamd.usercert import UserCertMatcher
from scistreamd.userrules import parse_user_rules
from tests.unit import test_peer
from tests.unit.test_peer import PKI, UID, Pair, https
from tests.unit.test_userapi import FakeManager, FakeVerifier

# test_peer's fixtures, used here by name.
pki, loop, gateway, make_server = (test_peer.pki, test_peer.loop, test_peer.gateway,
                                   test_peer.make_server)

ROBOT = "robot7.example.org"
RULES = parse_user_rules([
    {"name": "robots", "identities": [f"cert:{ROBOT}", "username:alice@example.org"],
     "inbound_targets": ["10.7.0.0/16"], "outbound": True},
])
BODY = json.dumps({"remote_ip": "10.7.0.5", "receiver_ports": [5000], "num_conn": 1}).encode()


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Pair]:
    d = tmp_path_factory.mktemp("users")
    ca = certs.make_ca("users CA")
    (d / "ca.pem").write_bytes(ca.cert_pem())
    robot = certs.make_host_cert("robot", [], [ROBOT], issuer=ca)
    certs.write_pair(robot, d / "robot.crt", d / "robot.key")
    return d / "ca.pem", Pair(d / "robot.crt", d / "robot.key")


@pytest.fixture
def user_server(make_server: Callable[..., PeerServer], pki: PKI,
                users: Tuple[Path, Pair]) -> Iterator[Tuple[PeerServer, FakeManager]]:
    manager = FakeManager()
    api = UserApi(manager, RULES, FakeVerifier(), certs=True)  # type: ignore[arg-type]
    srv = make_server(client_ca=pki.ca, require_client_cert=True, user_api=api,
                      user_certs=UserCertMatcher(users[0], pki.ca))
    yield srv, manager


def _doc(body: bytes) -> Dict[str, Any]:
    return json.loads(body)


def test_no_credentials_is_401_with_a_bearer_challenge(user_server: Any, pki: PKI) -> None:
    srv, manager = user_server
    status, headers, body = https(srv, pki, "POST", "/v1/tunnels/inbound", BODY,
                                  {"Content-Length": str(len(BODY))})
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert _doc(body)["error"] == "AccessDenied" and "no credentials" in _doc(body)["message"]
    # A peer daemon's certificate is not a user's.
    status, _h, body = https(srv, pki, "GET", "/v1/tunnels", client=pki.client)
    assert status == 401 and _doc(body)["error"] == "AccessDenied"
    assert manager.calls == []


def test_user_certificate_creates_and_lists(user_server: Any, pki: PKI,
                                            users: Tuple[Path, Pair]) -> None:
    srv, manager = user_server
    status, headers, body = https(srv, pki, "POST", "/v1/tunnels/inbound", BODY,
                                  {"Content-Length": str(len(BODY))}, client=users[1])
    assert status == 201, body
    doc = _doc(body)
    assert doc["endpoint"]["owner"] == f"cert:{ROBOT}" and headers["cache-control"] == "no-store"
    status, _h, body = https(srv, pki, "GET", "/v1/tunnels", client=users[1])
    assert status == 200 and [t["uid"] for t in _doc(body)["tunnels"]] == [doc["uid"]]
    # The same identity by token sees none of them (another owner).
    status, _h, body = https(srv, pki, "GET", "/v1/tunnels",
                             headers={"Authorization": "Bearer alice-token"})
    assert status == 200 and _doc(body) == {"tunnels": []}


def test_wrong_method_keeps_its_allow_header(user_server: Any, pki: PKI,
                                             users: Tuple[Path, Pair]) -> None:
    srv, _m = user_server
    status, headers, body = https(srv, pki, "PUT", "/v1/tunnels/inbound", b"{}",
                                  {"Content-Length": "2"}, client=users[1])
    assert status == 405 and headers["allow"] == "POST"
    assert _doc(body)["error"] == "MethodNotAllowed"


def test_a_user_certificate_claims_nothing(user_server: Any, pki: PKI,
                                           users: Tuple[Path, Pair]) -> None:
    srv, _m = user_server
    status, _h, body = https(srv, pki, "POST", f"/v1/endpoints/{UID}/claim", b"{}",
                             {"Content-Length": "2"}, client=users[1])
    assert status == 403 and _doc(body)["error"] == "AccessDenied"
    status, _h, body = https(srv, pki, "POST", f"/v1/endpoints/{UID}/claim", b"{}",
                             {"Content-Length": "2"}, client=pki.client)
    assert status == 200 and _doc(body)["uid"] == UID


def test_without_a_user_api_the_paths_are_unknown(make_server: Callable[..., PeerServer],
                                                  pki: PKI) -> None:
    srv = make_server()
    status, _h, body = https(srv, pki, "GET", "/v1/tunnels")
    assert status == 404 and _doc(body)["error"] == "UnknownPath"
