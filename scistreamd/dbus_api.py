"""The D-Bus face of scistreamd: org.scistream.Tunnel1 (DESIGN.md §4).

- one manager object, one object per endpoint (machined style);
- signatures come from the one description of the API (interface.py);
- every method is wrapped so a caller gets a named error, never a traceback
  (dbus-next would otherwise send the Python traceback as the message);
- authorization is decided once per (connection, action) in a bus message
  handler, before dispatch: unprivileged callers may introspect, ping and
  read the manager's own properties; everything else needs root, group
  scistream, or a polkit grant. The D-Bus policy allow-lists the methods
  (machined style); this check also covers Properties.Get on endpoint
  objects, which a policy cannot tell apart from the manager's.
"""


import asyncio
import functools
import grp
import logging
import os
import pwd
from typing import Any, Callable, Dict, Iterable, List, Optional, Set

from dbus_next import DBusError, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.service import PropertyAccess, ServiceInterface, dbus_property, method

from . import (
    ENDPOINT_IFACE,
    ENDPOINT_PATH_PREFIX,
    ERROR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    __version__,
)
from .dbus_compat import PeerAnswers
from .errors import AccessDenied, ScistreamError
from .interface import ENDPOINT, MANAGER, Interface, signed, typed
from .manager import Manager
from .model import Endpoint, Role

logger = logging.getLogger(__name__)

GROUP = "scistream"
INTERNAL_ERROR = f"{ERROR_PREFIX}.Failed"

#: (interface, member) any local user may call on our objects.
PUBLIC_CALLS = {
    ("org.freedesktop.DBus.Introspectable", "Introspect"),
    ("org.freedesktop.DBus.Peer", "Ping"),
    ("org.freedesktop.DBus.Peer", "GetMachineId"),
}


