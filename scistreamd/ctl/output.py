"""scistreamctl's output: the guide's three lines, tables, key-value blocks (pure).

JSON output is the verbs' data as is (main prints it); these are the texts.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence


def format_request(uid: str, s2cs: str, role: str, listeners: Sequence[str],
                   access_token: str = "INVALID_TOKEN") -> str:
    """The three lines s2uc printed; scripts and notes parse them. ``access_token``:
    INVALID_TOKEN without a token, else its redacted form (never the token)."""
    return format_request_rows(uid, [(s2cs, access_token, role)], listeners)


def format_request_rows(uid: str, rows: Sequence[Sequence[str]],
                        listeners: Sequence[str]) -> str:
    """The same with a row (s2cs, access_token, role) per side (``tunnel``: PROD, CONS)."""
    lines = ["uid; s2cs; access_token; role"]
    lines += [f"{uid} {s2cs} {token} {role}" for s2cs, token, role in rows]
    lines.append(f"Listeners: {list(listeners)!r}")
    return "\n".join(lines) + "\n"


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
    "Owner",
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


def _s2cs_from_properties(props: Dict[str, Any]) -> str:
    addr = props.get("ListenAddress")
    port = props.get("PeerPort")
    if not isinstance(addr, str) or not addr or not isinstance(port, int):
        return "-"
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


