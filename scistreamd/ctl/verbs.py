"""scistreamctl's verbs: each validates, calls scistreamd and returns
(human text, JSON-able data)."""

from __future__ import annotations

import argparse
import os
import sys

from .. import ENDPOINT_IFACE, ENDPOINT_PATH_PREFIX, MANAGER_IFACE
from ..errors import InvalidArgument, NotFound, ScistreamError
from .bus import OBJECT_MANAGER_IFACE, PROPERTIES_IFACE, Client, list_endpoints, run_bus
from .errors import EXIT_FAILED, EXIT_USAGE, CtlError, usage_error
from .output import (
    _s2cs_from_properties,
    format_list,
    format_request,
    format_status,
    target_warning,
)
from .plans import InboundPlan, OutboundPlan, read_uid_ref

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

    Output = Tuple[str, Any]  # (text, JSON data) of a verb


# ---------------------------------------------------------------------------
# Uids given by a prefix


def match_uid(ref: str, uids: Iterable[str]) -> str:
    """The one uid of ``uids`` that ``ref`` (a whole uid or a prefix) names."""
    if len(ref) == 36:
        return ref
    matches = sorted({u for u in uids if u.startswith(ref)})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(
            f"no tunnel on this host has a uid starting with {ref!r}: see 'scistreamctl list' "
            "for the tunnels this host has"
        )
    shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
    raise CtlError(
        f"uid prefix {ref!r} is ambiguous: {len(matches)} tunnels here start with it "
        f"({shown}): give more of the uid",
        EXIT_USAGE,
        "AmbiguousUid",
    )


def resolve(client: Client, ref: str) -> str:
    """A whole uid as is; a prefix through ListEndpoints (same connection)."""
    if len(ref) == 36:
        return ref
    return match_uid(ref, (row[0] for row in list_endpoints(client)))


# ---------------------------------------------------------------------------
# Requests


def _request_with_s2cs(
    client: Client, member: str, body: List[Any], need_s2cs: bool
) -> Tuple[List[Any], str]:
    if not need_s2cs:
        return client.call(member, body), ""
    # Pipelined: the property read rides along with the request, no extra round trip.
    req = client.send(member, body)
    props = client.send("GetAll", [MANAGER_IFACE], interface=PROPERTIES_IFACE)
    got = client.replies([req, props])
    reply = client.reply(req, got)
    try:
        (values,) = client.reply(props, got)
    except CtlError:
        # The tunnel exists now; a missing s2cs must not hide its uid.
        return reply, "-"
    return reply, _s2cs_from_properties(values)


def cmd_inbound(args: argparse.Namespace) -> Output:
    plan = InboundPlan(args)
    if plan.s2cs or args.remote:
        from . import remote

        target = remote.remote_side(args)
        if target is not None:
            return remote.inbound(target, plan)
    options: Dict[str, Any] = {}
    if plan.allowed_peer:
        options["allowed_peer"] = ("s", plan.allowed_peer)

    def work(client: Client) -> Tuple[Tuple[List[Any], str], Dict[str, Any]]:
        body = [plan.remote_ip, plan.ports, plan.num_conn, options]
        reply = _request_with_s2cs(client, "InboundRequest", body, plan.s2cs is None)
        return reply, _target_health(client, reply[0][1])

    ((uid, endpoint, listeners), s2cs), health = run_bus(args, work)
    s2cs = plan.s2cs or s2cs
    data = {"uid": uid, "role": "PROD", "s2cs": s2cs, "listeners": list(listeners),
            "endpoint": endpoint,
            "target_reachable": health.get("TargetReachable", "unknown")}
    warning = target_warning(health)
    if warning:
        # stderr: the three lines on stdout stay what scripts parse.
        print(f"scistreamctl: {warning}", file=sys.stderr)
        data["warnings"] = [warning[len("warning: "):]]
    return format_request(uid, s2cs, "PROD", listeners), data


def _target_health(client: Client, path: str) -> Dict[str, Any]:
    """TargetReachable and LastTargetFailure of a new endpoint ({} from an older daemon)."""
    health: Dict[str, Any] = {}
    serials = [client.send("Get", [ENDPOINT_IFACE, name], path=path,
                           interface=PROPERTIES_IFACE)
               for name in ("TargetReachable", "LastTargetFailure")]
    got = client.replies(serials)
    for name, serial in zip(("TargetReachable", "LastTargetFailure"), serials):
        try:
            (value,) = client.reply(serial, got)
        except CtlError:
            continue
        health[name] = value[1] if isinstance(value, tuple) else value
    return health


