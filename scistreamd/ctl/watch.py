"""scistreamctl watch: a live view of the endpoints, driven by scistreamd's signals.

Where the changes come from: InterfacesAdded/Removed and PropertiesChanged of
the endpoint objects (counters at most once a second per endpoint, states as
they happen), after one GetManagedObjects. The bus policy delivers these
signals only to root and group "scistream"; anyone else the daemon lets read
(polkit's org.scistream.tunnel1.inspect) gets the same view polled with
GetManagedObjects every --interval seconds, and the header says so. A restart
of scistreamd (NameOwnerChanged) is shown and the view re-read.

Output: on a terminal a table redrawn in place (python3-rich, imported only
here and only then; the alternate screen, restored on Ctrl-C/SIGTERM, exit 0);
otherwise one line per change ("TIME UID ROLE key=value ..."), or with --json
one JSON object per line.

The view model (:class:`View`, :func:`rate`) is pure and unit-tested.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import BUS_NAME, ENDPOINT_IFACE, ENDPOINT_PATH_PREFIX, MANAGER_PATH
from .bus import OBJECT_MANAGER_IFACE, PROPERTIES_IFACE, Client, plain, run_bus
from .verbs import match_uid

#: Seconds over which rates are averaged, and after which a counter that did
#: not move counts as idle (the daemon signals counters at most once a second).
RATE_WINDOW = 5.0
IDLE_AFTER = 3.5
#: Events kept under the table.
EVENT_LINES = 8
#: Properties that make an event line of their own (changes "as they happen").
STATE_PROPERTIES = ("State", "StateDetail", "NRestarts", "ClaimedBy", "TargetReachable",
                    "LastTargetFailure")
COUNTERS = ("BytesIn", "BytesOut", "ConnectionsActive", "ConnectionsTotal")
_SNAKE = {"NRestarts": "n_restarts", "StateDetail": "state_detail", "ClaimedBy": "claimed_by",
          "ClaimedAt": "claimed_at", "CreatedAt": "created_at", "NumConn": "num_conn",
          "AllowedPeer": "allowed_peer", "MainPID": "main_pid"}


def snake(name: str) -> str:
    """A D-Bus property name in the CLI's JSON key style (BytesIn -> bytes_in)."""
    if name in _SNAKE:
        return _SNAKE[name]
    out = []
    for i, c in enumerate(name):
        if c.isupper() and i:
            out.append("_")
        out.append(c.lower())
    return "".join(out)


def rate(samples: Sequence[Tuple[float, int]], now: float, window: float = RATE_WINDOW,
         idle_after: float = IDLE_AFTER) -> Optional[float]:
    """Units per second from (time, counter) samples, oldest first; None: not known yet.

    The counter moved from the oldest sample within ``window`` of the newest (or
    the one just before, if that is the newest itself) to the newest; a newest
    sample older than ``idle_after`` means the counter stopped: 0.
    """
    if not samples:
        return None
    t_last, v_last = samples[-1]
    if now - t_last > idle_after:
        return 0.0
    base = None
    for t, v in samples:
        if t >= t_last - window and t < t_last:
            base = (t, v)
            break
    if base is None:
        if len(samples) < 2:
            return None
        base = samples[-2]
    dt = t_last - base[0]
    return max(0.0, (v_last - base[1]) / dt) if dt > 0 else None


class Row:
    """What the view knows of one endpoint."""

    def __init__(self, path: str, props: Dict[str, Any]) -> None:
        self.path = path
        self.props: Dict[str, Any] = dict(props)
        self.samples: Dict[str, Deque[Tuple[float, int]]] = {
            "BytesIn": deque(maxlen=64), "BytesOut": deque(maxlen=64)}

    @property
    def uid(self) -> str:
        return str(self.props.get("Uid", ""))

    @property
    def role(self) -> str:
        return str(self.props.get("Role", ""))

    def sample(self, now: float) -> None:
        for key, dq in self.samples.items():
            value = self.props.get(key)
            if isinstance(value, int):
                dq.append((now, value))


