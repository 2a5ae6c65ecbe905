"""The relay units' part of the Manager: keys and stunnel config written, the
relay's .service and .socket units started, stopped, re-keyed, and their IP
allow lists set (a mixin of Manager: manager.py decides what happens to an
endpoint, this does it to its units)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set, Tuple

from .config import Config
from .errors import RelayFailed
from .events import MSG_REQUEST
from .events import log_event as _log
from .hostprobe import HostProbes
from .model import (
    Endpoint,
    IPAddress,
    Role,
    new_relay_id,
    next_key_generation,
)
from .relay import (
    new_psk,
    relay_file_path,
    render_psk_file,
    render_stunnel_config,
)
from .relay_unit import allow_property, relay_socket_properties, relay_unit_properties
from .store import PSK_FILE, KeyStore, StateStore
from .systemd import UNIT_EXISTS, Systemd, SystemdError, unit_object_path

if TYPE_CHECKING:
    pass

logger = logging.getLogger("scistreamd.manager")


class RelayUnitsMixin:
    """Uses the Manager's _by_unit_path, _set, _sockets, cfg, endpoints, keys, probes,
    store, systemd."""

    cfg: Config
    systemd: Systemd
    probes: HostProbes
    store: StateStore
    keys: KeyStore
    endpoints: Dict[Tuple[str, Role], Endpoint]
    _by_unit_path: Dict[str, Tuple[str, Role]]
    _sockets: Set[Tuple[str, Role]]

    def _new_relay_id(self) -> str:
        """A relay id no tracked endpoint uses (64 random bits: a clash is only theory)."""
        taken = {e.relay_id for e in self.endpoints.values()}
        while True:
            relay_id = new_relay_id()
            if relay_id not in taken:
                return relay_id

    def _rename_relay(self, ep: Endpoint, psk: str) -> None:
        """Give a relay still named by its uid (a record of an earlier version) an
        opaque relay id: new key directory, record, unit name. Its old unit must
        be stopped; the caller starts the new one. Crash-safe: until the record
        is saved the old directory stays, and the new one is an orphan adopt() removes.
        """
        old_unit, old_id = ep.unit, ep.relay_id
        ep.relay_id = self._new_relay_id()
        self._write_keys(ep, psk)
        self.store.save(ep)
        self.keys.remove(old_id, ep.role)
        self._by_unit_path.pop(unit_object_path(old_unit), None)
        self._by_unit_path[unit_object_path(ep.unit)] = ep.key
        _log(logging.INFO, MSG_REQUEST, ep, "relay %s renamed %s: unit names no longer carry "
             "the uid", old_unit, ep.unit)

    def _write_keys(self, ep: Endpoint, psk: str) -> Tuple[Path, Path]:
        conf = render_stunnel_config(ep, psk_path=relay_file_path(PSK_FILE),
                                     ciphersuites=self.cfg.relay_ciphersuites,
                                     log_level=self.cfg.relay_log_level)
        return self.keys.write(ep.relay_id, ep.role, render_psk_file(ep.uid, psk), conf)

    async def _start_unit(self, ep: Endpoint, fresh: bool = False,
                          queued: Optional[Callable[[], None]] = None) -> None:
        """Create and start the relay (and its socket unit); raise RelayFailed if it did not.

        With socket activation one call creates both units and starts the
        relay, which Requires= its socket: systemd binds the listeners first
        and the job fails at once if a port is taken. When the job is done the
        listeners are bound and the relay runs; connections that arrive before
        stunnel accepts wait in the socket's backlog, so nothing polls for them.

        ``fresh``: the relay id was just made (a new endpoint), so no unit of
        that name can be left over and the failed-state reset is skipped (two
        round trips to systemd a request); should one exist after all, systemd
        answers UnitExists and the start is retried after the reset.

        ``queued()``: called once the units exist and the relay's start is queued
        (systemd.start_transient).
        """
        props = relay_unit_properties(ep, self.cfg, self.keys.endpoint_dir(ep.relay_id, ep.role))
        sock = self.cfg.relay_socket_activation
        aux = [(ep.socket_unit, relay_socket_properties(ep, self.cfg))] if sock else []
        units = [ep.unit, ep.socket_unit] if sock else [ep.unit]
        if sock:
            self._sockets.add(ep.key)
        # A failed unit of the same name (an earlier crash) would block the start:
        # a re-start resets it in the start's own round trip; a new relay's name is
        # new, so only a leftover unit (UnitExists) costs the reset and a retry.
        t0 = time.monotonic()
        try:
            try:
                result = await self.systemd.start_transient(
                    ep.unit, props, aux=aux, timeout=self.cfg.relay_start_timeout,
                    reset_failed=() if fresh else units, queued=queued)
            except SystemdError as e:
                if not fresh or e.name != UNIT_EXISTS:
                    raise
                logger.warning("%s: a unit of that name was left over (%s): resetting it "
                               "and starting again", ep.unit, e.message)
                result = await self.systemd.start_transient(
                    ep.unit, props, aux=aux, timeout=self.cfg.relay_start_timeout,
                    reset_failed=units, queued=queued)
        except SystemdError as e:
            raise RelayFailed(f"systemd refused to start {ep.unit}: {e.message}") from e
        except asyncio.TimeoutError as e:
            raise RelayFailed(f"{ep.unit} did not start within "
                              f"{self.cfg.relay_start_timeout:g}s") from e
        if result != "done":
            if sock:
                await self._raise_bind_failure(ep, result)
            raise RelayFailed(f"{ep.unit} failed to start (job {result}): "
                              f"see 'scistreamctl logs {ep.uid}'")
        t1 = time.monotonic()
        if not sock:
            await self._wait_listening(ep)
        logger.debug("%s: started in %.1f ms, listening %.1f ms later", ep.unit,
                     (t1 - t0) * 1000, (time.monotonic() - t1) * 1000)

    async def _raise_bind_failure(self, ep: Endpoint, result: str) -> None:
        """Name why the socket unit did not start: usually a listener port someone holds."""
        sock_result = await self.systemd.socket_result(ep.socket_unit)
        if sock_result == "success":
            # The listeners are bound, by our own socket unit (which a probe would
            # call "in use"): the relay itself failed.
            return
        taken = await asyncio.to_thread(self.probes.taken, ep.listeners)
        if taken:
            raise RelayFailed(
                f"listener {', '.join(map(str, taken))} of tunnel {ep.uid} is in use by another "
                "process on this host (address already in use): stop that process, or "
                "take the port out of port_range, and request the tunnel again")
        if sock_result and sock_result != "success":
            raise RelayFailed(
                f"systemd could not open the listeners {', '.join(map(str, ep.listeners))} of "
                f"tunnel {ep.uid} ({ep.socket_unit}: {sock_result}): see 'journalctl -u "
                f"{ep.socket_unit}'")

    async def _wait_listening(self, ep: Endpoint) -> None:
        deadline = time.monotonic() + self.cfg.relay_start_timeout
        delay = 0.002
        while not self.probes.listening(ep.listeners):
            # Polled every few ms while the caller waits: only the one small call
            # that says whether the relay still runs; its full status on failure.
            _load, active, _sub = await self.systemd.unit_state(ep.unit)
            if active not in ("active", "activating", "reloading"):
                st = await self.systemd.status(ep.unit)
                raise RelayFailed(
                    f"relay {ep.unit} exited ({st.active_state}/{st.result or st.sub_state}) "
                    f"before listening on {', '.join(map(str, ep.listeners))}: a port may be "
                    f"taken; see 'scistreamctl logs {ep.uid}'")
            if time.monotonic() > deadline:
                raise RelayFailed(
                    f"relay {ep.unit} is not listening on {', '.join(map(str, ep.listeners))} "
                    f"after {self.cfg.relay_start_timeout:g}s: see 'scistreamctl logs {ep.uid}'")
            await asyncio.sleep(delay)
            # stunnel listens some 10-40 ms after systemd reports it started: poll
            # finely there, where every millisecond is the caller's.
            delay = min(delay * 1.5, 0.01)

    async def _stop_units(self, ep: Endpoint) -> None:
        """Stop the relay and its socket unit (if any) and forget both.

        Both stop jobs are queued at once (one round trip, not two): the socket
        stops in the same go, so a connection arriving meanwhile cannot start the
        relay again. Every unit is tried whatever happens to the other: nothing
        may be left behind.
        """
        units = (ep.socket_unit, ep.unit)
        stopped = await asyncio.gather(*(self.systemd.stop(u) for u in units),
                                       return_exceptions=True)
        for unit, res in zip(units, stopped):
            if isinstance(res, BaseException):  # keep going: the rest must be returned
                logger.error("stopping %s failed: %s", unit, res)
        reset = await asyncio.gather(*(self.systemd.reset_failed(u) for u in units),
                                     return_exceptions=True)
        for unit, res in zip(units, reset):
            if isinstance(res, BaseException):
                logger.debug("reset-failed of %s: %s", unit, res)

    async def _allow_only(self, ep: Endpoint, claimant_ip: Any) -> None:
        """Make the listeners of ``ep`` accept TCP from ``claimant_ip`` only (None: from
        nobody). Raises SystemdError if systemd refuses: a claim is then refused and
        consumes nothing (the list is in force before the key leaves)."""
        if ep.key not in self._sockets:
            logger.warning("%s has no socket unit (relay_socket_activation is off, or an "
                           "earlier version made it): its listeners accept any address",
                           ep.unit)
            return
        want = dataclasses.replace(ep, claimant_ip=claimant_ip)
        await self.systemd.set_properties(ep.socket_unit, [allow_property(want, self.cfg)])

    async def _rekey(self, ep: Endpoint, claimant_ip: Optional[IPAddress]) -> str:
        """Give inbound ``ep`` a new key and restart its relay with it; the listeners then
        admit ``claimant_ip`` only (None: nobody). Returns the key; RelayFailed if the
        relay did not restart. The caller holds the uid's lock and marks ``ep`` restarting.

        The generation is counted (and saved) before the key is written: a crash
        between the two makes the old claimant see a new generation while its key
        still works (a false alarm), never a dead key under the old generation.
        """
        self._set(ep, key_generation=next_key_generation(ep.key_generation))
        psk = new_psk()
        self._write_keys(ep, psk)
        try:
            if await self._socket_listening(ep):
                # The socket keeps the ports bound while the relay restarts
                # with the new key (no window for another process to take
                # them); its allow list changes while the relay is down.
                await self.systemd.stop(ep.unit, timeout=self.cfg.relay_start_timeout)
                await self._allow_only(ep, claimant_ip)
                await self.systemd.reset_failed(ep.unit)
                result = await self.systemd.start(ep.unit, timeout=self.cfg.relay_start_timeout)
                if result != "done":
                    raise RelayFailed(f"{ep.unit} failed to restart (job {result}): "
                                      f"see 'scistreamctl logs {ep.uid}'")
            else:
                # No socket unit (a relay of an earlier version) or a failed one:
                # stop everything and start a fresh pair rather than RestartUnit,
                # so the units have this version's properties. _start_unit also
                # resets the failed state, so quick re-arms never hit the start
                # rate limit.
                self._set(ep, claimant_ip=claimant_ip)
                await self._stop_units(ep)
                if ep.legacy_relay_id:
                    self._rename_relay(ep, psk)
                await self._start_unit(ep)
        except (SystemdError, asyncio.TimeoutError) as e:
            raise RelayFailed(f"restarting {ep.unit} failed: {e}") from e
        return psk

    async def _socket_listening(self, ep: Endpoint) -> bool:
        if ep.key not in self._sockets:
            return False
        _load, active, _sub = await self.systemd.unit_state(ep.socket_unit)
        return active == "active"