def cmd_outbound(args: argparse.Namespace) -> Output:
    plan = OutboundPlan(args)
    if plan.s2cs or args.remote:
        from . import remote

        target = remote.remote_side(args)
        if target is not None:
            return remote.outbound(target, plan)
    options: Dict[str, Any] = {}
    if plan.peer:
        options["peer"] = ("s", plan.peer)
    if plan.trust_pem is not None:
        options["trust_pem"] = ("s", plan.trust_pem)

    def work(client: Client) -> Tuple[List[Any], str]:
        body = [plan.uid, plan.listeners, plan.ports, plan.num_conn, options]
        return _request_with_s2cs(client, "OutboundRequest", body, plan.s2cs is None)

    (endpoint, listeners), s2cs = run_bus(args, work)
    s2cs = plan.s2cs or s2cs
    data = {"uid": plan.uid, "role": "CONS", "s2cs": s2cs, "listeners": list(listeners),
            "endpoint": endpoint}
    return format_request(plan.uid, s2cs, "CONS", listeners), data


# ---------------------------------------------------------------------------
# Endpoints by uid


def _call_on_uid(args: argparse.Namespace, member: str) -> str:
    """Call manager method ``member`` with the uid args.uid names (or a prefix of it)."""
    ref = read_uid_ref(args.uid)

    def call(client: Client) -> str:
        uid = resolve(client, ref)
        client.call(member, [uid])
        return uid

    return run_bus(args, call)


def _remote(args: argparse.Namespace) -> Any:
    """The remote side --s2cs names (imports remote mode only when asked for), or None."""
    if not (getattr(args, "s2cs", None) or getattr(args, "remote", False)):
        return None
    from . import remote

    return remote.remote_side(args)


def cmd_release(args: argparse.Namespace) -> Output:
    if args.all and args.uid:
        raise usage_error("give either UID or --all, not both", "release")
    if args.server_s2cs or args.client_s2cs:
        from . import remote

        return remote.release_both(args)
    target = _remote(args)
    if target is not None:
        from . import remote

        return remote.release(target, args)
    if args.all:
        count = run_bus(args, lambda client: int(client.call("ReleaseAll")[0]))
        noun = "endpoint" if count == 1 else "endpoints"
        return f"Released {count} {noun}.\n", {"released_count": count}
    if not args.uid:
        raise usage_error("give the UID to release, or --all", "release")
    uid = _call_on_uid(args, "Release")
    return f"Released {uid}.\n", {"released": [uid]}


def cmd_rearm(args: argparse.Namespace) -> Output:
    uid = _call_on_uid(args, "RearmEndpoint")
    return f"Re-armed {uid}: the next claim gets a new key.\n", {"rearmed": uid}


def cmd_list(args: argparse.Namespace) -> Output:
    target = _remote(args)
    if target is not None:
        from . import remote

        return remote.list_(target)
    from ..endpoint_json import endpoint_json

    def work(client: Client) -> Tuple[List[Any], List[Dict[str, Any]]]:
        # Both in one round trip: the list itself, and every endpoint's properties.
        rows = client.send("ListEndpoints")
        objects = client.send("GetManagedObjects", interface=OBJECT_MANAGER_IFACE)
        got = client.replies([rows, objects])
        (listed,) = client.reply(rows, got)
        try:
            (managed,) = client.reply(objects, got)
        except CtlError:
            managed = {}
        return listed, _endpoints_in(managed)

    rows, objects = run_bus(args, work)
    by_key = {(o.get("Uid"), o.get("Role")): o for o in objects}
    endpoints = []
    for uid, role, state, listeners in rows:
        # The list's own columns win (the properties may be of a moment later).
        props = dict(by_key.get((uid, role), {}))
        props.update(Uid=uid, Role=role, State=state, Listeners=list(listeners))
        endpoints.append(props)
    endpoints.sort(key=lambda e: (str(e["Uid"]), str(e["Role"])))
    return format_list(endpoints), [endpoint_json(e) for e in endpoints]


def endpoint_objects(client: Client) -> List[Dict[str, Any]]:
    """Every endpoint's properties (and its object Path), from GetManagedObjects."""
    (objects,) = client.call("GetManagedObjects", interface=OBJECT_MANAGER_IFACE)
    return _endpoints_in(objects)


