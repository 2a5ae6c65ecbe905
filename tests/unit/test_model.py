"""Unit tests of scistreamd.model: parsers, Endpoint."""

from __future__ import annotations

import json
import re
import uuid
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from scistreamd.errors import InvalidArgument
from scistreamd.model import (
    Endpoint,
    HostPort,
    Role,
    State,
    new_uid,
    parse_allowed_peer,
    parse_hostport,
    parse_hostport_list,
    parse_ip,
    parse_num_conn,
    parse_options,
    parse_port,
    parse_port_list,
    parse_role,
    parse_state,
    parse_uid,
    split_list,
)
from scistreamd.peerident import PeerIdentity, peer_matches

UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"  # the guide's (UUID1) uid


def hp(text: str) -> HostPort:
    return parse_hostport(text, "test")


# --- enums -------------------------------------------------------------------


def test_role_values_and_upstream_names() -> None:
    assert Role.INBOUND.value == "inbound" and Role.INBOUND.upstream == "PROD"
    assert Role.OUTBOUND.value == "outbound" and Role.OUTBOUND.upstream == "CONS"
    assert Role("inbound") is Role.INBOUND
    assert str(Role.OUTBOUND) == "outbound"


def test_state_values() -> None:
    assert [s.value for s in State] == ["starting", "active", "failed", "releasing"]


@pytest.mark.parametrize("bad", ["INBOUND", "PROD", "", None, 1, " inbound"])
def test_parse_role_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="inbound"):
        parse_role(bad)


def test_parse_state() -> None:
    assert parse_state("failed") is State.FAILED
    with pytest.raises(InvalidArgument):
        parse_state("dead")


# --- IP addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("192.168.150.1", IPv4Address("192.168.150.1")),
        ("127.0.0.1", IPv4Address("127.0.0.1")),
        ("::1", IPv6Address("::1")),
        ("2001:DB8::1", IPv6Address("2001:db8::1")),
        ("::ffff:192.168.150.1", IPv6Address("::ffff:192.168.150.1")),
    ],
)
def test_parse_ip_good(text: str, expected: object) -> None:
    assert parse_ip(text, "remote_ip") == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "localhost",
        "server1.example.org",
        "192.168.150",
        "192.168.150.256",
        "192.168.150.1 ",
        " 192.168.150.1",
        "192.168.150.1\n",
        "192.168.150.1\x00",
        "fe80::1%eth0",
        "fe80::1%\nfoo",
        "[::1]",
        "192.168.150.1/24",
        "1" * 100,
        "١٢٧.0.0.1",  # non-ASCII digits
        b"127.0.0.1",
        None,
        2130706433,
        True,
        ["127.0.0.1"],
    ],
)
def test_parse_ip_bad(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="remote_ip"):
        parse_ip(bad, "remote_ip")


@pytest.mark.parametrize("bad", ["0.0.0.0", "::", "224.0.0.1", "ff02::1"])
def test_parse_ip_rejects_non_unicast_by_default(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="unicast"):
        parse_ip(bad, "remote_ip")
    assert parse_ip(bad, "x", unicast=False) == ip_address(bad)


def test_parse_ip_error_truncates_long_values() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_ip("x" * 1000, "remote_ip")
    assert len(str(info.value)) < 300
    assert "\n" not in str(info.value)


def test_parse_ip_error_shows_control_chars_escaped() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_ip("1.2.3.4\nfoo", "remote_ip")
    assert "\n" not in str(info.value) and "\\n" in str(info.value)


@given(st.ip_addresses())
def test_parse_ip_roundtrips_any_address(addr: object) -> None:
    assert parse_ip(str(addr), "a", unicast=False) == addr


@given(st.text(max_size=60))
def test_parse_ip_never_crashes(text: str) -> None:
    try:
        addr = parse_ip(text, "a")
    except InvalidArgument:
        return
    assert set(str(addr)) <= set("0123456789abcdef.:")


# --- ports -------------------------------------------------------------------


@pytest.mark.parametrize("good,expected", [(1, 1), (5100, 5100), (65535, 65535), ("5300", 5300)])
def test_parse_port_good(good: object, expected: int) -> None:
    assert parse_port(good, "receiver_ports") == expected


