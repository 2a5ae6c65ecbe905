"""Authorization of remote users (user API): the ``user_rules`` of the configuration.

Each rule is a TOML table of the array ``user_rules``::

    [[user_rules]]
    name = "beamline-7"                    # named in every refusal
    identities = ["username:alice@example.org", "group:0b2c...", "cert:robot7.example.org"]
    inbound_targets = ["10.7.0.0/16 5000-5100"]   # targets.py syntax; [] = no inbound
    outbound = true                        # may create outbound endpoints (default false)
    outbound_peers = ["192.168.150.0/24"]  # ... whose peer and listeners lie here (default: any)
    max_endpoints = 4                      # endpoints held at once (default 4)

Identity selectors: ``token:SUB`` or ``sub:SUB`` (a token's subject),
``username:NAME`` (a token's username), ``group:ID`` (a token's identity_set
member or group), ``cert:NAME`` (a user client certificate's identity,
usercert.py). The **first** rule naming an identity decides everything for
it; no rule naming it: it may do nothing (the default, with no rules at all).
Local (D-Bus) callers are not subject to these rules.

Pure: imports nothing from D-Bus, systemd or TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import Iterable, Optional, Sequence, Tuple

from .errors import InvalidArgument
from .identity import MAX_NAME, Identity
from .model import IPAddress, IPNetwork, parse_network
from .targets import TargetRule, parse_target_rules, target_refusal

SELECTOR_KINDS = ("token", "sub", "username", "group", "cert")
RULE_KEYS = ("name", "identities", "inbound_targets", "outbound", "outbound_peers",
             "max_endpoints")
DEFAULT_MAX_ENDPOINTS = 4
MAX_USER_RULES = 1024
MAX_SELECTORS = 1024
FIX = ("; the gateway's administrator can allow it in user_rules "
       "(/etc/scistream/scistreamd.toml)")


@dataclass(frozen=True)
class UserRule:
    name: str
    identities: Tuple[Tuple[str, str], ...]  # (kind, value)
    inbound_targets: Tuple[TargetRule, ...] = ()
    outbound: bool = False
    max_endpoints: int = DEFAULT_MAX_ENDPOINTS
    #: Networks an outbound request's peer daemon and remote listeners must lie in;
    #: None: any (the peer must still pass the gateway's TLS trust).
    outbound_peers: Optional[Tuple[IPNetwork, ...]] = None

    def matches(self, ident: Identity) -> bool:
        return any(selector_matches(kind, value, ident) for kind, value in self.identities)


def selector_matches(kind: str, value: str, ident: Identity) -> bool:
    if ident.kind == "token":
        return ((kind in ("token", "sub") and value == ident.subject)
                or (kind == "username" and bool(ident.username) and value == ident.username)
                or (kind == "group" and value in ident.groups))
    if ident.kind == "cert":
        return kind == "cert" and value == ident.subject
    return False


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or any(
            not c.isprintable() or c.isspace() for c in value):
        raise InvalidArgument(f"{what} must be a non-empty string without spaces "
                              f"(at most {MAX_NAME} characters)")
    return value


def parse_selector(value: object) -> Tuple[str, str]:
    text = _text(value, "an identity selector")
    kind, sep, rest = text.partition(":")
    if not sep or kind not in SELECTOR_KINDS or not rest:
        raise InvalidArgument(
            f"identity selector {text[:80]!r} is not KIND:VALUE with KIND one of "
            f"{', '.join(SELECTOR_KINDS)} (e.g. \"username:alice@example.org\", "
            "\"cert:robot7.example.org\")")
    if kind == "cert":  # the form usercert.cert_subject gives
        try:
            rest = str(ip_address(rest))
        except ValueError:
            rest = rest.lower().rstrip(".")
    return kind, rest


def parse_user_rule(value: object, index: int) -> UserRule:
    where = f"rule {index + 1} of user_rules"
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a table ([[user_rules]] with name, identities, "
                              "inbound_targets, outbound, max_endpoints)")
    unknown = sorted(str(k) for k in value if k not in RULE_KEYS)
    if unknown:
        raise InvalidArgument(f"{where} has unknown keys {', '.join(unknown)}: known are "
                              f"{', '.join(RULE_KEYS)}")
    for key in ("name", "identities"):
        if key not in value:
            raise InvalidArgument(f"{where} lacks {key}")
    name = _text(value["name"], f"the name of {where}")
    where = f"rule {name!r} of user_rules"
    ids = value["identities"]
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_SELECTORS:
        raise InvalidArgument(f"identities of {where} must be an array of 1..{MAX_SELECTORS} "
                              "selectors like \"username:alice@example.org\"")
    try:
        selectors = tuple(dict.fromkeys(parse_selector(s) for s in ids))
        targets = parse_target_rules(value.get("inbound_targets", []))
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from None
    outbound = value.get("outbound", False)
    if not isinstance(outbound, bool):
        raise InvalidArgument(f"outbound of {where} must be true or false")
    peers = value.get("outbound_peers")
    if peers is not None:
        if not isinstance(peers, list) or len(peers) > MAX_SELECTORS:
            raise InvalidArgument(f"outbound_peers of {where} must be an array of networks, "
                                  "e.g. [\"192.168.150.0/24\", \"2001:db8::/32\"]")
        try:
            peers = tuple(parse_network(p, "outbound peer network") for p in peers)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e}") from None
    limit = value.get("max_endpoints", DEFAULT_MAX_ENDPOINTS)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 100_000:
        raise InvalidArgument(f"max_endpoints of {where} must be an integer 0..100000")
    return UserRule(name, selectors, targets, outbound, limit, peers)


def parse_user_rules(value: object) -> Tuple[UserRule, ...]:
    """The ``user_rules`` array of tables; InvalidArgument naming the rule and key."""
    if not isinstance(value, list):
        raise InvalidArgument("expected an array of tables: write each rule as a "
                              "[[user_rules]] table")
    if len(value) > MAX_USER_RULES:
        raise InvalidArgument(f"{len(value)} rules are too many: at most {MAX_USER_RULES}")
    rules = tuple(parse_user_rule(v, i) for i, v in enumerate(value))
    seen = set()
    for r in rules:
        if r.name in seen:
            raise InvalidArgument(f"two rules of user_rules are named {r.name!r}: names must "
                                  "be unique (refusals name them)")
        seen.add(r.name)
    return rules


# -- decisions (None: allowed; else the reason, naming the rule) -------------------


def rule_for(rules: Sequence[UserRule], ident: Identity) -> Optional[UserRule]:
    """The first rule naming ``ident`` (None: no rule does)."""
    return next((r for r in rules if r.matches(ident)), None)


def _no_rule(ident: Identity, what: str) -> str:
    return (f"{ident} may not {what}: no rule of user_rules names this identity (remote "
            "users may do nothing unless a rule allows it)" + FIX)


def no_rule_refusal(ident: Identity) -> str:
    return _no_rule(ident, "use this gateway's user API")


def inbound_refusal(rules: Sequence[UserRule], ident: Identity,
                    targets: Iterable[Tuple[IPAddress, int]]) -> Optional[str]:
    rule = rule_for(rules, ident)
    if rule is None:
        return _no_rule(ident, "create inbound endpoints")
    if not rule.inbound_targets:
        return (f"{ident} may not create inbound endpoints: rule {rule.name!r} of user_rules "
                "has no inbound_targets" + FIX)
    for ip, port in targets:
        why = target_refusal(rule.inbound_targets, ip, port)
        if why:
            shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
            return (f"{ident} may not forward to {shown}: rule {rule.name!r} of user_rules "
                    f"does not allow it (its inbound_targets: "
                    f"{', '.join(t.text for t in rule.inbound_targets[:8])})" + FIX)
    return None


def outbound_refusal(rules: Sequence[UserRule], ident: Identity,
                     addresses: Iterable[IPAddress] = ()) -> Optional[str]:
    """``addresses``: the peer daemon's and the remote listeners' (for outbound_peers)."""
    rule = rule_for(rules, ident)
    if rule is None:
        return _no_rule(ident, "create outbound endpoints")
    if not rule.outbound:
        return (f"{ident} may not create outbound endpoints: rule {rule.name!r} of user_rules "
                "does not set outbound = true" + FIX)
    if rule.outbound_peers is not None:
        for ip in addresses:
            if not any(ip.version == n.version and ip in n for n in rule.outbound_peers):
                return (f"{ident} may not create outbound endpoints towards {ip}: it is "
                        f"outside outbound_peers of rule {rule.name!r} of user_rules ("
                        f"{', '.join(map(str, rule.outbound_peers[:8])) or 'none'})" + FIX)
    return None


def limit_refusal(rules: Sequence[UserRule], ident: Identity, held: int,
                  adding: int = 1) -> Optional[str]:
    rule = rule_for(rules, ident)
    if rule is None:
        return _no_rule(ident, "hold endpoints")
    if held + adding > rule.max_endpoints:
        return (f"{ident} already holds {held} endpoint(s) on this gateway and rule "
                f"{rule.name!r} of user_rules allows at most {rule.max_endpoints}: release "
                "one first" + FIX)
    return None

