"""The typed values of external text: IP addresses, ports, ``ip:port``, tunnel
uids, connection counts, lists, allowed peers; each parser returns the value or
raises InvalidArgument naming the problem and the fix.

The daemon (through model, which re-exports them) and scistreamctl (before it
sends anything) parse with the same functions. Pure and cheap to import: the
CLI imports this on every verb that validates, so no dataclasses (~9 ms with
inspect), no typing at run time.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address

from .errors import InvalidArgument

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any, List, Tuple, Union

    IPAddress = Union[IPv4Address, IPv6Address]

#: Upper bound of any list argument (ports, listeners); also bounds num_conn in state files.
MAX_LIST_LEN = 1024
# The longest textual IPv6 address ("ffff:...:255.255.255.255") is 45 characters.
_MAX_IP_LEN = 45
_IP_CHARS = re.compile(r"[0-9A-Fa-f.:]+")
_PORT_STR = re.compile(r"[1-9][0-9]{0,4}")
_COUNT_STR = re.compile(r"[1-9][0-9]{0,9}")
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HOSTPORT_V6 = re.compile(r"\[([^\[\]]*)\]:([^:]*)")
# A DNS label (RFC 1123), lower-case: letters, digits, inner hyphens, 1..63 characters.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_DNS_NAME = 253


def _show(value: object, limit: int = 60) -> str:
    """repr() of a rejected value, cut short: error messages must stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but True is not a port number.
    return isinstance(value, int) and not isinstance(value, bool)


class HostPort:
    """A literal IP address and a TCP port; never a host name.

    Immutable, equal and hashed by value (as the frozen dataclass it was; a plain
    class because this module must not import dataclasses).
    """

    __slots__ = ("host", "port")

    def __init__(self, host: IPAddress, port: int) -> None:
        if not isinstance(host, (IPv4Address, IPv6Address)):
            raise InvalidArgument(f"HostPort host must be an IP address object, not {_show(host)}")
        if not _is_int(port) or not 1 <= port <= 65535:
            raise InvalidArgument(f"HostPort port must be an int in 1..65535, not {_show(port)}")
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __reduce__(self) -> Tuple[Any, ...]:  # copy and pickle go through __init__
        return (HostPort, (self.host, self.port))

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.host, self.port) == (other.host, other.port)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"HostPort(host={self.host!r}, port={self.port!r})"

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# ---------------------------------------------------------------------------
# Scalar parsers


def parse_ip(value: object, what: str, *, unicast: bool = True) -> IPAddress:
    """Parse a literal IPv4/IPv6 address (no host names, no zone ids).

    With ``unicast`` (the default) the unspecified (0.0.0.0, ::) and multicast
    addresses are refused: every address here is either connected to or
    advertised to a peer, and neither makes sense for that.
    """
    if isinstance(value, (IPv4Address, IPv6Address)):
        addr: IPAddress = value
    else:
        if not isinstance(value, str):
            raise InvalidArgument(f"{what} must be an IP address string, not {_show(value)}")
        # The character check comes first: ip_address() would accept a zone id
        # ("fe80::1%<anything>"), and we want no free text inside an address.
        if not value or len(value) > _MAX_IP_LEN or not _IP_CHARS.fullmatch(value):
            raise InvalidArgument(
                f"{what} {_show(value)} is not an IP address: give a literal IPv4 or IPv6 "
                "address such as 192.168.150.1 (host names are not accepted)"
            )
        try:
            addr = ip_address(value)
        except ValueError:
            raise InvalidArgument(
                f"{what} {_show(value)} is not an IP address: give a literal IPv4 or IPv6 "
                "address such as 192.168.150.1"
            ) from None
    if unicast and (addr.is_unspecified or addr.is_multicast):
        raise InvalidArgument(
            f"{what} {addr} is not a unicast address: give the host's own address "
            "(for example 192.168.150.1), not a wildcard or multicast address"
        )
    return addr


def parse_port(value: object, what: str) -> int:
    """Parse a TCP port: an int (not a bool) or a plain decimal string, 1..65535."""
    if _is_int(value):
        port = int(value)  # type: ignore[call-overload]
    elif isinstance(value, str) and _PORT_STR.fullmatch(value):
        port = int(value)
    else:
        raise InvalidArgument(f"{what} {_show(value)} is not a port number: give 1..65535")
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"{what} {port} is out of range: give a port in 1..65535")
    return port