@pytest.mark.parametrize(
    "bad",
    [
        0,
        -1,
        65536,
        10**30,
        True,
        False,
        "0",
        "65536",
        "-1",
        "+5100",
        " 5100",
        "5100\n",
        "5100 ",
        "05100",
        "5_100",
        "0x14",
        "",
        "٥١٠٠",
        5100.0,
        None,
        [5100],
        b"5100",
    ],
)
def test_parse_port_bad(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="receiver_ports"):
        parse_port(bad, "receiver_ports")


@given(st.integers(min_value=1, max_value=65535))
def test_parse_port_accepts_whole_range(n: int) -> None:
    assert parse_port(n, "p") == n
    assert parse_port(str(n), "p") == n


# --- host:port ---------------------------------------------------------------


def test_parse_hostport_v4() -> None:
    value = parse_hostport("192.168.150.1:5100", "listener")
    assert value == HostPort(IPv4Address("192.168.150.1"), 5100)
    assert str(value) == "192.168.150.1:5100"


def test_parse_hostport_v6() -> None:
    value = parse_hostport("[::1]:5100", "listener")
    assert value == HostPort(IPv6Address("::1"), 5100)
    assert str(value) == "[::1]:5100"
    assert str(parse_hostport("[2001:DB8:0::1]:80", "x")) == "[2001:db8::1]:80"


def test_parse_hostport_passes_hostport_through() -> None:
    value = hp("10.0.0.1:6000")
    assert parse_hostport(value, "x") is value


@pytest.mark.parametrize(
    "bad",
    [
        "192.168.150.1",
        "192.168.150.1:",
        ":5100",
        "192.168.150.1:0",
        "192.168.150.1:65536",
        "192.168.150.1:5100\n",
        "192.168.150.1:5100 ",
        "192.168.150.1:51a0",
        "server1:5100",
        "::1:5100",
        "[::1]",
        "[::1]5100",
        "[::1]:",
        "[127.0.0.1]:5100",
        "[[::1]]:5100",
        "[fe80::1%eth0]:5100",
        "0.0.0.0:5100",
        "'192.168.150.1:5100'",
        "192.168.150.1:5100=x",
        "",
        None,
        ("192.168.150.1", 5100),
    ],
)
def test_parse_hostport_bad(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="listener"):
        parse_hostport(bad, "listener")


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_hostport_str_roundtrip(addr: IPv4Address | IPv6Address, port: int) -> None:
    assume(not addr.is_unspecified and not addr.is_multicast)
    value = HostPort(addr, port)
    assert parse_hostport(str(value), "x") == value


def test_hostport_constructor_checks_types() -> None:
    with pytest.raises(InvalidArgument):
        HostPort("127.0.0.1", 5100)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        HostPort(IPv4Address("127.0.0.1"), True)
    with pytest.raises(InvalidArgument):
        HostPort(IPv4Address("127.0.0.1"), 0)


# --- lists -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,items",
    [
        ("5300", ["5300"]),
        ("5300,5301", ["5300", "5301"]),
        ("5300, 5301", ["5300", "5301"]),
        ("5300 5301", ["5300", "5301"]),
        ("[5300, 5301]", ["5300", "5301"]),
        ("['192.168.150.1:5100']", ["192.168.150.1:5100"]),
        (
            "['192.168.150.1:5100', '192.168.150.1:5101']",
            ["192.168.150.1:5100", "192.168.150.1:5101"],
        ),
        ('["192.168.150.1:5100"]', ["192.168.150.1:5100"]),
        ("['[::1]:5100']", ["[::1]:5100"]),
        ("[::1]:5100", ["[::1]:5100"]),
        ("[::1]:5100,[::1]:5101", ["[::1]:5100", "[::1]:5101"]),
        ("5300,", ["5300"]),
        ("", []),
        ("[]", []),
        ("  ", []),
    ],
)
def test_split_list(text: str, items: list) -> None:
    assert split_list(text) == items


def test_split_list_keeps_garbage_for_the_parser_to_reject() -> None:
    # Unbalanced quotes are not silently fixed; the item parser rejects them.
    assert split_list("'5300") == ["'5300"]
    with pytest.raises(InvalidArgument):
        parse_port_list("'5300", "receiver_ports")


