"""A first install that works, and an honest systemd status (issue 15 items 3-4,
issue 13 item 6), on the real test bed.

- listen_address = "0.0.0.0": the peer port answers on the host's real address,
  relays listen on the concrete address the daemon picked (and says so), and
  the guide's scenario runs through them;
- a generated host certificate names every address of the host and its name,
  is never replaced unless asked (--regenerate-cert keeps the old one);
- --check-config names each problem (missing peer_cert, trust file, stunnel,
  a certificate that does not name listen_address) and says OK for a good file;
- StatusText follows the real endpoint count;
- systemctl reload applies a reloadable key for real, names keys that need a
  restart, and an invalid configuration changes nothing and fails the reload.

Every change to a host's configuration is a drop-in removed (and the daemon
restarted) afterwards, so the other suites' assumptions hold.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Iterator, List, Tuple

import pytest
from cryptography import x509

from tests.integration.conftest import (
    HOSTTOOL,
    DaemonWatch,
    daemon_status,
    journal_cursor,
    journal_since,
    parse_request_output,
    tool,
    wait_until,
)

S1_IP = "192.168.150.1"
S2_IP = "192.168.150.2"
DROPIN = "/etc/scistream/conf.d/50-firstinst.toml"
SERVICE = "scistreamd.service"
DAEMON = ["env", "PYTHONPATH=/run/testbed/src", "PYTHONDONTWRITEBYTECODE=1", "python3", "-m",
          "scistreamd.daemon"]
EX_CONFIG = 78


# --------------------------------------------------------------------------
# helpers

def set_dropin(host, text: str) -> None:
    host.write_file(DROPIN, text)


def restart(host) -> None:
    host.run(["systemctl", "restart", SERVICE])  # Type=notify: returns once ready


@pytest.fixture
def dropin(bed) -> Iterator[None]:
    """Hosts whose drop-in this test writes get the shipped test-bed config back."""
    yield
    for host in bed.hosts.values():
        host.ctl("release", "--all")
        if host.run(["test", "-e", DROPIN], check=False).returncode == 0:
            host.run(["rm", "-f", DROPIN])
            restart(host)


def status_text(host) -> str:
    return host.run(["systemctl", "show", "-P", "StatusText", SERVICE]).stdout.strip()


def inbound(host, port: int) -> Tuple[int, str, str, List[str]]:
    """(exit code, stderr, uid, listeners) of an inbound request towards ``host``'s own
    address."""
    r = host.ctl("inbound-request", "--remote_ip", host.ip, "--receiver_ports", str(port),
                 "--num_conn", "1")
    if r.returncode != 0:
        return r.returncode, r.stderr, "", []
    uid, _s2cs, _role, listeners = parse_request_output(r.stdout)
    return r.returncode, r.stderr, uid, listeners


def check_config(host, text: str) -> Tuple[int, str, str]:
    """scistreamd --check-config of a configuration file ``text`` inside ``host``."""
    host.write_file("/tmp/firstinst/check.toml", text)
    r = host.run([*DAEMON, "--check-config", "--config", "/tmp/firstinst/check.toml"],
                 check=False)
    return r.returncode, r.stdout, r.stderr


def host_addresses(host) -> List[ipaddress._BaseAddress]:
    doc = json.loads(host.run(["ip", "-j", "addr", "show"]).stdout)
    return [ipaddress.ip_address(a["local"]) for link in doc for a in link.get("addr_info", [])]


def sans(pem: str) -> Tuple[set, set]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.IPAddress)), set(san.get_values_for_type(x509.DNSName))


# --------------------------------------------------------------------------
# listen_address = 0.0.0.0

def test_wildcard_listen_address_serves_peers_and_the_guide(clean, dropin, s1, s2, apps):
    cursor = journal_cursor(s1)
    set_dropin(s1, 'listen_address = "0.0.0.0"\n')
    restart(s1)

    # The peer port listens on every address; relays on the one the daemon picked
    # (the test bed has no default route: the first non-loopback address) and says so.
    listening = s1.run(["ss", "-Htln", "sport = :5000"]).stdout.split()
    assert "0.0.0.0:5000" in listening, listening
    assert f"relays listen on {S1_IP}" in journal_since(s1, cursor, "-u", SERVICE)
    listen = s1.run(["busctl", "get-property", "org.scistream.Tunnel1",
                     "/org/scistream/Tunnel1", "org.scistream.Tunnel1.Manager",
                     "ListenAddress"]).stdout.strip()
    assert listen == f's "{S1_IP}"', "ListenAddress must be the concrete address, not 0.0.0.0"

    # The guide: the inbound listener is on the real address, the outbound side
    # claims over the peer port at that address, data flows.
    apps.start(s1, "fi-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "wild:")
    code, err, uid, listeners = inbound(s1, 5300)
    assert code == 0, err
    assert listeners == [f"{S1_IP}:5100"], listeners
    r = s2.ctl("outbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5100",
               "--num_conn", "1", uid, f"{S1_IP}:5100")
    assert r.returncode == 0, r.stderr
    local = parse_request_output(r.stdout)[3]
    ip, port = local[0].rsplit(":", 1)
    answer = tool(s2, "request", ip, port, "hello", "--timeout", "20").stdout.strip()
    assert answer == "wild:hello"


def test_relay_address_key_places_relays(clean, dropin, s1):
    # A second address on server1: relays go where relay_address says.
    s1.run(["ip", "addr", "add", "192.168.150.11/24", "dev", "eth0"])
    try:
        set_dropin(s1, 'listen_address = "0.0.0.0"\nrelay_address = "192.168.150.11"\n')
        restart(s1)
        code, err, _uid, listeners = inbound(s1, 5300)
        assert code == 0, err
        assert listeners == ["192.168.150.11:5100"], listeners
        s1.ctl("release", "--all")
    finally:
        s1.run(["rm", "-f", DROPIN])
        restart(s1)
        s1.run(["ip", "addr", "del", "192.168.150.11/24", "dev", "eth0"])


# --------------------------------------------------------------------------
# the generated certificate

def test_generated_certificate_names_every_address_and_the_host_name(s1):
    conf = ('peer_cert = "/tmp/firstinst/gen/server.crt"\n'
            'peer_key = "/tmp/firstinst/gen/server.key"\nlisten_address = "0.0.0.0"\n')
    s1.run(["rm", "-rf", "/tmp/firstinst/gen"])
    s1.run(["mkdir", "-p", "/tmp/firstinst/gen"])
    s1.write_file("/tmp/firstinst/gen.toml", conf)
    gen = [*DAEMON, "--config", "/tmp/firstinst/gen.toml"]

    r = s1.run([*gen, "--generate-cert"])
    assert "created /tmp/firstinst/gen/server.crt" in r.stdout
    assert "next step: exchange trust files" in r.stdout
    first = s1.run(["cat", "/tmp/firstinst/gen/server.crt"]).stdout
    ips, dns = sans(first)
    wanted = {a for a in host_addresses(s1) if not a.is_link_local}
    assert ipaddress.ip_address(S1_IP) in wanted  # the comparison below means something
    assert wanted <= ips, f"the certificate lacks {wanted - ips}"
    assert "server1" in dns
    mode = s1.run(["stat", "-c", "%a", "/tmp/firstinst/gen/server.key"]).stdout.strip()
    assert mode == "600"

    # Never replaced silently ...
    r = s1.run([*gen, "--generate-cert"])
    assert "left unchanged" in r.stdout
    assert s1.run(["cat", "/tmp/firstinst/gen/server.crt"]).stdout == first
    # ... only on request, the old one kept.
    r = s1.run([*gen, "--regenerate-cert"])
    assert "server.crt.old" in r.stdout
    assert s1.run(["cat", "/tmp/firstinst/gen/server.crt"]).stdout != first
    assert s1.run(["cat", "/tmp/firstinst/gen/server.crt.old"]).stdout == first
    # And --check-config accepts it for listen_address 0.0.0.0.
    conf += 'peer_trust_file = "/etc/scistream/peer-ca.crt"\n'
    code, out, err = check_config(s1, conf)
    assert code == 0, err
    assert f"relays on {S1_IP}" in out


# --------------------------------------------------------------------------
# --check-config

GOOD = f'listen_address = "{S1_IP}"\n'


@pytest.mark.parametrize("line, key, names", [
    ('peer_cert = "/etc/scistream/missing.crt"', "peer_cert", "/etc/scistream/missing.crt"),
    ('peer_trust_file = "/etc/scistream/missing-ca.crt"', "peer_trust_file",
     "/etc/scistream/missing-ca.crt"),
    ('stunnel = "/usr/bin/no-such-stunnel"', "stunnel", "/usr/bin/no-such-stunnel"),
    ('peer_key = "/etc/hostname"', "peer_cert/peer_key", "/etc/hostname"),
])
def test_check_config_names_the_problem(s1, line, key, names):
    code, out, err = check_config(s1, GOOD + line + "\n")
    assert code == EX_CONFIG, (out, err)
    assert f"scistreamd: {key}" in err and names in err, err
    assert "1 problem found" in err
    assert "configuration OK" not in out


def test_check_config_certificate_must_name_listen_address(s1):
    # The test bed's certificate names 192.168.150.1 only; 127.0.0.1 is an address
    # of the host, but peers reaching it there would fail to verify the certificate.
    code, _out, err = check_config(s1, 'listen_address = "127.0.0.1"\n')
    assert code == EX_CONFIG
    assert "peer_cert" in err and "does not name 127.0.0.1" in err, err
    assert "--regenerate-cert" in err


def test_check_config_names_every_problem_at_once_and_passes_a_good_file(s1):
    code, out, err = check_config(s1, GOOD)
    assert code == 0, err
    assert out.startswith("configuration OK"), out
    # The shipped stunnel default runs here.
    assert "stunnel" not in err

    code, _out, err = check_config(s1, GOOD + 'peer_cert = "/nope/a.crt"\n'
                                   'peer_trust_file = "/nope/ca.crt"\n'
                                   'stunnel = "/nope/stunnel"\n')
    assert code == EX_CONFIG
    for key in ("peer_cert", "peer_trust_file", "stunnel"):
        assert f"scistreamd: {key}" in err, err
    assert "3 problems found" in err

    code, _out, err = check_config(s1, 'listen_address = "192.168.150.99"\n')
    assert code == EX_CONFIG and "192.168.150.99 is not an address of this host" in err, err


# --------------------------------------------------------------------------
# StatusText

def test_status_text_follows_the_endpoint_count(clean, s1):
    wait_until(lambda: status_text(s1) == "serving 0 endpoints", 30, "0 endpoints in status")
    for port in (5300, 5301):
        code, err, _uid, _ = inbound(s1, port)
        assert code == 0, err
    wait_until(lambda: status_text(s1) == "serving 2 endpoints", 30,
               f"'serving 2 endpoints', have {status_text(s1)!r}")
    r = s1.ctl("release", "--all")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: status_text(s1) == "serving 0 endpoints", 30,
               f"'serving 0 endpoints' after release --all, have {status_text(s1)!r}")
    code, err, _uid, _ = inbound(s1, 5300)
    assert code == 0, err
    wait_until(lambda: status_text(s1) == "serving 1 endpoint", 30,
               f"'serving 1 endpoint', have {status_text(s1)!r}")


# --------------------------------------------------------------------------
# systemctl reload

def test_reload_applies_allowed_targets_and_refuses_an_invalid_file(clean, dropin, s1):
    set_dropin(s1, f'allowed_targets = ["{S1_IP} 5300"]\n')
    restart(s1)
    code, err, _uid, _ = inbound(s1, 5301)
    assert code != 0 and "allowed_targets" in err, err

    watch = DaemonWatch(s1)
    cursor = journal_cursor(s1)
    set_dropin(s1, f'allowed_targets = ["{S1_IP} 5300-5301"]\n')
    r = s1.run(["systemctl", "reload", SERVICE], check=False)
    assert r.returncode == 0, r.stderr
    code, err, _uid, listeners = inbound(s1, 5301)
    assert code == 0, f"a target allowed by the reloaded configuration was refused: {err}"
    text = journal_since(s1, cursor, "-u", SERVICE)
    assert "configuration reloaded" in text and "applied allowed_targets" in text, text
    wait_until(lambda: status_text(s1) == "serving 1 endpoint", 30,
               f"status after the reload, have {status_text(s1)!r}")

    # An invalid file: the reload fails, says why, and nothing changes.
    cursor = journal_cursor(s1)
    set_dropin(s1, 'allowed_targets = ["not a network"]\n')
    r = s1.run(["systemctl", "reload", SERVICE], check=False)
    assert r.returncode != 0, "systemctl reload succeeded with an invalid configuration"
    text = journal_since(s1, cursor, "-u", SERVICE)
    assert "NOT reloaded" in text and "allowed_targets" in text, text
    code, err, _uid, _ = inbound(s1, 5301)
    assert code == 0, f"the running configuration changed after a failed reload: {err}"
    code, err, _uid, _ = inbound(s1, 5302)
    assert code != 0 and "allowed_targets" in err, err

    # A key that needs a restart: named, kept at its running value.
    cursor = journal_cursor(s1)
    set_dropin(s1, f'allowed_targets = ["{S1_IP} 5300-5301"]\npeer_port = 5001\n')
    r = s1.run(["systemctl", "reload", SERVICE], check=False)
    assert r.returncode == 0, r.stderr
    text = journal_since(s1, cursor, "-u", SERVICE)
    assert "peer_port" in text and "restart" in text, text
    listening = s1.run(["ss", "-Htln"]).stdout
    assert f"{S1_IP}:5000" in listening and ":5001" not in listening, listening
    watch.check()
    assert daemon_status(s1)["ActiveState"] == "active"


def test_trust_file_installed_after_start_takes_effect_on_reload(clean, dropin, s1, s2, apps):
    """The first-install flow: the daemon runs without a trust file (every claim is
    refused, by name); the operator installs it and reloads; claims work, same process."""
    trust = "/etc/scistream/fi-peer-ca.crt"
    s1.run(["rm", "-f", trust])
    set_dropin(s1, f'peer_trust_file = "{trust}"\n')
    restart(s1)
    apps.start(s1, "fi-trust-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "trust:")
    code, err, uid, listeners = inbound(s1, 5300)
    assert code == 0, err
    r = s2.ctl("outbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5100",
               "--num_conn", "1", uid, *listeners)
    assert r.returncode != 0 and "no CA to verify" in r.stderr, r.stderr

    watch = DaemonWatch(s1)
    s1.run(["cp", "/etc/scistream/peer-ca.crt", trust])
    r = s1.run(["systemctl", "reload", SERVICE], check=False)
    assert r.returncode == 0, r.stderr
    r = s2.ctl("outbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5100",
               "--num_conn", "1", uid, *listeners)
    assert r.returncode == 0, r.stderr
    ip, port = parse_request_output(r.stdout)[3][0].rsplit(":", 1)
    assert tool(s2, "request", ip, port, "hi", "--timeout", "20").stdout.strip() == "trust:hi"
    watch.check()
    s1.run(["rm", "-f", trust])


def test_reload_opens_running_outbound_listeners_to_new_client_networks(clean, dropin, s1, s2,
                                                                        apps):
    """outbound_client_networks applies to the listeners of relays already running."""
    apps.start(s1, "fi-net-echo", "python3", HOSTTOOL, "echo", "5300", "--tag", "net:")
    code, err, uid, listeners = inbound(s1, 5300)
    assert code == 0, err
    r = s2.ctl("outbound-request", "--remote_ip", S1_IP, "--receiver_ports", "5100",
               "--num_conn", "1", uid, *listeners)
    assert r.returncode == 0, r.stderr
    ip, port = parse_request_output(r.stdout)[3][0].rsplit(":", 1)
    # server2's own address is always allowed; server1 is not in the default networks.
    assert tool(s2, "request", ip, port, "own", "--timeout", "20").stdout.strip() == "net:own"
    before = tool(s1, "request", ip, port, "other", "--timeout", "3", check=False).stdout.strip()
    assert before != "net:other", "a host outside outbound_client_networks got through"

    watch = DaemonWatch(s2)
    set_dropin(s2, f'outbound_client_networks = ["127.0.0.0/8", "::1/128", "{S1_IP}/32"]\n')
    r = s2.run(["systemctl", "reload", SERVICE], check=False)
    assert r.returncode == 0, r.stderr
    after = tool(s1, "request", ip, port, "other", "--timeout", "20", check=False).stdout.strip()
    assert after == "net:other", f"the running relay's listener still refuses server1: {after}"
    watch.check()


def test_sighup_reloads_too(clean, dropin, s1):
    set_dropin(s1, f'allowed_targets = ["{S1_IP} 5300"]\n')
    restart(s1)
    code, err, _uid, _ = inbound(s1, 5301)
    assert code != 0 and "allowed_targets" in err, err
    watch = DaemonWatch(s1)
    cursor = journal_cursor(s1)
    set_dropin(s1, f'allowed_targets = ["{S1_IP} 5300-5301"]\n')
    s1.run(["systemctl", "kill", "-s", "HUP", "--kill-who=main", SERVICE])
    wait_until(lambda: "configuration reloaded" in journal_since(s1, cursor, "-u", SERVICE), 30,
               "the reload after SIGHUP")
    code, err, _uid, _ = inbound(s1, 5301)
    assert code == 0, err
    watch.check()
