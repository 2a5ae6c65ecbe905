"""scistreamctl: manage scistreamd tunnels from the command line.

The CLI talks only D-Bus (``org.scistream.Tunnel1`` on the system bus, or the
session bus with ``--user``; ``SCISTREAM_BUS_ADDRESS`` overrides both). It never
imports the daemon's modules: everything it knows about tunnels comes over the
bus, so it works against any scistreamd of the same API version.

Verbs::

    inbound-request  --remote_ip IP --receiver_ports PORTS [--num_conn N] [--s2cs H:P]
                     [--allowed-peer IP|DNS]
    outbound-request [--receiver_ports PORTS] [--num_conn N] [--peer H:P]
                     [--server_cert PEM] UID LISTENER [LISTENER ...]
    release UID | release --all
    rearm UID                                     (inbound side: new key, new claim)
    list
    status UID
    logs UID [-f] [-n N]

Both the dashed (``--remote-ip``) and the upstream s2uc spelling
(``--remote_ip``) of every option are accepted, so the APS guide's commands work
with ``scistreamctl`` in place of ``s2uc``. ``--json`` gives a JSON object on
stdout for every verb.

Failures print one line on stderr, ``scistreamctl: <problem>. <fix>``, and exit
with a code that names the kind of failure:

====  ====================================================================
code  meaning
====  ====================================================================
0     success
1     any other failure (unexpected D-Bus error, internal error)
2     invalid argument or usage (``InvalidArgument``)
3     no such tunnel/endpoint (``NotFound``)
4     the endpoint exists already (``AlreadyExists``)
5     no free port left in the daemon's port range (``PortsExhausted``)
6     the peer gateway's daemon cannot be reached (``PeerUnreachable``)
7     the peer gateway refused the request (``PeerRejected``)
8     the relay unit did not start or its listeners did not open (``RelayFailed``)
9     permission denied (``AccessDenied``, or the D-Bus policy refused the call)
10    scistreamd is not running, or the bus is unreachable, or it did not answer
11    the peer has no such listener for the tunnel; nothing was claimed (``WrongListener``)
130   interrupted (Ctrl-C)
====  ====================================================================

Start-up time matters (scripts call this in loops): only argparse and the
standard library are imported at the top; ``scistreamd.model`` is imported when
arguments are validated and ``scistreamd.busclient`` (a small synchronous D-Bus
client; dbus-next and asyncio would cost ~45 ms) only when a bus call is made.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

from . import (
    BUS_NAME,
    ENDPOINT_IFACE,
    ENDPOINT_PATH_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    __version__,
)
from .errors import BY_DBUS_NAME, InvalidArgument, NotFound, ScistreamError

logger = logging.getLogger(__name__)

PROG = "scistreamctl"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PERMISSION = 9
EXIT_UNREACHABLE = 10
EXIT_INTERRUPTED = 130

#: Environment variable naming the bus address to use instead of the system/session bus.
BUS_ADDRESS_ENV = "SCISTREAM_BUS_ADDRESS"
SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"
DEFAULT_TIMEOUT = 30.0
#: Largest --server_cert file sent to the daemon (the daemon enforces the same bound).
MAX_TRUST_PEM = 1024 * 1024

PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"

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

EXIT_CODES_HELP = """\
exit codes:
  0  success                      6  peer daemon unreachable (PeerUnreachable)
  1  other failure                7  peer refused the request (PeerRejected)
  2  invalid argument / usage     8  relay did not start (RelayFailed)
  3  not found (NotFound)         9  permission denied (AccessDenied, D-Bus policy)
  4  already exists               10 scistreamd not running / bus unreachable
  5  no free ports in the range   11 wrong listener, nothing claimed (WrongListener)
                                  130 interrupted

environment:
  SCISTREAM_BUS_ADDRESS  D-Bus address to use instead of the system bus (or the
                         session bus with --user), e.g. unix:path=/run/x/bus
"""


class CtlError(Exception):
    """A failure to report: one line on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, name: str = "Failed") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.name = name


# ---------------------------------------------------------------------------
# Error mapping (pure)


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
    cls = BY_DBUS_NAME.get(name)
    if cls is not None:
        return CtlError(_one_line(text) or cls.name, cls.exit_code, cls.name)
    if name in _BUS_PERMISSION_ERRORS:
        return CtlError(_PERMISSION_MESSAGE, EXIT_PERMISSION, "AccessDenied")
    if name in _BUS_UNREACHABLE_ERRORS:
        msg = _UNREACHABLE_MESSAGE_USER if user_bus else _UNREACHABLE_MESSAGE
        return CtlError(msg, EXIT_UNREACHABLE, "DaemonUnreachable")
    detail = _one_line(text)
    return CtlError(f"{name}: {detail}" if detail else name, EXIT_FAILED, name)


