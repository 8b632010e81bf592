"""Keys, signatures and DNS records for the message-authentication tests."""

from __future__ import annotations

import base64

import dkim
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
