"""What systemd runs vs what the Manager believes: the unit monitor (relay
state changes -> endpoint state) and adoption at start-up (persisted state
reconciled with the running relay units; see ``adopt``). A mixin of Manager."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Set, Tuple

from .errors import InvalidArgument
from .events import MSG_FAILURE
from .events import log_event as _log
from .hostprobe import HostProbes
from .model import (
    Endpoint,
    Role,
    State,
    socket_unit_name,
)
from .ports import PortAllocator
from .store import KeyStore, StateStore, parse_name
from .systemd import ABSENT, Systemd, SystemdError, UnitStatus, unit_object_path
from .traffic import Counters

if TYPE_CHECKING:
    pass

logger = logging.getLogger("scistreamd.manager")

RELAY_PATTERN = "scistream-*-*.service"
#: The relays' socket units (same names as their services, .socket).
SOCKET_PATTERN = socket_unit_name(RELAY_PATTERN)


class ReconcileMixin:
    """Uses the Manager's _by_unit_path, _main_pids, _refreshing, _rename_relay,
    _restarting, _set, _sockets, _start_unit, _stop_units, _teardown, _track, _write_keys,
    counters, counters_due, endpoints, keys, listener, ports, probes, store, systemd."""

    systemd: Systemd
    probes: HostProbes
    store: StateStore
    keys: KeyStore
    ports: PortAllocator
    endpoints: Dict[Tuple[str, Role], Endpoint]
    counters: Dict[Tuple[str, Role], Counters]
    listener: Any
    _by_unit_path: Dict[str, Tuple[str, Role]]
    _refreshing: Dict[Tuple[str, Role], asyncio.Task]
    _restarting: Set[Tuple[str, Role]]
    _sockets: Set[Tuple[str, Role]]
    _pids_due: List[Tuple[str, Role]]

    def _on_unit_change(self, path: str) -> None:
        key = self._by_unit_path.get(path)
        if key is None or key in self._refreshing:
            return
        self._refreshing[key] = asyncio.ensure_future(self._refresh(key))

    async def _refresh(self, key: Tuple[str, Role]) -> None:
        retry = ""
        try:
            await asyncio.sleep(0.01)  # coalesce a burst of PropertiesChanged
            ep = self.endpoints.get(key)
            if ep is None or self._not_monitored(ep):
                return
            try:
                st = await self.systemd.status(ep.unit)
            except SystemdError as e:
                # systemd or the bus is busy (e.g. LimitsExceeded): the change
                # must not be lost, so ask again shortly.
                logger.warning("reading the state of %s failed, retrying: %s", ep.unit, e)
                retry = unit_object_path(ep.unit)
                return
            # A release or re-arm may have begun meanwhile: its state wins.
            if self.endpoints.get(key) is not ep or self._not_monitored(ep):
                return
            self._apply_status(ep, st)
        except Exception:
            logger.exception("refreshing endpoint state failed")
        finally:
            self._refreshing.pop(key, None)
            if retry:
                asyncio.get_running_loop().call_later(0.5, self._on_unit_change, retry)

    def _not_monitored(self, ep: Endpoint) -> bool:
        return ep.state in (State.STARTING, State.RELEASING) or ep.key in self._restarting

    def _apply_status(self, ep: Endpoint, st, pid_known: bool = True) -> None:
        """``pid_known``: False when ``st.main_pid`` was not read (adoption)."""
        c = self.counters.get(ep.key)
        if c is not None and pid_known:
            changed = False
            if st.main_pid != c.main_pid:
                c.main_pid = st.main_pid
                changed = True
            if not st.main_pid:
                changed = c.relay_stopped() or changed
            if changed:
                self.listener.endpoint_changed(ep, ["counters"])
        if st.active_state in ("active", "activating", "reloading"):
            self._set(ep, state=State.ACTIVE, detail="", n_restarts=st.n_restarts)
        elif st.active_state == "deactivating":
            self._set(ep, n_restarts=st.n_restarts)
        else:
            why = ("the relay unit is gone" if st.active_state == ABSENT else
                   f"relay {st.active_state} ({st.result or st.sub_state})")
            if ep.state is State.FAILED:
                # The first reason stays: it is the one that says what went wrong
                # (e.g. a recreated relay's port taken), not "the unit is gone".
                self._set(ep, n_restarts=st.n_restarts)
                return
            _log(logging.ERROR, MSG_FAILURE, ep, "%s endpoint %s failed: %s",
                 ep.role.value, ep.uid, why)
            self._set(ep, state=State.FAILED,
                      detail=f"{why}; see 'scistreamctl logs {ep.uid}', then release it",
                      n_restarts=st.n_restarts)
            asyncio.ensure_future(self._add_failure_reason(ep, why))

    async def _add_failure_reason(self, ep: Endpoint, why: str) -> None:
        """Append the relay's own last error to StateDetail (e.g. "Address already in use")."""
        # The unit's failure reaches us over D-Bus before journald has stored
        # the relay's last stderr lines: give it a moment.
        await asyncio.sleep(0.5)
        last = await asyncio.to_thread(self.probes.last_relay_error, ep.unit)
        if last and self.endpoints.get(ep.key) is ep and ep.state is State.FAILED:
            self._set(ep, detail=f"{why}: {last}; see 'scistreamctl logs {ep.uid}', "
                                 "then release it")

    async def _adopt_each(self, eps: List[Endpoint], units: Dict[str, Tuple[str, str]],
                          running: Callable[[str], bool]) -> List[Endpoint]:
        """adopt()'s work per persisted endpoint; returns those whose relay runs."""
        adopted: List[Endpoint] = []
        for i, ep in enumerate(eps):
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the NRestarts calls go out (see adopt)
            if ep.state in (State.STARTING, State.RELEASING):
                logger.warning("rolling back interrupted %s of %s %s", ep.state.value,
                               ep.role.value, ep.uid)
                await self._teardown(ep)
                continue
            self.ports.adopt(h.port for h in ep.listeners)
            self._track(ep)
            if running(ep.unit):
                # A relay of an earlier version has no socket unit: adopted as it
                # is (it keeps its connections); a re-arm gives it one.
                if ep.socket_unit in units:
                    self._sockets.add(ep.key)
                adopted.append(ep)
                continue
            if ep.state is State.FAILED:
                continue
            # The units stop and start on purpose: not a failure for the monitor.
            self._restarting.add(ep.key)
            try:
                logger.info("recreating relay %s from persisted state", ep.unit)
                await self._stop_units(ep)
                # Rendered afresh: the config follows this version's layout
                # (e.g. a key directory written by 0.1.0).
                psk = self.keys.read_psk(ep.relay_id, ep.role, ep.uid)
                if ep.legacy_relay_id:
                    self._rename_relay(ep, psk)
                else:
                    self._write_keys(ep, psk)
                await self._start_unit(ep)
                self._set(ep, state=State.ACTIVE, detail="")
            except Exception as e:
                _log(logging.ERROR, MSG_FAILURE, ep, "recreating %s failed: %s", ep.unit, e)
                self._set(ep, state=State.FAILED,
                          detail=f"could not recreate the relay at start-up: {e}")
            finally:
                self._restarting.discard(ep.key)
        return adopted

    async def adopt(self) -> None:
        """Reconcile persisted state with the relay units systemd runs (start-up).

        - state + running unit: adopted as is (ports held, object exported);
        - state ``active`` + no running unit (e.g. after a reboot): the unit is
          recreated from the persisted root-only key; if that fails the
          endpoint stays, ``failed``, until released;
        - state ``starting``/``releasing`` (the daemon died mid-request): the
          request never completed, so it is rolled back;
        - a relay unit or key directory without state: an orphan, stopped and
          removed.
        """
        eps, _bad = self.store.load_all()
        # One ListUnitsByPatterns gives every relay's state; per relay only its
        # NRestarts is asked (below, concurrently): re-adoption stays fast at N=1000.
        units = {name: (active, sub) for name, active, sub
                 in await self.systemd.list_units([RELAY_PATTERN, SOCKET_PATTERN])}
        known_units = {u for ep in eps for u in (ep.unit, ep.socket_unit)}

        def running(unit: str) -> bool:
            return units.get(unit, ("inactive", ""))[0] in ("active", "activating",
                                                             "reloading")

        # NRestarts before READY=1: a crash while the daemon was down shows at once.
        # Asked for every running relay at the start and answered while the loop
        # below adopts them (systemd and the bus work meanwhile). The relays'
        # MainPID (only the counters show it) is read after READY=1 (run_counters):
        # asking it here too doubled the calls per relay.
        restarts_of = asyncio.ensure_future(self.systemd.n_restarts(
            [ep.unit for ep in eps
             if ep.state not in (State.STARTING, State.RELEASING) and running(ep.unit)]))
        try:
            adopted = await self._adopt_each(eps, units, running)
            restarts = await restarts_of
        except BaseException:
            restarts_of.cancel()
            raise
        for ep in adopted:
            self.counters_due(ep)
            active, sub = units[ep.unit]
            self._apply_status(ep, UnitStatus(ep.unit, active, sub, "",
                                              restarts.get(ep.unit, ep.n_restarts), 0),
                               pid_known=False)
        self._pids_due = [ep.key for ep in adopted]
        for name in units:
            if name not in known_units and name.endswith(".socket"):
                # Its service (if any) is stopped with it (Requires=) and below.
                logger.warning("stopping orphan relay socket %s (no state for it)", name)
                await self.systemd.stop(name)
                await self.systemd.reset_failed(name)
        for name in units:
            if name not in known_units and not name.endswith(".socket"):
                logger.warning("stopping orphan relay %s (no state for it)", name)
                await self.systemd.stop(name)
                await self.systemd.reset_failed(name)
        known_keys = {self.keys.endpoint_dir(ep.relay_id, ep.role).name
                      for ep in self.endpoints.values()}
        for name in self.keys.names():
            if name not in known_keys:
                try:
                    relay_id, role = parse_name(name)
                except InvalidArgument:
                    continue
                logger.warning("removing orphan key directory %s", name)
                self.keys.remove(relay_id, role)
        logger.info("adopted %d endpoints", len(self.endpoints))
