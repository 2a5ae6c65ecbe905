"""Manager with fakes of systemd, the peer client and the host probes (real stores on tmp_path).

Every rollback path of inbound, outbound, release and re-arm, and every branch
of adopt, each checking that ports, keys, state files, units and the exported
objects are returned (or, where the endpoint stays, still accounted for).
No pytest-asyncio here: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import ipaddress
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest

from scistreamd.config import Config
from scistreamd.errors import (
    AccessDenied,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PeerUnreachable,
    PortsExhausted,
    RelayFailed,
    WrongListener,
)
from scistreamd.hostprobe import HostProbes
from scistreamd.manager import Manager
from scistreamd.model import Endpoint, HostPort, Role, State, new_uid
from scistreamd.peerident import PeerIdentity
from scistreamd.peerwire import EndpointState, PeerEndpoint
from scistreamd.ports import PortAllocator
from scistreamd.store import PSK_FILE
from scistreamd.systemd import ABSENT, SystemdError, UnitStatus, unit_object_path
from scistreamd.targets import parse_target_rule

LOW, HIGH = 6100, 6109
PSK = "ab" * 32
S2 = ipaddress.ip_address("192.168.150.2")

# ------------------------------------------------------------------ fakes


class Script:
    """Scripted outcomes per method: an exception is raised, a callable awaited,
    anything else returned; an empty queue means the default behaviour."""

    def __init__(self) -> None:
        self._queues: Dict[str, List[Any]] = {}

    def add(self, method: str, *outcomes: Any) -> None:
        self._queues.setdefault(method, []).extend(outcomes)

    def raises_next(self, method: str) -> bool:
        queue = self._queues.get(method)
        return bool(queue) and isinstance(queue[0], BaseException)

    async def next(self, method: str, default: Callable[[], Any]) -> Any:
        queue = self._queues.get(method)
        if not queue:
            return default()
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            return await outcome()
        return outcome


class FakeSystemd:
    """Loaded units as name -> (active_state, sub_state); every call recorded."""

    def __init__(self, units: Optional[Dict[str, Tuple[str, str]]] = None) -> None:
        self.units: Dict[str, Tuple[str, str]] = dict(units or {})
        self.calls: List[Tuple[str, str]] = []
        self.props: Dict[str, List[List[Any]]] = {}
        self.script = Script()
        self.callbacks: List[Callable[[str], None]] = []

    def on_unit_change(self, callback: Callable[[str], None]) -> None:
        self.callbacks.append(callback)

    def names(self, method: str) -> List[str]:
        return [n for m, n in self.calls if m == method]

    async def start_transient(self, name: str, properties: List[List[Any]], timeout: float = 30,
                              aux: Sequence[Tuple[str, List[List[Any]]]] = (),
                              reset_failed: Sequence[str] = (),
                              queued: Optional[Callable[[], None]] = None) -> str:
        # The resets go out with the start, in order (one round trip).
        self.calls.extend(("reset_failed", n) for n in reset_failed)
        self.calls.append(("start_transient", name))
        for n, _p in aux:
            self.units[n] = ("inactive", "dead")  # loaded, as systemd-run does
        # A scripted exception is systemd refusing the start: nothing was queued.
        if queued is not None and not self.script.raises_next("start_transient"):
            self.units[name] = ("activating", "start")
            queued()

        def done() -> str:
            return "done"

        result = await self.script.next("start_transient", done)
        for n, _p in aux:
            self.units[n] = ("active", "listening") if result == "done" else ("failed", "failed")
        self.units[name] = ("active", "running") if result == "done" else ("failed", "failed")
        return result

    async def start(self, name: str, timeout: float = 30) -> str:
        self.calls.append(("start", name))
        result = await self.script.next("start", lambda: "done")
        self.units[name] = ("active", "running") if result == "done" else ("failed", "failed")
        return result

    async def stop(self, name: str, timeout: float = 30) -> Optional[str]:
        self.calls.append(("stop", name))
        result = await self.script.next("stop", lambda: "done")
        # A stopped transient unit is unloaded: gone from the listing.
        return result if self.units.pop(name, None) is not None else None

    async def reset_failed(self, name: str) -> None:
        self.calls.append(("reset_failed", name))
        await self.script.next("reset_failed", lambda: None)

    async def set_properties(self, name: str, properties: List[List[Any]]) -> None:
        self.calls.append(("set_properties", name))
        await self.script.next("set_properties", lambda: None)
        self.props[name] = properties

    async def list_units(self, patterns: Sequence[str]) -> List[Tuple[str, str, str]]:
        return [(n, a, s) for n, (a, s) in sorted(self.units.items())
                if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    async def unit_state(self, name: str) -> Tuple[str, str, str]:
        if name not in self.units:
            return ("not-found", ABSENT, ABSENT)
        return ("loaded",) + self.units[name]

    async def status(self, name: str) -> UnitStatus:
        load, active, sub = await self.unit_state(name)
        return UnitStatus(name, active, sub, "exit-code" if active == "failed" else "", 0, 0,
                          load)

    async def socket_result(self, name: str) -> str:
        return await self.script.next("socket_result", lambda: "resources")

    async def n_restarts(self, names: Sequence[str]) -> Dict[str, int]:
        return {n: 3 for n in names}

    async def main_pids(self, names: Sequence[str]) -> Dict[str, int]:
        self.calls.extend(("main_pids", n) for n in names)
        return {n: 4000 + i for i, n in enumerate(names)}


class FakePeers:
    """PeerClient: hands out PSK for the listeners asked, unless scripted otherwise."""

    def __init__(self) -> None:
        self.script = Script()
        self.claims: List[Tuple[HostPort, str]] = []

    async def claim_async(self, peer: HostPort, uid: str, listeners: Sequence[HostPort] = (),
                          trust_pem: Optional[str] = None) -> PeerEndpoint:
        self.claims.append((peer, uid))
        return await self.script.next(
            "claim", lambda: PeerEndpoint(uid, tuple(listeners), PSK, "TLS_AES_128_GCM_SHA256"))

    async def endpoint_state_async(self, peer: HostPort, uid: str) -> str:
        return await self.script.next("endpoint_state", lambda: "active")

    async def endpoint_info_async(self, peer: HostPort, uid: str) -> EndpointState:
        """Scripted as "endpoint_state": a state string, or an EndpointState."""
        got = await self.script.next("endpoint_state", lambda: "active")
        return got if isinstance(got, EndpointState) else EndpointState(uid, got)


class FakeListener:
    """The D-Bus side: which endpoint objects are exported."""

    def __init__(self) -> None:
        self.objects: Dict[Tuple[str, Role], Endpoint] = {}
        self.changes: List[Tuple[str, List[str]]] = []

    def endpoint_added(self, ep: Endpoint) -> None:
        assert ep.key not in self.objects, "exported twice"
        self.objects[ep.key] = ep

    def endpoint_changed(self, ep: Endpoint, changed: Iterable[str]) -> None:
        self.changes.append((ep.uid, list(changed)))

    def endpoint_removed(self, ep: Endpoint) -> None:
        del self.objects[ep.key]


class Probes:
    def __init__(self) -> None:
        self.listen = True
        self.taken: List[HostPort] = []
        #: relay_accepted_from: True, False, or an exception to raise; and the calls.
        self.accepted: Any = False
        self.accepted_asked: List[Tuple[str, Any, float]] = []

    def _accepted_from(self, unit: str, ip: Any, since: float) -> bool:
        self.accepted_asked.append((unit, ip, since))
        if isinstance(self.accepted, BaseException):
            raise self.accepted
        return bool(self.accepted)

    def make(self) -> HostProbes:
        return HostProbes(listening=lambda _l: self.listen, taken=lambda _l: list(self.taken),
                          relay_gid=lambda: None, last_relay_error=lambda _u: "bind failed",
                          relay_accepted_from=self._accepted_from,
                          target_accepts=lambda _t, _timeout: True)


class Bed:
    """A Manager on tmp_path with its fakes; ``restart`` makes a new one on the same files."""

    def __init__(self, tmp: Path, units: Optional[Dict[str, Tuple[str, str]]] = None,
                 **cfg: Any) -> None:
        self.tmp = tmp
        # A concrete listen address: the daemon resolves the default wildcard before
        # it builds the Manager (reloader.resolve_config).
        cfg.setdefault("listen_address", ipaddress.ip_address("127.0.0.1"))
        self.cfg = Config(state_dir=tmp / "state", key_dir=tmp / "keys", port_range=(LOW, HIGH),
                          relay_start_timeout=0.2, **cfg)
        self.systemd = FakeSystemd(units)
        self.peers = FakePeers()
        self.listener = FakeListener()
        self.probes = Probes()
        self.m = Manager(self.cfg, self.systemd, self.peers,  # type: ignore[arg-type]
                         listener=self.listener, probes=self.probes.make())
        # No bind probe of the real host: every port of the range is free.
        self.m.ports = PortAllocator(self.cfg.listen_address, LOW, HIGH, probe=lambda h, p: True)

    def restart(self, **cfg: Any) -> Bed:
        """The daemon restarted: same files, the units systemd still runs."""
        return Bed(self.tmp, self.systemd.units, **cfg)

    # -------------------------------------------------------------- views
    def state_files(self) -> List[str]:
        return sorted(p.name for p in (self.tmp / "state" / "endpoints").iterdir())

    def key_dirs(self) -> List[str]:
        return self.m.keys.names()

    def psk(self, ep: Endpoint) -> str:
        return self.m.keys.read_psk(ep.relay_id, ep.role, ep.uid)

    def assert_clean(self) -> None:
        """Nothing left: no endpoint, port, key, state file, unit or exported object."""
        m = self.m
        assert m.endpoints == {}
        assert m.ports.held == frozenset()
        assert self.state_files() == []
        assert self.key_dirs() == []
        assert self.listener.objects == {}
        assert self.systemd.units == {}
        assert m._by_unit_path == {} and m._sockets == set() and m._restarting == set()
        assert m._uid_locks == {}

    def assert_holds(self, *eps: Endpoint) -> None:
        """Exactly ``eps`` are accounted for: tracked, exported, ports, keys and state."""
        m = self.m
        assert set(m.endpoints) == {e.key for e in eps}
        assert set(self.listener.objects) == {e.key for e in eps}
        assert m.ports.held == frozenset(h.port for e in eps for h in e.listeners)
        assert self.state_files() == sorted(f"{e.uid}-{e.role.value}.json" for e in eps)
        assert self.key_dirs() == sorted(f"{e.relay_id}-{e.role.value}" for e in eps)
        assert set(m._by_unit_path) == {unit_object_path(e.unit) for e in eps}


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())


async def inbound(bed: Bed, n: int = 1, **options: Any) -> Endpoint:
    return await bed.m.inbound_request("192.168.150.1", [7000], n, options)


async def outbound(bed: Bed, uid: str, listeners: Sequence[str] = ("192.168.150.2:6200",),
                   local: Sequence[int] = (), n: int = 1) -> Endpoint:
    return await bed.m.outbound_request(uid, list(listeners), list(local), n, {})


def systemd_error(name: str = "org.freedesktop.systemd1.Broken") -> SystemdError:
    return SystemdError(name, "no")


async def blocked(entered: asyncio.Event) -> Callable[[], Awaitable[Any]]:
    async def wait() -> Any:
        entered.set()
        await asyncio.Event().wait()  # until cancelled
    return wait


# ------------------------------------------------------------------ inbound


def test_inbound_success_holds_everything(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed, n=2)
        assert ep.state is State.ACTIVE and len(ep.listeners) == 2
        bed.assert_holds(ep)
        assert bed.systemd.units == {ep.unit: ("active", "running"),
                                     ep.socket_unit: ("active", "listening")}
        assert ep.uid not in ep.unit  # opaque unit names
        assert ep.key in bed.m._sockets
    run(go)


@pytest.mark.parametrize("outcome, message", [
    (systemd_error(), "systemd refused to start"),
    (asyncio.TimeoutError(), "did not start within"),
    (RuntimeError("boom"), "starting the relay of .* failed: RuntimeError: boom"),
])
def test_inbound_start_errors_roll_back(tmp_path: Path, outcome: BaseException,
                                        message: str) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient", outcome)
        with pytest.raises(RelayFailed, match=message):
            await inbound(bed, n=3)
        bed.assert_clean()
        # and the ports can be handed out again
        ep = await inbound(bed, n=10)
        bed.assert_holds(ep)
    run(go)


def test_new_endpoint_starts_its_units_without_a_reset_first(tmp_path: Path) -> None:
    """A fresh relay id has no unit to reset: the start is the first call to systemd."""
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        assert bed.systemd.calls == [("start_transient", ep.unit)]
    run(go)


def test_new_endpoint_whose_unit_exists_is_reset_and_started_again(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient",
                               systemd_error("org.freedesktop.systemd1.UnitExists"))
        ep = await inbound(bed)
        assert bed.systemd.calls[0] == ("start_transient", ep.unit)
        assert set(bed.systemd.calls[1:3]) == {("reset_failed", ep.unit),
                                               ("reset_failed", ep.socket_unit)}
        assert bed.systemd.calls[3:] == [("start_transient", ep.unit)]
        assert ep.state is State.ACTIVE
        bed.assert_holds(ep)
    run(go)


def test_new_endpoint_whose_unit_still_exists_after_the_reset_rolls_back(
        tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        exists = systemd_error("org.freedesktop.systemd1.UnitExists")
        bed.systemd.script.add("start_transient", exists, exists)
        with pytest.raises(RelayFailed, match="systemd refused to start"):
            await inbound(bed)
        assert len(bed.systemd.names("start_transient")) == 2
        bed.assert_clean()
    run(go)


def test_recreated_relay_is_reset_before_its_start(tmp_path: Path) -> None:
    """A relay id that existed before (adoption) may have a failed unit: reset first."""
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        bed.systemd.units.clear()  # e.g. after a reboot
        again = bed.restart()
        await again.m.adopt()
        calls = again.systemd.calls
        starts = [i for i, c in enumerate(calls) if c[0] == "start_transient"]
        assert starts and {("reset_failed", ep.unit), ("reset_failed", ep.socket_unit)} <= set(
            calls[:starts[0]])
        assert again.m.endpoints[ep.key].state is State.ACTIVE
    run(go)


def test_inbound_failed_job_with_a_taken_port_names_it(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient", "failed")
        bed.probes.taken = [HostPort(bed.cfg.listen_address, LOW)]
        with pytest.raises(RelayFailed, match=f"listener 127.0.0.1:{LOW} .* in use"):
            await inbound(bed)
        bed.assert_clean()
    run(go)


def test_inbound_failed_job_of_the_socket_names_the_socket_unit(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient", "failed")
        with pytest.raises(RelayFailed, match=r"could not open the listeners .*: resources"):
            await inbound(bed)
        bed.assert_clean()
    run(go)


def test_inbound_failed_job_of_the_relay_itself(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient", "failed")
        bed.systemd.script.add("socket_result", "success")
        # The listeners are bound by the relay's own socket unit: not "in use by another".
        bed.probes.taken = [HostPort(bed.cfg.listen_address, LOW)]
        with pytest.raises(RelayFailed, match=r"failed to start \(job failed\)"):
            await inbound(bed)
        bed.assert_clean()
    run(go)


def test_inbound_without_socket_units_waits_for_the_listeners(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, relay_socket_activation=False)
        ep = await inbound(bed)
        bed.assert_holds(ep)
        assert ep.key not in bed.m._sockets
        assert list(bed.systemd.units) == [ep.unit]
    run(go)


def test_inbound_relay_exits_before_listening_rolls_back(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, relay_socket_activation=False)
        bed.probes.listen = False
        bed.systemd.script.add("start_transient", "done")

        # The relay dies right after its job: unit_state is asked next.
        orig = bed.systemd.unit_state

        async def dead(name: str) -> Tuple[str, str, str]:
            bed.systemd.units[name] = ("failed", "failed")
            return await orig(name)
        bed.systemd.unit_state = dead  # type: ignore[method-assign]
        with pytest.raises(RelayFailed, match=r"exited \(failed/exit-code\) before listening"):
            await inbound(bed)
        bed.assert_clean()
    run(go)


def test_inbound_relay_never_listening_times_out_and_rolls_back(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, relay_socket_activation=False)
        bed.probes.listen = False
        with pytest.raises(RelayFailed, match="is not listening on .* after 0.2s"):
            await inbound(bed)
        bed.assert_clean()
    run(go)


def test_inbound_cancelled_while_starting_rolls_back(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        entered = asyncio.Event()
        bed.systemd.script.add("start_transient", await blocked(entered))
        task = asyncio.ensure_future(inbound(bed, n=2))
        await entered.wait()
        assert bed.m.ports.held and bed.state_files() and bed.key_dirs()  # mid-request
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        bed.assert_clean()
    run(go)


def test_inbound_refusals_allocate_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, allowed_targets=(parse_target_rule("10.0.0.0/8"),))
        with pytest.raises(AccessDenied):
            await inbound(bed)
        with pytest.raises(InvalidArgument):
            await bed.m.inbound_request("10.1.1.1", [7000], 1, {"no_such_option": "x"})
        bed.assert_clean()
        assert bed.systemd.calls == []
    run(go)


def test_too_few_free_ports_allocates_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed, n=8)
        with pytest.raises(PortsExhausted):
            await inbound(bed, n=3)
        bed.assert_holds(ep)
    run(go)


def test_max_endpoints_refuses_before_allocating(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, max_endpoints=1)
        ep = await inbound(bed)
        with pytest.raises(PortsExhausted, match="max_endpoints"):
            await inbound(bed)
        bed.assert_holds(ep)
    run(go)


# ------------------------------------------------------------------ outbound


def test_outbound_success_writes_the_peers_key(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        uid = new_uid()
        ep = await outbound(bed, uid)
        bed.assert_holds(ep)
        assert ep.peer == HostPort(S2, bed.cfg.peer_port)
        assert bed.psk(ep) == PSK
        assert bed.peers.claims == [(ep.peer, uid)]
    run(go)


@pytest.mark.parametrize("refusal", [
    PeerRejected("the key was already claimed"),
    PeerUnreachable("connection refused"),
    NotFound("no inbound endpoint"),
    WrongListener("not a listener"),
])
def test_outbound_peer_refusal_returns_the_ports(tmp_path: Path, refusal: Exception) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.peers.script.add("claim", refusal)
        with pytest.raises(type(refusal)):
            await outbound(bed, new_uid(), local=[LOW + 4])
        bed.assert_clean()
        assert bed.systemd.calls == []
        with pytest.raises(type(refusal)):  # and the allocated ones too
            bed.peers.script.add("claim", refusal)
            await outbound(bed, new_uid(), n=3)
        bed.assert_clean()
    run(go)


def test_outbound_answer_lacking_the_listeners_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        uid = new_uid()
        other = PeerEndpoint(uid, (HostPort(S2, 6201),), PSK, "TLS_AES_128_GCM_SHA256")
        bed.peers.script.add("claim", other)
        with pytest.raises(PeerRejected, match="misbehaves"):
            await outbound(bed, uid)
        bed.assert_clean()
    run(go)


@pytest.mark.parametrize("outcome, message", [
    (systemd_error(), "systemd refused"),
    (asyncio.TimeoutError(), "did not start within"),
    ("failed", "could not open the listeners"),
])
def test_outbound_relay_failure_after_the_claim_rolls_back(
        tmp_path: Path, outcome: Any, message: str) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        bed.systemd.script.add("start_transient", outcome)
        with pytest.raises(RelayFailed, match=message):
            await outbound(bed, new_uid(), n=2)
        bed.assert_clean()
    run(go)


def test_outbound_cancelled_during_the_claim_returns_the_ports(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        entered = asyncio.Event()
        bed.peers.script.add("claim", await blocked(entered))
        task = asyncio.ensure_future(outbound(bed, new_uid(), n=4))
        await entered.wait()
        assert len(bed.m.ports.held) == 4
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        bed.assert_clean()
    run(go)


def test_outbound_twice_for_one_uid(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        uid = new_uid()
        ep = await outbound(bed, uid)
        with pytest.raises(AlreadyExists):
            await outbound(bed, uid)
        assert len(bed.peers.claims) == 1  # refused before a claim
        bed.assert_holds(ep)
    run(go)


def test_concurrent_outbound_for_one_uid_loser_returns_its_ports(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        uid = new_uid()
        both = asyncio.Event()
        waiting: List[int] = []

        async def slow_claim() -> PeerEndpoint:
            waiting.append(1)
            if len(waiting) == 2:
                both.set()
            await both.wait()
            return PeerEndpoint(uid, (HostPort(S2, 6200),), PSK, "TLS_AES_128_GCM_SHA256")
        bed.peers.script.add("claim", slow_claim, slow_claim)
        results = await asyncio.gather(outbound(bed, uid, n=2), outbound(bed, uid, n=3),
                                       return_exceptions=True)
        won = [r for r in results if isinstance(r, Endpoint)]
        lost = [r for r in results if isinstance(r, AlreadyExists)]
        assert len(won) == 1 and len(lost) == 1
        bed.assert_holds(won[0])
    run(go)


def test_outbound_local_ports_must_match_num_conn(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        with pytest.raises(InvalidArgument, match="one local port per connection"):
            await outbound(bed, new_uid(), local=[LOW], n=2)
        bed.assert_clean()
    run(go)


# ------------------------------------------------------------------ release


def test_release_returns_everything_and_a_late_claim_hears_released(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        a = await inbound(bed, n=2)
        b = await outbound(bed, new_uid())
        (gone,) = await bed.m.release(a.uid)
        assert gone is a and a.state is State.RELEASING
        bed.assert_holds(b)
        assert set(bed.systemd.names("stop")) == {a.unit, a.socket_unit}
        with pytest.raises(NotFound, match="was released by the inbound side"):
            await bed.m.claim(a.uid, PeerIdentity("192.168.150.2:40000"))
        await bed.m.release(b.uid)
        bed.assert_clean()
        with pytest.raises(NotFound):
            await bed.m.release(a.uid)
    run(go)


@pytest.mark.parametrize("failure", [systemd_error(), asyncio.TimeoutError()])
def test_release_when_stopping_fails_still_returns_keys_state_and_ports(
        tmp_path: Path, failure: BaseException) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed, n=2)
        bed.systemd.script.add("stop", failure, failure)
        bed.systemd.script.add("reset_failed", systemd_error(), systemd_error())
        await bed.m.release(ep.uid)
        # The stop failed, so the fake still lists the units; everything else is back.
        bed.systemd.units.clear()
        bed.assert_clean()
    run(go)


def test_release_cancelled_midway_can_be_repeated(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed, n=2)
        entered = asyncio.Event()
        bed.systemd.script.add("stop", await blocked(entered))
        task = asyncio.ensure_future(bed.m.release(ep.uid))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Still accounted for (a restart would roll the releasing record back) ...
        assert ep.state is State.RELEASING
        bed.assert_holds(ep)
        # ... and a second release finishes the job.
        await bed.m.release(ep.uid)
        bed.assert_clean()
    run(go)


def test_release_all(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        await inbound(bed)
        await inbound(bed)
        await outbound(bed, new_uid())
        assert await bed.m.release_all() == 3
        bed.assert_clean()
    run(go)


# ------------------------------------------------------------------ claim (peer side)


def test_claim_sets_the_allow_list_and_hands_out_the_key_once(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        who = PeerIdentity("192.168.150.2:40000")
        doc = await bed.m.claim(ep.uid, who, ep.listeners)
        assert doc["psk"] == bed.psk(ep) and ep.claimed_by == "192.168.150.2:40000"
        assert ep.claimant_ip == S2
        assert bed.systemd.names("set_properties") == [ep.socket_unit]
        with pytest.raises(PeerRejected, match="already claimed"):
            await bed.m.claim(ep.uid, who)
    run(go)


def test_refused_claims_consume_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed, allowed_peer="192.168.150.2")
        with pytest.raises(AccessDenied):
            await bed.m.claim(ep.uid, PeerIdentity("192.168.150.3:40000"))
        who = PeerIdentity("192.168.150.2:40000", verified=True, ips=(S2,))
        with pytest.raises(WrongListener, match="nothing was claimed"):
            await bed.m.claim(ep.uid, who, [HostPort(bed.cfg.listen_address, HIGH)])
        bed.systemd.script.add("set_properties", systemd_error())
        with pytest.raises(PeerRejected, match="nothing was claimed"):
            await bed.m.claim(ep.uid, who)
        assert ep.claimed_by == "" and ep.claimant_ip is None
        await bed.m.claim(ep.uid, who)
        assert ep.claimed_by.startswith("192.168.150.2:40000 cert")
    run(go)


# ------------------------------------------------------------------ re-arm


def test_rearm_restarts_behind_the_socket_with_a_new_key(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        old = bed.psk(ep)
        await bed.m.claim(ep.uid, PeerIdentity("192.168.150.2:40000"))
        bed.systemd.calls.clear()
        await bed.m.rearm(ep.uid)
        assert bed.psk(ep) != old
        assert ep.claimed_by == "" and ep.claimant_ip is None and ep.state is State.ACTIVE
        assert [m for m, _n in bed.systemd.calls] == ["stop", "set_properties", "reset_failed",
                                                      "start"]
        assert bed.systemd.names("stop") == [ep.unit]  # the socket keeps the ports
        bed.assert_holds(ep)
        assert bed.m._restarting == set()
    run(go)


@pytest.mark.parametrize("step, outcome, message", [
    ("start", "failed", r"failed to restart \(job failed\)"),
    ("start", asyncio.TimeoutError(), "restarting .* failed"),
    ("stop", systemd_error(), "restarting .* failed: org.freedesktop.systemd1.Broken"),
    ("set_properties", systemd_error(), "restarting .* failed"),
])
def test_rearm_failure_keeps_the_endpoint_accounted_for(
        tmp_path: Path, step: str, outcome: Any, message: str) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        bed.systemd.script.add(step, outcome)
        with pytest.raises(RelayFailed, match=message):
            await bed.m.rearm(ep.uid)
        assert bed.m._restarting == set()
        bed.assert_holds(ep)  # nothing lost: still there to release
        await bed.m.release(ep.uid)
        bed.assert_clean()
    run(go)


def test_rearm_failure_is_reported_by_the_monitor(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        bed.systemd.script.add("start", "failed")
        with pytest.raises(RelayFailed):
            await bed.m.rearm(ep.uid)
        await asyncio.sleep(0.05)  # the monitor's refresh (coalesced for 10 ms)
        assert ep.state is State.FAILED and "relay failed" in ep.detail
    run(go)


def test_rearm_cancelled_leaves_no_restart_mark(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        entered = asyncio.Event()
        bed.systemd.script.add("start", await blocked(entered))
        task = asyncio.ensure_future(bed.m.rearm(ep.uid))
        await entered.wait()
        assert ep.key in bed.m._restarting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert bed.m._restarting == set()
        bed.assert_holds(ep)
    run(go)


def test_rearm_without_a_socket_unit_starts_a_fresh_pair(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        bed.m._sockets.discard(ep.key)  # as a relay of an earlier version
        await bed.m.rearm(ep.uid)
        assert set(bed.systemd.names("stop")) == {ep.unit, ep.socket_unit}
        assert bed.systemd.names("start_transient") == [ep.unit, ep.unit]
        assert ep.key in bed.m._sockets
        bed.assert_holds(ep)
    run(go)


def test_rearm_without_a_socket_unit_failing_keeps_the_endpoint(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        bed.m._sockets.discard(ep.key)
        bed.systemd.script.add("start_transient", systemd_error())
        with pytest.raises(RelayFailed, match="systemd refused"):
            await bed.m.rearm(ep.uid)
        assert bed.m._restarting == set()
        bed.assert_holds(ep)
        await bed.m.release(ep.uid)
        bed.assert_clean()
    run(go)


def test_rearm_of_a_legacy_relay_renames_it(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await legacy_inbound(bed)
        old_unit = ep.unit
        bed.m._sockets.discard(ep.key)
        await bed.m.rearm(ep.uid)
        assert ep.relay_id != ep.uid and ep.unit != old_unit
        assert old_unit in bed.systemd.names("stop")
        assert old_unit not in bed.systemd.units
        bed.assert_holds(ep)
        assert bed.m.store.load_all()[0][0].relay_id == ep.relay_id
    run(go)


# ------------------------------------------------------------------ adopt


async def legacy_inbound(bed: Bed) -> Endpoint:
    """An inbound endpoint as a version before relay ids wrote it (units named by uid)."""
    ep = await inbound(bed)
    old_id = ep.relay_id
    await bed.m.systemd.stop(ep.unit)
    await bed.m.systemd.stop(ep.socket_unit)
    bed.m._by_unit_path.pop(unit_object_path(ep.unit))
    ep.relay_id = ep.uid
    bed.m._write_keys(ep, PSK)
    bed.m.store.save(ep)
    bed.m.keys.remove(old_id, ep.role)
    bed.m._by_unit_path[unit_object_path(ep.unit)] = ep.key
    bed.systemd.units[ep.unit] = ("active", "running")
    return ep


def test_adopt_running_relays_as_they_are(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first, n=2)
        b = await outbound(first, new_uid())
        bed = first.restart()
        await bed.m.adopt()
        a2, b2 = bed.m.endpoints[a.key], bed.m.endpoints[b.key]
        assert (a2.relay_id, b2.relay_id) == (a.relay_id, b.relay_id)
        bed.assert_holds(a2, b2)
        assert bed.systemd.calls == []  # nothing stopped or started
        assert a2.n_restarts == 3 and a2.state is State.ACTIVE
        assert bed.m._sockets == {a.key, b.key}
    run(go)


def test_adopted_relays_main_pids_are_read_after_adoption(tmp_path: Path) -> None:
    """Adoption asks NRestarts per relay; the MainPID (counters only) is read later,
    once the daemon is ready (run_counters), and shown then."""
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first)
        bed = first.restart()
        await bed.m.adopt()
        assert bed.systemd.names("main_pids") == []
        assert bed.m.counters[a.key].main_pid == 0
        await bed.m.read_adopted_main_pids()
        assert bed.systemd.names("main_pids") == [a.unit]
        assert bed.m.counters[a.key].main_pid == 4000
        assert (a.uid, ["counters"]) in bed.listener.changes
        await bed.m.read_adopted_main_pids()  # once only
        assert bed.systemd.names("main_pids") == [a.unit]
    run(go)


def test_adopt_asks_nrestarts_once_for_every_running_relay(tmp_path: Path) -> None:
    """One many-units read for the running relays (not for one recreated or rolled back)."""
    async def go() -> None:
        first = Bed(tmp_path)
        eps = [await inbound(first) for _ in range(5)]
        gone = eps[0]
        del first.systemd.units[gone.unit]  # its relay must be recreated
        bed = first.restart()
        asked: List[List[str]] = []
        real = bed.systemd.n_restarts

        async def n_restarts(names: Sequence[str]) -> Dict[str, int]:
            asked.append(list(names))
            return await real(names)

        bed.systemd.n_restarts = n_restarts  # type: ignore[method-assign]
        await bed.m.adopt()
        assert len(asked) == 1 and sorted(asked[0]) == sorted(e.unit for e in eps[1:])
        assert all(bed.m.endpoints[e.key].n_restarts == 3 for e in eps[1:])
        assert bed.m.endpoints[gone.key].state is State.ACTIVE
        bed.assert_holds(*[bed.m.endpoints[e.key] for e in eps])
    run(go)


def test_adopt_recreates_a_relay_without_a_unit(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first, n=2)
        psk = first.psk(a)
        first.systemd.units.clear()  # a reboot
        bed = first.restart()
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        assert ep.state is State.ACTIVE and ep.relay_id == a.relay_id
        assert bed.systemd.names("start_transient") == [a.unit]
        assert bed.psk(ep) == psk
        bed.assert_holds(ep)
        assert bed.m._restarting == set()
    run(go)


def test_adopt_recreation_failing_leaves_it_failed_until_released(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first)
        first.systemd.units.clear()
        bed = first.restart()
        bed.systemd.script.add("start_transient", "failed")
        bed.probes.taken = list(a.listeners)
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        assert ep.state is State.FAILED
        assert "could not recreate the relay at start-up: listener" in ep.detail
        bed.assert_holds(ep)
        assert bed.m._restarting == set()
        await bed.m.release(ep.uid)
        bed.assert_clean()
    run(go)


def test_adopt_with_an_unreadable_key_leaves_it_failed(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first)
        first.systemd.units.clear()
        (first.m.keys.endpoint_dir(a.relay_id, a.role) / PSK_FILE).write_text("garbage")
        bed = first.restart()
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        assert ep.state is State.FAILED and "key file of" in ep.detail
        assert bed.systemd.names("start_transient") == []
        assert bed.m.ports.held == frozenset(h.port for h in a.listeners)
    run(go)


def test_adopt_keeps_a_failed_relay_failed(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first)
        first.m._set(a, state=State.FAILED, detail="relay failed (exit-code)")
        first.systemd.units[a.unit] = ("failed", "failed")
        bed = first.restart()
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        assert ep.state is State.FAILED and ep.detail == "relay failed (exit-code)"
        assert bed.systemd.names("start_transient") == []
        bed.assert_holds(ep)
        await bed.m.release(ep.uid)
        bed.assert_clean()
    run(go)


def test_adopt_recreates_an_active_record_whose_unit_failed(tmp_path: Path) -> None:
    # The state said active but the unit failed while the daemon was down.
    async def go() -> None:
        first = Bed(tmp_path)
        a = await inbound(first)
        first.systemd.units[a.unit] = ("failed", "failed")
        bed = first.restart()
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        # not running: recreated from the persisted key
        assert ep.state is State.ACTIVE and bed.systemd.names("start_transient") == [a.unit]
        bed.assert_holds(ep)
    run(go)


@pytest.mark.parametrize("left", [State.STARTING, State.RELEASING])
def test_adopt_rolls_back_an_interrupted_request(tmp_path: Path, left: State) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        keep = await inbound(first)
        a = await inbound(first, n=3)
        first.m._set(a, state=left)
        bed = first.restart()
        await bed.m.adopt()
        assert set(bed.systemd.names("stop")) == {a.unit, a.socket_unit}
        bed.assert_holds(bed.m.endpoints[keep.key])
        assert a.unit not in bed.systemd.units and a.socket_unit not in bed.systemd.units
        # its ports can be handed out again
        assert bed.m.ports.free_count() == HIGH - LOW + 1 - 1
    run(go)


def test_adopt_stops_orphan_units_socket_first(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        keep = await inbound(first)
        orphan = await inbound(first)
        first.m.store.delete(orphan.uid, orphan.role)  # state gone, units and keys still there
        first.systemd.units["scistream-outbound-0123456789abcdef.socket"] = ("failed", "failed")
        first.systemd.units["unrelated.service"] = ("active", "running")
        bed = first.restart()
        await bed.m.adopt()
        stops = bed.systemd.names("stop")
        # sockets first (their services stop with them), then the services
        assert sorted(stops[:2]) == sorted([orphan.socket_unit,
                                            "scistream-outbound-0123456789abcdef.socket"])
        assert stops[2:] == [orphan.unit]
        assert set(bed.systemd.names("reset_failed")) == set(stops)
        assert sorted(bed.systemd.units) == sorted([keep.unit, keep.socket_unit,
                                                    "unrelated.service"])
        bed.assert_holds(bed.m.endpoints[keep.key])  # the orphan's key dir is gone too
    run(go)


def test_adopt_removes_orphan_key_directories_only(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        keep = await inbound(first)
        orphan = first.m.keys.endpoint_dir("0123456789abcdef", Role.OUTBOUND)
        orphan.mkdir()
        stranger = first.m.keys.dir / "lost+found"
        stranger.mkdir()
        bed = first.restart()
        await bed.m.adopt()
        assert not orphan.exists() and stranger.is_dir()
        assert bed.key_dirs() == sorted([f"{keep.relay_id}-inbound", "lost+found"])
    run(go)


def test_adopt_ignores_a_corrupt_state_file(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        keep = await inbound(first)
        bad = first.tmp / "state" / "endpoints" / f"{new_uid()}-inbound.json"
        bad.write_text("{not json")
        bed = first.restart()
        await bed.m.adopt()
        assert set(bed.m.endpoints) == {keep.key}
        assert bad.exists()  # left for the administrator
    run(go)


def test_adopt_keeps_a_running_legacy_relay_and_its_name(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await legacy_inbound(first)
        bed = first.restart()
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        assert ep.relay_id == ep.uid and ep.state is State.ACTIVE
        assert ep.key not in bed.m._sockets  # no socket unit: a re-arm gives it one
        bed.assert_holds(ep)
        assert bed.systemd.calls == []
    run(go)


def test_adopt_recreates_a_legacy_record_under_a_new_name(tmp_path: Path) -> None:
    async def go() -> None:
        first = Bed(tmp_path)
        a = await legacy_inbound(first)
        first.systemd.units.clear()
        bed = first.restart()
        await bed.m.adopt()
        ep = bed.m.endpoints[a.key]
        assert ep.relay_id != ep.uid and ep.state is State.ACTIVE
        assert bed.systemd.names("start_transient") == [ep.unit]
        assert bed.psk(ep) == PSK
        bed.assert_holds(ep)  # the uid-named key directory is gone
        (saved,), _ = bed.m.store.load_all()
        assert saved.relay_id == ep.relay_id
        # the monitor follows the new unit, not the old one
        assert bed.m._by_unit_path == {unit_object_path(ep.unit): ep.key}
    run(go)


# ------------------------------------------------------------------ monitor, peer checks


def test_a_failed_relay_is_reported_with_its_own_error(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        bed.systemd.units[ep.unit] = ("failed", "failed")
        for cb in bed.systemd.callbacks:
            cb(unit_object_path(ep.unit))
        await asyncio.sleep(0.05)
        assert ep.state is State.FAILED and "relay failed (exit-code)" in ep.detail
        await asyncio.sleep(0.6)  # the journal is read half a second later
        assert "bind failed" in ep.detail
        bed.assert_holds(ep)
    run(go)


def test_peer_check_marks_an_outbound_whose_inbound_is_gone(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        a = await outbound(bed, new_uid())
        b = await outbound(bed, new_uid())
        bed.peers.script.add("endpoint_state", NotFound("gone"), PeerUnreachable("down"))
        await bed.m.check_peers()
        assert a.state is State.FAILED and "released tunnel" in a.detail
        assert b.state is State.ACTIVE  # unreachable proves nothing
    run(go)


def test_fakes_follow_the_systemd_client_signatures() -> None:
    """The fakes must not drift from what they stand for."""
    import inspect

    from scistreamd.peerclient import PeerClient
    from scistreamd.systemd import Systemd
    for fake, real in ((FakeSystemd, Systemd), (FakePeers, PeerClient)):
        for name, fn in inspect.getmembers(fake, inspect.isfunction):
            if name.startswith("_") or name == "names":
                continue
            assert list(inspect.signature(fn).parameters) == list(
                inspect.signature(getattr(real, name)).parameters), name



# ------------------------------------------------------------------ per-uid locks


def test_requests_leave_no_lock_behind(tmp_path: Path) -> None:
    # A lock per uid asked about, kept forever, would let any peer grow the
    # daemon's memory with claims of random uids.
    async def go() -> None:
        bed = Bed(tmp_path)
        for _ in range(3):
            with pytest.raises(NotFound):
                await bed.m.claim(new_uid(), PeerIdentity("192.168.150.2:40000"))
        bed.peers.script.add("claim", PeerUnreachable("down"))
        with pytest.raises(PeerUnreachable):
            await outbound(bed, new_uid())
        ep = await inbound(bed)
        await bed.m.release(ep.uid)
        bed.assert_clean()
        assert bed.m._uid_locks == {}
    run(go)


def test_rearm_racing_a_release_does_not_resurrect_the_endpoint(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        ep = await inbound(bed)
        entered, go_on = asyncio.Event(), asyncio.Event()

        async def slow_stop() -> str:
            entered.set()
            await go_on.wait()
            return "done"
        bed.systemd.script.add("stop", slow_stop)
        release = asyncio.ensure_future(bed.m.release(ep.uid))
        await entered.wait()
        rearm = asyncio.ensure_future(bed.m.rearm(ep.uid))
        await asyncio.sleep(0.01)  # the re-arm now waits for the uid's lock
        go_on.set()
        await release
        with pytest.raises(NotFound):
            await rearm
        bed.assert_clean()
        assert bed.m._uid_locks == {}
    run(go)


# ------------------------------------------------------------------ reload (apply_config)


def test_apply_config_updates_running_outbound_listeners_only_when_networks_change(
        tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path)
        inb = await inbound(bed)
        out = await outbound(bed, new_uid())
        bed.systemd.calls.clear()
        await bed.m.apply_config(dataclasses.replace(bed.cfg, max_endpoints=5))
        assert bed.m.cfg.max_endpoints == 5
        assert bed.systemd.names("set_properties") == []
        nets = (ipaddress.ip_network("10.0.0.0/8"),)
        await bed.m.apply_config(dataclasses.replace(bed.m.cfg, outbound_client_networks=nets))
        # Only the outbound endpoint's socket: an inbound one keeps its claimant list.
        assert bed.systemd.names("set_properties") == [out.socket_unit]
        assert inb.socket_unit not in bed.systemd.names("set_properties")
    run(go)


def test_peer_check_loop_follows_a_reloaded_interval(tmp_path: Path) -> None:
    async def go() -> None:
        bed = Bed(tmp_path, peer_check_interval=0.0)
        checked = asyncio.Event()

        async def check() -> None:
            checked.set()
        bed.m.check_peers = check  # type: ignore[method-assign]
        loop = asyncio.ensure_future(bed.m.run_peer_checks())
        try:
            await asyncio.sleep(0.05)
            assert not checked.is_set()  # 0 = never
            await bed.m.apply_config(dataclasses.replace(bed.cfg, peer_check_interval=0.01))
            await asyncio.wait_for(checked.wait(), 10)
        finally:
            loop.cancel()


# ---------------------------------------------------------------------------
# counters (counting.py): journal lines in, Traffic and notifications out


def test_relay_lines_count_connections_and_target_health(tmp_path: Path) -> None:
    bed = Bed(tmp_path)

    async def go() -> None:
        ep = await inbound(bed)
        assert bed.m.traffic(ep).target_reachable == "yes"  # the check at the request
        bed.listener.changes.clear()
        line = "2026.12.03 10:39:50 LOG5[{}]: Service [in-0] accepted connection from 1.2.3.4:5"
        bed.m.on_relay_line(ep.unit, "inv", line.format(0), 1)
        bed.m.on_relay_line(ep.unit, "inv", line.format(1), 2)
        bed.m.on_relay_line("scistream-inbound-0000000000000000.service", "x", line.format(2), 3)
        bed.m.on_relay_line(ep.unit, "inv", "LOG3[1]: s_connect: connect 192.168.150.1:7000: "
                            "Connection refused (111)", 1_700_000_000_000_000)
        bed.m.on_relay_line(ep.unit, "inv", "LOG5[1]: Connection reset: 0 byte(s) sent to "
                            "TLS, 0 byte(s) sent to socket", 5)
        t = bed.m.traffic(ep)
        assert (t.connections_active, t.connections_total) == (1, 2)
        assert (t.target_reachable, t.target_failures) == ("no", 1)
        assert t.last_target_failure == (
            "the server application at 192.168.150.1:7000 refused the connection")
        assert bed.listener.changes and all(c == (ep.uid, ["counters"])
                                            for c in bed.listener.changes)
        # Endpoints with connections are polled; the answer is the state of health too.
        assert ep.key in bed.m._hot
        state = await bed.m.endpoint_state(ep.uid)
        assert (state["target_reachable"], state["target_failures"]) == ("no", 1)
        await bed.m.release(ep.uid)
        assert ep.key not in bed.m.counters and ep.key not in bed.m._hot

    run(go)


def test_inbound_request_warns_but_never_refuses_a_closed_target(tmp_path: Path) -> None:
    bed = Bed(tmp_path)
    import dataclasses

    bed.m.probes = dataclasses.replace(bed.m.probes, target_accepts=lambda _t, _timeout: False)

    async def go() -> None:
        ep = await inbound(bed)
        t = bed.m.traffic(ep)
        assert ep.state is State.ACTIVE
        assert (t.target_reachable, t.target_failures) == ("no", 0)
        assert "192.168.150.1:7000" in t.last_target_failure

    run(go)


def test_replayed_failures_are_counted_not_logged_again(tmp_path: Path, caplog) -> None:
    import logging

    caplog.set_level(logging.INFO)
    bed = Bed(tmp_path)
    refused = "LOG3[0]: s_connect: connect 192.168.150.1:7000: Connection refused (111)"

    async def go() -> None:
        ep = await inbound(bed)
        caplog.clear()
        bed.m._replaying = True  # a restarted daemon reading its relays' past lines
        bed.m.on_relay_line(ep.unit, "inv", refused, 1)
        bed.m._replaying = False
        assert bed.m.traffic(ep).target_failures == 1
        assert "refused the connection" not in caplog.text
        bed.m.on_relay_line(ep.unit, "inv", refused.replace("[0]", "[1]"), 2)
        assert bed.m.traffic(ep).target_failures == 2
        # Already failing: the second failure is no news either.
        assert "refused the connection" not in caplog.text
        bed.m.on_relay_line(ep.unit, "inv", "LOG5[2]: s_connect: connected 192.168.150.1:7000", 3)
        assert "reaches its target 192.168.150.1:7000 again" in caplog.text

    run(go)
