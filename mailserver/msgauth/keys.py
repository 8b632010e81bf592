# -*- test-case-name: tests.unit.test_dkim_keys -*-
"""DKIM signing keys: where they live, how they are made and published.

A key is one file, ``<key_dir>/<domain>/<selector>.key``, mode 0600: a PEM
PKCS#8 private key, Ed25519 (RFC 8463) or RSA (2048 bits), so ``openssl
pkey`` reads it too.  One selector is one key (the DNS record under
``<selector>._domainkey.<domain>`` names one key type), so signing with both
algorithms means two selectors.

:func:`generate` and :func:`write_key` make a key; :func:`load_key` reads
one into what dkimpy signs with; :func:`dns_record` is the TXT record that
publishes its public half, in zone-file syntax.  :class:`KeyStore` answers
"which keys sign for this domain", re-reading a key file only when it
changed, so a new key or a rotation needs no restart.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("ed25519", "rsa")
RSA_BITS = 2048
SIGNATURE_ALGORITHM = {"ed25519": b"ed25519-sha256", "rsa": b"rsa-sha256"}
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                       r"[a-z0-9])?)*$")
_DOMAIN = _SELECTOR


class KeyProblem(ValueError):
    """A key file that is missing, unreadable or not a usable key."""


def check_name(kind: str, value: str) -> str:
    """A selector or domain as DNS labels (letters, digits, hyphens), lower
    case; ValueError otherwise (it becomes a file name too)."""
    value = value.strip().lower().rstrip(".")
    if not _SELECTOR.match(value) or len(value) > 253:
        raise ValueError(f"{kind} {value!r} is not a DNS name (letters, digits, '-', '.')")
    return value


def key_path(key_dir: str, domain: str, selector: str) -> str:
    return os.path.join(key_dir, check_name("domain", domain),
                        check_name("selector", selector) + ".key")


def generate(algorithm: str, bits: int = RSA_BITS) -> bytes:
    """A new private key as PEM (PKCS#8, unencrypted)."""
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_key(path: str, pem: bytes, owner: Optional[Tuple[int, int]] = None) -> None:
    """Write a new key file, 0600, never over an existing one (FileExistsError);
    its directories are made 0700.  ``owner`` (uid, gid) gets the file and the
    directories made, so the service user can read it and nobody else."""
    directory = os.path.dirname(path)
    made = []
    p = directory
    while p and not os.path.isdir(p):
        made.append(p)
        p = os.path.dirname(p)
    for d in reversed(made):
        os.mkdir(d, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    if owner is not None:
        for d in made:
            os.chown(d, *owner)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True)
class SigningKey:
    """One loaded key: what dkimpy signs with and what DNS publishes."""

    domain: str
    selector: str
    algorithm: str  # "ed25519" or "rsa"
    private: object  # the cryptography key object
    public: str  # the p= value: base64 of the raw Ed25519 key or the RSA SubjectPublicKeyInfo

    @property
    def signature_algorithm(self) -> bytes:
        return SIGNATURE_ALGORITHM[self.algorithm]

    @functools.cached_property
    def dkimpy_private(self):
        """The private key as dkimpy's signing code takes it: an RSA key in
        PKCS#1 PEM, an Ed25519 key as a PyNaCl signing key."""
        if self.algorithm == "rsa":
            from dkim.crypto import parse_pem_private_key

            return parse_pem_private_key(self.private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption()))
        import nacl.signing

        return nacl.signing.SigningKey(self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))

    def tags(self) -> str:
        """The DKIM key record (RFC 6376 3.6.1)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public}"


def public_value(private) -> Tuple[str, str]:
    """(algorithm, p= value) of a private key object."""
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        return "ed25519", base64.b64encode(raw).decode("ascii")
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 1024:
            raise KeyProblem(f"RSA key of {private.key_size} bits: verifiers refuse under 1024")
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return "rsa", base64.b64encode(der).decode("ascii")
    raise KeyProblem(f"a {type(private).__name__}: DKIM signs with Ed25519 or RSA keys")


def load_key(path: str, domain: str, selector: str) -> SigningKey:
    """Read one key file; KeyProblem when it cannot sign."""
    try:
        with open(path, "rb") as f:
            pem = f.read(65536)
    except OSError as e:
        raise KeyProblem(f"{path}: {e.strerror}") from None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeyProblem(f"{path}: not an unencrypted PEM private key ({e})") from None
    try:
        algorithm, public = public_value(private)
    except KeyProblem as e:
        raise KeyProblem(f"{path}: {e}") from None
    return SigningKey(domain, selector, algorithm, private, public)


def txt_strings(value: str, size: int = 255) -> str:
    """A TXT value as quoted character-strings of at most ``size`` octets
    (RFC 1035 3.3.14; an RSA key is longer than one string may be)."""
    data = value.encode("utf-8")
    parts = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    return " ".join('"' + _escape(p) + '"' for p in parts)


def _escape(part: bytes) -> str:
    """A character-string's content in zone-file syntax (RFC 1035 5.1)."""
    out = []
    for byte in part:
        c = chr(byte)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= byte < 127:
            out.append(c)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def dns_record(key: SigningKey, ttl: Optional[int] = None) -> str:
    """The key's TXT record as a zone-file line."""
    owner = f"{key.selector}._domainkey.{key.domain}."
    ttl_text = f" {ttl}" if ttl else ""
    return f"{owner}{ttl_text} IN TXT {txt_strings(key.tags())}"


