"""Client-side validation of scistreamctl's arguments: friendly messages before
any bus call (the daemon validates everything again), with the daemon's own
parsers: ``scistreamd.values`` (not model: no dataclasses), imported here lazily:
parsing alone (--help, usage errors) does not need it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidArgument

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import List, Sequence

#: Largest --server_cert file sent to the daemon (the daemon enforces the same bound).
MAX_TRUST_PEM = 1024 * 1024
UID_FROM_STDIN = "-"


def _items(values: Sequence[str] | None) -> List[str]:
    # Each value may itself be a list ("5300,5301", "['a:1', 'b:2']"); repeated
    # options add up.
    from ..values import split_list

    out: List[str] = []
    for value in values or ():
        out.extend(split_list(value))
    return out


def _hostport_text(value: str, what: str) -> str:
    from ..values import parse_hostport

    return str(parse_hostport(value, what))


def _count(value: str, what: str) -> int:
    from ..values import MAX_LIST_LEN, parse_num_conn

    try:
        return parse_num_conn(value, MAX_LIST_LEN)
    except InvalidArgument:
        raise InvalidArgument(
            f"{what} {value!r} is not a number of connections: give 1..{MAX_LIST_LEN}"
        ) from None


def read_trust_pem(path: str, option: str = "--server_cert") -> str:
    """Read the --server_cert (--peer-trust) file (with the caller's permissions) as PEM text."""
    what = f"{option} {path}"
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
    from ..peertls import check_trust_pem  # the daemon's own check; ssl only on this path

    return check_trust_pem(text, what, load=False)


class InboundPlan:
    """A validated inbound-request."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..values import parse_allowed_peer, parse_ip, parse_port_list

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
        from ..values import parse_hostport_list, parse_ip, parse_port_list

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
        #: For the daemon to verify the peer with: --peer-trust, else (D-Bus only, as
        #: before remote mode existed) --server_cert.
        self.peer_trust_pem = (read_trust_pem(args.peer_trust, "--peer-trust")
                               if getattr(args, "peer_trust", None) else None)
        self.trust_pem = self.peer_trust_pem
        if self.trust_pem is None and args.server_cert:
            self.trust_pem = read_trust_pem(args.server_cert)


def read_uid_arg(value: object) -> str:
    """A UID argument; "-" reads it from stdin (one line).

    Any local user can read a process's command line (/proc/PID/cmdline)
    while it runs, and a uid is a capability: "-" keeps it off the line.
    """
    from ..values import parse_uid

    if value == UID_FROM_STDIN:
        value = sys.stdin.readline(200).strip()
    return parse_uid(value)


_UID_SHAPE = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_HEX = frozenset("0123456789abcdef")


def is_uid_prefix(text: str) -> bool:
    """Whether ``text`` (lower-case) is the start of a uid: hex, dashes where a uid has them."""
    if not 0 < len(text) < len(_UID_SHAPE):
        return False
    return all(c == "-" if s == "-" else c in _HEX for c, s in zip(text, _UID_SHAPE))


def read_uid_ref(value: object) -> str:
    """A UID argument naming an endpoint on this host: the whole uid, or a prefix of
    it (lower-case) that verbs resolve through the daemon; "-" reads it from stdin."""
    if value == UID_FROM_STDIN:
        value = sys.stdin.readline(200).strip()
    text = value.lower() if isinstance(value, str) else ""
    if is_uid_prefix(text):
        return text
    from ..values import parse_uid

    try:
        return parse_uid(value)
    except InvalidArgument:
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise InvalidArgument(
            f"uid {shown} is not a tunnel uid or the start of one: give the "
            "36-character uid printed by inbound-request, or its first characters "
            "(see 'scistreamctl list')"
        ) from None
