"""Unit tests of the first-install parts: host addresses and the relay address
(hostaddrs), --check-config (configcheck), generated certificates (certs), and
the daemon's StatusText (issue 15 items 3-4, issue 13 item 6)."""

from __future__ import annotations

import subprocess
from ipaddress import ip_address
from pathlib import Path
from typing import List

import pytest

from scistreamd import certs, hostaddrs
from scistreamd.config import config_from_mapping
from scistreamd.configcheck import (
    certificate_ip_names,
    check_addresses,
    check_files,
    check_host,
    check_stunnel,
    check_user_api,
    reachable_addresses,
)
from scistreamd.errors import ConfigError
from scistreamd.sdstatus import StatusKeeper, status_text

LO4, LO6 = ip_address("127.0.0.1"), ip_address("::1")
A1, A2 = ip_address("192.168.150.1"), ip_address("10.0.0.5")
G6, LL6 = ip_address("2001:db8::5"), ip_address("fe80::1")
HOST = [LO4, A1, A2, LO6, G6, LL6]


# --------------------------------------------------------------------------
# hostaddrs

def test_wildcard_v4_picks_the_default_route_source_else_the_first_address() -> None:
    any4 = ip_address("0.0.0.0")
    assert hostaddrs.pick_relay_address(any4, HOST, (A2, None)) == A2
    assert hostaddrs.pick_relay_address(any4, HOST, (None, None)) == A1
    # A route source that is not an address of the host (a stale answer) is ignored.
    assert hostaddrs.pick_relay_address(any4, HOST, (ip_address("10.9.9.9"), None)) == A1


def test_wildcard_v6_prefers_ipv6_then_ipv4() -> None:
    any6 = ip_address("::")
    assert hostaddrs.pick_relay_address(any6, HOST, (A2, G6)) == G6
    assert hostaddrs.pick_relay_address(any6, [LO4, A1, LO6, LL6], (None, None)) == A1


def test_no_usable_address_falls_back_to_loopback_and_none_at_all_is_an_error() -> None:
    # A host without network yet (e.g. at package install): the daemon still starts.
    assert hostaddrs.pick_relay_address(ip_address("0.0.0.0"), [LO4, LO6, LL6],
                                        (None, None)) == LO4
    assert hostaddrs.pick_relay_address(ip_address("::"), [LO4, LO6], (None, None)) == LO6
    with pytest.raises(ConfigError, match="relay_address"):
        hostaddrs.pick_relay_address(ip_address("0.0.0.0"), [LO6, LL6], (None, None))


def test_resolve_relay_address_without_wildcard_reads_nothing() -> None:
    assert hostaddrs.resolve_relay_address(A1, None) == A1
    assert hostaddrs.resolve_relay_address(ip_address("0.0.0.0"), A2) == A2


def test_host_addresses_lists_loopback() -> None:
    # Whatever the machine, lo has 127.0.0.1 (getifaddrs through ctypes works).
    assert LO4 in hostaddrs.host_addresses()


def test_certificate_addresses_drop_link_local_and_duplicates() -> None:
    assert hostaddrs.certificate_addresses([A1, LL6, A1, LO4]) == [A1, LO4]


# --------------------------------------------------------------------------
# certs

def test_host_dns_names() -> None:
    assert certs.host_dns_names("server1", "server1.example.org.") == [
        "server1", "server1.example.org"]
    assert certs.host_dns_names("vm", "localhost") == ["vm"]
    assert certs.host_dns_names("bad name", "x_y") == []


def test_generate_never_overwrites_and_regenerate_keeps_the_old(tmp_path: Path) -> None:
    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    assert certs.generate_host_cert_files(crt, key, "server1", [A1, LO4], ["server1"])
    first = crt.read_bytes()
    assert set(certificate_ip_names(crt)) == {A1, LO4}
    assert key.stat().st_mode & 0o777 == 0o600
    assert not certs.generate_host_cert_files(crt, key, "server1", [A2])
    assert crt.read_bytes() == first
    kept = certs.regenerate_host_cert_files(crt, key, "server1", [A1, A2], ["server1"])
    assert kept == [tmp_path / "server.crt.old", tmp_path / "server.key.old"]
    assert (tmp_path / "server.crt.old").read_bytes() == first
    assert set(certificate_ip_names(crt)) == {A1, A2}
    assert key.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------
# configcheck

