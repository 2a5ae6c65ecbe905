"""Two emulated gateway hosts, each a real systemd as PID 1 of its own namespaces.

One implementation behind both ``python3 -m tests.testbed`` and the pytest
fixture. Every host gets:

- pid/mount/net/uts/ipc/cgroup namespaces (``unshare`` + boot.sh);
- its own cgroup subtree below the caller's cgroup in every hierarchy;
- a per-host ``/etc`` (overlay: the machine's /etc below, this host's
  scistreamd.toml, certificate, D-Bus policy, hostname, machine-id on top),
  per-host ``/var/lib`` and ``/var/log``, a private /run, /tmp, /dev;
- a journal kept in the state dir (``Storage=volatile`` + bind mount), so it
  stays readable after ``down``;
- ``scistreamd.service`` and ``scistream.slice`` from the project's ``units/``,
  run from the working tree (bind-mounted read-only at /run/testbed/src).

Rootfs mode (``Testbed(rootfs=DIR)``, used by the package install test):
each host instead boots a whole Debian system. Its root is an overlay of
DIR (an extracted rootfs, never modified) and a per-host upper directory;
boot.sh pivots into it and execs that system's own systemd to its default
target. Nothing from the machine or the working tree is visible inside.
``Testbed.chroot()`` runs commands in a host's root before it boots (with
the machine's network, e.g. for ``apt-get install``).

The machine's own files are never modified. Facts this relies on are in
shared/TESTBED-NOTES.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

SRC = Path(__file__).resolve().parents[2]
BOOT_SH = Path(__file__).with_name("boot.sh")
# SCISTREAM_TESTBED_NAME lets several test beds run side by side (e.g. two
# engineers' test runs): it names the state dir, the cgroups and the marker.
NAME = os.environ.get("SCISTREAM_TESTBED_NAME", "scistream-testbed")
DEFAULT_ROOT = Path(os.environ.get("SCISTREAM_TESTBED_DIR", f"/var/tmp/{NAME}"))
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_LEAF = NAME
MARKER = f"container={NAME}"
HOST_PATH = "/run/testbed/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")

HOSTS: Dict[str, str] = {"server1": "192.168.150.1", "server2": "192.168.150.2"}
PREFIXLEN = 24


class TestbedError(RuntimeError):
    pass


# --------------------------------------------------------------------------
# unit files of the emulated hosts

def _empty_target(description: str) -> str:
    return f"[Unit]\nDescription={description}\nDefaultDependencies=no\n"


UNITS: Dict[str, str] = {
    "testbed.target": """[Unit]
Description=scistreamd test bed host
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald-dev-log.socket dbus.socket scistreamd.service
AllowIsolate=yes
""",
    "systemd-journald.socket": """[Unit]
Description=Journal Socket
DefaultDependencies=no
Before=sockets.target

[Socket]
ListenStream=/run/systemd/journal/stdout
ListenDatagram=/run/systemd/journal/socket
SocketMode=0666
PassCredentials=yes
PassSecurity=yes
ReceiveBuffer=8M
Service=systemd-journald.service
""",
    "systemd-journald-dev-log.socket": """[Unit]
Description=Journal Socket (/dev/log)
DefaultDependencies=no
Before=sockets.target

[Socket]
Service=systemd-journald.service
ListenDatagram=/run/systemd/journal/dev-log
Symlinks=/dev/log
SocketMode=0666
PassCredentials=yes
PassSecurity=yes
ReceiveBuffer=8M
""",
    "systemd-journald.service": """[Unit]
Description=Journal Service
DefaultDependencies=no
Requires=systemd-journald.socket
After=systemd-journald.socket systemd-journald-dev-log.socket

[Service]
Type=notify
Sockets=systemd-journald.socket systemd-journald-dev-log.socket
ExecStart=/lib/systemd/systemd-journald
Restart=always
RestartSec=0
StandardOutput=null
FileDescriptorStoreMax=4224
""",
    "dbus.socket": """[Unit]