def _endpoints_in(objects: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for path, ifaces in objects.items():
        props = ifaces.get(ENDPOINT_IFACE)
        if path.startswith(ENDPOINT_PATH_PREFIX + "/") and props is not None:
            out.append(dict(props, Path=path))
    return out


def _of_uid(ref: str, objects: List[Dict[str, Any]]) -> Tuple[str, List[Dict[str, Any]]]:
    uid = match_uid(ref, (str(o.get("Uid")) for o in objects))
    return uid, [o for o in objects if o.get("Uid") == uid]


def cmd_status(args: argparse.Namespace) -> Output:
    target = _remote(args)
    if target is not None:
        from . import remote

        return remote.status(target, args)
    ref = read_uid_ref(args.uid)
    uid, endpoints = _of_uid(ref, run_bus(args, endpoint_objects))
    if not endpoints:
        raise NotFound(
            f"no endpoint of tunnel {uid} on this host: see 'scistreamctl list' for the "
            "tunnels this host has"
        )
    endpoints.sort(key=lambda e: str(e.get("Role", "")))
    from ..endpoint_json import endpoint_json

    return format_status(endpoints), [endpoint_json(e) for e in endpoints]


# ---------------------------------------------------------------------------
# logs


def relay_units_in(lines: Sequence[str]) -> List[str]:
    """The relay units named by journal entries (journalctl -o json lines).

    The daemon's lines about a tunnel carry SCISTREAM_UNIT; anything that is
    not a relay unit name is ignored (journal fields are untrusted text).
    """
    import json

    from ..model import parse_relay_unit

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


def _units_of(endpoints: List[Dict[str, Any]]) -> List[str]:
    from ..model import parse_relay_unit

    units = set()
    for props in endpoints:
        try:
            units.add(parse_relay_unit(props.get("Unit")))
        except ScistreamError:
            continue
    return sorted(units)


def relay_units_from_daemon(args: argparse.Namespace, ref: str) -> Tuple[str, List[str]]:
    """The uid ``ref`` names and the Unit of each of its endpoints the daemon has now.

    A whole uid needs no daemon: if it cannot say (down, or the caller may read
    the journal but not the daemon), its journal lines still name the units. A
    prefix can only be resolved by the daemon.
    """
    try:
        objects = run_bus(args, endpoint_objects)
    except CtlError:
        if len(ref) != 36:
            raise
        return ref, []
    uid, endpoints = _of_uid(ref, objects)
    return uid, _units_of(endpoints)


def journalctl_argv(uid: str, follow: bool, lines: Optional[int], as_json: bool,
                    units: Sequence[str] = ()) -> List[str]:
    """journalctl for the daemon's lines about ``uid`` OR any line of its relay
    ``units`` (their own, and systemd's about them)."""
    argv = ["journalctl", f"SCISTREAM_UID={uid}"]
    for unit in units:
        argv += ["+", f"_SYSTEMD_UNIT={unit}", "+", f"UNIT={unit}"]
    argv += ["-o", "json" if as_json else "short-iso", "--no-pager"]
    if follow:
        argv.append("-f")
    if lines is not None:
        argv += ["-n", str(lines)]
    return argv


def cmd_logs(args: argparse.Namespace) -> Output:
    ref = read_uid_ref(args.uid)
    lines: Optional[int] = None
    if args.lines is not None:
        text = str(args.lines)
        if not text.isdigit() or len(text) > 9:
            raise InvalidArgument(f"-n {text!r} is not a number of lines: give 0 or more")
        lines = int(text)
    # Relay lines carry no uid (their fields are world-readable): find the
    # relay units from the daemon, and from its journal for released ones.
    uid, units = relay_units_from_daemon(args, ref)
    units = sorted(set(units) | set(relay_units_from_journal(uid)))
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


def cmd_watch(args: argparse.Namespace) -> Output:
    """Runs until Ctrl-C; prints as it goes (nothing left to print after)."""
    from .watch import watch  # python3-rich only for this verb, on a terminal

    args.uid_refs = [read_uid_ref(r) for r in args.uid_refs]
    watch(args)
    return "", None


def cmd_tunnel(args: argparse.Namespace) -> Output:
    from . import remote

    return remote.tunnel(args)


VERBS = {
    "inbound-request": cmd_inbound,
    "outbound-request": cmd_outbound,
    "tunnel": cmd_tunnel,
    "release": cmd_release,
    "rearm": cmd_rearm,
    "list": cmd_list,
    "status": cmd_status,
    "logs": cmd_logs,
    "watch": cmd_watch,
}
