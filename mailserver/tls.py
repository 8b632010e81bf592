# -*- test-case-name: tests.unit.test_tls -*-
"""Server-side TLS for the SMTP listeners.

One :class:`ReloadableTLS` object serves every TLS listener of the process,
whether the client asks for TLS with STARTTLS (port 25 and submission on
587) or speaks TLS from the first byte (implicit TLS on 465, RFC 8314):

* It provides ``IOpenSSLServerConnectionCreator``, so it can be handed to
  ``TLSMemoryBIOFactory(tls, False, factory)`` for an implicit-TLS
  listener, and its ``options`` property (which is the object itself) can
  be passed to ``transport.startTLS``.  Each new connection asks it for an
  ``OpenSSL.SSL.Connection`` built on the context current at that moment,
  so :meth:`ReloadableTLS.reload` (SIGHUP) reaches both kinds of listener.
  Connections already open keep the context they started with.
* Besides the default certificate it can hold more certificates chosen by
  the server name the client sends (SNI), each read from one PEM bundle
  holding the private key and the certificate chain.
* Protocol versions and ciphers: TLS 1.2 is the minimum; TLS 1.2 is limited
  to :data:`DEFAULT_CIPHERS` (ECDHE key exchange with AES-GCM or
  ChaCha20-Poly1305, as in Mozilla's "intermediate" profile), and TLS 1.3
  uses OpenSSL's default suites, which are all AEAD.  Twisted's
  ``CertificateOptions`` already disables TLS compression
  (``OP_NO_COMPRESSION``), session tickets (``OP_NO_TICKET``) and the
  server-side session cache, prefers the server's cipher order and uses
  fresh (EC)DH keys for each handshake; this module adds
  ``OP_NO_RENEGOTIATION`` where OpenSSL has it, as no mail client needs
  renegotiation.

:func:`load_certificate` and :func:`make_self_signed` read and create the
default certificate; :func:`load_pem_bundle` reads an SNI bundle.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory, IOpenSSLServerConnectionCreator
from zope.interface import implementer

#: OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are not affected by it):
#: forward-secret ECDHE key exchange with an AEAD cipher only, in Mozilla's
#: "intermediate" order.  RSA key exchange, CBC modes, SHA-1 MACs, DHE and
#: everything weaker are left out.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


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


def load_pem_bundle(path: str) -> Tuple[bytes, List[bytes]]:
    """Read one PEM file holding a private key and its certificate chain.

    Returns ``(key_pem, chain_pems)``: the key, and the certificates in file
    order, the first being the one the key belongs to (the server's own
    certificate), the others its intermediates.  The blocks may come in any
    order in the file as long as the certificates are in chain order, as in
    an HAProxy ``crt`` file.  Raises ValueError naming ``path`` when the file
    cannot be read, holds no key, more than one key or no certificate, a
    block does not parse, the key is encrypted, or the key does not match
    the first certificate.
    """
    key_pem, chain_pems, _key, _chain_certs = _read_bundle(path)
    return key_pem, chain_pems


def _read_bundle(path: str):
    """:func:`load_pem_bundle` plus the parsed key and certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    keys: List[bytes] = []
    certs: List[bytes] = []
    for m in _PEM_BLOCK.finditer(data):
        label = m.group(1)
        if label == b"CERTIFICATE":
            certs.append(m.group(0))
        elif label.endswith(b"PRIVATE KEY"):
            keys.append(m.group(0))
    if not keys:
        raise ValueError(f"{path}: no private key in the file (expected the key and the "
                         f"certificate chain in one PEM file)")
    if len(keys) > 1:
        raise ValueError(f"{path}: {len(keys)} private keys in the file, expected one")
    if not certs:
        raise ValueError(f"{path}: no certificate in the file (expected the key and the "
                         f"certificate chain in one PEM file)")
    if b"ENCRYPTED" in keys[0].split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in keys[0]:
        raise ValueError(f"{path}: the private key is encrypted; a passphrase is not supported")
    try:
        key = serialization.load_pem_private_key(keys[0], password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: the private key cannot be read ({e})") from None
    parsed = []
    for i, pem in enumerate(certs, 1):
        try:
            parsed.append(x509.load_pem_x509_certificate(pem))
        except ValueError as e:
            raise ValueError(f"{path}: certificate {i} cannot be read ({e})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != parsed[0].public_key().public_bytes(*spki):
        raise ValueError(f"{path}: the private key does not match the first certificate "
                         f"(put the server's own certificate before its intermediates)")
    return keys[0], certs, key, parsed


def _normalise_sni_name(name: str) -> str:
    """Lower-case ASCII form of an SNI table key; ValueError if malformed."""
    n = name.strip().rstrip(".").lower()
    wildcard = n.startswith("*.")
    base = n[2:] if wildcard else n
    try:
        base = base.encode("idna").decode("ascii") if base else base
    except UnicodeError:
        raise ValueError(f"SNI name {name!r}: not a valid host name") from None
    labels = base.split(".")
    if not base or "*" in base or any(not label for label in labels):
        raise ValueError(f"SNI name {name!r}: expected a host name, or *. and a host name")
    return ("*." if wildcard else "") + base


def _lookup(table: Mapping[str, SSL.Context], server_name: Optional[bytes]) -> Optional[SSL.Context]:
    """The context for ``server_name``: an exact entry, else a wildcard
    entry covering exactly its first label, else None."""
    if not server_name or not table:
        return None
    try:
        name = server_name.decode("ascii").rstrip(".").lower()
    except UnicodeDecodeError:
        return None
    found = table.get(name)
    if found is None and "." in name:
        found = table.get("*." + name.split(".", 1)[1])
    return found


class _State:
    """One generation of loaded certificates: the CertificateOptions and
    contexts a handshake started now will use.  Never modified once built;
    a reload makes a new one."""

    def __init__(self, options: ssl.CertificateOptions, context: SSL.Context,
                 by_name: Dict[str, SSL.Context]) -> None:
        self.options = options
        self.context = context
        self.by_name = by_name


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class ReloadableTLS:
    """The server's TLS settings, for STARTTLS and implicit-TLS listeners.

    ``cert_path`` and ``key_path`` name the default certificate (chain) and
    its key; they may be the same file.  ``sni`` maps a host name (a leading
    ``*.`` matches any single first label) to a PEM bundle read by
    :func:`load_pem_bundle`; a client sending no server name, or one not in
    the table, gets the default certificate.  ``ciphers`` is the OpenSSL
    cipher string for TLS 1.2 (:data:`DEFAULT_CIPHERS`).

    Use the object itself as the context factory of
    ``TLSMemoryBIOFactory(tls, False, factory)`` and pass :attr:`options`
    to ``transport.startTLS``.  :meth:`reload` re-reads every file.
    """

    def __init__(self, cert_path: str, key_path: str, sni: Optional[Dict[str, str]] = None,
                 ciphers: str = DEFAULT_CIPHERS) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.ciphers = ciphers
        self.sni: Dict[str, str] = {}
        for name, path in (sni or {}).items():
            key = _normalise_sni_name(name)
            if key in self.sni:
                raise ValueError(f"SNI name {name!r} given twice")
            self.sni[key] = path
        self._acceptable = ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers)
        self._state = self._load()

    # -- what listeners use ---------------------------------------------------
    @property
    def options(self) -> "ReloadableTLS":
        """What to pass to ``transport.startTLS``: this object itself, so a
        STARTTLS after a reload gets the new certificates."""
        return self

    @property
    def certificate_options(self) -> ssl.CertificateOptions:
        """The ``CertificateOptions`` of the current default certificate (a
        snapshot: it does not follow later reloads)."""
        return self._state.options

    @property
    def context(self) -> SSL.Context:
        """The current default ``SSL.Context``, which switches to the SNI
        certificates on its own (a snapshot, like certificate_options)."""
        return self._state.context

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """A server-side OpenSSL connection on the current context
        (``IOpenSSLServerConnectionCreator``); ``tlsProtocol`` is not used,
        and may be None."""
        return SSL.Connection(self._state.context, None)

    def getContext(self) -> SSL.Context:
        """The current default context, for APIs that still want an
        ``IOpenSSLContextFactory`` (such as ``reactor.listenSSL``)."""
        return self._state.context

    def reload(self) -> None:
        """Re-read the default certificate and every SNI bundle.  New
        handshakes use them; open connections keep the old ones.  On any
        error, ValueError says what is wrong and nothing changes."""
        self._state = self._load()

    # -- building -------------------------------------------------------------
    def _options(self, key, cert, chain: list) -> ssl.CertificateOptions:
        try:
            return ssl.CertificateOptions(
                privateKey=key,
                certificate=cert,
                extraCertChain=chain,
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
                acceptableCiphers=self._acceptable,
            )
        except ValueError as e:
            raise ValueError(f"TLS settings: {e} (ciphers {self.ciphers!r})") from None

    @staticmethod
    def _context(options: ssl.CertificateOptions, where: str) -> SSL.Context:
        try:
            ctx = options.getContext()
        except SSL.Error as e:
            raise ValueError(f"{where}: OpenSSL refused the certificate or key ({e})") from None
        ctx.set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        return ctx

    def _load(self) -> _State:
        pair = load_certificate(self.cert_path, self.key_path)
        try:
            chain = _chain(self.cert_path)
        except Exception as e:  # OpenSSL raises its own types
            raise ValueError(f"{self.cert_path}: an intermediate certificate cannot be read "
                             f"({e.__class__.__name__})") from None
        options = self._options(pair.privateKey.original, pair.original, chain)
        context = self._context(options, self.cert_path)
        by_name: Dict[str, SSL.Context] = {}
        for name, path in self.sni.items():
            _key_pem, _chain_pems, key, certs = _read_bundle(path)
            sni_options = self._options(
                crypto.PKey.from_cryptography_key(key),
                crypto.X509.from_cryptography(certs[0]),
                [crypto.X509.from_cryptography(c) for c in certs[1:]],
            )
            by_name[name] = self._context(sni_options, path)
        if by_name:
            context.set_tlsext_servername_callback(_servername_callback(by_name))
        return _State(options, context, by_name)


def _servername_callback(by_name: Dict[str, SSL.Context]) -> Callable[[SSL.Connection], None]:
    """OpenSSL's SNI hook for one generation of contexts: move the
    connection to the certificate for the name the client asked for."""

    def switch(connection: SSL.Connection) -> None:
        other = _lookup(by_name, connection.get_servername())
        if other is not None:
            connection.set_context(other)

    return switch
