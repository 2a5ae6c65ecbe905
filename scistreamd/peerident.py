"""Who asks on the peer port (its address, and what a verified client certificate
names), and whether that is the peer an inbound endpoint allows to claim its key.

Pure: imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING, Tuple

from .errors import InvalidArgument
from .values import _dns_key, _show, parse_hostport

if TYPE_CHECKING:  # no import cycle at run time
    from .model import IPAddress


@dataclass(frozen=True)
class PeerIdentity:
    """Who asks on the peer port: its address, and what its verified certificate names.

    ``verified`` is True only for a client certificate that chained to the
    trusted CA(s) in the TLS handshake; the names are its subjectAltNames.
    """

    address: str
    verified: bool = False
    ips: Tuple[IPAddress, ...] = field(default=())
    dns_names: Tuple[str, ...] = field(default=())
    common_name: str = ""

    def names(self) -> str:
        """The certificate's identity as text: IP:a,DNS:b (CN=c when it has no SAN)."""
        parts = [f"IP:{ip}" for ip in self.ips] + [f"DNS:{d}" for d in self.dns_names]
        if not parts and self.common_name:
            parts = [f"CN={self.common_name}"]
        return ",".join(parts)

    def __str__(self) -> str:
        """For ClaimedBy and the journal: "ip:port" plus " cert <names>" when verified."""
        if not self.verified:
            return self.address
        return f"{self.address} cert {self.names() or '(no names)'}"


def peer_matches(allowed: str, who: PeerIdentity) -> bool:
    """Whether ``who`` is the peer ``allowed`` (canonical, see parse_allowed_peer) names.

    "" allows anyone. Otherwise only a verified certificate counts: an IP is
    matched against its IP SANs (IPv4 never equals an IPv4-mapped IPv6), a DNS
    name case-insensitively against its DNS SANs, exactly (a wildcard SAN
    names many hosts, so it never matches one name).
    """
    if not allowed:
        return True
    if not who.verified:
        return False
    try:
        want_ip = ip_address(allowed)
    except ValueError:
        return any(_dns_key(d) == allowed for d in who.dns_names if "*" not in d)
    return any(type(ip) is type(want_ip) and ip == want_ip for ip in who.ips)


def parse_claimant_ip(claimant: object) -> IPAddress:
    """The address of a claimant as the peer port describes it: ``"ip:port"`` or
    ``"[v6]:port"``, optionally followed by a space and more (e.g. ``CN=name``)."""
    if not isinstance(claimant, str) or not claimant.strip():
        raise InvalidArgument(f"claimant {_show(claimant)} names no address")
    return parse_hostport(claimant.split(" ", 1)[0], "claimant address").host
