"""This host's IP addresses and the address relays bind when listen_address is a wildcard.

``listen_address = "0.0.0.0"`` (or ``"::"``) means "all of this host's
addresses" for the peer port. A relay's listeners are handed to the other
gateway (inbound) or the application (outbound) as ``address:port``, so they
must name one concrete, reachable address: ``relay_address`` if set, else
the one :func:`pick_relay_address` chooses (see there), fixed at start-up.

The host part (:func:`host_addresses`, :func:`route_source`) reads the
kernel (getifaddrs(3) through ctypes: no extra package, no subprocess); the
choice is a pure function for the unit tests. Imports nothing from D-Bus.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import socket
from typing import Iterable, List, Optional, Sequence

from .errors import ConfigError
from .model import IPAddress

#: Where route_source() pretends to send (no packet leaves: a UDP connect only
#: asks the kernel for its route): TEST-NET addresses (RFC 5737 / RFC 3849).
_PROBE = {4: "192.0.2.1", 6: "2001:db8::1"}


def is_wildcard(address: IPAddress) -> bool:
    return address.is_unspecified


def is_usable(address: IPAddress) -> bool:
    """An address another gateway could reach this host at (no loopback, link-local,
    multicast or wildcard)."""
    return not (address.is_loopback or address.is_link_local or address.is_multicast
                or address.is_unspecified)


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)),
    ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]


def host_addresses() -> List[IPAddress]:
    """Every IPv4/IPv6 address configured on this host's interfaces, in the kernel's
    order (interface by interface), without duplicates."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getifaddrs: {errno.errorcode.get(err, err)}")
    found: List[IPAddress] = []
    try:
        node = head
        while node:
            entry = node.contents
            addr = entry.ifa_addr
            if addr:
                family = addr.contents.sa_family
                raw = ctypes.cast(addr, ctypes.c_void_p).value or 0
                if family == socket.AF_INET:
                    # struct sockaddr_in: family(2) port(2) addr(4)
                    packed = ctypes.string_at(raw + 4, 4)
                    found.append(ipaddress.IPv4Address(packed))
                elif family == socket.AF_INET6:
                    # struct sockaddr_in6: family(2) port(2) flowinfo(4) addr(16)
                    packed = ctypes.string_at(raw + 8, 16)
                    found.append(ipaddress.IPv6Address(packed))
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return list(dict.fromkeys(found))


def route_source(version: int) -> Optional[IPAddress]:
    """The source address of this host's default route of IP ``version``, or None
    when there is no such route."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((_PROBE[version], 9))
            return ipaddress.ip_address(s.getsockname()[0])
    except OSError:
        return None


def _families(listen_address: IPAddress) -> Sequence[int]:
    # "::" takes IPv4 too (the peer port clears IPV6_V6ONLY): prefer IPv6, then IPv4.
    return (4,) if listen_address.version == 4 else (6, 4)


def pick_relay_address(listen_address: IPAddress, addresses: Iterable[IPAddress],
                       route_sources: Sequence[Optional[IPAddress]] = ()) -> IPAddress:
    """The concrete address relays bind for a wildcard ``listen_address``.

    In order of the wildcard's families (0.0.0.0: IPv4; "::": IPv6, then IPv4):
    the source address of the default route (what other networks most likely
    reach this host at), else the host's first usable address (not loopback or
    link-local). ``route_sources`` holds route_source(4), route_source(6) as
    found. A host with no such address (no network yet) gets its loopback
    address, so the daemon still starts (the caller warns); ConfigError when
    it has not even that.
    """
    addresses = list(addresses)
    addrs = [a for a in addresses if is_usable(a)]
    for version in _families(listen_address):
        for src in route_sources:
            if src is not None and src.version == version and src in addrs:
                return src
        for a in addrs:
            if a.version == version:
                return a
    for version in _families(listen_address):
        for a in addresses:
            if a.is_loopback and a.version == version:
                return a
    raise ConfigError(
        "<host>", "listen_address",
        f"{listen_address} means all of this host's addresses, but the host has no "
        f"address other gateways could reach (only {', '.join(map(str, addresses)) or 'none'}"
        "): configure the network first, or set relay_address (or listen_address) to the "
        "address relays should listen on")


def resolve_relay_address(listen_address: IPAddress,
                          relay_address: Optional[IPAddress]) -> IPAddress:
    """What relays bind on this host: relay_address, a concrete listen_address, or
    the choice of pick_relay_address for a wildcard (reads the host)."""
    if relay_address is not None:
        return relay_address
    if not is_wildcard(listen_address):
        return listen_address
    try:
        addresses = host_addresses()
    except OSError as e:
        raise ConfigError("<host>", "listen_address", f"{listen_address} means all of this "
                          f"host's addresses, but they cannot be listed ({e}): set "
                          "relay_address to the address relays should listen on") from None
    return pick_relay_address(listen_address, addresses, (route_source(4), route_source(6)))


def certificate_addresses(addresses: Iterable[IPAddress]) -> List[IPAddress]:
    """The IP SANs of a generated host certificate: every address of the host except
    link-local ones (they need a zone and no peer verifies against them)."""
    return [a for a in dict.fromkeys(addresses) if not a.is_link_local]