class KeyStore:
    """The keys under ``key_dir`` and which of them sign for a domain.

    ``selectors`` (every domain) and ``domain_selectors`` (per domain, which
    wins) name the selectors in use; with neither, every ``*.key`` file in
    the domain's directory signs.  A listed selector whose file is missing
    or broken is an error for the caller to report.  Files are re-read when
    their modification time or size changes.  :meth:`may_sign` answers from
    memory, for the reactor thread; ``clock`` (seconds) times its listing.
    """

    LISTING_TTL = 10.0  # seconds a listing of the domains with key files is used

    def __init__(self, key_dir: str, selectors: Sequence[str] = (),
                 domain_selectors: Optional[Dict[str, Sequence[str]]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key_dir = key_dir
        self.selectors = tuple(selectors)
        self.domain_selectors = {d.lower().rstrip("."): tuple(s)
                                 for d, s in (domain_selectors or {}).items()}
        self.clock = clock
        self._cache: Dict[str, Tuple[tuple, SigningKey]] = {}
        self._listing: Optional[Tuple[float, FrozenSet[str]]] = None

    def may_sign(self, domain: str) -> bool:
        """Whether :meth:`keys_for` could find keys (or problems) for
        ``domain``, cheaply: configured selectors say yes; otherwise the
        domains whose directory holds a ``*.key`` file, listed at most once
        per :attr:`LISTING_TTL` seconds (a first key signs within that)."""
        domain = domain.lower().rstrip(".")
        if self.domain_selectors.get(domain) or self.selectors:
            return True
        now = self.clock()
        if self._listing is None or now >= self._listing[0]:
            self._listing = (now + self.LISTING_TTL, self._domains_with_keys())
        return domain in self._listing[1]

    def _domains_with_keys(self) -> FrozenSet[str]:
        found = set()
        try:
            names = os.listdir(self.key_dir)
        except OSError:
            return frozenset()
        for name in names:
            try:
                files = os.listdir(os.path.join(self.key_dir, name))
            except OSError:
                continue
            if any(f.endswith(".key") and len(f) > 4 for f in files):
                found.add(name.lower())
        return frozenset(found)

    def selectors_for(self, domain: str) -> Tuple[str, ...]:
        domain = domain.lower().rstrip(".")
        listed = self.domain_selectors.get(domain) or self.selectors
        if listed:
            return listed
        try:
            names = os.listdir(os.path.join(self.key_dir, check_name("domain", domain)))
        except (OSError, ValueError):
            return ()
        return tuple(sorted(n[:-4] for n in names if n.endswith(".key") and len(n) > 4))

    def keys_for(self, domain: str) -> Tuple[list, list]:
        """(keys, problems) for ``domain``: the keys to sign with and a text
        per listed key that cannot be used."""
        keys, problems = [], []
        for selector in self.selectors_for(domain):
            try:
                keys.append(self._load(domain.lower().rstrip("."), selector))
            except (KeyProblem, ValueError) as e:
                problems.append(str(e))
        return keys, problems

    def _load(self, domain: str, selector: str) -> SigningKey:
        path = key_path(self.key_dir, domain, selector)
        try:
            st = os.stat(path)
        except OSError as e:
            raise KeyProblem(f"{path}: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        key = load_key(path, domain, selector)
        self._cache[path] = (stamp, key)
        return key


__all__ = ["ALGORITHMS", "KeyProblem", "KeyStore", "SigningKey", "check_name", "dns_record",
           "generate", "key_path", "load_key", "txt_strings", "write_key"]
