"""The D-Bus face of scistreamd: org.scistream.Tunnel1 (DESIGN.md §4).

- one manager object, one object per endpoint (machined style);
- signatures come from the one description of the API (interface.py);
- every method is wrapped so a caller gets a named error, never a traceback
  (dbus-next would otherwise send the Python traceback as the message);
- every call is authorized (authz.py): each exported method checks its
  caller first; what dbus-next answers itself (properties, introspection,
  managed objects) is checked by the authorizer's message handler. The D-Bus
  policy allow-lists the methods (machined style); this check also covers
  Properties.Get on endpoint objects, which a policy cannot tell apart from
  the manager's.
"""


import asyncio
import functools
import logging
import time
from typing import Any, Awaitable, Callable, Dict, Iterable, Optional, Sequence, Set, Tuple

from dbus_next import DBusError, Message, Variant
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from . import (
    ENDPOINT_IFACE,
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    __version__,
    reqstats,
)
from .authz import Authorizer, action_of_member
from .buspath import endpoint_object_path
from .dbus_compat import PeerAnswers, export_quietly
from .endpoint_json import counter_values
from .endpoint_json import usec as _usec
from .errors import ScistreamError
from .interface import ENDPOINT, MANAGER, Interface, signed, typed
from .manager import Manager
from .model import Endpoint, Role

logger = logging.getLogger(__name__)

INTERNAL_ERROR = f"{ERROR_PREFIX}.Failed"
INTERNAL_TEXT = "internal error in scistreamd; the details are in 'journalctl -u scistreamd'"


