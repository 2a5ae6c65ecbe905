"""Unit tests of scistreamctl watch's pure parts: rates, the view model, its lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scistreamd.ctl.args import parse_args
from scistreamd.ctl.errors import CtlError
from scistreamd.ctl.watch import (
    View,
    brief_line,
    event_json,
    event_line,
    human_bytes,
    human_rate,
    rate,
    snake,
    table_rows,
)

UID_A = "2d2b1a5e-9a3c-4c1e-8f3e-0d3f4c1a7b21"
UID_B = "7f000001-0000-4000-8000-000000000001"
PATH_A = "/org/scistream/Tunnel1/endpoint/a_inbound"
PATH_B = "/org/scistream/Tunnel1/endpoint/b_outbound"


def props(uid: str, role: str, **kw) -> dict:
    return {"Uid": uid, "Role": role, "State": "active", "NRestarts": 0, **kw}


def test_snake() -> None:
    assert snake("BytesIn") == "bytes_in"
    assert snake("ConnectionsActive") == "connections_active"
    assert snake("NRestarts") == "n_restarts"
    assert snake("MainPID") == "main_pid"
    assert snake("State") == "state"


def test_rate() -> None:
    assert rate([], 10.0) is None
    assert rate([(10.0, 100)], 10.5) is None  # one sample: not known yet
    # 1000 bytes a second over the window
    samples = [(float(t), 1000 * t) for t in range(0, 11)]
    assert rate(samples, 10.2) == pytest.approx(1000)
    # the counter stopped: no signal for longer than IDLE_AFTER
    assert rate(samples, 14.0) == 0.0
    # two samples farther apart than the window: the one before the newest
    assert rate([(0.0, 0), (8.0, 800)], 8.1) == pytest.approx(100)
    # a counter that went down (a relay restarted) is no negative rate
    assert rate([(0.0, 500), (1.0, 100)], 1.0) == 0.0
    assert rate([(1.0, 5), (1.0, 9)], 1.0) is None  # no time between them


def test_view_snapshot_signals_and_filter() -> None:
    v = View()
    evs = v.snapshot({PATH_A: props(UID_A, "inbound"), PATH_B: props(UID_B, "outbound")}, 1.0)
    assert [(e[1], e[2]) for e in evs] == [("added", UID_A), ("added", UID_B)]
    # a counter change is an event (a line) but not one of the state events under the table
    evs = v.changed(PATH_A, {"BytesIn": 10}, 2.0)
    assert evs[0][1] == "changed" and len(v.events) == 2
    v.changed(PATH_A, {"State": "failed", "StateDetail": "relay exited"}, 3.0)
    assert v.events[-1][4] == {"State": "failed", "StateDetail": "relay exited"}
    assert v.changed("/unknown", {"State": "x"}, 3.0) == []
    # the same snapshot again: nothing; without B: B removed
    assert v.snapshot({PATH_A: dict(v.rows[PATH_A].props), PATH_B: v.rows[PATH_B].props},
                      4.0) == []
    evs = v.snapshot({PATH_A: dict(v.rows[PATH_A].props)}, 5.0)
    assert [(e[1], e[2]) for e in evs] == [("removed", UID_B)]
    # what was there at the start is not logged under the table; later additions are
    fresh = View()
    fresh.snapshot({PATH_A: props(UID_A, "inbound")}, 1.0, initial=True)
    assert not fresh.events
    fresh.snapshot({PATH_A: props(UID_A, "inbound"), PATH_B: props(UID_B, "outbound")}, 2.0)
    assert [e[2] for e in fresh.events] == [UID_B]
    assert brief_line(fresh.events[0]).endswith(f"{UID_B} outbound added state=active")
    # only the named tunnels
    only = View([UID_B[:8]])
    evs = only.snapshot({PATH_A: props(UID_A, "inbound"), PATH_B: props(UID_B, "outbound")},
                        1.0)
    assert [e[2] for e in evs] == [UID_B] and list(only.rows) == [PATH_B]


def test_rows_show_rates_bytes_and_connections() -> None:
    v = View()
    v.added(PATH_A, props(UID_A, "inbound", BytesIn=0, BytesOut=0, ConnectionsActive=0,
                          ConnectionsTotal=0), 0.0)
    for t in range(1, 4):
        v.changed(PATH_A, {"BytesIn": 125_000 * t, "BytesOut": 2048 * t,
                           "ConnectionsActive": 1, "ConnectionsTotal": 1}, float(t))
    (row,) = table_rows(v, 3.0)
    assert row[:3] == [UID_A, "inbound", "active"]
    assert row[3] == "1.0 Mbit/s" and row[4] == "16.4 kbit/s"
    assert row[5] == "366.2 KiB" and row[7] == "1/1"
    # before the counters exist (an older daemon): dashes, no error
    v2 = View()
    v2.added(PATH_B, props(UID_B, "outbound"), 0.0)
    assert table_rows(v2, 1.0)[0][3:8] == ["-", "-", "-", "-", "-"]


def test_lines() -> None:
    ev = (0.0, "changed", UID_A, "inbound", {"State": "failed", "StateDetail": "two words"})
    assert event_line(ev) == (f'1970-01-01T00:00:00Z {UID_A} inbound changed state=failed '
                              'state_detail="two words"')
    doc = json.loads(event_json(ev))
    assert doc == {"time": "1970-01-01T00:00:00Z", "event": "changed", "uid": UID_A,
                   "role": "inbound", "changes": {"state": "failed",
                                                  "state_detail": "two words"}}
    assert human_bytes(512) == "512 B" and human_bytes(None) == "-"
    assert human_rate(None) == "-" and human_rate(12) == "96 bit/s"


def test_watch_arguments() -> None:
    a = parse_args(["watch"])
    assert a.uid_refs == [] and a.interval == 2.0 and not a.poll
    a = parse_args(["watch", UID_A, "7f00", "--poll", "--interval", "0.5"])
    assert a.uid_refs == [UID_A, "7f00"] and a.poll and a.interval == 0.5
    for bad in ("0", "nan", "x", "99999"):
        with pytest.raises(CtlError, match="--interval"):
            parse_args(["watch", "--interval", bad])


def test_other_verbs_do_not_import_rich() -> None:
    code = ("import sys; from scistreamd.ctl.cli import main; main(['--version']); "
            "main(['list', '--timeout', '0.5']); "
            "print('rich' in sys.modules, 'scistreamd.ctl.watch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"SCISTREAM_BUS_ADDRESS": "unix:path=/nonexistent"}, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False False", out
