"""A small client of systemd's D-Bus API (org.freedesktop.systemd1).

Starts, stops and inspects the transient relay units and waits for their
jobs. Calls are built as raw messages with known signatures: no
introspection round trip, so a request costs one bus round trip per call.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from .buspath import UNIT_PATH_PREFIX, unit_object_path
from .errors import ScistreamError
from .traffic import accounting_value, sum_accounting

logger = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"
SOCKET_IFACE = "org.freedesktop.systemd1.Socket"
PROPS = "org.freedesktop.DBus.Properties"

NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"
UNIT_EXISTS = "org.freedesktop.systemd1.UnitExists"
#: Calls to systemd awaiting their reply at once. dbus-daemon refuses more than
#: max_replies_per_connection (128 on Debian's system bus) pending replies per
#: connection with LimitsExceeded; stay well below it, whatever the load.
MAX_INFLIGHT = 32


class SystemdError(ScistreamError):
    """A systemd call failed; ``name`` is systemd's D-Bus error name (this
    instance's, not ours: internal errors never reach a caller by name)."""

    internal = True

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@dataclass(frozen=True)
class UnitStatus:
    name: str
    active_state: str  # active, activating, deactivating, inactive, failed, (absent)
    sub_state: str
    result: str
    n_restarts: int
    main_pid: int
    load_state: str = "loaded"

    @property
    def exists(self) -> bool:
        return self.load_state != "not-found"


ABSENT = "absent"


def _body(reply: Message) -> List[Any]:
    """A reply's body; SystemdError for an error reply."""
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body else ""
        raise SystemdError(reply.error_name or "unknown", str(text))
    return reply.body


