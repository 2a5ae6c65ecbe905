"""What a relay is doing: bytes, connections, process, target health (pure).

Sources, all of them systemd's or the relay's own (no sampling of sockets):

- bytes: the relay units' IP accounting (IPAccounting=yes). With socket
  activation systemd counts the traffic of the listening socket and of every
  connection accepted from it on the *.socket* unit, and the relay's own
  connections to its targets on the *.service* unit; a relay's bytes are
  the sum of both units (relay_unit.py sets IPAccounting on both). IP
  accounting counts whole IP packets: headers, TLS records and ACKs included.
- connections: stunnel's per-connection journal lines (level notice, the
  default relay_log_level), read by the daemon through the journal's reader
  filtered by the relay units. Each line carries stunnel's connection number
  (``LOG5[7]``): "accepted connection" opens number 7, "Connection
  closed/reset" ends it. Pairing by number, per relay process (its
  invocation id), is exact: a lost or repeated line cannot drift the count
  below zero or keep a connection of a dead process open.
- target health: stunnel's "s_connect: connect IP:PORT: Connection refused
  (111)" (a failure) and "s_connect: connected IP:PORT" (a success) lines.

Imports nothing from D-Bus, systemd or the journal: the daemon feeds it.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Deque, Optional, Set, Tuple

#: TargetReachable values.
REACHABLE_YES = "yes"
REACHABLE_NO = "no"
REACHABLE_UNKNOWN = "unknown"
REACHABLE_VALUES = (REACHABLE_YES, REACHABLE_NO, REACHABLE_UNKNOWN)
#: The window the current rate is taken over (seconds).
RATE_WINDOW = 5.0


@dataclass(frozen=True)
class Traffic:
    """A snapshot of one endpoint's counters (the Endpoint properties, snake_case)."""

    bytes_in: int = 0
    bytes_out: int = 0
    connections_active: int = 0
    connections_total: int = 0
    main_pid: int = 0
    memory_current: int = 0
    target_reachable: str = REACHABLE_UNKNOWN
    target_failures: int = 0
    last_target_failure: str = ""
    #: µs since the epoch; 0: never
    last_target_failure_at: int = 0
    #: bytes per second over the last RATE_WINDOW seconds (0 when idle)
    rate_in: float = 0.0
    rate_out: float = 0.0


# ---------------------------------------------------------------------------
# stunnel's journal lines

#: "2026.12.03 10:39:50 LOG5[1]: text": the date is there when stunnel logs to
#: stderr (as relays do); the number in brackets is the connection's ("ui": none).
_LINE = re.compile(r"^(?:\S+ \S+ )?LOG([0-7])\[([0-9]+)\]: (.*)$")
_ACCEPTED = re.compile(r"^Service \[[^\]]{1,64}\] accepted connection from (\S{1,64})$")
_ENDED = re.compile(r"^Connection (closed|reset): ")
_CONNECTED = re.compile(r"^s_connect: connected (\S{1,64})$")
_CONNECT_FAILED = re.compile(r"^(?:s_connect|connect_blocking): connect (\S{1,64}): (.{1,200})$")

ACCEPTED = "accepted"
ENDED = "ended"
CONNECTED = "connected"
CONNECT_FAILED = "connect_failed"


@dataclass(frozen=True)
class RelayEvent:
    """One per-connection line of stunnel, parsed."""

    kind: str  # ACCEPTED, ENDED, CONNECTED, CONNECT_FAILED
    conn: int  # stunnel's connection number
    address: str = ""  # the peer (accepted) or the target (connected, connect_failed)
    reason: str = ""  # connect_failed: stunnel's text, e.g. "Connection refused (111)"


def parse_relay_line(message: object) -> Optional[RelayEvent]:
    """The event of one stunnel log line, or None for every other line."""
    if not isinstance(message, str) or len(message) > 400:
        return None
    m = _LINE.match(message)
    if m is None:
        return None
    conn, text = int(m.group(2)), m.group(3)
    hit = _ACCEPTED.match(text)
    if hit:
        return RelayEvent(ACCEPTED, conn, hit.group(1))
    if _ENDED.match(text):
        return RelayEvent(ENDED, conn)
    hit = _CONNECTED.match(text)
    if hit:
        return RelayEvent(CONNECTED, conn, hit.group(1))
    hit = _CONNECT_FAILED.match(text)
    if hit:
        return RelayEvent(CONNECT_FAILED, conn, hit.group(1), hit.group(2).strip())
    return None


