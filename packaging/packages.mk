# Distribution packages. Included by the top-level Makefile:
#
#   make packaging-deps   install the build tools (Debian/apt; as root; idempotent)
#   make packages         dist/scistreamd_<version>_all.deb and dist/scistreamd-<version>-1.noarch.rpm
#   make deb | make rpm   one of them
#   make lint-packages    lintian (no errors), rpmspec -P, rpmlint (no errors) on dist/
#
# PKG_VERSION=0.1.0+test1 builds packages with another version without
# touching the tree (for upgrade tests). All the work is in packaging/build.sh.

PACKAGING_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
PKG_BUILD := $(PACKAGING_DIR)/build.sh

# Debian packages needed to build and check both packages on Debian 12.
# python3-build/-installer/-wheel also serve the spec's fallback macros;
# mmdebstrap builds the bookworm rootfs of the booted install test.
PACKAGING_DEB_DEPS := debhelper dh-python pybuild-plugin-pyproject python3-all \
	python3-setuptools python3-build python3-installer python3-wheel dpkg-dev \
	rpm lintian rpmlint man-db mmdebstrap

.PHONY: packages deb rpm lint-packages packaging-deps packaging-check-version

packages:
	$(PKG_BUILD) all

deb:
	$(PKG_BUILD) deb

rpm:
	$(PKG_BUILD) rpm

lint-packages:
	$(PKG_BUILD) lint

packaging-check-version:
	$(PKG_BUILD) check-version

# Installs only what is missing, and refreshes the package lists only then.
packaging-deps:
	@$(call apt-ensure,packaging-deps,$(PACKAGING_DEB_DEPS))
