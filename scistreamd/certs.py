"""X.509 material for the peer port, made with ``cryptography``.

Used by ``scistreamd --generate-cert`` (first install) and by the test bed
(a throw-away CA that signs each emulated host's certificate). Pure: no
D-Bus, no systemd.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class KeyPair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Back-date a little: two hosts' clocks are rarely identical.
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(common_name: str = "scistreamd test CA", days: int = 30) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert, key)


def make_host_cert(
    common_name: str,
    addresses: Sequence[IPAddress],
    dns_names: Sequence[str] = (),
    issuer: Optional[KeyPair] = None,
    days: int = 825,
) -> KeyPair:
    """A server+client certificate for a gateway; self-signed when ``issuer`` is None.

    Peers are addressed by IP, so every address the peer port is reached at
    must be an IP SAN or verification fails.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    sans: List[x509.GeneralName] = [x509.IPAddress(a) for a in addresses]
    sans += [x509.DNSName(d) for d in dns_names]
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.cert.subject if issuer else _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    # A self-signed host certificate doubles as its own trust anchor (an
    # operator copies it to the peer as its trust file), so it is a CA of
    # path length 0; an issued one is a leaf.
    builder = builder.add_extension(
        x509.BasicConstraints(ca=issuer is None, path_length=0 if issuer is None else None),
        critical=True,
    )
    return KeyPair(builder.sign(signer_key, hashes.SHA256()), key)


def write_pair(pair: KeyPair, cert_path: Path, key_path: Path) -> None:
    """Write cert (0644) and key (0600, created with that mode: never briefly readable)."""
    cert_path.write_bytes(pair.cert_pem())
    os.chmod(cert_path, 0o644)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.key_pem())
    os.chmod(key_path, 0o600)


def generate_host_cert_files(
    cert_path: Path, key_path: Path, common_name: str, addresses: Sequence[IPAddress],
    dns_names: Sequence[str] = (),
) -> bool:
    """First-install helper: make a self-signed host certificate unless one exists.

    Returns False (and touches nothing) when either file already exists: a
    host certificate is never overwritten (regenerate_host_cert_files does
    that, on request only).
    """
    if cert_path.exists() or key_path.exists():
        return False
    write_pair(make_host_cert(common_name, addresses, dns_names), cert_path, key_path)
    return True


def regenerate_host_cert_files(
    cert_path: Path, key_path: Path, common_name: str, addresses: Sequence[IPAddress],
    dns_names: Sequence[str] = (),
) -> List[Path]:
    """Replace the host certificate and key with a new self-signed pair; the old
    files are kept as ``<name>.old`` (returned), so the change can be undone."""
    pair = make_host_cert(common_name, addresses, dns_names)
    kept: List[Path] = []
    for path in (cert_path, key_path):
        if path.exists():
            old = path.with_name(path.name + ".old")
            os.replace(path, old)
            kept.append(old)
    write_pair(pair, cert_path, key_path)
    return kept


def host_dns_names(hostname: str, fqdn: str) -> List[str]:
    """DNS SANs for a host certificate: its host name and fully qualified name,
    without "localhost" or anything that is not a DNS name."""
    names = []
    for name in (hostname, fqdn):
        name = name.strip().rstrip(".").lower()
        valid = name and len(name) <= 253 and all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in name.split("."))
        if valid and name not in ("localhost", "localhost.localdomain") and name not in names:
            names.append(name)
    return names
