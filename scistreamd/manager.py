"""Orchestration: inbound, outbound, release, claim, re-arm and adoption of endpoints.

The one module that combines validation, ports, keys, state and systemd.
Every request either completes or is rolled back: ports, unit, key files,
state and the D-Bus object are returned on every failure path.

Ordering that makes a crash at any point recoverable (see ``adopt``):
1. ports held, keys written, state saved as ``starting``;
2. the unit is started and its listeners checked;
3. state saved as ``active``, reply sent.
Release runs the other way: state ``releasing``, unit stopped, keys and
state removed, ports freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from pathlib import Path
from typing import (
    Any,
    AsyncIterator,
    Dict,
    Iterable,
    List,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
)

from .config import Config
from .errors import (
    AccessDenied,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PortsExhausted,
    RelayFailed,
    ScistreamError,
    WrongListener,
)
from .hostprobe import HostProbes
from .identity import LEGACY_OWNER
from .model import (
    Endpoint,
    HostPort,
    PeerIdentity,
    Role,
    State,
    new_relay_id,
    new_uid,
    parse_allowed_peer,
    parse_claimant_ip,
    parse_hostport,
    parse_hostport_list,
    parse_ip,
    parse_num_conn,
    parse_options,
    parse_port_list,
    parse_uid,
    peer_matches,
    socket_unit_name,
)
from .peerclient import PeerClient
from .peertls import check_trust_pem
from .peerwire import PeerEndpoint
from .ports import PortAllocator
from .relay import new_psk, relay_file_path, render_psk_file, render_stunnel_config
from .relay_unit import allow_property, relay_socket_properties, relay_unit_properties
from .store import PSK_FILE, KeyStore, StateStore, parse_name
from .systemd import ABSENT, Systemd, SystemdError, UnitStatus, unit_object_path
from .targets import target_refusal

logger = logging.getLogger(__name__)

#: journald MESSAGE_IDs of the daemon's tunnel events (journalctl MESSAGE_ID=...).
MSG_REQUEST = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a71")
MSG_RELEASE = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a72")
MSG_FAILURE = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a73")
MSG_CLAIM = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a74")
#: A refused claim (same id as peerwire.MSG_PEER_REFUSED, which the peer port logs).
MSG_CLAIM_REFUSED = uuid.UUID("5a1f0c7e6b6d4f3e9a4b2d1c0e9f8a75")
#: How many released inbound uids a claim can still tell apart from unknown ones.
_RELEASED_MEMORY = 4096
RELAY_PATTERN = "scistream-*-*.service"
#: The relays' socket units (same names as their services, .socket).
SOCKET_PATTERN = socket_unit_name(RELAY_PATTERN)


def _log(level: int, msg_id: uuid.UUID, ep: Endpoint, text: str, *args: Any) -> None:
    """A journal line carrying the endpoint's fields, so journalctl SCISTREAM_UID=x finds it.

    SCISTREAM_UNIT names the relay's unit: scistreamctl logs reads it to find
    the relay's own lines, which carry no uid (relay_unit.py says why).
    """
    logger.log(level, text, *args, extra={
        "MESSAGE_ID": msg_id.hex, "SCISTREAM_UID": ep.uid, "SCISTREAM_ROLE": ep.role.value,
        "SCISTREAM_UNIT": ep.unit, "SCISTREAM_OWNER": ep.owner})


class EndpointListener(Protocol):
    def endpoint_added(self, ep: Endpoint) -> None: ...
    def endpoint_changed(self, ep: Endpoint, changed: Iterable[str]) -> None: ...
    def endpoint_removed(self, ep: Endpoint) -> None: ...


class _NoListener:
    def endpoint_added(self, ep: Endpoint) -> None:
        pass

    def endpoint_changed(self, ep: Endpoint, changed: Iterable[str]) -> None:
        pass

    def endpoint_removed(self, ep: Endpoint) -> None:
        pass


class Manager:
    def __init__(self, cfg: Config, systemd: Systemd, peers: PeerClient, *,
                 listener: Optional[EndpointListener] = None,
                 probes: Optional[HostProbes] = None) -> None:
        self.cfg = cfg
        self.systemd = systemd
        self.peers = peers
        #: listening sockets, journal, group: a test passes fakes.
        self.probes = probes or HostProbes()
        self.store = StateStore(cfg.state_dir)
        self.keys = KeyStore(cfg.key_dir, self.probes.relay_gid())
        self.ports = PortAllocator(cfg.listen_address, *cfg.port_range)
        self.endpoints: Dict[Tuple[str, Role], Endpoint] = {}
        self.listener: EndpointListener = listener or _NoListener()
        self._by_unit_path: Dict[str, Tuple[str, Role]] = {}
        #: per uid: its lock and how many hold or await it (see _lock).
        self._uid_locks: Dict[str, Tuple[asyncio.Lock, List[int]]] = {}
        self._refreshing: Dict[Tuple[str, Role], asyncio.Task] = {}
        #: Endpoints whose relay is being restarted on purpose (re-arm).
        self._restarting: Set[Tuple[str, Role]] = set()
        #: Inbound uids released here, oldest first (this run only): a late claim
        #: gets "released", not "unknown uid".
        self._released: Dict[str, None] = {}
        #: Endpoints whose listeners a .socket unit holds (the others: relays
        #: adopted from a version without socket units, or relay_socket_activation off).
        self._sockets: Set[Tuple[str, Role]] = set()
        systemd.on_unit_change(self._on_unit_change)

    # ------------------------------------------------------------- helpers
    @contextlib.asynccontextmanager
    async def _lock(self, uid: str) -> AsyncIterator[None]:
        """Hold the uid's lock. It exists while someone holds or awaits it, and no
        longer: a lock kept per uid ever asked about (a peer's claims of random
        uids) would grow without bound, and one dropped while awaited (as release
        did) let the next request run beside the waiter."""
        entry = self._uid_locks.get(uid)
        if entry is None:
            entry = self._uid_locks[uid] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._uid_locks[uid]

    def _track(self, ep: Endpoint) -> None:
        self.endpoints[ep.key] = ep
        self._by_unit_path[unit_object_path(ep.unit)] = ep.key
        self.listener.endpoint_added(ep)

    def _untrack(self, ep: Endpoint) -> None:
        if self.endpoints.pop(ep.key, None) is not None:
            self.listener.endpoint_removed(ep)
        self._by_unit_path.pop(unit_object_path(ep.unit), None)
        self._sockets.discard(ep.key)

    def _set(self, ep: Endpoint, persist: bool = True, **changes: Any) -> None:
        changed = [k for k, v in changes.items() if getattr(ep, k) != v]
        for k, v in changes.items():
            setattr(ep, k, v)
        if changed:
            if persist:
                self.store.save(ep)
            self.listener.endpoint_changed(ep, changed)

    def _check_capacity(self) -> None:
        if len(self.endpoints) >= self.cfg.max_endpoints:
            raise PortsExhausted(
                f"this host already holds {len(self.endpoints)} endpoints (max_endpoints = "
                f"{self.cfg.max_endpoints}): release unused tunnels or raise max_endpoints")

    def get(self, uid: object, role: Optional[Role] = None) -> List[Endpoint]:
        uid = parse_uid(uid)
        eps = [ep for (u, r), ep in self.endpoints.items()
               if u == uid and (role is None or r is role)]
        if not eps:
            raise NotFound(f"no endpoint with uid {uid} on this host: "
                           "see 'scistreamctl list' for the existing ones")
        return eps

    def list(self) -> List[Endpoint]:
        return sorted(self.endpoints.values(), key=lambda e: (e.created_at, e.uid, e.role.value))

    # ------------------------------------------------------------- inbound
    async def inbound_request(self, remote_ip: object, receiver_ports: object,
                              num_conn: object, options: object, *,
                              owner: str = LEGACY_OWNER) -> Endpoint:
        """``owner``: the creator's Owner string (identity.py)."""
        ip = parse_ip(remote_ip, "remote_ip")
        ports = parse_port_list(receiver_ports, "receiver_ports")
        n = parse_num_conn(num_conn, self.cfg.port_range[1] - self.cfg.port_range[0] + 1)
        opts = parse_options(options, {"allowed_peer": parse_allowed_peer})
        for port in ports:  # before anything is allocated
            refusal = target_refusal(self.cfg.allowed_targets, ip, port)
            if refusal:
                raise AccessDenied(refusal)
        self._check_capacity()
        uid = new_uid()
        async with self._lock(uid):
            listen = self.ports.allocate(n)
            try:
                ep = Endpoint(
                    uid=uid, role=Role.INBOUND,
                    listeners=tuple(HostPort(self.cfg.listen_address, p) for p in listen),
                    targets=tuple(HostPort(ip, p) for p in ports),
                    num_conn=n, created_at=time.time(),
                    allowed_peer=str(opts.get("allowed_peer", "")), owner=owner)
            except BaseException:
                self.ports.release(listen)
                raise
            await self._create(ep, new_psk())
            return ep

    # ------------------------------------------------------------ outbound
    async def outbound_request(self, uid: object, remote_listeners: object, local_ports: object,
                               num_conn: object, options: object, *,
                               owner: str = LEGACY_OWNER) -> Endpoint:
        uid = parse_uid(uid)
        remote = parse_hostport_list(remote_listeners, "remote_listeners")
        local = parse_port_list(local_ports, "local_ports", min_len=0)
        n = parse_num_conn(num_conn, 1024)
        opts = parse_options(options, {
            "peer": lambda v: parse_hostport(v, "peer"),
            "trust_pem": check_trust_pem,
        })
        if local and len(local) != n:
            raise InvalidArgument(
                f"{len(local)} local ports given for num_conn {n}: give one local port per "
                "connection, or none to allocate them from port_range")
        self._check_capacity()
        peer_addr: HostPort = opts.get("peer") or HostPort(remote[0].host, self.cfg.peer_port)
        exists = (f"this host already has an outbound endpoint for {uid}: "
                  f"release it first with 'scistreamctl release {uid}'")
        async with self._lock(uid):
            if (uid, Role.OUTBOUND) in self.endpoints:
                raise AlreadyExists(exists)
            if local:
                self.ports.reserve(local)
                held = list(local)
            else:
                held = self.ports.allocate(n)
        # The claim runs without the uid's lock: the peer may be this very daemon
        # (both halves of a tunnel on one host), whose claim handler takes that
        # lock; holding it here would deadlock until the peer timeout.
        try:
            info = await self.peers.claim_async(peer_addr, uid, remote, opts.get("trust_pem"))
            # The peer checked them too; an answer is still untrusted input.
            lacking = [str(h) for h in remote if h not in info.listeners]
            if lacking:
                raise PeerRejected(
                    f"peer {peer_addr} handed out the key of {uid} but its listeners "
                    f"{', '.join(map(str, info.listeners))} lack {', '.join(lacking)}: the peer "
                    "misbehaves; ask its administrator to check its journal")
            ep = Endpoint(
                uid=uid, role=Role.OUTBOUND,
                listeners=tuple(HostPort(self.cfg.listen_address, p) for p in held),
                targets=remote, num_conn=n, created_at=time.time(), peer=peer_addr,
                owner=owner)
        except BaseException:
            self.ports.release(held)
            raise
        async with self._lock(uid):
            # A concurrent request for the same uid may have won meanwhile.
            if (uid, Role.OUTBOUND) in self.endpoints:
                self.ports.release(held)
                raise AlreadyExists(exists)
            await self._create(ep, info.psk)
            return ep

    # ---------------------------------------------------------- create/teardown
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

    async def _create(self, ep: Endpoint, psk: str) -> None:
        """Start the relay of a new endpoint whose ports are held; roll back on failure."""
        if any(e.relay_id == ep.relay_id for e in self.endpoints.values()):
            ep.relay_id = self._new_relay_id()
        try:
            self._write_keys(ep, psk)
            self.store.save(ep)
            self._track(ep)
            await self._start_unit(ep)
            self._set(ep, state=State.ACTIVE)
        except BaseException as e:
            reason = str(e) if isinstance(e, ScistreamError) else f"{type(e).__name__}: {e}"
            _log(logging.ERROR, MSG_FAILURE, ep, "%s request for %s failed, rolled back: %s",
                 ep.role.value, ep.uid, reason)
            await asyncio.shield(self._teardown(ep))
            if isinstance(e, (ScistreamError, asyncio.CancelledError)):
                raise
            raise RelayFailed(f"starting the relay of {ep.uid} failed: {reason}; "
                              "see 'journalctl -u scistreamd'") from e
        _log(logging.INFO, MSG_REQUEST, ep, "%s endpoint %s active: %s", ep.role.value, ep.uid,
             ", ".join(f"{a} -> {b}" for a, b in ep.mappings()))

    def _write_keys(self, ep: Endpoint, psk: str) -> Tuple[Path, Path]:
        conf = render_stunnel_config(ep, psk_path=relay_file_path(PSK_FILE),
                                     ciphersuites=self.cfg.relay_ciphersuites,
                                     log_level=self.cfg.relay_log_level)
        return self.keys.write(ep.relay_id, ep.role, render_psk_file(ep.uid, psk), conf)

    async def _start_unit(self, ep: Endpoint) -> None:
        """Create and start the relay (and its socket unit); raise RelayFailed if it did not.

        With socket activation one call creates both units and starts the
        relay, which Requires= its socket: systemd binds the listeners first
        and the job fails at once if a port is taken. When the job is done the
        listeners are bound and the relay runs; connections that arrive before
        stunnel accepts wait in the socket's backlog, so nothing polls for them.
        """
        props = relay_unit_properties(ep, self.cfg, self.keys.endpoint_dir(ep.relay_id, ep.role))
        sock = self.cfg.relay_socket_activation
        aux = [(ep.socket_unit, relay_socket_properties(ep, self.cfg))] if sock else []
        # A failed unit of the same name (an earlier crash) would block the start.
        await self.systemd.reset_failed(ep.unit)
        if sock:
            await self.systemd.reset_failed(ep.socket_unit)
            self._sockets.add(ep.key)
        t0 = time.monotonic()
        try:
            result = await self.systemd.start_transient(ep.unit, props, aux=aux,
                                                        timeout=self.cfg.relay_start_timeout)
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

    async def _teardown(self, ep: Endpoint) -> None:
        """Stop the units, remove keys and state, free ports, drop the object. Idempotent."""
        await self._stop_units(ep)
        self.keys.remove(ep.relay_id, ep.role)
        self.store.delete(ep.uid, ep.role)
        self.ports.release(h.port for h in ep.listeners)
        self._untrack(ep)

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

    # ------------------------------------------------------------- release
    async def release(self, uid: object, role: Optional[Role] = None) -> List[Endpoint]:
        eps = self.get(uid, role)
        async with self._lock(eps[0].uid):
            eps = [e for e in eps if self.endpoints.get(e.key) is e]
            for ep in eps:
                self._set(ep, state=State.RELEASING)
                await self._teardown(ep)
                _log(logging.INFO, MSG_RELEASE, ep, "%s endpoint %s released",
                     ep.role.value, ep.uid)
                if ep.role is Role.INBOUND:
                    self._remember_released(ep.uid)
        if not eps:
            raise NotFound(f"endpoint {uid} was released meanwhile")
        return eps

    def _remember_released(self, uid: str) -> None:
        self._released.pop(uid, None)
        self._released[uid] = None
        while len(self._released) > _RELEASED_MEMORY:
            del self._released[next(iter(self._released))]

    def _no_inbound(self, uid: str) -> NotFound:
        """NotFound for a claim or state check of an inbound endpoint this host lacks."""
        if uid in self._released:
            return NotFound(f"tunnel {uid} was released by the inbound side: its key is gone; "
                            "ask the inbound side for a new inbound request and use the uid it "
                            "prints")
        return NotFound(f"no inbound endpoint {uid} on that host: check the uid (copy it from "
                        "the inbound request's output) and that the peer address (--peer, or "
                        "the first listener's host) is the host that made it")

    async def release_all(self) -> int:
        count = 0
        for uid in sorted({k[0] for k in self.endpoints}):
            with contextlib.suppress(NotFound):  # released meanwhile
                count += len(await self.release(uid))
        return count

    # ---------------------------------------------------------- peer side
    async def claim(self, uid: str, claimant: PeerIdentity,
                    listeners: Iterable[HostPort] = ()) -> Dict[str, Any]:
        """Hand the key of an inbound endpoint to the first (allowed) peer that asks.

        ``listeners`` are the ones the claimant means to connect to: a wrong
        one is refused before the key leaves, so a typo does not use up the
        single claim. A claimant that is not the endpoint's allowed peer is
        refused first, consuming nothing. Messages go to the peer verbatim:
        they name no other claimant and not the allowed peer.
        """
        uid = parse_uid(uid)
        async with self._lock(uid):
            ep = self.endpoints.get((uid, Role.INBOUND))
            if ep is None:
                raise self._no_inbound(uid)
            if not peer_matches(ep.allowed_peer, claimant):
                shown = (f"names {claimant.names() or 'no IP address or DNS name'}"
                         if claimant.verified else "is absent")
                _log(logging.WARNING, MSG_CLAIM_REFUSED, ep,
                     "refused claim of %s by %s: not the endpoint's allowed peer %s", uid,
                     claimant, ep.allowed_peer)
                raise AccessDenied(
                    f"endpoint {uid} may be claimed only by the peer its inbound request "
                    f"named, and this claim's certificate {shown}: claim it from that "
                    "gateway, or ask the inbound side for a new request that names this one "
                    "(--allowed-peer)")
            _require_listeners(uid, listeners, ep.listeners)  # consumes nothing
            if ep.claimed_by:
                raise PeerRejected(
                    f"the key of {uid} was already claimed by another peer (a key is handed out "
                    f"once): ask the inbound side to re-arm it ('scistreamctl rearm {uid}' "
                    "there), then repeat the outbound request")
            if ep.state is not State.ACTIVE:
                raise PeerRejected(f"endpoint {uid} is {ep.state.value}, not active")
            psk = self.keys.read_psk(ep.relay_id, Role.INBOUND, uid)
            ip = parse_claimant_ip(claimant.address)
            try:
                await self._allow_only(ep, ip)
            except SystemdError as e:
                raise PeerRejected(
                    f"the inbound side could not restrict tunnel {uid} to the claimant's "
                    f"address ({e.name}); nothing was claimed: try again or ask its "
                    "operator") from e
            self._set(ep, claimed_by=str(claimant)[:200], claimed_at=time.time(),
                      claimant_ip=ip)
            _log(logging.INFO, MSG_CLAIM, ep, "key of %s claimed by %s", uid, ep.claimed_by)
            return PeerEndpoint(uid, ep.listeners, psk, self.cfg.relay_ciphersuites).to_json()

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

    async def endpoint_state(self, uid: str) -> Dict[str, Any]:
        """For the peer's liveness check: does the inbound half still exist? No secrets."""
        uid = parse_uid(uid)
        ep = self.endpoints.get((uid, Role.INBOUND))
        if ep is None:
            raise self._no_inbound(uid)
        return {"uid": ep.uid, "state": ep.state.value}

    async def check_peers(self) -> None:
        """Mark outbound endpoints whose inbound half is gone at the peer as failed.

        Without this a survivor looks healthy while every connection through
        it is refused by the peer. An unreachable peer daemon proves nothing
        (it may be restarting), so only a definite "no such endpoint" counts.
        """
        for ep in [e for e in self.endpoints.values()
                   if e.role is Role.OUTBOUND and e.state is State.ACTIVE and e.peer]:
            try:
                await self.peers.endpoint_state_async(ep.peer, ep.uid)
            except NotFound:
                if self.endpoints.get(ep.key) is ep and ep.state is State.ACTIVE:
                    _log(logging.WARNING, MSG_FAILURE, ep, "peer %s no longer has tunnel %s",
                         ep.peer, ep.uid)
                    self._set(ep, state=State.FAILED, detail=(
                        f"the peer {ep.peer} released tunnel {ep.uid}: connections through it "
                        f"are refused; release it here too with 'scistreamctl release {ep.uid}'"))
            except ScistreamError as e:
                logger.debug("peer check of %s: %s", ep.uid, e)

    async def run_peer_checks(self) -> None:
        interval = self.cfg.peer_check_interval
        while interval > 0:
            await asyncio.sleep(interval)
            try:
                await self.check_peers()
            except Exception:
                logger.exception("peer check failed")

    async def rearm(self, uid: object) -> Endpoint:
        """New key for an inbound endpoint and a fresh claim; the old key stops working."""
        (ep,) = self.get(uid, Role.INBOUND)
        async with self._lock(ep.uid):
            # A release that held the lock meanwhile removed it: re-arming now
            # would start a relay, keys and state nothing tracks.
            if self.endpoints.get(ep.key) is not ep:
                raise NotFound(f"endpoint {ep.uid} was released meanwhile")
            psk = new_psk()
            self._write_keys(ep, psk)
            # The relay is down for a moment on purpose: the unit monitor must not
            # report that as a failure (see _refresh).
            self._restarting.add(ep.key)
            try:
                if await self._socket_listening(ep):
                    # The socket keeps the ports bound while the relay restarts
                    # with the new key (no window for another process to take
                    # them); its allow list goes back to nobody until the next claim.
                    await self.systemd.stop(ep.unit, timeout=self.cfg.relay_start_timeout)
                    await self._allow_only(ep, None)
                    await self.systemd.reset_failed(ep.unit)
                    result = await self.systemd.start(ep.unit,
                                                      timeout=self.cfg.relay_start_timeout)
                    if result != "done":
                        raise RelayFailed(f"{ep.unit} failed to restart (job {result}): "
                                          f"see 'scistreamctl logs {ep.uid}'")
                else:
                    # No socket unit (a relay of an earlier version) or a failed one:
                    # stop everything and start a fresh pair rather than RestartUnit,
                    # so the units have this version's properties. _start_unit also
                    # resets the failed state, so quick re-arms never hit the start
                    # rate limit.
                    self._set(ep, claimant_ip=None)
                    await self._stop_units(ep)
                    if ep.legacy_relay_id:
                        self._rename_relay(ep, psk)
                    await self._start_unit(ep)
            except (SystemdError, asyncio.TimeoutError) as e:
                raise RelayFailed(f"restarting {ep.unit} failed: {e}") from e
            finally:
                self._restarting.discard(ep.key)
                # Whatever the outcome, the monitor now reports what the relay really is.
                self._on_unit_change(unit_object_path(ep.unit))
            self._set(ep, claimed_by="", claimed_at=0.0, claimant_ip=None, state=State.ACTIVE,
                      detail="")
            _log(logging.INFO, MSG_REQUEST, ep, "inbound endpoint %s re-armed with a new key",
                 ep.uid)
            return ep

    async def _socket_listening(self, ep: Endpoint) -> bool:
        if ep.key not in self._sockets:
            return False
        _load, active, _sub = await self.systemd.unit_state(ep.socket_unit)
        return active == "active"

    # ------------------------------------------------------ unit monitoring
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

    def _apply_status(self, ep: Endpoint, st) -> None:
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

    # ------------------------------------------------------------ adoption
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
        known_units = set()
        adopted: List[Endpoint] = []
        for ep in eps:
            known_units.update((ep.unit, ep.socket_unit))
            running = units.get(ep.unit, ("inactive", ""))[0] in ("active", "activating",
                                                                   "reloading")
            if ep.state in (State.STARTING, State.RELEASING):
                logger.warning("rolling back interrupted %s of %s %s", ep.state.value,
                               ep.role.value, ep.uid)
                await self._teardown(ep)
                continue
            self.ports.adopt(h.port for h in ep.listeners)
            self._track(ep)
            if running:
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
        restarts = await self.systemd.n_restarts([ep.unit for ep in adopted])
        for ep in adopted:
            active, sub = units[ep.unit]
            self._apply_status(ep, UnitStatus(ep.unit, active, sub, "", restarts[ep.unit], 0))
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


def _require_listeners(uid: str, asked: Iterable[HostPort], have: Sequence[HostPort]) -> None:
    """WrongListener naming each of ``asked`` that is not a listener of tunnel ``uid``."""
    unknown = [str(h) for h in asked if h not in have]
    if unknown:
        raise WrongListener(
            f"{', '.join(unknown)} is not a listener of tunnel {uid} (it has "
            f"{', '.join(map(str, have))}); nothing was claimed: repeat the outbound request "
            "with the listeners the inbound request printed")
