"""hostprobe: the /proc/net/tcp parser with sample lines, and listening() over sample tables."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from scistreamd import hostprobe
from scistreamd.errors import ConfigError
from scistreamd.model import HostPort

HEAD = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
        "timeout inode\n")
V4_LISTEN = ("   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
             "        0 67 1 0000000095172c8d 100 0 0 10 0")
V4_ESTABLISHED = ("   1: 0196A8C0:1388 0296A8C0:C350 01 00000000:00000000 00:00000000 00000000"
                  "     0        0 68 1 0000000095172c8d 20 4 30 10 -1")
V6_LISTEN = ("   0: 00000000000000000000000001000000:1389 00000000000000000000000000000000:0000 0A "
             "00000000:00000000 00:00000000 00000000     0        0 69 1 0000000000000000 100 0 0 "
             "10 0")
V6_GLOBAL = ("   1: B80D0120000000000000000001000000:138A 00000000000000000000000000000000:0000 0A "
             "00000000:00000000 00:00000000 00000000     0        0 70 1 0000000000000000 100 0 0 "
             "10 0")
V4_MAPPED = ("   2: 0000000000000000FFFF00000196A8C0:138B 00000000000000000000000000000000:0000 0A "
             "00000000:00000000 00:00000000 00000000     0        0 71 1 0000000000000000 100 0 0 "
             "10 0")


def hp(text: str, port: int) -> HostPort:
    return HostPort(ipaddress.ip_address(text), port)


def test_ipv4_listen_line() -> None:
    assert hostprobe.parse_tcp_listen_line(V4_LISTEN) == (socket.inet_aton("127.0.0.1"), 5000)


def test_other_states_and_the_header_are_not_listeners() -> None:
    assert hostprobe.parse_tcp_listen_line(V4_ESTABLISHED) is None
    assert hostprobe.parse_tcp_listen_line(HEAD) is None
    assert hostprobe.parse_tcp_listen_line("") is None


def test_ipv6_listen_lines() -> None:
    assert hostprobe.parse_tcp_listen_line(V6_LISTEN) == (
        ipaddress.ip_address("::1").packed, 5001)
    assert hostprobe.parse_tcp_listen_line(V6_GLOBAL) == (
        ipaddress.ip_address("2001:db8::1").packed, 5002)


def test_v4_mapped_is_its_ipv4_address() -> None:
    assert hostprobe.parse_tcp_listen_line(V4_MAPPED) == (
        socket.inet_aton("192.168.150.1"), 5003)


@pytest.fixture
def tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tcp").write_text(HEAD + V4_LISTEN + "\n" + V4_ESTABLISHED + "\n")
    (tmp_path / "tcp6").write_text(HEAD + "\n".join((V6_LISTEN, V6_GLOBAL, V4_MAPPED)) + "\n")
    monkeypatch.setattr(hostprobe, "TCP_TABLES",
                        ((str(tmp_path / "tcp"), 4), (str(tmp_path / "tcp6"), 16)))


def test_listening_needs_every_listener(tables: None) -> None:
    assert hostprobe.listening([hp("127.0.0.1", 5000), hp("::1", 5001),
                                hp("2001:db8::1", 5002), hp("192.168.150.1", 5003)])
    assert hostprobe.listening([])
    # established, not listening; and a port nobody has
    assert not hostprobe.listening([hp("127.0.0.1", 5000), hp("192.168.150.1", 5000)])
    assert not hostprobe.listening([hp("127.0.0.1", 5999)])


def test_missing_tables_mean_not_listening(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostprobe, "TCP_TABLES", ((str(tmp_path / "none"), 4),))
    assert not hostprobe.listening([hp("127.0.0.1", 5000)])


def test_taken_names_a_bound_port_only() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        assert hostprobe.taken([hp("127.0.0.1", port), hp("127.0.0.1", free_port)]) == [
            hp("127.0.0.1", port)]


def test_relay_gid_is_none_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostprobe.os, "geteuid", lambda: 1000)
    assert hostprobe.relay_gid() is None


def test_last_relay_error_without_a_journal_is_empty() -> None:
    # python3-systemd may be absent (as here) or the journal unreadable: never a failure.
    assert isinstance(hostprobe.last_relay_error("scistream-x-inbound.service"), str)


def test_relay_gid_names_a_missing_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise KeyError(name)

    monkeypatch.setattr(hostprobe.os, "geteuid", lambda: 0)
    monkeypatch.setattr(hostprobe.grp, "getgrnam", missing)
    with pytest.raises(ConfigError, match="systemd-sysusers"):
        hostprobe.relay_gid()