def parse_hostport(value: object, what: str) -> HostPort:
    """Parse ``"1.2.3.4:5100"`` or ``"[::1]:5100"``."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be an 'ip:port' string, not {_show(value)}")
    if len(value) > _MAX_IP_LEN + 8:
        raise InvalidArgument(f"{what} {_show(value)} is too long to be an 'ip:port' address")
    if value.startswith("["):
        m = _HOSTPORT_V6.fullmatch(value)
        if not m:
            raise InvalidArgument(
                f"{what} {_show(value)} is not an address: write IPv6 as '[addr]:port'"
            )
        host_text, port_text = m.group(1), m.group(2)
        host = parse_ip(host_text, what)
        if host.version != 6:
            raise InvalidArgument(
                f"{what} {_show(value)}: only IPv6 addresses go in brackets; write '{host}:port'"
            )
    else:
        host_text, sep, port_text = value.rpartition(":")
        if not sep:
            raise InvalidArgument(
                f"{what} {_show(value)} has no port: write 'ip:port', e.g. 192.168.150.1:5100"
            )
        if ":" in host_text:
            raise InvalidArgument(
                f"{what} {_show(value)} is ambiguous: write IPv6 addresses as '[addr]:port'"
            )
        host = parse_ip(host_text, what)
    return HostPort(host, parse_port(port_text, f"{what} port"))


def parse_uid(value: object) -> str:
    """Parse a tunnel uid: a hyphenated hex UUID of any version; returned lower-case."""
    if isinstance(value, str) and len(value) == 36:
        lowered = value.lower()
        if _UID.fullmatch(lowered):
            return lowered
    raise InvalidArgument(
        f"uid {_show(value)} is not a tunnel uid: give the 36-character uid printed by "
        "inbound-request, e.g. bd9f1a7e-04d7-11f0-b44c-946dae415862"
    )


def parse_num_conn(value: object, limit: int) -> int:
    """Parse num_conn: an int (or decimal string) in 1..limit."""
    if _is_int(value):
        n = int(value)  # type: ignore[call-overload]
    elif isinstance(value, str) and _COUNT_STR.fullmatch(value):
        n = int(value)
    else:
        raise InvalidArgument(f"num_conn {_show(value)} is not a number: give 1..{limit}")
    if not 1 <= n <= limit:
        raise InvalidArgument(f"num_conn {n} is out of range: give 1..{limit}")
    return n


# ---------------------------------------------------------------------------
# Lists


def split_list(text: str) -> List[str]:
    """Split a CLI list into items.

    Accepts ``"5300,5301"``, ``"5300 5301"`` and the Python list syntax that
    upstream s2uc prints (``"['192.168.150.1:5100']"``), so output of one
    tool can be pasted into the next. Items are not validated here.
    """
    if not isinstance(text, str):
        raise InvalidArgument(f"expected a list as text, not {_show(text)}")
    body = text.strip()
    # A python list literal; an item itself never ends in "]" (IPv6 is "[addr]:port").
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = []
    for raw in re.split(r"[,\s]+", body):
        item = raw
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1]
        if item:
            items.append(item)
    return items


def _as_items(values: object, what: str) -> List[object]:
    if isinstance(values, str):
        return list(split_list(values))
    if isinstance(values, (list, tuple)):
        return list(values)
    raise InvalidArgument(f"{what} must be a list, not {_show(values)}")


def _check_len(items: List[object], what: str, min_len: int, max_len: int) -> None:
    if len(items) < min_len:
        raise InvalidArgument(f"{what} is empty: give at least {min_len} item(s)")
    if len(items) > max_len:
        raise InvalidArgument(f"{what} has {len(items)} items: give at most {max_len}")


def parse_port_list(
    values: object, what: str, max_len: int = MAX_LIST_LEN, *, min_len: int = 1
) -> Tuple[int, ...]:
    """Parse a list of ports (list/tuple of ints or strings, or one CLI string).

    ``min_len=0`` allows an empty list (e.g. outbound ``local_ports``: allocate).
    """
    items = _as_items(values, what)
    _check_len(items, what, min_len, max_len)
    return tuple(parse_port(item, what) for item in items)


def parse_hostport_list(
    values: object, what: str, max_len: int = MAX_LIST_LEN, *, min_len: int = 1
) -> Tuple[HostPort, ...]:
    """Parse a list of ``ip:port`` strings (a list/tuple, or one CLI string)."""
    items = _as_items(values, what)
    _check_len(items, what, min_len, max_len)
    return tuple(parse_hostport(item, what) for item in items)


# ---------------------------------------------------------------------------
# Peers


def parse_allowed_peer(value: object, what: str = "allowed_peer") -> str:
    """The peer allowed to claim an endpoint, by certificate identity; canonical text.

    An IP literal (canonical form: IPv6 compressed, lower-case) is compared
    with the IP subjectAltNames of the claimant's verified certificate; a DNS
    name (lower-case, no trailing dot) with its DNS subjectAltNames, exactly.
    No wildcards: an endpoint names one peer. "" means any trusted peer.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string (an IP address or DNS name), "
                              f"not {_show(value)}")
    if value == "":
        return ""
    if ":" in value or re.fullmatch(r"[0-9.]+", value):
        return str(parse_ip(value, what))
    # ASCII first: str.lower() maps e.g. KELVIN SIGN to "k".
    name = _dns_key(value)
    labels = name.split(".")
    if (not value.isascii() or len(name) > _MAX_DNS_NAME
            or not all(_DNS_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise InvalidArgument(
            f"{what} {_show(value)} is neither an IP address nor a DNS name: give the IP "
            "address or DNS name that the peer gateway's certificate lists as "
            "subjectAltName, e.g. 192.168.150.2 or gw2.example.org (no wildcards)")
    return name


def _dns_key(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name
