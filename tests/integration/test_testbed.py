"""The test bed itself: two real systemd hosts, a veth between them, clean teardown."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.testbed import HOSTS, Testbed, leftovers


def test_both_hosts_run_systemd_as_pid1(bed):
    for name, host in bed.hosts.items():
        state = host.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        assert state in ("running", "degraded"), state
        assert host.run(["hostname"]).stdout.strip() == name
        assert host.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
        # Its own journald and system bus.
        assert host.run(["systemctl", "is-active", "systemd-journald", "dbus"]).returncode == 0


def test_hosts_reach_each_other_over_the_veth(bed):
    for name, host in bed.hosts.items():
        other = [ip for n, ip in HOSTS.items() if n != name][0]
        addr = host.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert f"{HOSTS[name]}/24" in addr
        host.run(["ping", "-c", "1", "-W", "5", other])


def test_hosts_have_separate_network_namespaces(bed):
    s1, s2 = bed["server1"], bed["server2"]
    ns1 = s1.run(["readlink", "/proc/self/ns/net"]).stdout
    ns2 = s2.run(["readlink", "/proc/self/ns/net"]).stdout
    assert ns1 != ns2 and ns1 != os.readlink("/proc/self/ns/net") + "\n"


def test_transient_unit_with_sandbox(bed):
    host = bed["server1"]
    out = host.run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "DynamicUser=yes",
                    "-p", "PrivateTmp=yes", "-p", "NoNewPrivileges=yes", "--slice=scistream.slice",
                    "/bin/sh", "-c", "id -u; cat /proc/self/cgroup"]).stdout.splitlines()
    assert int(out[0]) != 0  # a dynamic user, not root
    assert any("scistream.slice" in line for line in out[1:])


def test_scistreamd_active_and_owns_bus_name(bed):
    for host in bed.hosts.values():
        assert host.run(["systemctl", "is-active", "scistreamd"]).stdout.strip() == "active"
        ver = host.run(["busctl", "get-property", "org.scistream.Tunnel1",
                        "/org/scistream/Tunnel1", "org.scistream.Tunnel1.Manager",
                        "Version"]).stdout
        assert ver.startswith('s "')
        # The unit that owns the name is the project's unit file.
        frag = host.run(["systemctl", "show", "-P", "FragmentPath", "scistreamd"]).stdout
        assert frag.strip() == "/run/testbed/units/scistreamd.service"


def test_per_host_files_do_not_touch_the_machine(bed):
    for name, host in bed.hosts.items():
        conf = host.run(["cat", "/etc/scistream/scistreamd.toml"]).stdout
        assert HOSTS[name] in conf
    assert not Path("/etc/scistream").exists()
    assert not Path("/etc/dbus-1/system.d/org.scistream.Tunnel1.conf").exists()


def test_down_leaves_nothing_then_crash_leftovers_are_cleaned(bed: Testbed):
    journal_dir = bed["server1"].journal_dir
    bed.down()
    assert leftovers() == []
    # Journals stay readable after down.
    assert "scistreamd" in bed["server1"].journal("-u", "scistreamd")
    assert journal_dir.exists()

    # A crashed run: PID 1s killed, no teardown. `up` must clean that first.
    bed.up()
    for host in bed.hosts.values():
        os.kill(host.pid1, signal.SIGKILL)
    fresh = Testbed()
    fresh.up()
    try:
        assert "scistreamd=active" in fresh.status()
    finally:
        fresh.down()
    assert leftovers() == []
    bed.up()  # leave a running test bed for the tests after this one
