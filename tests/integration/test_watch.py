"""scistreamctl watch on the real test bed (issue 13, item 3).

On a terminal: watch runs in a tmux session inside server2 while iperf3 sends
through a tunnel; the screen is captured twice and the outbound endpoint's
byte counts must have grown; Ctrl-C must exit 0 and give the terminal back
(alternate screen off, cursor visible). Not on a terminal: one line per
change, driven by the daemon's signals (created, active, releasing, removed),
and SIGTERM ends it with 0. Who gets what: group scistream follows signals,
anyone else is refused by name. Every wait is "until it holds" with a guard.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
from typing import Dict, List, Optional

import pytest

from tests.integration.conftest import as_user, parse_request_output, run_as, wait_until

TMUX = ["tmux", "-L", "watchtest"]
SESSION = "watch"
RC_FILE = "/tmp/watch-test.rc"
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def tunnel(s1, s2, port: int) -> tuple:
    r = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", str(port))
    assert r.returncode == 0, r.stderr
    uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
    o = s2.ctl("outbound-request", "--server_cert", "/etc/scistream/peer-ca.crt", uid,
               *listeners)
    assert o.returncode == 0, o.stderr
    return uid, parse_request_output(o.stdout)[3]


def capture(host) -> str:
    return host.run(TMUX + ["capture-pane", "-p", "-t", SESSION]).stdout


def pane_flag(host, flag: str) -> str:
    return host.run(TMUX + ["display-message", "-p", "-t", SESSION, f"#{{{flag}}}"]).stdout.strip()


def row_of(screen: str, uid: str, role: str) -> Optional[Dict[str, str]]:
    """The table row of (uid, role) on a captured screen: column name -> text."""
    for line in screen.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 10 and cells[0] == uid and cells[1] == role:
            names = ("uid", "role", "state", "in_rate", "out_rate", "in", "out", "conns",
                     "restarts", "target")
            return dict(zip(names, cells))
    return None


def as_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * UNITS[unit]


@pytest.fixture
def tmux(s2):
    s2.run(TMUX + ["kill-server"], check=False)
    s2.run(["rm", "-f", RC_FILE])
    yield s2
    s2.run(TMUX + ["kill-server"], check=False)


def test_watch_on_a_terminal_moves_with_traffic_and_ctrl_c_exits_0(clean, s1, s2, apps, tmux):
    apps.start(s1, "watch-iperf3", "iperf3", "-s", "-p", "5330")
    uid, (listener,) = tunnel(s1, s2, 5330)
    ip, port = listener.rsplit(":", 1)
    s2.run(TMUX + ["new-session", "-d", "-s", SESSION, "-x", "200", "-y", "40",
                   f"scistreamctl watch; echo $? > {RC_FILE}; sleep 600"])
    first = wait_until(lambda: row_of(capture(s2), uid, "outbound"), 30,
                       "watch to show the outbound endpoint")
    assert first["state"] == "active"
    assert pane_flag(s2, "alternate_on") == "1"  # drawn in place, like top
    # Traffic for long enough to see the counters move between two screens.
    apps.start(s2, "watch-iperf3-client", "iperf3", "-c", ip, "-p", port, "-t", "20")
    moving = wait_until(
        lambda: (lambda r: r if r and r["in"] != "-" and as_bytes(r["in"]) > 1024**2
                 else None)(row_of(capture(s2), uid, "outbound")),
        60, "watch to show the first MiB through the outbound relay")
    later = wait_until(
        lambda: (lambda r: r if r and as_bytes(r["in"]) > as_bytes(moving["in"]) else None)(
            row_of(capture(s2), uid, "outbound")),
        60, "the byte count on the screen to grow")
    assert as_bytes(later["out"]) > as_bytes(moving["out"]) or \
        as_bytes(later["out"]) > 1024**2, later
    assert later["in_rate"].endswith("bit/s") and not later["in_rate"].startswith("0 "), later
    assert later["conns"].split("/")[0] != "0", later  # the iperf3 connections are open

    s2.run(TMUX + ["send-keys", "-t", SESSION, "C-c"])
    rc = wait_until(lambda: s2.run(["cat", RC_FILE], check=False).stdout.strip(), 30,
                    "watch to exit after Ctrl-C")
    assert rc == "0"
    # The terminal is given back: main screen, cursor shown, no table left on it.
    assert pane_flag(s2, "alternate_on") == "0"
    assert pane_flag(s2, "cursor_flag") == "1"
    assert row_of(capture(s2), uid, "outbound") is None


class Lines:
    """``scistreamctl watch`` with stdout a pipe, inside ``host``; its lines as they come."""

    def __init__(self, host, *args: str, user: str = "") -> None:
        prefix = as_user(user) if user else []
        # exec keeps the shell's pid, which comes first: kill that pid, nothing by name.
        self.proc = subprocess.Popen(
            host.nsenter() + prefix + ["sh", "-c", 'echo $$; exec scistreamctl watch "$@"',
                                       "sh", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.host = host
        self.pid = int(self.proc.stdout.readline())
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, pred, what: str, guard: float = 60) -> List[str]:
        seen: List[str] = []
        while True:
            try:
                line = self.lines.get(timeout=guard)
            except queue.Empty:
                raise AssertionError(f"no line for {what} within {guard:g}s (guard); "
                                     f"seen: {seen}") from None
            seen.append(line)
            if pred(line):
                return seen

    def stop(self) -> int:
        self.host.run(["kill", "-TERM", str(self.pid)], check=False)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_watch_without_a_terminal_prints_a_line_per_change(clean, s1):
    w = Lines(s1)
    try:
        r = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5331")
        assert r.returncode == 0, r.stderr
        uid = parse_request_output(r.stdout)[0]
        # Counters may ride along a state change: "changed bytes_in=0 ... state=active".
        seen = w.until(lambda line: (f"{uid} inbound changed " in line or
                                     f"{uid} inbound added " in line)
                       and " state=active" in line, "the new endpoint, active")
        added = [line for line in seen if f"{uid} inbound added" in line]
        assert len(added) == 1 and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", added[0])
        assert "targets=192.168.150.1:5331" in added[0]
        assert s1.ctl("release", uid).returncode == 0
        seen = w.until(lambda line: f"{uid} inbound removed" in line, "the release")
        assert any(f"{uid} inbound changed " in line and " state=releasing" in line
                   for line in seen), seen
        assert w.stop() == 0
    finally:
        w.stop()
    assert w.proc.stderr.read() == ""


def test_watch_json_lines_for_group_members_and_named_tunnels(clean, s1):
    keep = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5332")
    other = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5333")
    assert keep.returncode == 0 and other.returncode == 0
    uid = parse_request_output(keep.stdout)[0]
    other_uid = parse_request_output(other.stdout)[0]
    # A member of group scistream follows the signals; only the named tunnel (a prefix).
    w = Lines(s1, "--json", uid[:8], user="sstest-member")
    try:
        first = json.loads(w.until(lambda line: True, "the snapshot")[0])
        assert first["uid"] == uid and first["event"] == "added"
        assert first["changes"]["state"] == "active"
        assert first["changes"]["created_at"].endswith("Z")  # ISO 8601 UTC
        assert s1.ctl("release", other_uid).returncode == 0
        assert s1.ctl("release", uid).returncode == 0
        seen = w.until(lambda line: json.loads(line)["event"] == "removed", "the release")
        assert all(json.loads(line)["uid"] == uid for line in seen), seen
        assert w.stop() == 0
    finally:
        w.stop()


def test_watch_polls_when_asked_and_refuses_users_outside_the_group(clean, s1):
    w = Lines(s1, "--poll", "--interval", "0.5")
    try:
        r = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", "5334")
        uid = parse_request_output(r.stdout)[0]
        w.until(lambda line: f"{uid} inbound added" in line, "the polled view to show it")
        assert s1.ctl("release", uid).returncode == 0
        w.until(lambda line: f"{uid} inbound removed" in line, "the polled view to drop it")
        assert w.stop() == 0
    finally:
        w.stop()
    out = run_as(s1, "sstest-user", ["scistreamctl", "watch"], timeout=60)
    assert out.returncode == 9, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert "membership of group 'scistream'" in out.stderr, out.stderr