def failure_text(target: str, reason: str, inbound: bool) -> str:
    """What a failed connection to ``target`` means, for people."""
    what = ("the server application at" if inbound else
            "the inbound relay (the peer's listener) at")
    if "refused" in reason.lower():
        return f"{what} {target} refused the connection"
    if "timed out" in reason.lower():
        return f"{what} {target} did not answer (connection timed out)"
    return f"connecting to {what[4:]} {target} failed: {reason}"


# ---------------------------------------------------------------------------
# per-endpoint state the daemon keeps


class Counters:
    """The mutable counters of one endpoint; ``snapshot()`` gives its Traffic.

    Every ``on_*`` method returns whether anything visible changed.
    """

    def __init__(self, inbound: bool) -> None:
        self.inbound = inbound
        self.bytes_in = 0
        self.bytes_out = 0
        self.main_pid = 0
        self.memory_current = 0
        self.total = 0
        #: the relay process (invocation id) and its open connection numbers
        self.invocation = ""
        self.open: Set[int] = set()
        self.reachable = REACHABLE_UNKNOWN
        self.failures = 0
        self.last_failure = ""
        self.last_failure_at = 0
        #: (monotonic time, bytes_in, bytes_out), oldest first
        self.samples: Deque[Tuple[float, int, int]] = deque(maxlen=16)

    # -- journal
    def on_event(self, ev: RelayEvent, invocation: str, at_us: int) -> bool:
        if invocation and invocation != self.invocation:
            # A new relay process: the old one's connections died with it.
            self.invocation = invocation
            self.open.clear()
        if ev.kind == ACCEPTED:
            if ev.conn in self.open:
                return False  # the same line seen twice
            self.open.add(ev.conn)
            self.total += 1
            return True
        if ev.kind == ENDED:
            if ev.conn not in self.open:
                return False
            self.open.discard(ev.conn)
            return True
        if ev.kind == CONNECTED:
            return self.set_reachable(REACHABLE_YES)
        if ev.kind == CONNECT_FAILED:
            self.failures += 1
            self.last_failure = failure_text(ev.address, ev.reason, self.inbound)
            self.last_failure_at = at_us
            self.reachable = REACHABLE_NO
            return True
        return False

    def relay_stopped(self) -> bool:
        """The relay process ended: none of its connections is open any more."""
        changed = bool(self.open)
        self.open.clear()
        self.invocation = ""
        return changed

    def set_reachable(self, value: str) -> bool:
        if value == self.reachable:
            return False
        self.reachable = value
        return True

    def set_failure(self, failures: int, text: str, at_us: int, reachable: str) -> bool:
        """Target health learnt elsewhere (the peer's answer, for an outbound endpoint)."""
        new = (failures, text, at_us, reachable)
        if new == (self.failures, self.last_failure, self.last_failure_at, self.reachable):
            return False
        self.failures, self.last_failure, self.last_failure_at, self.reachable = new
        return True

    # -- systemd
    def on_accounting(self, now: float, bytes_in: int, bytes_out: int,
                      memory: Optional[int] = None) -> bool:
        changed = (bytes_in, bytes_out) != (self.bytes_in, self.bytes_out)
        self.bytes_in, self.bytes_out = bytes_in, bytes_out
        self.samples.append((now, bytes_in, bytes_out))
        if memory is not None and memory != self.memory_current:
            self.memory_current = memory
            changed = True
        return changed

    def rates(self, now: float) -> Tuple[float, float]:
        """Bytes per second in and out over the last RATE_WINDOW seconds."""
        recent = [s for s in self.samples if now - s[0] <= RATE_WINDOW + 0.5]
        if len(recent) < 2 or recent[-1][0] - recent[0][0] <= 0:
            return 0.0, 0.0
        (t0, i0, o0), (t1, i1, o1) = recent[0], recent[-1]
        dt = t1 - t0
        return max(0, i1 - i0) / dt, max(0, o1 - o0) / dt

    @property
    def active(self) -> int:
        return len(self.open)

    def snapshot(self, now: float) -> Traffic:
        rate_in, rate_out = self.rates(now)
        return Traffic(
            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            connections_active=self.active, connections_total=self.total,
            main_pid=self.main_pid, memory_current=self.memory_current,
            target_reachable=self.reachable, target_failures=self.failures,
            last_target_failure=self.last_failure, last_target_failure_at=self.last_failure_at,
            rate_in=rate_in, rate_out=rate_out)


def accounting_value(value: object) -> int:
    """A systemd accounting property as a count: systemd says "no data" with 2^64-1."""
    if not isinstance(value, int) or value < 0 or value >= 2 ** 64 - 1:
        return 0
    return value


def sum_accounting(*values: object) -> int:
    return sum(accounting_value(v) for v in values)

