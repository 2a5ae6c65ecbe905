"""Work-arounds for known bugs of dbus-next 0.2.x (Debian 12 and RHEL 9 ship 0.2.3).

Kept apart so they are easy to find and drop once the distributions ship a
fixed release; each one checks the version it applies to.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


class AnsweredDBusErrors(logging.Filter):
    """Drops dbus-next's error log for a DBusError it has already sent as the reply.

    dbus-next 0.2.3 answers a failing Properties call (unknown object, interface
    or property) with the right D-Bus error, then also logs that DBusError with
    a traceback ("got unexpected error processing a message"): any local user
    could fill the journal with errors. Its log call runs inside the except
    block, so the exception being handled tells which case this is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from dbus_next import DBusError

        return not (isinstance(sys.exc_info()[1], DBusError)
                    and record.getMessage().startswith("got unexpected error processing a message"))


#: dbus-next releases whose Peer.GetMachineId handler cannot answer (see PeerAnswers).
_PEER_BUG_VERSIONS = ("0.2.0", "0.2.1", "0.2.2", "0.2.3")
PEER_IFACE = "org.freedesktop.DBus.Peer"
#: Where the machine id lives (machine-id(5)); the second is D-Bus's legacy copy.
MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


def read_machine_id(paths: Sequence[Path] = MACHINE_ID_FILES) -> Optional[str]:
    """The host's machine id (32 lowercase hex digits), or None if no file holds one."""
    for path in paths:
        try:
            text = path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if _MACHINE_ID.fullmatch(text):
            return text
    return None


class PeerAnswers:
    """Answers org.freedesktop.DBus.Peer calls itself, as a bus message handler.

    dbus-next 0.2.3 answers Ping, but GetMachineId never: it asks the bus
    driver for the id (which a system bus may refuse), then passes that error
    reply's body (a list) as the text of its own error, fails to marshal it,
    and logs a traceback instead of answering: any local user could fill the
    journal by calling it in a loop. (And once it did get an id, the next
    call would send a str as the body.) The machine id is /etc/machine-id.
    Install it after the authorizer, so calls on endpoint paths stay checked.
    """

    def __init__(self, paths: Sequence[Path] = MACHINE_ID_FILES) -> None:
        self._paths = paths
        self._machine_id: Optional[str] = None

    @staticmethod
    def needed() -> bool:
        from dbus_next.__version__ import __version__ as version

        return version in _PEER_BUG_VERSIONS

    def reply(self, msg: Any) -> Any:
        """A reply Message for a Peer method call, True for one wanting no reply, else None."""
        from dbus_next import Message, MessageFlag, MessageType
        from dbus_next.constants import ErrorType

        if msg.message_type != MessageType.METHOD_CALL or msg.interface != PEER_IFACE:
            return None
        if msg.member == "Ping" and msg.signature == "":
            answer = Message.new_method_return(msg)
        elif msg.member == "GetMachineId" and msg.signature == "":
            if self._machine_id is None:
                self._machine_id = read_machine_id(self._paths)
            if self._machine_id is None:
                answer = Message.new_error(
                    msg, ErrorType.FAILED.value,
                    "this host has no machine id: create /etc/machine-id "
                    "(systemd-machine-id-setup)")
            else:
                answer = Message.new_method_return(msg, "s", [self._machine_id])
        else:
            answer = Message.new_error(
                msg, ErrorType.UNKNOWN_METHOD.value,
                f"{PEER_IFACE} has no method {msg.member!r:.80} taking {msg.signature!r:.40}: "
                "it has Ping() and GetMachineId()")
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True  # handled; nothing to send
        return answer


#: dbus-next releases whose asyncio writer drops the bus on EAGAIN (python-dbus-next#153).
_EAGAIN_BUG_VERSIONS = ("0.2.0", "0.2.1", "0.2.2", "0.2.3")


def patch_dbus_next_writer() -> None:
    """Make dbus-next's asyncio writer wait for a full socket instead of disconnecting.

    Its write loop sends queued messages until the queue is empty; when the
    socket buffer fills (a burst: 50 requests at once, each starting a unit)
    send() raises BlockingIOError and dbus-next treats that as a dead bus: the
    daemon loses the bus and every request in flight. Same loop, with EAGAIN
    meaning "wait until writable" (the fix proposed upstream, PR #154).
    """
    import array

    from dbus_next.__version__ import __version__ as version
    from dbus_next.aio import message_bus as mb

    writer = mb._MessageWriter
    if version not in _EAGAIN_BUG_VERSIONS or getattr(writer, "_eagain_safe", False):
        return

    def write_callback(self: Any) -> None:
        try:
            while True:
                if self.buf is None:
                    if self.messages.qsize() == 0:
                        self.loop.remove_writer(self.fd)
                        return
                    buf, unix_fds, fut = self.messages.get_nowait()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                if self.unix_fds and self.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", self.unix_fds))]
                    self.offset += self.sock.sendmsg([self.buf[self.offset:]], ancdata)
                    self.unix_fds = None
                else:
                    self.offset += self.sock.send(self.buf[self.offset:])
                if self.offset < len(self.buf):
                    return  # partly written: the loop calls us again when writable
                self.buf = None
                mb._future_set_result(self.fut, None)
        except (BlockingIOError, InterruptedError):
            return  # the socket is full: the writer stays registered, retried when writable
        except Exception as e:
            mb._future_set_exception(self.fut, e)
            # Most sends (signals, replies) are not awaited; the bus's end is what
            # _finalize reports, not "Future exception was never retrieved" at exit.
            if self.fut is not None and self.fut.done() and not self.fut.cancelled():
                self.fut.exception()
            self.bus._finalize(e)

    writer.write_callback = write_callback
    writer._eagain_safe = True


#: dbus-next releases whose MessageBus.export is known to be "_path_exports
#: entry + ServiceInterface._add_bus + InterfacesAdded" (export_quietly).
_EXPORT_KNOWN_VERSIONS = ("0.2.0", "0.2.1", "0.2.2", "0.2.3")


def export_quietly(bus: Any, path: str, interface: Any) -> None:
    """``bus.export(path, interface)`` without its ObjectManager.InterfacesAdded signal.

    For objects exported before the daemon owns its bus name (re-adopted
    endpoints at start-up): clients follow the name's owner, so those signals
    reach nobody, yet building each (every property read, the whole object
    marshalled) was the largest part of a restart with 1000 endpoints.
    dbus-next has no export without the signal; on an unknown release this is
    a plain export.
    """
    from dbus_next.__version__ import __version__ as version
    from dbus_next.service import ServiceInterface
    from dbus_next.validators import assert_object_path_valid

    exports = getattr(bus, "_path_exports", None)
    add_bus = getattr(ServiceInterface, "_add_bus", None)
    if (version not in _EXPORT_KNOWN_VERSIONS or not isinstance(exports, dict)
            or add_bus is None or not isinstance(interface, ServiceInterface)):
        bus.export(path, interface)
        return
    assert_object_path_valid(path)
    on_path = exports.setdefault(path, [])
    if any(f.name == interface.name for f in on_path):
        raise ValueError(f"an interface {interface.name} is already exported at {path}")
    on_path.append(interface)
    add_bus(interface, bus)
