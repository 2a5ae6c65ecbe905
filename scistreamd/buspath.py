"""D-Bus object paths of scistreamd's endpoints and of systemd's units.

One escaping for both: systemd's bus_label_escape(), which the endpoint paths
(a contract of the API, DESIGN.md §4) share with systemd's unit paths. Used
by the D-Bus layer and the systemd client only; the model knows no paths.
Imports nothing from D-Bus.
"""

from __future__ import annotations

import functools
import re
from typing import Tuple

from . import ENDPOINT_PATH_PREFIX
from .errors import InvalidArgument
from .model import Role, parse_uid
from .model import _show as show

UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"


def escape_object_path_component(s: str) -> str:
    """Escape like systemd's bus_label_escape().

    ASCII letters are kept, digits too except in the first position; every
    other byte of the UTF-8 form becomes ``_`` plus two lower-case hex digits.
    The empty string becomes ``_``.
    """
    if s == "":
        return "_"
    out = []
    for i, b in enumerate(s.encode("utf-8")):
        c = chr(b)
        if ("a" <= c <= "z") or ("A" <= c <= "Z") or (i > 0 and "0" <= c <= "9"):
            out.append(c)
        else:
            out.append(f"_{b:02x}")
    return "".join(out)


def unescape_object_path_component(s: str) -> str:
    """Reverse :func:`escape_object_path_component`; InvalidArgument if malformed."""
    if s == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == "_":
            pair = s[i + 1 : i + 3]
            if len(pair) != 2 or not re.fullmatch(r"[0-9a-f]{2}", pair):
                raise InvalidArgument(f"object path component {show(s)} is malformed")
            raw.append(int(pair, 16))
            i += 3
        elif c.isascii() and c.isalnum():
            raw.append(ord(c))
            i += 1
        else:
            raise InvalidArgument(f"object path component {show(s)} is malformed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"object path component {show(s)} is malformed") from None


def endpoint_object_path(uid: str, role: Role) -> str:
    """The D-Bus object path of endpoint (uid, role)."""
    return f"{ENDPOINT_PATH_PREFIX}/{escape_object_path_component(uid)}_{role.value}"


def parse_endpoint_object_path(path: object) -> Tuple[str, Role]:
    """(uid, role) of an endpoint object path; InvalidArgument if it is not one."""
    if isinstance(path, str) and path.startswith(ENDPOINT_PATH_PREFIX + "/"):
        last = path[len(ENDPOINT_PATH_PREFIX) + 1 :]
        for role in Role:
            suffix = "_" + role.value
            if last.endswith(suffix):
                uid = unescape_object_path_component(last[: -len(suffix)])
                return parse_uid(uid), role
    raise InvalidArgument(f"{show(path)} is not a scistream endpoint object path")


@functools.lru_cache(maxsize=8192)
def unit_object_path(name: str) -> str:
    """The object path systemd gives unit ``name`` (cached: every systemd call and
    unit change signal asks it, a few thousand times when adopting 1000 relays)."""
    return UNIT_PATH_PREFIX + escape_object_path_component(name)
