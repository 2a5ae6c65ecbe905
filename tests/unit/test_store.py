"""Unit tests of scistreamd.store: who may read what the key store writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, List

import pytest

from scistreamd.errors import InvalidArgument
from scistreamd.model import Endpoint, Role
from scistreamd.store import (
    CONF_FILE,
    PSK_FILE,
    KeyStore,
    StateStore,
    atomic_write,
    atomic_write_files,
    parse_name,
)

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
    assert keys.read_psk(UID, Role.INBOUND, UID) == "a" * 64
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


def test_key_directories_are_named_by_relay_id(tmp_path: Path) -> None:
    """A new endpoint's key directory (its path is a world-readable unit
    property) is named by its opaque relay id; a legacy one by its uid. Both
    are recognised as ours when orphaned; anything else is not."""
    keys = KeyStore(tmp_path / "keys")
    relay_id = "0123456789abcdef"
    keys.write(relay_id, Role.INBOUND, f"{UID}:{'d' * 64}\n", "; conf\n")
    keys.write(UID, Role.OUTBOUND, f"{UID}:{'e' * 64}\n", "; conf\n")
    assert keys.names() == sorted([f"{relay_id}-inbound", f"{UID}-outbound"])
    assert UID not in str(keys.endpoint_dir(relay_id, Role.INBOUND))
    assert keys.read_psk(relay_id, Role.INBOUND, UID) == "d" * 64
    with pytest.raises(InvalidArgument, match="corrupt"):
        keys.read_psk(relay_id, Role.INBOUND, "aaaaaaaa-04d7-11f0-b44c-946dae415862")
    assert parse_name(f"{relay_id}-inbound") == (relay_id, Role.INBOUND)
    assert parse_name(f"{UID}-outbound") == (UID, Role.OUTBOUND)
    for bad in ("lost+found", "0123-inbound", f"{relay_id}-sideways", "x-inbound"):
        with pytest.raises(InvalidArgument):
            parse_name(bad)


def test_state_files_of_the_previous_version_load_with_their_unit_names(tmp_path: Path) -> None:
    """After an upgrade, a record without relay_id loads (as written by the
    version before) and names the unit its relay runs as: adopt() finds it."""
    store = StateStore(tmp_path / "state")
    old = {"uid": UID, "role": "inbound", "listeners": ["192.168.150.1:5100"],
           "targets": ["192.168.150.1:5300"], "num_conn": 1, "created_at": 1742400000.5,
           "state": "active", "peer": None, "claimed_by": "", "claimed_at": 0.0,
           "detail": "", "n_restarts": 0}
    atomic_write(store.path(UID, Role.INBOUND), json.dumps(old).encode())
    new = Endpoint.from_dict(dict(old, role="outbound"))
    new.relay_id = "fedcba9876543210"
    store.save(new)
    good, bad = store.load_all()
    assert bad == []
    by_role = {ep.role: ep for ep in good}
    assert by_role[Role.INBOUND].unit == f"scistream-inbound-{UID}.service"
    assert by_role[Role.INBOUND].legacy_relay_id
    assert by_role[Role.OUTBOUND].unit == "scistream-outbound-fedcba9876543210.service"
    assert json.loads(store.path(UID, Role.OUTBOUND).read_text())["relay_id"] == new.relay_id


def test_atomic_write_files_writes_all_with_their_mode_and_leaves_no_tmp(tmp_path: Path) -> None:
    atomic_write_files(tmp_path, {"a": b"1", "b": b"2"}, 0o440)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o440


def test_atomic_write_files_failing_midway_keeps_the_old_files(tmp_path: Path,
                                                              monkeypatch: Any) -> None:
    atomic_write_files(tmp_path, {"a": b"old-a", "b": b"old-b"})
    real_write = os.write
    calls: List[int] = []

    def failing_write(fd: int, data: bytes) -> int:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError):
        atomic_write_files(tmp_path, {"a": b"new-a", "b": b"new-b"})
    # Neither file replaced, no tmp file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert (tmp_path / "a").read_bytes() == b"old-a"
    assert (tmp_path / "b").read_bytes() == b"old-b"
