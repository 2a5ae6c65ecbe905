"""The peer port's listening socket and its connection caps (peerserver.py serves
what gets through): binding with a hint per failure, and at most so many
connections at once, so many of them from one source address, so that one
source, even one that never starts TLS, cannot keep the others out."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections import Counter

from .errors import ScistreamError
from .model import IPAddress

logger = logging.getLogger("scistreamd.peerserver")

#: A flood of refused connections is logged at most once per this many seconds.
REFUSAL_LOG_INTERVAL = 10.0


def bind_listener(host: IPAddress, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on host:port; ScistreamError saying what to fix."""
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Rebinding right after a restart must not fail on TIME_WAIT leftovers;
        # on Linux this still refuses a port another socket listens on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # "::" takes IPv4 peers too, whatever the sysctl
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((str(host), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another program listens there (see: ss -ltnp 'sport = :"
                              f"{port}'); stop it or choose another peer_port",
            errno.EADDRNOTAVAIL: "that address is not configured on this host; fix "
                                 "listen_address",
            errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE; choose peer_port "
                          ">= 1024",
        }.get(e.errno or 0, "check listen_address and peer_port")
        raise ScistreamError(f"cannot listen on the peer port {where}: "
                             f"{e.strerror or e}; {hint}") from None
    return sock


class ConnectionCaps:
    """How many connections are open, in all and per source address."""

    def __init__(self, max_connections: int, max_per_source: int) -> None:
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self._open = 0
        self._per_source: Counter = Counter()
        self._refused = 0
        self._refused_logged_at = -REFUSAL_LOG_INTERVAL

    def admit(self, source: str, who: str) -> bool:
        """Count a new connection from ``source`` in, or refuse it (and say so, sparingly)."""
        if self._open < self.max_connections and self._per_source[source] < self.max_per_source:
            self._open += 1
            self._per_source[source] += 1
            return True
        self._refused += 1
        now = time.monotonic()
        # A flood must not flood the journal too: one line per interval.
        if now - self._refused_logged_at >= REFUSAL_LOG_INTERVAL:
            logger.warning(
                "peer port: refused %d connection(s), the last from %s (%d open, "
                "max_connections %d; %d from that address, at most %d per address)",
                self._refused, who, self._open, self.max_connections,
                self._per_source[source], self.max_per_source)
            self._refused, self._refused_logged_at = 0, now
        return False

    def done(self, source: str) -> None:
        """A connection admitted from ``source`` ended."""
        self._open -= 1
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def clear(self) -> None:
        self._open = 0
        self._per_source.clear()
