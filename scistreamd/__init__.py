"""scistreamd: SciStream-style secure streaming tunnels as a systemd host agent."""

__version__ = "0.1.0"

BUS_NAME = "org.scistream.Tunnel1"
MANAGER_PATH = "/org/scistream/Tunnel1"
MANAGER_IFACE = "org.scistream.Tunnel1.Manager"
ENDPOINT_IFACE = "org.scistream.Tunnel1.Endpoint"
ENDPOINT_PATH_PREFIX = "/org/scistream/Tunnel1/endpoint"
ERROR_PREFIX = "org.scistream.Tunnel1.Error"
SLICE = "scistream.slice"
#: Static group the relays' dynamic users get as a supplementary group: it may
#: read an endpoint's key directory, which only that endpoint's relay can reach.
RELAY_GROUP = "scistream-relay"
