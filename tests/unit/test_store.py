"""Unit tests of scistreamd.store: who may read what the key store writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from scistreamd.model import Role
from scistreamd.store import CONF_FILE, PSK_FILE, KeyStore, atomic_write

UID = "bd9f1a7e-04d7-11f0-b44c-946dae415862"
# Any group other than the test's own primary group shows that the group is set.
OTHER_GID = 65534 if os.getgid() != 65534 else 1


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group to another group needs root")
def test_key_directory_is_readable_by_the_relay_group_only(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys", relay_gid=OTHER_GID)
    psk, conf = keys.write(UID, Role.INBOUND, f"{UID}:{'a' * 64}\n", "; conf\n")
    d = keys.endpoint_dir(UID, Role.INBOUND)
    assert (psk, conf) == (d / PSK_FILE, d / CONF_FILE)
    assert _mode(tmp_path / "keys") == 0o700  # nobody but root reaches below it
    assert (_mode(d), d.stat().st_gid) == (0o750, OTHER_GID)
    for f in (psk, conf):
        assert (_mode(f), f.stat().st_gid, f.stat().st_uid) == (0o440, OTHER_GID, os.geteuid())
    assert keys.read_psk(UID, Role.INBOUND) == "a" * 64
    assert sorted(p.name for p in d.iterdir()) == [PSK_FILE, CONF_FILE]  # no tmp files left


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group to another group needs root")
def test_rewriting_brings_an_old_owner_only_directory_to_the_new_layout(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys", relay_gid=OTHER_GID)
    d = keys.endpoint_dir(UID, Role.OUTBOUND)
    d.mkdir(mode=0o700)
    atomic_write(d / PSK_FILE, b"old\n")  # 0.1.0: 0600, owner's group
    keys.write(UID, Role.OUTBOUND, f"{UID}:{'b' * 64}\n", "; conf\n")
    assert (_mode(d), d.stat().st_gid) == (0o750, OTHER_GID)
    assert (_mode(d / PSK_FILE), (d / PSK_FILE).stat().st_gid) == (0o440, OTHER_GID)


def test_without_a_relay_group_everything_stays_owner_only(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    psk, conf = keys.write(UID, Role.INBOUND, f"{UID}:{'c' * 64}\n", "; conf\n")
    assert _mode(keys.endpoint_dir(UID, Role.INBOUND)) == 0o700
    assert _mode(psk) == _mode(conf) == 0o400
    keys.remove(UID, Role.INBOUND)
    assert keys.names() == []
