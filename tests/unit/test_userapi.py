"""Unit tests of the user API's pure parts and its handler: identities, user_rules,
request bodies, owners in state, the endpoint JSON, user certificates, UserApi."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from scistreamd import certs
from scistreamd.config import config_from_mapping, load_config
from scistreamd.endpoint_json import endpoint_json, iso_time_us, snake_case
from scistreamd.errors import (
    AccessDenied,
    ConfigError,
    InvalidArgument,
    NotFound,
    RelayFailed,
    ScistreamError,
)
from scistreamd.identity import LEGACY_OWNER, Identity, local_identity, parse_owner
from scistreamd.model import Endpoint, HostPort, Role, State
from scistreamd.peerwire import (
    Refusal,
    RequestHead,
    route,
)
from scistreamd.traffic import Traffic
from scistreamd.userapi import UserApi
from scistreamd.usercert import UserCertMatcher, cert_subject
from scistreamd.userrules import (
    inbound_refusal,
    limit_refusal,
    outbound_refusal,
    parse_user_rules,
    rule_for,
)
from scistreamd.userwire import (
    InboundBody,
    OutboundBody,
    parse_bearer,
    user_flags,
    user_route,
)

IP = ipaddress.ip_address
UID = "bd9f1a7e-04d7-41f0-b44c-946dae415862"
ALICE = Identity("token", "sub-alice", "alice@example.org", ("grp-beam7",))
BOB = Identity("token", "sub-bob", "bob@example.org")
ROBOT = Identity("cert", "robot7.example.org")


# -- identity ---------------------------------------------------------------------


def test_owner_strings() -> None:
    assert local_identity(1000).owner == "local:uid=1000"
    assert ALICE.owner == "token:sub-alice" and ROBOT.owner == "cert:robot7.example.org"
    assert str(ALICE) == "token:sub-alice (alice@example.org)"
    assert not local_identity(0).remote and ALICE.remote
    assert Identity("token", "s", groups=["g", "g"]).groups == ("g",)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind,subject", [("oauth", "x"), ("token", ""), ("token", "a b"),
                                          ("token", "x\n"), ("local", "root"),
                                          ("cert", "x" * 256)])
def test_bad_identities(kind: str, subject: str) -> None:
    with pytest.raises(InvalidArgument):
        Identity(kind, subject)


def test_parse_owner() -> None:
    for ok in ("local:uid=0", "token:abc-123", "cert:robot.example.org"):
        assert parse_owner(ok) == ok
    for bad in ("", "local:uid=x", "root", "token:", "token:a b", "oauth:x", 3):
        with pytest.raises(InvalidArgument):
            parse_owner(bad)


# -- user_rules -------------------------------------------------------------------

RULES = [
    {"name": "beam7", "identities": ["group:grp-beam7", "cert:Robot7.Example.org."],
     "inbound_targets": ["10.7.0.0/16 5000-5100"], "outbound": True, "max_endpoints": 2},
    {"name": "bob-out", "identities": ["username:bob@example.org"], "outbound": True,
     "outbound_peers": ["192.168.150.0/24", "2001:db8::/32"]},
    {"name": "alice-late", "identities": ["sub:sub-alice"], "inbound_targets": ["0.0.0.0/0"]},
]


def test_rules_parse_and_first_match_decides() -> None:
    rules = parse_user_rules(RULES)
    assert rules[0].identities[1] == ("cert", "robot7.example.org")  # canonical
    assert rule_for(rules, ALICE).name == "beam7"  # not alice-late: first match decides
    assert rule_for(rules, ROBOT).name == "beam7"
    assert rule_for(rules, BOB).name == "bob-out"
    assert rule_for(rules, Identity("token", "robot7.example.org")) is None  # kinds differ
    assert rule_for(rules, local_identity(0)) is None
    assert rules[1].max_endpoints == 4 and rules[1].inbound_targets == ()


def test_inbound_decisions_name_the_rule() -> None:
    rules = parse_user_rules(RULES)
    assert inbound_refusal(rules, ALICE, [(IP("10.7.1.2"), 5000)]) is None
    why = inbound_refusal(rules, ALICE, [(IP("10.7.1.2"), 5000), (IP("10.7.1.2"), 6000)])
    assert "'beam7'" in why and "10.7.1.2:6000" in why
    why = inbound_refusal(rules, BOB, [(IP("10.7.1.2"), 5000)])
    assert "'bob-out'" in why and "no inbound_targets" in why
    why = inbound_refusal(rules, Identity("cert", "intruder"), [(IP("10.7.1.2"), 5000)])
    assert "no rule of user_rules names" in why and "cert:intruder" in why
    # Loopback stays closed unless the rule names it (targets.py's rule).
    open_rules = parse_user_rules([{"name": "all", "identities": ["sub:x"],
                                    "inbound_targets": ["0.0.0.0/0"]}])
    assert inbound_refusal(open_rules, Identity("token", "x"), [(IP("127.0.0.1"), 22)])


def test_outbound_and_limit_decisions() -> None:
    rules = parse_user_rules(RULES)
    assert outbound_refusal(rules, BOB) is None
    assert outbound_refusal(rules, BOB, [IP("192.168.150.1"), IP("2001:db8::5")]) is None
    why = outbound_refusal(rules, BOB, [IP("192.168.150.1"), IP("10.0.0.1")])
    assert "10.0.0.1" in why and "outbound_peers of rule 'bob-out'" in why
    assert outbound_refusal(rules, ALICE, [IP("10.0.0.1")]) is None  # beam7: any peer
    assert rules[0].outbound_peers is None
    assert "outbound = true" in outbound_refusal(parse_user_rules(RULES[2:]), ALICE)
    assert "no rule" in outbound_refusal(rules, local_identity(5))
    assert limit_refusal(rules, ALICE, 1) is None
    why = limit_refusal(rules, ALICE, 2)
    assert "'beam7'" in why and "at most 2" in why


@pytest.mark.parametrize("rule,text", [
    ({"identities": ["sub:x"]}, "lacks name"),
    ({"name": "r"}, "lacks identities"),
    ({"name": "r", "identities": []}, "identities"),
    ({"name": "r", "identities": ["user:x"]}, "KIND:VALUE"),
    ({"name": "r", "identities": ["sub:x"], "outbund": True}, "unknown keys outbund"),
    ({"name": "r", "identities": ["sub:x"], "outbound": "yes"}, "true or false"),
    ({"name": "r", "identities": ["sub:x"], "max_endpoints": -1}, "max_endpoints"),
    ({"name": "r", "identities": ["sub:x"], "inbound_targets": ["10.0.0.1/8"]}, "host bits"),
    ({"name": "r r", "identities": ["sub:x"]}, "name"),
    ({"name": "r", "identities": ["sub:x"], "outbound_peers": "10.0.0.0/8"}, "array"),
    ({"name": "r", "identities": ["sub:x"], "outbound_peers": ["gw.example.org"]}, "network"),
])
def test_bad_rules_are_named(rule: Dict[str, Any], text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        parse_user_rules([rule])


def test_duplicate_rule_names() -> None:
    with pytest.raises(InvalidArgument, match="unique"):
        parse_user_rules([{"name": "a", "identities": ["sub:x"]},
                          {"name": "a", "identities": ["sub:y"]}])


def test_config_reads_user_rules_as_array_of_tables(tmp_path: Path) -> None:
    main = tmp_path / "scistreamd.toml"
    main.write_text('user_client_ca = "/etc/scistream/users-ca.crt"\n\n'
                    '[[user_rules]]\nname = "beam7"\nidentities = ["cert:robot7.example.org"]\n'
                    'inbound_targets = ["10.7.0.0/16"]\n')
    cfg = load_config(main, tmp_path / "none")
    assert cfg.user_client_ca == Path("/etc/scistream/users-ca.crt")
    assert [r.name for r in cfg.user_rules] == ["beam7"]
    assert config_from_mapping({}).user_rules == () and config_from_mapping({}).user_client_ca \
        is None
    main.write_text('[[user_rules]]\nname = "x"\nidentities = ["nope"]\n')
    with pytest.raises(ConfigError, match=r"user_rules.*KIND:VALUE"):
        load_config(main, tmp_path / "none")
    main.write_text('user_rules = "everyone"\n')
    with pytest.raises(ConfigError, match=r"\[\[user_rules\]\]"):
        load_config(main, tmp_path / "none")


# -- request bodies, bearer, routes -------------------------------------------------


def test_inbound_body() -> None:
    b = InboundBody.from_json({"remote_ip": "10.7.0.5", "receiver_ports": [5000, 5001],
                               "num_conn": 2, "allowed_peer": "192.168.150.2"})
    assert b == InboundBody(IP("10.7.0.5"), (5000, 5001), 2, "192.168.150.2")
    assert InboundBody.from_json(b.to_json()) == b


@pytest.mark.parametrize("doc,text", [
    ([], "JSON object"),
    ({"remote_ip": "10.0.0.1", "receiver_ports": [1], "num_conn": 1, "psk": "x"},
     "unknown inbound request fields: psk"),
    ({"remote_ip": "10.0.0.1", "receiver_ports": [1]}, "lacks num_conn"),
    ({"remote_ip": "10.0.0.1", "receiver_ports": [True], "num_conn": 1}, "array of port"),
    ({"remote_ip": "10.0.0.1", "receiver_ports": "5000", "num_conn": 1}, "array of port"),
    ({"remote_ip": "10.0.0.1", "receiver_ports": [5000], "num_conn": "1"}, "JSON integer"),
    ({"remote_ip": "host.example", "receiver_ports": [5000], "num_conn": 1}, "remote_ip"),
    ({"remote_ip": 10, "receiver_ports": [5000], "num_conn": 1}, "remote_ip"),
])
def test_bad_inbound_bodies(doc: Any, text: str) -> None:
    with pytest.raises(InvalidArgument, match=text):
        InboundBody.from_json(doc)


def test_outbound_body() -> None:
    doc = {"uid": UID.upper(), "remote_listeners": ["192.168.150.1:5100"], "num_conn": 1,
           "peer": "192.168.150.1:5000"}
    b = OutboundBody.from_json(doc)
    assert b.uid == UID and b.remote_listeners == (HostPort(IP("192.168.150.1"), 5100),)
    assert b.options() == {"peer": "192.168.150.1:5000"} and b.local_ports == ()
    assert OutboundBody.from_json(b.to_json()) == b
    with pytest.raises(InvalidArgument, match="unknown outbound request fields: psk"):
        OutboundBody.from_json({**doc, "psk": "x"})
    with pytest.raises(InvalidArgument, match="trust_pem"):
        OutboundBody.from_json({**doc, "trust_pem": 5})
    assert "trust_pem" not in repr(OutboundBody.from_json({**doc, "trust_pem": "PEM"}))


def test_parse_bearer() -> None:
    assert parse_bearer([]) == ""
    assert parse_bearer(["Bearer abc.DEF-123"]) == "abc.DEF-123"
    assert parse_bearer(["bearer  tok"]) == "tok"
    for bad in (["Basic dXNlcjpwdw=="], ["Bearer"], ["Bearer a b"], ["Bearer x", "Bearer y"]):
        with pytest.raises(InvalidArgument) as e:
            parse_bearer(bad)
        assert "dXNlcjpwdw" not in str(e.value)


def test_user_routes() -> None:
    assert route("/v1/tunnels") == ("user", "") and route("/v1/tunnels/x") == ("user", "")
    assert route("/v1/tunnels/a/b") == ("", "")
    assert user_route("GET", "/v1/tunnels") == ("list", "")
    assert user_route("POST", "/v1/tunnels/inbound") == ("inbound", "")
    assert user_route("POST", "/v1/tunnels/outbound") == ("outbound", "")
    assert user_route("DELETE", f"/v1/tunnels/{UID}") == ("tunnel", UID)
    with pytest.raises(Refusal) as e:
        user_route("POST", "/v1/tunnels")
    assert e.value.name == "MethodNotAllowed" and e.value.status == 405
    with pytest.raises(Refusal) as e:
        user_route("GET", "/v1/tunnels/")
    assert e.value.name == "UnknownPath"


def test_user_flags() -> None:
    assert user_flags("inbound", "POST", "/v1/tunnels/inbound") == frozenset()
    assert user_flags("inbound", "POST", "/v1/tunnels/inbound?early=1") == {"early"}
    assert user_flags("inbound", "POST", "/v1/tunnels/inbound?early=0") == frozenset()
    assert user_flags("tunnel", "GET", f"/v1/tunnels/{UID}?wait=1") == {"wait"}
    for name, method, target, text in [
            ("inbound", "POST", "/v1/tunnels/inbound?wait=1", "unknown query parameter 'wait'"),
            ("tunnel", "DELETE", f"/v1/tunnels/{UID}?wait=1", "known: none"),
            ("list", "GET", "/v1/tunnels?early=1", "unknown query parameter"),
            ("inbound", "POST", "/v1/tunnels/inbound?early=yes", "early=1 or early=0"),
            ("inbound", "POST", "/v1/tunnels/inbound?early", "early=1 or early=0"),
            ("inbound", "POST", "/v1/tunnels/inbound?early=1&early=1", "given once"),
            ("inbound", "POST", "/v1/tunnels/inbound?early=1&", "unknown query parameter ''")]:
        with pytest.raises(InvalidArgument, match=text):
            user_flags(name, method, target)


# -- owners in state, endpoint JSON ---------------------------------------------------


def _endpoint(owner: str = LEGACY_OWNER, uid: str = UID) -> Endpoint:
    return Endpoint(uid=uid, role=Role.INBOUND,
                    listeners=(HostPort(IP("192.168.150.1"), 5100),),
                    targets=(HostPort(IP("10.7.0.5"), 5000),), num_conn=1,
                    created_at=1_700_000_000.25, owner=owner)


def test_owner_is_persisted_and_old_records_load_as_legacy() -> None:
    ep = _endpoint("cert:robot7.example.org")
    d = ep.to_dict()
    assert Endpoint.from_dict(d).owner == "cert:robot7.example.org"
    del d["owner"]
    assert Endpoint.from_dict(d).owner == LEGACY_OWNER == "local:uid=0"
    with pytest.raises(InvalidArgument):
        Endpoint.from_dict({**d, "owner": "root"})


def test_endpoint_json() -> None:
    assert snake_case("NRestarts") == "n_restarts" and snake_case("MainPID") == "main_pid"
    assert iso_time_us(0) is None and iso_time_us(1_700_000_000_250_000) == \
        "2023-11-14T22:13:20.250Z"
    doc = endpoint_json({"Uid": UID, "StateDetail": "", "CreatedAt": 1_700_000_000_250_000,
                         "ClaimedAt": 0, "Listeners": ("a",), "Owner": "local:uid=0"})
    assert doc == {"uid": UID, "state_detail": "", "created_at": "2023-11-14T22:13:20.250Z",
                   "claimed_at": None, "listeners": ["a"], "owner": "local:uid=0"}


# -- user certificates ---------------------------------------------------------------


def test_user_cert_matcher(tmp_path: Path) -> None:
    user_ca, peer_ca, other_ca = (certs.make_ca(n) for n in ("users", "peers", "other"))
    (tmp_path / "users.pem").write_bytes(user_ca.cert_pem())
    (tmp_path / "peers.pem").write_bytes(peer_ca.cert_pem())
    m = UserCertMatcher(tmp_path / "users.pem", tmp_path / "peers.pem")

    def der(pair: certs.KeyPair) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return pair.cert.public_bytes(serialization.Encoding.DER)

    robot = certs.make_host_cert("cn-robot", [], ["Robot7.Example.org"], issuer=user_ca)
    assert m.identity_of(der(robot)) == Identity("cert", "robot7.example.org")
    assert not m.peer_ca_issued(der(robot))
    by_ip = certs.make_host_cert("cn", [IP("10.0.0.9")], issuer=user_ca)
    assert cert_subject(by_ip.cert) == "10.0.0.9"
    gateway = certs.make_host_cert("gw", [IP("192.168.150.2")], issuer=peer_ca)
    assert m.identity_of(der(gateway)) is None and m.peer_ca_issued(der(gateway))
    # Same subject name, other key: the signature decides, not the issuer's name.
    impostor_ca = certs.make_ca("users")
    fake = certs.make_host_cert("cn", [], ["robot7.example.org"], issuer=impostor_ca)
    assert m.identity_of(der(fake)) is None
    assert m.identity_of(der(certs.make_host_cert("x", [], ["x.org"], issuer=other_ca))) is None
    assert m.identity_of(b"garbage") is None
    (tmp_path / "bad.pem").write_text("no certificate here")
    with pytest.raises(ConfigError, match="user_client_ca"):
        UserCertMatcher(tmp_path / "bad.pem", None)


# -- the handler, with a fake manager and verifier ------------------------------------


class FakeManager:
    def __init__(self) -> None:
        self.endpoints: Dict[Any, Endpoint] = {}
        self.calls: List[str] = []

    def list(self) -> List[Endpoint]:
        return list(self.endpoints.values())

    def traffic(self, ep: Endpoint) -> Traffic:
        return Traffic(bytes_in=1234)

    async def inbound_request(self, ip: Any, ports: Any, n: Any, opts: Any, *,
                              owner: str) -> Endpoint:
        early = opts.get("early", False)
        self.calls.append(f"inbound {ip} {ports} {owner}" + (" early" if early else ""))
        ep = _endpoint(owner, f"{len(self.endpoints):08d}-04d7-41f0-b44c-946dae415862")
        ep.state = State.STARTING if early else State.ACTIVE
        self.endpoints[ep.key] = ep
        return ep

    async def settled(self, uid: str, owner: str) -> None:
        self.calls.append(f"settled {uid} {owner}")
        ep = self.endpoints.get((uid, Role.INBOUND))
        if ep is not None and ep.owner == owner:
            del self.endpoints[ep.key]  # as a start that failed: rolled back
            raise RelayFailed(f"the relay of {uid} failed to start")

    async def outbound_request(self, *a: Any, owner: str) -> Endpoint:
        raise AssertionError("not in these tests")

    async def release(self, uid: str, role: Optional[Role] = None) -> List[Endpoint]:
        self.calls.append(f"release {uid}")
        return [self.endpoints.pop((uid, role))]


class FakeVerifier:
    async def verify(self, token: str) -> Identity:
        if token == "alice-token":
            return ALICE
        if token == "bob-token":
            return BOB
        if token == "when-down":
            raise Unavailable("the introspection endpoint cannot be reached")
        raise AccessDenied("the token is not active")


class Unavailable(ScistreamError):
    name = "AuthUnavailable"


def _req(method: str, target: str, token: str = "") -> RequestHead:
    headers = (("authorization", f"Bearer {token}"),) if token else ()
    return RequestHead(method, target, headers)


def _ask(api: UserApi, method: str, target: str, body: Any = None, token: str = "",
         cert: Optional[Identity] = None) -> Any:
    import json

    async def read() -> bytes:
        return json.dumps(body).encode()

    return asyncio.run(api.answer(_req(method, target, token), read, cert, "10.0.0.1:1234"))


def test_user_api_with_tokens_and_rules() -> None:
    m = FakeManager()
    api = UserApi(m, parse_user_rules(RULES), FakeVerifier())  # type: ignore[arg-type]
    body = {"remote_ip": "10.7.0.5", "receiver_ports": [5000], "num_conn": 1}
    status, doc = _ask(api, "POST", "/v1/tunnels/inbound", body, "alice-token")
    assert status == 201 and doc["endpoint"]["owner"] == "token:sub-alice"
    uid = doc["uid"]
    assert doc["listeners"] == ["192.168.150.1:5100"] and doc["endpoint"]["uid"] == uid
    # Bob sees nothing of Alice's; her uid is NotFound for him, as an unknown one.
    assert _ask(api, "GET", "/v1/tunnels", token="bob-token") == (200, {"tunnels": []})
    for method in ("GET", "DELETE"):
        with pytest.raises(NotFound, match="of yours"):
            _ask(api, method, f"/v1/tunnels/{uid}", token="bob-token")
    # Bob's rule has no inbound targets; nothing reaches the manager.
    with pytest.raises(AccessDenied, match="bob-out"):
        _ask(api, "POST", "/v1/tunnels/inbound", body, "bob-token")
    assert len(m.calls) == 1
    # Alice's limit is 2.
    _ask(api, "POST", "/v1/tunnels/inbound", body, "alice-token")
    with pytest.raises(AccessDenied, match="at most 2"):
        _ask(api, "POST", "/v1/tunnels/inbound", body, "alice-token")
    listed = _ask(api, "GET", "/v1/tunnels", token="alice-token")[1]["tunnels"]
    assert len(listed) == 2
    assert _ask(api, "DELETE", f"/v1/tunnels/{uid}", token="alice-token") == \
        (200, {"released": 1})
    assert m.calls[-1] == f"release {uid}"


def test_user_api_early_inbound_and_the_wait_for_its_start() -> None:
    m = FakeManager()
    api = UserApi(m, parse_user_rules(RULES), FakeVerifier())  # type: ignore[arg-type]
    body = {"remote_ip": "10.7.0.5", "receiver_ports": [5000], "num_conn": 1}
    status, doc = _ask(api, "POST", "/v1/tunnels/inbound?early=1", body, "alice-token")
    assert status == 201 and doc["endpoint"]["state"] == "starting"
    uid = doc["uid"]
    assert m.calls == [f"inbound 10.7.0.5 [5000] {ALICE.owner} early"]
    with pytest.raises(InvalidArgument, match="unknown query parameter 'wait'"):
        _ask(api, "POST", "/v1/tunnels/inbound?wait=1", body, "alice-token")
    assert len(m.calls) == 1
    # The wait is asked for the caller's own endpoints only; the failure comes by name.
    with pytest.raises(NotFound, match="of yours"):
        _ask(api, "GET", f"/v1/tunnels/{uid}?wait=1", token="bob-token")
    with pytest.raises(RelayFailed, match="failed to start"):
        _ask(api, "GET", f"/v1/tunnels/{uid}?wait=1", token="alice-token")
    assert m.calls[1:] == [f"settled {uid} {BOB.owner}", f"settled {uid} {ALICE.owner}"]


def test_user_api_refuses_without_credentials() -> None:
    api = UserApi(FakeManager(), (), FakeVerifier(), certs=True)  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="no credentials") as e:
        _ask(api, "GET", "/v1/tunnels")
    assert e.value.http_status == 401
    with pytest.raises(AccessDenied, match="not active") as e:
        _ask(api, "GET", "/v1/tunnels", token="stolen-token")
    assert "stolen-token" not in str(e.value) and e.value.http_status == 401
    # Authenticated, but no rule names it: may do nothing (the default): not create...
    with pytest.raises(AccessDenied, match="no rule of user_rules"):
        _ask(api, "POST", "/v1/tunnels/inbound",
             {"remote_ip": "10.7.0.5", "receiver_ports": [5000], "num_conn": 1},
             cert=ROBOT)
    # ... not even list.
    with pytest.raises(AccessDenied, match="no rule of user_rules"):
        _ask(api, "GET", "/v1/tunnels", cert=ROBOT)
    # The verifier cannot check: its named error, fail closed (no identity, nothing done).
    with pytest.raises(Unavailable):
        _ask(api, "GET", "/v1/tunnels", token="when-down")
    no_tokens = UserApi(FakeManager(), ())  # type: ignore[arg-type]
    with pytest.raises(AccessDenied, match="accepts no bearer tokens"):
        _ask(no_tokens, "GET", "/v1/tunnels", token="alice-token")


def test_the_user_api_shows_every_property_the_d_bus_object_has() -> None:
    """One list of an endpoint's properties for both faces: the D-Bus object's getters
    and endpoint_properties (the user API's answers) agree on names and values."""
    from types import SimpleNamespace

    from scistreamd.dbus_api import EndpointObject
    from scistreamd.endpoint_json import endpoint_properties
    from scistreamd.interface import ENDPOINT

    ep = _endpoint("cert:robot-a.example.org", "0badc0de-04d7-41f0-b44c-946dae415862")
    ep.key_generation = 3
    ep.claimed_by = "192.168.150.2:40000 cert IP:192.168.150.2"
    traffic = Traffic(bytes_in=10, bytes_out=20, connections_active=1, rate_in=2.5)
    obj = EndpointObject(SimpleNamespace(manager=SimpleNamespace(traffic=lambda _ep: traffic)),
                         ep)
    props = endpoint_properties(ep, traffic)
    assert set(props) == set(ENDPOINT.properties)
    assert props == {name: getattr(obj, name) for name in ENDPOINT.properties}
    assert props["RateIn"] == 2 and props["KeyGeneration"] == 3