def _dbus_errors(fn: Callable) -> Callable:
    """Turn every exception into a named D-Bus error; log the unexpected ones."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return await fn(*args, **kw)
        except ScistreamError as e:
            raise DBusError(e.dbus_name(), str(e)) from None
        except DBusError:
            raise
        except Exception:
            logger.exception("internal error in %s", fn.__name__)
            raise DBusError(INTERNAL_ERROR, "internal error in scistreamd; the details are in "
                            "'journalctl -u scistreamd'") from None

    return wrapper


def _method(iface: Interface) -> Callable[[Callable], Callable]:
    """An exported method: the described signature, named errors only."""
    return lambda fn: method()(_dbus_errors(signed(iface)(fn)))


def _property(iface: Interface) -> Callable[[Callable], Callable]:
    """An exported read-only property of the described type."""
    return lambda fn: dbus_property(access=PropertyAccess.READ)(typed(iface)(fn))


def _unwrap(options: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.value if isinstance(v, Variant) else v) for k, v in options.items()}


def _usec(t: float) -> int:
    return int(t * 1_000_000) if t > 0 else 0


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
                  "claimed_by": ["ClaimedBy"], "claimed_at": ["ClaimedAt"]}


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
                                           _unwrap(options))
        return [ep.uid, ep.object_path, [str(h) for h in ep.listeners]]

    @_method(MANAGER)
    async def OutboundRequest(self, uid, remote_listeners, local_ports, num_conn, options):
        ep = await self._m.outbound_request(uid, list(remote_listeners), list(local_ports),
                                            num_conn, _unwrap(options))
        return [ep.object_path, [str(h) for h in ep.listeners]]

    @_method(MANAGER)
    async def Release(self, uid):
        await self._m.release(uid)

    @_method(MANAGER)
    async def ReleaseAll(self):
        return await self._m.release_all()

    @_method(MANAGER)
    async def RearmEndpoint(self, uid):
        await self._m.rearm(uid)

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
        return str(self._m.cfg.listen_address)

    @_property(MANAGER)
    def PortRange(self):
        return list(self._m.cfg.port_range)


INTROSPECT = ("org.freedesktop.DBus.Introspectable", "Introspect")
#: Paths whose introspection anyone may read: the manager and its ancestors.
#: dbus-next lists as children of path P every exported path *containing* P
#: ("/endpoint" lists each endpoint), so every other path is privileged.
PUBLIC_INTROSPECT_PATHS = {"/", "/org", "/org/scistream", MANAGER_PATH}

#: Methods that change things; every other checked call only reads.
MANAGE_CALLS = {"InboundRequest", "OutboundRequest", "Release", "ReleaseAll", "RearmEndpoint",
                "Rearm"}
ACTION_MANAGE = "org.scistream.tunnel1.manage"
ACTION_INSPECT = "org.scistream.tunnel1.inspect"
POLKIT = "org.freedesktop.PolicyKit1"


class Authorizer:
    """Who may do what, decided once per (connection, action) before dispatch.

    Root and members of group ``scistream`` may do everything. Anyone else
    is asked about at polkit (actions org.scistream.tunnel1.manage /
    .inspect) when polkitd is on the bus, and refused otherwise.
    """

    MAX_CACHE = 4096

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._verdicts: Dict[tuple, bool] = {}
        self._pending: Dict[tuple, List[Message]] = {}
        try:
            self._gid: Optional[int] = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            self._gid = None  # no such group here: root only

    @staticmethod
    def action_of(msg: Message) -> Optional[str]:
        """The polkit action a call needs, or None for the public ones."""
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        # Every path counts, not only ours: dbus-next answers GetManagedObjects
        # on any path (/ included) with every endpoint below it, and Introspect
        # lists child nodes, i.e. endpoint uids (even of unrelated paths).
        path = msg.path or ""
        below_endpoints = (path == ENDPOINT_PATH_PREFIX
                           or path.startswith(ENDPOINT_PATH_PREFIX + "/"))
        if (msg.interface, msg.member) == INTROSPECT:
            # dbus-next answers Introspect only with an empty signature (else
            # UnknownMethod, revealing nothing): let that through unchecked.
            # The manager's node is public, stripped of its children for the
            # unprivileged (see _refusal); every other path is not.
            if msg.signature or path in PUBLIC_INTROSPECT_PATHS - {MANAGER_PATH}:
                return None
            return ACTION_INSPECT
        if (msg.interface, msg.member) in PUBLIC_CALLS and not below_endpoints:
            return None
        if (msg.path == MANAGER_PATH and msg.interface == "org.freedesktop.DBus.Properties"
                and msg.member in ("Get", "GetAll") and msg.body
                and msg.body[0] == MANAGER_IFACE):
            return None  # the daemon's own properties: Version, PeerPort, ...
        return ACTION_MANAGE if msg.member in MANAGE_CALLS else ACTION_INSPECT

    def handle(self, msg: Message) -> Any:
        """Bus message handler: None lets dispatch go on, a Message/True stops it."""
        action = self.action_of(msg)
        if action is None:
            return None
        key = (msg.sender, action)
        verdict = self._verdicts.get(key)
        if verdict is True:
            return None
        if verdict is False:
            return self._refusal(msg)
        # Unknown caller: hold the message, look it up, then dispatch again.
        queue = self._pending.setdefault(key, [])
        queue.append(msg)
        if len(queue) == 1:
            asyncio.ensure_future(self._resolve(key))
        return True

    def _refusal(self, msg: Message) -> Message:
        """AccessDenied; for the manager's introspection, its node without children:
        whether any endpoint exists (child "endpoint") is not theirs to know."""
        introspect = getattr(self._bus, "_introspect_export_path", None)  # dbus-next 0.2
        if (msg.interface, msg.member) == INTROSPECT and msg.path == MANAGER_PATH and introspect:
            node = introspect(MANAGER_PATH)
            node.nodes = []
            return Message.new_method_return(msg, "s", [node.tostring()])
        return Message.new_error(msg, AccessDenied.dbus_name(), _denied_text())

    async def _resolve(self, key: tuple) -> None:
        sender, action = key
        try:
            ok = await self._check(sender, action)
        except Exception:
            logger.exception("authorizing %s for %s failed", sender, action)
            ok = False
        if len(self._verdicts) >= self.MAX_CACHE:
            # Unique names are never reused, so old verdicts are only memory.
            self._verdicts.clear()
        self._verdicts[key] = ok
        for msg in self._pending.pop(key, []):
            self._bus._process_message(msg)  # dispatch again; the verdict is cached now

    async def _bus_call(self, dest: str, path: str, iface: str, member: str, sig: str,
                        body: list) -> Optional[list]:
        reply = await self._bus.call(Message(destination=dest, path=path, interface=iface,
                                             member=member, signature=sig, body=body))
        return reply.body if reply.message_type == MessageType.METHOD_RETURN else None

    async def _check(self, sender: str, action: str) -> bool:
        body = await self._bus_call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                    "org.freedesktop.DBus", "GetConnectionCredentials", "s",
                                    [sender])
        if body is None:
            return False
        creds = body[0]
        if self._is_privileged(creds.get("UnixUserID"), creds.get("UnixGroupIDs")):
            return True
        return await self._polkit(sender, action)

    def _is_privileged(self, uid_v: Optional[Variant], gids_v: Optional[Variant]) -> bool:
        if uid_v is None:
            return False
        uid = uid_v.value
        if uid == 0:
            return True
        if self._gid is None:
            return False
        if gids_v is not None:
            return self._gid in gids_v.value
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return False
        return self._gid in os.getgrouplist(pw.pw_name, pw.pw_gid)

    async def _polkit(self, sender: str, action: str) -> bool:
        has = await self._bus_call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                   "org.freedesktop.DBus", "NameHasOwner", "s", [POLKIT])
        activatable = await self._bus_call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                           "org.freedesktop.DBus", "ListActivatableNames",
                                           "", [])
        if not (has and has[0]) and not (activatable and POLKIT in activatable[0]):
            return False
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        reply = await self._bus_call(POLKIT, "/org/freedesktop/PolicyKit1/Authority",
                                     "org.freedesktop.PolicyKit1.Authority",
                                     "CheckAuthorization", "(sa{sv})sa{ss}us",
                                     [subject, action, {}, 0, ""])
        return bool(reply and reply[0][0])


def _denied_text() -> str:
    return ("permission denied: inspecting and managing tunnels needs root, membership of "
            f"group '{GROUP}', or a polkit grant of {ACTION_MANAGE}")


class TunnelApi:
    """Exports the manager object and keeps one object per endpoint in step."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.manager: Manager  # set by attach()
        self._objects: Dict[str, EndpointObject] = {}
        self.authorizer = Authorizer(bus)
        bus.add_message_handler(self.authorizer.handle)
        if PeerAnswers.needed():
            # After the authorizer: Peer calls on endpoint paths stay privileged.
            bus.add_message_handler(PeerAnswers().reply)

    def attach(self, manager: Manager) -> None:
        self.manager = manager
        self.bus.export(MANAGER_PATH, ManagerObject(self))

    # EndpointListener
    def endpoint_added(self, ep: Endpoint) -> None:
        obj = EndpointObject(self, ep)
        self._objects[ep.object_path] = obj
        self.bus.export(ep.object_path, obj)

    def endpoint_changed(self, ep: Endpoint, changed: Iterable[str]) -> None:
        obj = self._objects.get(ep.object_path)
        if obj is None:
            return
        props: Set[str] = set()
        for f in changed:
            props.update(_PROP_OF_FIELD.get(f, []))
        values = {"State": ep.state.value, "StateDetail": ep.detail,
                  "NRestarts": ep.n_restarts, "ClaimedBy": ep.claimed_by,
                  "ClaimedAt": _usec(ep.claimed_at)}
        if props:
            obj.emit_properties_changed({p: values[p] for p in props})

    def endpoint_removed(self, ep: Endpoint) -> None:
        if self._objects.pop(ep.object_path, None) is not None:
            self.bus.unexport(ep.object_path)
