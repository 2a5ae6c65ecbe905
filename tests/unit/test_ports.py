"""Unit tests of scistreamd.ports: allocation, reservation, bind probes.

Real sockets are bound on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address
from typing import Iterator, List, Set, Tuple

import pytest

from scistreamd.errors import AlreadyExists, InvalidArgument, PortsExhausted
from scistreamd.ports import PortAllocator, port_is_free

LOOP = IPv4Address("127.0.0.1")


class FakeProbe:
    """A probe whose busy ports the test decides; records what was probed."""

    def __init__(self, busy: Set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.busy = set(busy)
        self.calls: List[Tuple[object, int]] = []

    def __call__(self, host: object, port: int) -> bool:
        self.calls.append((host, port))
        return port not in self.busy


@pytest.fixture
def listener() -> Iterator[Tuple[socket.socket, int]]:
    """A TCP socket listening on a kernel-chosen port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


# --- bind probes -------------------------------------------------------------


def test_port_is_free_sees_a_listener(listener: Tuple[socket.socket, int]) -> None:
    _, port = listener
    assert port_is_free(LOOP, port) is False


def test_port_is_free_after_close() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.listen()
    sock.close()
    assert port_is_free(LOOP, port) is True


def test_port_is_free_ignores_time_wait() -> None:
    # A closed connection leaves TIME_WAIT on the side that closed first; stunnel
    # (SO_REUSEADDR) can listen there anyway, so the probe must say "free".
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.close()  # server side closes first -> TIME_WAIT on 127.0.0.1:port
    cli.close()
    srv.close()
    assert port_is_free(LOOP, port) is True


def test_port_is_free_foreign_address() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine; bind fails locally.
    assert port_is_free(IPv4Address("192.0.2.1"), 5100) is False


def test_port_is_free_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no ::1 here")
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        assert port_is_free(IPv6Address("::1"), sock.getsockname()[1]) is False


# --- allocation --------------------------------------------------------------


def test_allocate_lowest_first_and_skips_held() -> None:
    alloc = PortAllocator(LOOP, 5100, 5200, probe=FakeProbe())
    assert alloc.allocate(1) == [5100]
    assert alloc.allocate(2) == [5101, 5102]
    assert alloc.held == frozenset({5100, 5101, 5102})
    assert alloc.free_count() == 101 - 3


def test_allocate_skips_busy_ports() -> None:
    probe = FakeProbe(busy={5100, 5102})
    alloc = PortAllocator(LOOP, 5100, 5200, probe=probe)
    assert alloc.allocate(2) == [5101, 5103]
    assert all(host == LOOP for host, _ in probe.calls)


def test_allocate_real_probe_skips_bound_port(listener: Tuple[socket.socket, int]) -> None:
    _, port = listener
    alloc = PortAllocator(LOOP, port, min(port + 5, 65535))
    got = alloc.allocate(1)
    assert got != [port] and got[0] > port


def test_allocate_zero_and_bad_counts() -> None:
    alloc = PortAllocator(LOOP, 5100, 5101, probe=FakeProbe())
    assert alloc.allocate(0) == []
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(InvalidArgument):
            alloc.allocate(bad)  # type: ignore[arg-type]


def test_allocate_exhausted_is_all_or_nothing() -> None:
    alloc = PortAllocator(LOOP, 5100, 5104, probe=FakeProbe(busy={5102}))
    alloc.allocate(2)  # 5100, 5101
    with pytest.raises(PortsExhausted) as info:
        alloc.allocate(3)  # only 5103, 5104 are left
    message = str(info.value)
    assert "3 free ports needed in 5100-5104" in message
    assert "only 2" in message
    assert "release unused tunnels or widen port_range" in message
    assert alloc.held == frozenset({5100, 5101})
    assert alloc.allocate(2) == [5103, 5104]


def test_exhausted_singular_message() -> None:
    alloc = PortAllocator(LOOP, 5100, 5100, probe=FakeProbe(busy={5100}))
    with pytest.raises(PortsExhausted, match="1 free port needed in 5100-5100 .*only 0"):
        alloc.allocate(1)


def test_release_and_reuse() -> None:
    alloc = PortAllocator(LOOP, 5100, 5102, probe=FakeProbe())
    assert alloc.allocate(3) == [5100, 5101, 5102]
    alloc.release([5101])
    alloc.release([5101])  # idempotent
    alloc.release([9999])  # never held: fine
    assert alloc.held == frozenset({5100, 5102})
    assert alloc.allocate(1) == [5101]


def test_invalid_range() -> None:
    for low, high in ((5200, 5100), (0, 10), (1, 65536)):
        with pytest.raises(InvalidArgument):
            PortAllocator(LOOP, low, high)


# --- explicit reservation ----------------------------------------------------


def test_reserve_outside_range_and_blocks_allocation() -> None:
    alloc = PortAllocator(LOOP, 5100, 5102, probe=FakeProbe())
    alloc.reserve([6000, 5100])
    assert alloc.held == frozenset({5100, 6000})
    assert alloc.allocate(1) == [5101]
    alloc.release([6000, 5100])
    assert alloc.held == frozenset({5101})


def test_reserve_held_port_is_already_exists() -> None:
    alloc = PortAllocator(LOOP, 5100, 5200, probe=FakeProbe())
    alloc.allocate(1)
    with pytest.raises(AlreadyExists, match="port 5100 on 127.0.0.1 .*scistream"):
        alloc.reserve([5150, 5100])
    assert alloc.held == frozenset({5100})


def test_reserve_busy_port_real_socket(listener: Tuple[socket.socket, int]) -> None:
    _, port = listener
    alloc = PortAllocator(LOOP, 5100, 5200)
    free_port = _free_port()
    with pytest.raises(AlreadyExists) as info:
        alloc.reserve([free_port, port])
    assert f"port {port} on 127.0.0.1 is in use" in str(info.value)
    assert alloc.held == frozenset()  # all or nothing: free_port not held either
    alloc.reserve([free_port])
    assert alloc.held == frozenset({free_port})


def test_reserve_rejects_bad_ports() -> None:
    alloc = PortAllocator(LOOP, 5100, 5200, probe=FakeProbe())
    with pytest.raises(InvalidArgument, match="twice"):
        alloc.reserve([6000, 6000])
    with pytest.raises(InvalidArgument, match="privileged"):
        alloc.reserve([80])
    for bad in (0, 65536, True, "x"):
        with pytest.raises(InvalidArgument):
            alloc.reserve([bad])  # type: ignore[list-item]
    assert alloc.held == frozenset()


def test_adopt_does_not_probe() -> None:
    probe = FakeProbe(busy={5100, 5101})
    alloc = PortAllocator(LOOP, 5100, 5200, probe=probe)
    alloc.adopt([5100, 5101])
    assert probe.calls == []
    assert alloc.held == frozenset({5100, 5101})
    assert alloc.allocate(1) == [5102]
    with pytest.raises(InvalidArgument):
        alloc.adopt([5103, 0])
    assert 5103 not in alloc.held


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
