"""Who may call what on scistreamd's bus objects.

Root and members of group ``scistream`` may do everything. Anyone else is
asked about at polkit (actions org.scistream.tunnel1.manage / .inspect) when
polkitd is on the bus, and refused otherwise. Unprivileged callers may
introspect the manager and its ancestors, ping, and read the manager's own
properties. The verdict is looked up once per (connection, action) and cached
(unique bus names are never reused).

Where the check happens, in dbus-next 0.2's dispatch path:

- every incoming call passes :meth:`Authorizer.handle`, a public bus message
  handler: it records the caller (a context variable the method task
  inherits), refuses at once on a cached "no", and lets public calls through;
- our own methods (Manager/Endpoint) check inside the exported method
  (:meth:`Authorizer.require`, awaited by dbus_api's method wrapper), so an
  unknown caller's lookup runs in the method's own task;
- what dbus-next answers itself, synchronously (Properties.Get/GetAll,
  ObjectManager.GetManagedObjects, Introspect, Peer on any path), has no
  asynchronous hook: a message handler must answer now or claim the message.
  For an unknown caller the handler claims it, waits for the lookup, and then
  answers it with public calls only: on "yes" it asks the same question of
  this very connection through the bus (a call from the daemon to itself,
  which dbus-next answers as it would have), and sends that answer, or error,
  back to the caller; on "no" it refuses. dbus-next 0.2 has no public way to
  resume a claimed message, and re-implementing its Properties/ObjectManager/
  Introspect answers would be a second copy of them. It costs one bus round
  trip, once per caller and action.
"""

from __future__ import annotations

import asyncio
import contextvars
import grp
import logging
import os
import pwd
from typing import Callable, Dict, Optional, Set, Tuple

from dbus_next import Message, MessageFlag, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import ErrorType
from dbus_next.introspection import Node

from . import ENDPOINT_PATH_PREFIX, MANAGER_IFACE, MANAGER_PATH
from .errors import AccessDenied
from .identity import local_identity

logger = logging.getLogger(__name__)

GROUP = "scistream"

#: (interface, member) any local user may call on our objects.
PUBLIC_CALLS = {
    ("org.freedesktop.DBus.Introspectable", "Introspect"),
    ("org.freedesktop.DBus.Peer", "Ping"),
    ("org.freedesktop.DBus.Peer", "GetMachineId"),
}

INTROSPECT = ("org.freedesktop.DBus.Introspectable", "Introspect")
#: Paths whose introspection anyone may read: the manager and its ancestors.
#: dbus-next lists as children of path P every exported path *containing* P
#: ("/endpoint" lists each endpoint), so every other path is privileged.
PUBLIC_INTROSPECT_PATHS = {"/", "/org", "/org/scistream", MANAGER_PATH}

#: Methods that change things; every other checked call only reads.
MANAGE_CALLS = {"InboundRequest", "OutboundRequest", "Release", "ReleaseAll", "RearmEndpoint",
                "Rearm", "Reload"}
ACTION_MANAGE = "org.scistream.tunnel1.manage"
ACTION_INSPECT = "org.scistream.tunnel1.inspect"
POLKIT = "org.freedesktop.PolicyKit1"

#: The unique bus name of the caller whose method call is being dispatched.
#: Set by the message handler just before dbus-next starts the method's task,
#: which copies the context: each call's task sees its own caller.
_CALLER: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("scistreamd_caller",
                                                                        default=None)

Key = Tuple[str, str]  # (sender, action)


def action_of_member(member: str) -> str:
    return ACTION_MANAGE if member in MANAGE_CALLS else ACTION_INSPECT


def denied_text() -> str:
    return ("permission denied: inspecting and managing tunnels needs root, membership of "
            f"group '{GROUP}', or a polkit grant of {ACTION_MANAGE}")