def test_split_list_rejects_non_text() -> None:
    with pytest.raises(InvalidArgument):
        split_list(5300)  # type: ignore[arg-type]


def test_parse_port_list_forms() -> None:
    assert parse_port_list([5300, 5301], "receiver_ports") == (5300, 5301)
    assert parse_port_list((5300,), "receiver_ports") == (5300,)
    assert parse_port_list("5300,5301", "receiver_ports") == (5300, 5301)
    assert parse_port_list(["5300", 5301], "receiver_ports") == (5300, 5301)
    assert parse_port_list([], "local_ports", min_len=0) == ()
    assert parse_port_list("", "local_ports", min_len=0) == ()


@pytest.mark.parametrize(
    "bad", [[], "", [0], [True], ["5300\n"], 5300, None, {5300}, [5300, "x"], [[5300]]]
)
def test_parse_port_list_bad(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="receiver_ports"):
        parse_port_list(bad, "receiver_ports")


def test_parse_list_max_len() -> None:
    assert len(parse_port_list(list(range(1, 11)), "p", max_len=10)) == 10
    with pytest.raises(InvalidArgument, match="at most 10"):
        parse_port_list(list(range(1, 12)), "p", max_len=10)
    with pytest.raises(InvalidArgument, match="at most"):
        parse_hostport_list(["127.0.0.1:1"] * 1025, "listeners")


def test_parse_hostport_list() -> None:
    assert parse_hostport_list("['192.168.150.1:5100']", "remote_listeners") == (
        hp("192.168.150.1:5100"),
    )
    assert parse_hostport_list(["192.168.150.1:5100", "[::1]:5101"], "l") == (
        hp("192.168.150.1:5100"),
        hp("[::1]:5101"),
    )
    with pytest.raises(InvalidArgument, match="remote_listeners"):
        parse_hostport_list(["192.168.150.1:5100", "evil\n[x]"], "remote_listeners")
    with pytest.raises(InvalidArgument, match="remote_listeners"):
        parse_hostport_list([], "remote_listeners")


# --- uids --------------------------------------------------------------------


def test_parse_uid_good() -> None:
    assert parse_uid(UID) == UID
    assert parse_uid(UID.upper()) == UID
    u4 = str(uuid.uuid4())
    assert parse_uid(u4) == u4


@pytest.mark.parametrize(
    "bad",
    [
        "",
        UID.replace("-", ""),
        UID + "\n",
        "\n" + UID,
        UID[:-1],
        UID + "0",
        UID[:-1] + "g",
        UID.replace("-", "=", 1),
        "{" + UID + "}",
        "urn:uuid:" + UID,
        UID[:8] + "-" + UID[9:] + "-",
        UID.replace("b", "٥", 1),
        None,
        123,
        uuid.UUID(UID),
        UID.encode(),
    ],
)
def test_parse_uid_bad(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="uid"):
        parse_uid(bad)


def test_new_uid_is_random_uuid4() -> None:
    a, b = new_uid(), new_uid()
    assert a != b
    assert parse_uid(a) == a
    assert uuid.UUID(a).version == 4


# --- num_conn ----------------------------------------------------------------


def test_parse_num_conn() -> None:
    assert parse_num_conn(1, 16) == 1
    assert parse_num_conn(16, 16) == 16
    assert parse_num_conn("3", 16) == 3
    for bad in (0, 17, -1, True, "0", "1.5", 1.0, None, "3\n"):
        with pytest.raises(InvalidArgument, match="num_conn"):
            parse_num_conn(bad, 16)


# --- options -----------------------------------------------------------------


def test_parse_options() -> None:
    allowed = {"peer": lambda v: parse_hostport(v, "peer"), "num": lambda v: parse_port(v, "n")}
    assert parse_options({}, allowed) == {}
    assert parse_options({"peer": "127.0.0.1:5000"}, allowed) == {"peer": hp("127.0.0.1:5000")}
    with pytest.raises(InvalidArgument, match="num, peer"):
        parse_options({"evil": 1}, allowed)
    with pytest.raises(InvalidArgument, match="peer"):
        parse_options({"peer": "x"}, allowed)
    with pytest.raises(InvalidArgument):
        parse_options([("peer", "x")], allowed)
    with pytest.raises(InvalidArgument, match=r"\(none\)"):
        parse_options({"x": 1}, {})


