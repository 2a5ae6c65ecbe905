"""Persisted endpoint state and relay key material, root-only, written atomically.

Layout:

    <state_dir>/endpoints/              0700 root
    <state_dir>/endpoints/<uid>-<role>.json   0600, the Endpoint record
    <key_dir>/                          0700 root: nobody else can reach below it
    <key_dir>/<id>-<role>/              0750 root:scistream-relay
    <key_dir>/<id>-<role>/psk           0440, "uid:hexkey" (stunnel PSKsecrets)
    <key_dir>/<id>-<role>/stunnel.conf  0440, the relay's config

``<id>`` is the endpoint's opaque relay id (model.new_relay_id), not its
uid: the directory's path is in the relay unit's BindReadOnlyPaths=, which
every local user can read. (Records of earlier versions use the uid as id.)
The relay unit gets its own ``<id>-<role>/`` bind-mounted read-only into its
namespace (see relay_unit.py); group ``scistream-relay`` lets its dynamic
user read it there. On the host, ``<key_dir>`` being root's alone keeps every
key directory out of reach, so keys are never on a command line, in a unit's
properties or in a file anyone but root and that one relay can read.
A write is tmp file + fsync + rename + fsync of the directory: a crash at
any point leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import InvalidArgument
from .model import Endpoint, Role, parse_relay_id, parse_role

logger = logging.getLogger(__name__)

PSK_FILE = "psk"
CONF_FILE = "stunnel.conf"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o600, gid: int = -1) -> None:
    atomic_write_files(path.parent, {path.name: data}, mode, gid)


def atomic_write_files(directory: Path, files: Dict[str, bytes], mode: int = 0o600,
                       gid: int = -1) -> None:
    """Write each file atomically (tmp file + fsync + rename), then fsync the
    directory once for all of them: a crash leaves each file old or new, never
    torn, and costs one directory fsync instead of one a file."""
    done: List[Tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            path = directory / name
            tmp = path.with_name(f".{path.name}.tmp")
            done.append((tmp, path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                # Group and mode before any byte is written: never readable by more
                # than the final file is.
                if gid != -1:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, mode)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        for tmp, _path in done:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in done:
        os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _name(ident: str, role: Role) -> str:
    return f"{ident}-{role.value}"


def parse_name(name: str) -> Tuple[str, Role]:
    """Inverse of ``_name`` for key directories: (relay id, role); InvalidArgument
    for anything that is not ours."""
    ident, sep, role = name.rpartition("-")
    if not sep:
        raise InvalidArgument(f"not an endpoint file name: {name!r}")
    return parse_relay_id(ident), parse_role(role)


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
    """Per-endpoint key directories, named by relay id and role; ``relay_gid`` is
    group scistream-relay's id (None: files stay owner-only, e.g. a development
    daemon not run by root)."""

    def __init__(self, key_dir: Path, relay_gid: Optional[int] = None) -> None:
        self.dir = _private_dir(Path(key_dir))
        self.gid = -1 if relay_gid is None else relay_gid

    def endpoint_dir(self, relay_id: str, role: Role) -> Path:
        return self.dir / _name(relay_id, role)

    def write(self, relay_id: str, role: Role, psk_text: str,
              conf_text: str) -> Tuple[Path, Path]:
        d = self.endpoint_dir(relay_id, role)
        d.mkdir(mode=0o700, exist_ok=True)
        # Also brings a directory written by 0.1.0 (0700, files 0600) to this layout.
        mode = 0o700 if self.gid == -1 else 0o750
        os.chown(d, -1, self.gid)
        os.chmod(d, mode)
        file_mode = 0o400 if self.gid == -1 else 0o440
        atomic_write_files(d, {PSK_FILE: psk_text.encode(), CONF_FILE: conf_text.encode()},
                           file_mode, self.gid)
        return d / PSK_FILE, d / CONF_FILE

    def read_psk(self, relay_id: str, role: Role, uid: str) -> str:
        """The hex key of an endpoint (from "uid:hex")."""
        text = (self.endpoint_dir(relay_id, role) / PSK_FILE).read_text()
        ident, _, key = text.strip().partition(":")
        if ident != uid or not key:
            raise InvalidArgument(f"key file of {uid} is corrupt")
        return key

    def remove(self, relay_id: str, role: Role) -> None:
        shutil.rmtree(self.endpoint_dir(relay_id, role), ignore_errors=True)

    def names(self) -> List[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir())
