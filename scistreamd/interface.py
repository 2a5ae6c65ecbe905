"""The D-Bus API of scistreamd, described once (DESIGN.md §4).

Every method, signature, property and error name of ``org.scistream.Tunnel1``
is written here and nowhere else: dbus_api.py takes its dbus-next signatures
from it (``signed``), scistreamctl takes the signatures of its calls and of
their replies from it, the tests build their fake services and calls from it,
and the introspection XML shipped in /usr/share/dbus-1/interfaces/ is rendered
from it (``python3 -m scistreamd.interface DIR``; a unit test checks that the
committed files agree, an integration test that the daemon's live Introspect
does).

Pure and cheap to import (the CLI imports it on every call): plain classes,
no dataclasses, nothing from D-Bus.
"""

from __future__ import annotations

import sys

from . import ENDPOINT_IFACE, MANAGER_IFACE
from .errors import BY_DBUS_NAME, ScistreamError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Any, Callable, Dict, List, Sequence, Tuple

    Args = Tuple[Tuple[str, str], ...]  # ((name, signature), ...)


class Method:
    """A method: its in and out arguments, (name, signature) each."""

    __slots__ = ("name", "in_args", "out_args", "doc")

    def __init__(self, name: str, in_args: Args = (), out_args: Args = (), doc: str = "") -> None:
        self.name = name
        self.in_args = in_args
        self.out_args = out_args
        self.doc = doc

    @property
    def in_sig(self) -> str:
        return "".join(sig for _, sig in self.in_args)

    @property
    def out_sig(self) -> str:
        return "".join(sig for _, sig in self.out_args)


class Property:
    """A read-only property (the API has no writable ones)."""

    __slots__ = ("name", "sig", "doc", "emits")

    def __init__(self, name: str, sig: str, doc: str = "", emits: str = "const") -> None:
        self.name = name
        self.sig = sig
        self.doc = doc
        #: org.freedesktop.DBus.Property.EmitsChangedSignal: "true" (PropertiesChanged
        #: on every change), "const" (never changes), "false" (changes silently)
        self.emits = emits


class Interface:
    __slots__ = ("name", "methods", "properties")

    def __init__(self, name: str, methods: Sequence[Method], properties: Sequence[Property]):
        self.name = name
        self.methods: Dict[str, Method] = {m.name: m for m in methods}
        self.properties: Dict[str, Property] = {p.name: p for p in properties}


MANAGER = Interface(
    MANAGER_IFACE,
    methods=(
        Method("InboundRequest",
               (("remote_ip", "s"), ("receiver_ports", "aq"), ("num_conn", "u"),
                ("options", "a{sv}")),
               (("uid", "s"), ("endpoint", "o"), ("listeners", "as")),
               "Create the inbound (PROD) relay; options: allowed_peer (s), early (b: "
               "answer once the endpoint exists, its relay still starting; see WaitStarted)."),
        Method("OutboundRequest",
               (("uid", "s"), ("remote_listeners", "as"), ("local_ports", "aq"),
                ("num_conn", "u"), ("options", "a{sv}")),
               (("endpoint", "o"), ("listeners", "as")),
               "Claim an inbound endpoint's key and create the outbound (CONS) relay; "
               "options: peer (s), trust_pem (s)."),
        Method("Release", (("uid", "s"),), (), "Release every endpoint of tunnel uid here."),
        Method("ReleaseAll", (), (("count", "u"),), "Release every endpoint on this host."),
        Method("RearmEndpoint", (("uid", "s"),), (),
               "New key and claim for inbound endpoint uid."),
        Method("WaitStarted", (("uid", "s"),), (),
               "Return once the start of inbound endpoint uid (InboundRequest with early) is "
               "over, or with its failure (e.g. RelayFailed: the endpoint was rolled back); "
               "at once if none is going on."),
        Method("ListEndpoints", (), (("endpoints", "a(sssas)"),),
               "Every endpoint: (uid, role, state, listeners)."),
        Method("Reload", (), (("applied", "as"), ("needs_restart", "as")),
               "Re-read the configuration files and apply the keys that can change "
               "without a restart; returns the changed keys applied and those kept until "
               "a restart. An invalid configuration changes nothing (InvalidArgument)."),
    ),
    properties=(
        Property("Version", "s"),
        Property("PeerPort", "q"),
        Property("ListenAddress", "s",
                 "the address peers and applications reach this host at (relays listen "
                 "there; for listen_address 0.0.0.0 or :: the relay address)"),
        Property("PortRange", "(qq)"),
    ),
)

