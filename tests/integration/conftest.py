"""Fixtures for tests on the two-host test bed (real systemd, D-Bus, journald, stunnel)."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.testbed import Testbed

pytestmark = pytest.mark.testbed


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.testbed)


@pytest.fixture(scope="session")
def bed() -> Iterator[Testbed]:
    if os.geteuid() != 0:
        pytest.fail("the test bed needs root: run `make test` as root")
    tb = Testbed()
    tb.up()
    try:
        yield tb
    finally:
        tb.down()


@pytest.fixture
def s1(bed: Testbed):
    return bed["server1"]


@pytest.fixture
def s2(bed: Testbed):
    return bed["server2"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "bed" in item.fixturenames:
        # The journals of both hosts are the first thing to read on a failure.
        tb = item.funcargs.get("bed") or Testbed()
        for host in tb.hosts.values():
            report.sections.append(
                (f"journal of {host.name} (last 60 lines)", host.journal("-n", "60")))