def error_from_exception(err: ScistreamError) -> CtlError:
    """A client-side validation failure (same classes and codes as the daemon's)."""
    return CtlError(_one_line(str(err)), err.exit_code, err.name)


# ---------------------------------------------------------------------------
# Argument parsing


class _UsageError(Exception):
    pass


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts; keeps texts with their own line breaks (the epilog) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become one line and exit code 2 (raised, not exited)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message}. See '{self.prog} --help'")


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # The same options on the main parser and on every verb, so they work before or
    # after the verb; on verbs their default is SUPPRESS so a value given before the
    # verb is not overwritten by the verb's default.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON on stdout"
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"give up waiting for scistreamd after SECONDS (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--user",
        action="store_true",
        default=default(False),
        help="use the session bus (a development 'scistreamd --user') instead of the system bus",
    )


def _args_inbound_request(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--remote-ip",
        "--remote_ip",
        dest="remote_ip",
        required=True,
        metavar="IP",
        help="address the server application listens on",
    )
    p.add_argument(
        "--receiver-ports",
        "--receiver_ports",
        dest="receiver_ports",
        action="append",
        required=True,
        metavar="PORTS",
        help="port(s) the server application listens on: 5300, 5300,5301; repeatable",
    )
    p.add_argument(
        "--num-conn",
        "--num_conn",
        dest="num_conn",
        default="1",
        metavar="N",
        help="number of listeners (mappings) to create (default 1)",
    )
    p.add_argument(
        "--s2cs",
        metavar="HOST:PORT",
        help="only printed in the output (upstream's control server address); "
        "default: this daemon's ListenAddress:PeerPort",
    )
    p.add_argument(
        "--allowed-peer",
        "--allowed_peer",
        dest="allowed_peer",
        metavar="IP|DNS",
        help="only the peer gateway whose client certificate lists this IP address or DNS "
        "name (subjectAltName) may claim the tunnel's key; default: any peer whose "
        "certificate this daemon trusts",
    )
    p.add_argument(
        "--server-cert",
        "--server_cert",
        dest="server_cert",
        metavar="PATH",
        help="accepted for compatibility with s2uc and ignored: the local daemon "
        "is reached over D-Bus, not TLS",
    )


#: Any local user can read command lines (/proc/PID/cmdline): "-" keeps a uid off them.
_STDIN_UID = "('-': read it from stdin, off the command line every local user can read)"


def _args_outbound_request(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--remote-ip",
        "--remote_ip",
        dest="remote_ip",
        metavar="IP",
        help="the eventual destination address; accepted for compatibility with "
        "s2uc and only checked to be an IP address",
    )
    p.add_argument(
        "--receiver-ports",
        "--receiver_ports",
        dest="receiver_ports",
        action="append",
        metavar="PORTS",
        help="LOCAL port(s) the client application will connect to; repeatable; "
        "default: allocated by the daemon from its port range",
    )
    p.add_argument(
        "--num-conn",
        "--num_conn",
        dest="num_conn",
        metavar="N",
        help="number of listeners (mappings) to create (default: the number of "
        "--receiver_ports, else the number of LISTENERs)",
    )
    p.add_argument(
        "--s2cs",
        metavar="HOST:PORT",
        help="only printed in the output; default: this daemon's ListenAddress:PeerPort",
    )
    p.add_argument(
        "--server-cert",
        "--server_cert",
        dest="server_cert",
        metavar="PATH",
        help="PEM file (CA bundle or the peer's certificate) to verify the peer "
        "daemon with; read with your permissions and sent to the daemon "
        "(default: the daemon's configured trust)",
    )
    p.add_argument(
        "--peer",
        metavar="HOST:PORT",
        help="the peer daemon's control address (default: the host of the first "
        "LISTENER and this daemon's PeerPort)",
    )
    p.add_argument("uid", metavar="UID", help="tunnel uid printed by inbound-request " + _STDIN_UID)
    p.add_argument(
        "listeners",
        nargs="+",
        metavar="LISTENER",
        help="inbound listener(s) ip:port printed by inbound-request",
    )


