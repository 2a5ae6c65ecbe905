"""Who is asking: one identity type for local callers, bearer tokens and client
certificates (contract 3 of session 17; the user API owns the rules using it).

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

KINDS = ("local", "token", "cert")


@dataclass(frozen=True)
class Identity:
    """``kind`` "local" (subject: the uid as text), "token" (subject: the token's
    ``sub``; ``groups``: its Globus ``identity_set``; ``scopes``: its scopes) or
    "cert" (subject: the certificate identity)."""

    kind: str
    subject: str
    username: str = ""
    groups: Tuple[str, ...] = ()
    scopes: Tuple[str, ...] = ()

    @property
    def owner(self) -> str:
        """The Owner string of endpoints this identity creates."""
        if self.kind == "local":
            return f"local:uid={self.subject}"
        return f"{self.kind}:{self.subject}"
