"""scistreamctl's failures: the exit-code table (the only copy) and the mapping
of D-Bus error replies to one line and an exit code."""

from __future__ import annotations

from ..errors import (
    AccessDenied,
    AlreadyExists,
    AuthUnavailable,
    InvalidArgument,
    NotFound,
    PeerRejected,
    PeerUnreachable,
    PortsExhausted,
    RelayFailed,
    ScistreamError,
    WrongListener,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Tuple

PROG = "scistreamctl"

EXIT_OK = 0
EXIT_FAILED = ScistreamError.exit_code
EXIT_USAGE = InvalidArgument.exit_code
EXIT_NOT_FOUND = NotFound.exit_code
EXIT_PERMISSION = AccessDenied.exit_code
EXIT_UNREACHABLE = 10
EXIT_INTERRUPTED = 130

#: The exit codes: (code, meaning, short meaning for --help). The codes of the
#: daemon's named errors are their classes' (scistreamd/errors.py).
EXIT_CODES: Tuple[Tuple[int, str, str], ...] = (
    (EXIT_OK, "success", "success"),
    (EXIT_FAILED, "any other failure (unexpected D-Bus error, internal error)", "other failure"),
    (InvalidArgument.exit_code, "invalid argument or usage (``InvalidArgument``, "
     "``AmbiguousUid``)", "invalid argument / usage"),
    (NotFound.exit_code, "no such tunnel/endpoint (``NotFound``)", "not found (NotFound)"),
    (AlreadyExists.exit_code, "the endpoint exists already (``AlreadyExists``)",
     "already exists"),
    (PortsExhausted.exit_code, "no free port left in the daemon's port range "
     "(``PortsExhausted``)", "no free ports in the range"),
    (PeerUnreachable.exit_code, "the peer gateway's daemon cannot be reached "
     "(``PeerUnreachable``)", "peer daemon unreachable (PeerUnreachable)"),
    (PeerRejected.exit_code, "the peer gateway refused the request (``PeerRejected``)",
     "peer refused the request (PeerRejected)"),
    (RelayFailed.exit_code, "the relay unit did not start or its listeners did not open "
     "(``RelayFailed``)", "relay did not start (RelayFailed)"),
    (AccessDenied.exit_code, "permission denied (``AccessDenied``, or the D-Bus policy "
     "refused the call)", "permission denied (AccessDenied, D-Bus policy)"),
    (EXIT_UNREACHABLE, "scistreamd is not running, or the bus is unreachable, or it did not "
     "answer", "scistreamd not running / bus unreachable"),
    (WrongListener.exit_code, "the peer has no such listener for the tunnel; nothing was "
     "claimed (``WrongListener``)", "wrong listener, nothing claimed (WrongListener)"),
    (AuthUnavailable.exit_code, "the daemon could not check the bearer token: its token "
     "introspection server is unreachable or answered garbage; nothing was done, try again "
     "later (``AuthUnavailable``)", "token check unavailable (AuthUnavailable)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)", "interrupted"),
)


def exit_codes_rst() -> str:
    """The table for the module docstring (and scistreamctl(1))."""
    rule = "====  " + "=" * 68
    rows = [f"{code:<4}  {meaning}" for code, meaning, _ in EXIT_CODES]
    return "\n".join([rule, "code  meaning", rule, *rows, rule]) + "\n"


def exit_codes_help() -> str:
    """The table for ``scistreamctl --help``: two columns."""
    cells = [f"{code:<2} {short}" for code, _, short in EXIT_CODES]
    half = (len(cells) + 1) // 2
    left, right = cells[:half], cells[half:]
    lines = [f"  {a:<30}  {b}".rstrip() for a, b in zip(left, right + [""] * len(left))]
    return "exit codes:\n" + "\n".join(lines) + "\n"


_PERMISSION_MESSAGE = (
    "permission denied: managing tunnels needs root or membership of group 'scistream'"
)
_UNREACHABLE_MESSAGE = (
    "scistreamd is not running (or the system bus is unreachable): "
    "start it with 'systemctl start scistreamd'"
)
_UNREACHABLE_MESSAGE_USER = (
    "scistreamd is not running on the session bus (or the session bus is unreachable): "
    "start it with 'scistreamd --user'"
)

#: Bus-level error names that mean "the caller may not do this".
_BUS_PERMISSION_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
    }
)
#: Bus-level error names that mean "nobody (alive) owns the name".
_BUS_UNREACHABLE_ERRORS = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.NoServer",
        "org.freedesktop.DBus.Error.Disconnected",
        "org.freedesktop.DBus.Error.TimedOut",
    }
)


class CtlError(ScistreamError):
    """A failure to report: one line on stderr and an exit code (both per instance)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, name: str = "Failed") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.name = name


def usage_error(message: str, verb: str = "") -> CtlError:
    where = f"{PROG} {verb}".strip()
    return CtlError(f"{message}. See '{where} --help'", EXIT_USAGE, "InvalidArgument")


def _one_line(text: str, limit: int = 400) -> str:
    """A remote message as one line: the last non-empty line of a multi-line text.

    A multi-line message is a traceback from a buggy service; its last line is the
    exception itself, the only part an operator can act on.
    """
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_from_dbus(name: str, text: str, *, user_bus: bool = False) -> CtlError:
    """Map a D-Bus error reply to the CtlError the user sees."""
    from ..errors import BY_DBUS_NAME

    cls = BY_DBUS_NAME.get(name)
    if cls is not None:
        return CtlError(_one_line(text) or cls.name, cls.exit_code, cls.name)
    if name in _BUS_PERMISSION_ERRORS:
        return CtlError(_PERMISSION_MESSAGE, EXIT_PERMISSION, "AccessDenied")
    if name in _BUS_UNREACHABLE_ERRORS:
        return unreachable(user_bus)
    detail = _one_line(text)
    return CtlError(f"{name}: {detail}" if detail else name, EXIT_FAILED, name)


def error_from_exception(err: ScistreamError) -> CtlError:
    """A client-side validation failure (same classes and codes as the daemon's)."""
    return CtlError(_one_line(str(err)), err.exit_code, err.name)


def unreachable(user: bool, detail: str = "") -> CtlError:
    msg = _UNREACHABLE_MESSAGE_USER if user else _UNREACHABLE_MESSAGE
    if detail:
        # Keep the fix last: "<problem> (...: <why>): <fix>" still reads as one sentence.
        problem, _, fix = msg.partition(": ")
        msg = f"{problem[:-1]}: {detail}): {fix}"
    return CtlError(msg, EXIT_UNREACHABLE, "DaemonUnreachable")


def timed_out(timeout: float) -> CtlError:
    return CtlError(
        f"scistreamd did not answer within {timeout:g} s: check "
        "'systemctl status scistreamd' and 'journalctl -u scistreamd', or give a "
        "larger --timeout",
        EXIT_UNREACHABLE,
        "Timeout",
    )
