"""scistreamctl: manage scistreamd tunnels from the command line.

The CLI talks only D-Bus (``org.scistream.Tunnel1`` on the system bus, or the
session bus with ``--user``; ``SCISTREAM_BUS_ADDRESS`` overrides both). It never
imports the daemon's service code: everything it knows about tunnels comes over
the bus, with the signatures of the API's one description (scistreamd/interface.py),
so it works against any scistreamd of the same API version.

Verbs::

    inbound-request  --remote_ip IP --receiver_ports PORTS [--num_conn N] [--s2cs H:P]
                     [--allowed-peer IP|DNS]
    outbound-request [--receiver_ports PORTS] [--num_conn N] [--peer H:P]
                     [--server_cert PEM] UID LISTENER [LISTENER ...]
    release UID | release --all
    rearm UID                                     (inbound side: new key, new claim)
    list
    status UID
    logs UID [-f] [-n N]

Both the dashed (``--remote-ip``) and the upstream s2uc spelling
(``--remote_ip``) of every option are accepted, so the APS guide's commands work
with ``scistreamctl`` in place of ``s2uc``. ``--json`` gives a JSON object on
stdout for every verb. A UID of an endpoint on this host (release, rearm, status,
logs) may be abbreviated to a unique prefix, as git and docker accept; "-" reads
it from stdin. Shell completion (bash, python3-argcomplete) completes verbs,
options and the uids of this host's endpoints.

Modules: args (command line), plans (validation), verbs, output (texts),
bus (the jeepney client), errors (the exit-code table), main.

Start-up time matters (scripts call this in loops): only argparse and the
standard library are imported at the top; ``scistreamd.model`` is imported when
arguments are validated, jeepney only when a bus call is made, argcomplete only
when the shell asks for completions.

Failures print one line on stderr, ``scistreamctl: <problem>. <fix>``, and exit
with a code that names the kind of failure:

"""

from .args import EXIT_CODES_HELP, build_parser, complete_uids, parse_args
from .bus import (
    BUS_ADDRESS_ENV,
    SYSTEM_BUS_DEFAULT,
    Client,
    bus_address,
    plain,
    run_bus,
    split_signature,
)
from .errors import (
    EXIT_CODES,
    PROG,
    CtlError,
    error_from_dbus,
    error_from_exception,
    exit_codes_rst,
)
from .main import main
from .output import (
    STATUS_ORDER,
    _plain,
    format_list,
    format_request,
    format_status,
    format_table,
    format_time_us,
)
from .plans import (
    MAX_TRUST_PEM,
    InboundPlan,
    OutboundPlan,
    is_uid_prefix,
    read_trust_pem,
    read_uid_arg,
    read_uid_ref,
)
from .verbs import VERBS, journalctl_argv, match_uid, relay_units_in

__doc__ = (__doc__ or "") + exit_codes_rst()

__all__ = [
    "BUS_ADDRESS_ENV", "EXIT_CODES", "EXIT_CODES_HELP", "MAX_TRUST_PEM", "PROG",
    "STATUS_ORDER", "SYSTEM_BUS_DEFAULT", "Client", "CtlError", "InboundPlan", "OutboundPlan",
    "VERBS", "_plain", "build_parser", "bus_address", "complete_uids", "error_from_dbus",
    "error_from_exception", "format_list", "format_request", "format_status", "format_table",
    "format_time_us", "is_uid_prefix", "journalctl_argv", "main", "match_uid", "parse_args",
    "plain", "read_trust_pem", "read_uid_arg", "read_uid_ref", "relay_units_in", "run_bus",
    "split_signature",
]
