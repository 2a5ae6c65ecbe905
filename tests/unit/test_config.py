"""Unit tests of scistreamd.config: defaults, drop-ins, validation, messages."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
import toml

from scistreamd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    config_from_mapping,
    dropin_files,
    load_config,
)
from scistreamd.errors import ConfigError

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "scistreamd.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return write(tmp_path / "scistreamd.toml", "")


def test_default_path() -> None:
    assert str(DEFAULT_CONFIG_PATH) == "/etc/scistream/scistreamd.toml"


def test_defaults() -> None:
    c = Config()
    assert c.listen_address == IPv4Address("127.0.0.1")
    assert c.peer_port == 5000
    assert c.port_range == (5100, 5200)
    assert c.port_range_text == "5100-5200"
    assert c.peer_cert == Path("/etc/scistream/server.crt")
    assert c.peer_key == Path("/etc/scistream/server.key")
    assert c.peer_trust_file == Path("/etc/scistream/peer-ca.crt")
    assert c.peer_client_ca is None
    # Mutual TLS by default; client certificates verified with the trust file.
    assert c.peer_require_client_cert is True
    assert c.peer_client_ca_file == Path("/etc/scistream/peer-ca.crt")
    assert c.peer_timeout == 10.0
    assert c.peer_enabled is True
    assert c.stunnel == Path("/usr/bin/stunnel4")
    assert c.relay_memory_max == 256 * 1024 * 1024
    assert c.relay_tasks_max == 4096
    assert (c.relay_nice, c.relay_cpu_scheduling) == (-5, "batch")
    assert c.relay_start_timeout == 10.0
    assert c.relay_ciphersuites == (
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    )
    assert c.relay_log_level == "notice"
    assert c.state_dir == Path("/var/lib/scistream")
    assert c.key_dir == Path("/var/lib/scistream/keys")
    assert c.max_endpoints == 1024
    assert c.log_level == "info"


def test_empty_file_gives_defaults(main: Path) -> None:
    assert load_config(main) == Config()


def test_shipped_file_is_valid_and_gives_defaults() -> None:
    assert load_config(SHIPPED, SHIPPED.parent / "no-such-conf.d") == Config()


def test_shipped_file_documents_every_key_with_its_default() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    uncommented = re.sub(r"^#([a-z_]+ = )", r"\1", text, flags=re.M)
    data = toml.loads(uncommented)
    keys = set(Config.__dataclass_fields__) - {"sources"}
    assert set(data) == keys
    assert config_from_mapping(data) == Config()
    # One explanation line right above each key.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#[a-z_]+ = ", line):
            assert lines[i - 1].startswith("# ") or re.match(r"#[a-z_]+ = ", lines[i - 1]), line


def test_full_config(main: Path) -> None:
    write(
        main,
        """
