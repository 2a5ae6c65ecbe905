"""The peer side of the Manager: claims of an inbound endpoint's key by the
outbound daemon (first claim, a claimant's repeated claim after its own
crash, refusals that consume nothing), the state check the peer asks for,
and this host's periodic check of its outbound endpoints' peers (a mixin of
Manager)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Sequence, Set, Tuple

from .config import Config
from .errors import (
    AccessDenied,
    NotFound,
    PeerRejected,
    RelayFailed,
    ScistreamError,
    WrongListener,
)
from .events import MSG_CLAIM, MSG_CLAIM_REFUSED, MSG_FAILURE
from .events import log_event as _log
from .hostprobe import HostProbes
from .model import (
    Endpoint,
    HostPort,
    Role,
    State,
    parse_uid,
)
from .peerident import PeerIdentity, parse_claimant_ip, peer_matches
from .peerwire import PeerEndpoint
from .recent import Recent
from .relay import STUNNEL_LOG_LEVELS
from .store import KeyStore
from .systemd import SystemdError, unit_object_path

if TYPE_CHECKING:
    from .peerclient import PeerClient

logger = logging.getLogger("scistreamd.manager")



class PeerSideMixin:
    """Uses the Manager's _allow_only, _checks_changed, _lock, _on_unit_change, _rekey,
    _released, _restarting, _set, cfg, endpoints, keys, peer_target_health, peers, probes,
    traffic."""

    cfg: Config
    peers: PeerClient
    probes: HostProbes
    keys: KeyStore
    endpoints: Dict[Tuple[str, Role], Endpoint]
    _restarting: Set[Tuple[str, Role]]
    _released: Recent[str, None]
    _early: Dict[str, Tuple[asyncio.Task[None], str]]
    _start_failures: Recent[str, Tuple[str, ScistreamError]]

    def _no_inbound(self, uid: str) -> NotFound:
        """NotFound for a claim or state check of an inbound endpoint this host lacks."""
        failed = self._start_failures.get(uid)
        if failed is not None:
            return NotFound(f"the relay of inbound endpoint {uid} failed to start, and the "
                            "inbound side rolled it back: nothing is left there; request a new "
                            "tunnel")
        if uid in self._released:
            return NotFound(f"tunnel {uid} was released by the inbound side: its key is gone; "
                            "ask the inbound side for a new inbound request and use the uid it "
                            "prints")
        return NotFound(f"no inbound endpoint {uid} on that host: check the uid (copy it from "
                        "the inbound request's output) and that the peer address (--peer, or "
                        "the first listener's host) is the host that made it")

    async def claim(self, uid: str, claimant: PeerIdentity,
                    listeners: Iterable[HostPort] = ()) -> Dict[str, Any]:
        """Hand the key of an inbound endpoint to the first (allowed) peer that asks.

        ``listeners`` are the ones the claimant means to connect to: a wrong
        one is refused before the key leaves, so a typo does not use up the
        single claim. A claimant that is not the endpoint's allowed peer is
        refused first, consuming nothing. Messages go to the peer verbatim:
        they name no other claimant and not the allowed peer.

        A claim is not lost by a crash of the claimant: the claimant that holds
        it (the same verified certificate identity) may claim again as long as its
        relay has never connected since its claim (_check_reclaim). It then gets a
        new key and the next key generation, and the relay is re-keyed as by a
        re-arm: the lost half may have left the old key behind somewhere.
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
                await self._check_reclaim(ep, claimant)
                return await self._reclaim(ep, claimant)
            # A starting endpoint's key may go while its relay starts when it was
            # created early (the requester makes the other half meanwhile).
            if ep.state is not State.ACTIVE and not (ep.state is State.STARTING
                                                     and uid in self._early):
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
                      claimant_ip=ip, claimed_identity=_identity(claimant))
            _log(logging.INFO, MSG_CLAIM, ep, "key of %s claimed by %s", uid, ep.claimed_by)
            return PeerEndpoint(uid, ep.listeners, psk, self.cfg.relay_ciphersuites,
                                ep.key_generation).to_json()

    async def _check_reclaim(self, ep: Endpoint, claimant: PeerIdentity) -> None:
        """PeerRejected unless ``claimant`` may claim the claimed ``ep`` again.

        Only the identity that holds the claim may (a verified certificate naming
        the same subjectAltNames; an unverified claimant has no identity to
        compare), and only until its relay first connected to ours: after that the
        key is in use and the claim settled, so a second claim is someone else's
        mistake or worse. "Connected" is read from our relay's journal (stunnel
        logs every accepted connection at level notice) since the claim, from the
        claimant's address (the only one the listeners admit); when that cannot be
        known (a quieter relay_log_level, an unreadable journal) the answer is no.
        """
        uid = ep.uid
        rearm = (f"ask the inbound side to re-arm it ('scistreamctl rearm {uid}' there), then "
                 "repeat the outbound request")
        identity = _identity(claimant)
        if not identity or identity != ep.claimed_identity:
            raise PeerRejected(f"the key of {uid} was already claimed by another peer (a key is "
                               f"handed out once): {rearm}")
        if ep.state is not State.ACTIVE:
            raise PeerRejected(f"endpoint {uid} is {ep.state.value}, not active")
        notice = STUNNEL_LOG_LEVELS.index("notice")
        why = ""
        if STUNNEL_LOG_LEVELS.index(self.cfg.relay_log_level) < notice:
            why = (f"its relays log at {self.cfg.relay_log_level} (relay_log_level), too "
                   "quietly to tell whether your relay already connected")
        elif ep.claimant_ip is None:
            why = "its record of the claim names no claimant address"
        else:
            try:
                if await asyncio.to_thread(self.probes.relay_accepted_from, ep.unit,
                                           ep.claimant_ip, ep.claimed_at):
                    why = ("your relay has connected to it since the claim (the key is in use; "
                           "it is handed out again only until the claimant's relay first "
                           "connects)")
            except Exception as e:
                logger.warning("reading the journal of %s failed: %s", ep.unit, e)
                why = "it could not read its relay's journal to tell whether your relay connected"
        if why:
            _log(logging.WARNING, MSG_CLAIM_REFUSED, ep, "refused a repeated claim of %s by %s: "
                 "%s", uid, claimant, why)
            raise PeerRejected(f"the key of {uid} was already claimed by this gateway, and the "
                               f"inbound side does not hand it out again: {why}; {rearm}")

    async def _reclaim(self, ep: Endpoint, claimant: PeerIdentity) -> Dict[str, Any]:
        """The claim again, by its holder (_check_reclaim said yes): a new key, the next
        generation, the relay re-keyed, its listeners open to the claimant's address."""
        ip = parse_claimant_ip(claimant.address)
        # Before the restart: an accept by the new relay then counts as "connected".
        now = time.time()
        self._restarting.add(ep.key)
        rekey = asyncio.ensure_future(self._rekey(ep, ip))
        try:
            try:
                psk = await asyncio.shield(rekey)
            except asyncio.CancelledError:
                # The peer port gave up waiting (Busy): finish the restart first, under
                # the lock, or the relay could stay stopped. The claimant's retry finds
                # the claim still its own and claims again.
                with contextlib.suppress(Exception):
                    await rekey
                raise
        except RelayFailed as e:
            _log(logging.ERROR, MSG_FAILURE, ep, "re-keying %s for a repeated claim failed: %s",
                 ep.uid, e)
            raise PeerRejected(f"the inbound side could not re-key tunnel {ep.uid} for the "
                               "repeated claim; try again, or ask its operator (its journal "
                               "says why)") from e
        finally:
            self._restarting.discard(ep.key)
            self._on_unit_change(unit_object_path(ep.unit))
        old = ep.claimed_at
        self._set(ep, claimed_by=str(claimant)[:200], claimed_at=now, claimant_ip=ip,
                  claimed_identity=_identity(claimant), state=State.ACTIVE, detail="")
        _log(logging.INFO, MSG_CLAIM, ep, "key of %s claimed again by %s (its relay never "
             "connected since its claim at %s): new key, generation %d", ep.uid, ep.claimed_by,
             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(old)), ep.key_generation)
        return PeerEndpoint(ep.uid, ep.listeners, psk, self.cfg.relay_ciphersuites,
                            ep.key_generation).to_json()

    async def endpoint_state(self, uid: str) -> Dict[str, Any]:
        """For the peer's liveness check: does the inbound half still exist? No secrets."""
        uid = parse_uid(uid)
        ep = self.endpoints.get((uid, Role.INBOUND))
        if ep is None:
            raise self._no_inbound(uid)
        t = self.traffic(ep)
        # Whether the server application takes connections (peerwire.EndpointState).
        return {"uid": ep.uid, "state": ep.state.value,
                "key_generation": ep.key_generation, "target_reachable": t.target_reachable,
                "target_failures": t.target_failures,
                "last_target_failure": t.last_target_failure,
                "last_target_failure_at": t.last_target_failure_at}

    async def check_peers(self) -> None:
        """Mark outbound endpoints whose inbound half is gone or re-keyed at the peer as failed.

        Without this a survivor looks healthy while every connection through
        it is refused by the peer. An unreachable peer daemon proves nothing
        (it may be restarting), so only a definite "no such endpoint" counts,
        or a key generation other than the one claimed (the peer re-armed: our
        key is dead). Generation 0 on either side (an earlier version) compares
        with nothing.
        """
        for ep in [e for e in self.endpoints.values()
                   if e.role is Role.OUTBOUND and e.state is State.ACTIVE and e.peer]:
            try:
                info = await self.peers.endpoint_info_async(ep.peer, ep.uid)
                if (ep.key_generation and info.key_generation
                        and info.key_generation != ep.key_generation
                        and self.endpoints.get(ep.key) is ep and ep.state is State.ACTIVE):
                    _log(logging.WARNING, MSG_FAILURE, ep, "peer %s re-armed tunnel %s: its key "
                         "generation is %d, this endpoint's key is of generation %d", ep.peer,
                         ep.uid, info.key_generation, ep.key_generation)
                    self._set(ep, state=State.FAILED, detail=(
                        f"the peer re-armed tunnel {ep.uid}; make a new outbound request "
                        f"(release this one first: 'scistreamctl release {ep.uid}'): this "
                        "endpoint's key no longer works"))
                health = info.health
                if health and self.endpoints.get(ep.key) is ep:
                    self.peer_target_health(ep, health)
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
        """Check the peers every peer_check_interval (read afresh each round: a reload
        may change it, and wakes this loop)."""
        while True:
            interval = self.cfg.peer_check_interval
            self._checks_changed.clear()
            if interval <= 0:
                await self._checks_changed.wait()
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._checks_changed.wait(), interval)
                continue  # the interval changed: wait the new one
            try:
                await self.check_peers()
            except Exception:
                logger.exception("peer check failed")


def _identity(who: PeerIdentity) -> str:
    """The certificate identity a repeated claim must match; "" for an unverified peer."""
    return who.names()[:200] if who.verified else ""


def _require_listeners(uid: str, asked: Iterable[HostPort], have: Sequence[HostPort]) -> None:
    """WrongListener naming each of ``asked`` that is not a listener of tunnel ``uid``."""
    unknown = [str(h) for h in asked if h not in have]
    if unknown:
        raise WrongListener(
            f"{', '.join(unknown)} is not a listener of tunnel {uid} (it has "
            f"{', '.join(map(str, have))}); nothing was claimed: repeat the outbound request "
            "with the listeners the inbound request printed")
