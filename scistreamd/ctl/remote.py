"""scistreamctl's remote mode: verbs sent to a daemon's user API, and ``tunnel``.

Which daemon a verb goes to: ``--s2cs HOST:PORT`` naming another host's
daemon -> its user API (userclient.UserClient, HTTPS with a token and/or a
client certificate). No ``--s2cs``, or one naming this host's own daemon (an
address of this host and the peer port its daemon reports) -> D-Bus, as
before. ``--remote`` forces the user API (a user with a token but no local
permission). ``requests`` is imported only once a verb goes remote.

A *side* is one daemon as seen from here, local (D-Bus) or remote (user
API), with the same five calls; ``tunnel`` and the two-daemon ``release``
work on two sides and do not care which kind each is.
"""

from __future__ import annotations

import argparse
import socket
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .. import MANAGER_IFACE
from ..errors import NotFound, ScistreamError
from ..values import HostPort, parse_hostport
from .errors import CtlError, _one_line, usage_error
from .output import format_request_rows

if TYPE_CHECKING:
    from ..values import IPAddress

Output = Tuple[str, Any]


# ---------------------------------------------------------------------------
# Which daemon


def is_this_host(ip: IPAddress) -> bool:
    """Whether ``ip`` is an address of this host: binding a socket to it works only then.
    (Wildcard and loopback addresses count as this host.)"""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:  # EADDRNOTAVAIL above all; no IPv6 here: not this host either
        return False
    return True


def own_peer_port(args: argparse.Namespace) -> Optional[int]:
    """The peer port this host's daemon reports (anyone may read it); None when the bus
    cannot say (the daemon is down: the D-Bus path then says so)."""
    from .bus import PROPERTIES_IFACE, run_bus

    def get(client: Any) -> Any:
        (value,) = client.call("Get", [MANAGER_IFACE, "PeerPort"], interface=PROPERTIES_IFACE)
        return value

    try:
        value = run_bus(args, get)
    except CtlError:
        return None
    return value if isinstance(value, int) else None


def daemon_of(args: argparse.Namespace, value: Optional[str], option: str = "--s2cs"
              ) -> Optional[HostPort]:
    """The daemon to call through its user API, or None: this host's own, over D-Bus."""
    if not value:
        if getattr(args, "remote", False):
            raise usage_error(f"--remote needs {option} HOST:PORT naming the daemon")
        return None
    hp = parse_hostport(value, option)
    if getattr(args, "remote", False) or not is_this_host(hp.host):
        return hp
    port = own_peer_port(args)
    return None if port is None or port == hp.port else hp


# ---------------------------------------------------------------------------
# Sides


class LocalSide:
    """This host's daemon over D-Bus."""

    def __init__(self, args: argparse.Namespace, s2cs: str) -> None:
        self.args, self.s2cs = args, s2cs
        self.access_token = "INVALID_TOKEN"

    def __str__(self) -> str:
        return self.s2cs

    def _run(self, work: Any) -> Any:
        from .bus import run_bus

        return run_bus(self.args, work)

    def inbound(self, remote_ip: str, ports: Sequence[int], num_conn: int,
                allowed_peer: str, early: bool = False) -> Dict[str, Any]:
        options: Dict[str, Any] = {"allowed_peer": ("s", allowed_peer)} if allowed_peer else {}
        if early:
            options["early"] = ("b", True)
        uid, endpoint, listeners = self._run(lambda c: c.call(
            "InboundRequest", [remote_ip, list(ports), num_conn, options]))
        # Early: maybe still starting (the reply does not say; WaitStarted answers at once
        # when the start is over).
        return {"uid": uid, "listeners": list(listeners), "endpoint": endpoint,
                "starting": early}

    def outbound(self, uid: str, listeners: Sequence[str], ports: Sequence[int], num_conn: int,
                 peer: Optional[str], trust_pem: Optional[str]) -> Dict[str, Any]:
        options: Dict[str, Any] = {}
        if peer:
            options["peer"] = ("s", peer)
        if trust_pem is not None:
            options["trust_pem"] = ("s", trust_pem)
        endpoint, local = self._run(lambda c: c.call(
            "OutboundRequest", [uid, list(listeners), list(ports), num_conn, options]))
        return {"listeners": list(local), "endpoint": endpoint}

    def release(self, uid: str) -> int:
        self._run(lambda c: c.call("Release", [uid]))
        return 1

    def wait_started(self, uid: str) -> Optional[Dict[str, Any]]:
        """Once the early start of inbound ``uid`` is over (its failure raised)."""
        self._run(lambda c: c.call("WaitStarted", [uid]))
        return None

    def warm(self) -> None:
        """Nothing to open ahead: each D-Bus call makes its own local connection."""


