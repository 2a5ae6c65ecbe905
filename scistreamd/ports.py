"""Relay port allocation on the daemon's listen address.

The allocator hands out the lowest free ports of ``port_range`` first (the
guide expects 5100 for the first tunnel), remembers which ports its endpoints
hold, and checks with a bind probe that no other program uses a port. It
runs on the single asyncio loop: no method awaits, so each call is atomic.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable, FrozenSet, Iterable, List, Set

from .errors import AlreadyExists, InvalidArgument, PortsExhausted
from .model import IPAddress, parse_port

logger = logging.getLogger(__name__)

#: Relays run without privileges (empty capability set), so they cannot bind below this.
FIRST_UNPRIVILEGED_PORT = 1024

Probe = Callable[[IPAddress, int], bool]


def _bind_probe(host: IPAddress, port: int) -> None:
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # stunnel sets SO_REUSEADDR on its listeners, so a port whose old
        # connections linger in TIME_WAIT is usable by a relay: probe alike.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((str(host), port))


def port_is_free(host: IPAddress, port: int) -> bool:
    """True if a listener could bind ``host:port`` now."""
    try:
        _bind_probe(host, port)
    except OSError:
        return False
    return True


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class PortAllocator:
    """Ports of one listen address: the range to allocate from and the ports held."""

    def __init__(self, host: IPAddress, low: int, high: int, probe: Probe = port_is_free) -> None:
        if not 1 <= low <= high <= 65535:
            raise InvalidArgument(f"port range {low}-{high} is invalid: need 1 <= low <= high")
        self.host = host
        self.low = low
        self.high = high
        self._probe = probe
        self._held: Set[int] = set()

    @property
    def held(self) -> FrozenSet[int]:
        return frozenset(self._held)

    def free_count(self) -> int:
        """Ports of the range not held by an endpoint (other programs not counted)."""
        return sum(1 for p in range(self.low, self.high + 1) if p not in self._held)

    def allocate(self, count: int) -> List[int]:
        """Hold ``count`` free ports of the range, lowest first; all or nothing."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgument(f"port count {count!r:.60} must be an integer >= 0")
        chosen: List[int] = []
        if count:
            for port in range(self.low, self.high + 1):
                if port in self._held or not self._probe(self.host, port):
                    continue
                chosen.append(port)
                if len(chosen) == count:
                    break
        if len(chosen) < count:
            raise PortsExhausted(
                f"{_plural(count, 'free port')} needed in {self.low}-{self.high} on {self.host}, "
                f"only {len(chosen)}: release unused tunnels or widen port_range"
            )
        self._held.update(chosen)
        logger.debug("allocated ports %s on %s", chosen, self.host)
        return chosen

    def reserve(self, ports: Iterable[int]) -> None:
        """Hold explicitly requested ports (any unprivileged port, in the range or not).

        All or nothing: if one port is unusable none is held.
        """
        wanted = [parse_port(p, "local port") for p in ports]
        seen: Set[int] = set()
        for port in wanted:
            if port in seen:
                raise InvalidArgument(f"local port {port} is listed twice: list each port once")
            seen.add(port)
            if port < FIRST_UNPRIVILEGED_PORT:
                raise InvalidArgument(
                    f"local port {port} is privileged and relays run without privileges: "
                    f"choose a port >= {FIRST_UNPRIVILEGED_PORT}"
                )
            if port in self._held:
                raise AlreadyExists(
                    f"port {port} on {self.host} is already used by another scistream endpoint: "
                    "choose other local ports, or none to allocate from port_range"
                )
        for port in wanted:
            if not self._probe(self.host, port):
                raise AlreadyExists(
                    f"port {port} on {self.host} is in use by another program: "
                    "choose other local ports, or none to allocate from port_range"
                )
        self._held.update(wanted)
        logger.debug("reserved ports %s on %s", wanted, self.host)

    def adopt(self, ports: Iterable[int]) -> None:
        """Mark ports held without probing: they belong to relays that are already running."""
        adopted = [parse_port(p, "adopted port") for p in ports]
        self._held.update(adopted)

    def release(self, ports: Iterable[int]) -> None:
        """Return ports; releasing a port that is not held is not an error."""
        for port in ports:
            self._held.discard(port)
