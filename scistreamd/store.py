"""Persisted endpoint state and relay key material, root-only, written atomically.

Layout (both directories 0700, every file 0600):

    <state_dir>/endpoints/<uid>-<role>.json   the Endpoint record
    <key_dir>/<uid>-<role>/psk                "uid:hexkey" (stunnel PSKsecrets)
    <key_dir>/<uid>-<role>/stunnel.conf       the relay's config

The relay unit receives the two key files with LoadCredential=, so they are
never on a command line, in the unit's properties or world-readable.
A write is tmp file + fsync + rename + fsync of the directory: a crash at
any point leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import List, Tuple

from .errors import InvalidArgument
from .model import Endpoint, Role, parse_role, parse_uid

logger = logging.getLogger(__name__)

PSK_FILE = "psk"
CONF_FILE = "stunnel.conf"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _name(uid: str, role: Role) -> str:
    return f"{uid}-{role.value}"


def parse_name(name: str) -> Tuple[str, Role]:
    """Inverse of ``_name``; InvalidArgument for anything that is not ours."""
    uid, sep, role = name.rpartition("-")
    if not sep:
        raise InvalidArgument(f"not an endpoint file name: {name!r}")
    return parse_uid(uid), parse_role(role)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = _private_dir(Path(state_dir)) / "endpoints"
        _private_dir(self.dir)

    def path(self, uid: str, role: Role) -> Path:
        return self.dir / f"{_name(uid, role)}.json"

    def save(self, ep: Endpoint) -> None:
        atomic_write(self.path(ep.uid, ep.role),
                     json.dumps(ep.to_dict(), sort_keys=True).encode())

    def delete(self, uid: str, role: Role) -> None:
        self.path(uid, role).unlink(missing_ok=True)

    def load_all(self) -> Tuple[List[Endpoint], List[Path]]:
        """Every valid record, and the paths of files that are not (left in place)."""
        good: List[Endpoint] = []
        bad: List[Path] = []
        for p in sorted(self.dir.iterdir()):
            if p.name.startswith("."):
                # A tmp file of a write that never completed.
                p.unlink(missing_ok=True)
                continue
            try:
                ep = Endpoint.from_dict(json.loads(p.read_text()))
                if p.name != f"{_name(ep.uid, ep.role)}.json":
                    raise InvalidArgument("file name does not match its content")
                good.append(ep)
            except (ValueError, InvalidArgument, OSError) as e:
                logger.error("ignoring corrupt state file %s: %s", p, e)
                bad.append(p)
        return good, bad


class KeyStore:
    def __init__(self, key_dir: Path) -> None:
        self.dir = _private_dir(Path(key_dir))

    def endpoint_dir(self, uid: str, role: Role) -> Path:
        return self.dir / _name(uid, role)

    def write(self, uid: str, role: Role, psk_text: str, conf_text: str) -> Tuple[Path, Path]:
        d = _private_dir(self.endpoint_dir(uid, role))
        atomic_write(d / PSK_FILE, psk_text.encode())
        atomic_write(d / CONF_FILE, conf_text.encode())
        return d / PSK_FILE, d / CONF_FILE

    def read_psk(self, uid: str, role: Role) -> str:
        """The hex key of an endpoint (from "uid:hex")."""
        text = (self.endpoint_dir(uid, role) / PSK_FILE).read_text()
        ident, _, key = text.strip().partition(":")
        if ident != uid or not key:
            raise InvalidArgument(f"key file of {uid} is corrupt")
        return key

    def remove(self, uid: str, role: Role) -> None:
        shutil.rmtree(self.endpoint_dir(uid, role), ignore_errors=True)

    def names(self) -> List[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir())
