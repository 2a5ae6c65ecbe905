#!/bin/bash
# Install, upgrade and purge the .deb in a fresh Debian 12 chroot (no systemd running).
#
#   packaging/tests/chroot-install-test.sh [DEB [UPGRADE_DEB]]
#
# DEB defaults to dist/scistreamd_*_all.deb; without UPGRADE_DEB an upgrade
# package is built with PKG_VERSION=<version>+upgrade1. Needs root, mmdebstrap
# and access to the Debian archive. The minimal bookworm rootfs is cached as
# a tarball in $SCISTREAMD_ROOTFS_CACHE (default /var/cache/scistreamd-pkgtest)
# and rebuilt when older than 7 days; building it takes ~20 s, a run ~1 min.
#
# This is the first half of the install test of issue 6 (item 6): that apt
# resolves every dependency from the archive, that the maintainer scripts
# work (group, directories, host certificate made once and kept across an
# upgrade, conffile) and that purge leaves nothing behind. Without a running
# systemd the scripts skip starting/stopping units (they test for
# /run/systemd/system), so "systemctl is-active", the guide's scenario
# between two installed hosts and "a tunnel keeps carrying data across an
# upgrade" need the booted variant (see packaging/tests/README.md).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${SCISTREAMD_ROOTFS_CACHE:-/var/cache/scistreamd-pkgtest}
TARBALL=$CACHE/bookworm-apt.tar
MIRRORS=(
    "deb http://deb.debian.org/debian bookworm main"
    "deb http://deb.debian.org/debian bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main"
)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8

