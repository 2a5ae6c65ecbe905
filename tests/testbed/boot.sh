#!/bin/sh
# Boots one emulated host: run as PID 1 of fresh pid/mount/net/uts/ipc
# namespaces (made by `unshare`, see core.py), finishes the isolation and
# execs real systemd. Two stages in one file:
#   stage1 (still in the machine's cgroup namespace): move into the host's
#          own cgroups, then enter a new cgroup namespace rooted there;
#   stage2: private /proc /sys /dev /run /tmp, per-host /etc overlay and
#          /var/lib, /var/log, then wait for the network and exec systemd.
# Inputs (environment): TB_NAME, TB_STATE (per-host state dir), TB_SRC
# (the working tree), TB_CONTAINER (marker), TB_CGROUPS (space-separated cgroup dirs to join).
# Rootfs mode (TB_ROOTFS set to an extracted root filesystem): the host's root
# is an overlay of TB_ROOTFS and $TB_STATE/root-upper; every mount below goes
# into it ($R), then pivot_root makes it / and that system's own systemd boots
# its default target. Without TB_ROOTFS, $R is empty: the machine's / as is.
set -eu

if [ "${1:-}" = stage1 ]; then
    for dir in $TB_CGROUPS; do
        echo 0 > "$dir/cgroup.procs"
    done
    exec unshare --cgroup -- /bin/sh "$0" stage2
fi

[ "${1:-}" = stage2 ] || { echo "usage: boot.sh stage1" >&2; exit 2; }

S=$TB_STATE
R=
if [ -n "${TB_ROOTFS:-}" ]; then
    # The whole root is per host: no /etc, /var/lib, /var/log overlays needed.
    R=$S/root
    mount -t overlay overlay -o "lowerdir=$TB_ROOTFS,upperdir=$S/root-upper,workdir=$S/root-work" "$R"
else
    # Per-host /etc: the machine's /etc underneath, this host's files on top.
    mount -t overlay overlay -o "lowerdir=/etc,upperdir=$S/etc-upper,workdir=$S/etc-work" /etc
    mount --bind "$S/var-lib" /var/lib
    mount --bind "$S/var-log" /var/log
fi

mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
if [ -n "$R" ]; then
    # A whole system boots here, and systemd-sysctl would apply its sysctl.d
    # to the machine's kernel: /proc/sys read-only, except this host's own
    # network namespace's /proc/sys/net (as systemd-nspawn does).
    mount --bind "$R/proc/sys" "$R/proc/sys"
    mount -o remount,bind,ro "$R/proc/sys"
    mount --bind "$R/proc/sys/net" "$R/proc/sys/net"
    mount -o remount,bind,rw "$R/proc/sys/net"
    if [ -e "$R/proc/sysrq-trigger" ]; then
        mount --bind "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"
        mount -o remount,bind,ro "$R/proc/sysrq-trigger"
    fi
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
# cgroups: remounted inside the cgroup namespace, so systemd sees this
# host's cgroup as the root and two hosts never collide.
mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs "$R/sys/fs/cgroup"
for ctrl in $TB_V1_CONTROLLERS; do
    mkdir -p "$R/sys/fs/cgroup/$ctrl"
    mount -t cgroup -o "$ctrl" cgroup "$R/sys/fs/cgroup/$ctrl"
done
mkdir -p "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"

# A private /dev, so systemd neither resets the machine's console nor
# puts /dev/log on the machine.
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
# systemd's console output goes to boot.log (our stdout).
touch "$R/dev/console"
mount --bind /proc/self/fd/1 "$R/dev/console"

mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mkdir -p "$R/run/log/journal" "$R/run/testbed"
mount --bind "$S/journal" "$R/run/log/journal"
mount --bind "$S/shared" "$R/run/testbed"
if [ -z "$R" ]; then
    # Rootfs mode runs what the installed packages contain, never the tree.
    mount --bind "$TB_SRC" /run/testbed/src
    mount -o remount,bind,ro /run/testbed/src
fi
# /tmp and /var/tmp last: the state dir may live below one of them.
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/var/tmp"

if [ -n "$R" ]; then
    # The rootfs becomes /; the machine's tree (put at /mnt) is then dropped.
    cd "$R"
    pivot_root . mnt
    cd /
    umount -l /mnt
fi

# Credential directories are made in a child mount namespace and reach
# the service through propagation.
mount --make-rshared /

hostname "$TB_NAME"
: > /run/testbed/stage2-ready
while [ ! -e /run/testbed/go ]; do sleep 0.02; done

if [ -n "$R" ]; then
    exec env -i container="$TB_CONTAINER" \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /lib/systemd/systemd --system --show-status=no
fi
exec env -i container="$TB_CONTAINER" \
    PATH=/run/testbed/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SYSTEMD_UNIT_PATH=/run/testbed/units:/run/systemd/system.control:/run/systemd/transient:/run/systemd/system \
    /lib/systemd/systemd --system --unit=testbed.target --show-status=no
