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
import logging
import time
from typing import (
    Any,
    AsyncIterator,
    Dict,
    Iterable,
    List,
    NoReturn,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
)

from .config import Config
from .counting import MSG_TARGET_FAILED, CountersMixin
from .earlystart import EarlyStartMixin
from .errors import (
    AccessDenied,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PortsExhausted,
    RelayFailed,
    ScistreamError,
)
from .events import MSG_FAILURE, MSG_RELEASE, MSG_REQUEST
from .events import log_event as _log
from .hostprobe import HostProbes
from .identity import LEGACY_OWNER
from .model import (
    Endpoint,
    HostPort,
    Role,
    State,
    new_uid,
    parse_allowed_peer,
    parse_hostport,
    parse_hostport_list,
    parse_ip,
    parse_num_conn,
    parse_options,
    parse_port_list,
    parse_uid,
)
from .peerclient import PeerClient
from .peerside import PeerSideMixin
from .peertls import check_trust_pem
from .ports import PortAllocator
from .recent import Recent
from .reconcile import ReconcileMixin
from .relay import (
    new_psk,
)
from .relay_unit import allow_property
from .relayunits import RelayUnitsMixin
from .store import KeyStore, StateStore
from .systemd import Systemd, SystemdError, unit_object_path
from .targets import target_refusal
from .traffic import REACHABLE_NO, REACHABLE_YES, Counters

logger = logging.getLogger(__name__)

#: Inbound requests check at most this many targets, each for at most this long.
_PROBE_TARGETS = 8
_PROBE_TIMEOUT = 1.0
#: How many released inbound uids a claim can still tell apart from unknown ones.
_RELEASED_MEMORY = 4096
#: How many failed early starts are remembered for settled() (this run only).
_START_FAILURE_MEMORY = 1024


