"""scistreamctl's D-Bus client: jeepney (python3-jeepney) on a blocking socket.

jeepney marshals, parses and authenticates; this module adds what a CLI needs
around it: one deadline (--timeout) over connecting, authenticating and every
answer (jeepney's own blocking connection waits for Hello without a bound),
pipelined calls (a request and a property read in one round trip), the
signatures of our calls taken from the one description of the API
(scistreamd/interface.py), replies turned into plain values, and every
failure turned into a CtlError with the exit code of the table.

Why not dbus-next: it imports asyncio and its service layer (~45 ms per call
of a CLI that scripts run in loops). jeepney is imported only when a bus call
is made.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

from .. import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from ..interface import INTERFACES
from .errors import EXIT_FAILED, EXIT_UNREACHABLE, CtlError, error_from_dbus, timed_out, unreachable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Any, Callable, Dict, List, Optional, Sequence

#: Environment variable naming the bus address to use instead of the system/session bus.
BUS_ADDRESS_ENV = "SCISTREAM_BUS_ADDRESS"
SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

#: interface -> member -> (in signature, out signature), from the description.
_SIGNATURES: Dict[str, Dict[str, Any]] = {
    i.name: {m.name: (m.in_sig, m.out_sig) for m in i.methods.values()} for i in INTERFACES
}
_SIGNATURES[PROPERTIES_IFACE] = {"GetAll": ("s", "a{sv}"), "Get": ("ss", "v")}
_SIGNATURES[OBJECT_MANAGER_IFACE] = {"GetManagedObjects": ("", "a{oa{sa{sv}}}")}


def bus_address(user: bool, environ: Optional[Dict[str, str]] = None) -> str:
    """The bus address to use: SCISTREAM_BUS_ADDRESS, else the system/session bus."""
    env = os.environ if environ is None else environ
    override = env.get(BUS_ADDRESS_ENV)
    if override:
        return override
    if user:
        if env.get("DBUS_SESSION_BUS_ADDRESS"):
            return env["DBUS_SESSION_BUS_ADDRESS"]
        runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
        return f"unix:path={runtime}/bus"
    return env.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT


# ---------------------------------------------------------------------------
# Values: jeepney gives variants as (signature, value) and structs as tuples;
# the verbs want JSON-friendly values, so replies are unwrapped by signature.


def split_signature(sig: str) -> List[str]:
    """The complete types of a signature: "sa{sv}(qq)" -> ["s", "a{sv}", "(qq)"]."""
    out, i = [], 0
    while i < len(sig):
        j = i
        while sig[j] == "a":
            j += 1
        if sig[j] in "({":
            depth = 0
            for k in range(j, len(sig)):
                depth += sig[k] in "({"
                depth -= sig[k] in ")}"
                if depth == 0:
                    j = k
                    break
        out.append(sig[i:j + 1])
        i = j + 1
    return out


def plain(sig: str, value: Any) -> Any:
    """A jeepney value of type ``sig`` as plain Python (variants unwrapped, lists)."""
    c = sig[0]
    if c == "v":
        return plain(value[0], value[1])
    if c == "a":
        inner = sig[1:]
        if inner[0] == "{":
            ksig, vsig = split_signature(inner[1:-1])
            return {plain(ksig, k): plain(vsig, v) for k, v in value.items()}
        if inner == "y":
            return bytes(value).decode("utf-8", "replace")
        return [plain(inner, v) for v in value]
    if c == "(":
        return [plain(t, v) for t, v in zip(split_signature(sig[1:-1]), value)]
    return value


# ---------------------------------------------------------------------------
# The connection


class Connection:
    """One authenticated bus connection; ``deadline`` (time.monotonic()) bounds it all."""

    def __init__(self, path: str, deadline: float) -> None:
        from jeepney import Parser

        self.deadline = deadline
        self.parser = Parser()
        self.serial = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._bound(self.sock.connect, path)
        except BaseException:
            self.sock.close()
            raise

    def _bound(self, op: Callable[..., Any], *args: Any) -> Any:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.sock.settimeout(left)
        try:
            return op(*args)
        except socket.timeout:
            raise TimeoutError("no answer before the deadline") from None

    def _recv(self) -> bytes:
        data = self._bound(self.sock.recv, 65536)
        if not data:
            raise EOFError("the bus closed the connection")
        return data

    def authenticate(self) -> None:
        from jeepney.auth import BEGIN, Authenticator

        auth = Authenticator()
        for line in auth:
            self._bound(self.sock.sendall, line)
            try:
                auth.feed(self._recv())
            except EOFError:
                raise EOFError("the bus closed the connection during authentication") from None
        self._bound(self.sock.sendall, BEGIN)
        # Hello's reply (our unique name, which the CLI never uses) is not waited for:
        # the bus handles a connection's messages in order, so the first call goes out
        # at once and replies() skips Hello's answer; one round trip less (as sd-bus).
        self.send("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "Hello", "", ())

    def send(self, destination: str, path: str, interface: str, member: str, sig: str,
             body: Sequence[Any]) -> int:
        from jeepney import DBusAddress, new_method_call

        msg = new_method_call(DBusAddress(path, destination, interface), member, sig or None,
                              tuple(body))
        self.serial += 1
        self._bound(self.sock.sendall, msg.serialise(serial=self.serial))
        return self.serial

    def replies(self, serials: Sequence[int]) -> Dict[int, Any]:
        """The replies (method returns or errors) to ``serials``, in any order; anything
        else the bus sends (NameAcquired, signals) is skipped."""
        from jeepney import HeaderFields, MessageType

        want, got = set(serials), {}
        while want:
            msg = self.parser.get_next_message()
            if msg is None:
                self.parser.add_data(self._recv())
                continue
            serial = msg.header.fields.get(HeaderFields.reply_serial)
            if msg.header.message_type in (MessageType.method_return, MessageType.error) \
                    and serial in want:
                want.discard(serial)
                got[serial] = msg
        return got

    def call(self, destination: str, path: str, interface: str, member: str, sig: str,
             body: Sequence[Any]) -> Any:
        serial = self.send(destination, path, interface, member, sig, body)
        return self.replies([serial])[serial]

    def next_message(self, timeout: float) -> Any:
        """The next message the bus sends (a signal, for watch), or None after ``timeout``."""
        self.deadline = time.monotonic() + timeout
        while True:
            msg = self.parser.get_next_message()
            if msg is not None:
                return msg
            try:
                self.parser.add_data(self._recv())
            except TimeoutError:
                return None

    def close(self) -> None:
        self.sock.close()


class Client:
    """Calls on scistreamd by member name; signatures come from the API's description."""

    def __init__(self, conn: Connection, user_bus: bool) -> None:
        self._conn = conn
        self._user_bus = user_bus
        #: serial -> (member, the reply signature the description promises)
        self._expect: Dict[int, Any] = {}

    def send(self, member: str, body: Sequence[Any] = (), *, path: str = MANAGER_PATH,
             interface: str = MANAGER_IFACE) -> int:
        """Send a call without waiting; ``replies`` collects it (pipelining)."""
        in_sig, out_sig = _SIGNATURES[interface][member]
        serial = self._conn.send(BUS_NAME, path, interface, member, in_sig, body)
        self._expect[serial] = (member, out_sig)
        return serial

    def replies(self, serials: Sequence[int]) -> Dict[int, Any]:
        return self._conn.replies(serials)

    def reply(self, serial: int, got: Dict[int, Any]) -> List[Any]:
        """A reply's body as plain values, or the CtlError of an error reply."""
        from jeepney import HeaderFields, MessageType

        msg = got[serial]
        fields = msg.header.fields
        if msg.header.message_type == MessageType.error:
            text = msg.body[0] if msg.body and isinstance(msg.body[0], str) else ""
            name = str(fields.get(HeaderFields.error_name, ""))
            raise error_from_dbus(name, text, user_bus=self._user_bus)
        sig = fields.get(HeaderFields.signature, "")
        member, expected = self._expect[serial]
        if sig != expected:
            # Another API version: say so, rather than misread its answer.
            raise CtlError(
                f"scistreamd answered {member} with signature {sig!r}, not {expected!r}: "
                "use the scistreamctl of the same version as the daemon",
                EXIT_FAILED,
                "UnexpectedReply",
            )
        return [plain(t, v) for t, v in zip(split_signature(sig), msg.body)]

    def call(self, member: str, body: Sequence[Any] = (), *, path: str = MANAGER_PATH,
             interface: str = MANAGER_IFACE) -> List[Any]:
        serial = self.send(member, body, path=path, interface=interface)
        return self.reply(serial, self.replies([serial]))

    def within(self, seconds: float) -> None:
        """A new deadline for what follows (a long-running verb's next calls)."""
        self._conn.deadline = time.monotonic() + seconds

    def add_match(self, rule: str) -> None:
        """Ask the bus for the signals ``rule`` matches (org.freedesktop.DBus.AddMatch)."""
        from jeepney import HeaderFields, MessageType

        msg = self._conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus", "AddMatch", "s", (rule,))
        if msg.header.message_type == MessageType.error:
            name = str(msg.header.fields.get(HeaderFields.error_name, ""))
            raise CtlError(f"the bus refused to deliver scistreamd's signals ({name})",
                           EXIT_FAILED, "Failed")

    def next_message(self, timeout: float) -> Any:
        """The next message from the bus (jeepney's Message), or None after ``timeout``."""
        return self._conn.next_message(timeout)