Event = Tuple[float, str, str, str, Dict[str, Any]]  # time, kind, uid, role, values


class View:
    """The endpoints shown, updated from snapshots and signals (pure)."""

    def __init__(self, refs: Sequence[str] = ()) -> None:
        #: whole uids or prefixes to show; empty: all
        self.refs = tuple(refs)
        self.rows: Dict[str, Row] = {}
        self.events: Deque[Event] = deque(maxlen=EVENT_LINES)

    def wanted(self, props: Dict[str, Any]) -> bool:
        uid = str(props.get("Uid", ""))
        return not self.refs or any(uid.startswith(r) for r in self.refs)

    def _event(self, now: float, kind: str, row: Row, values: Dict[str, Any]) -> Event:
        ev = (now, kind, row.uid, row.role, values)
        if self._logging and (kind != "changed" or any(k in STATE_PROPERTIES for k in values)):
            self.events.append(ev)
        return ev

    _logging = True

    def snapshot(self, objects: Dict[str, Dict[str, Any]], now: float,
                 initial: bool = False) -> List[Event]:
        """A whole GetManagedObjects (endpoint path -> properties): the differences.
        ``initial``: what was there at the start is no event for the log under the table."""
        self._logging = not initial
        try:
            return self._snapshot(objects, now)
        finally:
            self._logging = True

    def _snapshot(self, objects: Dict[str, Dict[str, Any]], now: float) -> List[Event]:
        out = []
        for path in [p for p in self.rows if p not in objects]:
            out += self.removed(path, now)
        for path, props in sorted(objects.items()):
            if path in self.rows:
                row = self.rows[path]
                diff = {k: v for k, v in props.items() if row.props.get(k) != v}
                if diff:
                    out += self.changed(path, diff, now)
            else:
                out += self.added(path, props, now)
        return out

    def added(self, path: str, props: Dict[str, Any], now: float) -> List[Event]:
        if not self.wanted(props):
            return []
        row = self.rows[path] = Row(path, props)
        row.sample(now)
        return [self._event(now, "added", row, dict(props))]

    def changed(self, path: str, values: Dict[str, Any], now: float) -> List[Event]:
        row = self.rows.get(path)
        if row is None or not values:
            return []
        row.props.update(values)
        if any(k in row.samples for k in values):
            row.sample(now)
        return [self._event(now, "changed", row, dict(values))]

    def removed(self, path: str, now: float) -> List[Event]:
        row = self.rows.pop(path, None)
        return [] if row is None else [self._event(now, "removed", row, {})]

    def sorted_rows(self) -> List[Row]:
        return sorted(self.rows.values(), key=lambda r: (r.uid, r.role))


# ---------------------------------------------------------------------------
# Text


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def human_rate(r: Optional[float]) -> str:
    if r is None:
        return "-"
    bits = r * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000 or unit == "Gbit/s":
            return f"{bits:.0f} {unit}" if unit == "bit/s" else f"{bits:.1f} {unit}"
        bits /= 1000
    return "-"  # pragma: no cover


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


#: µs-since-the-epoch properties: ISO 8601 UTC in lines and JSON (null when 0).
TIME_PROPERTIES = frozenset({"CreatedAt", "ClaimedAt", "LastTargetFailureAt"})


def _shown(key: str, value: Any) -> Any:
    if key in TIME_PROPERTIES and isinstance(value, int):
        if value <= 0:
            return None
        t = time.gmtime(value / 1e6)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{value % 1_000_000:06d}Z"
    return value


def _value_text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ",".join(str(x) for x in v) or "-"
    text = str(v) if v != "" else "-"
    return text if " " not in text else json.dumps(text)


def event_line(ev: Event) -> str:
    """One line per change: TIME UID ROLE EVENT key=value ..."""
    t, kind, uid, role, values = ev
    parts = [_clock(t), uid, role, kind]
    parts += [f"{snake(k)}={_value_text(_shown(k, v))}" for k, v in sorted(values.items())]
    return " ".join(parts)


