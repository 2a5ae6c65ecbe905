"""Probes of this host's state the manager asks about: listening sockets, a
relay's last journal error, the relays' group, whether a target accepts.

Kept apart from manager.py so orchestration can be tested without a kernel
table, a journal or root: the manager takes a ``HostProbes`` whose members a
test replaces. The /proc/net/tcp line parser is pure.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from . import RELAY_GROUP
from .errors import ConfigError
from .model import HostPort

logger = logging.getLogger(__name__)

#: The kernel's TCP tables and the size of the addresses they print.
TCP_TABLES = (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16))
_TCP_LISTEN = "0A"
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def parse_tcp_listen_line(line: str) -> Optional[Tuple[bytes, int]]:
    """(packed address, port) of one /proc/net/tcp{,6} line in LISTEN state, else None.

    A v4-mapped IPv6 address is given as its IPv4 address (as HostPort packs it).
    """
    f = line.split()
    if len(f) < 4 or f[3] != _TCP_LISTEN:
        return None
    addr_hex, port_hex = f[1].split(":")
    raw = bytes.fromhex(addr_hex)
    # /proc prints the address as 32-bit words in host (little-endian) order.
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    port = int(port_hex, 16)
    if len(packed) == 16 and packed[:12] == _V4_MAPPED:
        packed = packed[12:]
    return packed, port


def listening(listeners: Iterable[HostPort]) -> bool:
    """Whether every listener has a socket in LISTEN state (kernel table, no probe traffic)."""
    wanted = {(h.host.packed, h.port) for h in listeners}
    found = set()
    for table, _size in TCP_TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            hit = parse_tcp_listen_line(line)
            if hit is not None:
                found.add(hit)
    return all(w in found for w in wanted)


def taken(listeners: Iterable[HostPort]) -> List[HostPort]:
    """The listeners some other socket holds now (after a socket unit failed to bind).

    A bind probe as systemd binds (SO_REUSEADDR): only a socket that really
    occupies the address makes it fail, and the probe is closed at once.
    """
    result = []
    for hp in listeners:
        family = socket.AF_INET6 if hp.host.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((str(hp.host), hp.port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    result.append(hp)
    return result


def relay_gid() -> Optional[int]:
    """Group scistream-relay's id; None for a daemon not run by root (development)."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(RELAY_GROUP).gr_gid
    except KeyError:
        raise ConfigError(
            f"group {RELAY_GROUP} does not exist: relays read their keys through it. The "
            "package creates it (sysusers.d/scistream.conf); run 'systemd-sysusers' to "
            "create it now") from None


def last_relay_error(unit: str) -> str:
    """The last error line of relay unit ``unit``, for StateDetail.

    stunnel logs errors as "LOG3[..]: text" once running, and as "[!] text"
    (with the details on the "[.]" line before it) while still starting.
    """
    try:
        from systemd import journal

        reader = journal.Reader()
        try:
            reader.this_boot()
            # By unit: relay lines carry no SCISTREAM_UID (relay_unit.py).
            reader.add_match(_SYSTEMD_UNIT=unit, SYSLOG_IDENTIFIER="scistream-relay")
            reader.seek_tail()
            failed = ""
            for _ in range(50):
                entry = reader.get_previous()
                if not entry:
                    break
                text = str(entry.get("MESSAGE", ""))
                if failed:
                    return (text[4:] if text.startswith("[.] ") else failed)[:200]
                if text.startswith("[!] "):
                    failed = text[4:]
                elif any(f"LOG{n}[" in text for n in "0123") and "No trusted" not in text:
                    return text.split("]: ", 1)[-1][:200]
            return failed[:200]
        finally:
            reader.close()
    except Exception as e:  # the journal is a nicety here, never a failure
        logger.debug("reading the relay's journal failed: %s", e)
    return ""


def _is_local(target: HostPort) -> bool:
    """Whether ``target``'s address is one of this host's (a bind to it works)."""
    family = socket.AF_INET6 if target.host.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((str(target.host), 0))
        except OSError:
            return False
    return True


def _listening_at(target: HostPort) -> bool:
    """A LISTEN socket on target's port, bound to its address or a wildcard one."""
    wanted = {(target.host.packed, target.port), (bytes(4), target.port),
              (bytes(16), target.port)}
    for table, _size in TCP_TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        if any(parse_tcp_listen_line(line) in wanted for line in lines):
            return True
    return False


def target_accepts(target: HostPort, timeout: float) -> bool:
    """Whether something accepts TCP connections at ``target`` now.

    A target on this host is looked up in the kernel's table of listening
    sockets: no connection, so an application that serves one connection and
    exits is not used up by the check. Elsewhere the only way is to connect
    (closed at once; the application sees an empty connection).
    """
    if _is_local(target):
        return _listening_at(target)
    try:
        with socket.create_connection((str(target.host), target.port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class HostProbes:
    """The probes a Manager uses; a test passes its own."""

    listening: Callable[[Iterable[HostPort]], bool] = listening
    taken: Callable[[Iterable[HostPort]], List[HostPort]] = taken
    relay_gid: Callable[[], Optional[int]] = relay_gid
    last_relay_error: Callable[[str], str] = last_relay_error
    target_accepts: Callable[[HostPort, float], bool] = target_accepts