Description=D-Bus System Message Bus Socket
DefaultDependencies=no

[Socket]
ListenStream=/run/dbus/system_bus_socket
""",
    "dbus.service": """[Unit]
Description=D-Bus System Message Bus
DefaultDependencies=no
Requires=dbus.socket
After=dbus.socket systemd-journald.socket

[Service]
ExecStart=/usr/bin/dbus-daemon --system --address=systemd: --nofork --nopidfile \
    --systemd-activation --syslog-only
ExecReload=/usr/bin/dbus-send --print-reply --system --type=method_call \
    --dest=org.freedesktop.DBus / org.freedesktop.DBus.ReloadConfig
OOMScoreAdjust=-900
""",
}
for _t in ("sysinit", "basic", "sockets", "timers", "paths", "slices", "local-fs",
           "network", "network-online", "network-pre", "multi-user", "shutdown",
           "umount", "final", "nss-lookup", "nss-user-lookup", "remote-fs", "time-sync"):
    UNITS[f"{_t}.target"] = _empty_target(f"{_t} (test bed)")
# Copied from the distribution so SIGRTMIN+4 / `systemctl exit` end a host.
COPIED_UNITS = ("exit.target", "poweroff.target", "halt.target",
                "systemd-exit.service", "systemd-poweroff.service", "systemd-halt.service")

DAEMON_DROPIN = """[Service]
# Run the working tree's code, not an installed package (the test bed makes
# the hosts' certificates itself).
ExecStartPre=
ExecStart=
ExecStart=/usr/bin/python3 -m scistreamd.daemon
ExecReload=
ExecReload=/usr/bin/python3 -m scistreamd.daemon --reload
Environment=PYTHONPATH=/run/testbed/src PYTHONDONTWRITEBYTECODE=1
"""

CTL_WRAPPER = """#!/bin/sh
PYTHONPATH=/run/testbed/src PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 -m scistreamd.ctl "$@"
"""

JOURNALD_CONF = """[Journal]
Storage=volatile
RuntimeMaxUse=64M
RateLimitBurst=0
"""


# --------------------------------------------------------------------------
# small process helpers

def _run(cmd: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, text=True, capture_output=True, **kw)


def _start_time(pid: int) -> Optional[str]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start_time: Optional[str]) -> bool:
    # PIDs get reused: a recorded PID is ours only if its start time matches.
    return start_time is not None and _start_time(pid) == start_time


def _children(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _wait(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TestbedError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# cgroups

def _hierarchies() -> Dict[str, Path]:
    """Mounted hierarchies (name -> mount point) of the machine, from mountinfo."""
    out: Dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _src, opts = post.split()[:3]
        mnt = Path(pre.split()[4])
        if fstype == "cgroup2":
            out["unified"] = mnt
        elif fstype == "cgroup":
            names = [o for o in opts.split(",") if o not in ("rw", "ro", "relatime", "nosuid",
                                                             "nodev", "noexec", "none")]
            out[",".join(names)] = mnt
    return out


def _own_cgroup(hierarchy: str) -> str:
    """The caller's cgroup path in one hierarchy, from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if (hierarchy == "unified" and ctrls == "") or ctrls == hierarchy:
            return path
    return "/"


def _cgroup_base(leaf: str = CGROUP_LEAF) -> Dict[str, Path]:
    """Per hierarchy, the directory that holds the test bed's host cgroups."""
    return {
        name: mnt / _own_cgroup(name).lstrip("/") / leaf
        for name, mnt in _hierarchies().items()
    }


def _make_cgroup(path: Path) -> None:
    parent = path.parent
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
    if (path / "cpuset.cpus").exists():
        # A v1 cpuset child starts empty and refuses tasks until filled in.
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not (path / f).read_text().strip():
                (path / f).write_text((parent / f).read_text())


