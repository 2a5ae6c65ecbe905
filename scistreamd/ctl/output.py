"""scistreamctl's output: the guide's three lines, tables, key-value blocks (pure).

JSON output is the verbs' data as is (main prints it); these are the texts.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Any, Dict, Optional, Sequence


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


def format_bytes(n: Any) -> str:
    """A byte count for people: ``0 B``, ``1.5 KiB``, ``9.54 MiB``, ``1.20 GiB``."""
    if not isinstance(n, int) or n < 0:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(bytes_per_s: Any) -> str:
    """A rate for people in bits per second (as links are sold): ``0 bit/s``, ``812 Mbit/s``."""
    if not isinstance(bytes_per_s, (int, float)) or bytes_per_s < 0:
        return "-"
    bits = bytes_per_s * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000 or unit == "Gbit/s":
            return f"{bits:.0f} {unit}" if unit == "bit/s" or bits >= 100 else f"{bits:.3g} {unit}"
        bits /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def format_age(seconds: Any) -> str:
    """A duration, two units at most: ``42s``, ``5m03s``, ``2h05m``, ``3d04h``."""
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def age_of(created_us: Any, now: float) -> str:
    if not isinstance(created_us, int) or created_us <= 0:
        return "-"
    return format_age(max(0.0, now - created_us / 1e6))


def peer_of(props: Dict[str, Any]) -> str:
    """The other gateway: an outbound endpoint's peer daemon, or who claimed an
    inbound endpoint's key (its address; ClaimedBy goes on with the certificate)."""
    peer = props.get("Peer")
    if isinstance(peer, str) and peer:
        return peer
    claimed = props.get("ClaimedBy")
    if isinstance(claimed, str) and claimed:
        addr = claimed.split()[0]  # "IP:PORT cert ...": the claimant's address
        if addr.startswith("[") and "]" in addr:
            return addr[1:addr.index("]")]
        return addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr
    return "-"


def format_list(endpoints: Sequence[Dict[str, Any]], now: Optional[float] = None) -> str:
    """One line per endpoint, from its properties (D-Bus names)."""
    if not endpoints:
        return "No endpoints.\n"
    import time

    now = time.time() if now is None else now
    rows = []
    for e in endpoints:
        conns = e.get("ConnectionsActive")
        rows.append((
            str(e.get("Uid", "-")), str(e.get("Role", "-")), str(e.get("State", "-")),
            age_of(e.get("CreatedAt"), now),
            f"{format_bytes(e.get('BytesIn'))}/{format_bytes(e.get('BytesOut'))}".replace(" ", ""),
            str(conns) if isinstance(conns, int) else "-",
            peer_of(e),
            ",".join(e.get("Listeners") or []) or "-",
        ))
    return format_table(rows, ("UID", "ROLE", "STATE", "AGE", "IN/OUT", "CONNS", "PEER",
                               "LISTENERS"))


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
#: What the relay is doing (and the key's generation, whose long name would
#: widen the lines above): shown after those, aligned among themselves (the
#: lines above keep their layout: scripts and notes match them).
COUNTER_ORDER = (
    "KeyGeneration",
    "MainPID",
    "MemoryCurrent",
    "BytesIn",
    "BytesOut",
    "RateIn",
    "RateOut",
    "ConnectionsActive",
    "ConnectionsTotal",
    "TargetReachable",
    "TargetFailures",
    "LastTargetFailure",
    "LastTargetFailureAt",
)
_TIME_PROPERTIES = frozenset({"CreatedAt", "ClaimedAt", "LastTargetFailureAt"})
_BYTE_PROPERTIES = frozenset({"BytesIn", "BytesOut", "MemoryCurrent"})
_RATE_PROPERTIES = frozenset({"RateIn", "RateOut"})


def _show_value(key: str, value: Any, now: float) -> str:
    if key in _TIME_PROPERTIES:
        text = format_time_us(value)
        if key == "CreatedAt" and text != "never":
            text += f" ({age_of(value, now)} ago)"
        return text
    if key in _BYTE_PROPERTIES and isinstance(value, int):
        return format_bytes(value) if value < 1024 else f"{format_bytes(value)} ({value} B)"
    if key in _RATE_PROPERTIES and isinstance(value, int):
        return f"{format_rate(value)} (last 5 s)"
    if key == "MainPID" and value == 0:
        return "- (not running)"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    if value == "" or value is None:
        return "-"
    return str(value)


def format_status(endpoints: Sequence[Dict[str, Any]], now: Optional[float] = None) -> str:
    import time

    now = time.time() if now is None else now
    blocks = []
    for props in endpoints:
        keys = [k for k in STATUS_ORDER if k in props]
        keys += sorted(k for k in props
                       if k not in STATUS_ORDER and k not in COUNTER_ORDER and k != "Path")
        counters = [k for k in COUNTER_ORDER if k in props]
        width = max(len(k) for k in keys + ["Path"]) + 1
        lines = [f"{(k + ':').ljust(width)} {_show_value(k, props[k], now)}" for k in keys]
        if counters:
            cwidth = max(len(k) for k in counters) + 1
            lines += [f"{(k + ':').ljust(cwidth)} {_show_value(k, props[k], now)}"
                      for k in counters]
        if "Path" in props:
            lines.append(f"{'Path:'.ljust(width)} {props['Path']}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def target_warning(props: Dict[str, Any]) -> str:
    """The warning an inbound request prints when its target does not accept (or "")."""
    if props.get("TargetReachable") != "no":
        return ""
    why = props.get("LastTargetFailure")
    if not isinstance(why, str) or not why:
        why = "nothing accepts connections at the target yet: start the server application"
    return f"warning: {why}"


def _s2cs_from_properties(props: Dict[str, Any]) -> str:
    addr = props.get("ListenAddress")
    port = props.get("PeerPort")
    if not isinstance(addr, str) or not addr or not isinstance(port, int):
        return "-"
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


