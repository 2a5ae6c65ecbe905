"""Install tests of the .deb and the .rpm on two booted Debian 12 systems.

One code path for both packages (the ``booted`` fixture is parametrized with
the package kind; what differs is in ``Kind``). Each of the test bed's two
hosts boots a minimal bookworm system (the test bed's rootfs mode: overlay of a
cached rootfs + a per-host upper dir, its own systemd as PID 1, joined by a
veth as 192.168.150.1 and .2).

- .deb: before boot, in a chroot of each host's root with the machine's network,
  ``apt-get install ./scistreamd_*.deb`` resolves the dependencies from the
  Debian archive; the maintainer scripts run there (policy-rc.d: no start) and
  the unit starts at boot.
- .rpm: before boot, apt installs the Debian packages of the .rpm's Requires
  (mapped in RPM_REQUIRES_ON_DEBIAN) and Debian's ``rpm``; on the booted,
  running system ``rpm -i --nodeps --force-debian`` installs the .rpm with its
  scriptlets on (``--nodeps`` only because the rpm database knows none of the
  Debian packages: the test checks that the dependency names are the only
  thing it overrides). This exercises the scriptlets (%pre/%post/%preun/
  %postun, with the spec's fallbacks of Fedora's systemd macros) and the file
  list on a real systemd; it does not exercise RHEL's dependency resolution
  (dnf, EPEL), nor the real Fedora macros (their expansion is checked in
  test_packages.py).

Then, for both, on the booted systems:

1. scistreamd is enabled and active, groups and directories exist;
2. the APS guide's scenario between the two installed hosts: inbound request on
   server1, outbound on server2, iperf3 through the tunnel;
3. an upgrade to a rebuilt ``<version>+upgrade1`` package on both hosts while a
   transfer runs through that tunnel: the transfer completes byte-identical, the
   relays keep their PIDs, the daemons run the new version and re-adopt the tunnel;
4. ``apt-get purge`` / ``rpm -e`` (with the tunnel still up) leaves no units,
   users, groups, listening ports, relay processes or files (``rpm -e``: but the
   operator's configuration in /etc/scistream, as rpm keeps configuration).

The rootfs is built once with mmdebstrap (~40 s) and cached in
$SCISTREAMD_ROOTFS_CACHE (default /var/cache/scistreamd-pkgtest), rebuilt after
7 days; downloaded .debs are kept there too. See packaging/tests/README.md.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.testbed import Host, Testbed, leftovers
from tests.testbed import TestbedError as BedError

from .conftest import REQUIRE_ENV, ROOT, SYS_PATH, run_build

VERSION = re.search(
    r'^__version__\s*=\s*"([^"]+)"', (ROOT / "scistreamd" / "__init__.py").read_text(), re.M
).group(1)
UPGRADE_VERSION = f"{VERSION}+upgrade1"

CACHE = Path(os.environ.get("SCISTREAMD_ROOTFS_CACHE", "/var/cache/scistreamd-pkgtest"))
#: What the booted systems need besides the essential packages: an init and a
#: system bus to boot, and the scenario's tools (ss, iperf3, python3 for the
#: transfer). Everything else scistreamd needs must come from
#: `apt-get install ./scistreamd_*.deb`. python3 is here, not left to apt, only
#: because byte-compiling its standard library would cost every run ~3 s of CPU.
ROOTFS_INCLUDE = ("systemd", "dbus", "iproute2", "iperf3", "python3")
ROOTFS_MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
ROOTFS_MAX_AGE = 7 * 24 * 3600
#: Distinct from every other test bed on this machine (they run concurrently).
TESTBED_NAME = os.environ.get(
    "SCISTREAMD_PKGTEST_TESTBED",
    os.environ.get("SCISTREAM_TESTBED_NAME", "scistream-testbed") + "-pkg",
)

#: The .rpm's Requires/Recommends -> the Debian package that provides it here
#: (None: in every Debian system). A "python3-X" name not listed is taken to be
#: Debian's name too, as it is for all of them so far, and "python3dist(x-y)"
#: to be python3-x-y; anything else new in the spec makes the rpm test fail
#: until it is added here.
RPM_REQUIRES_ON_DEBIAN: Dict[str, Optional[str]] = {
    "python3": "python3", "/usr/bin/python3": "python3", "/bin/sh": None,
    "stunnel": "stunnel4", "dbus": "dbus", "systemd": "systemd", "polkit": "polkitd",
    "bash-completion": "bash-completion",
}

#: Must be pulled in by apt from the archive (none is in the rootfs before).
DEPENDENCIES = ("python3-dbus-next", "python3-systemd", "python3-toml",
                "python3-cryptography", "python3-requests", "python3-jeepney", "stunnel4")
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q",
       "-o", "Dpkg::Options::=--force-unsafe-io"]
POLICY_RC_D = "#!/bin/sh\n# install test: start nothing in the chroot\nexit 101\n"
IPERF_PORT = 5300
CLIENT_PORT = 5100


# ---------------------------------------------------------------------------
# prerequisites


def _require(ok: bool, problem: str) -> None:
    """Skip with the reason, or fail when CI demands the package tests run."""
    if ok:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{problem} ({REQUIRE_ENV}=1 requires the booted install test to run)")
    pytest.skip(problem)


def _check_prerequisites() -> None:
    _require(os.geteuid() == 0, "the booted install test needs root (namespaces, mounts, chroot)")
    for tool, pkg in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        _require(shutil.which(tool, path=SYS_PATH) is not None,
                 f"{tool} missing: apt-get install {pkg} (or `make packaging-deps`)")
    filesystems = Path("/proc/filesystems").read_text()
    if "overlay" not in filesystems:
        subprocess.run(["modprobe", "overlay"], capture_output=True)
        filesystems = Path("/proc/filesystems").read_text()
    _require("overlay" in filesystems, "the kernel has no overlayfs (modprobe overlay)")


# ---------------------------------------------------------------------------
# the cached rootfs


@contextlib.contextmanager
def _flock(path: Path, mode: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def _rootfs_key() -> str:
    spec = json.dumps(["bookworm", "apt", ROOTFS_INCLUDE, ROOTFS_MIRRORS, 1])
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def _build_rootfs(dest: Path) -> None:
    _require(shutil.which("mmdebstrap", path=SYS_PATH) is not None,
             "mmdebstrap missing (to build the bookworm rootfs): apt-get install mmdebstrap, "
             "or `make packaging-deps`")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # Keep the package lists (apt resolves against them in each host) and
    # build apt's binary caches once here instead of in every host. mmdebstrap
    # copies in the machine's /etc/hostname: drop it (each host writes its own).
    proc = subprocess.run(
        ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory",
         "--include=" + ",".join(ROOTFS_INCLUDE), "--skip=cleanup/apt/lists",
         "--customize-hook=rm -f \"$1\"/etc/hostname",
         "bookworm", str(tmp), *ROOTFS_MIRRORS],
        capture_output=True, text=True, timeout=900,
        env={"PATH": SYS_PATH, "LC_ALL": "C.UTF-8", "TMPDIR": "/var/tmp"})
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        _require(False, "cannot build the bookworm rootfs with mmdebstrap (is the Debian "
                        "archive reachable?):\n" + (proc.stdout + proc.stderr)[-3000:])
    subprocess.run(["chroot", str(tmp), "apt-cache", "gencaches"], check=True,
                   capture_output=True, env={"PATH": SYS_PATH, "LC_ALL": "C.UTF-8"})
    tmp.rename(dest)


def _rootfs(stack: contextlib.ExitStack) -> Path:
    """The newest cached rootfs (built if missing or stale), share-locked for this session."""
    CACHE.mkdir(parents=True, exist_ok=True)
    prefix = f"bookworm-booted-{_rootfs_key()}-"
    with _flock(CACHE / "build.lock"):
        built = sorted(p for p in CACHE.glob(prefix + "*")
                       if p.is_dir() and not p.name.endswith(".tmp"))
        if built and time.time() - int(built[-1].name.rsplit("-", 1)[1]) < ROOTFS_MAX_AGE:
            current = built[-1]
        else:
            current = CACHE / f"{prefix}{int(time.time())}"
            _build_rootfs(current)
        # Older builds, and builds for another ROOTFS_INCLUDE/mirror list.
        built = [p for p in CACHE.glob("bookworm-booted-*")
                 if p.is_dir() and not p.name.endswith(".tmp")]
        # Held until the session ends: an older rootfs is deleted only when no
        # test run still boots from it.
        lock = stack.enter_context(_flock(CACHE / f"{current.name}.lock", fcntl.LOCK_SH))
        assert lock >= 0
        for old in built:
            if old == current:
                continue
            fd = os.open(CACHE / f"{old.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
            shutil.rmtree(old, ignore_errors=True)
            (CACHE / f"{old.name}.lock").unlink(missing_ok=True)
    return current


def _link_debs(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for deb in src.glob("*.deb"):
        target = dest / deb.name
        if target.exists():
            continue
        try:
            os.link(deb, target)
        except OSError:
            shutil.copy2(deb, target)


# ---------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Kind:
    """What differs between the .deb and the .rpm; the tests are one code path."""

    name: str  # "deb" | "rpm"

    def package(self, dist: Path, version: str) -> Path:
        if self.name == "deb":
            return dist / f"scistreamd_{version}_all.deb"
        return dist / f"scistreamd-{version}-1.noarch.rpm"

    def version(self, host: Host) -> str:
        if self.name == "deb":
            return _sh(host, "dpkg-query -W -f='${Version}' scistreamd", check=False)
        return _sh(host, "rpm -q --qf '%{VERSION}' scistreamd", check=False)

    def installed(self, host: Host) -> bool:
        if self.name == "deb":
            status = _sh(host, "dpkg-query -W -f='${Status}' scistreamd", check=False).strip()
            return status not in ("", "unknown ok not-installed")
        return host.run(["rpm", "-q", "scistreamd"], check=False).returncode == 0

    def files(self, host: Host) -> List[str]:
        cmd = "dpkg -L scistreamd" if self.name == "deb" else "rpm -ql scistreamd"
        return [p for p in _sh(host, cmd).split() if not p.endswith("/.")]

    def upgrade(self, host: Host) -> str:
        # Offline, as a copied-in package: every dependency is already installed.
        if self.name == "deb":
            return host.run(APT + ["install", "/run/testbed/upgrade.deb"], timeout=300).stdout
        return _rpm(host, "-U", "/run/testbed/upgrade.rpm")

    def remove(self, host: Host) -> str:
        if self.name == "deb":
            return host.run(APT + ["purge", "scistreamd"], timeout=300).stdout
        return _rpm(host, "-e", "scistreamd", nodeps=False)


def _rpm(host: Host, *args: str, nodeps: bool = True) -> str:
    """Debian's rpm with the scriptlets on. --force-debian: Debian's rpm refuses
    to install otherwise; --nodeps: its database knows no Debian package."""
    argv = ["rpm", *args[:1], "--force-debian", *(["--nodeps"] if nodeps else []), *args[1:]]
    proc = host.run(argv, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{host.name}: {' '.join(argv)} exited {proc.returncode}:\n{out}"
    # rpm reports a failed scriptlet as a warning and still exits 0.
    assert "scriptlet failed" not in out and "error:" not in out, f"{host.name}: {out}"
    return out


@dataclass
class Booted:
    bed: Testbed
    kind: Kind
    pkg: Path
    upgrade_pkg: Path
    lower: Path
    install_logs: Dict[str, str] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    notes: Dict[str, object] = field(default_factory=dict)
    tunnel: Dict[str, str] = field(default_factory=dict)
    failed: List[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Host:
        return self.bed[name]

    def journals(self, lines: int = 40) -> str:
        return "".join(f"\n--- journal of {h.name} (last {lines} lines)\n"
                       f"{h.journal('-n', str(lines))}" for h in self.bed.hosts.values())


def _sh(host: Host, script: str, *, check: bool = True, timeout: float = 120,
        input: Optional[str] = None) -> str:
    return host.run(["sh", "-c", script], check=check, timeout=timeout, input=input).stdout


def _value(host: Host, unit: str, prop: str) -> str:
    return _sh(host, f"systemctl show -p {prop} --value {unit}").strip()


def _relays(host: Host) -> List[str]:
    out = _sh(host, "systemctl list-units --all --plain --no-legend 'scistream-*-*.service'")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _listening(host: Host, port: int) -> bool:
    return bool(_sh(host, f"ss -Htln 'sport = :{port}'", check=False).strip())


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _step(booted: Booted, name: str) -> Iterator[None]:
    """Record how long a step took (printed when the module's test bed goes down)."""
    t = time.monotonic()
    try:
        yield
    finally:
        booted.timings[name] = round(time.monotonic() - t, 1)


def _prerequisite(booted: Booted, *steps: str) -> None:
    missing = [s for s in steps if s in booted.failed]
    if missing:
        pytest.fail(f"cannot run: the earlier step(s) {', '.join(missing)} failed")


@pytest.fixture
def track(request: pytest.FixtureRequest, booted: Booted) -> Iterator[None]:
    """Remember failed steps, so later steps that build on them say so."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        booted.failed.append(request.node.originalname)


# ---------------------------------------------------------------------------
# the booted, installed test bed


def _chroot_install(bed: Testbed, host: Host, pkg_dir: Path, *what: str) -> str:
    """`apt-get install WHAT...` in the host's root, before it boots: package
    names, or the .deb as /run/install-test/<name> (pkg_dir is bound there).

    Downloads go to a per-host copy (hard links) of the shared .deb cache, so
    the two hosts' apt runs never contend for one archives/ lock; new .debs
    are linked back into the cache afterwards.
    """
    archives = host.state / "apt-archives"
    _link_debs(CACHE / "apt-archives", archives)
    (archives / "partial").mkdir(exist_ok=True)
    # The .deb is reached through a bind on the chroot's (tmpfs) /run, and
    # policy-rc.d is made and removed through the overlay: the host's root
    # keeps nothing of either.
    binds = {archives: "/var/cache/apt/archives", pkg_dir: "/run/install-test"}
    script = ('printf "%s" "$1" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d; '
              'shift; "$@"; rc=$?; rm -f /usr/sbin/policy-rc.d; exit $rc')

    def apt(*args: str) -> subprocess.CompletedProcess:
        return bed.chroot(host, ["sh", "-c", script, "sh", POLICY_RC_D, *APT, *args],
                          binds=binds, check=False)

    install = ("install", *what)
    proc = apt(*install)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and re.search(r"Failed to fetch|Unable to fetch|404\s+Not Found", log):
        # The cached package lists predate a point release: refresh them, retry.
        upd = apt("update")
        proc = apt(*install)
        log += upd.stdout + upd.stderr + proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise BedError(f"{host.name}: apt-get install {' '.join(what)} failed:\n{log[-5000:]}")
    with _flock(CACHE / "apt-archives.lock"):
        _link_debs(archives, CACHE / "apt-archives")
    shutil.rmtree(archives)
    return log


def _rpm_requires_on_debian(rpm: Path) -> List[str]:
    """The Debian packages that stand in for the .rpm's Requires and Recommends."""
    out = subprocess.run(["rpm", "-qp", "--requires", "--recommends", str(rpm)],
                         capture_output=True, text=True, check=True,
                         env={"PATH": SYS_PATH, "LC_ALL": "C.UTF-8"}).stdout
    debs, unknown = set(), []
    for line in out.splitlines():
        name = line.split()[0]
        if name.startswith(("rpmlib(", "config(")):
            continue
        if name in RPM_REQUIRES_ON_DEBIAN:
            deb = RPM_REQUIRES_ON_DEBIAN[name]
        elif re.fullmatch(r"python3-[a-z0-9.-]+", name):
            deb = name
        elif re.fullmatch(r"python3dist\([A-Za-z0-9._-]+\)", name):
            # Fedora's generic name of a Python distribution: Debian's python3-<name>.
            deb = "python3-" + re.sub(r"[._]", "-", name[len("python3dist("):-1].lower())
        else:
            unknown.append(name)
            continue
        if deb:
            debs.add(deb)
    assert not unknown, (f"the .rpm requires {unknown}: add the Debian package of each to "
                         "RPM_REQUIRES_ON_DEBIAN in tests/packaging/test_install_booted.py")
    return sorted(debs)


@pytest.fixture(scope="module", params=["deb", "rpm"])
def booted(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Booted]:
    _check_prerequisites()
    kind = Kind(request.param)
    # Only now: a skip for missing prerequisites need not build the packages first.
    dist: Path = request.getfixturevalue("dist")
    pkg = kind.package(dist, VERSION)
    assert pkg.is_file(), f"no {pkg.name} in {dist}"
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        lower = _rootfs(stack)
        rootfs_time = round(time.monotonic() - t0, 1)
        out = tmp_path_factory.mktemp(f"upgrade-{kind.name}")
        # The .deb's scistreamd starts at boot; the .rpm is installed after it.
        bed = Testbed(name=TESTBED_NAME, rootfs=lower,
                      wait_units=("scistreamd.service",) if kind.name == "deb" else ())
        booted = Booted(bed, kind, pkg, kind.package(out, UPGRADE_VERSION), lower)
        booted.timings["rootfs cache"] = rootfs_time
        if kind.name == "deb":
            what = (f"/run/install-test/{pkg.name}",)
        else:
            # The .rpm's dependencies and Debian's rpm; the .rpm itself is
            # installed on the running system (test_install).
            what = (*_rpm_requires_on_debian(pkg), "rpm")
            booted.notes["apt packages for the .rpm"] = what

        def before_boot(b: Testbed) -> None:
            t = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                # The upgrade package builds while apt installs.
                upgrade = pool.submit(run_build, "--outdir", str(out), kind.name,
                                      env_extra={"PKG_VERSION": UPGRADE_VERSION})
                installs = {h.name: pool.submit(_chroot_install, b, h, pkg.parent, *what)
                            for h in b.hosts.values()}
                for name, fut in installs.items():
                    booted.install_logs[name] = fut.result()
                proc = upgrade.result()
            assert proc.returncode == 0, f"PKG_VERSION={UPGRADE_VERSION} build:\n{proc.stdout}"
            booted.timings["chroot installs + upgrade build"] = round(time.monotonic() - t, 1)

        t = time.monotonic()
        try:
            bed.up(timeout=120, before_boot=before_boot)
        except BedError as e:
            bed.down()
            pytest.fail(f"installing scistreamd or booting the hosts failed: {e}")
        booted.timings["up (incl. installs)"] = round(time.monotonic() - t, 1)
        failed_before = request.session.testsfailed
        keep = os.environ.get("SCISTREAMD_PKGTEST_KEEP") == "1"
        try:
            yield booted
        finally:
            print(f"\nbooted install test ({kind.name}) timings (s): {booted.timings} "
                  f"{booted.notes}")
            with contextlib.suppress(OSError):
                (bed.root / f"timings-{kind.name}.json").write_text(
                    json.dumps({"timings_s": booted.timings, **booted.notes}, indent=1))
            if keep:
                # Debugging: the hosts stay up; `SCISTREAM_TESTBED_NAME=<name> python3
                # -m tests.testbed exec server1 -- CMD`, later `... down`.
                print(f"SCISTREAMD_PKGTEST_KEEP=1: test bed {TESTBED_NAME} left running")
            else:
                bed.down()
        if not keep:
            if request.session.testsfailed == failed_before:
                # Passed: the hosts' roots (~150 MB each) are of no further use.
                for h in bed.hosts.values():
                    shutil.rmtree(h.state / "root-upper", ignore_errors=True)
            left = leftovers(TESTBED_NAME)
            assert not left, f"the test bed {TESTBED_NAME} left: {left}"


# ---------------------------------------------------------------------------
# the tests, in order


def test_install(booted: Booted, track: None) -> None:
    """.deb: apt resolved every dependency from the archive (before boot).
    .rpm: rpm installs it on the running systems, scriptlets on, overriding
    nothing but the dependency names."""
    status = (booted.lower / "var/lib/dpkg/status").read_text()
    for name in DEPENDENCIES:
        # Not in the rootfs before: apt had to fetch it from the archive.
        assert f"\nPackage: {name}\n" not in status, f"{name} is in the base rootfs"
    hosts = list(booted.bed.hosts.values())
    if booted.kind.name == "deb":
        for host in hosts:
            log = booted.install_logs[host.name]
            new = re.search(r"NEW packages will be installed:\n((?:  .*\n)+)", log)
            assert new, f"{host.name}: apt installed nothing new:\n{log[-3000:]}"
            listed = set(new.group(1).split())
            assert {"scistreamd", *DEPENDENCIES} <= listed, listed
    else:
        requires = [ln.split()[0] for ln in subprocess.run(
            ["rpm", "-qp", "--requires", str(booted.pkg)], capture_output=True, text=True,
            check=True, env={"PATH": SYS_PATH}).stdout.splitlines()]
        for host in hosts:
            shutil.copy(booted.pkg, host.state / "shared/scistreamd.rpm")
            # Without --nodeps, the only complaints are the dependency names
            # (the rpm database knows no Debian package): nothing else is overridden.
            proc = host.run(["rpm", "-i", "--test", "--force-debian",
                             "/run/testbed/scistreamd.rpm"], check=False)
            needed = re.findall(r"^\s+(\S+)(?: [<>=]+ \S+)? is needed by scistreamd",
                                proc.stderr, re.M)
            other = [ln for ln in proc.stderr.splitlines()
                     if ln.strip() and "is needed by" not in ln
                     and not ln.startswith("error: Failed dependencies")]
            assert proc.returncode != 0 and needed, proc.stderr
            assert set(needed) <= set(requires) and not other, proc.stderr
            booted.notes[f"{host.name}: rpm -i --nodeps overrides"] = len(needed)
        with _step(booted, "rpm -i both hosts (parallel)"), \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            for fut in [pool.submit(_rpm, h, "-i", "/run/testbed/scistreamd.rpm")
                        for h in hosts]:
                fut.result()
    for host in hosts:
        for name in DEPENDENCIES:
            st = _sh(host, f"dpkg-query -W -f='${{Status}} ${{Version}}' {name}")
            assert st.startswith("install ok installed"), f"{host.name}: {name}: {st}"
        assert booted.kind.version(host) == VERSION


def test_scistreamd_is_active_after_boot(booted: Booted, track: None) -> None:
    _prerequisite(booted, "test_install")
    for host in booted.bed.hosts.values():
        state = _sh(host, "systemctl is-active scistreamd", check=False).strip()
        assert state == "active", f"{host.name}: scistreamd is {state}" + booted.journals()
        assert _sh(host, "systemctl is-enabled scistreamd").strip() == "enabled"
        system = _sh(host, "systemctl is-system-running", check=False).strip()
        failed = _sh(host, "systemctl --failed --plain --no-legend", check=False)
        assert system == "running", f"{host.name}: system {system}; failed units:\n{failed}"
        # %pre / postinst: the groups; tmpfiles.d: the directories.
        assert _sh(host, "getent group scistream").startswith("scistream:")
        assert _sh(host, "getent group scistream-relay").startswith("scistream-relay:")
        assert _sh(host, "stat -c '%a %U' /run/scistream-relay").strip() == "755 root"
        assert _sh(host, "stat -c %a /var/lib/scistream").strip() == "700"
        assert _sh(host, "stat -c %a /var/lib/scistream/keys").strip() == "700"
        # The postinst / %post made a host certificate (first install).
        assert "BEGIN CERTIFICATE" in _sh(host, "cat /etc/scistream/server.crt")
        # ... and compiled the private module dir for the python3 installed here.
        tag = _sh(host, "python3 -c 'import sys; print(sys.implementation.cache_tag)'").strip()
        pyc = _sh(host, f"ls /usr/share/scistreamd/scistreamd/__pycache__/ | grep -c '{tag}'",
                  check=False).strip()
        assert int(pyc or 0) > 10, f"{host.name}: no {tag} bytecode"
        assert "No endpoints." in _sh(host, "scistreamctl list")
        # Shell completion: bash loads the shipped file, and the packaged entry
        # point answers argcomplete's protocol (python3-argcomplete, recommended).
        assert "_python_argcomplete" in _sh(
            host, "bash -c '. /usr/share/bash-completion/completions/scistreamctl && "
                  "complete -p scistreamctl'")
        comp = _sh(host, "COMP_LINE='scistreamctl rel' COMP_POINT=16 _ARGCOMPLETE=1 "
                         "_ARGCOMPLETE_IFS=' ' scistreamctl 8>&1 9>/dev/null >/dev/null 2>&1")
        assert comp.split() == ["release"], f"{host.name}: completion gave {comp!r}"


def _configure(s1: Host, s2: Host) -> None:
    """The one manual step after a fresh install (issue 15): exchange trust files, reload.

    Nothing else is configured: the package's own certificate must already name
    the host's real address and the peer port must answer there.
    """
    for host in (s1, s2):
        san = _sh(host, "openssl x509 -noout -ext subjectAltName -in /etc/scistream/server.crt")
        assert f"IP Address:{host.ip}" in san, f"{host.name}: first-install certificate: {san}"
        assert _listening(host, 5000), f"{host.name}: the peer port does not listen after install"
    # Exchange host certificates (each is the other's peer_trust_file).
    for a, b in ((s1, s2), (s2, s1)):
        _sh(b, "cat > /etc/scistream/peer-ca.crt", input=_sh(a, "cat /etc/scistream/server.crt"))
    for host in (s1, s2):
        _sh(host, "systemctl reload scistreamd")


def test_guide_scenario_between_installed_hosts(booted: Booted, track: None) -> None:
    _prerequisite(booted, "test_scistreamd_is_active_after_boot")
    s1, s2 = booted["server1"], booted["server2"]
    with _step(booted, "configure + scenario"):
        _configure(s1, s2)
        s1.run(["systemd-run", "--unit=iperf3-server", "--collect", "-p", "DynamicUser=yes",
                "iperf3", "-s", "-p", str(IPERF_PORT)])
        _wait_for(lambda: _listening(s1, IPERF_PORT), 10, "iperf3 -s")
        out = s1.run(["scistreamctl", "inbound-request", "--remote_ip", s1.ip,
                      "--s2cs", f"{s1.ip}:5000", "--receiver_ports", str(IPERF_PORT),
                      "--num_conn", "1", "--server_cert=/etc/scistream/server.crt"]).stdout
        uid = re.search(r"^([0-9a-f-]{36}) ", out, re.M).group(1)
        listeners = ast.literal_eval(re.search(r"Listeners: (\[.*\])", out).group(1))
        assert listeners == [f"{s1.ip}:5100"], out
        out2 = s2.run(["scistreamctl", "outbound-request", "--remote_ip", s1.ip,
                       "--s2cs", f"{s2.ip}:5000", "--receiver_ports", str(CLIENT_PORT),
                       "--num_conn", "1", "--server_cert=/etc/scistream/peer-ca.crt",
                       uid, listeners[0]]).stdout
        assert f"Listeners: ['{s2.ip}:{CLIENT_PORT}']" in out2, out2
        booted.tunnel.update(uid=uid, listener=listeners[0])

        for host in (s1, s2):
            ss = _sh(host, "ss -tlpn")
            assert "stunnel" in ss, f"{host.name}: no stunnel listens:\n{ss}"
            assert len(_relays(host)) == 1, _relays(host)
        res = json.loads(s2.run(["iperf3", "-c", s2.ip, "-p", str(CLIENT_PORT), "-t", "2",
                                 "-J"], timeout=60).stdout)
        assert "error" not in res, res.get("error")
        assert res["end"]["sum_received"]["bytes"] > 1_000_000, res["end"]


def test_upgrade_keeps_the_tunnel_carrying_data(booted: Booted, track: None) -> None:
    _prerequisite(booted, "test_guide_scenario_between_installed_hosts")
    s1, s2 = booted["server1"], booted["server2"]
    uid = booted.tunnel["uid"]
    relays = {h.name: _relays(h) for h in (s1, s2)}
    relay_pids = {h.name: [_value(h, u, "MainPID") for u in relays[h.name]] for h in (s1, s2)}
    daemon_pids = {h.name: _value(h, "scistreamd", "MainPID") for h in (s1, s2)}

    # A single TCP connection through the tunnel, running across both upgrades.
    s1.run(["systemctl", "stop", "iperf3-server"])
    for host in (s1, s2):
        shutil.copy(Path(__file__).with_name("xfer.py"), host.state / "shared/xfer.py")
        shutil.copy(booted.upgrade_pkg, host.state / f"shared/upgrade.{booted.kind.name}")
    sink_out = s1.state / "shared/sink.json"
    source_out = s2.state / "shared/source.json"
    stop = s2.state / "shared/stop"
    s1.run(["systemd-run", "--unit=xfer-sink", "--collect", "-p", "Restart=no",
            "python3", "/run/testbed/xfer.py", "sink", str(IPERF_PORT), "/run/testbed/sink.json"])
    _wait_for(lambda: _listening(s1, IPERF_PORT), 10, "the transfer's sink")
    s2.run(["systemd-run", "--unit=xfer-source", "--collect", "-p", "Restart=no",
            "python3", "/run/testbed/xfer.py", "source", s2.ip, str(CLIENT_PORT),
            "/run/testbed/stop", "/run/testbed/source.json"])

    def received() -> int:
        return (_read_json(Path(f"{sink_out}.progress")) or {}).get("bytes", 0)

    _wait_for(lambda: received() > 1 << 20, 20, "data through the tunnel before the upgrade")
    before = received()
    with _step(booted, "upgrade both hosts (parallel)"), \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        for fut in [pool.submit(booted.kind.upgrade, h) for h in (s1, s2)]:
            fut.result()
    during = received()
    assert during > before, "no data arrived while the packages were upgraded"

    for host in (s1, s2):
        version = booted.kind.version(host)
        assert version == UPGRADE_VERSION, f"{host.name}: {version}"
        assert _sh(host, "systemctl is-active scistreamd", check=False).strip() == "active"
        new_pid = _value(host, "scistreamd", "MainPID")
        assert new_pid != daemon_pids[host.name], f"{host.name}: scistreamd was not restarted"
        running = _sh(host, "busctl get-property org.scistream.Tunnel1 /org/scistream/Tunnel1 "
                            "org.scistream.Tunnel1.Manager Version")
        assert UPGRADE_VERSION in running, f"{host.name}: the daemon runs {running}"
        # The relays were not touched: same units, same processes, no restart.
        assert _relays(host) == relays[host.name]
        for unit, pid in zip(relays[host.name], relay_pids[host.name]):
            assert _value(host, unit, "MainPID") == pid, f"{host.name}: {unit} was restarted"
            assert _value(host, unit, "NRestarts") == "0"
        # The new daemon re-adopted the tunnel.
        listing = _sh(host, "scistreamctl list")
        assert uid in listing and "active" in listing, f"{host.name}:\n{listing}"

    # Data keeps flowing after the upgrade, then the transfer ends cleanly.
    _wait_for(lambda: received() > during + (1 << 20), 20, "data after the upgrade")
    stop.touch()
    _wait_for(lambda: sink_out.exists() and source_out.exists(), 60,
              "the transfer to finish" + booted.journals(20))
    sent, got = _read_json(source_out), _read_json(sink_out)
    assert sent == got, f"sent {sent}, received {got}"
    booted.notes["bytes carried across the upgrade"] = got["bytes"]

    # And the tunnel takes new connections.
    s1.run(["systemd-run", "--unit=iperf3-server", "--collect", "-p", "DynamicUser=yes",
            "iperf3", "-s", "-p", str(IPERF_PORT)])
    _wait_for(lambda: _listening(s1, IPERF_PORT), 10, "iperf3 -s")
    res = json.loads(s2.run(["iperf3", "-c", s2.ip, "-p", str(CLIENT_PORT), "-t", "1", "-J"],
                            timeout=60).stdout)
    assert "error" not in res and res["end"]["sum_received"]["bytes"] > 0, res.get("error")
    s1.run(["systemctl", "stop", "iperf3-server"])


#: What `rpm -e` leaves, by design: the operator's configuration (rpm has no
#: purge). Here: the trust file of _configure() and the host certificate.
#: Everything else must be gone, as after `apt-get purge`.
RPM_KEPT_CONFIG = {"/etc/scistream", "/etc/scistream/conf.d", "/etc/scistream/peer-ca.crt",
                   "/etc/scistream/server.crt", "/etc/scistream/server.key"}


def test_removal_leaves_nothing_behind(booted: Booted, track: None) -> None:
    """`apt-get purge` / `rpm -e`, with the tunnel still up."""
    _prerequisite(booted, "test_scistreamd_is_active_after_boot")
    hosts = list(booted.bed.hosts.values())
    tunnel_up = bool(booted.tunnel) and all(_relays(h) for h in hosts)
    files = {h.name: booted.kind.files(h) for h in hosts}
    with _step(booted, "remove both hosts (parallel)"), \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        for fut in [pool.submit(booted.kind.remove, h) for h in hosts]:
            fut.result()
    for host in hosts:
        problems = []
        if booted.kind.installed(host):
            problems.append(f"{booted.kind.name} still knows scistreamd")
        units = _sh(host, "systemctl list-units --all --plain --no-legend 'scistream*'")
        units += _sh(host, "systemctl list-unit-files --plain --no-legend 'scistream*'",
                     check=False)  # exits 1 when nothing matches
        if units.strip():
            problems.append(f"units:\n{units}")
        relays = _sh(host, "for p in /proc/[0-9]*; do c=$(cat $p/comm 2>/dev/null) || continue; "
                           "case $c in stunnel*|scistream*) echo \"$p $c\";; esac; done")
        if relays.strip():
            problems.append(f"processes:\n{relays}")
        ports = [line for line in _sh(host, "ss -Htln").splitlines()
                 if re.search(r":(5000|51\d\d|5200)\s", line)]
        if ports:
            problems.append(f"listening: {ports}")
        # Not counted: systemd 252 itself leaves /run/systemd/units/log-extra-fields:<unit>
        # (its runtime record of a unit's LogExtraFields=, on tmpfs) behind for every
        # stopped transient unit that had LogExtraFields, scistream's or not.
        left = _sh(host, "find / \\( -path /proc -o -path /sys -o -path /dev "
                         "-o -path /run/testbed \\) -prune "
                         "-o -path '/run/systemd/units/log-extra-fields:scistream-*' "
                         "-o -iname '*scistream*' -print", check=False).split()
        kept: List[str] = []
        if booted.kind.name == "rpm":
            kept = _sh(host, "find /etc/scistream", check=False).split()
            extra = sorted(set(kept) - RPM_KEPT_CONFIG)
            if extra:
                problems.append(f"/etc/scistream holds more than the configuration: {extra}")
            booted.notes[f"{host.name}: kept by rpm -e"] = kept
        left = [p for p in left if p not in kept]
        if left:
            problems.append(f"files: {left}")
        shipped = [p for p in files[host.name] if p not in kept]
        still = host.run(["sh", "-c", 'for f; do [ -e "$f" ] && [ ! -d "$f" ] && echo "$f"; '
                                      'done; true', "sh", *shipped]).stdout.split()
        if still:
            problems.append(f"shipped files left: {still}")
        for db in ("group", "passwd", "gshadow", "shadow"):
            hit = _sh(host, f"grep -i scistream /etc/{db}", check=False).strip()
            if hit:
                problems.append(f"/etc/{db}: {hit}")
        assert not problems, f"{host.name} after removal:\n" + "\n".join(problems)
    assert tunnel_up, "the removal ran without a tunnel up, so 'no relays left' was not tested"
