"""The JSON of an endpoint, built once (scistreamctl --json, the user API).

Input: the Endpoint's D-Bus properties by their D-Bus names (as GetAll or
GetManagedObjects give them; dbus-next or jeepney Variants are unwrapped).
Output: the same values under snake_case keys (``NRestarts`` ->
``n_restarts``, ``MainPID`` -> ``main_pid``), timestamps (properties named
``...At``, µs since the epoch) as ISO 8601 UTC strings or null for 0 ("never"),
and nothing of D-Bus itself (no object path, no signatures). A property a
newer daemon adds comes out by the same rules.

Pure and cheap to import.
"""

from __future__ import annotations

import re

from .interface import COUNTER_PROPERTIES

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # the CLI imports this module: no typing, model, traffic at run time
    from typing import Any, Dict, Mapping, Optional

    from .model import Endpoint
    from .traffic import Traffic

#: D-Bus-only keys callers may have added (scistreamctl adds the object Path).
_INTERNAL = frozenset({"Path"})
_WORD = re.compile(r"([a-z0-9])([A-Z])|([A-Z])([A-Z][a-z])")


def snake_case(name: str) -> str:
    """``StateDetail`` -> ``state_detail``; ``NRestarts`` -> ``n_restarts``; ``MainPID`` ->
    ``main_pid``."""
    return _WORD.sub(lambda m: (f"{m.group(1)}_{m.group(2)}" if m.group(1)
                                else f"{m.group(3)}_{m.group(4)}"), name).lower()


def iso_time_us(value: Any) -> Optional[str]:
    """µs since the epoch as ISO 8601 UTC (``2026-12-03T10:43:45.123Z``); None for 0/never."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    from datetime import datetime, timezone

    try:
        t = datetime.fromtimestamp(value / 1e6, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    # A Variant of either library: the value it wraps.
    if hasattr(value, "signature") and hasattr(value, "value"):
        return _plain(value.value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def is_time_property(name: str) -> bool:
    return name.endswith("At") and name[:-2][-1:].islower()


def endpoint_json(props: Mapping[str, Any]) -> Dict[str, Any]:
    """The endpoint's JSON object from its D-Bus-named properties."""
    out: Dict[str, Any] = {}
    for name, raw in props.items():
        if name in _INTERNAL:
            continue
        value = _plain(raw)
        if is_time_property(name):
            value = iso_time_us(value)
        out[snake_case(name)] = value
    return out


def usec(t: float) -> int:
    """Seconds since the epoch as the API's µs (0 = never)."""
    return int(t * 1_000_000) if t > 0 else 0


def counter_values(t: Traffic) -> Dict[str, Any]:
    """The counter properties' values (rates as whole bytes per second)."""
    return {prop: (int(getattr(t, f)) if isinstance(getattr(t, f), float) else getattr(t, f))
            for prop, f in COUNTER_PROPERTIES}


def endpoint_properties(ep: Endpoint, traffic: Optional[Traffic] = None) -> Dict[str, Any]:
    """Every property of an endpoint's D-Bus object, by D-Bus name, as dbus_api exports
    them (the user API answers with the same; a unit test holds the two together)."""
    props: Dict[str, Any] = {
        "Uid": ep.uid, "Role": ep.role.value, "State": ep.state.value,
        "StateDetail": ep.detail, "Listeners": [str(h) for h in ep.listeners],
        "Targets": [str(h) for h in ep.targets], "NumConn": ep.num_conn,
        "Unit": ep.unit, "CreatedAt": usec(ep.created_at), "NRestarts": ep.n_restarts,
        "ClaimedBy": ep.claimed_by, "ClaimedAt": usec(ep.claimed_at),
        "Peer": str(ep.peer) if ep.peer else "", "AllowedPeer": ep.allowed_peer,
        "Owner": ep.owner, "KeyGeneration": ep.key_generation}
    if traffic is not None:
        props.update(counter_values(traffic))
    return props
