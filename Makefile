# scistreamd — two commands on a fresh Debian 12 machine (as root):
#   make demo    the APS guide's scenario on two emulated hosts, iperf3 through the tunnel
#   make test    the whole test suite, real systemd/D-Bus/journald/stunnel test bed included
# Both pull in `make setup`, which installs what they need.

PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=
export PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Runtime dependencies (the same Debian packages the .deb depends on) and what
# the tests, demo and test bed use.
RUNTIME_PACKAGES = systemd dbus stunnel4 openssl \
	python3 python3-dbus-next python3-systemd python3-toml python3-cryptography python3-requests \
	python3-jeepney
TEST_PACKAGES = iperf3 iproute2 iputils-ping util-linux procps psmisc python3-authlib \
	python3-pytest python3-pytest-timeout python3-hypothesis python3-argcomplete bash
SETUP_PACKAGES = $(RUNTIME_PACKAGES) $(TEST_PACKAGES)

.PHONY: setup test unit integration demo testbed-up testbed-down lint clean

# $(call apt-ensure,WHO,PACKAGES): apt-get install whatever of PACKAGES is
# missing (idempotent: no apt-get update when nothing is).
apt-ensure = missing=$$(for p in $(2); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "$(1): installing" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "$(1): all packages present"; fi

setup:
	@$(call apt-ensure,setup,$(SETUP_PACKAGES))

# The package tests build the .deb/.rpm, so the build tools come in too.
test: setup packaging-deps
	SCISTREAMD_REQUIRE_PACKAGES=1 $(PYTHON) -m pytest -ra --timeout=600 $(PYTEST_ARGS) tests

unit: setup
	$(PYTHON) -m pytest -ra --timeout=120 $(PYTEST_ARGS) tests/unit

integration: setup
	$(PYTHON) -m pytest -ra --timeout=600 $(PYTEST_ARGS) tests/integration

demo: setup
	$(PYTHON) -m tests.demo

testbed-up: setup
	$(PYTHON) -m tests.testbed up

testbed-down:
	$(PYTHON) -m tests.testbed down

lint:
	ruff check scistreamd tests

clean:
	rm -rf build dist .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

-include packaging/packages.mk

# `make bench`: throughput, setup latency and scale side by side on its own test
# bed (tb-bench); not part of `make test`. Writes bench/results/latest.{json,png}
# and a dated JSON copy, and prints a markdown table. Run it on a quiet machine.
# BENCH_ARGS="--quick" for a short development run (writes quick-latest.*).
BENCH_PACKAGES = python3-matplotlib
BENCH_ARGS ?=

.PHONY: bench
bench: setup
	@$(call apt-ensure,bench,$(BENCH_PACKAGES))
	$(PYTHON) -m bench.run $(BENCH_ARGS)
