"""scistreamctl: manage scistreamd tunnels from the command line.

The CLI talks D-Bus to this host's daemon (``org.scistream.Tunnel1`` on the
system bus, or the session bus with ``--user``; ``SCISTREAM_BUS_ADDRESS``
overrides both). It never imports the daemon's service code: everything it
knows about tunnels comes over the bus, with the signatures of the API's one
description (scistreamd/interface.py), so it works against any scistreamd of
the same API version. ``--s2cs HOST:PORT`` naming another host's daemon sends
the verb to that daemon's user API instead (remote mode: module remote, the
client scistreamd/userclient.py, a token from module credentials or a client
certificate); ``tunnel`` creates both ends of a tunnel on two daemons.

Verbs::

    inbound-request  --remote_ip IP --receiver_ports PORTS [--num_conn N] [--s2cs H:P]
                     [--allowed-peer IP|DNS] [remote options]
    outbound-request [--receiver_ports PORTS] [--num_conn N] [--peer H:P]
                     [--peer-trust PEM] [--s2cs H:P] [remote options] UID LISTENER [...]
    tunnel           --server-s2cs H:P --client-s2cs H:P --remote_ip IP
                     --receiver_ports PORTS [--num_conn N] [--local-ports PORTS]
    release UID | release --all  [--s2cs H:P | --server-s2cs H:P --client-s2cs H:P]
    rearm UID                                     (inbound side: new key, new claim)
    list [--s2cs H:P]
    status UID [--s2cs H:P]
    logs UID [-f] [-n N]

    remote options: --server_cert PEM --token-file PATH --client-cert PEM
                    --client-key PEM --remote

Both the dashed (``--remote-ip``) and the upstream s2uc spelling
(``--remote_ip``) of every option are accepted, so the APS guide's commands work
with ``scistreamctl`` in place of ``s2uc``. ``--json`` gives a JSON object on
stdout for every verb. A UID of an endpoint on this host (release, rearm, status,
logs) may be abbreviated to a unique prefix, as git and docker accept; "-" reads
it from stdin. Shell completion (bash, python3-argcomplete) completes verbs,
options and the uids of this host's endpoints.

Modules: args (command line), plans (validation), verbs, output (texts),
bus (the jeepney client), remote (remote mode, tunnel), credentials (tokens),
errors (the exit-code table), cli (main()).

Start-up time matters (scripts call this in loops): only argparse and the
standard library are imported at the top; ``scistreamd.values`` (the daemon's
parsers, without model's dataclasses) is imported when arguments are validated,
jeepney only when a bus call is made, requests only in remote mode, argcomplete
only when the shell asks for completions.

Failures print one line on stderr, ``scistreamctl: <problem>. <fix>``, and exit
with a code that names the kind of failure:

"""

from __future__ import annotations

import importlib

from .errors import exit_codes_rst

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # annotations only: importing typing costs every CLI start ~3 ms
    from typing import Any

#: Public names -> the module that defines them. Loaded on first use (PEP 562):
#: ``python3 -m scistreamd.ctl --version`` must not pay for the bus client.
_EXPORTS = {
    "args": ("EXIT_CODES_HELP", "build_parser", "complete_uids", "parse_args"),
    "bus": ("BUS_ADDRESS_ENV", "SYSTEM_BUS_DEFAULT", "Client", "bus_address", "plain",
            "run_bus", "split_signature"),
    "errors": ("EXIT_CODES", "PROG", "CtlError", "error_from_dbus", "error_from_exception"),
    "cli": ("main",),
    "output": ("COUNTER_ORDER", "STATUS_ORDER", "format_age", "format_bytes", "format_list",
               "format_rate", "format_request", "format_request_rows", "format_status",
               "format_table", "format_time_us", "target_warning"),
    "plans": ("MAX_TRUST_PEM", "InboundPlan", "OutboundPlan", "is_uid_prefix",
              "read_trust_pem", "read_uid_arg", "read_uid_ref"),
    "verbs": ("VERBS", "journalctl_argv", "match_uid", "relay_units_in"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__doc__ = (__doc__ or "") + exit_codes_rst()

__all__ = sorted(["exit_codes_rst", *_MODULE_OF])