class Systemd:
    """systemd1 manager over an already connected (system) bus."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._jobs: Dict[str, asyncio.Future] = {}
        self._finished_jobs: Dict[str, str] = {}
        self._unit_listeners: List[Callable[[str], None]] = []
        self._inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self._pipelining = asyncio.Lock()

    async def setup(self) -> None:
        # Match rules before anything is started: JobRemoved can arrive
        # before the StartTransientUnit reply is processed.
        self._bus.add_message_handler(self._on_message)
        for rule in (
            f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='JobRemoved'",
            f"type='signal',sender='{SYSTEMD}',interface='{MANAGER}',member='UnitRemoved'",
            # Only the Unit interface's changes (arg0): every state change of a
            # unit has one, and that is all the monitor needs (it reads the rest).
            # The Service/Socket interfaces' own changes come with every start
            # too; parsing them cost the daemon's loop some 10 ms per request.
            f"type='signal',sender='{SYSTEMD}',interface='{PROPS}',member='PropertiesChanged',"
            f"path_namespace='{UNIT_PATH_PREFIX.rstrip('/')}',arg0='{UNIT_IFACE}'",
        ):
            await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                             "org.freedesktop.DBus", "AddMatch", "s", [rule])
        await self._manager_call("Subscribe", "", [])

    def on_unit_change(self, callback: Callable[[str], None]) -> None:
        """``callback(unit_object_path)`` whenever a unit's properties change."""
        self._unit_listeners.append(callback)

    # ---------------------------------------------------------------- signals
    def _on_message(self, msg: Message) -> None:
        # systemd broadcasts its signals, and the match rules admit only its
        # broadcasts; a unicast signal was sent to us by someone else (the bus
        # policy lets anyone send signals), so it must neither complete a job
        # nor, with a body of the wrong shape, raise.
        if msg.message_type != MessageType.SIGNAL or msg.destination is not None:
            return None
        if msg.member == "JobRemoved" and msg.interface == MANAGER and msg.signature == "uoss":
            _id, job, unit, result = msg.body
            fut = self._jobs.pop(job, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
            else:
                self._finished_jobs[job] = result
                if len(self._finished_jobs) > 4096:  # jobs nobody waits for
                    self._finished_jobs.pop(next(iter(self._finished_jobs)))
            # A stopped transient unit may be unloaded before any
            # PropertiesChanged: a finished job is a change too.
            self._notify(unit_object_path(unit))
        elif msg.member == "UnitRemoved" and msg.interface == MANAGER and msg.signature == "so":
            self._notify(unit_object_path(msg.body[0]))
        elif msg.member == "PropertiesChanged" and msg.path.startswith(UNIT_PATH_PREFIX):
            self._notify(msg.path)
        return None

    def _notify(self, unit_path: str) -> None:
        for cb in self._unit_listeners:
            try:
                cb(unit_path)
            except Exception:  # a listener bug must not break the bus
                logger.exception("unit change listener failed")

    # ------------------------------------------------------------------ calls
    async def _call(self, dest: str, path: str, iface: str, member: str, signature: str,
                    body: Sequence[Any]) -> List[Any]:
        msg = Message(destination=dest, path=path, interface=iface, member=member,
                      signature=signature, body=list(body))
        async with self._inflight:
            reply = await self._bus.call(msg)
        return _body(reply)

    @staticmethod
    def _manager_msg(member: str, signature: str, body: Sequence[Any]) -> Message:
        return Message(destination=SYSTEMD, path=SYSTEMD_PATH, interface=MANAGER,
                       member=member, signature=signature, body=list(body))

    async def _manager_call(self, member: str, signature: str, body: Sequence[Any]) -> List[Any]:
        return await self._call(SYSTEMD, SYSTEMD_PATH, MANAGER, member, signature, body)

    async def _pipeline(self, msgs: Sequence[Message]) -> List[Message]:
        """Send ``msgs`` back to back, in this order, and return their replies (error
        replies too): one round trip for all of them instead of one each."""
        held = 0
        try:
            # One pipeline takes its slots at a time: two taking them piecemeal
            # could each hold some and wait for the rest forever.
            async with self._pipelining:
                for _ in msgs:
                    await self._inflight.acquire()
                    held += 1
            # A task runs its first step in the order it was created, and
            # bus.call writes its message to the connection in that first step.
            calls = [asyncio.ensure_future(self._bus.call(m)) for m in msgs]
            return list(await asyncio.gather(*calls))
        finally:
            for _ in range(held):
                self._inflight.release()

    async def _wait_job(self, job: str, timeout: float) -> str:
        if job in self._finished_jobs:
            return self._finished_jobs.pop(job)
        fut = asyncio.get_running_loop().create_future()
        self._jobs[job] = fut
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._jobs.pop(job, None)

    async def start_transient(self, name: str, properties: List[List[Any]],
                              timeout: float = 30,
                              aux: Sequence[Tuple[str, List[List[Any]]]] = (),
                              reset_failed: Sequence[str] = (),
                              queued: Optional[Callable[[], None]] = None) -> str:
        """Start a transient unit, wait for its job; returns the job result ("done", ...).

        ``aux`` units (name, properties) are created along with it, loaded but not
        started (as systemd-run does with a socket's service). ``reset_failed``:
        units whose failed state is reset first (see :meth:`reset_failed`), in
        the same round trip: the calls go out back to back and systemd handles
        one connection's calls in order, so each reset is done before the start.
        ``queued()`` is called once systemd has accepted the start: the units exist
        and the job is queued (not called if it refused).
        """
        resets = [self._manager_msg("ResetFailedUnit", "s", [u]) for u in reset_failed]
        start = self._manager_msg("StartTransientUnit", "ssa(sv)a(sa(sv))",
                                  [name, "fail", properties, [[n, p] for n, p in aux]])
        replies = await self._pipeline([*resets, start])
        for reply in replies[:-1]:
            try:
                _body(reply)
            except SystemdError as e:
                if e.name != NO_SUCH_UNIT:
                    raise
        (job,) = _body(replies[-1])
        if queued is not None:
            queued()
        return await self._wait_job(job, timeout)

    async def start(self, name: str, timeout: float = 30) -> str:
        """Start a loaded unit and wait for its job; returns the job result."""
        (job,) = await self._manager_call("StartUnit", "ss", [name, "replace"])
        return await self._wait_job(job, timeout)

    async def set_properties(self, name: str, properties: List[List[Any]]) -> None:
        """SetUnitProperties(runtime): in effect when the call returns (e.g. IP access
        lists: the unit's BPF programs are replaced before systemd replies)."""
        await self._manager_call("SetUnitProperties", "sba(sv)", [name, True, properties])

    async def stop(self, name: str, timeout: float = 30) -> Optional[str]:
        """Stop a unit and wait; None if there was no such unit loaded."""
        try:
            (job,) = await self._manager_call("StopUnit", "ss", [name, "replace"])
        except SystemdError as e:
            if e.name == NO_SUCH_UNIT:
                return None
            raise
        return await self._wait_job(job, timeout)

    async def reset_failed(self, name: str) -> None:
        try:
            await self._manager_call("ResetFailedUnit", "s", [name])
        except SystemdError as e:
            if e.name != NO_SUCH_UNIT:
                raise

    async def list_units(self, patterns: Sequence[str]) -> List[Tuple[str, str, str]]:
        """(name, active_state, sub_state) of loaded units matching the glob patterns."""
        (units,) = await self._manager_call("ListUnitsByPatterns", "asas", [[], list(patterns)])
        return [(u[0], u[3], u[4]) for u in units]

    async def _service_property(self, name: str, prop: str, default: Any,
                                iface: str = SERVICE_IFACE) -> Any:
        """One property of a service unit; ``default`` if the unit is gone or has none."""
        try:
            (value,) = await self._call(SYSTEMD, unit_object_path(name), PROPS, "Get", "ss",
                                        [iface, prop])
        except SystemdError:
            return default
        return value.value

    async def unit_state(self, name: str) -> Tuple[str, str, str]:
        """(load_state, active_state, sub_state) of a unit, from one small call;
        ("not-found", ABSENT, ABSENT) if systemd has no such unit."""
        (units,) = await self._manager_call("ListUnitsByNames", "as", [[name]])
        if not units or units[0][2] == "not-found":
            return ("not-found", ABSENT, ABSENT)
        _name, _desc, load_state, active_state, sub_state = units[0][:5]
        return (load_state, active_state, sub_state)

    async def status(self, name: str) -> UnitStatus:
        # Four small calls sent at once (one round trip), not GetAll: a unit's
        # and a service's GetAll replies carry some 300 properties, and parsing
        # them cost milliseconds per call (seconds when re-adopting 1000 relays).
        (load_state, active_state, sub_state), result, n_restarts, main_pid = (
            await asyncio.gather(
                self.unit_state(name),
                self._service_property(name, "Result", ""),
                self._service_property(name, "NRestarts", 0),
                self._service_property(name, "MainPID", 0),
            ))
        if load_state == "not-found":
            return UnitStatus(name, ABSENT, ABSENT, "", 0, 0, load_state)
        return UnitStatus(name=name, active_state=active_state, sub_state=sub_state,
                          result=result, n_restarts=n_restarts, main_pid=main_pid,
                          load_state=load_state)

    async def main_pids(self, names: Sequence[str]) -> Dict[str, int]:
        """MainPID of many services (0 where gone)."""
        return await self._of_many(names, "MainPID")

    async def accounting(self, service: str, socket: str = "") -> Tuple[int, int, int]:
        """(bytes in, bytes out, memory) of a relay: IP accounting of its service and
        (if given) socket unit, summed, and the service's MemoryCurrent. Five small
        Gets sent at once (one round trip); an absent unit or value counts 0."""
        calls = [self._service_property(service, "IPIngressBytes", 0),
                 self._service_property(service, "IPEgressBytes", 0),
                 self._service_property(service, "MemoryCurrent", 0)]
        if socket:
            calls += [self._service_property(socket, "IPIngressBytes", 0, SOCKET_IFACE),
                      self._service_property(socket, "IPEgressBytes", 0, SOCKET_IFACE)]
        values = await asyncio.gather(*calls)
        sock_in, sock_out = (values[3], values[4]) if socket else (0, 0)
        return (sum_accounting(values[0], sock_in), sum_accounting(values[1], sock_out),
                accounting_value(values[2]))

    async def socket_result(self, name: str) -> str:
        """Result of a socket unit ("success", "resources" for a failed bind, ...)."""
        return str(await self._service_property(name, "Result", "", SOCKET_IFACE))

    async def n_restarts(self, names: Sequence[str]) -> Dict[str, int]:
        """NRestarts of many services (0 where gone)."""
        return await self._of_many(names, "NRestarts")

    async def _of_many(self, names: Sequence[str], prop: str) -> Dict[str, int]:
        """One integer property of many services, asked concurrently (at most
        MAX_INFLIGHT at a time); 0 where the unit is gone."""
        values = await asyncio.gather(*(self._service_property(n, prop, 0) for n in names))
        return dict(zip(names, values))
