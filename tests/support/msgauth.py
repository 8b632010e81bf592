"""Keys, signatures and DNS records for the message-authentication tests."""

from __future__ import annotations

import base64
import types

import dkim
import dns.exception
import dns.name
import dns.resolver
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class Ed25519Key:
    """An ed25519 DKIM key: ``private`` for dkimpy, ``record`` to publish."""

    algorithm = b"ed25519-sha256"

    def __init__(self) -> None:
        signing = nacl.signing.SigningKey.generate()
        self.private = base64.b64encode(bytes(signing))
        public = base64.b64encode(bytes(signing.verify_key)).decode()
        self.record = f"v=DKIM1; k=ed25519; p={public}"


class RSAKey:
    """An RSA DKIM key (1024 bits, so the record fits one TXT string)."""

    algorithm = b"rsa-sha256"

    def __init__(self, bits: int = 1024) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.private = key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption())
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.record = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def message(from_addr: str = "alice@example.org", subject: str = "hello",
            extra: bytes = b"", body: bytes = b"Hello there.\r\n") -> bytes:
    return (b"From: " + from_addr.encode() + b"\r\nTo: bob@example.test\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <m1@example.org>\r\n"
            b"Date: Thu, 03 Dec 2026 12:00:00 +0000\r\n" + extra + b"\r\n" + body)


def sign(data: bytes, key, domain: str, selector: str = "sel") -> bytes:
    """``data`` with a DKIM-Signature by ``key`` for ``domain`` on top."""
    header = dkim.sign(data, selector.encode(), domain.encode(), key.private,
                       signature_algorithm=key.algorithm,
                       canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return header + data


def arc_seal(data: bytes, key: RSAKey, domain: str, srv_id: str,
             selector: str = "arc") -> bytes:
    """``data`` with an ARC set added by ``domain`` (it needs an A-R field
    of ``srv_id`` on the message, as a sealing hop has)."""
    headers = dkim.arc_sign(data, selector.encode(), domain.encode(), key.private,
                            srv_id.encode())
    return b"".join(headers) + data


class FakeResolver:
    """dnspython's ``resolve`` from a dict: (name, type) -> values, or
    "servfail" / "timeout"."""

    def __init__(self, records: dict) -> None:
        self.records = {(n.lower(), t): v for (n, t), v in records.items()}
        self.asked = []

    def resolve(self, name, rdtype, lifetime=None, search=False):
        name = str(name).lower().rstrip(".")
        self.asked.append((name, rdtype))
        values = self.records.get((name, rdtype))
        if values == "servfail":
            raise dns.resolver.NoNameservers()
        if values == "timeout":
            raise dns.exception.Timeout()
        if values is None:
            raise dns.resolver.NXDOMAIN()
        out = []
        for v in values:
            if rdtype == "TXT":
                raw = v.encode()
                out.append(types.SimpleNamespace(
                    strings=tuple(raw[i:i + 255] for i in range(0, len(raw), 255))))
            elif rdtype in ("A", "AAAA"):
                out.append(types.SimpleNamespace(address=v))
            elif rdtype == "MX":
                out.append(types.SimpleNamespace(preference=v[0],
                                                 exchange=dns.name.from_text(v[1])))
        return out
