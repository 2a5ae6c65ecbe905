"""The counters' part of the Manager: journal lines in, accounting polls, Traffic out.

A mixin of Manager (manager.py keeps orchestration; this keeps counting). What
is counted where: traffic.py. The poller reads systemd only for endpoints
with activity (an open connection, a connection that just ended, a relay that
just started): 1000 idle endpoints cost no call and no timer at all. Reading
the properties does not trigger a read: a `list` of 500 endpoints then cost
0.9 s of daemon CPU instead of 0.16 s (measured), and an idle endpoint's
bytes do not change.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Set, Tuple

from .buspath import unit_object_path
from .events import log_event as _log
from .traffic import (
    CONNECT_FAILED,
    CONNECTED,
    RATE_WINDOW,
    REACHABLE_NO,
    REACHABLE_UNKNOWN,
    REACHABLE_YES,
    Counters,
    Traffic,
    parse_relay_line,
)

if TYPE_CHECKING:
    from .model import Endpoint, Role

logger = logging.getLogger("scistreamd.manager")

#: The relay could not reach its target (e.g. the server application refused), and
#: the first success after such failures.
MSG_TARGET_FAILED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a78")
MSG_TARGET_REACHED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a79")
#: Counter polls of endpoints with activity: their period, and how many polls an
#: endpoint gets after its last connection ended (its last bytes, its rate back to 0).
COUNTER_POLL_INTERVAL = 1.0
_COUNTER_POLLS_AFTER_IDLE = int(RATE_WINDOW) + 2  # until the rate shown is 0 again
#: At most this many endpoints are read per round (the least recently read first):
#: a read is five Gets (~1.4 ms of daemon CPU measured), so 1000 busy endpoints
#: cost a bounded ~15 % of a core, each read every 10 s, instead of 140 %.
MAX_READS_PER_ROUND = 100




class CountersMixin:
    """Needs the Manager's endpoints, counters, _hot, _polled_at, _poll_wakeup,
    _by_unit_path, _sockets, systemd and listener."""

    endpoints: Dict[Tuple[str, Role], Endpoint]
    counters: Dict[Tuple[str, Role], Counters]
    _hot: Dict[Tuple[str, Role], int]
    _polled_at: Dict[Tuple[str, Role], float]
    _poll_wakeup: asyncio.Event
    _by_unit_path: Dict[str, Tuple[str, Role]]
    _sockets: Set[Tuple[str, Role]]
    systemd: Any
    listener: Any
    _pids_due: List[Tuple[str, Role]]
    #: True while a restarted daemon replays its relays' past lines: counted, not
    #: logged again.
    _replaying = False

    async def _main_pids(self, units: Sequence[str]) -> Dict[str, int]:
        """MainPID of many relays (for adoption); {} where systemd cannot say."""
        try:
            return await self.systemd.main_pids(units)
        except Exception as e:
            logger.debug("reading the relays' MainPID failed: %s", e)
            return {}

    async def read_adopted_main_pids(self) -> None:
        """The MainPID of the relays adopted at start-up (after READY=1; see adopt)."""
        keys, self._pids_due = self._pids_due, []
        eps = [self.endpoints[k] for k in keys if k in self.endpoints]
        if not eps:
            return
        pids = await self._main_pids([ep.unit for ep in eps])
        for ep in eps:
            c = self.counters.get(ep.key)
            # A unit change seen meanwhile may have set it already (the monitor's read).
            if c is None or ep.unit not in pids or c.main_pid:
                continue
            c.main_pid = pids[ep.unit]
            if c.main_pid:
                self.listener.endpoint_changed(ep, ["counters"])

    def traffic(self, ep: Endpoint) -> Traffic:
        """What the relay of ``ep`` is doing now (its counters; zeros if it has none)."""
        c = self.counters.get(ep.key)
        return c.snapshot(time.monotonic()) if c is not None else Traffic()

    def counters_due(self, ep: Endpoint) -> None:
        """Read the counters of ``ep`` at the next poll (its relay just started)."""
        if ep.key in self.counters:
            self._hot[ep.key] = max(1, self._hot.get(ep.key, 0))
            self._poll_wakeup.set()

    def on_relay_line(self, unit: str, invocation: str, message: str, at_us: int) -> None:
        """One journal line of relay ``unit`` (relaylog.py feeds them, oldest first)."""
        key = self._by_unit_path.get(unit_object_path(unit))
        ev = parse_relay_line(message)
        if key is None or ev is None:
            return
        ep, c = self.endpoints.get(key), self.counters.get(key)
        if ep is None or c is None:
            return
        was = c.reachable
        if not c.on_event(ev, invocation, at_us):
            return
        # Lines a restarted daemon replays are counted, not logged again.
        if not self._replaying and ev.kind == CONNECT_FAILED and (
                was != REACHABLE_NO or c.failures == 1):
            _log(logging.WARNING, MSG_TARGET_FAILED, ep, "%s endpoint %s: %s",
                 ep.role.value, ep.uid, c.last_failure)
        elif not self._replaying and ev.kind == CONNECTED and was == REACHABLE_NO:
            _log(logging.INFO, MSG_TARGET_REACHED, ep, "%s endpoint %s reaches its target %s "
                 "again", ep.role.value, ep.uid, ev.address)
        if ev.kind not in (CONNECTED, CONNECT_FAILED):
            # Bytes move while connections are open: read them every poll until
            # the last one ended, and a few times more for its last bytes.
            self._hot[key] = _COUNTER_POLLS_AFTER_IDLE
            self._poll_wakeup.set()
        self.listener.endpoint_changed(ep, ["counters"])

    async def poll_counters(self) -> None:
        """Read the accounting of every endpoint with activity (one round of the poller)."""
        keys = sorted(self._hot, key=lambda k: self._polled_at.get(k, 0.0))
        keys = keys[:MAX_READS_PER_ROUND]
        if not keys:
            return

        async def one(key: Tuple[str, Role]) -> None:
            ep, c = self.endpoints.get(key), self.counters.get(key)
            if ep is None or c is None:
                self._hot.pop(key, None)
                return
            sock = ep.socket_unit if key in self._sockets else ""
            try:
                bytes_in, bytes_out, memory = await self.systemd.accounting(ep.unit, sock)
            except Exception as e:
                logger.debug("reading the counters of %s failed: %s", ep.unit, e)
                return
            now = time.monotonic()
            self._polled_at[key] = now
            changed = c.on_accounting(now, bytes_in, bytes_out, memory)
            if c.active:
                self._hot[key] = _COUNTER_POLLS_AFTER_IDLE
            else:
                left = self._hot.get(key, 1) - 1
                if left > 0:
                    self._hot[key] = left
                else:
                    self._hot.pop(key, None)
            if changed or len(c.samples) > 1:
                # Unchanged bytes still move the rate (the API signals only what differs).
                self.listener.endpoint_changed(ep, ["counters"])

        await asyncio.gather(*(one(k) for k in keys))

    async def run_counters(self) -> None:
        """Follow the relays' journal lines and poll the counters of active endpoints."""
        follower = None
        await self.read_adopted_main_pids()
        try:
            from .relaylog import RelayJournal

            since = min((ep.created_at for ep in self.endpoints.values()), default=time.time())
            follower = RelayJournal(self.on_relay_line)
            self._replaying = True
            try:
                await follower.start(int(since * 1e6))
            finally:
                self._replaying = False
        except Exception as e:
            logger.warning("connection counts and target health are unavailable: reading the "
                           "relays' journal lines failed (%s)", e)
            follower = None
        try:
            while True:
                if not self._hot:
                    # Idle: no timer at all until a journal line or a reader wakes us.
                    await self._poll_wakeup.wait()
                self._poll_wakeup.clear()
                try:
                    await self.poll_counters()
                except Exception:
                    logger.exception("reading counters failed")
                # At most one round per period, however often activity wakes us.
                await asyncio.sleep(COUNTER_POLL_INTERVAL)
        finally:
            if follower is not None:
                follower.close()

    def peer_target_health(self, ep: Endpoint, doc: Dict[str, Any]) -> None:
        """An outbound endpoint learns its server application's health from the peer."""
        c = self.counters.get(ep.key)
        reachable = doc.get("target_reachable")
        if c is None or reachable not in (REACHABLE_YES, REACHABLE_NO, REACHABLE_UNKNOWN):
            return
        failures = doc.get("target_failures", 0)
        at = doc.get("last_target_failure_at", 0)
        text = doc.get("last_target_failure", "")
        if not isinstance(failures, int) or not isinstance(at, int) or not isinstance(text, str):
            return
        if text:
            text = f"{text} (reported by the peer {ep.peer})"
        was = c.reachable
        if c.set_failure(max(0, failures), text, max(0, at), reachable):
            if reachable == REACHABLE_NO and was != REACHABLE_NO:  # once per outage
                _log(logging.WARNING, MSG_TARGET_FAILED, ep, "outbound endpoint %s: %s", ep.uid,
                     text)
            self.listener.endpoint_changed(ep, ["counters"])