fail() {
    echo "FAIL: $*" >&2
    exit 1
}
ok() { echo "ok: $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (chroot, mounts)"
command -v mmdebstrap >/dev/null || fail "mmdebstrap missing: apt-get install mmdebstrap"

version=$(sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$ROOT/scistreamd/__init__.py")
DEB=${1:-$ROOT/dist/scistreamd_${version}_all.deb}
[ -f "$DEB" ] || fail "no $DEB: run 'make deb' first"
work=$(mktemp -d /var/tmp/scistreamd-chroot.XXXXXX)
rootfs=$work/rootfs

cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT

UPGRADE_DEB=${2:-}
if [ -z "$UPGRADE_DEB" ]; then
    PKG_VERSION=$version+upgrade1 "$ROOT/packaging/build.sh" --outdir "$work/upgrade" deb >/dev/null
    UPGRADE_DEB=$work/upgrade/scistreamd_${version}+upgrade1_all.deb
fi

# --- rootfs -------------------------------------------------------------------
mkdir -p "$CACHE"
if [ ! -f "$TARBALL" ] || [ -n "$(find "$TARBALL" -mtime +7)" ]; then
    echo "== building the bookworm rootfs cache $TARBALL"
    mmdebstrap --variant=apt --mode=root --format=tar bookworm "$TARBALL.tmp" "${MIRRORS[@]}" \
        >"$work/mmdebstrap.log" 2>&1 || { tail -n 30 "$work/mmdebstrap.log" >&2; fail "mmdebstrap"; }
    mv "$TARBALL.tmp" "$TARBALL"
fi
mkdir -p "$rootfs"
tar -C "$rootfs" -xf "$TARBALL"
mount -t proc proc "$rootfs/proc"
mount --rbind /sys "$rootfs/sys"
mount --bind /dev "$rootfs/dev"
mount --bind /dev/pts "$rootfs/dev/pts"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
# As in any chroot: maintainer scripts must not start services.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"
cp "$DEB" "$rootfs/tmp/new.deb"
cp "$UPGRADE_DEB" "$rootfs/tmp/upgrade.deb"

in_root() { chroot "$rootfs" /usr/bin/env -i PATH="$PATH" LC_ALL=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"; }

# Everything outside /tmp, /proc, /sys, /dev, /run, /var/cache/apt, /var/lib/apt,
# /var/log: what install + purge must leave as it was.
snapshot() {
    (cd "$rootfs" && find . -xdev \( -path ./tmp -o -path ./proc -o -path ./sys -o -path ./dev \
        -o -path ./run -o -path ./var/cache -o -path ./var/lib/apt -o -path ./var/log \
        -o -path ./var/lib/dpkg \) -prune -o -print | sort)
}

# --- install ------------------------------------------------------------------
in_root apt-get update -qq
before=$(snapshot)
group_before=$(in_root getent group scistream || true)
[ -z "$group_before" ] || fail "group scistream exists before the install"

echo "== apt-get install ./$(basename "$DEB")"
in_root apt-get install -y -qq --no-install-recommends /tmp/new.deb >"$work/install.log" 2>&1 \
    || { tail -n 40 "$work/install.log" >&2; fail "apt-get install"; }
ok "apt resolved and installed every dependency from the archive"
# shellcheck disable=SC2016 # dpkg-query format, not shell
[ "$(in_root dpkg-query -W -f='${Status} ${Version}' scistreamd)" = "install ok installed $version" ] \
    || fail "scistreamd $version is not installed"
in_root getent group scistream >/dev/null || fail "group scistream was not created"
ok "group scistream"
[ "$(stat -c %a "$rootfs/var/lib/scistream")" = 700 ] || fail "/var/lib/scistream is not 0700"
[ "$(stat -c %a "$rootfs/var/lib/scistream/keys")" = 700 ] || fail "/var/lib/scistream/keys is not 0700"
ok "state and key directories (0700)"
for mod in daemon ctl config certs; do
    in_root env PYTHONPATH=/usr/share/scistreamd python3 -c "import scistreamd.$mod" \
        || fail "scistreamd.$mod does not import from /usr/share/scistreamd"
done
ok "modules import with the installed dependencies"
in_root scistreamctl --version >/dev/null || fail "scistreamctl --version"
ok "scistreamctl runs"
cert_sum=
if [ -f "$rootfs/etc/scistream/server.crt" ]; then
    [ "$(stat -c %a "$rootfs/etc/scistream/server.key")" = 600 ] || fail "server.key is not 0600"
    cert_sum=$(sha256sum <"$rootfs/etc/scistream/server.crt")
    ok "host certificate generated (key 0600)"
else
    echo "WARN: no /etc/scistream/server.crt: does 'scistreamd --generate-cert' exist yet?" >&2
fi
grep -qx '/etc/scistream/scistreamd.toml' "$rootfs/var/lib/dpkg/info/scistreamd.conffiles" \
    || fail "scistreamd.toml is not a conffile"

# --- upgrade ------------------------------------------------------------------
echo "# local change" >>"$rootfs/etc/scistream/scistreamd.toml"
echo "== apt-get install ./$(basename "$UPGRADE_DEB")"
in_root apt-get install -y -qq /tmp/upgrade.deb >"$work/upgrade.log" 2>&1 \
    || { tail -n 40 "$work/upgrade.log" >&2; fail "upgrade"; }
# shellcheck disable=SC2016 # dpkg-query format, not shell
new_version=$(in_root dpkg-query -W -f='${Version}' scistreamd)
[ "$new_version" != "$version" ] || fail "the upgrade did not change the version"
grep -q '^# local change$' "$rootfs/etc/scistream/scistreamd.toml" || fail "upgrade lost a conffile change"
if [ -n "$cert_sum" ]; then
    [ "$(sha256sum <"$rootfs/etc/scistream/server.crt")" = "$cert_sum" ] \
        || fail "the upgrade replaced the host certificate"
    ok "host certificate kept across the upgrade"
fi
ok "upgraded to $new_version, local config kept"

# --- remove + purge -----------------------------------------------------------
in_root apt-get remove -y -qq scistreamd >"$work/remove.log" 2>&1 || fail "apt-get remove"
[ -d "$rootfs/etc/scistream" ] || fail "remove (not purge) deleted the configuration"
in_root apt-get purge -y -qq scistreamd >"$work/purge.log" 2>&1 || fail "apt-get purge"
in_root apt-get autoremove --purge -y -qq >/dev/null 2>&1 || true
[ -z "$(in_root getent group scistream || true)" ] || fail "purge left group scistream"
leftovers=$(comm -13 <(echo "$before") <(snapshot) | grep -i scistream || true)
[ -z "$leftovers" ] || fail "purge left files behind:
$leftovers"
ok "purge left no files and no group behind"
echo "PASS: chroot install test of $(basename "$DEB") -> $new_version"
