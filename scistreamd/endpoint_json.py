"""The JSON form of an endpoint (contract 2): CLI ``--json`` and the user API.

One pure function: D-Bus-style property names (Uid, StateDetail, CreatedAt,
...) to their snake_case (uid, state_detail, created_at, ...); timestamps
(µs since the epoch, properties ending in ``At``) become ISO 8601 UTC strings,
null when 0.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Dict, Mapping

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z0-9]+|[A-Z]+")


def snake(name: str) -> str:
    """StateDetail -> state_detail, NRestarts -> n_restarts, MainPID -> main_pid."""
    if name == "NRestarts":
        return "n_restarts"
    return "_".join(w.lower() for w in _WORD.findall(name))


def iso_time(usec: Any) -> Any:
    if not isinstance(usec, int) or isinstance(usec, bool) or usec <= 0:
        return None
    t = datetime.datetime.fromtimestamp(usec / 1e6, datetime.timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def endpoint_json(props: Mapping[str, Any]) -> Dict[str, Any]:
    """An endpoint's JSON document from its D-Bus property values."""
    out: Dict[str, Any] = {}
    for name, value in props.items():
        if name.endswith("At"):
            value = iso_time(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[snake(name)] = value
    return out