def _args_release(p: argparse.ArgumentParser) -> None:
    p.add_argument("uid", nargs="?", metavar="UID", help="tunnel uid " + _STDIN_UID)
    p.add_argument("--all", action="store_true", help="release every endpoint on this host")


def _args_rearm(p: argparse.ArgumentParser) -> None:
    p.add_argument("uid", metavar="UID",
                   help="tunnel uid (of an inbound endpoint here) " + _STDIN_UID)


def _args_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("uid", metavar="UID", help="tunnel uid " + _STDIN_UID)


def _args_logs(p: argparse.ArgumentParser) -> None:
    p.add_argument("uid", metavar="UID", help="tunnel uid " + _STDIN_UID)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", dest="lines", metavar="N", help="show the last N lines")


#: verb -> (one-line help, description, adder of its own arguments)
_VERB_SPECS: Dict[str, Tuple[str, str, Any]] = {
    "inbound-request": (
        "create the inbound (PROD) relay in front of a server application",
        "Create an inbound endpoint: a TLS relay on an allocated port of this host that "
        "forwards to the application at REMOTE_IP:RECEIVER_PORT. Prints the tunnel uid and "
        "the listeners to give to outbound-request on the other gateway.",
        _args_inbound_request,
    ),
    "outbound-request": (
        "create the outbound (CONS) relay a client application connects to",
        "Create an outbound endpoint for tunnel UID: a relay on this host that forwards over "
        "TLS to the inbound LISTENER(s) printed by inbound-request on the other gateway. "
        "LISTENERs may be separate arguments, one comma-separated argument, or the "
        "\"['ip:port', ...]\" text inbound-request prints.",
        _args_outbound_request,
    ),
    "release": (
        "release a tunnel's endpoint(s) on this host",
        "Stop the relay(s) of tunnel UID on this host, free their ports and forget them.",
        _args_release,
    ),
    "rearm": (
        "give an inbound endpoint a new key, so one more peer may claim it",
        "Re-arm inbound endpoint UID: a new random key, the relay restarted with it, and the "
        "claim reset so the next outbound-request (from any trusted peer) gets the new key. "
        "The old key stops working at once.",
        _args_rearm,
    ),
    "list": ("list the endpoints on this host", "List the endpoints on this host.", None),
    "status": (
        "show every property of a tunnel's endpoint(s)",
        "Show every endpoint of tunnel UID on this host with all its properties.",
        _args_status,
    ),
    "logs": (
        "show the journal of a tunnel (relay and daemon lines)",
        "Show journal lines of tunnel UID: the daemon's (journalctl SCISTREAM_UID=UID) and "
        "those of its relay units (_SYSTEMD_UNIT=, named by an opaque id that the daemon "
        "and its journal lines name); reading the system journal needs root or group "
        "systemd-journal/adm.",
        _args_logs,
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that verb's sub-parser (faster start-up)."""
    parser = _Parser(
        prog=PROG,
        description="Create, list, inspect and release scistreamd tunnels over D-Bus.",
        epilog=EXIT_CODES_HELP,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name, (help_, description, add_args) in _VERB_SPECS.items():
        if only is not None and name != only:
            continue
        p = sub.add_parser(
            name,
            help=help_,
            description=description,
            epilog=EXIT_CODES_HELP,
            formatter_class=_Formatter,
            allow_abbrev=False,
        )
        _add_global_options(p, suppress=True)
        if add_args is not None:
            add_args(p)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; raises CtlError(exit 2) on usage errors."""
    # Building all six sub-parsers costs ~3 ms of argparse/gettext work; build only
    # the one named (the first verb word). The main --help and "invalid choice"
    # errors list every verb, so those get them all.
    only = next((a for a in argv if a in _VERB_SPECS), None)
    if "-h" in argv or "--help" in argv:
        only = None
    try:
        args = build_parser(only).parse_args(list(argv))
    except _UsageError as err:
        raise CtlError(str(err), EXIT_USAGE, "InvalidArgument") from None
    args.timeout = _parse_timeout(args.timeout)
    return args


def _parse_timeout(value: object) -> float:
    if isinstance(value, float):
        return value
    try:
        seconds = float(str(value))
    except ValueError:
        seconds = -1.0
    # The comparisons also reject NaN; the upper bound keeps socket timeouts sane.
    if not 0 < seconds <= 86400:
        raise CtlError(
            f"--timeout {value!r} is not a number of seconds: give a value in (0, 86400]",
            EXIT_USAGE,
            "InvalidArgument",
        )
    return seconds


# ---------------------------------------------------------------------------
# Client-side validation (friendly messages early; the daemon validates again)


def _items(values: Sequence[str] | None) -> List[str]:
    # Each value may itself be a list ("5300,5301", "['a:1', 'b:2']"); repeated
    # options add up.
    from .model import split_list

    out: List[str] = []
    for value in values or ():
        out.extend(split_list(value))
    return out


def _hostport_text(value: str, what: str) -> str:
    from .model import parse_hostport

    return str(parse_hostport(value, what))


def _count(value: str, what: str) -> int:
    from .model import MAX_LIST_LEN, parse_num_conn

    try:
        return parse_num_conn(value, MAX_LIST_LEN)
    except InvalidArgument:
        raise InvalidArgument(
            f"{what} {value!r} is not a number of connections: give 1..{MAX_LIST_LEN}"
        ) from None


def read_trust_pem(path: str) -> str:
    """Read the --server_cert file (with the caller's permissions) as PEM text."""
    what = f"--server_cert {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TRUST_PEM + 1)
    except OSError as err:
        reason = err.strerror or str(err)
        raise InvalidArgument(
            f"cannot read {what}: {reason}. Give a readable PEM file with the CA bundle or "
            "the peer daemon's certificate, or omit --server_cert to use the daemon's trust"
        ) from None
    if len(data) > MAX_TRUST_PEM:
        raise InvalidArgument(
            f"{what} is larger than 1 MiB: give only the CA bundle or peer certificate"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    from .peertls import check_trust_pem  # the daemon's own check; ssl only on this path

    return check_trust_pem(text, what, load=False)


class InboundPlan:
    """A validated inbound-request."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .model import parse_allowed_peer, parse_ip, parse_port_list

        self.remote_ip = str(parse_ip(args.remote_ip, "--remote_ip"))
        self.ports = list(parse_port_list(_items(args.receiver_ports), "--receiver_ports"))
        self.num_conn = _count(args.num_conn, "--num_conn")
        self.s2cs = _hostport_text(args.s2cs, "--s2cs") if args.s2cs else None
        self.allowed_peer = (
            parse_allowed_peer(args.allowed_peer, "--allowed_peer")
            if args.allowed_peer is not None else ""
        )


class OutboundPlan:
    """A validated outbound-request."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .model import parse_hostport_list, parse_ip, parse_port_list

        if args.remote_ip is not None:
            parse_ip(args.remote_ip, "--remote_ip")
        self.uid = read_uid_arg(args.uid)
        words = list(args.listeners)
        if len(words) > 1 and words[0].startswith("[") and words[-1].endswith("]"):
            # The Listeners line pasted unquoted: the shell split "['a', 'b']" into
            # "[a," and "b]"; put the list back together.
            words = [" ".join(words)]
        self.listeners = [str(h) for h in parse_hostport_list(_items(words), "LISTENER")]
        self.ports = list(
            parse_port_list(_items(args.receiver_ports), "--receiver_ports", min_len=0)
        )
        if args.num_conn is not None:
            self.num_conn = _count(args.num_conn, "--num_conn")
        else:
            self.num_conn = len(self.ports) or len(self.listeners)
        self.s2cs = _hostport_text(args.s2cs, "--s2cs") if args.s2cs else None
        self.peer = _hostport_text(args.peer, "--peer") if args.peer else None
        self.trust_pem = read_trust_pem(args.server_cert) if args.server_cert else None


# ---------------------------------------------------------------------------
# Output formatting (pure)


def format_request(uid: str, s2cs: str, role: str, listeners: Sequence[str]) -> str:
    """The three lines s2uc printed; scripts and notes parse them."""
    return (
        "uid; s2cs; access_token; role\n"
        f"{uid} {s2cs} INVALID_TOKEN {role}\n"
        f"Listeners: {list(listeners)!r}\n"
    )


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for r in table:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1])] + [r[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def format_list(endpoints: Sequence[Dict[str, Any]]) -> str:
    if not endpoints:
        return "No endpoints.\n"
    rows = [(e["uid"], e["role"], e["state"], ",".join(e["listeners"]) or "-") for e in endpoints]
    return format_table(rows, ("UID", "ROLE", "STATE", "LISTENERS"))


def format_time_us(value: Any) -> str:
    """µs since the epoch as local ISO-8601; 0 means never."""
    if not isinstance(value, int) or value <= 0:
        return "never"
    from datetime import datetime

    try:
        return datetime.fromtimestamp(value / 1e6).astimezone().isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return str(value)


#: status order; properties a newer daemon adds come after these, sorted.
STATUS_ORDER = (
    "Uid",
    "Role",
    "State",
    "StateDetail",
    "Listeners",
    "Targets",
    "NumConn",
    "Unit",
    "Peer",
    "CreatedAt",
    "NRestarts",
    "ClaimedBy",
    "ClaimedAt",
    "AllowedPeer",
)
_TIME_PROPERTIES = frozenset({"CreatedAt", "ClaimedAt"})


def _show_value(key: str, value: Any) -> str:
    if key in _TIME_PROPERTIES:
        return format_time_us(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    if value == "" or value is None:
        return "-"
    return str(value)


def format_status(endpoints: Sequence[Dict[str, Any]]) -> str:
    blocks = []
    for props in endpoints:
        keys = [k for k in STATUS_ORDER if k in props]
        keys += sorted(k for k in props if k not in STATUS_ORDER and k != "Path")
        width = max(len(k) for k in keys + ["Path"]) + 1
        lines = [f"{(k + ':').ljust(width)} {_show_value(k, props[k])}" for k in keys]
        if "Path" in props:
            lines.append(f"{'Path:'.ljust(width)} {props['Path']}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _plain(value: Any) -> Any:
    """Unwrap D-Bus Variants (recursively) into JSON-friendly values."""
    if hasattr(value, "signature") and hasattr(value, "value"):  # a Variant
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _s2cs_from_properties(props: Dict[str, Any]) -> str:
    addr = props.get("ListenAddress")
    port = props.get("PeerPort")
    if not isinstance(addr, str) or not addr or not isinstance(port, int):
        return "-"
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# ---------------------------------------------------------------------------
# D-Bus


def bus_address(user: bool, environ: Dict[str, str] | None = None) -> str:
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


class Client:
    """One connection to the bus; method calls are built directly (no introspection)."""

    def __init__(self, conn: Any, user_bus: bool) -> None:
        self._conn = conn
        self._user_bus = user_bus

    def send(self, member: str, signature: str = "", body: Sequence[Any] = (), *,
             path: str = MANAGER_PATH, interface: str = MANAGER_IFACE) -> int:
        """Send a call without waiting; ``replies`` collects it (pipelining)."""
        return self._conn.send_call(BUS_NAME, path, interface, member, signature, list(body))

    def reply(self, serial: int, got: Dict[int, Any]) -> List[Any]:
        from .busclient import BusError, result

        try:
            return list(result(got[serial]))
        except BusError as err:
            raise error_from_dbus(err.name, err.message, user_bus=self._user_bus) from None

    def replies(self, serials: Sequence[int]) -> Dict[int, Any]:
        return self._conn.replies(serials)

    def call(self, member: str, signature: str = "", body: Sequence[Any] = (), *,
             path: str = MANAGER_PATH, interface: str = MANAGER_IFACE) -> List[Any]:
        serial = self.send(member, signature, body, path=path, interface=interface)
        return self.reply(serial, self.replies([serial]))


def _unreachable(user: bool, detail: str = "") -> CtlError:
    msg = _UNREACHABLE_MESSAGE_USER if user else _UNREACHABLE_MESSAGE
    if detail:
        # Keep the fix last: "<problem> (...: <why>): <fix>" still reads as one sentence.
        problem, _, fix = msg.partition(": ")
        msg = f"{problem[:-1]}: {detail}): {fix}"
    return CtlError(msg, EXIT_UNREACHABLE, "DaemonUnreachable")


def run_bus(args: argparse.Namespace, work: Any) -> Any:
    """Run ``work(client)`` on a fresh connection; returns its result.

    One deadline (--timeout) covers connecting, authenticating and the answer.
    """
    from . import busclient

    address = bus_address(args.user)
    deadline = time.monotonic() + args.timeout
    try:
        conn = busclient.Connection(address, deadline)
    except busclient.InvalidAddress as err:
        raise CtlError(
            f"bus address {address!r} is invalid ({err}): fix {BUS_ADDRESS_ENV} "
            "or DBUS_*_BUS_ADDRESS",
            EXIT_UNREACHABLE,
            "DaemonUnreachable",
        ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        # No socket, or nobody behind it: the plain "not running" case.
        raise _unreachable(args.user) from None
    except TimeoutError:
        raise _timed_out(args.timeout) from None
    except OSError as err:
        raise _unreachable(args.user, f"{address}: {err.strerror or err}") from None
    try:
        try:
            conn.authenticate()
        except TimeoutError:
            raise
        except (OSError, EOFError, busclient.ProtocolError, busclient.BusError) as err:
            raise _unreachable(args.user, f"bus connection failed: {err}") from None
        return work(Client(conn, args.user))
    except TimeoutError:
        raise _timed_out(args.timeout) from None
    except (ConnectionError, EOFError) as err:
        raise _unreachable(args.user, f"connection lost: {err or 'the bus closed it'}") from None
    except busclient.ProtocolError as err:
        raise _unreachable(args.user, f"bad message from the bus: {err}") from None
    finally:
        conn.close()


def _timed_out(timeout: float) -> CtlError:
    return CtlError(
        f"scistreamd did not answer within {timeout:g} s: check "
        "'systemctl status scistreamd' and 'journalctl -u scistreamd', or give a "
        "larger --timeout",
        EXIT_UNREACHABLE,
        "Timeout",
    )


# ---------------------------------------------------------------------------
# Verbs: each returns (human text, JSON-able data)

Output = Tuple[str, Any]


def _request_with_s2cs(
    client: Client, member: str, signature: str, body: List[Any], need_s2cs: bool
) -> Tuple[List[Any], str]:
    if not need_s2cs:
        return client.call(member, signature, body), ""
    # Pipelined: the property read rides along with the request, no extra round trip.
    req = client.send(member, signature, body)
    props = client.send("GetAll", "s", [MANAGER_IFACE], interface=PROPERTIES_IFACE)
    got = client.replies([req, props])
    reply = client.reply(req, got)
    try:
        (values,) = client.reply(props, got)
    except CtlError as err:
        # The tunnel exists now; a missing s2cs must not hide its uid.
        logger.debug("reading manager properties failed: %s", err)
        return reply, "-"
    return reply, _s2cs_from_properties({k: _plain(v) for k, v in values.items()})


def cmd_inbound(args: argparse.Namespace) -> Output:
    plan = InboundPlan(args)
    options: Dict[str, Any] = {}
    if plan.allowed_peer:
        from .busclient import Variant

        options["allowed_peer"] = Variant("s", plan.allowed_peer)

    def work(client: Client) -> Tuple[List[Any], str]:
        return _request_with_s2cs(
            client,
            "InboundRequest",
            "saqua{sv}",
            [plan.remote_ip, plan.ports, plan.num_conn, options],
            plan.s2cs is None,
        )

    (uid, endpoint, listeners), s2cs = run_bus(args, work)
    s2cs = plan.s2cs or s2cs
    data = {
        "uid": uid,
        "role": "PROD",
        "s2cs": s2cs,
        "listeners": list(listeners),
        "endpoint": endpoint,
    }
    return format_request(uid, s2cs, "PROD", listeners), data


def cmd_outbound(args: argparse.Namespace) -> Output:
    plan = OutboundPlan(args)
    from .busclient import Variant

    options: Dict[str, Any] = {}
    if plan.peer:
        options["peer"] = Variant("s", plan.peer)
    if plan.trust_pem is not None:
        options["trust_pem"] = Variant("s", plan.trust_pem)

    def work(client: Client) -> Tuple[List[Any], str]:
        return _request_with_s2cs(
            client,
            "OutboundRequest",
            "sasaqua{sv}",
            [plan.uid, plan.listeners, plan.ports, plan.num_conn, options],
            plan.s2cs is None,
        )

    (endpoint, listeners), s2cs = run_bus(args, work)
    s2cs = plan.s2cs or s2cs
    data = {
        "uid": plan.uid,
        "role": "CONS",
        "s2cs": s2cs,
        "listeners": list(listeners),
        "endpoint": endpoint,
    }
    return format_request(plan.uid, s2cs, "CONS", listeners), data


def cmd_release(args: argparse.Namespace) -> Output:
    if args.all and args.uid:
        raise CtlError(
            "give either UID or --all, not both. See 'scistreamctl release --help'",
            EXIT_USAGE,
            "InvalidArgument",
        )
    if args.all:

        def release_all(client: Client) -> int:
            (count,) = client.call("ReleaseAll")
            return int(count)

        count = run_bus(args, release_all)
        noun = "endpoint" if count == 1 else "endpoints"
        return f"Released {count} {noun}.\n", {"released_count": count}
    if not args.uid:
        raise CtlError(
            "give the UID to release, or --all. See 'scistreamctl release --help'",
            EXIT_USAGE,
            "InvalidArgument",
        )
    uid = read_uid_arg(args.uid)

    def release(client: Client) -> None:
        client.call("Release", "s", [uid])

    run_bus(args, release)
    return f"Released {uid}.\n", {"released": [uid]}


def cmd_rearm(args: argparse.Namespace) -> Output:
    uid = read_uid_arg(args.uid)

    def rearm(client: Client) -> None:
        client.call("RearmEndpoint", "s", [uid])

    run_bus(args, rearm)
    return f"Re-armed {uid}: the next claim gets a new key.\n", {"rearmed": uid}


def cmd_list(args: argparse.Namespace) -> Output:
    def work(client: Client) -> List[Any]:
        (rows,) = client.call("ListEndpoints")
        return rows

    rows = run_bus(args, work)
    endpoints = [
        {"uid": uid, "role": role, "state": state, "listeners": list(listeners)}
        for uid, role, state, listeners in rows
    ]
    endpoints.sort(key=lambda e: (e["uid"], e["role"]))
    return format_list(endpoints), endpoints


def cmd_status(args: argparse.Namespace) -> Output:
    uid = read_uid_arg(args.uid)

    def work(client: Client) -> Dict[str, Any]:
        (objects,) = client.call("GetManagedObjects", interface=OBJECT_MANAGER_IFACE)
        return objects

    objects = run_bus(args, work)
    endpoints = []
    for path, ifaces in objects.items():
        props = ifaces.get(ENDPOINT_IFACE)
        if not path.startswith(ENDPOINT_PATH_PREFIX + "/") or props is None:
            continue
        plain = {k: _plain(v) for k, v in props.items()}
        if plain.get("Uid") == uid:
            plain["Path"] = path
            endpoints.append(plain)
    if not endpoints:
        raise NotFound(
            f"no endpoint of tunnel {uid} on this host: see 'scistreamctl list' for the "
            "tunnels this host has"
        )
    endpoints.sort(key=lambda e: str(e.get("Role", "")))
    return format_status(endpoints), endpoints


UID_FROM_STDIN = "-"


def read_uid_arg(value: object) -> str:
    """A UID argument; "-" reads it from stdin (one line).

    Any local user can read a process's command line (/proc/PID/cmdline)
    while it runs, and a uid is a capability: "-" keeps it off the line.
    """
    from .model import parse_uid

    if value == UID_FROM_STDIN:
        value = sys.stdin.readline(200).strip()
    return parse_uid(value)


def relay_units_in(lines: Sequence[str]) -> List[str]:
    """The relay units named by journal entries (journalctl -o json lines).

    The daemon's lines about a tunnel carry SCISTREAM_UNIT; anything that is
    not a relay unit name is ignored (journal fields are untrusted text).
    """
    import json

    from .model import parse_relay_unit

    units = set()
    for line in lines:
        try:
            value = json.loads(line).get("SCISTREAM_UNIT")
            units.add(parse_relay_unit(value))
        except (ValueError, AttributeError, ScistreamError):
            continue
    return sorted(units)


def relay_units_from_journal(uid: str) -> List[str]:
    """Every relay unit the daemon's journal lines about ``uid`` name (also past ones)."""
    import subprocess

    try:
        out = subprocess.run(
            ["journalctl", f"SCISTREAM_UID={uid}", "-o", "json",
             "--output-fields=SCISTREAM_UNIT", "--no-pager", "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60,
            check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []  # the main journalctl run reports what is wrong
    return relay_units_in(out.stdout.splitlines())


def relay_units_from_daemon(args: argparse.Namespace, uid: str) -> List[str]:
    """The Unit of each endpoint of ``uid`` the daemon has now; [] if it cannot say."""
    from .model import parse_relay_unit

    def work(client: Client) -> Dict[str, Any]:
        (objects,) = client.call("GetManagedObjects", interface=OBJECT_MANAGER_IFACE)
        return objects

    try:
        objects = run_bus(args, work)
    except CtlError:
        # Daemon down, or the caller may read the journal but not the daemon:
        # the daemon's journal lines still name the units.
        return []
    units = set()
    for path, ifaces in objects.items():
        props = ifaces.get(ENDPOINT_IFACE)
        if path.startswith(ENDPOINT_PATH_PREFIX + "/") and props is not None:
            plain = {k: _plain(v) for k, v in props.items()}
            if plain.get("Uid") == uid:
                try:
                    units.add(parse_relay_unit(plain.get("Unit")))
                except ScistreamError:
                    continue
    return sorted(units)


def journalctl_argv(uid: str, follow: bool, lines: int | None, as_json: bool,
                    units: Sequence[str] = ()) -> List[str]:
    """journalctl for the daemon's lines about ``uid`` OR any line of its relay
    ``units`` (their own, and systemd's about them)."""
    argv = ["journalctl", f"SCISTREAM_UID={uid}"]
    for unit in units:
        argv += ["+", f"_SYSTEMD_UNIT={unit}", "+", f"UNIT={unit}"]
    argv += [
        "-o",
        "json" if as_json else "short-iso",
        "--no-pager",
    ]
    if follow:
        argv.append("-f")
    if lines is not None:
        argv += ["-n", str(lines)]
    return argv


def cmd_logs(args: argparse.Namespace) -> Output:
    uid = read_uid_arg(args.uid)
    lines: int | None = None
    if args.lines is not None:
        text = str(args.lines)
        if not text.isdigit() or len(text) > 9:
            raise InvalidArgument(f"-n {text!r} is not a number of lines: give 0 or more")
        lines = int(text)
    # Relay lines carry no uid (their fields are world-readable): find the
    # relay units from the daemon, and from its journal for released ones.
    units = sorted(set(relay_units_from_daemon(args, uid)) | set(relay_units_from_journal(uid)))
    argv = journalctl_argv(uid, args.follow, lines, args.json, units)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # exec, not a child: -f streams and Ctrl-C goes straight to journalctl.
        os.execvp(argv[0], argv)
    except OSError as err:
        raise CtlError(
            f"cannot run journalctl ({err.strerror or err}): install systemd's journalctl, "
            f"or read the journal elsewhere with 'journalctl SCISTREAM_UID={uid}'",
            EXIT_FAILED,
            "Failed",
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover


VERBS = {
    "inbound-request": cmd_inbound,
    "outbound-request": cmd_outbound,
    "release": cmd_release,
    "rearm": cmd_rearm,
    "list": cmd_list,
    "status": cmd_status,
    "logs": cmd_logs,
}


# ---------------------------------------------------------------------------
# Entry point


def _report(err: CtlError, as_json: bool) -> int:
    message = err.message.replace("\n", " ")
    print(f"{PROG}: {message}", file=sys.stderr)
    if as_json:
        import json

        print(json.dumps({"error": err.name, "message": message, "exit_code": err.exit_code}))
    return err.exit_code


def main(argv: List[str] | None = None) -> int:
    """Run scistreamctl; returns the exit code (never raises, never prints a traceback)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("SCISTREAMCTL_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, format=f"{PROG}: %(name)s: %(message)s")
    elif not logging.root.handlers:
        # dbus-next logs through the root logger (some with tracebacks); without a
        # handler Python would print those on stderr. Our failures are reported by us.
        logging.root.addHandler(logging.NullHandler())
    # Known before parsing succeeds, so usage errors can be reported as JSON too.
    as_json = "--json" in args_list
    try:
        try:
            args = parse_args(args_list)
            as_json = args.json
            text, data = VERBS[args.verb](args)
        except ScistreamError as err:
            return _report(error_from_exception(err), as_json)
        except CtlError as err:
            return _report(err, as_json)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        if as_json:
            import json

            print(json.dumps(data, indent=2))
        else:
            sys.stdout.write(text)
        sys.stdout.flush()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): no traceback, and none at interpreter exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_FAILED
    except Exception as err:  # the CLI promises: never a traceback
        if os.environ.get("SCISTREAMCTL_DEBUG"):
            import traceback

            traceback.print_exc()
        return _report(
            CtlError(
                f"internal error ({type(err).__name__}: {_one_line(str(err))}): please report "
                "it with the command you ran; set SCISTREAMCTL_DEBUG=1 for details",
                EXIT_FAILED,
                "InternalError",
            ),
            as_json,
        )


if __name__ == "__main__":
    sys.exit(main())
