"""The .deb and .rpm built from this tree: names, contents, metadata, scripts, lint.

A stand-in for the install test on a booted system: it checks what the
packages contain and what their maintainer scripts will do, not that they run.
The build tools come from `make packaging-deps`; without them these tests are
skipped with that reason (or fail, with SCISTREAMD_REQUIRE_PACKAGES=1).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Set

import pytest

from .conftest import LINT_TOOLS, ROOT, SYS_PATH, require_tools, run_build

VERSION_RE = re.compile(r'^__version__\s*=\s*"([^"]+)"', re.M)
VERSION = VERSION_RE.search((ROOT / "scistreamd" / "__init__.py").read_text()).group(1)

#: The Python modules of the tree (sub-packages included, e.g. ctl/cli.py); every
#: one must be in both packages.
MODULES = sorted(p.relative_to(ROOT / "scistreamd").as_posix()
                 for p in (ROOT / "scistreamd").rglob("*.py"))

#: The application's private module directory in both packages (the entry points
#: in packaging/bin put it on sys.path): no python3.X path, so no Python ABI dependency.
APPDIR = "/usr/share/scistreamd"

#: Paths both packages install, except for the systemd unit dir.
COMMON_PATHS = [
    "/usr/bin/scistreamctl",
    "/usr/sbin/scistreamd",
    "/usr/share/dbus-1/system.d/org.scistream.Tunnel1.conf",
    "/usr/share/polkit-1/actions/org.scistream.tunnel1.policy",
    "/usr/share/dbus-1/interfaces/org.scistream.Tunnel1.Manager.xml",
    "/usr/share/dbus-1/interfaces/org.scistream.Tunnel1.Endpoint.xml",
    "/usr/share/bash-completion/completions/scistreamctl",
    "/usr/lib/sysusers.d/scistream.conf",
    "/usr/lib/tmpfiles.d/scistream.conf",
    "/etc/scistream/scistreamd.toml",
    "/etc/scistream/conf.d",
    "/usr/share/man/man1/scistreamctl.1.gz",
    "/usr/share/man/man5/scistreamd.toml.5.gz",
    "/usr/share/man/man8/scistreamd.8.gz",
    "/usr/share/doc/scistreamd/examples/local.toml",
]
UNITS = ["scistreamd.service", "scistream.slice", "scistream-.service.d/50-hardening.conf"]
DEB_UNIT_DIR = "/lib/systemd/system"  # bookworm's systemdsystemunitdir
RPM_UNIT_DIR = "/usr/lib/systemd/system"

DEB_DEPENDS = [
    "python3-dbus-next",
    "python3-jeepney",
    "python3-systemd",
    "python3-toml",
    "python3-cryptography",
    "python3-requests",
    "stunnel4",
    "systemd",
]
RPM_REQUIRES = [
    "python3-dbus-next",
    "python3-jeepney",
    "python3-systemd",
    "python3-toml",
    "python3-cryptography",
    "python3-requests",
    "stunnel",
    "dbus",
]


def run(*argv: str) -> str:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env={"PATH": SYS_PATH, "LC_ALL": "C.UTF-8"},
    )
    assert proc.returncode == 0, f"{' '.join(argv)} failed: {proc.stderr}"
    return proc.stdout


def code(script: str) -> str:
    """A shell script without its comment lines (comments may name what code must not)."""
    return "\n".join(ln for ln in script.splitlines() if not ln.lstrip().startswith("#"))


# ---------------------------------------------------------------------------
# .deb


@pytest.fixture(scope="module")
def deb(dist: Path) -> Path:
    path = dist / f"scistreamd_{VERSION}_all.deb"
    assert path.is_file(), f"no {path.name} in {sorted(p.name for p in dist.iterdir())}"
    return path


@pytest.fixture(scope="module")
def deb_paths(deb: Path) -> Set[str]:
    # Lines like "-rw-r--r-- root/root 409 2025-11-25 12:00 ./usr/bin/x" (dirs end in /).
    paths = set()
    for line in run("dpkg-deb", "-c", str(deb)).splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        paths.add(name[1:].rstrip("/") or "/")
    return paths


@pytest.fixture(scope="module")
def deb_control(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb-control")
    run("dpkg-deb", "-e", str(deb), str(out))
    return out


def test_deb_is_named_after_the_tree_version(deb: Path) -> None:
    assert run("dpkg-deb", "-f", str(deb), "Version").strip() == VERSION
    assert run("dpkg-deb", "-f", str(deb), "Architecture").strip() == "all"


@pytest.mark.parametrize("path", COMMON_PATHS + [f"{DEB_UNIT_DIR}/{u}" for u in UNITS])
def test_deb_contains(deb_paths: Set[str], path: str) -> None:
    assert path in deb_paths


def test_deb_contains_every_module_in_the_private_dir(deb_paths: Set[str]) -> None:
    missing = [m for m in MODULES if f"{APPDIR}/scistreamd/{m}" not in deb_paths]
    assert not missing, f"modules missing from the .deb: {missing}"
    # Nothing in the interpreter's own directories, no build-host bytecode.
    public = [p for p in deb_paths if re.search(r"/python3(\.\d+)?/(dist|site)-packages", p)]
    assert not public, public
    assert not [p for p in deb_paths if p.endswith(".pyc")]


def test_deb_ships_readme_example_and_completion(deb_paths: Set[str]) -> None:
    assert deb_paths & {"/usr/share/doc/scistreamd/README.md",
                        "/usr/share/doc/scistreamd/README.md.gz"}
    assert "/usr/share/bash-completion/completions/scistreamctl" in deb_paths


def test_deb_compiles_the_private_dir_for_the_installed_python(deb_control: Path) -> None:
    postinst = (deb_control / "postinst").read_text()
    assert "py3compile -p scistreamd /usr/share/scistreamd" in postinst
    assert "py3clean -p scistreamd" in (deb_control / "prerm").read_text()


def test_deb_daemon_is_only_in_sbin(deb_paths: Set[str]) -> None:
    assert "/usr/bin/scistreamd" not in deb_paths


def test_deb_conffile_is_the_default_config(deb_control: Path) -> None:
    conffiles = (deb_control / "conffiles").read_text().split()
    assert conffiles == ["/etc/scistream/scistreamd.toml"]


def test_deb_depends(deb: Path) -> None:
    depends = run("dpkg-deb", "-f", str(deb), "Depends")
    names = {re.split(r"[\s(]", alt.strip())[0] for alt in re.split(r"[,|]", depends)}
    missing = [d for d in DEB_DEPENDS if d not in names]
    assert not missing, f"Depends lacks {missing}: {depends}"
    assert "python3:any" in names or "python3" in names
    # The private module dir works with any python3 >= 3.9 (no python3.11 pin).
    assert "python3 (>= 3.9)" in depends, depends
    assert "python3.11" not in depends and "python3 (<<" not in depends, depends
    assert "dbus-system-bus" in names or "default-dbus-system-bus" in names


def test_deb_postinst_generates_the_cert_only_if_absent_then_starts(deb_control: Path) -> None:
    text = (deb_control / "postinst").read_text()
    gen = text.index("/usr/sbin/scistreamd --generate-cert")
    assert "[ ! -e /etc/scistream/server.crt ]" in text[:gen]
    # The certificate exists before the service is first started.
    assert gen < text.index("deb-systemd-invoke $_dh_action 'scistreamd.service'")
    assert "systemd-sysusers" in text and "scistream.conf" in text
    assert "systemd-tmpfiles" in text
    assert "deb-systemd-helper enable 'scistreamd.service'" in text


def test_deb_upgrade_restarts_the_daemon_but_never_the_relays(deb_control: Path) -> None:
    postinst = code((deb_control / "postinst").read_text())
    # On upgrade ($2 set) the daemon is restarted in postinst ...
    assert "_dh_action=restart" in postinst
    # ... and nothing touches the relays' slice, whose restart would stop every tunnel.
    assert "scistream.slice" not in postinst
    # No stop of anything before an upgrade.
    preinst = deb_control / "preinst"
    assert not preinst.exists() or "stop" not in code(preinst.read_text())


def test_deb_remove_stops_daemon_and_relays(deb_control: Path) -> None:
    prerm = (deb_control / "prerm").read_text()
    assert re.search(r'"\$1" = remove .*\n\s*deb-systemd-invoke stop .scistreamd\.service', prerm)
    # The slice is stopped on remove only (not "upgrade"), after the daemon.
    m = re.search(
        r'if \[ "\$1" = "remove" \][^\n]*\n\s*deb-systemd-invoke stop scistream\.slice', prerm
    )
    assert m, prerm
    assert prerm.index("stop 'scistreamd.service'") < m.start()


def test_deb_purge_removes_config_state_keys_and_group(deb_control: Path) -> None:
    postrm = (deb_control / "postrm").read_text()
    purge = postrm[postrm.index('if [ "$1" = "purge" ]; then\n    rm -rf') :]
    assert "rm -rf /etc/scistream /var/lib/scistream" in purge
    assert 'for group in scistream scistream-relay; do' in purge
    assert 'groupdel "$group"' in purge


# ---------------------------------------------------------------------------
# .rpm


@pytest.fixture(scope="module")
def rpm(dist: Path) -> Path:
    path = dist / f"scistreamd-{VERSION}-1.noarch.rpm"
    assert path.is_file(), f"no {path.name} in {sorted(p.name for p in dist.iterdir())}"
    return path


def rpm_query(rpm: Path, *args: str) -> str:
    return run("rpm", "-qp", *args, str(rpm))


@pytest.fixture(scope="module")
def rpm_paths(rpm: Path) -> Set[str]:
    return set(rpm_query(rpm, "-l").split())


@pytest.fixture(scope="module")
def rpm_scripts(rpm: Path) -> Dict[str, str]:
    """Scriptlet name ("preinstall", "postuninstall", ...) -> body."""
    out: Dict[str, str] = {}
    current: List[str] = []
    for line in rpm_query(rpm, "--scripts").splitlines():
        m = re.match(r"^(\w+) scriptlet \(using /bin/sh\):$", line)
        if m:
            current = out.setdefault(m.group(1), [])  # type: ignore[assignment]
            continue
        current.append(line)
    return {k: "\n".join(v) for k, v in out.items()}  # type: ignore[arg-type]


def test_rpm_is_named_after_the_tree_version(rpm: Path) -> None:
    assert rpm_query(rpm, "--qf", "%{VERSION}-%{RELEASE} %{ARCH}") == f"{VERSION}-1 noarch"


@pytest.mark.parametrize("path", COMMON_PATHS + [f"{RPM_UNIT_DIR}/{u}" for u in UNITS])
def test_rpm_contains(rpm_paths: Set[str], path: str) -> None:
    assert path in rpm_paths


def test_rpm_contains_every_module_in_the_private_dir(rpm_paths: Set[str]) -> None:
    missing = [m for m in MODULES if f"{APPDIR}/scistreamd/{m}" not in rpm_paths]
    assert not missing, f"modules missing from the .rpm: {missing}"
    # Nothing in a python3.X directory (that is what makes rpm add python(abi) =
    # 3.X), and no bytecode of the build host's Python.
    assert not [p for p in rpm_paths if re.search(r"/python3\.\d+/", p)]
    assert not [p for p in rpm_paths if p.endswith(".pyc") or "__pycache__" in p]


def test_rpm_ships_readme_example_and_completion(rpm_paths: Set[str]) -> None:
    assert "/usr/share/doc/scistreamd/README.md" in rpm_paths
    assert "/usr/share/bash-completion/completions/scistreamctl" in rpm_paths


def test_rpm_daemon_is_only_in_sbin_and_state_dirs_are_private(rpm: Path) -> None:
    listing = rpm_query(rpm, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]")
    modes = dict(reversed(line.split(None, 1)) for line in listing.splitlines())
    assert "/usr/bin/scistreamd" not in modes
    assert modes["/var/lib/scistream"] == "drwx------"
    assert modes["/var/lib/scistream/keys"] == "drwx------"


def test_rpm_config_is_noreplace(rpm: Path) -> None:
    flags = rpm_query(rpm, "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]")
    config = {line.split()[0]: line.split()[1] for line in flags.splitlines() if " c" in line}
    assert set(config) == {"/etc/scistream/scistreamd.toml"}
    assert "n" in config["/etc/scistream/scistreamd.toml"]


def test_rpm_requires(rpm: Path) -> None:
    lines = rpm_query(rpm, "--requires").splitlines()
    requires = {line.split()[0] for line in lines}
    missing = [r for r in RPM_REQUIRES if r not in requires]
    assert not missing, f"Requires lacks {missing}"
    # Installable on RHEL 9 (Python 3.9) and Fedora alike: no pin to the build
    # host's Python ABI, nor to one interpreter's dist-info names.
    assert not [ln for ln in lines if ln.startswith("python(abi)")], lines
    assert not [ln for ln in lines if re.match(r"python3\.\d+(dist)?\(", ln)], lines
    assert "python3 >= 3.9" in lines, lines
    recommends = rpm_query(rpm, "--recommends").split()
    assert "python3-argcomplete" in recommends and "polkit" in recommends


def test_rpm_compiles_and_cleans_the_private_dir(rpm_scripts: Dict[str, str]) -> None:
    assert "-m compileall -q -f /usr/share/scistreamd/scistreamd" in rpm_scripts["postinstall"]
    erase = rpm_scripts["postuninstall"]
    assert re.search(r"if \[ \$1 -eq 0 \]; then\n(.*\n)*\s*rm -rf /usr/share/scistreamd\n", erase)
    # On erase only: state and keys of the stopped relays, and the groups.
    block = erase[erase.index("if [ $1 -eq 0 ]; then"):]
    assert "rm -rf /var/lib/scistream\n" in block
    assert "for group in scistream scistream-relay; do" in block and 'groupdel "$group"' in block


def test_rpm_scripts(rpm_scripts: Dict[str, str]) -> None:
    assert "groupadd -r scistream\n" in rpm_scripts["preinstall"]
    assert "groupadd -r scistream-relay" in rpm_scripts["preinstall"]
    post = rpm_scripts["postinstall"]
    gen = post.index("/usr/sbin/scistreamd --generate-cert")
    assert "[ ! -e /etc/scistream/server.crt ]" in post[:gen]
    assert gen < post.index("systemctl start scistreamd.service")
    # Upgrade: restart the daemon only, never the relays' slice.
    postun = code(rpm_scripts["postuninstall"])
    assert "try-restart scistreamd.service" in postun
    assert "scistream.slice" not in postun
    # Erase ($1 = 0): stop the daemon, then every relay.
    preun = rpm_scripts["preuninstall"]
    assert re.search(r"\$1 -eq 0 .*\n\s*systemctl stop scistream\.slice", preun)
    assert preun.index("scistreamd.service") < preun.index("scistream.slice")


def test_units_start_the_packaged_daemon() -> None:
    unit = (ROOT / "units" / "scistreamd.service").read_text()
    assert re.search(r"^ExecStart=/usr/sbin/scistreamd(\s|$)", unit, re.M)


# ---------------------------------------------------------------------------
# Versions, PKG_VERSION, lint


def test_versions_agree() -> None:
    # Needs only sed: runs even without the build tools.
    proc = run_build("check-version")
    assert proc.returncode == 0, proc.stdout
    changelog = (ROOT / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"scistreamd ({VERSION}) ")


def test_pkg_version_builds_an_upgrade_without_touching_the_tree(
    dist: Path, tmp_path: Path
) -> None:
    before = (ROOT / "scistreamd" / "__init__.py").read_text()
    proc = run_build("--outdir", str(tmp_path), "deb", env_extra={"PKG_VERSION": f"{VERSION}+up1"})
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (ROOT / "scistreamd" / "__init__.py").read_text() == before
    newer = tmp_path / f"scistreamd_{VERSION}+up1_all.deb"
    assert newer.is_file()
    run("dpkg", "--compare-versions", f"{VERSION}+up1", "gt", VERSION)
    # The code in the package reports the package's version.
    out = tmp_path / "x"
    run("dpkg-deb", "-x", str(newer), str(out))
    init_text = (out / "usr/share/scistreamd/scistreamd/__init__.py").read_text()
    assert f'__version__ = "{VERSION}+up1"' in init_text


def test_lint_has_no_errors(dist: Path) -> None:
    require_tools(LINT_TOOLS)
    proc = run_build("--outdir", str(dist), "lint")
    assert proc.returncode == 0, f"lint failed:\n{proc.stdout[-6000:]}"


@pytest.mark.parametrize("page", ["scistreamctl.1", "scistreamd.8", "scistreamd.toml.5"])
def test_man_page_renders_without_warnings(page: str) -> None:
    if shutil.which("groff", path=SYS_PATH) is None or shutil.which("man", path=SYS_PATH) is None:
        pytest.skip("groff/man missing: install groff-base and man-db (`make packaging-deps`)")
    path = ROOT / "docs" / "man" / page
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": SYS_PATH},
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    # What lintian runs (at 80 columns): catches lines that cannot be broken.
    proc = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": SYS_PATH, "LC_ALL": "C.UTF-8", "MANWIDTH": "80"},
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


# Stand-ins for the macros of systemd-rpm-macros (and %python3):
# with them defined, the spec must use them, not its fallbacks.
FEDORA_MACROS = """\
%_unitdir /usr/lib/systemd/system
%_presetdir /usr/lib/systemd/system-preset
%_sysusersdir /usr/lib/sysusers.d
%_tmpfilesdir /usr/lib/tmpfiles.d
%python3 /usr/bin/python3
%systemd_post() REAL_systemd_post %{?*}
%systemd_preun() REAL_systemd_preun %{?*}
%systemd_postun_with_restart() REAL_systemd_postun_with_restart %{?*}
%sysusers_create_compat() REAL_sysusers_create_compat %{?*}
%tmpfiles_create() REAL_tmpfiles_create %{?*}
%dist .el9
"""


def test_spec_uses_the_real_fedora_macros_where_they_exist(tmp_path: Path) -> None:
    require_tools({"rpmspec": "rpm"})
    macros = tmp_path / "fedora.macros"
    macros.write_text(FEDORA_MACROS)
    spec = ROOT / "packaging" / "rpm" / "scistreamd.spec"
    text = run("rpmspec", "-P", "--load", str(macros), str(spec))
    for name in (
        "systemd_post scistreamd.service",
        "systemd_preun scistreamd.service",
        "systemd_postun_with_restart scistreamd.service",
        "sysusers_create_compat",
        "tmpfiles_create scistream.conf",
    ):
        assert f"REAL_{name}" in text, f"the spec does not use %{name.split()[0]}"
    assert "systemctl --no-reload preset" not in text, "a fallback was used"
    # Never the relays' slice through the systemd macros (they restart on upgrade).
    assert not re.search(r"REAL_systemd_\w+ .*scistream\.slice", text)
