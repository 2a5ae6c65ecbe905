"""Unit tests of the relay listener pieces: socket unit names, claimant addresses, CIDR
parsing, IP allow lists, stunnel's connection cap and the socket unit's properties."""

from __future__ import annotations

import json
import socket
from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest

from scistreamd.config import Config, config_from_mapping
from scistreamd.errors import ConfigError, InvalidArgument
from scistreamd.model import (
    Endpoint,
    Role,
    parse_hostport,
    parse_network,
    socket_unit_name,
)
from scistreamd.peerident import parse_claimant_ip
from scistreamd.relay import (
    STUNNEL_BASE_FDS,
    listener_allow_networks,
    nofile_for_connections,
    relay_nofile,
    stunnel_max_clients,
)
from scistreamd.relay_unit import relay_socket_properties, relay_unit_properties

UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"
S1 = IPv4Address("192.168.150.1")


def hp(text: str):
    return parse_hostport(text, "test")


def ep(role: Role = Role.INBOUND, **kw: object) -> Endpoint:
    args: dict = dict(uid=UID, role=role,
                      listeners=(hp("192.168.150.1:5101"), hp("192.168.150.1:5100")),
                      targets=(hp("192.168.150.1:5300"),), num_conn=2, created_at=1.0)
    args.update(kw)
    return Endpoint(**args)


# ----------------------------------------------------------------- model

def test_socket_unit_is_derived_from_the_service_unit() -> None:
    e = ep()
    assert e.socket_unit == e.unit[: -len(".service")] + ".socket"
    assert socket_unit_name("scistream-*-*.service") == "scistream-*-*.socket"
    for bad in ("x.socket", "", None, "service"):
        with pytest.raises(InvalidArgument):
            socket_unit_name(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, ip", [
    ("192.168.150.2:41234", IPv4Address("192.168.150.2")),
    ("192.168.150.2:41234 CN=server2", IPv4Address("192.168.150.2")),
    ("[2001:db8::7]:5000 CN=x", IPv6Address("2001:db8::7")),
])
def test_claimant_ip_from_the_peer_ports_description(text: str, ip: object) -> None:
    assert parse_claimant_ip(text) == ip


@pytest.mark.parametrize("bad", ["", " ", "server2:5000", "192.168.150.2", None, 7,
                                 "CN=x 192.168.150.2:1"])
