"""Endpoint types and the parsing of every external value into them.

Anything that arrives from outside (D-Bus arguments, CLI strings, the peer
port, state files) goes through a parser here and comes out as a typed value
(``IPv4Address``, ``int``, a canonical uid ...). Later stages, notably the
stunnel config renderer, only ever see those typed values, so no user string
can reach a config file. Parsers never sanitise: a bad value is rejected with
an :class:`InvalidArgument` that names the argument and says what to do.

The parsers of scalar and list values (IPs, ports, ip:port, uids, counts,
allowed peers) are in values.py, re-exported here.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

from .errors import InvalidArgument
from .identity import LEGACY_OWNER, parse_owner

# The parsers of external values live in values (scistreamctl imports them without
# this module's dataclasses); re-exported: the daemon and its tests import them here.
from .values import (  # noqa: F401
    _COUNT_STR,
    _DNS_LABEL,
    _HOSTPORT_V6,
    _IP_CHARS,
    _MAX_DNS_NAME,
    _MAX_IP_LEN,
    _PORT_STR,
    _UID,
    MAX_LIST_LEN,
    HostPort,
    _as_items,
    _check_len,
    _dns_key,
    _is_int,
    _show,
    parse_allowed_peer,
    parse_hostport,
    parse_hostport_list,
    parse_ip,
    parse_num_conn,
    parse_port,
    parse_port_list,
    parse_uid,
    split_list,
)

IPAddress = Union[IPv4Address, IPv6Address]
IPNetwork = Union[IPv4Network, IPv6Network]

#: Longest free-text field (detail, claimed_by) accepted from a state file.
MAX_TEXT_LEN = 4096
#: Largest key generation (a D-Bus ``u``); the count wraps to 1 after it.
MAX_KEY_GENERATION = 2**32 - 1
_RELAY_ID = re.compile(r"[0-9a-f]{16}")
# Any float of unix seconds is exact below 2**53; later than that is corruption.
_MAX_TIME = float(2**53)






class Role(str, Enum):
    """Which half of a tunnel an endpoint is."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"

    @property
    def upstream(self) -> str:
        """Upstream SciStream's name of the role, printed in the guide's output lines."""
        return "PROD" if self is Role.INBOUND else "CONS"

    def __str__(self) -> str:
        return self.value


class State(str, Enum):
    """Life cycle of an endpoint as seen over D-Bus."""

    STARTING = "starting"
    ACTIVE = "active"
    FAILED = "failed"
    RELEASING = "releasing"

    def __str__(self) -> str:
        return self.value




# ---------------------------------------------------------------------------
# Scalar parsers










def new_uid() -> str:
    """A fresh random tunnel uid (UUID4; unguessable, since a uid is a capability)."""
    import uuid  # the daemon's alone: scistreamctl imports this module to validate (~2 ms)

    return str(uuid.uuid4())


def new_relay_id() -> str:
    """A fresh opaque relay id: names the relay's unit and key directory.

    Random, never derived from the uid: unit names, cgroup paths and unit
    properties are readable by every local user, and a uid is a capability.
    """
    import secrets  # as uuid above (~5 ms with hashlib)

    return secrets.token_hex(8)


def parse_relay_id(value: object) -> str:
    """An endpoint's relay id: 16 lower-case hex digits, or (a record written
    before relay ids existed) a tunnel uid, which was then the unit's name."""
    if isinstance(value, str) and _RELAY_ID.fullmatch(value):
        return value
    try:
        return parse_uid(value)
    except InvalidArgument:
        raise InvalidArgument(
            f"relay id {_show(value)} is not 16 lower-case hex digits (nor a legacy uid)"
        ) from None




def parse_role(value: object) -> Role:
    if isinstance(value, Role):
        return value
    if isinstance(value, str):
        for role in Role:
            if value == role.value:
                return role
    raise InvalidArgument(f"role {_show(value)} is unknown: give 'inbound' or 'outbound'")


def parse_state(value: object) -> State:
    if isinstance(value, State):
        return value
    if isinstance(value, str):
        for state in State:
            if value == state.value:
                return state
    names = ", ".join(s.value for s in State)
    raise InvalidArgument(f"state {_show(value)} is unknown: expected one of {names}")


# ---------------------------------------------------------------------------
# Lists












def parse_options(
    opts: object, allowed: Mapping[str, Callable[[object], object]]
) -> Dict[str, object]:
    """Parse an ``a{sv}`` options dict (Variants already unwrapped).

    Each allowed key maps to the parser of its value; keys that are absent
    are absent from the result, so callers apply their own defaults.
    """
    if not isinstance(opts, dict):
        raise InvalidArgument(f"options must be a dictionary, not {_show(opts)}")
    result: Dict[str, object] = {}
    for key, value in opts.items():
        if not isinstance(key, str) or key not in allowed:
            known = ", ".join(sorted(allowed)) or "(none)"
            raise InvalidArgument(f"option {_show(key)} is unknown: allowed options are {known}")
        result[key] = allowed[key](value)
    return result