def _cgroup_tree_procs(path: Path) -> List[int]:
    pids: List[int] = []
    if not path.is_dir():
        return pids
    for dirpath, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError):
                pids += [int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()]
    return pids


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


# --------------------------------------------------------------------------

@dataclass
class Host:
    name: str
    ip: str
    root: Path
    pid1: Optional[int] = None
    unshare_pid: Optional[int] = None
    cgroups: List[Path] = field(default_factory=list)
    #: Rootfs mode: the extracted root filesystem below this host's root overlay.
    rootfs: Optional[Path] = None

    @property
    def state(self) -> Path:
        return self.root / self.name

    @property
    def root_upper(self) -> Path:
        """Rootfs mode: this host's changes to its root filesystem (the overlay's upper dir)."""
        return self.state / "root-upper"

    @property
    def journal_dir(self) -> Path:
        return self.state / "journal"

    @property
    def etc(self) -> Path:
        """This host's /etc additions, as the host sees them at /etc."""
        if self.rootfs is not None:
            return self.root_upper / "etc"
        return self.state / "etc-upper"

    def nsenter(self) -> List[str]:
        if self.pid1 is None:
            raise TestbedError(f"{self.name} is not running (python3 -m tests.testbed up)")
        return ["nsenter", "-t", str(self.pid1), "-m", "-p", "-n", "-u", "-i", "-C", "--",
                "env", f"PATH={HOST_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float = 120,
            input: Optional[str] = None, capture: bool = True,
            user: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run a command inside the host; with ``user``, drop to that user first."""
        prefix = self.nsenter()
        if user is not None:
            # The user's own primary group, looked up inside the host.
            gid = self.run(["id", "-g", user]).stdout.strip()
            prefix += ["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups",
                       "--inh-caps=-all", "--"]
        proc = subprocess.run(prefix + list(cmd), text=True, input=input, timeout=timeout,
                              capture_output=capture)
        if check and proc.returncode != 0:
            raise TestbedError(
                f"{self.name}: {' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def write_file(self, path: str, data: Union[str, bytes], mode: str = "0644",
                   owner: Optional[str] = None) -> None:
        """Write ``data`` to ``path`` inside the host (directories made as needed): created
        private (umask 077), then given ``mode`` and, with ``owner``, that owner."""
        text = data.decode() if isinstance(data, bytes) else data
        script = 'mkdir -p "$(dirname "$1")" && umask 077 && cat > "$1" && chmod "$2" "$1"'
        args = [path, mode]
        if owner is not None:
            script += ' && chown "$3" "$1"'
            args.append(owner)
        self.run(["/bin/sh", "-c", script, "sh", *args], input=text)

    def ctl(self, *args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
        return self.run(["scistreamctl", *args], check=check, **kw)

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-c", script], **kw)

    def journal(self, *args: str) -> str:
        """Journal lines of this host; readable while up and after down."""
        return _run(["journalctl", "-D", str(self.journal_dir), "--no-pager", "-o",
                     "short-precise", *args], check=False).stdout

    def to_json(self) -> dict:
        return {"name": self.name, "ip": self.ip, "pid1": self.pid1,
                "unshare_pid": self.unshare_pid,
                "pid1_start": _start_time(self.pid1) if self.pid1 else None,
                "unshare_start": _start_time(self.unshare_pid) if self.unshare_pid else None,
                "cgroups": [str(c) for c in self.cgroups],
                "rootfs": str(self.rootfs) if self.rootfs else None}


class Testbed:
    """The two hosts. ``up()`` boots both; ``down()`` leaves nothing behind.

    ``name`` (default: $SCISTREAM_TESTBED_NAME) names the state dir, the
    cgroups and the process marker, so test beds of other names running at the
    same time are never touched. ``rootfs`` selects rootfs mode (see the module
    docstring). ``wait_units`` are the units ``up()`` waits to be active.
    """

    __test__ = False  # not a pytest class

    def __init__(self, root: Optional[Path] = None, src: Path = SRC, *,
                 name: Optional[str] = None, rootfs: Optional[Path] = None,
                 wait_units: Sequence[str] = ("scistreamd.service",)) -> None:
        self.name = name or NAME
        if root is None:
            root = DEFAULT_ROOT if self.name == NAME else Path(f"/var/tmp/{self.name}")
        self.root = root
        self.src = src
        self.rootfs = Path(rootfs).resolve() if rootfs is not None else None
        self.wait_units = tuple(wait_units)
        self.hosts: Dict[str, Host] = {n: Host(n, ip, root, rootfs=self.rootfs)
                                       for n, ip in HOSTS.items()}
        self.ca_cert: Path = root / "ca.crt"

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @property
    def record(self) -> Path:
        return self.root / "testbed.json"

    # ------------------------------------------------------------------ up
    def up(self, timeout: float = 60,
           before_boot: Optional[Callable[[Testbed], None]] = None) -> None:
        """Boot both hosts. ``before_boot(self)`` runs once their files are
        prepared and before any boots (in rootfs mode: the time for ``chroot()``)."""
        if os.geteuid() != 0:
            raise TestbedError("the test bed needs root (namespaces, cgroups, mounts)")
        if self.rootfs is not None and not (self.rootfs / "lib/systemd/systemd").exists():
            raise TestbedError(f"{self.rootfs} is not a root filesystem with systemd "
                               "(no lib/systemd/systemd in it)")
        self.cleanup_leftovers()
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, mode=0o755)
        if self.rootfs is None:
            self._make_certs()
        for host in self.hosts.values():
            if self.rootfs is None:
                self._prepare(host)
            else:
                self._prepare_rootfs(host)
        if before_boot is not None:
            before_boot(self)
        try:
            for host in self.hosts.values():
                self._spawn(host)
            self._save()
            for host in self.hosts.values():
                _wait(lambda h=host: self._stage2_ready(h), timeout,
                      f"{host.name} to set up its namespaces (see {host.state}/boot.log)")
            self._network()
            for host in self.hosts.values():
                (host.state / "shared" / "go").touch()
            for host in self.hosts.values():
                self._wait_ready(host, timeout)
        except BaseException:
            self.down()
            raise

    def _stage2_ready(self, host: Host) -> bool:
        if (host.state / "shared" / "stage2-ready").exists():
            return True
        if host.pid1 is None or _start_time(host.pid1) is None:
            raise TestbedError(f"{host.name} died while booting:\n"
                               + (host.state / "boot.log").read_text())
        return False

    def _make_certs(self) -> None:
        sys.path.insert(0, str(self.src))
        from scistreamd import certs

        ca = certs.make_ca("scistreamd test bed CA")
        self.ca_cert.write_bytes(ca.cert_pem())
        (self.root / "ca.key").write_bytes(ca.key_pem())
        os.chmod(self.root / "ca.key", 0o600)
        self._ca = ca

    def _prepare(self, host: Host) -> None:
        from scistreamd import certs

        s = host.state
        for d in ("etc-upper", "etc-work", "var-lib", "var-log", "journal", "shared/units",
                  "shared/bin", "shared/src", "etc-upper/scistream/conf.d",
                  "etc-upper/dbus-1/system.d", "etc-upper/systemd/journald.conf.d"):
            (s / d).mkdir(parents=True, exist_ok=True)
        os.chmod(s / "etc-upper/scistream", 0o755)
        units = s / "shared/units"
        for name, text in UNITS.items():
            (units / name).write_text(text)
        for name in COPIED_UNITS:
            shutil.copy(SYSTEMD_UNITS / name, units / name)
        for name in ("scistreamd.service", "scistream.slice"):
            shutil.copy(self.src / "units" / name, units / name)
        shutil.copytree(self.src / "units" / "scistream-.service.d", units / "scistream-.service.d")
        (units / "scistreamd.service.d").mkdir()
        (units / "scistreamd.service.d/testbed.conf").write_text(DAEMON_DROPIN)
        ctl = s / "shared/bin/scistreamctl"
        ctl.write_text(CTL_WRAPPER)
        ctl.chmod(0o755)

        etc = host.etc
        (etc / "hostname").write_text(host.name + "\n")
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (etc / "systemd/journald.conf.d/testbed.conf").write_text(JOURNALD_CONF)
        shutil.copy(self.src / "etc/dbus-1/org.scistream.Tunnel1.conf",
                    etc / "dbus-1/system.d/org.scistream.Tunnel1.conf")
        pair = certs.make_host_cert(host.name, [ipaddress.ip_address(host.ip)],
                                    issuer=self._ca)
        certs.write_pair(pair, etc / "scistream/server.crt", etc / "scistream/server.key")
        shutil.copy(self.ca_cert, etc / "scistream/peer-ca.crt")
        (etc / "scistream/scistreamd.toml").write_text(
            f"# test bed host {host.name}\nlisten_address = \"{host.ip}\"\n"
            "# quick enough for tests to see a released peer\npeer_check_interval = 2\n")
        self._add_groups(host)

    def _prepare_rootfs(self, host: Host) -> None:
        """Rootfs mode: an empty upper dir plus what makes this system this host."""
        s = host.state
        for d in ("root", "root-upper", "root-work", "journal", "shared"):
            (s / d).mkdir(parents=True, exist_ok=True)
        etc = host.etc
        (etc / "systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
        (etc / "hostname").write_text(host.name + "\n")
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        (etc / "systemd/journald.conf.d/testbed.conf").write_text(JOURNALD_CONF)
        # In a container systemd adds a getty on /dev/console, which here is
        # boot.log: mask it.
        (etc / "systemd/system").mkdir(parents=True, exist_ok=True)
        (etc / "systemd/system/console-getty.service").symlink_to("/dev/null")

    def chroot(self, host: Host, cmd: Sequence[str], *, binds: Optional[Mapping[Path, str]] = None,
               timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Rootfs mode: run ``cmd`` chrooted into ``host``'s root while it is down.

        The overlay is mounted in a throw-away mount namespace (with /proc,
        /dev, an empty /run, the host's hostname) and vanishes with it; what
        ``cmd`` changes stays in the host's upper dir. The network is the
        machine's, so ``apt-get`` reaches the archive. ``binds`` maps machine
        directories to paths inside the root. An empty /run means no running
        systemd: maintainer scripts install, enable, but start nothing.
        """
        if self.rootfs is None:
            raise TestbedError("chroot() needs a test bed in rootfs mode (Testbed(rootfs=...))")
        if host.pid1 is not None:
            raise TestbedError(f"{host.name} is running: chroot() works only before up() "
                               "boots it (its root overlay is in use)")
        s = host.state
        r = s / "root"
        script = [
            "set -eu",
            'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4"',
            'mount -t proc proc "$4/proc"',
            'mount --rbind /dev "$4/dev"',
            'mount -t tmpfs -o mode=755 tmpfs "$4/run"',
        ]
        for i, dest in enumerate((binds or {}).values()):
            var = f"TB_BIND_{i}"
            script.append(f'mkdir -p "$4/{dest.lstrip("/")}" && mount --bind "${var}" '
                          f'"$4/{dest.lstrip("/")}"')
        script += ['hostname "$5"', 'shift 5', 'exec chroot "$TB_ROOT" "$@"']
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "TB_ROOT": str(r)}
        for i, src in enumerate((binds or {}).keys()):
            env[f"TB_BIND_{i}"] = str(src)
        argv = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
                "/bin/sh", "-c", "\n".join(script), "chroot",
                str(self.rootfs), str(s / "root-upper"), str(s / "root-work"), str(r), host.name,
                "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive", *cmd]
        proc = subprocess.run(argv, text=True, capture_output=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise TestbedError(
                f"{host.name} (chroot): {' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}")
        return proc

    def _add_groups(self, host: Host) -> None:
        """What etc/sysusers.d/scistream.conf makes (groups `scistream` and
        `scistream-relay`) plus two test users, in this host's /etc only."""
        etc = host.etc
        group_text = Path("/etc/group").read_text()
        passwd_text = Path("/etc/passwd").read_text()
        for group, line in (("scistream", "scistream:x:990:sstest-member\n"),
                            ("scistream-relay", "scistream-relay:x:989:\n")):
            if f"\n{group}:" not in "\n" + group_text:
                group_text += line
        group_text += "sstest:x:991:\n"
        passwd_text += ("sstest-member:x:990:991::/nonexistent:/usr/sbin/nologin\n"
                        "sstest-user:x:992:991::/nonexistent:/usr/sbin/nologin\n")
        (etc / "group").write_text(group_text)
        (etc / "passwd").write_text(passwd_text)

    def _spawn(self, host: Host) -> None:
        base = _cgroup_base(self.name)
        host.cgroups = []
        for _name, path in base.items():
            _make_cgroup(path)
            _make_cgroup(path / host.name)
            host.cgroups.append(path / host.name)
        v1 = [n for n in base if n not in ("unified", "name=systemd")]
        env = dict(os.environ, TB_NAME=host.name, TB_CONTAINER=self.name,
                   TB_STATE=str(host.state), TB_SRC=str(self.src),
                   TB_CGROUPS=" ".join(str(c) for c in host.cgroups),
                   TB_V1_CONTROLLERS=" ".join(v1),
                   TB_ROOTFS=str(self.rootfs) if self.rootfs is not None else "")
        with open(host.state / "boot.log", "wb") as log:
            proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation",
                 "private", "--net", "--uts", "--ipc", "--", "/bin/sh", str(BOOT_SH), "stage1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        host.unshare_pid = proc.pid
        _wait(lambda: bool(_children(proc.pid)) or proc.poll() is not None, 10,
              f"{host.name} PID 1")
        if proc.poll() is not None:
            raise TestbedError(f"{host.name} failed to start: "
                               f"{(host.state / 'boot.log').read_text()}")
        host.pid1 = _children(proc.pid)[0]

    def _network(self) -> None:
        h1, h2 = self.hosts["server1"], self.hosts["server2"]
        # Created straight into the two namespaces: never in the machine's.
        _run(["ip", "link", "add", "eth0", "netns", str(h1.pid1), "type", "veth",
              "peer", "name", "eth0", "netns", str(h2.pid1)])
        for h in (h1, h2):
            ns = ["nsenter", "-t", str(h.pid1), "-n", "--"]
            _run(ns + ["ip", "link", "set", "lo", "up"])
            _run(ns + ["ip", "addr", "add", f"{h.ip}/{PREFIXLEN}", "dev", "eth0"])
            _run(ns + ["ip", "link", "set", "eth0", "up"])

    def _wait_ready(self, host: Host, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Until systemd has opened its private socket, systemctl says "offline".
        _wait(lambda: host.run(["test", "-S", "/run/systemd/private"], check=False).returncode == 0,
              timeout, f"systemd on {host.name}")
        state = host.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            raise TestbedError(f"{host.name}: system state {state!r}\n" + self.diagnose(host))

        for unit in self.wait_units:
            def unit_ready(unit: str = unit) -> bool:
                st = host.run(["systemctl", "is-active", unit], check=False)
                if st.stdout.strip() == "failed":
                    raise TestbedError(f"{host.name}: {unit} failed\n" + self.diagnose(host))
                return st.stdout.strip() == "active"

            _wait(unit_ready, max(1.0, deadline - time.monotonic()),
                  f"{unit} on {host.name}", interval=0.05)

    def diagnose(self, host: Host) -> str:
        units = host.run(["systemctl", "list-units", "--all", "--no-legend"], check=False).stdout
        return f"--- units on {host.name}:\n{units}\n--- journal:\n{host.journal('-n', '80')}"

    # ----------------------------------------------------------------- down
    def _save(self) -> None:
        self.record.write_text(json.dumps([h.to_json() for h in self.hosts.values()]))

    def load(self) -> bool:
        """Attach to a running test bed started by another process."""
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return False
        ok = True
        for item in data:
            h = self.hosts[item["name"]]
            h.cgroups = [Path(c) for c in item["cgroups"]]
            if item.get("rootfs"):
                h.rootfs = Path(item["rootfs"])
            if item["pid1"] and _alive(item["pid1"], item["pid1_start"]):
                h.pid1 = item["pid1"]
                h.unshare_pid = item["unshare_pid"]
            else:
                ok = False
        return ok

    def down(self, timeout: float = 10) -> None:
        self.load()
        hosts = list(self.hosts.values())
        for h in hosts:
            if h.pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid1, signal.SIGRTMIN + 4)  # poweroff: clean stop
        deadline = time.monotonic() + timeout
        for h in hosts:
            if h.pid1 is None:
                continue
            pid1, start = h.pid1, _start_time(h.pid1)
            while _alive(pid1, start) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid1, start):
                os.kill(pid1, signal.SIGKILL)  # ends the whole pid namespace
        self.cleanup_leftovers()
        for h in hosts:
            h.pid1 = h.unshare_pid = None
        if self.record.exists():
            self.record.unlink()

    def cleanup_leftovers(self) -> None:
        """Kill whatever still lives in the test bed's cgroups, remove them."""
        self.load()
        bases = list(_cgroup_base(self.name).values())
        for _ in range(100):
            pids = set()
            for b in bases:
                pids.update(_cgroup_tree_procs(b))
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for h in self.hosts.values():
            if h.unshare_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(h.unshare_pid, os.WNOHANG)
        for b in bases:
            for _ in range(50):
                _remove_cgroup_tree(b)
                if not b.exists():
                    break
                time.sleep(0.05)

    # --------------------------------------------------------------- status
    def status(self) -> str:
        running = self.load()
        lines = []
        for h in self.hosts.values():
            if h.pid1 is None:
                lines.append(f"{h.name:8} {h.ip:15} down")
                continue
            state = h.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            daemon = h.run(["systemctl", "is-active", "scistreamd"], check=False).stdout.strip()
            relays = h.run(["systemctl", "list-units", "--no-legend", "--plain",
                            "scistream-*.service"], check=False).stdout.strip().splitlines()
            lines.append(f"{h.name:8} {h.ip:15} pid1={h.pid1} system={state} "
                         f"scistreamd={daemon} relays={len(relays)}")
        if not running and not any(h.pid1 for h in self.hosts.values()):
            lines.append("(test bed is down)")
        return "\n".join(lines)


def mentions(line: str, name: str) -> bool:
    """True if ``name`` is a whole word of ``line`` (a mountinfo line): a path
    component, option value or field equal to it, never a part of one (a bed
    named ``ext`` must not claim the ``ext4`` root mount)."""
    return name in re.split(r"[\s/=,:]+", line)


def leftovers(name: str = NAME) -> List[str]:
    """What the test bed ``name`` could leave on the machine; empty when clean."""
    found: List[str] = []
    marker = f"container={name}"
    for b in _cgroup_base(name).values():
        if b.exists():
            found.append(f"cgroup {b}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if mentions(line, name):
            found.append(f"mount {line}")
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            env = (pid_dir / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in env.split(b"\0"):
            found.append(f"process {pid_dir.name}")
    links = _run(["ip", "-o", "link"], check=False).stdout
    for line in links.splitlines():
        if "veth" in line and "eth0@" in line:
            found.append(f"link {line}")
    return found


def iter_hosts(bed: Testbed, names: Iterable[str]) -> List[Host]:
    return [bed[n] for n in names]
