# Distribution packages. Included by the top-level Makefile:
#
#   make packaging-deps   install the build tools (Debian/apt; as root; idempotent)
#   make packages         dist/scistreamd_<version>_all.deb and dist/scistreamd-<version>-1.noarch.rpm
#   make deb | make rpm   one of them
#   make lint-packages    lintian (no errors), rpmspec -P, rpmlint (no errors) on dist/
# Each pulls in packaging-deps first, as `make test` pulls in `make setup`, so
# they work on a fresh Debian 12 machine (as root); with everything present it
# only checks (no apt-get update).
#
# PKG_VERSION=0.1.0+test1 builds packages with another version without
# touching the tree (for upgrade tests). All the work is in packaging/build.sh.

PACKAGING_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
PKG_BUILD := $(PACKAGING_DIR)/build.sh

# Debian packages needed to build and check both packages on Debian 12.
# Both packages install the modules as source into a private directory, so no
# PEP 517 tooling is needed; groff-base and man-db check the man pages (as
# lintian does); mmdebstrap builds the bookworm rootfs of the booted install
# tests.
PACKAGING_DEB_DEPS := debhelper dh-python python3 dpkg-dev \
	rpm lintian rpmlint groff-base man-db mmdebstrap

.PHONY: packages deb rpm lint-packages packaging-deps packaging-check-version

packages: packaging-deps
	$(PKG_BUILD) all

deb: packaging-deps
	$(PKG_BUILD) deb

rpm: packaging-deps
	$(PKG_BUILD) rpm

lint-packages: packaging-deps
	$(PKG_BUILD) lint

packaging-check-version:
	$(PKG_BUILD) check-version

# Installs only what is missing, and refreshes the package lists only then.
packaging-deps:
	@$(call apt-ensure,packaging-deps,$(PACKAGING_DEB_DEPS))
