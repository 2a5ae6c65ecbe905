"""Work-arounds for known bugs of dbus-next 0.2.x (Debian 12 and RHEL 9 ship 0.2.3).

Kept apart so they are easy to find and drop once the distributions ship a
fixed release; each one checks the version it applies to.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any


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
            self.bus._finalize(e)

    writer.write_callback = write_callback
    writer._eagain_safe = True