class RemoteSide:
    """Another daemon's user API."""

    def __init__(self, args: argparse.Namespace, daemon: HostPort) -> None:
        from ..userclient import UserClient
        from .credentials import find_token
        from .plans import read_trust_pem

        token = find_token(getattr(args, "token_file", None))
        self.access_token = token.redacted() if token else "INVALID_TOKEN"
        trust = read_trust_pem(args.server_cert) if getattr(args, "server_cert", None) else None
        cert = getattr(args, "client_cert", None)
        key = getattr(args, "client_key", None)
        if key and not cert:
            raise usage_error("--client-key needs --client-cert")
        from pathlib import Path

        self.client = UserClient(daemon, token=token.value if token else None, trust_pem=trust,
                                 client_cert=Path(cert) if cert else None,
                                 client_key=Path(key) if key else None, timeout=args.timeout)
        self.s2cs = str(daemon)

    def __str__(self) -> str:
        return self.s2cs

    def inbound(self, remote_ip: str, ports: Sequence[int], num_conn: int,
                allowed_peer: str, early: bool = False) -> Dict[str, Any]:
        got = self.client.create_inbound(remote_ip, ports, num_conn, allowed_peer, early)
        got["starting"] = got["endpoint"].get("state") == "starting"
        return got

    def outbound(self, uid: str, listeners: Sequence[str], ports: Sequence[int], num_conn: int,
                 peer: Optional[str], trust_pem: Optional[str]) -> Dict[str, Any]:
        return self.client.create_outbound(uid, listeners, num_conn, ports, peer, trust_pem)

    def release(self, uid: str) -> int:
        return self.client.release(uid)

    def wait_started(self, uid: str) -> Optional[Dict[str, Any]]:
        """The inbound endpoint once its early start is over (its failure raised)."""
        got = [e for e in self.client.wait_started(uid) if e.get("role") == "inbound"]
        return got[0] if got else None

    def warm(self) -> None:
        """Open the connection of the next call now (see UserClient.warm)."""
        self.client.warm()

    def list(self) -> List[Dict[str, Any]]:
        return self.client.list()

    def status(self, uid: str) -> List[Dict[str, Any]]:
        return self.client.status(uid)


def remote_side(args: argparse.Namespace, option: str = "--s2cs") -> Optional[RemoteSide]:
    """The remote side ``option`` names, or None (this host's daemon: D-Bus)."""
    value = getattr(args, option.lstrip("-").replace("-", "_"), None)
    daemon = daemon_of(args, value, option)
    return RemoteSide(args, daemon) if daemon is not None else None


def side(args: argparse.Namespace, option: str) -> Any:
    value = getattr(args, option.lstrip("-").replace("-", "_"))
    daemon = daemon_of(args, value, option)
    if daemon is None:
        return LocalSide(args, str(parse_hostport(value, option)))
    return RemoteSide(args, daemon)