def brief_line(ev: Event) -> str:
    """An event under the table: the time of day and what changed in its state."""
    t, kind, uid, role, values = ev
    parts = [time.strftime("%H:%M:%S", time.localtime(t)), uid, role, kind]
    keys = ("State", "StateDetail") if kind == "added" else STATE_PROPERTIES
    parts += [f"{snake(k)}={_value_text(_shown(k, values[k]))}" for k in keys if k in values]
    return " ".join(parts)


def event_json(ev: Event) -> str:
    t, kind, uid, role, values = ev
    return json.dumps({"time": _clock(t), "event": kind, "uid": uid, "role": role,
                       "changes": {snake(k): _shown(k, v) for k, v in sorted(values.items())}})


def table_rows(view: View, now: float) -> List[List[str]]:
    rows = []
    for r in view.sorted_rows():
        p = r.props
        active, total = p.get("ConnectionsActive"), p.get("ConnectionsTotal")
        conns = "-" if active is None else f"{active}/{total if total is not None else '-'}"
        rows.append([r.uid, r.role, str(p.get("State", "-")),
                     human_rate(rate(r.samples["BytesIn"], now)),
                     human_rate(rate(r.samples["BytesOut"], now)),
                     human_bytes(p.get("BytesIn")), human_bytes(p.get("BytesOut")),
                     conns, str(p.get("NRestarts", "-")),
                     str(p.get("TargetReachable", "-") or "-")])
    return rows


HEADER = ("UID", "ROLE", "STATE", "IN/s", "OUT/s", "IN", "OUT", "CONNS", "RESTARTS",
          "TARGET")


# ---------------------------------------------------------------------------
# The bus side


def _in_scistream_group() -> bool:
    if os.geteuid() == 0:
        return True
    import grp

    try:
        gid = grp.getgrnam("scistream").gr_gid
    except KeyError:
        return False
    return gid == os.getegid() or gid in os.getgroups()


def _endpoint_objects(client: Client) -> Dict[str, Dict[str, Any]]:
    (objects,) = client.call("GetManagedObjects", interface=OBJECT_MANAGER_IFACE)
    return {path: props[ENDPOINT_IFACE] for path, props in objects.items()
            if path.startswith(ENDPOINT_PATH_PREFIX + "/") and ENDPOINT_IFACE in props}


_RULES = (
    f"type='signal',sender='{BUS_NAME}',interface='{PROPERTIES_IFACE}',"
    f"member='PropertiesChanged',path_namespace='{ENDPOINT_PATH_PREFIX}'",
    f"type='signal',sender='{BUS_NAME}',interface='{OBJECT_MANAGER_IFACE}',"
    f"path_namespace='{MANAGER_PATH}'",
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
)


def apply_signal(view: View, msg: Any, now: float) -> Tuple[List[Event], Optional[bool]]:
    """A signal's events; the second value: scistreamd came (True) or went (False)."""
    from jeepney import HeaderFields, MessageType

    h = msg.header
    if h.message_type != MessageType.signal:
        return [], None
    member = h.fields.get(HeaderFields.member)
    path = str(h.fields.get(HeaderFields.path, ""))
    body = msg.body
    if member == "NameOwnerChanged" and len(body) == 3 and body[0] == BUS_NAME:
        return [], bool(body[2])
    if member == "PropertiesChanged" and len(body) >= 2 and body[0] == ENDPOINT_IFACE:
        return view.changed(path, plain("a{sv}", body[1]), now), None
    if member == "InterfacesAdded" and len(body) == 2:
        ifaces = plain("a{sa{sv}}", body[1])
        if ENDPOINT_IFACE in ifaces:
            return view.added(str(body[0]), ifaces[ENDPOINT_IFACE], now), None
    if member == "InterfacesRemoved" and len(body) == 2 and ENDPOINT_IFACE in body[1]:
        return view.removed(str(body[0]), now), None
    return [], None


