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
set -eu

if [ "${1:-}" = stage1 ]; then
    for dir in $TB_CGROUPS; do
        echo 0 > "$dir/cgroup.procs"
    done
    exec unshare --cgroup -- /bin/sh "$0" stage2
fi

[ "${1:-}" = stage2 ] || { echo "usage: boot.sh stage1" >&2; exit 2; }

S=$TB_STATE

# Per-host /etc: the machine's /etc underneath, this host's files on top.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$S/etc-upper,workdir=$S/etc-work" /etc
mount --bind "$S/var-lib" /var/lib
mount --bind "$S/var-log" /var/log

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys
# cgroups: remounted inside the cgroup namespace, so systemd sees this
# host's cgroup as the root and two hosts never collide.
mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
for ctrl in $TB_V1_CONTROLLERS; do
    mkdir -p "/sys/fs/cgroup/$ctrl"
    mount -t cgroup -o "$ctrl" cgroup "/sys/fs/cgroup/$ctrl"
done
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified

# A private /dev, so systemd neither resets the machine's console nor
# puts /dev/log on the machine.
mount -t tmpfs -o mode=755,nosuid tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9
mknod -m 666 /dev/tty c 5 0
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
# systemd's console output goes to boot.log (our stdout).
touch /dev/console
mount --bind /proc/self/fd/1 /dev/console

mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mkdir -p /run/log/journal /run/testbed
mount --bind "$S/journal" /run/log/journal
mount --bind "$S/shared" /run/testbed
mount --bind "$TB_SRC" /run/testbed/src
mount -o remount,bind,ro /run/testbed/src
# /tmp and /var/tmp last: the state dir may live below one of them.
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp

# Credential directories are made in a child mount namespace and reach
# the service through propagation.
mount --make-rshared /

hostname "$TB_NAME"
: > /run/testbed/stage2-ready
while [ ! -e /run/testbed/go ]; do sleep 0.02; done

exec env -i container="$TB_CONTAINER" \
    PATH=/run/testbed/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SYSTEMD_UNIT_PATH=/run/testbed/units:/run/systemd/system.control:/run/systemd/transient:/run/systemd/system \
    /lib/systemd/systemd --system --unit=testbed.target --show-status=no