# --- Endpoint ----------------------------------------------------------------


def make_inbound(**kw: object) -> Endpoint:
    args: dict = dict(
        uid=UID,
        role=Role.INBOUND,
        listeners=(hp("192.168.150.1:5100"), hp("192.168.150.1:5101"), hp("192.168.150.1:5102")),
        targets=(hp("192.168.150.1:5300"), hp("192.168.150.1:5301")),
        num_conn=3,
        created_at=1742400000.5,
    )
    args.update(kw)
    return Endpoint(**args)


def test_endpoint_basics() -> None:
    ep = make_inbound()
    assert re.fullmatch(r"scistream-inbound-[0-9a-f]{16}\.service", ep.unit), ep.unit
    assert ep.unit == f"scistream-inbound-{ep.relay_id}.service" and not ep.legacy_relay_id
    assert ep.key == (UID, Role.INBOUND)
    assert ep.state is State.STARTING
    assert ep.peer is None and ep.claimed_by == "" and ep.n_restarts == 0


def test_endpoint_mappings_round_robin() -> None:
    ep = make_inbound()
    assert ep.mappings() == [
        (hp("192.168.150.1:5100"), hp("192.168.150.1:5300")),
        (hp("192.168.150.1:5101"), hp("192.168.150.1:5301")),
        (hp("192.168.150.1:5102"), hp("192.168.150.1:5300")),
    ]


def test_endpoint_roundtrip_through_json() -> None:
    ep = make_inbound(
        state=State.ACTIVE,
        claimed_by="192.168.150.2:41234 CN=server2",
        claimed_at=1742400100.25,
        detail="",
        n_restarts=2,
    )
    out = make_inbound(role=Role.OUTBOUND, peer=hp("[::1]:5000"), state=State.FAILED, detail="x")
    for e in (ep, out):
        d = json.loads(json.dumps(e.to_dict()))
        assert Endpoint.from_dict(d) == e


def test_endpoint_to_dict_shape() -> None:
    d = make_inbound().to_dict()
    assert d["role"] == "inbound" and d["state"] == "starting"
    assert d["listeners"][0] == "192.168.150.1:5100"
    assert d["peer"] is None


def test_endpoint_from_dict_defaults_optional_fields() -> None:
    d = make_inbound(relay_id=UID).to_dict()
    for key in ("state", "peer", "claimed_by", "claimed_at", "detail", "n_restarts", "relay_id"):
        del d[key]
    assert Endpoint.from_dict(d) == make_inbound(relay_id=UID)


def test_relay_ids_are_opaque_and_never_the_uid() -> None:
    """Unit names are world-readable: each endpoint's relay id is random, not the uid."""
    eps = [make_inbound() for _ in range(50)]
    ids = {e.relay_id for e in eps}
    assert len(ids) == 50
    for e in eps:
        assert re.fullmatch(r"[0-9a-f]{16}", e.relay_id)
        # The uid's 8- and 12-digit groups: a 4-digit group turns up in 16 random
        # hex digits by chance (~3% of runs over 50 ids), which proves nothing.
        for part in (p for p in UID.split("-") if len(p) >= 8):
            assert part not in e.unit
        assert Endpoint.from_dict(json.loads(json.dumps(e.to_dict()))).unit == e.unit


def test_record_of_the_previous_version_keeps_its_uid_named_unit() -> None:
    """A state file written before relay ids (no relay_id key, as 0.x wrote it)
    loads with the uid as relay id, so its running relay is adopted unchanged."""
    old = {"uid": UID, "role": "inbound", "listeners": ["192.168.150.1:5100"],
           "targets": ["192.168.150.1:5300"], "num_conn": 1, "created_at": 1742400000.5,
           "state": "active", "peer": None, "claimed_by": "", "claimed_at": 0.0,
           "detail": "", "n_restarts": 0}
    ep = Endpoint.from_dict(old)
    assert ep.relay_id == UID and ep.legacy_relay_id
    assert ep.unit == f"scistream-inbound-{UID}.service"
    assert Endpoint.from_dict(ep.to_dict()) == ep  # saved again: still the same unit