@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.generate_host_cert_files(tmp_path / "server.crt", tmp_path / "server.key",
                                   "server1", [A1, LO4])
    (tmp_path / "peer-ca.crt").write_bytes((tmp_path / "server.crt").read_bytes())
    return tmp_path


def cfg(pki: Path, **extra: object):
    data = {"listen_address": str(A1), "peer_cert": str(pki / "server.crt"),
            "peer_key": str(pki / "server.key"), "peer_trust_file": str(pki / "peer-ca.crt")}
    data.update(extra)
    return config_from_mapping(data)


def fake_stunnel(out: str = "stunnel 5.68 on x86_64\nThreading:PTHREAD Sockets:POLL,IPv6,"
                 "SYSTEMD TLS:PSK", code: int = 0):
    calls: List[List[str]] = []

    def run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, code, "", out)

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_a_good_configuration_has_no_problem(pki: Path) -> None:
    c = cfg(pki, stunnel="/bin/sh")
    run = fake_stunnel()
    assert check_host(c, HOST, run) == []
    assert run.calls == [["/bin/sh", "-version"]]


@pytest.mark.parametrize("key, value, says", [
    ("peer_cert", "/nonexistent/server.crt", "peer_cert (<config>): /nonexistent/server.crt "
                                            "does not exist"),
    ("peer_key", "/nonexistent/server.key", "peer_key (<config>): /nonexistent/server.key"),
    ("peer_trust_file", "/nonexistent/ca.crt", "exchange trust files"),
    ("peer_client_ca", "/nonexistent/clients.crt", "peer_client_ca (<config>)"),
])
def test_each_missing_file_is_named(pki: Path, key: str, value: str, says: str) -> None:
    problems = check_files(cfg(pki, **{key: value}))
    assert len(problems) == 1 and says in problems[0], problems


def test_user_api_files_are_checked(pki: Path) -> None:
    assert check_user_api(cfg(pki)) == []  # no user API configured: nothing to check
    (pki / "junk").write_text("not a certificate\n")
    problems = check_user_api(cfg(pki, user_client_ca=str(pki / "junk"),
                                  token_ca_file="/nonexistent/oauth-ca.crt"))
    assert len(problems) == 2, problems
    assert "token_ca_file (<config>): /nonexistent/oauth-ca.crt does not exist" in problems[0]
    assert "user_client_ca (<config>)" in problems[1] and "does not load as PEM" in problems[1]
    assert check_user_api(cfg(pki, user_client_ca=str(pki / "peer-ca.crt"))) == []
    secret = pki / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    tokens = {"token_introspection_url": "https://auth.example.org/introspect",
              "token_client_id": "gw1", "token_client_secret_file": str(secret)}
    problems = check_user_api(cfg(pki, **tokens))
    assert len(problems) == 1 and "chmod 0600" in problems[0], problems
    assert "s3cret" not in problems[0]
    secret.chmod(0o600)
    assert check_user_api(cfg(pki, **tokens)) == []


def test_files_that_do_not_load_are_named(pki: Path) -> None:
    (pki / "junk").write_text("not a certificate\n")
    problems = check_files(cfg(pki, peer_trust_file=str(pki / "junk")))
    assert len(problems) == 1 and "does not load as PEM" in problems[0]
    problems = check_files(cfg(pki, peer_key=str(pki / "junk")))
    assert len(problems) == 1 and problems[0].startswith("peer_cert/peer_key")


def test_stunnel_problems(pki: Path, tmp_path: Path) -> None:
    assert "does not exist" in check_stunnel(cfg(pki, stunnel="/nonexistent/stunnel"))[0]
    (tmp_path / "plain").write_text("")
    assert "not an executable" in check_stunnel(cfg(pki, stunnel=str(tmp_path / "plain")))[0]
    failed = check_stunnel(cfg(pki, stunnel="/bin/sh"), fake_stunnel("boom", 1))
    assert "failed (exit 1)" in failed[0]
    no_sd = check_stunnel(cfg(pki, stunnel="/bin/sh"), fake_stunnel("stunnel 5\nSockets:POLL"))
    assert "relay_socket_activation" in no_sd[0]
    assert check_stunnel(cfg(pki, stunnel="/bin/sh", relay_socket_activation=False),
                         fake_stunnel("stunnel 5\nSockets:POLL")) == []


def test_certificate_must_name_listen_address(pki: Path) -> None:
    problems = check_addresses(cfg(pki, listen_address=str(A2)), HOST)
    assert len(problems) == 1 and "does not name 10.0.0.5" in problems[0]
    assert "--regenerate-cert" in problems[0]


