"""The test bed's `leftovers` names only what belongs to its own instance."""

from __future__ import annotations

from tests.testbed.core import mentions

ROOT_EXT4 = ("27 1 254:0 / / rw,relatime - ext4 /dev/vda "
             "rw,discard,resv_strict,resuid=65534,resgid=65534")
OWN_BIND = ("301 27 254:0 /var/tmp/ext/server1/journal /var/tmp/ext/server1/rootfs/var/log "
            "rw,relatime - ext4 /dev/vda rw")
OWN_CGROUP = ("88 25 0:26 /ext /sys/fs/cgroup/unified/ext rw,nosuid - cgroup2 cgroup2 rw")
OTHER_BED = ("302 27 254:0 /var/tmp/ext-2/server1 /var/tmp/ext-2/server1/rootfs "
             "rw - ext4 /dev/vda rw")


def test_a_bed_named_ext_does_not_claim_the_ext4_root() -> None:
    assert mentions(ROOT_EXT4, "ext") is False


def test_a_bed_does_not_claim_another_bed_whose_name_starts_like_it() -> None:
    assert mentions(OTHER_BED, "ext") is False
    assert mentions(OTHER_BED, "ext-2") is True


def test_a_bed_finds_its_own_mounts() -> None:
    assert mentions(OWN_BIND, "ext") is True
    assert mentions(OWN_CGROUP, "ext") is True
    assert mentions("40 27 0:50 / /var/tmp/scistream-testbed/server2/rootfs rw - overlay "
                    "overlay rw", "scistream-testbed") is True
