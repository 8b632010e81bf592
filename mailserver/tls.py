# -*- test-case-name: tests.unit.test_tls -*-
"""Server TLS: load a certificate, or make a self-signed one on first start.

The context factory is Twisted's ``CertificateOptions`` (TLS 1.2 minimum,
Twisted's default cipher list).  :class:`ReloadableTLS` keeps the current
options so a SIGHUP can swap in a renewed certificate without dropping
connections; new handshakes use the new one.
"""

from __future__ import annotations

import datetime
import os

from twisted.internet import ssl


def load_certificate(cert_path: str, key_path: str) -> ssl.PrivateCertificate:
    """Read a PEM certificate chain and key; ValueError says what is wrong."""
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read: {e}") from None
    try:
        pair = ssl.PrivateCertificate.loadPEM(key_pem + b"\n" + cert_pem)
        pair.options()  # checks that key and certificate match
    except Exception as e:  # OpenSSL raises its own types
        raise ValueError(f"{cert_path}: not a usable PEM certificate and key ({e.__class__.__name__})") from None
    return pair


def _chain(cert_path: str) -> list:
    """Intermediate certificates after the first one in the PEM file."""
    from OpenSSL import crypto

    with open(cert_path, "rb") as f:
        data = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    parts = [marker + p for p in data.split(marker)[1:]]
    return [crypto.load_certificate(crypto.FILETYPE_PEM, p) for p in parts[1:]]


def make_self_signed(cert_path: str, key_path: str, hostname: str) -> None:
    """Write a new self-signed certificate for ``hostname`` (mode 0600 key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    for p in (cert_path, key_path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class ReloadableTLS:
    """Holds the server's TLS options; :meth:`reload` re-reads the files."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.options = self._load()

    def _load(self) -> ssl.CertificateOptions:
        pair = load_certificate(self.cert_path, self.key_path)
        return ssl.CertificateOptions(
            privateKey=pair.privateKey.original,
            certificate=pair.original,
            extraCertChain=_chain(self.cert_path),
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )

    def reload(self) -> None:
        self.options = self._load()
