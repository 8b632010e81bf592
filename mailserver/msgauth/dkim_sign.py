# -*- test-case-name: tests.unit.test_dkim_sign -*-
"""DKIM signing (RFC 6376; Ed25519 by RFC 8463) of mail leaving a local domain.

Two places sign, both through one :class:`Signer`:

* :class:`DKIMSigning`, the last check of the submission pipeline: once
  :class:`~mailserver.pipeline.submission.SubmissionHeaders` has added any
  missing Message-ID and Date, the message is signed for the domain of its
  From: address (else of its envelope sender) and the ``DKIM-Signature``
  fields join the header lines added on the way in, so every copy (queued,
  or delivered here) carries them;
* :meth:`Signer.sign_forward`, called by
  :class:`~mailserver.delivery.recipients.RecipientDelivery` for the copy a
  forward sends outside: signed for the forwarding address's domain, unless
  that domain is aligned (same organisational domain) with the From: domain:
  we never vouch, by DMARC alignment, for a From: nobody authenticated here.

What is signed: the RFC 6376 5.4 header fields present (:data:`SIGNED`),
with From:, the other originator and reply fields oversigned (one more
instance than present, so nobody can add one); relaxed/relaxed
canonicalisation; every key the :class:`~mailserver.msgauth.keys.KeyStore`
has for the domain, so with an Ed25519 and an RSA key the message carries
both signatures (RFC 8463 asks for that while verifiers learn Ed25519).

The body hash needs the whole body.  dkimpy only hashes a body it holds in
memory, so :class:`RelaxedBodyHash` canonicalises and hashes it streaming,
reading the spooled file back in a thread of the I/O pool at the end of the
data (never on the reactor thread, never the whole message in memory);
dkimpy then signs the header fields given that body hash
(``DKIM.gen_header``).  Both algorithms hash with SHA-256, so one pass
serves every signature.

A key that is missing or broken, or a message dkimpy cannot sign, never
costs the mail: it leaves unsigned and an error is logged (see
docs/decisions.rst).
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import io
import re
import time
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from twisted.logger import Logger

from mailserver.pipeline.acceptance import Check

log = Logger(namespace="mailserver.dkim")

#: Header fields signed when present (RFC 6376 5.4.1 and dkimpy's list).
SIGNED = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "list-unsubscribe-post",
)
#: Signed once more than present (RFC 6376 5.4.2, 8.15): a verifier then
#: fails a message someone added such a field to.  Fields a mailing list may
#: legitimately add (Sender, List-*) are not here.
OVERSIGNED = ("from", "reply-to", "subject", "date", "message-id", "to", "cc",
              "in-reply-to", "references")
CANONICALIZATION = b"relaxed/relaxed"
MAX_HEADER_SECTION = 1 << 20  # octets of header read back; more is not signed
MAX_LINE = 1 << 20  # a longer body line is not signed (SMTP limits lines to 1000)
CHUNK = 1 << 16


class SigningError(Exception):
    """This message cannot be signed (the text says why)."""


class RelaxedBodyHash:
    """SHA-256 of a body in the relaxed canonical form (RFC 6376 3.4.4), fed
    in chunks of any size: line ends become CRLF, white space runs become one
    space and vanish at line ends, empty lines at the end are dropped, and a
    last line without a line end gets one.  Only an unfinished line and the
    count of pending empty lines are kept between chunks."""

    _EOL = re.compile(rb"\r?\n")
    _WSP = re.compile(rb"\t[\t ]*| [\t ]+")  # runs that are not already one space

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""
        self._blank = 0  # empty lines seen but not yet known to be followed by text

    def update(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if len(self._partial) > MAX_LINE:
            raise SigningError(f"a body line longer than {MAX_LINE} octets")
        if cut:
            self._lines(data[:cut])

    def _lines(self, block: bytes) -> None:
        # Each step only when needed: most chunks are CRLF text with single spaces.
        if block.count(b"\n") != block.count(b"\r\n"):
            block = self._EOL.sub(b"\r\n", block)
        if b"\t" in block or b"  " in block:
            block = self._WSP.sub(b" ", block)
        block = block.replace(b" \r\n", b"\r\n")  # white space is single spaces by now
        end = len(block)
        while block.endswith(b"\r\n", 0, end):
            end -= 2
        if end == 0:  # only empty lines
            self._blank += len(block) // 2
            return
        if self._blank:
            self._hash.update(b"\r\n" * self._blank)
        self._hash.update(block[:end + 2])  # the text and its line end
        self._blank = (len(block) - end) // 2 - 1

    def digest(self) -> bytes:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._lines(partial + b"\r\n")
        return self._hash.digest()


def read_header_section(f) -> bytes:
    """The header section at the file's position, up to and without the empty
    line; the file is left at the start of the body."""
    out, size = [], 0
    while True:
        line = f.readline(MAX_HEADER_SECTION + 1)
        if not line or line in (b"\r\n", b"\n"):
            return b"".join(out)
        size += len(line)
        if size > MAX_HEADER_SECTION:
            raise SigningError(f"a header section longer than {MAX_HEADER_SECTION} octets")
        out.append(line)


def parse_headers(section: bytes) -> list:
    """``[name, value]`` pairs, as dkimpy parses them."""
    import dkim

    try:
        headers, _body = dkim.rfc822_parse(section + b"\r\n")
    except dkim.MessageFormatError as e:
        raise SigningError(f"malformed header section: {e}") from None
    return headers


def signed_fields(headers: list) -> Tuple[bytes, ...]:
    """The ``h=`` list: each field of :data:`SIGNED` as often as it occurs,
    those of :data:`OVERSIGNED` once more."""
    counts: dict = {}
    for name, _value in headers:
        key = name.decode("ascii", "replace").strip().lower()
        counts[key] = counts.get(key, 0) + 1
    if not counts.get("from"):
        raise SigningError("no From: field (RFC 6376 5.4: From is always signed)")
    out = []
    for name in SIGNED:
        n = counts.get(name, 0) + (1 if name in OVERSIGNED else 0)
        out.extend([name.encode("ascii")] * n)
    return tuple(out)


def from_domains(headers: list) -> List[str]:
    """The domains of the From: addresses, in order (the last From: field:
    the one dkimpy's ``h=`` takes first)."""
    values = [v for n, v in headers if n.strip().lower() == b"from"]
    if not values:
        return []
    text = values[-1].decode("utf-8", "replace").replace("\r\n", "")
    out = []
    for _name, address in email.utils.getaddresses([text]):
        domain = address.rpartition("@")[2].strip().lower().rstrip(".")
        if "@" in address and domain and domain not in out:
            out.append(domain)
    return out


@functools.lru_cache(maxsize=1)
def _psl():
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organisational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label."""
    return _psl().privatesuffix(domain.lower().rstrip(".")) or domain.lower().rstrip(".")


def aligned(a: str, b: str) -> bool:
    """Relaxed DMARC alignment of two domains."""
    return organisational_domain(a) == organisational_domain(b)


def sign_header(headers: list, fields: Sequence[bytes], body_hash: bytes, key,
                now: float) -> bytes:
    """One ``DKIM-Signature`` field (folded, ending in CRLF) by ``key`` over
    ``headers`` for a body whose relaxed SHA-256 is ``body_hash``."""
    import dkim
    from dkim.canonicalization import CanonicalizationPolicy

    signer = dkim.DKIM(signature_algorithm=key.signature_algorithm, linesep=b"\r\n")
    signer.headers = headers
    signer.hasher = dkim.HASH_ALGORITHMS[key.signature_algorithm]
    tags = [
        (b"v", b"1"),
        (b"a", key.signature_algorithm),
        (b"c", CANONICALIZATION),
        (b"d", key.domain.encode("ascii")),
        (b"s", key.selector.encode("ascii")),
        (b"t", str(int(now)).encode("ascii")),
        (b"h", b" : ".join(fields)),  # spaces: folding may break the line there only
        (b"bh", base64.b64encode(body_hash)),
        (b"b", b"0" * 60),  # replaced; makes b= start a line of its own when folded
    ]
    policy = CanonicalizationPolicy.from_c_value(CANONICALIZATION)
    value = signer.gen_header(tags, list(fields), policy, b"DKIM-Signature", key.dkimpy_private)
    return b"DKIM-Signature: " + value


class Signer:
    """Signs messages with the keys of a :class:`~mailserver.msgauth.keys.KeyStore`.

    ``io(f, *args)`` runs ``f`` off the reactor thread and returns a
    Deferred (the service's I/O pool); ``clock`` gives ``t=``.
    ``forwarded``: sign the copies forwards send outside.
    """

    def __init__(self, keys, io, clock=None, forwarded: bool = True) -> None:
        self.keys = keys
        self.io = io
        self.clock = clock
        self.forwarded = forwarded

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def sign_file(self, prefix: bytes, source, domains: Sequence[str], *,
                  from_first: bool = True, not_aligned_with_from: bool = False,
                  now: Optional[float] = None) -> Tuple[List[bytes], str, List[str]]:
        """Blocking: ``(signature fields, domain, problems)`` for the message
        ``prefix`` + ``source``: the content's file (a path), or the content
        itself (bytes, a small message still in memory).  The signing domain is the first of
        (with ``from_first``, the From: domains, then) ``domains`` that has
        keys; ``not_aligned_with_from`` skips domains aligned with a From:
        domain.  No keys for any of them: ``([], "", [])``."""
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as f:
            headers = parse_headers(prefix + read_header_section(f))
            froms = from_domains(headers)
            candidates = [*(froms if from_first else ()), *domains]
            chosen, keys, problems = "", [], []
            for domain in dict.fromkeys(d.lower().rstrip(".") for d in candidates if d):
                if not_aligned_with_from and any(aligned(domain, d) for d in froms):
                    continue
                keys, problems = self.keys.keys_for(domain)
                if keys or problems:
                    chosen = domain
                    break
            if not keys:
                return [], chosen, problems
            fields = signed_fields(headers)
            body = RelaxedBodyHash()
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                body.update(chunk)
        digest = body.digest()
        when = self._now() if now is None else now
        return [sign_header(headers, fields, digest, k, when) for k in keys], chosen, problems

    async def sign(self, queue_id: str, prefix: bytes, source, domains: Sequence[str],
                   **kw) -> List[bytes]:
        """The signature fields for a message, signed in the I/O pool; on any
        failure none (the message leaves unsigned), with an error logged."""
        kw.setdefault("now", self._now())
        try:
            lines, domain, problems = await self.io(self.sign_file, prefix, source, domains, **kw)
        except SigningError as e:  # the message's doing, not the operator's
            log.warn("{id}: dkim: not signed: {why}", id=queue_id, why=str(e))
            return []
        except Exception:
            log.failure("{id}: dkim: not signed: signing failed", id=queue_id)
            return []
        for problem in problems:
            log.error("{id}: dkim: key for {domain} unusable: {problem}", id=queue_id,
                      domain=domain, problem=problem)
        if lines:
            log.info("{id}: dkim: signed d={domain} ({what})", id=queue_id, domain=domain,
                     what=", ".join(_describe(line) for line in lines))
        elif problems:
            log.error("{id}: dkim: not signed: no usable key for {domain}", id=queue_id,
                      domain=domain)
        return lines

    def might_sign(self, domains: Sequence[str]) -> bool:
        """Whether any of ``domains`` may have a key (answered from memory,
        on the reactor thread): when none does, no thread hop is needed."""
        return any(self.keys.may_sign(d) for d in domains if d)

    async def sign_forward(self, message, forwarders: Sequence[str]):
        """The :class:`~mailserver.delivery.recipients.Message` a forward
        sends outside: signed for the first forwarding address's domain with
        keys that is not aligned with the From: domain; else unchanged."""
        if not self.forwarded:
            return message
        domains = [a.rpartition("@")[2] for a in forwarders if "@" in a]
        if not self.might_sign(domains):
            return message
        lines = await self.sign(message.queue_id, message.prefix, message.source(),
                                domains, from_first=False, not_aligned_with_from=True)
        if not lines:
            return message
        return replace(message, prefix=message.prefix + b"".join(lines))


def _describe(line: bytes) -> str:
    """``s=selector a=algorithm`` of a signature field, for the log."""
    text = line.decode("ascii", "replace").replace("\r\n", "")
    tags = dict(t.strip().partition("=")[::2] for t in text.partition(":")[2].split(";"))
    return f"s={tags.get('s', '?')} a={tags.get('a', '?')}"


def scanned_from_domains(scanner) -> Optional[List[str]]:
    """The From: domains the acceptance pipeline's header scanner kept, or
    None when it cannot tell (no scanner, a From: field cut short)."""
    if scanner is None or "from" in getattr(scanner, "truncated", ()):
        return None
    values = scanner.fields.get("from") or []
    return from_domains([(b"From", v.encode("utf-8")) for v in values])


class DKIMSigning(Check):
    """Submission: sign for the From: domain (else the envelope sender's)."""

    name = "dkim-sign"

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    async def on_data(self, session, txn):
        if not session.authenticated:  # only what a login submits (AUTH precedes MAIL here)
            return None
        domains = [txn.sender.rpartition("@")[2]] if "@" in txn.sender else []
        froms = scanned_from_domains(txn.scanner)
        if froms is not None and not self.signer.might_sign(froms + domains):
            return None  # no key for any candidate: spare the thread hop
        data = getattr(txn.message, "data", None)  # a small message still in memory
        lines = await self.signer.sign(txn.message.queue_id, b"".join(txn.headers),
                                       txn.message.path if data is None else data, domains)
        txn.headers.extend(lines)
        return None


def signer_from_config(config, io, clock=None) -> Optional[Signer]:
    """The Signer ``[dkim]`` configures, or None when signing is off."""
    from mailserver.msgauth.keys import KeyStore

    d = config.dkim
    if not d.sign:
        return None
    per_domain = {domain: tuple(v.replace(",", " ").split())
                  for domain, v in d.domain_selectors.items()}
    return Signer(KeyStore(d.key_dir, d.selectors, per_domain), io, clock,
                  forwarded=d.sign_forwarded)


__all__ = ["DKIMSigning", "RelaxedBodyHash", "Signer", "SigningError", "signer_from_config"]
