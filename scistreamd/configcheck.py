"""``scistreamd --check-config``: does this configuration work on this host?

Parsing (config.py) proves the values are well-formed; this checks what
they refer to, each problem named with its key and the fix: the TLS files
exist, are readable and load; the stunnel binary runs; the host certificate
names the address peers reach this host at. Run as root, as the daemon.
Imports nothing from D-Bus or systemd.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from cryptography import x509

from .config import Config
from .errors import ConfigError
from .hostaddrs import is_usable, is_wildcard
from .model import IPAddress
from .peertls import server_context, ssl_reason

Runner = Callable[..., subprocess.CompletedProcess]


def _who(cfg: Config, key: str) -> str:
    source = cfg.sources.get(key)
    return f"{key} ({source})" if source else key


def _readable(cfg: Config, key: str, path: Path, what: str) -> Optional[str]:
    """None if ``path`` is a readable file, else the problem."""
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return f"{_who(cfg, key)}: {path} does not exist: {what}"
    except IsADirectoryError:
        return f"{_who(cfg, key)}: {path} is a directory: give the file itself"
    except OSError as e:
        return (f"{_who(cfg, key)}: {path} is not readable ({e.strerror or e}): fix its "
                "permissions (the daemon reads it as root), or run the check as root")


def check_files(cfg: Config) -> List[str]:
    problems: List[str] = []
    cert_ok = key_ok = True
    for key, path, what in (
        ("peer_cert", cfg.peer_cert, "create it with 'scistreamd --generate-cert' or install "
                                     "this host's certificate there"),
        ("peer_key", cfg.peer_key, "create it with 'scistreamd --generate-cert' or install "
                                   "the certificate's private key there"),
    ):
        problem = _readable(cfg, key, path, what)
        if problem:
            problems.append(problem)
            cert_ok, key_ok = (False, key_ok) if key == "peer_cert" else (cert_ok, False)
    if cert_ok and key_ok:
        try:
            server_context(cfg.peer_cert, cfg.peer_key, None)
        except ConfigError as e:
            problems.append(f"peer_cert/peer_key: {e}")
    trust = [("peer_trust_file", cfg.peer_trust_file,
              "exchange trust files: copy the peer gateway's certificate (its peer_cert) or "
              "CA here, and this host's peer_cert to the peer's peer_trust_file")]
    if cfg.peer_client_ca is not None:
        trust.append(("peer_client_ca", cfg.peer_client_ca,
                      'install the CA of peer daemons\' client certificates there, or set "" '
                      "to use peer_trust_file"))
    for key, path, what in trust:
        problems += _ca_file(cfg, key, path, what, "give the peer's PEM certificate or CA")
    return problems


def _ca_file(cfg: Config, key: str, path: Path, what: str, fix: str) -> List[str]:
    """[] if ``path`` is readable and loads as PEM certificates, else the problem."""
    problem = _readable(cfg, key, path, what)
    if problem:
        return [problem]
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as e:
        return [f"{_who(cfg, key)}: {path} does not load as PEM certificates "
                f"({ssl_reason(e)}): {fix}"]
    return []


def check_stunnel(cfg: Config, run: Runner = subprocess.run) -> List[str]:
    who = _who(cfg, "stunnel")
    path = cfg.stunnel
    if not path.exists():
        return [f"{who}: {path} does not exist: install stunnel (Debian: stunnel4, "
                "Fedora/EL9: stunnel) or set stunnel to its path"]
    if not path.is_file() or not os.access(path, os.X_OK):
        return [f"{who}: {path} is not an executable file: set stunnel to the stunnel binary"]
    try:
        done = run([str(path), "-version"], capture_output=True, text=True, timeout=20,
                   stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        return [f"{who}: '{path} -version' did not run ({e}): set stunnel to a working binary"]
    out = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0 or "stunnel" not in out.lower():
        return [f"{who}: '{path} -version' failed (exit {done.returncode}): "
                f"{out.strip()[:200] or 'no output'}; set stunnel to a working stunnel 5"]
    if cfg.relay_socket_activation:
        sockets = next((line for line in out.splitlines() if "Sockets:" in line), "")
        if "SYSTEMD" not in sockets:
            return [f"{who}: {path} lacks systemd socket activation ('-version' says "
                    f"{sockets.strip() or 'no Sockets line'}): use a stunnel built with it, "
                    "or set relay_socket_activation = false"]
    return []


def certificate_ip_names(path: Path) -> List[IPAddress]:
    """The IP address SANs of the PEM certificate at ``path`` (ValueError if not one)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.IPAddress))


def reachable_addresses(cfg: Config, host_addresses: Sequence[IPAddress]) -> List[IPAddress]:
    """The addresses peers may reach the peer port at, which the certificate must name:
    listen_address, or for a wildcard every usable host address it covers."""
    if not is_wildcard(cfg.listen_address):
        return [cfg.listen_address]
    versions = {4} if cfg.listen_address.version == 4 else {4, 6}
    return [a for a in host_addresses if is_usable(a) and a.version in versions]


def check_addresses(cfg: Config, host_addresses: Sequence[IPAddress]) -> List[str]:
    problems: List[str] = []
    mine = set(host_addresses)
    if not is_wildcard(cfg.listen_address) and cfg.listen_address not in mine:
        problems.append(f"{_who(cfg, 'listen_address')}: {cfg.listen_address} is not an "
                        "address of this host: use one of "
                        f"{', '.join(map(str, host_addresses))}, or \"0.0.0.0\" for all")
    if cfg.relay_address is not None and cfg.relay_address not in mine:
        problems.append(f"{_who(cfg, 'relay_address')}: {cfg.relay_address} is not an "
                        f"address of this host: use one of {', '.join(map(str, host_addresses))}")
    if not cfg.peer_enabled or not cfg.peer_cert.is_file():
        return problems
    try:
        named = set(certificate_ip_names(cfg.peer_cert))
    except (OSError, ValueError) as e:
        return problems + [f"{_who(cfg, 'peer_cert')}: {cfg.peer_cert} is not a PEM "
                           f"certificate ({e}): install this host's certificate there"]
    missing = [a for a in reachable_addresses(cfg, host_addresses) if a not in named]
    if missing:
        has = ", ".join(sorted(map(str, named))) or "no IP address"
        problems.append(
            f"{_who(cfg, 'peer_cert')}: {cfg.peer_cert} does not name "
            f"{', '.join(map(str, missing))} (it names {has}), "
            "so peers reaching this host there fail to verify it: 'scistreamd "
            "--regenerate-cert' makes a new self-signed one naming every address of this "
            "host (then give it to the peers as their trust file), or have your CA issue one "
            "with those IP addresses")
    return problems


def check_user_api(cfg: Config) -> List[str]:
    """The files of the user API: the token client secret (root-only), the CAs."""
    problems: List[str] = []
    if cfg.token_introspection_url:
        from .tokens import read_client_secret  # its own rules for the secret file

        try:
            read_client_secret(cfg.token_client_secret_file)
        except ConfigError as e:
            problems.append(str(e))
    for key in ("token_ca_file", "user_client_ca"):
        path = getattr(cfg, key)
        if path is not None:
            problems += _ca_file(cfg, key, path, f"install the CA file there, or unset {key}",
                                 "give a PEM CA certificate")
    return problems


def check_host(cfg: Config, host_addresses: Sequence[IPAddress],
               run: Runner = subprocess.run) -> List[str]:
    """Every problem of ``cfg`` on this host, each naming its key; [] when it works."""
    return (check_files(cfg) + check_user_api(cfg) + check_stunnel(cfg, run)
            + check_addresses(cfg, host_addresses))