ENDPOINT = Interface(
    ENDPOINT_IFACE,
    methods=(
        Method("Release", (), (), "Release this endpoint."),
        Method("Rearm", (), (), "New key and claim (inbound endpoints only)."),
    ),
    properties=(
        Property("Uid", "s"),
        Property("Role", "s"),
        Property("State", "s", emits="true"),
        Property("StateDetail", "s", emits="true"),
        Property("Listeners", "as", emits="false"),
        Property("Targets", "as"),
        Property("NumConn", "u"),
        Property("Unit", "s", emits="false"),
        Property("CreatedAt", "t", "microseconds since the epoch"),
        Property("NRestarts", "u", emits="true"),
        Property("ClaimedBy", "s", emits="true"),
        Property("ClaimedAt", "t", "microseconds since the epoch; 0: never", emits="true"),
        Property("Peer", "s"),
        Property("AllowedPeer", "s"),
        Property("Owner", "s", 'who created it: "local:uid=N" (D-Bus), "token:<sub>" or '
                 '"cert:<name>" (user API)'),
        Property("KeyGeneration", "u",
                 "inbound: the number of the current key (1 = the first; a re-arm, or a "
                 "repeated claim by its claimant before its relay first connected, gives the "
                 "next). outbound: the number of the key it claimed; 0: the peer did not say",
                 emits="true"),
        # Counters (traffic.py says where each comes from). Their PropertiesChanged
        # come at most once a second per endpoint.
        Property("BytesIn", "t", "bytes received by the relay (IPIngressBytes of its "
                 ".socket + .service units; IP packets, TLS and headers included)",
                 emits="true"),
        Property("BytesOut", "t", "bytes sent by the relay (IPEgressBytes, as BytesIn)",
                 emits="true"),
        Property("RateIn", "t", "bytes per second received over the last 5 seconds",
                 emits="true"),
        Property("RateOut", "t", "bytes per second sent over the last 5 seconds",
                 emits="true"),
        Property("ConnectionsActive", "u", "connections the relay holds open now",
                 emits="true"),
        Property("ConnectionsTotal", "t", "connections the relay accepted in total",
                 emits="true"),
        Property("MainPID", "u", "the relay's process; 0: not running", emits="true"),
        Property("MemoryCurrent", "t", "the relay unit's memory in bytes", emits="true"),
        Property("TargetReachable", "s", "yes | no | unknown: did the last connection to "
                 "the target (inbound: the server application; outbound: as the peer "
                 "reports it) succeed", emits="true"),
        Property("TargetFailures", "t", "connections the relay could not make to its target",
                 emits="true"),
        Property("LastTargetFailure", "s", "what the last failure was", emits="true"),
        Property("LastTargetFailureAt", "t", "microseconds since the epoch; 0: never",
                 emits="true"),
    ),
)

#: The counter properties (rate-limited PropertiesChanged), in Traffic field order.
COUNTER_PROPERTIES: Tuple[Tuple[str, str], ...] = (
    ("BytesIn", "bytes_in"), ("BytesOut", "bytes_out"),
    ("RateIn", "rate_in"), ("RateOut", "rate_out"),
    ("ConnectionsActive", "connections_active"), ("ConnectionsTotal", "connections_total"),
    ("MainPID", "main_pid"), ("MemoryCurrent", "memory_current"),
    ("TargetReachable", "target_reachable"), ("TargetFailures", "target_failures"),
    ("LastTargetFailure", "last_target_failure"),
    ("LastTargetFailureAt", "last_target_failure_at"),
)

INTERFACES: Tuple[Interface, ...] = (MANAGER, ENDPOINT)

#: Every error name a method of the API may answer with (and its exit code in
#: scistreamctl); ``Failed`` is the internal error.
ERRORS: Dict[str, int] = {
    ScistreamError.dbus_name(): ScistreamError.exit_code,
    **{name: cls.exit_code for name, cls in sorted(BY_DBUS_NAME.items())},
}


