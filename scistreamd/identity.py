"""Who asks: the identity of a caller, and the Owner string an endpoint records.

Three kinds (contract 3 of session 17):

- ``local``: a process on this host, over D-Bus; subject = its uid (digits);
  Owner ``local:uid=N``.
- ``token``: a remote user or robot whose OAuth 2.0 bearer token the daemon's
  TokenVerifier (tokens.py) accepted; subject = the token's ``sub``; username,
  groups (Globus ``identity_set`` and groups) and scopes from the introspection
  answer. Owner ``token:<sub>``.
- ``cert``: a client certificate on the peer port that chains to
  ``user_client_ca``; subject = its first DNS subjectAltName, else its first IP
  subjectAltName, else its commonName (see usercert.py). Owner ``cert:<subject>``.

Pure: imports nothing from D-Bus, systemd or TLS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Tuple

from .errors import InvalidArgument

KINDS = ("local", "token", "cert")
#: Longest subject, username or group name accepted (Globus subs are 36 characters).
MAX_NAME = 255
#: At most this many groups/scopes are kept of one identity.
MAX_MEMBERSHIPS = 256
_DIGITS = re.compile(r"[0-9]{1,10}")
_LOCAL_OWNER = re.compile(r"local:uid=([0-9]{1,10})")
#: Owner of a state record written before owners were recorded (decision: only
#: root and group scistream could create endpoints then, over D-Bus; such an
#: endpoint is visible to local administrators and to no remote user).
LEGACY_OWNER = "local:uid=0"


def _name(value: object, what: str, *, empty: bool = False) -> str:
    """A printable name without whitespace, at most MAX_NAME characters."""
    if not isinstance(value, str):
        raise InvalidArgument(f"identity {what} must be a string, not {type(value).__name__}")
    if not value and empty:
        return value
    if not value or len(value) > MAX_NAME:
        raise InvalidArgument(f"identity {what} must have 1..{MAX_NAME} characters")
    if any(not c.isprintable() or c.isspace() for c in value):
        raise InvalidArgument(f"identity {what} {value[:60]!r} has spaces or control "
                              "characters")
    return value


def _names(value: object, what: str) -> Tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise InvalidArgument(f"identity {what} must be a list of names")
    if len(value) > MAX_MEMBERSHIPS:
        raise InvalidArgument(f"identity has {len(value)} {what}: at most {MAX_MEMBERSHIPS}")
    return tuple(dict.fromkeys(_name(v, what) for v in value))


@dataclass(frozen=True)
class Identity:
    """A verified caller. Construct only from verified facts (a bus connection's
    credentials, an introspection answer, a verified certificate)."""

    kind: str  # "local" | "token" | "cert"
    subject: str
    username: str = ""
    groups: Tuple[str, ...] = ()
    scopes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"identity kind {str(self.kind)[:20]!r} is not one of "
                                  f"{', '.join(KINDS)}")
        _name(self.subject, "subject")
        if self.kind == "local" and not _DIGITS.fullmatch(self.subject):
            raise InvalidArgument("a local identity's subject is its uid (digits)")
        _name(self.username, "username", empty=True)
        # Lists from JSON arrive as lists: keep the dataclass hashable.
        object.__setattr__(self, "groups", _names(self.groups, "groups"))
        object.__setattr__(self, "scopes", _names(self.scopes, "scopes"))

    @property
    def owner(self) -> str:
        """The Owner an endpoint created by this identity records."""
        if self.kind == "local":
            return f"local:uid={self.subject}"
        return f"{self.kind}:{self.subject}"

    @property
    def remote(self) -> bool:
        return self.kind != "local"

    def __str__(self) -> str:
        """For journal lines and messages: the owner, plus the username if any."""
        return self.owner + (f" ({self.username})" if self.username else "")


def local_identity(uid: int) -> Identity:
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2**32:
        raise InvalidArgument(f"a local uid must be an integer 0..{2**32 - 1}")
    return Identity("local", str(uid))


def parse_owner(value: object) -> str:
    """An Owner string as recorded in state: ``local:uid=N`` or ``token:``/``cert:`` + subject."""
    if not isinstance(value, str):
        raise InvalidArgument(f"owner must be a string, not {type(value).__name__}")
    if _LOCAL_OWNER.fullmatch(value):
        return value
    kind, sep, subject = value.partition(":")
    if not sep or kind not in ("token", "cert"):
        raise InvalidArgument(f"owner {value[:80]!r} is not local:uid=N, token:SUB or "
                              "cert:NAME")
    _name(subject, "subject")
    return value