def _dbus_errors(fn: Callable) -> Callable:
    """Turn every exception into a named D-Bus error; log the unexpected ones."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> Any:
        started, result = time.monotonic(), reqstats.OK
        try:
            return await fn(*args, **kw)
        except ScistreamError as e:
            result = e.name if not e.internal else "Failed"
            if not e.internal:
                raise DBusError(e.dbus_name(), str(e)) from None
            logger.error("internal error in %s: %s", fn.__name__, e)
            raise DBusError(INTERNAL_ERROR, INTERNAL_TEXT) from None
        except DBusError as e:
            result = e.type.rpartition(".")[2]
            raise
        except Exception:
            result = "Failed"
            logger.exception("internal error in %s", fn.__name__)
            raise DBusError(INTERNAL_ERROR, INTERNAL_TEXT) from None
        finally:
            # Metrics: every answered call, by method and result (reqstats.py).
            reqstats.DBUS.record(fn.__name__, result, time.monotonic() - started)

    return wrapper


def _authorized(fn: Callable) -> Callable:
    """Check the caller before anything else (even argument checks) runs."""
    action = action_of_member(fn.__name__)

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        await self._api.authorizer.require(action)
        return await fn(self, *args)

    return wrapper


def _method(iface: Interface) -> Callable[[Callable], Callable]:
    """An exported method: authorized, the described signature, named errors only."""
    return lambda fn: method()(_dbus_errors(_authorized(signed(iface)(fn))))


def _property(iface: Interface) -> Callable[[Callable], Callable]:
    """An exported read-only property of the described type."""
    return lambda fn: dbus_property(access=PropertyAccess.READ)(typed(iface)(fn))


def _unwrap(options: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.value if isinstance(v, Variant) else v) for k, v in options.items()}


def _path(ep: Endpoint) -> str:
    return endpoint_object_path(ep.uid, ep.role)


#: At most one PropertiesChanged of counters per endpoint in this many seconds.
COUNTER_SIGNAL_INTERVAL = 1.0


class EndpointObject(ServiceInterface):
    """org.scistream.Tunnel1.Endpoint of one endpoint."""

    def __init__(self, api: "TunnelApi", ep: Endpoint) -> None:
        super().__init__(ENDPOINT_IFACE)
        self._api = api
        self.ep = ep

    @_property(ENDPOINT)
    def Uid(self):
        return self.ep.uid

    @_property(ENDPOINT)
    def Role(self):
        return self.ep.role.value

    @_property(ENDPOINT)
    def State(self):
        return self.ep.state.value

    @_property(ENDPOINT)
    def StateDetail(self):
        return self.ep.detail

    @_property(ENDPOINT)
    def Listeners(self):
        return [str(h) for h in self.ep.listeners]

    @_property(ENDPOINT)
    def Targets(self):
        return [str(h) for h in self.ep.targets]

    @_property(ENDPOINT)
    def NumConn(self):
        return self.ep.num_conn

    @_property(ENDPOINT)
    def Unit(self):
        return self.ep.unit

    @_property(ENDPOINT)
    def CreatedAt(self):
        return _usec(self.ep.created_at)

    @_property(ENDPOINT)
    def NRestarts(self):
        return self.ep.n_restarts

    @_property(ENDPOINT)
    def ClaimedBy(self):
        return self.ep.claimed_by

    @_property(ENDPOINT)
    def ClaimedAt(self):
        return _usec(self.ep.claimed_at)

    @_property(ENDPOINT)
    def Peer(self):
        return str(self.ep.peer) if self.ep.peer else ""

    @_property(ENDPOINT)
    def AllowedPeer(self):
        return self.ep.allowed_peer

    @_property(ENDPOINT)
    def Owner(self):
        return self.ep.owner

    @_property(ENDPOINT)
    def KeyGeneration(self):
        return self.ep.key_generation

    # Counters: what the manager has (it reads the relays with activity; counting.py).
    def _traffic(self) -> Dict[str, Any]:
        return counter_values(self._api.manager.traffic(self.ep))

    @_property(ENDPOINT)
    def BytesIn(self):
        return self._traffic()["BytesIn"]

    @_property(ENDPOINT)
    def BytesOut(self):
        return self._traffic()["BytesOut"]

    @_property(ENDPOINT)
    def RateIn(self):
        return self._traffic()["RateIn"]

    @_property(ENDPOINT)
    def RateOut(self):
        return self._traffic()["RateOut"]

    @_property(ENDPOINT)
    def ConnectionsActive(self):
        return self._traffic()["ConnectionsActive"]

    @_property(ENDPOINT)
    def ConnectionsTotal(self):
        return self._traffic()["ConnectionsTotal"]

    @_property(ENDPOINT)
    def MainPID(self):
        return self._traffic()["MainPID"]

    @_property(ENDPOINT)
    def MemoryCurrent(self):
        return self._traffic()["MemoryCurrent"]

    @_property(ENDPOINT)
    def TargetReachable(self):
        return self._traffic()["TargetReachable"]

    @_property(ENDPOINT)
    def TargetFailures(self):
        return self._traffic()["TargetFailures"]

    @_property(ENDPOINT)
    def LastTargetFailure(self):
        return self._traffic()["LastTargetFailure"]

    @_property(ENDPOINT)
    def LastTargetFailureAt(self):
        return self._traffic()["LastTargetFailureAt"]

    @_method(ENDPOINT)
    async def Release(self):
        await self._api.manager.release(self.ep.uid, self.ep.role)

    @_method(ENDPOINT)
    async def Rearm(self):
        if self.ep.role is not Role.INBOUND:
            raise DBusError(f"{ERROR_PREFIX}.InvalidArgument",
                            "only an inbound endpoint can be re-armed")
        await self._api.manager.rearm(self.ep.uid)


#: Endpoint property name -> attribute of Endpoint it reflects.
_PROP_OF_FIELD = {"state": ["State"], "detail": ["StateDetail"], "n_restarts": ["NRestarts"],
                  "claimed_by": ["ClaimedBy"], "claimed_at": ["ClaimedAt"],
                  "key_generation": ["KeyGeneration"]}


class ManagerObject(ServiceInterface):
    """org.scistream.Tunnel1.Manager at /org/scistream/Tunnel1."""

    def __init__(self, api: "TunnelApi") -> None:
        super().__init__(MANAGER_IFACE)
        self._api = api

    @property
    def _m(self) -> Manager:
        return self._api.manager

    @_method(MANAGER)
    async def InboundRequest(self, remote_ip, receiver_ports, num_conn, options):
        ep = await self._m.inbound_request(remote_ip, list(receiver_ports), num_conn,
                                           _unwrap(options),
                                           owner=await self._api.authorizer.caller_owner())
        return [ep.uid, _path(ep), [str(h) for h in ep.listeners]]

    @_method(MANAGER)
    async def OutboundRequest(self, uid, remote_listeners, local_ports, num_conn, options):
        ep = await self._m.outbound_request(uid, list(remote_listeners), list(local_ports),
                                            num_conn, _unwrap(options),
                                            owner=await self._api.authorizer.caller_owner())
        return [_path(ep), [str(h) for h in ep.listeners]]

    @_method(MANAGER)
    async def Release(self, uid):
        await self._m.release(uid)

    @_method(MANAGER)
    async def WaitStarted(self, uid):
        await self._m.settled(uid)

    @_method(MANAGER)
    async def ReleaseAll(self):
        return await self._m.release_all()

    @_method(MANAGER)
    async def RearmEndpoint(self, uid):
        await self._m.rearm(uid)

    @_method(MANAGER)
    async def Reload(self):
        if self._api.reload is None:
            raise DBusError(f"{ERROR_PREFIX}.InvalidArgument",
                            "this daemon cannot reload its configuration")
        applied, needs_restart = await self._api.reload()
        return [list(applied), list(needs_restart)]

    @_method(MANAGER)
    async def ListEndpoints(self):
        return [[ep.uid, ep.role.value, ep.state.value, [str(h) for h in ep.listeners]]
                for ep in self._m.list()]

    @_property(MANAGER)
    def Version(self):
        return __version__

    @_property(MANAGER)
    def PeerPort(self):
        return self._m.cfg.peer_port

    @_property(MANAGER)
    def ListenAddress(self):
        # What a client hands to the other side: never a wildcard.
        return str(self._m.cfg.relay_listen_address)

    @_property(MANAGER)
    def PortRange(self):
        return list(self._m.cfg.port_range)


class TunnelApi:
    """Exports the manager object and keeps one object per endpoint in step."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.manager: Manager  # set by attach()
        #: The daemon's reload: () -> (applied keys, keys needing a restart).
        self.reload: Optional[Callable[[], Awaitable[Tuple[Sequence[str], Sequence[str]]]]] = None
        self._objects: Dict[str, EndpointObject] = {}
        #: per endpoint path: when its counters were last signalled, and what
        self._counters_sent: Dict[str, float] = {}
        self._counter_values: Dict[str, Dict[str, Any]] = {}
        self._counters_due: Set[str] = set()
        #: False until the daemon asks for its bus name: objects exported before
        #: (re-adopted endpoints) send no InterfacesAdded, which would reach nobody.
        self.announcing = False
        self.authorizer = Authorizer(bus, self._dispatches_to_us)
        bus.add_message_handler(self.authorizer.handle)
        if PeerAnswers.needed():
            # After the authorizer: Peer calls on endpoint paths stay privileged.
            bus.add_message_handler(PeerAnswers().reply)

    def _dispatches_to_us(self, msg: Message) -> bool:
        """True if dbus-next will run one of our (authorized) methods for ``msg``."""
        if msg.path == MANAGER_PATH:
            iface = MANAGER
        elif msg.path in self._objects:
            iface = ENDPOINT
        else:
            return False
        m = iface.methods.get(msg.member or "")
        return msg.interface == iface.name and m is not None and msg.signature == m.in_sig

    def attach(self, manager: Manager) -> None:
        self.manager = manager
        self.bus.export(MANAGER_PATH, ManagerObject(self))

    # EndpointListener
    def endpoint_added(self, ep: Endpoint) -> None:
        obj = self._objects[_path(ep)] = EndpointObject(self, ep)
        # What InterfacesAdded carries: later signals name only what differs from it.
        self._counter_values[_path(ep)] = counter_values(self.manager.traffic(ep))
        if self.announcing:
            self.bus.export(_path(ep), obj)
        else:
            export_quietly(self.bus, _path(ep), obj)

    def endpoint_changed(self, ep: Endpoint, changed: Iterable[str]) -> None:
        obj = self._objects.get(_path(ep))
        if obj is None:
            return
        changed = list(changed)
        if "counters" in changed:
            self._counters_changed(_path(ep))
        props: Set[str] = set()
        for f in changed:
            props.update(_PROP_OF_FIELD.get(f, []))
        values = {"State": ep.state.value, "StateDetail": ep.detail,
                  "NRestarts": ep.n_restarts, "ClaimedBy": ep.claimed_by,
                  "ClaimedAt": _usec(ep.claimed_at), "KeyGeneration": ep.key_generation}
        if props:
            out = {p: values[p] for p in props}
            path = _path(ep)
            if path in self._counters_due:
                # Counters that changed with the state (e.g. MainPID with NRestarts)
                # travel in the same signal, not in one right after it.
                out.update(self._counter_changes(path, obj))
            obj.emit_properties_changed(out)

    def endpoint_removed(self, ep: Endpoint) -> None:
        path = _path(ep)
        self._counters_sent.pop(path, None)
        self._counter_values.pop(path, None)
        self._counters_due.discard(path)
        if self._objects.pop(path, None) is not None:
            self.bus.unexport(path)

    def _counters_changed(self, path: str) -> None:
        """Signal the counters of ``path`` now, or when its second is over (coalesced)."""
        if path in self._counters_due:
            return
        self._counters_due.add(path)
        wait = self._counters_sent.get(path, -1e9) + COUNTER_SIGNAL_INTERVAL - time.monotonic()
        asyncio.get_running_loop().call_later(max(0.0, wait), self._send_counters, path)

    def _send_counters(self, path: str) -> None:
        self._counters_due.discard(path)
        obj = self._objects.get(path)
        if obj is None:
            return
        changed = self._counter_changes(path, obj)
        if changed:
            obj.emit_properties_changed(changed)

    def _counter_changes(self, path: str, obj: EndpointObject) -> Dict[str, Any]:
        """The counters of ``path`` that differ from those last signalled (now signalled)."""
        values = counter_values(self.manager.traffic(obj.ep))
        before = self._counter_values.get(path, {})
        changed = {k: v for k, v in values.items() if before.get(k) != v}
        self._counter_values[path] = values
        if changed:
            self._counters_sent[path] = time.monotonic()
        return changed
