"""scistreamctl's command line: verbs, options, --help (argparse).

Only argparse and the standard library at import time: start-up matters
(scripts call the CLI in loops). Shell completion (python3-argcomplete) is
imported only when the shell asks for completions (_ARGCOMPLETE is set).
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from .errors import EXIT_USAGE, PROG, CtlError, exit_codes_help, usage_error

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Any, Callable, Dict, List, Sequence, Tuple

DEFAULT_TIMEOUT = 30.0
#: The epilog of the main --help (a verb's --help shows only the verb).
EXIT_CODES_HELP = exit_codes_help() + """
environment:
  SCISTREAM_BUS_ADDRESS  D-Bus address to use instead of the system bus (or the
                         session bus with --user), e.g. unix:path=/run/x/bus
  SCISTREAM_TOKEN        access token for remote mode (--s2cs naming another
                         host's daemon) when --token-file is not given
"""

def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns (3.11's rules), without importing shutil:
    argparse makes a formatter on every run (add_subparsers), and shutil (with bz2,
    lzma, fnmatch) costs every scistreamctl start ~2 ms."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph texts; keeps texts with their own line breaks (the epilog) as is."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None, **kw: Any) -> None:
        # argparse's default width, computed as argparse does (terminal columns - 2).
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width, **kw)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        # A text that fits on one line (--version) is what textwrap would make of it;
        # textwrap costs ~1 ms to import.
        one_line = self._whitespace_matcher.sub(" ", text).strip()  # as argparse does
        if one_line and len(indent) + len(one_line) <= width:
            return indent + one_line
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become one line and exit code 2 (raised, not exited)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise usage_error(message, self.prog[len(PROG):].strip())


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


_S2CS_HELP = (
    "the scistreamd to send this to: another host's daemon is reached through its user "
    "API over TLS (with your token or client certificate); this host's own (an address of "
    "this host and its peer port), or none given, over D-Bus"
)


def _add_remote_options(p: argparse.ArgumentParser, *, s2cs: bool = True,
                        server_cert_help: str = "") -> None:
    """Remote mode: which daemon, and how to trust it and be known to it."""
    group = p.add_argument_group(
        "remote mode", "a token comes from --token-file, else $SCISTREAM_TOKEN, else "
        "$XDG_CONFIG_HOME/scistream/token (~/.config/scistream/token); a token file must be "
        "yours and of mode 0600")
    if s2cs:
        group.add_argument("--s2cs", metavar="HOST:PORT", help=_S2CS_HELP)
    group.add_argument(
        "--server-cert",
        "--server_cert",
        dest="server_cert",
        metavar="PEM",
        help=server_cert_help or "remote mode: the CA (or certificate) to verify the daemon "
        "named by --s2cs with (default: the system CA store); ignored over D-Bus",
    )
    group.add_argument("--token-file", "--token_file", dest="token_file", metavar="PATH",
                       help="file holding your access token (mode 0600)")
    group.add_argument("--client-cert", "--client_cert", dest="client_cert", metavar="PEM",
                       help="client certificate to identify yourself with (a robot's "
                       "identity), instead of or besides a token")
    group.add_argument("--client-key", "--client_key", dest="client_key", metavar="PEM",
                       help="the key of --client-cert (default: in the --client-cert file)")
    group.add_argument("--remote", action="store_true",
                       help="use the user API even when the daemon named is this host's own "
                       "(e.g. with a token, without local permission)")


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
        "--allowed-peer",
        "--allowed_peer",
        dest="allowed_peer",
        metavar="IP|DNS",
        help="only the peer gateway whose client certificate lists this IP address or DNS "
        "name (subjectAltName) may claim the tunnel's key; default: any peer whose "
        "certificate this daemon trusts",
    )
    _add_remote_options(p)


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
    _add_remote_options(
        p, server_cert_help="remote mode: the CA (or certificate) to verify the daemon "
        "named by --s2cs with (default: the system CA store); local: like --peer-trust")
    p.add_argument(
        "--peer-trust",
        "--peer_trust",
        dest="peer_trust",
        metavar="PEM",
        help="PEM file (CA bundle or the peer's certificate) the daemon verifies the peer "
        "daemon with when it claims the key; read with your permissions and sent to the "
        "daemon (default: the daemon's configured trust)",
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


def _uid_arg(p: argparse.ArgumentParser, *names: str, help: str, **kw: Any) -> None:
    """A positional UID of an endpoint on this host: prefixes allowed, completed from
    the daemon's endpoints."""
    # Abbreviated as git and docker accept; resolved through ListEndpoints.
    action = p.add_argument(*names, help=f"{help}, or a unique prefix of it {_STDIN_UID}",
                            **kw)
    action.completer = complete_uids  # type: ignore[attr-defined]  # read by argcomplete


def complete_uids(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> List[str]:
    """argcomplete: the uids of this host's endpoints (ListEndpoints) that start with
    ``prefix``; nothing, quietly, when the daemon cannot be asked (down, not permitted)."""
    if any(getattr(parsed_args, name, None) for name in ("s2cs", "server_s2cs", "client_s2cs",
                                                          "remote")):
        return []  # another daemon's uids: not asked for over the network on every TAB
    from .bus import endpoint_uids

    user = bool(getattr(parsed_args, "user", False))
    try:
        uids = endpoint_uids(user, timeout=2.0)
    except Exception:  # completion must never print or fail
        return []
    return [u for u in uids if u.startswith(prefix.lower())]


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request (argcomplete's protocol) and exit."""
    try:
        import argcomplete
    except ImportError:  # python3-argcomplete not installed: no completion
        os._exit(1)
    argcomplete.autocomplete(parser, always_complete_options="long")


def _add_both_daemons(p: argparse.ArgumentParser, required: bool) -> None:
    for side, what in (("server", "inbound side (where the server application is)"),
                       ("client", "outbound side (where the client application is)")):
        p.add_argument(f"--{side}-s2cs", f"--{side}_s2cs", dest=f"{side}_s2cs",
                       metavar="HOST:PORT", required=required,
                       help=f"the scistreamd of the {what}")


def _args_tunnel(p: argparse.ArgumentParser) -> None:
    _add_both_daemons(p, required=True)
    p.add_argument("--remote-ip", "--remote_ip", dest="remote_ip", required=True,
                   metavar="IP", help="address the server application listens on")
    p.add_argument("--receiver-ports", "--receiver_ports", dest="receiver_ports",
                   action="append", required=True, metavar="PORTS",
                   help="port(s) the server application listens on; repeatable")
    p.add_argument("--num-conn", "--num_conn", dest="num_conn", default="1", metavar="N",
                   help="number of listeners (mappings) on each side (default 1)")
    p.add_argument("--local-ports", "--local_ports", dest="local_ports", action="append",
                   metavar="PORTS", help="port(s) the client application will connect to on "
                   "the client side (default: allocated there)")
    p.add_argument("--allowed-peer", "--allowed_peer", dest="allowed_peer", metavar="IP|DNS",
                   help="only the gateway whose certificate lists this may claim the key "
                   "(default: the address of --client-s2cs)")
    p.add_argument("--peer-trust", "--peer_trust", dest="peer_trust", metavar="PEM",
                   help="PEM file the client-side daemon verifies the server-side daemon "
                   "with (default: its configured trust)")
    _add_remote_options(p, s2cs=False, server_cert_help="the CA(s) (or certificates) to "
                        "verify both daemons with (default: the system CA store)")


def _args_release(p: argparse.ArgumentParser) -> None:
    _uid_arg(p, "uid", nargs="?", metavar="UID", help="tunnel uid")
    p.add_argument("--all", action="store_true", help="release every endpoint on this host "
                   "(remote: every one of yours there)")
    _add_both_daemons(p, required=False)
    _add_remote_options(p)


def _args_list(p: argparse.ArgumentParser) -> None:
    _add_remote_options(p)


def _args_rearm(p: argparse.ArgumentParser) -> None:
    _uid_arg(p, "uid", metavar="UID", help="tunnel uid (of an inbound endpoint here)")


def _args_status(p: argparse.ArgumentParser) -> None:
    _uid_arg(p, "uid", metavar="UID", help="tunnel uid")
    _add_remote_options(p)


def _args_logs(p: argparse.ArgumentParser) -> None:
    _uid_arg(p, "uid", metavar="UID", help="tunnel uid")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-n", "--lines", dest="lines", metavar="N", help="show the last N lines")


def _args_watch(p: argparse.ArgumentParser) -> None:
    _uid_arg(p, "uid_refs", nargs="*", metavar="UID",
             help="show only these tunnels (default: every endpoint on this host)")
    p.add_argument("--poll", action="store_true",
                   help="read the endpoints every --interval seconds instead of following "
                        "scistreamd's signals (the default for users outside group scistream, "
                        "who get no signals)")
    p.add_argument("--interval", default="2", metavar="SECONDS",
                   help="seconds between reads when polling (default 2)")


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
    "tunnel": (
        "create both ends of a tunnel: inbound on one daemon, outbound on another",
        "Create the inbound endpoint on the daemon named by --server-s2cs and the outbound "
        "endpoint for it on the daemon named by --client-s2cs (which claims the key from "
        "the first, as outbound-request does); prints the uid and the client-side "
        "listeners. If the outbound half fails, the inbound half is released: nothing is "
        "left on either side. 'release UID --server-s2cs A --client-s2cs B' releases both.",
        _args_tunnel,
    ),
    "list": ("list the endpoints on this host (or yours on --s2cs)",
             "List the endpoints on this host, or with --s2cs your endpoints on that daemon.",
             _args_list),
    "status": (
        "show every property of a tunnel's endpoint(s)",
        "Show every endpoint of tunnel UID on this host with all its properties.",
        _args_status,
    ),
    "watch": (
        "show the endpoints live: rates, bytes, connections, state changes",
        "Show every endpoint on this host (or those of the tunnels UID...) live: rates in "
        "and out, bytes, connections, restarts and state changes as they happen, from "
        "scistreamd's D-Bus signals. On a terminal a table is redrawn in place (python3-rich); "
        "otherwise one line is printed per change (with --json one JSON object per line). "
        "Ctrl-C quits (exit 0).",
        _args_watch,
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


class _VerbParser(_Parser):
    """A verb's sub-parser, built on first use (lazy=True): a run uses one verb's parser,
    and each costs ~0.2 ms of argparse and gettext work to build. Until then only the
    verb's name and one-line help exist (all the main --help and "invalid choice" show)."""

    def __init__(self, *, add_args: Callable[[argparse.ArgumentParser], None],
                 lazy: bool = False, **kwargs: Any) -> None:
        self._unbuilt = (add_args, kwargs)
        if not lazy:
            self._build()

    def _build(self) -> None:
        add_args, kwargs = self.__dict__.pop("_unbuilt")
        super().__init__(**kwargs)
        _add_global_options(self, suppress=True)
        add_args(self)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what the unbuilt parser lacks (anything argparse reads).
        if name.startswith("__") or "_unbuilt" not in self.__dict__:
            raise AttributeError(name)
        self._build()
        return getattr(self, name)


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The argument parser; ``lazy``: each verb's sub-parser built when used (start-up)."""
    parser = _Parser(
        prog=PROG,
        description="Create, list, inspect and release scistreamd tunnels: on this host over "
        "D-Bus, on another host's daemon (--s2cs) through its user API.",
        epilog=EXIT_CODES_HELP,
        formatter_class=_Formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_global_options(parser, suppress=False)
    # prog: the verbs' usage prefix, what argparse would format from the main usage
    # (the main parser has no positional before VERB), without making a formatter.
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_VerbParser,
                                prog=PROG)
    sub.required = True
    for name, (help_, description, add_args) in _VERB_SPECS.items():
        sub.add_parser(
            name,
            help=help_,
            description=description,
            epilog=f"exit codes: see '{PROG} --help'",
            formatter_class=_Formatter,
            allow_abbrev=False,
            add_args=add_args,
            lazy=lazy,
        )
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; raises CtlError(exit 2) on usage errors."""
    if "_ARGCOMPLETE" in os.environ:
        _complete(build_parser())  # exits when the shell asked for completions
    args = build_parser(lazy=True).parse_args(list(argv))
    args.timeout = _parse_timeout(args.timeout)
    if getattr(args, "verb", "") == "watch":
        args.interval = _parse_interval(args.interval)
    return args


def _parse_interval(value: object) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        seconds = -1.0
    if not 0.2 <= seconds <= 3600:  # also rejects NaN
        raise CtlError(f"--interval {value!r} is not a number of seconds: give 0.2 to 3600",
                       EXIT_USAGE, "InvalidArgument")
    return seconds


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

