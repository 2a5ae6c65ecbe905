"""One parser per kind of configuration value (ports, ranges, addresses, sizes, ...).

Each takes the raw TOML value and returns a typed one, or raises BadValue with
what to write instead; config.py adds the file and the key. Pure: imports
nothing from D-Bus or systemd.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, List, Tuple

from .errors import ScistreamError
from .model import (
    HostPort,
    IPAddress,
    IPNetwork,
    parse_hostport,
    parse_ip,
    parse_network,
    parse_port,
)
from .ports import FIRST_UNPRIVILEGED_PORT
from .relay import parse_safe_path

_MEMORY = re.compile(r"([0-9]{1,15})([KMGT]?)")
_MEMORY_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# A relay (stunnel + OpenSSL) needs a few MiB; a smaller cap is a unit mistake ("256" for 256M).
_MIN_MEMORY = 8 * 1024**2
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_MAX_SECONDS = 300.0
MAX_CLIENT_NETWORKS = 256


class BadValue(ScistreamError):
    """A value problem, turned into ConfigError by the caller who knows file and key."""


def type_name(value: object) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a float"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), type(value).__name__)


def integer(value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(f"expected an integer in {low}..{high}, got {type_name(value)}")
    if not low <= value <= high:
        raise BadValue(f"{value} is out of range: use {low}..{high}")
    return value


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(f"expected a port number (integer 1..65535), got {type_name(value)}")
    return parse_port(value, "port")


def port_range(value: object) -> Tuple[int, int]:
    if isinstance(value, str):
        m = _PORT_RANGE.fullmatch(value)
        if not m:
            raise BadValue(f'{value!r:.60} is not a range: write "LOW-HIGH", e.g. "5100-5200"')
        low, high = int(m.group(1)), int(m.group(2))
    elif isinstance(value, list) and len(value) == 2:
        low, high = (port(v) for v in value)
    else:
        raise BadValue(f'expected "LOW-HIGH" or [LOW, HIGH], got {type_name(value)}')
    low, high = parse_port(low, "low port"), parse_port(high, "high port")
    if low > high:
        raise BadValue(f"{low}-{high} is empty: write the lower port first")
    if low < FIRST_UNPRIVILEGED_PORT:
        raise BadValue(
            f"{low}-{high} includes privileged ports and relays run without privileges: "
            f"start the range at {FIRST_UNPRIVILEGED_PORT} or above"
        )
    return (low, high)


def ip(value: object) -> IPAddress:
    if not isinstance(value, str):
        raise BadValue(f"expected an IP address string, got {type_name(value)}")
    return parse_ip(value, "address")


def listen_ip(value: object) -> IPAddress:
    """A unicast address, or the wildcard of either family (all of this host's)."""
    if not isinstance(value, str):
        raise BadValue(f"expected an IP address string, got {type_name(value)}")
    ip = parse_ip(value, "address", unicast=False)
    if ip.is_multicast:
        raise BadValue(f"{ip} is a multicast address: give this host's address, or \"0.0.0.0\" "
                   "(\"::\" for IPv6 too) for all of them")
    return ip


def relay_ip(value: object) -> IPAddress | None:
    if value == "":
        return None
    return ip(value)  # one unicast address: relays need a concrete one


def path(value: object) -> Path:
    if not isinstance(value, str):
        raise BadValue(f"expected an absolute path string, got {type_name(value)}")
    # Paths end up in unit properties and relay command lines: keep them plain.
    return Path(parse_safe_path(value, "path"))


def optional_path(value: object) -> Path | None:
    if value == "":
        return None
    return path(value)


def seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadValue(f"expected seconds (a number), got {type_name(value)}")
    # A range comparison rejects NaN and inf too, and does not overflow on huge ints.
    if not 0 < value <= _MAX_SECONDS:
        raise BadValue(f"{value} is out of range: use more than 0 and at most "
                       f"{_MAX_SECONDS:g} seconds")
    return float(value)


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadValue(f"expected true or false, got {type_name(value)}")
    return value


def memory(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadValue(f'expected bytes or a size like "256M", got {type_name(value)}')
    if isinstance(value, int):
        size = value
    else:
        m = _MEMORY.fullmatch(value)
        if not m:
            raise BadValue(f"{value!r:.60} is not a size: "
                           "write bytes or a number with K, M, G or T")
        size = int(m.group(1)) * _MEMORY_UNITS[m.group(2)]
    if size < 0:
        raise BadValue(f'{size} is negative: use 0 for no limit, or a size like "256M"')
    if 0 < size < _MIN_MEMORY:
        raise BadValue(f'{size} bytes is too little for a relay: '
                       'use at least "8M", or 0 for no limit')
    return size


def networks(value: object) -> Tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise BadValue(f'expected an array of CIDR strings, e.g. ["127.0.0.0/8", "10.1.0.0/16"], '
                   f"got {type_name(value)}")
    if len(value) > MAX_CLIENT_NETWORKS:
        raise BadValue(f"{len(value)} networks: use at most {MAX_CLIENT_NETWORKS} (summarise them)")
    nets = []
    for item in value:
        if not isinstance(item, str):
            raise BadValue(f"expected CIDR strings, got {type_name(item)} in the array")
        nets.append(parse_network(item, "network"))
    return tuple(dict.fromkeys(nets))  # duplicates dropped, order kept


_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,256}")
# Printable ASCII without ':' (HTTP Basic separates id and secret with it).
_CLIENT_ID = re.compile(r"[\x21-\x39\x3b-\x7e]{1,256}")


def https_url(value: object) -> str:
    """"" or an https URL without credentials or fragment (it gets the client secret)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise BadValue(f"expected an https URL string, got {type_name(value)}")
    if value == "":
        return ""
    if len(value) > 2048 or not value.isprintable() or any(c.isspace() for c in value):
        raise BadValue("not a URL (spaces, control characters, or longer than 2048): "
                   'write e.g. "https://auth.example.org/oauth2/token/introspect"')
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as err:
        raise BadValue(f"{value!r:.80} is not a URL ({err})") from None
    if url.scheme != "https" or not url.hostname:
        raise BadValue(f"{value!r:.80} is not an https URL: the daemon sends its client secret "
                   "there, so only https is accepted")
    if url.username is not None or url.password is not None or url.fragment:
        raise BadValue(f"{value!r:.80} carries credentials or a fragment: give the bare URL "
                   "(the secret goes in token_client_secret_file)")
    return value


def client_id(value: object) -> str:
    if not isinstance(value, str):
        raise BadValue(f"expected a string, got {type_name(value)}")
    if value and not _CLIENT_ID.fullmatch(value):
        raise BadValue("expected printable ASCII without spaces or ':', at most 256 characters")
    return value


def scope_list(value: object) -> Tuple[str, ...]:
    if isinstance(value, str):
        items: List[object] = list(value.split())
    elif isinstance(value, list):
        items = list(value)
    else:
        raise BadValue(f'expected a scope string or an array of scopes, got {type_name(value)}')
    if len(items) > 32:
        raise BadValue(f"{len(items)} scopes: require at most 32")
    for item in items:
        if not isinstance(item, str) or not _SCOPE_TOKEN.fullmatch(item):
            raise BadValue(f"{item!r:.60} is not an OAuth scope (RFC 6749: printable ASCII "
                       "without spaces, quotes or backslashes)")
    return tuple(dict.fromkeys(items))  # type: ignore[arg-type]


def audience(value: object) -> str:
    if not isinstance(value, str):
        raise BadValue(f"expected a string, got {type_name(value)}")
    if len(value) > 512 or not value.isprintable():
        raise BadValue("expected printable text of at most 512 characters")
    return value


def seconds_upto(high: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadValue(f"expected seconds (a number), got {type_name(value)}")
        if not 0 <= value <= high:
            raise BadValue(f"{value} is out of range: use 0..{high:g} seconds")
        return float(value)

    return parse


def optional_hostport(value: object) -> HostPort | None:
    if value == "":
        return None
    if not isinstance(value, str):
        raise BadValue(f'expected "IP:PORT" (e.g. "127.0.0.1:9731") or "" for off, '
                   f"got {type_name(value)}")
    return parse_hostport(value, "address")


def choice(names: Tuple[str, ...], what: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in names:
            return value
        raise BadValue(f"{value!r:.60} is not a {what}: use one of {', '.join(names)}")

    return parse