# ---------------------------------------------------------------------------
# dbus-next glue without importing dbus-next: it reads signatures from
# annotations, so these decorators write the described ones there.


def _annotate(fn: Callable, annotations: Dict[str, str]) -> Callable:
    fn.__annotations__ = dict(annotations)
    return fn


def signed(iface: Interface, name: str = "") -> Callable[[Callable], Callable]:
    """Give method ``fn`` the signature of ``iface``'s method of its name.

    Put it innermost (under dbus-next's ``@method()`` and any wrapper using
    functools.wraps): the parameter names must be the described ones.
    """

    def deco(fn: Callable) -> Callable:
        m = iface.methods[name or fn.__name__]
        code = fn.__code__
        params = list(code.co_varnames[1:code.co_argcount])  # after self
        if params != [n for n, _ in m.in_args]:
            raise TypeError(f"{fn.__qualname__}{tuple(params)} does not match "
                            f"{iface.name}.{m.name}{tuple(n for n, _ in m.in_args)}")
        annotations = dict(m.in_args)
        if m.out_args:
            annotations["return"] = m.out_sig
        return _annotate(fn, annotations)

    return deco


def typed(iface: Interface, name: str = "") -> Callable[[Callable], Callable]:
    """Give property getter ``fn`` the type of ``iface``'s property of its name."""

    def deco(fn: Callable) -> Callable:
        return _annotate(fn, {"return": iface.properties[name or fn.__name__].sig})

    return deco


# ---------------------------------------------------------------------------
# Introspection XML


def _esc(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def introspection_xml(iface: Interface) -> str:
    """The interface as a D-Bus introspection document (for /usr/share/dbus-1/interfaces)."""
    out: List[str] = [
        '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"',
        ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">',
        "<!-- Generated from scistreamd/interface.py: python3 -m scistreamd.interface DIR -->",
        "<!-- Errors: " + ", ".join(ERRORS) + " -->",
        "<node>",
        f'  <interface name="{iface.name}">',
    ]
    for m in iface.methods.values():
        out.append(f'    <method name="{m.name}">')
        if m.doc:
            out.append(f"      <!-- {_esc(m.doc)} -->")
        out += [f'      <arg name="{n}" type="{_esc(s)}" direction="in"/>' for n, s in m.in_args]
        out += [f'      <arg name="{n}" type="{_esc(s)}" direction="out"/>'
                for n, s in m.out_args]
        out.append("    </method>")
    for p in iface.properties.values():
        out.append(f'    <property name="{p.name}" type="{_esc(p.sig)}" access="read">')
        if p.emits != "true":
            out.append('      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal"'
                       f' value="{p.emits}"/>')
        if p.doc:
            out.append(f"      <!-- {_esc(p.doc)} -->")
        out.append("    </property>")
    out += ["  </interface>", "</node>", ""]
    return "\n".join(out)


def shape(xml_text: str, iface_name: str) -> Dict[str, Any]:
    """What two introspections of ``iface_name`` must agree on: methods with their
    in (name, type) and out types, properties with type and access."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(xml_text)
    for el in root.iter("interface"):
        if el.get("name") == iface_name:
            methods = {
                m.get("name"): (
                    [(a.get("name"), a.get("type")) for a in m.iter("arg")
                     if a.get("direction", "in") == "in"],
                    [a.get("type") for a in m.iter("arg") if a.get("direction") == "out"],
                )
                for m in el.iter("method")
            }
            props = {p.get("name"): (p.get("type"), p.get("access")) for p in el.iter("property")}
            signals = sorted(s.get("name") for s in el.iter("signal"))
            return {"methods": methods, "properties": props, "signals": signals}
    raise KeyError(f"{iface_name} is not in the introspection")


def xml_files() -> Dict[str, str]:
    """file name -> content of the shipped introspection files."""
    return {f"{i.name}.xml": introspection_xml(i) for i in INTERFACES}


def main(argv: Sequence[str]) -> int:
    """Write the introspection files into the directory argv[0]."""
    import os

    if len(argv) != 1:
        print("usage: python3 -m scistreamd.interface DIR", file=sys.stderr)
        return 2
    os.makedirs(argv[0], exist_ok=True)
    for name, text in xml_files().items():
        with open(os.path.join(argv[0], name), "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