def _raise_stop(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: leave like Ctrl-C (terminal restored, exit 0)."""
    raise KeyboardInterrupt()


def watch(args: argparse.Namespace) -> None:
    refs = [r for r in args.uid_refs]
    polling = bool(args.poll) or not _in_scistream_group()
    interval = args.interval
    tty = sys.stdout.isatty() and not args.json
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stop)

    def work(client: Client) -> None:
        if not polling:
            for rule in _RULES:
                client.add_match(rule)
        objects = _endpoint_objects(client)
        uids = {str(p.get("Uid")) for p in objects.values()}
        view = View([match_uid(r, uids) for r in refs])
        mode = (f"polling every {interval:g} s (signals reach only root and group scistream)"
                if polling else "live (D-Bus signals)")
        out = _TableOut(mode) if tty else _LineOut(args.json)
        if tty and out.fallback:
            out = _LineOut(args.json)
        try:
            with out:
                out.emit(view.snapshot(objects, time.time(), initial=True), view, "")
                _loop(client, view, out, polling, interval, args.timeout)
        except KeyboardInterrupt:
            pass

    run_bus(args, work)


def _loop(client: Client, view: View, out: Any, polling: bool, interval: float,
          timeout: float) -> None:
    status = ""
    next_poll = time.monotonic() + interval
    while True:
        if polling:
            time.sleep(max(0.0, next_poll - time.monotonic()))
            next_poll = time.monotonic() + interval
            client.within(timeout)
            out.emit(view.snapshot(_endpoint_objects(client), time.time()), view, status)
            continue
        msg = client.next_message(1.0)
        if msg is None:
            out.emit([], view, status)  # rates age
            continue
        events, owner = apply_signal(view, msg, time.time())
        if owner is False:
            status = "scistreamd stopped: waiting for it (tunnels keep running)"
        elif owner is True:
            status = ""
            client.within(timeout)
            events = view.snapshot(_endpoint_objects(client), time.time())
        out.emit(events, view, status)


class _LineOut:
    fallback = False

    def __init__(self, as_json: bool) -> None:
        self._fmt: Callable[[Event], str] = event_json if as_json else event_line

    def __enter__(self) -> _LineOut:
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()

    def emit(self, events: Iterable[Event], view: View, status: str) -> None:
        wrote = False
        for ev in events:
            sys.stdout.write(self._fmt(ev) + "\n")
            wrote = True
        if wrote:
            sys.stdout.flush()


class _TableOut:
    """The table redrawn in place with python3-rich (imported here only)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        try:
            from rich.console import Console
            from rich.live import Live
        except ImportError:
            print("scistreamctl: python3-rich is not installed: printing one line per change",
                  file=sys.stderr)
            self.fallback = True
            return
        self.fallback = False
        self._console = Console()
        self._live = Live(console=self._console, auto_refresh=False, screen=True,
                          redirect_stdout=False, redirect_stderr=False)

    def __enter__(self) -> _TableOut:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)

    def emit(self, events: Iterable[Event], view: View, status: str) -> None:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = time.time()
        list(events)
        n = len(view.rows)
        title = (f"scistreamctl watch: {n} endpoint{'s' if n != 1 else ''}, {self.mode}, "
                 f"{time.strftime('%H:%M:%S')}; Ctrl-C quits")
        table = Table(*HEADER, box=None, header_style="bold", pad_edge=False)
        rows = table_rows(view, now)
        # What fits under the title, the header and the event lines (1000 endpoints
        # would otherwise be rendered every second only to be cut off).
        fit = max(1, self._console.height - 4 - len(view.events) - (1 if status else 0))
        shown = rows if len(rows) <= fit else rows[:fit - 1]
        for row in shown:
            table.add_row(*row)
        parts: List[Any] = [Text(title, style="bold")]
        if status:
            parts.append(Text(status, style="bold red"))
        parts.append(table if view.rows else Text("No endpoints."))
        if len(shown) < len(rows):
            parts.append(Text(f"... and {len(rows) - len(shown)} more: name tunnels "
                              "(scistreamctl watch UID...) or use a taller terminal"))
        parts.append(Text(""))
        parts += [Text(brief_line(ev)) for ev in view.events]
        self._live.update(Group(*parts), refresh=True)