@pytest.mark.parametrize("bad", ["", "0123456789abcde", "0123456789ABCDEF", "0123456789abcdef0",
                                 "../../etc/passwd", "bd9f1a7e-04d7-11f0-b44c-946dae415863",
                                 "0123456789abcdef\n", 16, None])
def test_bad_relay_ids_are_refused(bad: object) -> None:
    """Neither garbage nor another tunnel's uid can name an endpoint's relay."""
    d = make_inbound().to_dict()
    d["relay_id"] = bad
    with pytest.raises(InvalidArgument, match="relay id"):
        Endpoint.from_dict(d)


def test_endpoint_allowed_peer_is_stored_only_when_set() -> None:
    # A record without it (an older daemon's, or an endpoint open to any peer) loads.
    assert "allowed_peer" not in make_inbound().to_dict()
    assert Endpoint.from_dict(make_inbound().to_dict()).allowed_peer == ""
    ep = make_inbound(allowed_peer="2001:db8::2")
    d = json.loads(json.dumps(ep.to_dict()))
    assert d["allowed_peer"] == "2001:db8::2"
    assert Endpoint.from_dict(d) == ep


@pytest.mark.parametrize("bad", ["*.example.org", "a b", 5, "192.168.150.2\n", "::"])
def test_endpoint_allowed_peer_corruption_is_rejected(bad: object) -> None:
    d = make_inbound().to_dict()
    d["allowed_peer"] = bad
    with pytest.raises(InvalidArgument, match="allowed_peer"):
        Endpoint.from_dict(d)


def test_endpoint_allowed_peer_must_be_canonical() -> None:
    with pytest.raises(InvalidArgument, match="canonical"):
        make_inbound(allowed_peer="GW2.example.org")


def test_endpoint_from_dict_normalises_uid_case() -> None:
    d = make_inbound().to_dict()
    d["uid"] = UID.upper()
    assert Endpoint.from_dict(d).uid == UID


CORRUPTIONS = [
    ("uid", "not-a-uid"),
    ("uid", UID + "\n"),
    ("uid", None),
    ("role", "PROD"),
    ("role", 1),
    ("state", "running"),
    ("listeners", "192.168.150.1:5100"),
    ("listeners", ["192.168.150.1:5100"]),  # num_conn says 3
    ("listeners", ["192.168.150.1:5100"] * 3),  # duplicates
    ("listeners", ["192.168.150.1:5100", "192.168.150.1:5101", "evil\nline"]),
    ("targets", []),
    ("targets", None),
    ("targets", ["192.168.150.1:0"]),
    ("num_conn", 0),
    ("num_conn", True),
    ("num_conn", 2),
    ("num_conn", 3.0),
    ("num_conn", "3"),
    ("created_at", "yesterday"),
    ("created_at", -1),
    ("created_at", float("nan")),
    ("created_at", float("inf")),
    ("created_at", True),
    ("created_at", 10**400),
    ("created_at", 1e300),
    ("claimed_at", None),
    ("peer", "somewhere:5000"),
    ("peer", 5000),
    ("claimed_by", 42),
    ("claimed_by", "x" * 5000),
    ("detail", None),
    ("n_restarts", -1),
    ("n_restarts", "1"),
    ("n_restarts", True),
    ("extra", 1),
]


@pytest.mark.parametrize("key,value", CORRUPTIONS)
def test_endpoint_from_dict_rejects_corruption(key: str, value: object) -> None:
    d = make_inbound().to_dict()
    d[key] = value
    with pytest.raises(InvalidArgument):
        Endpoint.from_dict(d)


@pytest.mark.parametrize("key", ["uid", "role", "listeners", "targets", "num_conn", "created_at"])
def test_endpoint_from_dict_rejects_missing(key: str) -> None:
    d = make_inbound().to_dict()
    del d[key]
    with pytest.raises(InvalidArgument, match=key):
        Endpoint.from_dict(d)


