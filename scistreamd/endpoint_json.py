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
from typing import Any, Dict, Mapping, Optional

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