class Ahead:
    """A side made in a daemon thread while the caller does something else (waits
    for another daemon), and its connection opened (``warm``) once it is made.
    :meth:`result` waits for the side only, never for the connection: the call
    that needs it opens its own if the one ahead is not ready, and reports any
    failure itself. ``warm=False``: any call's result, nothing opened after it."""

    def __init__(self, make: Any, warm: bool = True) -> None:
        self._made = threading.Event()
        self._side: Any = None
        self._error: Optional[BaseException] = None
        threading.Thread(target=self._run, args=(make, warm), name="ahead",
                         daemon=True).start()

    def _run(self, make: Any, warm: bool) -> None:
        try:
            self._side = make()
        except BaseException as err:  # raised in the caller's thread by result()
            self._error = err
        finally:
            self._made.set()
        if warm and self._side is not None:
            self._side.warm()

    def result(self) -> Any:
        self._made.wait()
        if self._error is not None:
            raise self._error
        return self._side


# ---------------------------------------------------------------------------
# Verbs on one remote daemon


def inbound(remote: RemoteSide, plan: Any) -> Output:
    got = remote.inbound(plan.remote_ip, plan.ports, plan.num_conn, plan.allowed_peer)
    data = {"uid": got["uid"], "role": "PROD", "s2cs": remote.s2cs,
            "access_token": remote.access_token, "listeners": got["listeners"],
            "endpoint": got["endpoint"]}
    return format_request_rows(got["uid"], [(remote.s2cs, remote.access_token, "PROD")],
                          got["listeners"]), data


def outbound(remote: RemoteSide, plan: Any) -> Output:
    got = remote.outbound(plan.uid, plan.listeners, plan.ports, plan.num_conn, plan.peer,
                          plan.peer_trust_pem)
    data = {"uid": plan.uid, "role": "CONS", "s2cs": remote.s2cs,
            "access_token": remote.access_token, "listeners": got["listeners"],
            "endpoint": got["endpoint"]}
    return format_request_rows(plan.uid, [(remote.s2cs, remote.access_token, "CONS")],
                          got["listeners"]), data


def _resolve(remote: RemoteSide, ref: str) -> str:
    if len(ref) == 36:
        return ref
    from .verbs import match_uid

    return match_uid(ref, (e["uid"] for e in remote.list()))


def release(remote: RemoteSide, args: argparse.Namespace) -> Output:
    from .plans import read_uid_ref

    if args.all:
        uids = sorted({e["uid"] for e in remote.list()})
        count, failures = 0, []
        for uid in uids:
            try:
                count += remote.release(uid)
            except ScistreamError as err:
                if not _not_found(err):  # else: released meanwhile
                    failures.append(f"{uid}: {err}")
        if failures:
            raise ScistreamError(f"released {count} endpoints at {remote}, but not: "
                                 + "; ".join(failures))
        noun = "endpoint" if count == 1 else "endpoints"
        return f"Released {count} {noun} at {remote}.\n", {"released_count": count,
                                                           "s2cs": remote.s2cs}
    uid = _resolve(remote, read_uid_ref(args.uid))
    n = remote.release(uid)
    return f"Released {uid} at {remote}.\n", {"released": [uid], "s2cs": remote.s2cs,
                                              "released_count": n}


def list_(remote: RemoteSide) -> Output:
    from .output import format_list

    # The same table and JSON as over D-Bus: the answer is endpoint JSON already.
    endpoints = sorted(remote.list(), key=lambda e: (str(e.get("uid")), str(e.get("role"))))
    return format_list([dbus_style(e) for e in endpoints]), endpoints


#: endpoint JSON keys whose D-Bus property name is not their CamelCase.
_PROPERTY_NAMES = {"main_pid": "MainPID"}


def dbus_style(endpoint: Dict[str, Any]) -> Dict[str, Any]:
    """Endpoint JSON (contract 2) back to D-Bus property names and values, for the
    same ``status`` text as over D-Bus (timestamps as µs since the epoch, 0 = never)."""
    out: Dict[str, Any] = {}
    for key, value in endpoint.items():
        name = _PROPERTY_NAMES.get(key) or "".join(w[:1].upper() + w[1:]
                                                    for w in str(key).split("_"))
        if key.endswith("_at") and (value is None or isinstance(value, str)):
            value = _iso_to_us(value)
        out[name] = value
    return out


