"""Users' client certificates on the peer port: which CA issued one, and whose it is.

The peer port's TLS context trusts the peer CA and ``user_client_ca`` alike
(one OpenSSL store), so after the handshake this module tells them apart: a
certificate is a user's when it is one of the certificates in
``user_client_ca`` or is directly signed by one of them (the chain itself
was verified in the handshake). Python's ssl module shows only the leaf, so
the issuer check is done here with ``cryptography``.

Identity of a user certificate (kind "cert"): its first DNS subjectAltName,
else its first IP subjectAltName, else its commonName; Owner ``cert:<that>``.
A workflow robot's certificate should carry one DNS name that says what it is
(e.g. ``robot-beamline7.example.org``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from .errors import ConfigError, InvalidArgument
from .identity import Identity
from .recent import Recent

logger = logging.getLogger(__name__)

#: Certificates whose verdicts a matcher keeps (the most recently seen).
_KEPT = 256
#: The verdict on a user CA's certificate that names no usable identity.
_UNUSABLE: Any = object()


def load_certs(path: Path, what: str) -> List[x509.Certificate]:
    """Every certificate of a PEM file; ConfigError naming the file."""
    try:
        data = path.read_bytes()
        certs = x509.load_pem_x509_certificates(data) if hasattr(
            x509, "load_pem_x509_certificates") else _load_each(data)
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read the {what}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(str(path), "", f"the {what} is not PEM certificates: {e}") from None
    if not certs:
        raise ConfigError(str(path), "", f"the {what} holds no certificate")
    return certs


def _load_each(data: bytes) -> List[x509.Certificate]:
    end = b"-----END CERTIFICATE-----"
    return [x509.load_pem_x509_certificate(block + end) for block in data.split(end)
            if b"-----BEGIN CERTIFICATE-----" in block]


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                       cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        elif isinstance(key, dsa.DSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       cert.signature_hash_algorithm)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, AssertionError):
        return False
    return True


def issued_by(der: bytes, cas: Sequence[x509.Certificate]) -> bool:
    """Whether the DER certificate is one of ``cas`` or directly signed by one."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return any(cert == ca or _signed_by(cert, ca) for ca in cas)


def cert_subject(cert: x509.Certificate) -> str:
    """First DNS SAN, else first IP SAN, else CN; "" if none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = san.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        dns, ips = [], []
    if dns:
        return str(dns[0]).lower().rstrip(".")
    if ips:
        return str(ips[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


class UserCertMatcher:
    """Users' CA(s) and the peer CA(s); built once from the configuration."""

    def __init__(self, ca_file: Path, peer_ca_file: Optional[Path]) -> None:
        self.ca_file = Path(ca_file)
        self._cas = load_certs(self.ca_file, "user_client_ca")
        self._peer_cas: List[x509.Certificate] = []
        if peer_ca_file is not None and peer_ca_file.exists():
            try:
                self._peer_cas = load_certs(peer_ca_file, "peer CA")
            except ConfigError as e:  # the peer port's own loading names it too
                logger.warning("%s", e)

        #: Verdicts per certificate (its exact DER): a user or gateway presents the
        #: same certificate on every connection, and parsing it and checking its
        #: signature cost each connection some 1-2 ms. They depend on nothing
        #: else: the CAs are this matcher's own (a new configuration makes a new
        #: matcher), and the handshake checked validity and the chain.
        self._identities: Recent[bytes, Any] = Recent(_KEPT)
        self._peer_issued: Recent[bytes, bool] = Recent(_KEPT)

    def identity_of(self, der: bytes) -> Optional[Identity]:
        """The "cert" identity of a (handshake-verified) certificate from a user CA."""
        if not der:
            return None
        found = self._identities.get_or_make(der, lambda: self._identity_of(der))
        if found is _UNUSABLE:
            # Said on every connection, as before the verdicts were kept.
            logger.warning("a client certificate from user_client_ca names no usable "
                           "identity (no DNS/IP subjectAltName, no plain commonName)")
            return None
        return found

    def _identity_of(self, der: bytes) -> Any:
        if not issued_by(der, self._cas):
            return None
        subject = cert_subject(x509.load_der_x509_certificate(der))
        try:
            return Identity("cert", subject)
        except InvalidArgument:
            return _UNUSABLE

    def peer_ca_issued(self, der: bytes) -> bool:
        return bool(self._peer_cas) and self._peer_issued.get_or_make(
            der, lambda: issued_by(der, self._peer_cas))