class Authorizer:
    """Decides once per (connection, action); see the module docstring."""

    MAX_CACHE = 4096

    def __init__(self, bus: MessageBus,
                 checks_inside: Callable[[Message], bool] = lambda msg: False) -> None:
        """``checks_inside(msg)``: True when ``msg`` dispatches to one of our
        exported methods, which calls :meth:`require` itself."""
        self._bus = bus
        self._checks_inside = checks_inside
        self._verdicts: Dict[Key, bool] = {}
        self._pending: Dict[Key, asyncio.Future[bool]] = {}
        #: unique bus name -> its uid (seen by _check; for Owner)
        self._uids: Dict[str, int] = {}
        #: calls held until their verdict (kept referenced until answered)
        self._held: Set[asyncio.Task[None]] = set()
        #: the manager's introspection XML without child nodes, once built
        self._stripped_manager: Optional[str] = None
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
        return action_of_member(msg.member or "")

    def handle(self, msg: Message) -> object:
        """Bus message handler: None lets dispatch go on, a Message/True stops it."""
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        _CALLER.set(msg.sender)
        action = self.action_of(msg)
        if action is None or msg.sender == self._bus.unique_name:
            return None  # public, or our own call of _ask_ourselves
        key = (msg.sender, action)
        verdict = self._verdicts.get(key)
        if verdict is True:
            return None
        if verdict is False and (not self._strips(msg) or self._stripped_manager is not None):
            return self._refusal(msg)
        if verdict is None and self._checks_inside(msg):
            return None  # the method awaits require() in its own task
        # Answered by dbus-next itself: held until the verdict is known.
        task = asyncio.ensure_future(self._answer_held(msg, key))
        self._held.add(task)
        task.add_done_callback(self._held.discard)
        return True

    @staticmethod
    def _strips(msg: Message) -> bool:
        """The manager's introspection: refused as its node without children."""
        return (msg.interface, msg.member) == INTROSPECT and msg.path == MANAGER_PATH

    async def _answer_held(self, msg: Message, key: Key) -> None:
        verdict = await self._verdict(key)
        try:
            if verdict:
                answer = await self._ask_ourselves(msg)
            elif self._strips(msg):
                if self._stripped_manager is None:
                    xml = (await self._ask_ourselves(msg)).body[0]
                    node = Node.parse(xml)
                    node.nodes = []
                    self._stripped_manager = node.tostring()
                answer = self._refusal(msg)
            else:
                answer = self._refusal(msg)
        except Exception:  # the bus went away, or a malformed reply: never silence
            logger.exception("answering %s.%s of %s failed", msg.interface, msg.member,
                             msg.sender)
            answer = Message.new_error(msg, ErrorType.FAILED.value,
                                       "scistreamd could not answer this call; see its journal")
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            await self._bus.send(answer)

    async def _ask_ourselves(self, msg: Message) -> Message:
        """dbus-next's own answer to ``msg``, asked through the bus, addressed to its caller."""
        reply = await self._bus.call(Message(
            destination=self._bus.unique_name, path=msg.path, interface=msg.interface,
            member=msg.member, signature=msg.signature, body=msg.body))
        return Message(message_type=reply.message_type, destination=msg.sender,
                       reply_serial=msg.serial, error_name=reply.error_name,
                       signature=reply.signature, body=reply.body)

    async def caller_owner(self) -> str:
        """The Owner string of the current method's caller: "local:uid=N"."""
        sender = _CALLER.get()
        uid = self._uids.get(sender or "")
        if uid is None and sender is not None:
            body = await self._bus_call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                        "org.freedesktop.DBus", "GetConnectionCredentials",
                                        "s", [sender])
            value = body[0].get("UnixUserID") if body else None
            uid = value.value if value is not None else None
        if uid is None:  # authorized, yet no credentials: never seen on a real bus
            raise AccessDenied(denied_text())
        return local_identity(uid).owner

    async def require(self, action: str) -> None:
        """Raise AccessDenied unless the caller of the current method may ``action``."""
        sender = _CALLER.get()
        if sender is None:  # not dispatched from the bus: nobody to vouch for
            raise AccessDenied(denied_text())
        key = (sender, action)
        verdict = await self._verdict(key)
        if not verdict:
            raise AccessDenied(denied_text())

    async def _verdict(self, key: Key) -> bool:
        """The cached verdict for ``key``, or the one lookup's (a cancelled waiter
        leaves the lookup running for the others)."""
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = await asyncio.shield(self._lookup(key))
        return verdict

    def _lookup(self, key: Key) -> asyncio.Future[bool]:
        """The verdict for ``key``, one lookup however many calls wait for it."""
        fut = self._pending.get(key)
        if fut is None:
            fut = self._pending[key] = asyncio.ensure_future(self._resolve(key))
        return fut

    async def _resolve(self, key: Key) -> bool:
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
        self._pending.pop(key, None)
        return ok

    def _refusal(self, msg: Message) -> Message:
        """AccessDenied; for the manager's introspection, its node without children:
        whether any endpoint exists (child "endpoint") is not theirs to know."""
        if self._strips(msg) and self._stripped_manager is not None:
            return Message.new_method_return(msg, "s", [self._stripped_manager])
        return Message.new_error(msg, AccessDenied.dbus_name(), denied_text())

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
        if creds.get("UnixUserID") is not None:
            if len(self._uids) >= self.MAX_CACHE:
                self._uids.clear()
            self._uids[sender] = creds["UnixUserID"].value
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