# ---------------------------------------------------------------------------
# Endpoint


def _parse_time(value: object, what: str) -> float:
    # Range comparison, not math.isfinite(): it also rejects NaN/inf, and huge
    # ints from a JSON file compare fine where float() would overflow.
    if (_is_int(value) or isinstance(value, float)) and 0 <= value <= _MAX_TIME:  # type: ignore[operator]
        return float(value)  # type: ignore[arg-type]
    raise InvalidArgument(f"{what} {_show(value)} is not a time: expected unix seconds >= 0")


def _parse_text(value: object, what: str) -> str:
    if isinstance(value, str) and len(value) <= MAX_TEXT_LEN:
        return value
    raise InvalidArgument(f"{what} must be a string of at most {MAX_TEXT_LEN} characters")


@dataclass
class Endpoint:
    """One host's half of a tunnel; keyed by (uid, role)."""

    uid: str
    role: Role
    listeners: Tuple[HostPort, ...]
    targets: Tuple[HostPort, ...]
    num_conn: int
    created_at: float
    state: State = State.STARTING
    #: outbound: the peer daemon's control address (where the key came from).
    peer: HostPort | None = None
    #: inbound: who claimed the key over the peer port, and when.
    claimed_by: str = ""
    claimed_at: float = 0.0
    #: inbound: the claimant's source address on the peer port; once set, the
    #: relay's listeners accept TCP from it only (IPAddressAllow= on its socket unit).
    claimant_ip: IPAddress | None = None
    #: why the endpoint failed, for status output.
    detail: str = ""
    n_restarts: int = 0
    #: inbound: the only peer that may claim the key, by certificate identity
    #: (canonical text of parse_allowed_peer); "" = any peer the trust accepts.
    allowed_peer: str = ""
    #: opaque name of the relay's unit and key directory (new_relay_id); for a
    #: record of a version before relay ids, the uid (its unit's name then).
    relay_id: str = field(default_factory=new_relay_id)
    #: who created it (identity.py): "local:uid=N", "token:<sub>" or "cert:<name>".
    owner: str = LEGACY_OWNER
    #: inbound: how many keys the endpoint has had (1 = the first; a re-arm or a
    #: re-claim gives a new key and the next number). outbound: the generation of
    #: the key it claimed (0 = the peer did not say: a version without generations).
    key_generation: int = 0
    #: inbound: the certificate identity (PeerIdentity.names()) of a verified
    #: claimant; "" for none or an unverified one. Only it may claim again, and only
    #: until its relay first connects (manager.claim).
    claimed_identity: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the invariants; raises InvalidArgument."""
        if parse_uid(self.uid) != self.uid:
            raise InvalidArgument(f"endpoint uid {_show(self.uid)} is not canonical (lower-case)")
        if not isinstance(self.role, Role):
            raise InvalidArgument(f"endpoint role {_show(self.role)} is not a Role")
        if not isinstance(self.state, State):
            raise InvalidArgument(f"endpoint state {_show(self.state)} is not a State")
        for name in ("listeners", "targets"):
            seq = getattr(self, name)
            if not isinstance(seq, tuple) or not all(isinstance(h, HostPort) for h in seq):
                raise InvalidArgument(f"endpoint {name} must be a tuple of HostPort")
        if not _is_int(self.num_conn) or not 1 <= self.num_conn <= MAX_LIST_LEN:
            raise InvalidArgument(
                f"endpoint num_conn {_show(self.num_conn)} is not in 1..{MAX_LIST_LEN}"
            )
        if len(self.listeners) != self.num_conn:
            raise InvalidArgument(
                f"endpoint has {len(self.listeners)} listeners but num_conn {self.num_conn}"
            )
        if len(set(self.listeners)) != len(self.listeners):
            raise InvalidArgument("endpoint listeners must be distinct")
        if not self.targets:
            raise InvalidArgument("endpoint has no targets")
        if self.peer is not None and not isinstance(self.peer, HostPort):
            raise InvalidArgument(f"endpoint peer {_show(self.peer)} is not a HostPort")
        if self.claimant_ip is not None and not isinstance(self.claimant_ip,
                                                           (IPv4Address, IPv6Address)):
            raise InvalidArgument(f"endpoint claimant_ip {_show(self.claimant_ip)} is not an IP")
        if not _is_int(self.n_restarts) or self.n_restarts < 0:
            raise InvalidArgument(f"endpoint n_restarts {_show(self.n_restarts)} is not >= 0")
        _parse_time(self.created_at, "endpoint created_at")
        _parse_time(self.claimed_at, "endpoint claimed_at")
        _parse_text(self.claimed_by, "endpoint claimed_by")
        _parse_text(self.detail, "endpoint detail")
        _parse_text(self.claimed_identity, "endpoint claimed_identity")
        parse_key_generation(self.key_generation, "endpoint key_generation")
        if parse_allowed_peer(self.allowed_peer, "endpoint allowed_peer") != self.allowed_peer:
            raise InvalidArgument(
                f"endpoint allowed_peer {_show(self.allowed_peer)} is not canonical")
        if parse_relay_id(self.relay_id) != self.relay_id or (
                _UID.fullmatch(self.relay_id) and self.relay_id != self.uid):
            raise InvalidArgument(f"endpoint relay id {_show(self.relay_id)} is neither opaque "
                                  "(16 hex digits) nor the endpoint's own uid")
        if parse_owner(self.owner) != self.owner:
            raise InvalidArgument(f"endpoint owner {_show(self.owner)} is not canonical")

    @property
    def unit(self) -> str:
        """The relay's systemd unit; named by the opaque relay id, never the uid."""
        return relay_unit_name(self.role, self.relay_id)

    @property
    def legacy_relay_id(self) -> bool:
        """Whether the relay is still named by its uid (a record of an earlier version)."""
        return self.relay_id == self.uid

    @property
    def socket_unit(self) -> str:
        """The relay's .socket unit: it holds the listeners (derived from :attr:`unit`,
        so whatever names the service names the socket; same base name, so systemd
        pairs them by default)."""
        return socket_unit_name(self.unit)

    @property
    def key(self) -> Tuple[str, Role]:
        return (self.uid, self.role)

    def mappings(self) -> List[Tuple[HostPort, HostPort]]:
        """listener i forwards to target i % len(targets) (round robin over targets)."""
        n = len(self.targets)
        return [(lst, self.targets[i % n]) for i, lst in enumerate(self.listeners)]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe form; :meth:`from_dict` reverses it."""
        return {
            "uid": self.uid,
            "role": self.role.value,
            "listeners": [str(h) for h in self.listeners],
            "targets": [str(h) for h in self.targets],
            "num_conn": self.num_conn,
            "created_at": self.created_at,
            "state": self.state.value,
            "peer": str(self.peer) if self.peer is not None else None,
            "claimed_by": self.claimed_by,
            "claimed_at": self.claimed_at,
            "claimant_ip": str(self.claimant_ip) if self.claimant_ip is not None else None,
            "detail": self.detail,
            "n_restarts": self.n_restarts,
            # Only when set: a record without it still loads in an older daemon.
            **({"allowed_peer": self.allowed_peer} if self.allowed_peer else {}),
            "relay_id": self.relay_id,
            "owner": self.owner,
            # Only when not the role's default (and claimed_identity only when set):
            # a record of an endpoint that never used them still loads in an older daemon.
            **({"key_generation": self.key_generation}
               if self.key_generation != default_key_generation(self.role) else {}),
            **({"claimed_identity": self.claimed_identity} if self.claimed_identity else {}),
        }

    @classmethod
    def from_dict(cls, d: object) -> Endpoint:
        """Rebuild an endpoint from :meth:`to_dict` output, validating every field.

        State files may be corrupt or edited by hand: anything unexpected raises
        InvalidArgument, including unknown keys.
        """
        if not isinstance(d, dict):
            raise InvalidArgument(f"endpoint record must be an object, not {_show(d)}")
        required = {"uid", "role", "listeners", "targets", "num_conn", "created_at"}
        optional = {"state", "peer", "claimed_by", "claimed_at", "claimant_ip", "detail",
                    "n_restarts", "allowed_peer", "relay_id", "owner", "key_generation",
                    "claimed_identity"}
        unknown = [k for k in d if k not in required | optional]
        if unknown:
            raise InvalidArgument(
                f"endpoint record has unknown keys {_show(sorted(map(str, unknown)))}"
            )
        missing = sorted(required - set(d))
        if missing:
            raise InvalidArgument(f"endpoint record lacks {', '.join(missing)}")
        if not _is_int(d["num_conn"]):
            raise InvalidArgument(f"num_conn {_show(d['num_conn'])} is not an integer")
        num_conn = parse_num_conn(d["num_conn"], MAX_LIST_LEN)
        peer_raw = d.get("peer")
        claimant_raw = d.get("claimant_ip")
        n_restarts = d.get("n_restarts", 0)
        if not _is_int(n_restarts) or n_restarts < 0:
            raise InvalidArgument(f"n_restarts {_show(n_restarts)} is not an integer >= 0")
        uid = parse_uid(d["uid"])
        role = parse_role(d["role"])
        return cls(
            uid=uid,
            role=role,
            listeners=_parse_stored_hostports(d["listeners"], "listeners"),
            targets=_parse_stored_hostports(d["targets"], "targets"),
            num_conn=num_conn,
            created_at=_parse_time(d["created_at"], "created_at"),
            state=parse_state(d.get("state", State.STARTING.value)),
            peer=None if peer_raw is None else parse_hostport(peer_raw, "peer"),
            claimed_by=_parse_text(d.get("claimed_by", ""), "claimed_by"),
            claimed_at=_parse_time(d.get("claimed_at", 0.0), "claimed_at"),
            claimant_ip=None if claimant_raw is None else parse_ip(claimant_raw, "claimant_ip"),
            detail=_parse_text(d.get("detail", ""), "detail"),
            n_restarts=n_restarts,
            allowed_peer=parse_allowed_peer(d.get("allowed_peer", ""), "allowed_peer"),
            # Records written before relay ids existed: the relay runs as
            # scistream-<role>-<uid>.service and is adopted under that name.
            relay_id=parse_relay_id(d.get("relay_id", uid)),
            # Records written before owners existed: see identity.LEGACY_OWNER.
            owner=parse_owner(d.get("owner", LEGACY_OWNER)),
            key_generation=parse_key_generation(
                d.get("key_generation", default_key_generation(role)), "key_generation"),
            claimed_identity=_parse_text(d.get("claimed_identity", ""), "claimed_identity"),
        )


def default_key_generation(role: Role) -> int:
    """An endpoint's generation when its record names none: an inbound endpoint has
    its first key (1); an outbound one does not know its peer's (0)."""
    return 1 if role is Role.INBOUND else 0