def _connect(address: str, deadline: float) -> Connection:
    from jeepney.bus import get_bus

    try:
        path = get_bus(address)
    except (ValueError, RuntimeError, KeyError) as err:
        raise CtlError(
            f"bus address {address!r} is invalid ({err}): fix {BUS_ADDRESS_ENV} "
            "or DBUS_*_BUS_ADDRESS",
            EXIT_UNREACHABLE,
            "DaemonUnreachable",
        ) from None
    return Connection(path, deadline)


def run_bus(args: argparse.Namespace, work: Callable[[Client], Any]) -> Any:
    """Run ``work(client)`` on a fresh connection; returns its result.

    One deadline (--timeout) covers connecting, authenticating and the answer.
    """
    from jeepney.auth import AuthenticationError

    user = bool(args.user)
    address = bus_address(user)
    try:
        conn = _connect(address, time.monotonic() + args.timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        # No socket, or nobody behind it: the plain "not running" case.
        raise unreachable(user) from None
    except TimeoutError:
        raise timed_out(args.timeout) from None
    except OSError as err:
        raise unreachable(user, f"{address}: {err.strerror or err}") from None
    try:
        try:
            conn.authenticate()
        except TimeoutError:
            raise
        except (OSError, EOFError, AuthenticationError, ValueError) as err:
            raise unreachable(user, f"bus connection failed: {err}") from None
        return work(Client(conn, user))
    except TimeoutError:
        raise timed_out(args.timeout) from None
    except (ConnectionError, EOFError) as err:
        raise unreachable(user, f"connection lost: {err or 'the bus closed it'}") from None
    except ValueError as err:  # jeepney: what came is not a D-Bus message
        raise unreachable(user, f"bad message from the bus: {err}") from None
    finally:
        conn.close()


def list_endpoints(client: Client) -> List[Any]:
    """ListEndpoints: [uid, role, state, listeners] per endpoint."""
    (rows,) = client.call("ListEndpoints")
    return rows


def endpoint_uids(user: bool, timeout: float) -> List[str]:
    """The uids of this host's endpoints, sorted (for completion and prefixes)."""
    args = argparse.Namespace(user=user, timeout=timeout)
    return sorted({row[0] for row in run_bus(args, list_endpoints)})