def test_claimant_ip_refuses_what_names_no_address(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_claimant_ip(bad)


def test_claimant_ip_is_persisted_and_validated() -> None:
    e = ep(claimant_ip=IPv4Address("192.168.150.2"), claimed_by="192.168.150.2:1")
    d = json.loads(json.dumps(e.to_dict()))
    assert d["claimant_ip"] == "192.168.150.2"
    assert Endpoint.from_dict(d) == e
    d["claimant_ip"] = "192.168.150.2\nx"
    with pytest.raises(InvalidArgument):
        Endpoint.from_dict(d)
    # State files of the previous version have no such key: unclaimed-by-address.
    d = ep().to_dict()
    del d["claimant_ip"]
    assert Endpoint.from_dict(d).claimant_ip is None
    with pytest.raises(InvalidArgument):
        ep(claimant_ip="192.168.150.2")


@pytest.mark.parametrize("text, net", [
    ("10.1.0.0/16", ip_network("10.1.0.0/16")),
    ("192.168.150.7", ip_network("192.168.150.7/32")),
    ("::1/128", ip_network("::1/128")),
    ("2001:db8::/32", ip_network("2001:db8::/32")),
    ("0.0.0.0/0", ip_network("0.0.0.0/0")),
])
def test_parse_network(text: str, net: object) -> None:
    assert parse_network(text, "network") == net


@pytest.mark.parametrize("bad", ["10.1.2.3/16", "10.0.0.0/33", "host.example/24", "",
                                 "10.0.0.0/8\n", "10.0.0.0/ 8", "fe80::1%eth0/64", None, 10,
                                 "10.0.0.0/-1", "10.0.0.0/8/8"])
def test_parse_network_refuses_by_name(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="network"):
        parse_network(bad, "network")


# ---------------------------------------------------------------- config

def test_client_networks_default_is_this_host() -> None:
    assert Config().outbound_client_networks == (ip_network("127.0.0.0/8"),
                                                 ip_network("::1/128"))
    c = config_from_mapping({"outbound_client_networks": ["10.20.0.0/16", "10.20.0.0/16"]})
    assert c.outbound_client_networks == (ip_network("10.20.0.0/16"),)


@pytest.mark.parametrize("bad", ["10.0.0.0/8", [10], ["10.0.0.1/8"], ["x"] * 1,
                                 ["10.0.0.0/8"] * 300])
def test_client_networks_refused_by_name(bad: object) -> None:
    with pytest.raises(ConfigError, match="outbound_client_networks"):
        config_from_mapping({"outbound_client_networks": bad})


def test_socket_activation_key() -> None:
    assert Config().relay_socket_activation is True
    assert config_from_mapping({"relay_socket_activation": False}).relay_socket_activation is False
    with pytest.raises(ConfigError, match="relay_socket_activation"):
        config_from_mapping({"relay_socket_activation": "no"})


def test_max_connections_default_fits_the_default_caps() -> None:
    c = Config()
    assert c.relay_max_connections == 1024
    assert config_from_mapping({}).relay_max_connections == 1024


def test_max_connections_over_the_memory_cap_names_both_keys() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_mapping({"relay_max_connections": 2000})
    assert "relay_max_connections" in str(e.value) and "relay_memory_max" in str(e.value)
    assert e.value.key in ("relay_max_connections", "relay_memory_max")


def test_max_connections_over_the_tasks_cap_names_both_keys() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_mapping({"relay_memory_max": 0, "relay_max_connections": 5000})
    assert "relay_tasks_max" in str(e.value) and "relay_max_connections" in str(e.value)


def test_max_connections_unset_follows_smaller_caps() -> None:
    # An existing configuration with a small memory cap keeps working: the cap follows.
    c = config_from_mapping({"relay_memory_max": "64M"})
    assert c.relay_max_connections == (64 - 4) * 1024 // 192
    c = config_from_mapping({"relay_tasks_max": 100})
    assert c.relay_max_connections == 96
    c = config_from_mapping({"relay_memory_max": 0, "relay_tasks_max": 20000,
                             "relay_max_connections": 10000})
    assert c.relay_max_connections == 10000


def test_caps_too_small_for_any_relay() -> None:
    with pytest.raises(ConfigError, match="relay_tasks_max"):
        config_from_mapping({"relay_tasks_max": 8})
    with pytest.raises(ConfigError, match="relay_max_connections"):
        config_from_mapping({"relay_max_connections": 4})


def test_later_file_is_blamed(tmp_path) -> None:
    from scistreamd.config import load_config

    (tmp_path / "scistreamd.toml").write_text("relay_max_connections = 1200\n")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10.toml").write_text('relay_memory_max = "128M"\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "scistreamd.toml")
    assert e.value.path.endswith("10.toml") and e.value.key == "relay_memory_max"


# ------------------------------------------------------------ connection cap

@pytest.mark.parametrize("n", [5, 6, 100, 124, 125, 126, 1000, 1024, 4096, 32000, 100000])
def test_nofile_gives_stunnels_cap_exactly(n: int) -> None:
    nofile = nofile_for_connections(n)
    assert stunnel_max_clients(nofile) == n
    if nofile > 16:  # stunnel raises any lower limit to 16
        assert stunnel_max_clients(nofile - 1) < n  # the smallest limit that does
    assert nofile >= 2 * n  # two descriptors per relayed connection


def test_stunnel_formula_matches_its_source() -> None:
    # stunnel 5.68 src/fd.c get_limits(): the limit of 65536 the relays had before.
    assert stunnel_max_clients(65536) == 32000
    assert stunnel_max_clients(1024) == 500


@pytest.mark.parametrize("bad", [4, 0, -1, True, 2.5, "10"])
def test_nofile_refuses_bad_counts(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        nofile_for_connections(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("listeners", [1, 2, 10, 40])
def test_default_cap_is_exact_with_descriptors_to_spare(listeners: int) -> None:
    fit = 1344  # what 256M and 4096 tasks allow
    nofile = relay_nofile(1024, listeners, fit)
    cap = stunnel_max_clients(nofile)
    assert cap >= 1024 and cap <= fit
    # accept() must not run out of descriptors before stunnel's cap closes connections.
    assert nofile - 2 * cap >= STUNNEL_BASE_FDS + listeners
    if listeners <= 2:
        assert cap == 1024


def test_small_caps_are_raised_to_close_cleanly_within_the_fit() -> None:
    nofile = relay_nofile(32, 1, 1344)
    cap = stunnel_max_clients(nofile)
    assert 32 < cap <= 1344 and nofile - 2 * cap >= STUNNEL_BASE_FDS + 1
    # Never past what memory and tasks allow: then the cap stays as configured.
    assert relay_nofile(32, 1, 32) == nofile_for_connections(32)
    assert stunnel_max_clients(relay_nofile(1024, 500, 1344)) == 1344


# ---------------------------------------------------------------- allow lists

def test_unclaimed_inbound_allows_nobody() -> None:
    assert listener_allow_networks(ep(), S1, [ip_network("10.0.0.0/8")]) == []


def test_claimed_inbound_allows_the_claimant_only() -> None:
    e = ep(claimant_ip=IPv4Address("192.168.150.2"))
    assert listener_allow_networks(e, S1, [ip_network("10.0.0.0/8")]) == [
        ip_network("192.168.150.2/32")]
    e = ep(claimant_ip=IPv6Address("2001:db8::2"))
    assert listener_allow_networks(e, S1, []) == [ip_network("2001:db8::2/128")]


@pytest.mark.parametrize("claimant", [IPv4Address("127.0.0.1"), S1, IPv6Address("::1")])
def test_claim_from_this_host_allows_its_own_addresses(claimant: object) -> None:
    nets = listener_allow_networks(ep(claimant_ip=claimant), S1, [])
    for want in ("127.0.0.0/8", "::1/128", "192.168.150.1/32"):
        assert ip_network(want) in nets


def test_outbound_allows_client_networks_and_this_host() -> None:
    nets = listener_allow_networks(ep(Role.OUTBOUND), S1, [ip_network("10.0.0.0/8")])
    assert nets == [ip_network("10.0.0.0/8"), ip_network("192.168.150.1/32")]


# ------------------------------------------------------------- unit properties

def _props(props) -> dict:
    return {name: v for name, v in props}


def test_socket_unit_lists_listeners_in_mapping_order() -> None:
    e = ep(claimant_ip=IPv4Address("192.168.150.2"))
    p = _props(relay_socket_properties(e, Config(listen_address=S1)))
    # stunnel gives descriptor i to its i-th section: same order as the config's sections.
    assert p["Listen"].value == [["Stream", "192.168.150.1:5101"],
                                 ["Stream", "192.168.150.1:5100"]]
    assert p["Accept"].value is False
    assert p["IPAddressDeny"].value == [[socket.AF_INET, bytes(4), 0],
                                        [socket.AF_INET6, bytes(16), 0]]
    assert p["IPAddressAllow"].value == [[socket.AF_INET, bytes([192, 168, 150, 2]), 32]]
    assert p["IPAddressAllow"].signature == "a(iayu)"


def test_ipv6_listener_is_bracketed() -> None:
    e = ep(listeners=(hp("[2001:db8::1]:5100"),), num_conn=1)
    p = _props(relay_socket_properties(e, Config()))
    assert p["Listen"].value == [["Stream", "[2001:db8::1]:5100"]]


def test_service_requires_its_socket_and_caps_connections(tmp_path) -> None:
    e = ep()
    p = _props(relay_unit_properties(e, Config(), tmp_path))
    assert p["Requires"].value == [e.socket_unit] and p["After"].value == [e.socket_unit]
    assert p["LimitNOFILE"].value == nofile_for_connections(1024)
    p = _props(relay_unit_properties(e, Config(relay_socket_activation=False), tmp_path))
    assert "Requires" not in p