def parse_key_generation(value: object, what: str = "key_generation") -> int:
    """A key generation: an int (not a bool) in 0..MAX_KEY_GENERATION."""
    if _is_int(value) and 0 <= value <= MAX_KEY_GENERATION:  # type: ignore[operator]
        return int(value)  # type: ignore[call-overload]
    raise InvalidArgument(f"{what} {_show(value)} is not a key generation: expected an integer "
                          f"in 0..{MAX_KEY_GENERATION}")


def next_key_generation(current: int) -> int:
    """The generation after ``current`` (wraps to 1: 0 means "unknown")."""
    return current + 1 if current < MAX_KEY_GENERATION else 1


def relay_unit_name(role: Role, relay_id: str) -> str:
    """The relay unit of (role, relay id): scistream-<role>-<relay id>.service."""
    return f"scistream-{role.value}-{relay_id}.service"


_RELAY_UNIT = re.compile(r"scistream-(inbound|outbound)-([0-9a-f-]{16,36})\.service")


def parse_relay_unit(value: object) -> str:
    """A relay unit name (as relay_unit_name makes them); InvalidArgument otherwise."""
    if isinstance(value, str):
        m = _RELAY_UNIT.fullmatch(value)
        if m:
            return relay_unit_name(parse_role(m.group(1)), parse_relay_id(m.group(2)))
    raise InvalidArgument(f"{_show(value)} is not a scistream relay unit name")


