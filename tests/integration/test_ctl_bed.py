"""scistreamctl against a real scistreamd: the daemon's live introspection is
the shipped description, bash completes verbs, options and the daemon's uids
with the shipped completion file, and uids may be given by a unique prefix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest

from scistreamd import ENDPOINT_IFACE, MANAGER_IFACE, MANAGER_PATH
from scistreamd.interface import shape
from tests.completion import COMPLETE_SH
from tests.integration.conftest import as_user, dbus

pytestmark = pytest.mark.testbed

REPO = Path(__file__).resolve().parents[2]
XML_DIR = REPO / "etc" / "dbus-1" / "interfaces"
COMPLETION = "/run/testbed/src/etc/bash-completion/scistreamctl"
USER = "sstest-user"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"


def complete(host, line: str, user: str = "") -> List[str]:
    prefix = as_user(user) if user else []
    out = host.run(prefix + ["bash", "--norc", "--noprofile", "-c", COMPLETE_SH, "bash",
                             COMPLETION, line], check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr  # completion is quiet, whatever happens
    return [w.strip() for w in out.stdout.splitlines() if w.strip()]


@pytest.fixture
def endpoints(s1, clean):
    """Two inbound endpoints on server1: [(uid, object path), ...]."""
    made = []
    for port in ("5400", "5401"):
        out = s1.ctl("inbound-request", "--remote_ip", s1.ip, "--receiver_ports", port, "--json")
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        made.append((data["uid"], data["endpoint"]))
    return made


def test_live_introspection_is_the_shipped_description(s1, endpoints):
    _, path = endpoints[0]
    for obj_path, iface in ((MANAGER_PATH, MANAGER_IFACE), (path, ENDPOINT_IFACE)):
        live = dbus(s1, "Introspect", "", [], path=obj_path, iface=INTROSPECTABLE)["reply"][0]
        shipped = (XML_DIR / f"{iface}.xml").read_text()
        assert shape(live, iface) == shape(shipped, iface), iface


def test_bash_completes_verbs_options_and_the_daemons_uids(s1, endpoints):
    uids = sorted(uid for uid, _ in endpoints)
    assert complete(s1, "scistreamctl rel") == ["release"]
    assert set(complete(s1, "scistreamctl ")) >= {"inbound-request", "outbound-request",
                                                   "release", "rearm", "list", "status", "logs"}
    assert set(complete(s1, "scistreamctl inbound-request --num")) == {"--num-conn",
                                                                        "--num_conn"}
    assert set(uids) <= set(complete(s1, "scistreamctl status "))
    assert complete(s1, f"scistreamctl release {uids[0][:13]}") == [uids[0]]
    # As a member of group scistream, too.
    assert set(uids) <= set(complete(s1, "scistreamctl logs ", user="sstest-member"))


def test_uid_completion_is_quietly_empty_when_not_permitted(s1, endpoints):
    got = complete(s1, "scistreamctl status ", user=USER)
    assert got and all(w.startswith("-") for w in got), got
    for uid, _ in endpoints:
        assert uid not in got


def test_uid_by_unique_prefix(s1, endpoints):
    (uid_a, _), (uid_b, _) = endpoints
    common = 0
    while uid_a[common] == uid_b[common]:
        common += 1
    prefix = uid_a[:common + 1]
    out = s1.ctl("status", prefix)
    assert out.returncode == 0, out.stderr
    assert "Uid:" in out.stdout and uid_a in out.stdout and uid_b not in out.stdout
    if common:  # a prefix both share (random uids share one only sometimes)
        amb = s1.ctl("release", uid_a[:common])
        assert amb.returncode == 2 and "is ambiguous" in amb.stderr, amb.stderr
    unknown = next(c for c in "0123456789abcdef" if c not in (uid_a[0], uid_b[0]))
    out = s1.ctl("release", unknown)
    assert out.returncode == 3 and "starting with" in out.stderr, out.stderr
    out = s1.ctl("release", prefix)
    assert (out.returncode, out.stdout) == (0, f"Released {uid_a}.\n"), out.stderr
    listed = s1.ctl("list").stdout
    assert uid_a not in listed and uid_b in listed