def test_wildcard_needs_every_reachable_address_named(pki: Path) -> None:
    c = cfg(pki, listen_address="0.0.0.0")
    assert reachable_addresses(c, HOST) == [A1, A2]
    problems = check_addresses(c, HOST)
    assert len(problems) == 1 and "does not name 10.0.0.5" in problems[0]
    assert check_addresses(c, [LO4, A1, LO6, LL6]) == []
    # "::" covers IPv4 too.
    assert reachable_addresses(cfg(pki, listen_address="::"), HOST) == [A1, A2, G6]


def test_addresses_not_of_this_host_are_named(pki: Path) -> None:
    problems = check_addresses(cfg(pki, relay_address="192.168.150.99"), HOST)
    assert problems == [p for p in problems if "relay_address" in p] and len(problems) == 1
    problems = check_addresses(cfg(pki, listen_address="192.168.150.99"), HOST)
    assert any("192.168.150.99 is not an address of this host" in p for p in problems)


# --------------------------------------------------------------------------
# StatusText

def test_status_text() -> None:
    assert status_text(0) == "serving 0 endpoints"
    assert status_text(1) == "serving 1 endpoint"
    assert status_text(3, 1) == "serving 3 endpoints (1 failed)"


class _Ep:
    def __init__(self, state: str) -> None:
        self.state = type("S", (), {"value": state})()


class _Inner:
    def __init__(self) -> None:
        self.seen: List[str] = []

    def endpoint_added(self, ep) -> None:
        self.seen.append("added")

    def endpoint_changed(self, ep, changed) -> None:
        self.seen.append("changed")

    def endpoint_removed(self, ep) -> None:
        self.seen.append("removed")


def test_status_keeper_follows_every_add_and_remove() -> None:
    eps: dict = {}
    sent: List[str] = []
    inner = _Inner()
    keeper = StatusKeeper(inner, eps, notify=sent.append)
    eps["a"] = _Ep("active")
    keeper.endpoint_added(eps["a"])
    assert sent == []  # not before READY=1
    keeper.live = True
    eps["b"] = _Ep("active")
    keeper.endpoint_added(eps["b"])
    assert sent == ["STATUS=serving 2 endpoints"]
    eps["b"].state.value = "failed"
    keeper.endpoint_changed(eps["b"], ["state"])
    assert sent[-1] == "STATUS=serving 2 endpoints (1 failed)"
    keeper.endpoint_changed(eps["b"], ["claimed_by"])  # no change of the text: no message
    assert len(sent) == 2
    for k in ("a", "b"):
        ep = eps.pop(k)
        keeper.endpoint_removed(ep)
    assert sent[-1] == "STATUS=serving 0 endpoints"
    assert inner.seen == ["added", "added", "changed", "changed", "removed", "removed"]


def test_status_keeper_counts_a_starting_endpoint_when_it_settles() -> None:
    eps: dict = {}
    sent: List[str] = []
    keeper = StatusKeeper(_Inner(), eps, notify=sent.append)
    keeper.live = True
    eps["a"] = _Ep("starting")
    keeper.endpoint_added(eps["a"])
    assert sent == []  # not ahead of its relay's start
    eps["a"].state.value = "active"
    keeper.endpoint_changed(eps["a"], ["state"])
    assert sent == ["STATUS=serving 1 endpoint"]
    eps["b"] = _Ep("starting")
    keeper.endpoint_added(eps["b"])
    del eps["b"]  # its start failed: rolled back
    keeper.endpoint_removed(_Ep("starting"))
    assert sent == ["STATUS=serving 1 endpoint"]  # the same text: nothing sent


class _CountingDict(dict):
    def __init__(self) -> None:
        super().__init__()
        self.scans = 0

    def values(self):  # type: ignore[override]
        self.scans += 1
        return super().values()


def test_status_keeper_does_not_count_endpoints_before_ready() -> None:
    """Adopting N endpoints at start-up must not cost N scans of all of them."""
    eps = _CountingDict()
    sent: List[str] = []
    keeper = StatusKeeper(_Inner(), eps, notify=sent.append)
    for k in range(50):
        eps[k] = _Ep("active")
        keeper.endpoint_added(eps[k])
    assert eps.scans == 0 and sent == []
    keeper.live = True
    keeper.update(force=True)
    assert sent == ["STATUS=serving 50 endpoints"]