def socket_unit_name(service_unit: str) -> str:
    """The .socket unit paired with relay service ``service_unit``."""
    if not isinstance(service_unit, str) or not service_unit.endswith(".service"):
        raise InvalidArgument(f"{_show(service_unit)} is not a service unit name")
    return service_unit[: -len(".service")] + ".socket"


def parse_network(value: object, what: str) -> IPNetwork:
    """A CIDR network such as ``10.1.0.0/16`` or ``2001:db8::/32``; a bare address
    is a single-host network. Host bits must be zero (``10.1.2.3/16`` is a typo
    for either the host or the network, so it is refused, not guessed)."""
    if not isinstance(value, str) or not value or len(value) > _MAX_IP_LEN + 4:
        raise InvalidArgument(f"{what} {_show(value)} is not a network: write a CIDR such as "
                              "10.1.0.0/16 or 2001:db8::/32")
    addr, _, prefix = value.partition("/")
    if not _IP_CHARS.fullmatch(addr) or (prefix and not re.fullmatch(r"[0-9]{1,3}", prefix)):
        raise InvalidArgument(f"{what} {_show(value)} is not a network: write a CIDR such as "
                              "10.1.0.0/16 or 2001:db8::/32 (no host names)")
    try:
        return ip_network(value, strict=True)
    except ValueError as e:
        raise InvalidArgument(f"{what} {_show(value)} is not a network ({e}): write a CIDR "
                              "such as 10.1.0.0/16, with the host bits zero") from None


def host_network(ip: IPAddress) -> IPNetwork:
    """The single-address network of ``ip`` (/32 or /128)."""
    return ip_network(ip)


def _parse_stored_hostports(values: object, what: str) -> Tuple[HostPort, ...]:
    # Stored lists are JSON arrays; a string here means corruption, not CLI input.
    if not isinstance(values, list):
        raise InvalidArgument(f"{what} must be a list, not {_show(values)}")
    return parse_hostport_list(values, what)