def _parse_early(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument("option early must be a boolean (D-Bus type b)")
    return value


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


class Manager(CountersMixin, RelayUnitsMixin, PeerSideMixin, ReconcileMixin,
              EarlyStartMixin):
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
        self.ports = PortAllocator(cfg.relay_listen_address, *cfg.port_range)
        self.endpoints: Dict[Tuple[str, Role], Endpoint] = {}
        self.listener: EndpointListener = listener or _NoListener()
        self._by_unit_path: Dict[str, Tuple[str, Role]] = {}
        #: per uid: its lock and how many hold or await it (see _lock).
        self._uid_locks: Dict[str, Tuple[asyncio.Lock, List[int]]] = {}
        self._refreshing: Dict[Tuple[str, Role], asyncio.Task] = {}
        #: Endpoints whose relay is being restarted on purpose (re-arm).
        self._restarting: Set[Tuple[str, Role]] = set()
        #: Inbound uids whose early start is still going on (option early of
        #: inbound_request), and those whose early start failed: (owner, error), oldest first.
        self._early: Dict[str, Tuple[asyncio.Task[None], str]] = {}
        self._start_failures: Recent[str, Tuple[str, ScistreamError]] = Recent(
            _START_FAILURE_MEMORY)
        #: Inbound uids released here, oldest first (this run only): a late claim
        #: gets "released", not "unknown uid".
        self._released: Recent[str, None] = Recent(_RELEASED_MEMORY)
        #: Endpoints whose listeners a .socket unit holds (the others: relays
        #: adopted from a version without socket units, or relay_socket_activation off).
        self._sockets: Set[Tuple[str, Role]] = set()
        #: Set when a reload changes peer_check_interval: the check loop starts over.
        self._checks_changed = asyncio.Event()
        #: Counters per endpoint (traffic.py), and the endpoints whose counters the
        #: poller reads: those with activity (connections) or asked about. An idle
        #: endpoint costs nothing.
        self.counters: Dict[Tuple[str, Role], Counters] = {}
        self._hot: Dict[Tuple[str, Role], int] = {}
        self._polled_at: Dict[Tuple[str, Role], float] = {}
        self._poll_wakeup = asyncio.Event()
        #: Endpoints adopted at start-up whose relay's MainPID is still to be read.
        self._pids_due: List[Tuple[str, Role]] = []
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
        if ep.key not in self.counters:
            self.counters[ep.key] = Counters(inbound=ep.role is Role.INBOUND)
        self._by_unit_path[unit_object_path(ep.unit)] = ep.key
        self.listener.endpoint_added(ep)

    def _untrack(self, ep: Endpoint) -> None:
        if self.endpoints.pop(ep.key, None) is not None:
            self.listener.endpoint_removed(ep)
        self._by_unit_path.pop(unit_object_path(ep.unit), None)
        self._sockets.discard(ep.key)
        self.counters.pop(ep.key, None)
        self._hot.pop(ep.key, None)
        self._polled_at.pop(ep.key, None)

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
        """``owner``: the creator's Owner string (identity.py).

        Option ``early`` (a boolean): return as soon as the endpoint exists (uid,
        listeners and key; its units created and the relay's start queued), in state
        ``starting``; its key may be claimed from then on, and the start goes on here
        (:meth:`settled` waits for it and says how it ended; earlystart.py). A client
        that needs both halves of a tunnel makes the other half meanwhile.
        """
        ip = parse_ip(remote_ip, "remote_ip")
        ports = parse_port_list(receiver_ports, "receiver_ports")
        n = parse_num_conn(num_conn, self.cfg.port_range[1] - self.cfg.port_range[0] + 1)
        opts = parse_options(options, {"allowed_peer": parse_allowed_peer,
                                       "early": _parse_early})
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
                    listeners=tuple(HostPort(self.cfg.relay_listen_address, p) for p in listen),
                    targets=tuple(HostPort(ip, p) for p in ports),
                    num_conn=n, created_at=time.time(),
                    allowed_peer=str(opts.get("allowed_peer", "")), owner=owner,
                    key_generation=1)
            except BaseException:
                self.ports.release(listen)
                raise
            psk = new_psk()
            if opts.get("early"):
                return await self._create_early(ep, psk)
            await self._create_probed(ep, psk)
            return ep

    async def _create_probed(self, ep: Endpoint, psk: str,
                             queued: Optional[asyncio.Future] = None) -> None:
        """_create of an inbound endpoint, its targets checked beside the relay's start
        (the check adds no wait of its own)."""
        probe = asyncio.ensure_future(self._probe_targets(ep.targets))
        try:
            await self._create(ep, psk, queued)
        except BaseException:
            probe.cancel()
            raise
        self._note_probe(ep, await probe)

    async def _probe_targets(self, targets: Sequence[HostPort]) -> Optional[List[HostPort]]:
        """The targets where nothing accepts a connection now; None if none was checked.

        Never a refusal of the request: applications often start after their tunnel.
        """
        todo = list(dict.fromkeys(targets))[:_PROBE_TARGETS]
        if not todo:
            return None
        try:
            ok = await asyncio.gather(*(asyncio.to_thread(self.probes.target_accepts, t,
                                                          _PROBE_TIMEOUT) for t in todo))
        except Exception as e:  # a probe is a nicety
            logger.debug("target check failed: %s", e)
            return None
        return [t for t, accepted in zip(todo, ok) if not accepted]

    def _note_probe(self, ep: Endpoint, refused: Optional[List[HostPort]]) -> None:
        c = self.counters.get(ep.key)
        if c is None or refused is None:
            return
        if refused:
            text = (f"when the tunnel was requested nothing accepted connections at "
                    f"{', '.join(map(str, refused))}: start the server application there "
                    "(the tunnel works as soon as it listens)")
            _log(logging.WARNING, MSG_TARGET_FAILED, ep, "inbound endpoint %s: %s", ep.uid,
                 text)
            changed = c.set_failure(c.failures, text, int(time.time() * 1e6), REACHABLE_NO)
        else:
            changed = c.set_reachable(REACHABLE_YES)
        if changed:
            self.listener.endpoint_changed(ep, ["counters"])

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
                listeners=tuple(HostPort(self.cfg.relay_listen_address, p) for p in held),
                targets=remote, num_conn=n, created_at=time.time(), peer=peer_addr,
                owner=owner,
                # What the peer check compares: a re-armed inbound side says another.
                key_generation=info.key_generation)
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

    async def _create(self, ep: Endpoint, psk: str,
                      queued: Optional[asyncio.Future] = None) -> None:
        """Start the relay of a new endpoint whose ports are held; roll back on failure.

        ``queued`` (early start): set once the units exist and the start is queued.
        The caller holds the uid's lock until then only, so a claim or a release may
        come before the start is over (see :meth:`_settling`).
        """
        if any(e.relay_id == ep.relay_id for e in self.endpoints.values()):
            ep.relay_id = self._new_relay_id()

        def on_queued() -> None:
            if queued is not None and not queued.done():
                queued.set_result(None)

        def answered() -> bool:
            return queued is not None and queued.done()

        try:
            self._write_keys(ep, psk)
            self.store.save(ep)
            self._track(ep)
            await self._start_unit(ep, fresh=True, queued=on_queued if queued else None)
            async with self._settling(ep, answered()):
                self._set(ep, state=State.ACTIVE)
            self.counters_due(ep)
        except BaseException as e:
            # (Also the NotFound of a release that came first: raised again below.)
            async with self._settling(ep, answered()):
                await self._roll_back(ep, e)
        _log(logging.INFO, MSG_REQUEST, ep, "%s endpoint %s active: %s", ep.role.value, ep.uid,
             ", ".join(f"{a} -> {b}" for a, b in ep.mappings()))

    @contextlib.asynccontextmanager
    async def _settling(self, ep: Endpoint, answered: bool) -> AsyncIterator[None]:
        """Where a create ends (its endpoint made active, or rolled back). Once the
        request was answered early, its caller no longer holds the uid's lock: the end
        takes it, and a release that came first wins (NotFound; nothing is rolled back
        twice)."""
        if not answered:
            yield
            return
        async with self._lock(ep.uid):
            if self.endpoints.get(ep.key) is not ep:
                raise NotFound(f"endpoint {ep.uid} was released while its relay started")
            yield

    async def _roll_back(self, ep: Endpoint, e: BaseException) -> NoReturn:
        """Undo a failed _create and raise what the caller should see."""
        reason = str(e) if isinstance(e, ScistreamError) else f"{type(e).__name__}: {e}"
        _log(logging.ERROR, MSG_FAILURE, ep, "%s request for %s failed, rolled back: %s",
             ep.role.value, ep.uid, reason)
        await asyncio.shield(self._teardown(ep))
        if isinstance(e, (ScistreamError, asyncio.CancelledError)):
            raise e
        raise RelayFailed(f"starting the relay of {ep.uid} failed: {reason}; "
                          "see 'journalctl -u scistreamd'") from e

    async def _teardown(self, ep: Endpoint) -> None:
        """Stop the units, remove keys and state, free ports, drop the object. Idempotent."""
        await self._stop_units(ep)
        self.keys.remove(ep.relay_id, ep.role)
        self.store.delete(ep.uid, ep.role)
        self.ports.release(h.port for h in ep.listeners)
        self._untrack(ep)

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
                    self._released.put(ep.uid, None)
        if not eps:
            raise NotFound(f"endpoint {uid} was released meanwhile")
        return eps

    async def release_all(self) -> int:
        count = 0
        for uid in sorted({k[0] for k in self.endpoints}):
            with contextlib.suppress(NotFound):  # released meanwhile
                count += len(await self.release(uid))
        return count

    async def apply_config(self, cfg: Config) -> None:
        """Run with a reloaded configuration (config.plan_reload merged it: only keys
        that may change at run time differ). Requests read self.cfg as they run;
        what lives beyond a request is updated here: the outbound listeners' IP
        allow lists and the peer check loop."""
        old, self.cfg = self.cfg, cfg
        if old.peer_check_interval != cfg.peer_check_interval:
            self._checks_changed.set()
        if old.outbound_client_networks != cfg.outbound_client_networks:
            for ep in [e for e in self.endpoints.values()
                       if e.role is Role.OUTBOUND and e.key in self._sockets]:
                try:
                    await self.systemd.set_properties(ep.socket_unit,
                                                      [allow_property(ep, cfg)])
                except SystemdError as e:
                    _log(logging.ERROR, MSG_FAILURE, ep, "could not apply the new "
                         "outbound_client_networks to %s: %s", ep.socket_unit, e)

    async def rearm(self, uid: object) -> Endpoint:
        """New key for an inbound endpoint and a fresh claim; the old key stops working."""
        (ep,) = self.get(uid, Role.INBOUND)
        await self.wait_early(ep.uid)  # a relay still starting is re-keyed after its start
        async with self._lock(ep.uid):
            # A release that held the lock meanwhile removed it: re-arming now
            # would start a relay, keys and state nothing tracks.
            if self.endpoints.get(ep.key) is not ep:
                raise NotFound(f"endpoint {ep.uid} was released meanwhile")
            # The relay is down for a moment on purpose: the unit monitor must not
            # report that as a failure (see _refresh).
            self._restarting.add(ep.key)
            try:
                await self._rekey(ep, None)
            finally:
                self._restarting.discard(ep.key)
                # Whatever the outcome, the monitor now reports what the relay really is.
                self._on_unit_change(unit_object_path(ep.unit))
            self._set(ep, claimed_by="", claimed_at=0.0, claimant_ip=None, claimed_identity="",
                      state=State.ACTIVE, detail="")
            _log(logging.INFO, MSG_REQUEST, ep, "inbound endpoint %s re-armed with a new key "
                 "(generation %d)", ep.uid, ep.key_generation)
            return ep