def _iso_to_us(value: Optional[str]) -> Any:
    if not value:
        return 0
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value  # shown as is
    return int(when.timestamp() * 1_000_000)


def status(remote: RemoteSide, args: argparse.Namespace) -> Output:
    from .output import format_status
    from .plans import read_uid_ref

    uid = _resolve(remote, read_uid_ref(args.uid))
    endpoints = remote.status(uid)
    if not endpoints:
        raise NotFound(f"scistreamd at {remote} has no endpoint of tunnel {uid} of yours")
    endpoints.sort(key=lambda e: str(e.get("role", "")))
    return format_status([dbus_style(e) for e in endpoints]), endpoints


# ---------------------------------------------------------------------------
# Two daemons: tunnel, release


def _ports(values: Optional[Sequence[str]], option: str) -> List[int]:
    from ..values import parse_port_list
    from .plans import _items

    return list(parse_port_list(_items(values), option, min_len=0))


def tunnel(args: argparse.Namespace) -> Output:
    from ..values import parse_allowed_peer, parse_ip, parse_port_list
    from .plans import _count, _items, read_trust_pem

    remote_ip = str(parse_ip(args.remote_ip, "--remote_ip"))
    ports = list(parse_port_list(_items(args.receiver_ports), "--receiver_ports"))
    num_conn = _count(args.num_conn, "--num_conn")
    local_ports = _ports(args.local_ports, "--local-ports")
    server_hp = parse_hostport(args.server_s2cs, "--server-s2cs")
    client_hp = parse_hostport(args.client_s2cs, "--client-s2cs")
    if server_hp.host.is_loopback and not client_hp.host.is_loopback:
        # The client side claims the key from this address: its own loopback there.
        raise usage_error(f"--server-s2cs {server_hp} is a loopback address, which the client "
                          "side's daemon cannot reach the server side at: give an address it "
                          "can reach", "tunnel")
    # Only the client side's daemon may claim the key: its certificate lists the
    # address it is reached at (the user API verifies exactly that); a loopback or
    # wildcard name of it says nothing about its certificate, so no default then.
    default = "" if (client_hp.host.is_loopback or client_hp.host.is_unspecified) \
        else str(client_hp.host)
    allowed = parse_allowed_peer(args.allowed_peer or default, "--allowed-peer") \
        if (args.allowed_peer or default) else ""
    peer_trust = read_trust_pem(args.peer_trust, "--peer-trust") if args.peer_trust else None
    server = side(args, "--server-s2cs")
    # The client side is made ready while the server side's daemon creates its half
    # (mostly its relay's start): which daemon it is (a D-Bus question when it names
    # this host) and the TLS connection to it are then not on the way. Made here
    # first when the server side is this host's: a remote side's construction reads
    # the options (token, certificates) that only a remote server side has checked.
    if isinstance(server, RemoteSide):
        ahead = Ahead(lambda: side(args, "--client-s2cs"))
    else:
        first = side(args, "--client-s2cs")
        ahead = Ahead(lambda: first)
    # Early: the server side answers while its relay starts, and the client side
    # claims the key and starts its own relay meanwhile; the end of the server side's
    # start is awaited beside it (wait_started), and its failure rolls both halves back.
    made = server.inbound(remote_ip, ports, num_conn, allowed, early=True)
    uid = made["uid"]
    client: Any = None
    outbound_made = False
    # Asked at once, in a thread: the server relay's start is mostly over before the
    # client side's half is, and its answer is then waiting (one round trip less).
    started = Ahead(lambda: server.wait_started(uid), warm=False) \
        if made.get("starting") else None
    try:
        client = ahead.result()
        # The client side claims from the server side's peer port: the address named.
        out = client.outbound(uid, made["listeners"], local_ports, num_conn, str(server_hp),
                              peer_trust)
        outbound_made = True
        if started is not None:
            made["endpoint"] = started.result() or made["endpoint"]
    except BaseException as err:  # also Ctrl-C: nothing may stay behind
        extra = _roll_back(uid, server, client, str(client_hp), outbound_made)
        if not isinstance(err, ScistreamError):
            raise
        # Whole, not cut to one line's length: the end may say how to clean up.
        text = err.message if isinstance(err, CtlError) else _one_line(str(err))
        raise CtlError(text + extra, err.exit_code, err.name) from None
    rows = [(str(server), server.access_token, "PROD"), (str(client), client.access_token,
                                                          "CONS")]
    data = {"uid": uid, "listeners": out["listeners"],
            "server": {"s2cs": str(server), "access_token": server.access_token,
                       "listeners": made["listeners"], "endpoint": made["endpoint"]},
            "client": {"s2cs": str(client), "access_token": client.access_token,
                       "listeners": out["listeners"], "endpoint": out["endpoint"]}}
    return format_request_rows(uid, rows, out["listeners"]), data