listen_address = "192.168.150.1"
peer_port = 5001
port_range = [6000, 6099]
peer_cert = "/srv/sci/server.crt"
peer_key = "/srv/sci/server.key"
peer_trust_file = "/srv/sci/ca.crt"
peer_client_ca = "/srv/sci/clients.crt"
peer_require_client_cert = false
peer_timeout = 2
peer_enabled = false
stunnel = "/usr/bin/stunnel"
relay_memory_max = "1G"
relay_tasks_max = 16
relay_nice = 0
relay_cpu_scheduling = "other"
relay_start_timeout = 2.5
relay_ciphersuites = "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
relay_log_level = "debug"
state_dir = "/srv/sci/state"
key_dir = "/srv/sci/keys"
max_endpoints = 10
log_level = "debug"
""",
    )
    c = load_config(main)
    assert c.listen_address == IPv4Address("192.168.150.1")
    assert c.peer_port == 5001
    assert c.port_range == (6000, 6099)
    assert c.peer_client_ca == Path("/srv/sci/clients.crt")
    assert c.peer_client_ca_file == Path("/srv/sci/clients.crt")
    assert c.peer_require_client_cert is False
    assert c.peer_timeout == 2.0 and isinstance(c.peer_timeout, float)
    assert c.peer_enabled is False
    assert c.stunnel == Path("/usr/bin/stunnel")
    assert c.relay_memory_max == 1024**3
    assert c.relay_tasks_max == 16
    assert (c.relay_nice, c.relay_cpu_scheduling) == (0, "other")
    assert c.relay_start_timeout == 2.5
    assert c.relay_ciphersuites == "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
    assert c.relay_log_level == "debug"
    assert c.state_dir == Path("/srv/sci/state")
    assert c.max_endpoints == 10
    assert c.log_level == "debug"
    assert c.sources["peer_port"] == str(main)


def test_ipv6_listen_address(main: Path) -> None:
    write(main, 'listen_address = "::1"\n')
    assert load_config(main).listen_address == IPv6Address("::1")


@pytest.mark.parametrize(
    "value,expected",
    [('"5100-5200"', (5100, 5200)), ("[5100, 5100]", (5100, 5100)), ('"1024-4999"', (1024, 4999))],
)
def test_port_range_forms(main: Path, value: str, expected: tuple) -> None:
    write(main, f"port_range = {value}\n")
    assert load_config(main).port_range == expected


@pytest.mark.parametrize(
    "value,expected",
    [("0", 0), ("8388608", 8388608), ('"512M"', 512 * 1024**2), ('"8M"', 8 * 1024**2),
     ('"2G"', 2 * 1024**3), ('"1T"', 1024**4), ('"16384K"', 16 * 1024**2), ('"0"', 0)],
)  # fmt: skip
def test_memory_forms(main: Path, value: str, expected: int) -> None:
    write(main, f"relay_memory_max = {value}\n")
    assert load_config(main).relay_memory_max == expected


def test_empty_peer_client_ca_means_the_trust_file(main: Path) -> None:
    write(main, 'peer_client_ca = ""\npeer_trust_file = "/srv/peers.pem"\n')
    c = load_config(main)
    assert c.peer_client_ca is None
    assert c.peer_client_ca_file == Path("/srv/peers.pem")
    assert c.peer_require_client_cert is True  # "" never turns mutual TLS off


def test_lab_opt_out_in_a_dropin(main: Path) -> None:
    write(main, "")
    write(main.parent / "conf.d" / "50-lab.toml", "peer_require_client_cert = false\n")
    c = load_config(main)
    assert c.peer_require_client_cert is False
    assert c.sources["peer_require_client_cert"].endswith("50-lab.toml")


# --- drop-ins ----------------------------------------------------------------


def test_dropins_apply_in_lexical_order(main: Path) -> None:
    write(main, 'peer_port = 5001\nlog_level = "warning"\nmax_endpoints = 5\n')
    d = main.parent / "conf.d"
    write(d / "20-b.toml", "peer_port = 5003\n")
    write(d / "10-a.toml", 'peer_port = 5002\nlog_level = "error"\n')
    write(d / "30-c.conf", "peer_port = 1\n")  # not *.toml: ignored
    write(d / ".40-hidden.toml", "peer_port = 2\n")  # hidden: ignored
    (d / "50-dir.toml").mkdir()  # not a file: ignored
    assert [p.name for p in dropin_files(d)] == ["10-a.toml", "20-b.toml"]
    c = load_config(main)
    assert c.peer_port == 5003
    assert c.log_level == "error"
    assert c.max_endpoints == 5
    assert c.sources == {
        "peer_port": str(d / "20-b.toml"),
        "log_level": str(d / "10-a.toml"),
        "max_endpoints": str(main),
    }


def test_explicit_dropin_dir(main: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    write(other / "x.toml", "peer_port = 5009\n")
    write(main.parent / "conf.d" / "y.toml", "peer_port = 5008\n")
    assert load_config(main, other).peer_port == 5009


def test_missing_main_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.path == str(missing)
    assert "not found" in str(info.value)
    assert load_config(missing, required=False) == Config()


def test_missing_main_file_still_reads_dropins(tmp_path: Path) -> None:
    write(tmp_path / "conf.d" / "a.toml", "peer_port = 5004\n")
    assert load_config(tmp_path / "nope.toml", required=False).peer_port == 5004


# --- errors ------------------------------------------------------------------


def test_error_names_dropin_file_and_key(main: Path) -> None:
    write(main, "peer_port = 5001\n")
    bad = write(main.parent / "conf.d" / "50-bad.toml", 'peer_port = "five thousand"\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    err = info.value
    assert err.path == str(bad)
    assert err.key == "peer_port"
    assert str(err).startswith(f"{bad}: peer_port: ")
    assert "port number" in err.problem


def test_unknown_key(main: Path) -> None:
    write(main, "peer_prot = 5001\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key == "peer_prot"
    assert "unknown key" in info.value.problem
    assert "peer_port" in info.value.problem  # suggestion / list of known keys


def test_unknown_table(main: Path) -> None:
    write(main, "[peer]\nport = 5001\n")
    with pytest.raises(ConfigError, match="peer: unknown key"):
        load_config(main)


def test_toml_syntax_error(main: Path) -> None:
    write(main, "peer_port = = 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.path == str(main)
    assert "TOML" in info.value.problem


def test_duplicate_key_is_syntax_error(main: Path) -> None:
    write(main, "peer_port = 5001\npeer_port = 5002\n")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(main)


def test_not_utf8(main: Path) -> None:
    main.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(main)


def test_main_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


BAD_VALUES = [
    ("listen_address", '"server1"'),
    ("listen_address", '"0.0.0.0"'),
    ("listen_address", '"192.168.150.1\\n"'),
    ("listen_address", "3232273921"),
    ("peer_port", "0"),
    ("peer_port", "65536"),
    ("peer_port", "true"),
    ("peer_port", '"5000"'),
    ("peer_port", "5000.0"),
    ("port_range", '"5200-5100"'),
    ("port_range", '"5100"'),
    ("port_range", '"5100-5200-5300"'),
    ("port_range", '"5100 - 5200"'),
    ("port_range", "[5100]"),
    ("port_range", "[5100, 5200, 5300]"),
    ("port_range", '["5100", "5200"]'),
    ("port_range", "[0, 5200]"),
    ("port_range", "[true, false]"),
    ("port_range", '"80-200"'),
    ("port_range", '"0-100"'),
    ("port_range", '"5100-70000"'),
    ("port_range", "5100"),
    ("peer_cert", '"relative/server.crt"'),
    ("peer_cert", '""'),
    ("peer_cert", '"/etc/a b"'),
    ("peer_cert", '"/etc/x\\ny"'),
    ("peer_cert", '"/etc/../x"'),
    ("peer_cert", "1"),
    ("peer_client_ca", '"ca.crt"'),
    ("peer_client_ca", "false"),
    ("peer_require_client_cert", '"false"'),
    ("peer_require_client_cert", "0"),
    ("peer_require_client_cert", '"no"'),
    ("stunnel", '"stunnel4"'),
    ("stunnel", '"/usr/bin/stunnel4 -x"'),
    ("state_dir", '"var/lib"'),
    ("key_dir", "[]"),
    ("peer_timeout", "0"),
    ("peer_timeout", "-1"),
    ("peer_timeout", "301"),
    ("peer_timeout", "nan"),
    ("peer_timeout", "inf"),
    ("peer_timeout", '"10"'),
    ("peer_timeout", "true"),
    ("peer_timeout", "9223372036854775807"),
    ("relay_start_timeout", "0.0"),
    ("peer_enabled", '"yes"'),
    ("peer_enabled", "1"),
    ("relay_memory_max", '"256MB"'),
    ("relay_memory_max", '"256m"'),
    ("relay_memory_max", '"-1"'),
    ("relay_memory_max", "-1"),
    ("relay_memory_max", "256"),
    ("relay_memory_max", '"1K"'),
    ("relay_memory_max", "1.5"),
    ("relay_memory_max", "true"),
    ("relay_memory_max", '" 256M"'),
    ("relay_tasks_max", "0"),
    ("relay_tasks_max", '"64"'),
    ("relay_tasks_max", "false"),
    ("relay_nice", "-21"),
    ("relay_nice", "20"),
    ("relay_nice", '"-5"'),
    ("relay_nice", "true"),
    ("relay_cpu_scheduling", '"fifo"'),
    ("relay_cpu_scheduling", '"rr"'),
    ("relay_cpu_scheduling", '"Batch"'),
    ("relay_cpu_scheduling", "3"),
    ("relay_ciphersuites", '"eNULL"'),
    ("relay_ciphersuites", '"ALL:!aNULL"'),
    ("relay_ciphersuites", '""'),
    ("relay_ciphersuites", '"TLS_AES_256_GCM_SHA384"'),
    ("relay_ciphersuites", '"TLS_AES_128_GCM_SHA256\\nexec = /bin/sh"'),
    ("relay_log_level", '"verbose"'),
    ("relay_log_level", "7"),
    ("max_endpoints", "0"),
    ("max_endpoints", "1.0"),
    ("log_level", '"INFO"'),
    ("log_level", '"notice"'),
    ("log_level", "20"),
    ("token_introspection_url", '"http://auth.example.org/introspect"'),
    ("token_introspection_url", '"https://id:secret@auth.example.org/introspect"'),
    ("token_introspection_url", '"https://auth.example.org/i#x"'),
    ("token_introspection_url", '"https:///introspect"'),
    ("token_introspection_url", '"https://auth.example.org:99999/i"'),
    ("token_introspection_url", '"https://auth.example.org/a b"'),
    ("token_introspection_url", "true"),
    ("token_client_id", '"a b"'),
    ("token_client_id", "7"),
    ("token_client_id", '"a:b"'),
    ("token_client_secret_file", '"secret"'),
    ("token_required_scope", '"a \\"b"'),
    ("token_required_scope", "[1]"),
    ("token_required_scope", "1"),
    ("token_audience", '"a\\nb"'),
    ("token_cache_max_seconds", "-1"),
    ("token_cache_max_seconds", "3601"),
    ("token_cache_max_seconds", '"60"'),
    ("token_negative_cache_seconds", "31"),
    ("token_negative_cache_seconds", "nan"),
    ("token_ca_file", '"ca.crt"'),
    ("token_timeout", "0"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_bad_values(main: Path, key: str, value: str) -> None:
    write(main, f"{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    err = info.value
    assert err.path == str(main)
    assert err.key == key
    assert err.problem and "\n" not in str(err)


def test_type_error_message_names_types(main: Path) -> None:
    write(main, "peer_enabled = 1\n")
    with pytest.raises(ConfigError, match="expected true or false, got an integer"):
        load_config(main)


def test_port_range_containing_peer_port(main: Path) -> None:
    write(main, 'port_range = "4990-5010"\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.path == str(main)
    assert info.value.key == "port_range"
    assert "peer_port 5000" in info.value.problem


def test_peer_port_clash_blames_the_later_file(main: Path) -> None:
    write(main, 'port_range = "6000-6100"\n')
    dropin = write(main.parent / "conf.d" / "a.toml", "peer_port = 6050\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.path == str(dropin)
    assert info.value.key == "peer_port"


def test_peer_port_clash_fixed_by_later_dropin(main: Path) -> None:
    write(main, 'port_range = "4990-5010"\n')
    write(main.parent / "conf.d" / "a.toml", "peer_port = 4000\n")
    assert load_config(main).peer_port == 4000


def test_config_from_mapping() -> None:
    c = config_from_mapping({"listen_address": "10.0.0.1", "port_range": "7000-7001"})
    assert c.listen_address == IPv4Address("10.0.0.1")
    assert c.port_range == (7000, 7001)
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"peer_port": True}, source="<test>")
    assert info.value.path == "<test>"


def test_config_is_frozen() -> None:
    c = Config()
    with pytest.raises(AttributeError):
        c.peer_port = 1  # type: ignore[misc]


def test_allowed_targets_default_and_dropin(main: Path) -> None:
    from scistreamd.targets import DEFAULT_TARGET_RULES

    assert load_config(main).allowed_targets == DEFAULT_TARGET_RULES
    write(main.parent / "conf.d" / "50-lab.toml",
          'allowed_targets = ["127.0.0.1 5300", "10.0.0.0/8 5000-6000,7000", "fd00::/8"]\n')
    rules = load_config(main).allowed_targets
    assert [r.text for r in rules] == ["127.0.0.1 5300", "10.0.0.0/8 5000-6000,7000",
                                       "fd00::/8"]
    assert rules[1].ports == ((5000, 6000), (7000, 7000))
    assert rules[2].ports == ()


@pytest.mark.parametrize("value, needle", [
    ('"10.0.0.0/8"', "expected a list"),
    ('[5]', "must be a string"),
    ('["10.1.2.3/8"]', "host bits must be zero"),
    ('["10.0.0.0/8 70000"]', "ports are 1..65535"),
    ('["10.0.0.0/8 6000-5000"]', "lower first"),
    ('["10.0.0.0/8 5000 6000"]', "at most one port list"),
    ('["10.0.0.0/8 50a"]', "where a port"),
    ('["example.org"]', "where an address or CIDR"),
    ('["fe80::1%eth0"]', "where an address or CIDR"),
    ('[""]', "at most one port list"),
])
def test_allowed_targets_bad_values(main: Path, value: str, needle: str) -> None:
    write(main, f"allowed_targets = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(main)
    assert e.value.key == "allowed_targets" and needle in str(e.value), str(e.value)


def test_token_keys(main: Path) -> None:
    write(main, 'token_introspection_url = "https://auth.example.org:8443/oauth2/introspect"\n'
                'token_client_id = "scistreamd-s1"\n'
                'token_client_secret_file = "/etc/scistream/oauth-secret"\n'
                'token_required_scope = "tunnels  read tunnels"\n'
                'token_audience = "scistreamd-s1"\n'
                'token_cache_max_seconds = 0\n'
                'token_negative_cache_seconds = 2.5\n'
                'token_ca_file = "/etc/scistream/oauth-ca.crt"\n'
                'token_timeout = 2\n')
    c = load_config(main)
    assert c.token_introspection_url == "https://auth.example.org:8443/oauth2/introspect"
    assert (c.token_client_id, c.token_audience) == ("scistreamd-s1", "scistreamd-s1")
    assert c.token_client_secret_file == Path("/etc/scistream/oauth-secret")
    assert c.token_required_scope == ("tunnels", "read")
    assert (c.token_cache_max_seconds, c.token_negative_cache_seconds) == (0.0, 2.5)
    assert (c.token_ca_file, c.token_timeout) == (Path("/etc/scistream/oauth-ca.crt"), 2.0)
    assert config_from_mapping({"token_required_scope": ["a", "b"]}).token_required_scope == \
        ("a", "b")


def test_token_defaults_accept_no_user_tokens() -> None:
    c = Config()
    assert c.token_introspection_url == "" and c.token_required_scope == ()
    assert (c.token_cache_max_seconds, c.token_negative_cache_seconds) == (60.0, 5.0)
    assert c.token_ca_file is None


def test_token_url_needs_a_client_id(main: Path) -> None:
    write(main, 'token_introspection_url = "https://auth.example.org/introspect"\n')
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert info.value.key == "token_client_id" and "token_client_secret_file" in str(info.value)
