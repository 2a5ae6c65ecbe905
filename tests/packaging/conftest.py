"""Fixtures for the package tests: build the .deb and .rpm once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SH = ROOT / "packaging" / "build.sh"
SYS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

#: Set to 1 (CI, after `make packaging-deps`) to turn "build tools missing" into a failure.
REQUIRE_ENV = "SCISTREAMD_REQUIRE_PACKAGES"

#: Tools each stage needs, with the Debian package that brings it.
BUILD_TOOLS: Dict[str, str] = {
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "dh_python3": "dh-python",
    "rpmbuild": "rpm",
    "dpkg-deb": "dpkg",
}
LINT_TOOLS: Dict[str, str] = {
    "lintian": "lintian",
    "rpmspec": "rpm",
    "rpmlint": "rpmlint",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "packaging: builds the distribution packages (needs `make packaging-deps`)"
    )


def pytest_collection_modifyitems(items: list) -> None:
    for item in items:
        if "tests/packaging" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.packaging)


def missing_tools(tools: Dict[str, str]) -> Dict[str, str]:
    return {t: pkg for t, pkg in tools.items() if shutil.which(t, path=SYS_PATH) is None}


def require_tools(tools: Dict[str, str]) -> None:
    """Skip (with the reason and the fix) if tools are missing, or fail if CI demands them."""
    missing = missing_tools(tools)
    if not missing:
        return
    what = ", ".join(f"{t} ({pkg})" for t, pkg in sorted(missing.items()))
    message = f"packaging tools missing: {what}; install them with `make packaging-deps`"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 requires the package tests to run)")
    pytest.skip(message)


def run_build(*args: str, env_extra: Dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    proc = subprocess.run(
        [str(BUILD_SH), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    return proc


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the .deb, its source package, and the .rpm built from this tree."""
    require_tools(BUILD_TOOLS)
    out = tmp_path_factory.mktemp("dist")
    existed = {p: (ROOT / p).exists() for p in ("debian", ".pybuild")}
    proc = run_build("--outdir", str(out), "all")
    assert proc.returncode == 0, f"packaging/build.sh all failed:\n{proc.stdout[-6000:]}"
    for p, was_there in existed.items():
        # The build works in a copy: it must not leave build products in the tree.
        assert was_there or not (ROOT / p).exists(), f"the build left {p}/ in the work tree"
    return out