@pytest.mark.parametrize("bad", [None, [], "{}", 1])
def test_endpoint_from_dict_rejects_non_objects(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        Endpoint.from_dict(bad)


def test_endpoint_invariants_checked_on_construction() -> None:
    with pytest.raises(InvalidArgument, match="num_conn"):
        make_inbound(num_conn=2)
    with pytest.raises(InvalidArgument, match="targets"):
        make_inbound(targets=())
    with pytest.raises(InvalidArgument):
        make_inbound(uid=UID.upper())
    with pytest.raises(InvalidArgument):
        make_inbound(role="inbound")
    with pytest.raises(InvalidArgument):
        make_inbound(listeners=[hp("1.2.3.4:1"), hp("1.2.3.4:2"), hp("1.2.3.4:3")])


def test_endpoint_validate_catches_later_mutation() -> None:
    ep = make_inbound()
    ep.listeners = ep.listeners[:1]
    with pytest.raises(InvalidArgument):
        ep.validate()


# --- peer identity -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("", ""),
        ("192.168.150.2", "192.168.150.2"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:192.168.150.2", "::ffff:c0a8:9602"),
        ("gw2.example.org", "gw2.example.org"),
        ("GW2.Example.ORG.", "gw2.example.org"),
        ("server2", "server2"),
        ("cafe", "cafe"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c-d.e1", "a-b.c-d.e1"),
        ("a" * 63 + ".org", "a" * 63 + ".org"),
    ],
)
def test_parse_allowed_peer_good(text: str, canonical: str) -> None:
    assert parse_allowed_peer(text) == canonical
    assert parse_allowed_peer(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    "bad",
    [
        "*.example.org", "*", "gw2.*.org", "-gw.org", "gw-.org", "gw..org", ".gw.org",
        "gw_2.org", "a" * 64 + ".org", ".".join(["a" * 60] * 5), "gw2.example.org..",
        "1.2.3", "1.2.3.400", "192.168.150.2:5000", "[::1]", "fe80::1%eth0", "0.0.0.0",
        "::", "224.0.0.1", "gw2.example.org\n", "gw 2", "b\u00fccher.example",
        "\u212aelvin.example", "x" * 1000, 42, None, b"gw2",
    ],
)
def test_parse_allowed_peer_bad(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="--allowed|allowed_peer"):
        parse_allowed_peer(bad, "allowed_peer")




def ident(ips=(), dns=(), verified=True) -> PeerIdentity:
    return PeerIdentity("192.168.150.2:41234", verified, tuple(ip_address(i) for i in ips),
                        tuple(dns), "gw2")


@pytest.mark.parametrize(
    "allowed, who, expected",
    [
        ("", ident(verified=False), True),  # no restriction
        ("192.168.150.2", ident(["192.168.150.2"]), True),
        ("192.168.150.2", ident(["192.168.150.3", "192.168.150.2"]), True),
        ("192.168.150.2", ident(["192.168.150.3"]), False),
        ("192.168.150.2", ident(["::ffff:192.168.150.2"]), False),  # mapped is another SAN
        ("192.168.150.2", ident(dns=["192.168.150.2"]), False),  # a DNS SAN is not an IP SAN
        ("192.168.150.2", ident(["192.168.150.2"], verified=False), False),
        ("2001:db8::1", ident(["2001:db8:0:0:0:0:0:1"]), True),
        ("2001:db8::1", ident(["2001:db8::2"]), False),
        ("gw2.example.org", ident(dns=["GW2.Example.Org"]), True),
        ("gw2.example.org", ident(dns=["gw2.example.org."]), True),
        ("gw2.example.org", ident(dns=["*.example.org"]), False),  # no wildcards
        ("gw2.example.org", ident(dns=["gw2.example.org.evil"]), False),
        ("gw2.example.org", ident(dns=["x.gw2.example.org"]), False),
        ("gw2.example.org", ident(["192.168.150.2"]), False),
        ("gw2", ident(), False),  # the CN never counts
        ("gw2.example.org", ident(dns=["gw2.example.org"], verified=False), False),
    ],
)
def test_peer_matches(allowed: str, who: PeerIdentity, expected: bool) -> None:
    assert peer_matches(allowed, who) is expected


def test_peer_identity_text() -> None:
    assert str(ident(verified=False)) == "192.168.150.2:41234"
    assert str(ident(["192.168.150.2", "2001:db8::1"], ["gw2.example.org"])) == (
        "192.168.150.2:41234 cert IP:192.168.150.2,IP:2001:db8::1,DNS:gw2.example.org")
    assert str(ident()) == "192.168.150.2:41234 cert CN=gw2"