def _roll_back(uid: str, server: Any, client: Any, client_name: str,
               outbound_made: bool = False) -> str:
    """Release ``uid`` on the client side (a request that timed out here may still have
    been made there; None: never made, nothing asked there) and on the server side;
    what to add to the failure's message. ``outbound_made``: the client side's half was
    made, and the server side's relay start is what failed."""
    left = []
    for where in (client, server):
        if where is None:
            continue
        try:
            where.release(uid)
        except (ScistreamError, OSError) as err:
            if _not_found(err):
                continue
            if where is client and _unreachable(err):
                continue  # never reached: nothing was made there
            left.append(f"{where}: {_one_line(str(err), 160)}")
    if left:
        # The command comes last: it is what the user needs from this line.
        return (f" -- and releasing tunnel {uid} failed ({'; '.join(left)}): release it with "
                f"'scistreamctl release {uid} --server-s2cs {server} --client-s2cs "
                f"{client_name}'")
    if outbound_made:
        return (f" (the inbound half of tunnel {uid} at {server} did not start; its outbound "
                f"half at {client} was released: nothing is left)")
    return (f" (the outbound half of tunnel {uid} failed; its inbound half at {server} "
            "was released: nothing is left)")


def _unreachable(err: BaseException) -> bool:
    return getattr(err, "exit_code", None) == 10 or getattr(err, "name", "") in (
        "DaemonUnreachable", "Timeout")


def release_both(args: argparse.Namespace) -> Output:
    from .plans import read_uid_arg

    if args.all or not args.uid:
        raise usage_error("give the UID to release on both daemons (--all works with one "
                          "daemon only)", "release")
    if getattr(args, "s2cs", None):
        raise usage_error("give either --s2cs or --server-s2cs and --client-s2cs", "release")
    if not (args.server_s2cs and args.client_s2cs):
        raise usage_error("name both daemons: --server-s2cs and --client-s2cs", "release")
    uid = read_uid_arg(args.uid)
    done: Dict[str, int] = {}
    failures: List[ScistreamError] = []
    for option in ("--client-s2cs", "--server-s2cs"):
        try:
            where = side(args, option)
            done[str(where)] = where.release(uid)
        except ScistreamError as err:
            if _not_found(err):
                done[getattr(args, option[2:].replace("-", "_"))] = 0
            else:
                failures.append(err)
    if failures:
        if len(failures) == 1:
            raise failures[0]
        raise ScistreamError("; ".join(str(f) for f in failures))
    if not any(done.values()):
        raise NotFound(f"neither daemon has tunnel {uid} ({', '.join(done)}): check the uid")
    where_text = " and ".join(f"{s2cs}" for s2cs, n in done.items() if n)
    return f"Released {uid} at {where_text}.\n", {"released": [uid], "s2cs": done}


def _not_found(err: BaseException) -> bool:
    """NotFound from either side (over D-Bus it arrives as a CtlError of that name)."""
    return isinstance(err, NotFound) or getattr(err, "name", "") == NotFound.name
