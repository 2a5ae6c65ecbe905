"""Target policy: which networks and ports an inbound endpoint may forward to.

Config key ``allowed_targets`` is a list of rules, each a string
``"NETWORK [PORTS]"``: NETWORK an address or CIDR (``192.168.150.0/24``,
``10.0.0.5``, ``fd00::/8``, ``::1``), PORTS after whitespace a comma-separated
list of ports and LOW-HIGH ranges (``5000-6000,7000``), all ports if absent.
Whitespace separates the two, so IPv6 colons never read as a port.

A target is allowed when a rule contains its address and port. Loopback
(127.0.0.0/8, ::1) and link-local (169.254.0.0/16, fe80::/10) targets are
allowed only by a rule whose network lies inside those ranges, i.e. a rule
that names them: ``0.0.0.0/0`` does not open 127.0.0.1. Otherwise a member of
group scistream could expose services that listen on loopback only (a local
admin interface, a database) to the peer gateway.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Optional, Sequence, Tuple, Union

from .errors import InvalidArgument

IPAddress = Union[IPv4Address, IPv6Address]
IPNetwork = Union[IPv4Network, IPv6Network]

#: Address ranges a rule must name explicitly, by kind.
GUARDED = (
    ("loopback", (ip_network("127.0.0.0/8"), ip_network("::1/128"))),
    ("link-local", (ip_network("169.254.0.0/16"), ip_network("fe80::/10"))),
)
_NETWORK_CHARS = re.compile(r"[0-9A-Fa-f.:/]{2,64}")
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
MAX_RULES = 1024


@dataclass(frozen=True)
class TargetRule:
    """One rule of allowed_targets, with the text it was written as (to name it)."""

    text: str
    network: IPNetwork
    #: Inclusive (low, high) port ranges; empty = every port.
    ports: Tuple[Tuple[int, int], ...] = ()

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.network.version and ip in self.network

    def allows_port(self, port: int) -> bool:
        return not self.ports or any(lo <= port <= hi for lo, hi in self.ports)

    def names(self, kind: str) -> bool:
        """Whether this rule lies inside the ``kind`` ranges (so opens them on purpose)."""
        nets = dict(GUARDED)[kind]
        return any(self.network.version == n.version and self.network.subnet_of(n)  # type: ignore[arg-type]
                   for n in nets)


def _bad(text: str, problem: str) -> InvalidArgument:
    return InvalidArgument(
        f"target rule {text!r:.80} {problem}: write \"NETWORK [PORTS]\", e.g. "
        "\"192.168.150.0/24\", \"10.0.0.0/8 5000-6000\" or \"fd00::/8 5300,5400-5410\"")


def _parse_ports(text: str, field: str) -> Tuple[Tuple[int, int], ...]:
    out = []
    for part in field.split(","):
        m = _PORTS.fullmatch(part)
        if not m:
            raise _bad(text, f"has {part!r:.20} where a port or LOW-HIGH range belongs")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if not 1 <= lo <= hi <= 65535:
            raise _bad(text, f"has the port range {part} (ports are 1..65535, lower first)")
        out.append((lo, hi))
    return tuple(out)


def parse_target_rule(value: object) -> TargetRule:
    """One rule string into a TargetRule; InvalidArgument naming the problem."""
    if not isinstance(value, str):
        raise InvalidArgument(f"a target rule must be a string like \"10.0.0.0/8 5000-6000\", "
                              f"not {type(value).__name__}")
    fields = value.split()
    if not 1 <= len(fields) <= 2:
        raise _bad(value, "is not one network and at most one port list")
    if not _NETWORK_CHARS.fullmatch(fields[0]):
        raise _bad(value, f"has {fields[0]!r:.60} where an address or CIDR belongs")
    try:
        network = ip_network(fields[0], strict=True)
    except ValueError as err:
        raise _bad(value, f"has no valid network ({err}; host bits must be zero, e.g. "
                          "10.0.0.0/8 rather than 10.1.2.3/8)") from None
    ports = _parse_ports(value, fields[1]) if len(fields) == 2 else ()
    return TargetRule(" ".join(fields), network, ports)


def parse_target_rules(value: object) -> Tuple[TargetRule, ...]:
    if not isinstance(value, list):
        raise InvalidArgument("expected a list of rule strings, e.g. "
                              "[\"192.168.150.0/24\", \"10.0.0.0/8 5000-6000\"]")
    if len(value) > MAX_RULES:
        raise InvalidArgument(f"{len(value)} rules are too many: at most {MAX_RULES}")
    return tuple(parse_target_rule(v) for v in value)


#: Default: every address and port, loopback and link-local excepted (see GUARDED).
DEFAULT_TARGET_RULES = (parse_target_rule("0.0.0.0/0"), parse_target_rule("::/0"))


def guarded_kind(ip: IPAddress) -> Optional[str]:
    for kind, nets in GUARDED:
        if any(ip.version == n.version and ip in n for n in nets):
            return kind
    return None


def target_refusal(rules: Sequence[TargetRule], ip: IPAddress, port: int) -> Optional[str]:
    """None if ``ip:port`` is an allowed target, else why not, naming the rule."""
    # An IPv4-mapped IPv6 address reaches the IPv4 host: judge it as that.
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    kind = guarded_kind(ip)
    wrong_port: Optional[TargetRule] = None
    for rule in rules:
        if not rule.contains(ip) or (kind and not rule.names(kind)):
            continue
        if rule.allows_port(port):
            return None
        wrong_port = wrong_port or rule
    fix = ("; the administrator can allow it with a rule in allowed_targets "
           "(/etc/scistream/scistreamd.toml or a conf.d drop-in)")
    shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    if wrong_port is not None:
        return (f"target {shown} is refused: rule \"{wrong_port.text}\" of allowed_targets "
                f"covers {ip} but not port {port}" + fix)
    if kind is not None:
        return (f"target {shown} is refused: {kind} targets are allowed only by a rule of "
                f"allowed_targets that names them (such as \"{ip} {port}\"), and none does"
                + fix)
    listed = ", ".join(f'"{r.text}"' for r in rules[:8]) + (", ..." if len(rules) > 8 else "")
    return (f"target {shown} is refused: no rule of allowed_targets covers it "
            f"(rules: {listed or 'none'})" + fix)
