"""DKIM signing: the streaming body hash, the header choice, the signatures
dkimpy verifies, the submission check and forwarded copies, and failures
that leave mail unsigned but never lose it."""

from __future__ import annotations

import hashlib
import os
import random
from types import SimpleNamespace

import dkim
import pytest
from dkim.canonicalization import Relaxed
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mailserver.delivery.recipients import Message
from mailserver.msgauth import dkim_sign as S
from mailserver.msgauth import keys as K
from mailserver.pipeline.session import Transaction

DOMAIN = "example.test"


# -- fixtures: one Ed25519 and one RSA key, made once ---------------------------------

@pytest.fixture(scope="module")
def pems():
    return {"ed": K.generate("ed25519"), "rs": K.generate("rsa")}


@pytest.fixture
def key_dir(tmp_path, pems):
    d = tmp_path / "dkim"
    for selector, pem in pems.items():
        K.write_key(K.key_path(str(d), DOMAIN, selector), pem)
    return str(d)


def published(key_dir: str, domain: str = DOMAIN) -> dict:
    """TXT data, as a DNS server would publish it, for the keys on disk."""
    keys, problems = K.KeyStore(key_dir).keys_for(domain)
    assert not problems
    return {f"{k.selector}._domainkey.{k.domain}.".encode(): k.tags().encode() for k in keys}


def verify_all(message: bytes, records: dict) -> list:
    """(d, s, verified) of each DKIM-Signature field, top first."""
    def dnsfunc(name, timeout=5):
        return records.get(name)

    d = dkim.DKIM(message)
    out = []
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    for i, value in enumerate(sigs):
        tags = dict(t.strip().partition(b"=")[::2] for t in value.split(b";"))
        out.append((tags[b"d"].strip().decode(), tags[b"s"].strip().decode(),
                    dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)))
    return out


def sync_io(f, *args, **kw):
    return defer.maybeDeferred(f, *args, **kw)


def result(coro):
    out = []
    defer.ensureDeferred(coro).addBoth(out.append)
    assert out, "not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def write(tmp_path, content: bytes, name: str = "msg") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


LOGGED_IN = SimpleNamespace(authenticated=True)

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@elsewhere.example\r\n"
           b"Subject: hello\r\n there\r\nContent-Type: text/plain\r\n\r\n"
           b"Hi  Bob, \t\r\n\r\nsee you.\r\n\r\n\r\n")


# -- the body hash ---------------------------------------------------------------------

def test_relaxed_body_hash_equals_dkimpy_for_any_chunking():
    """Random bodies (CR, LF, white space, empty lines) fed in random chunks
    hash to what dkimpy's relaxed canonicalisation of the whole body gives."""
    rnd = random.Random(12)
    pieces = [b"a", b"bc", b" ", b"\t", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" \t \r\n", b"."]
    for _ in range(2000):
        body = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 40))) + b"\r\n"
        want = hashlib.sha256(Relaxed.canonicalize_body(
            dkim.rfc822_parse(b"X: y\r\n\r\n" + body)[1])).digest()
        h = S.RelaxedBodyHash()
        i = 0
        while i < len(body):
            j = i + rnd.randint(1, 7)
            h.update(body[i:j])
            i = j
        assert h.digest() == want, body


def test_empty_body_and_only_empty_lines_hash_as_nothing():
    for body in (b"", b"\r\n", b"\r\n\r\n \r\n"):
        h = S.RelaxedBodyHash()
        h.update(body)
        assert h.digest() == hashlib.sha256(b"").digest()


def test_an_endless_line_is_refused_not_held():
    h = S.RelaxedBodyHash()
    with pytest.raises(S.SigningError):
        for _ in range(S.MAX_LINE // S.CHUNK + 2):
            h.update(b"x" * S.CHUNK)


# -- which fields ---------------------------------------------------------------------

def test_signed_fields_oversign_from_and_the_singletons():
    headers = S.parse_headers(b"From: a@example.test\r\nTo: b@x\r\nReceived: x\r\n"
                              b"List-Id: <l.x>\r\nX-Other: 1\r\nTo: c@x\r\n")
    fields = S.signed_fields(headers)
    assert fields.count(b"from") == 2 and fields.count(b"to") == 3
    assert fields.count(b"list-id") == 1  # signed, a list may add one: not oversigned
    assert fields.count(b"subject") == 1  # absent, but nobody may add one
    assert b"received" not in fields and b"x-other" not in fields and b"sender" not in fields


def test_no_from_is_not_signed():
    with pytest.raises(S.SigningError):
        S.signed_fields(S.parse_headers(b"To: b@x\r\n"))


# -- signatures -------------------------------------------------------------------------

def test_dual_signature_verifies_with_dkimpy(tmp_path, key_dir):
    """An Ed25519 and an RSA signature, over the added Message-ID too; both verify."""
    signer = S.Signer(K.KeyStore(key_dir), sync_io, Clock())
    prefix = b"Message-ID: <1@mx.example.test>\r\n"
    lines, domain, problems = signer.sign_file(prefix, write(tmp_path, MESSAGE), [])
    assert (domain, problems, len(lines)) == (DOMAIN, [], 2)
    assert b"a=ed25519-sha256" in lines[0] and b"a=rsa-sha256" in lines[1]
    assert all(b"c=relaxed/relaxed" in line and line.endswith(b"\r\n") for line in lines)
    assert b"message-id" in lines[0].replace(b"\r\n ", b"")
    signed = b"".join(lines) + prefix + MESSAGE
    assert verify_all(signed, published(key_dir)) == [(DOMAIN, "ed", True), (DOMAIN, "rs", True)]
    # The prefix is covered: changing the added Message-ID breaks both.
    forged = b"".join(lines) + prefix.replace(b"<1@", b"<2@") + MESSAGE
    assert [ok for _d, _s, ok in verify_all(forged, published(key_dir))] == [False, False]



def test_content_in_memory_signs_as_its_file(tmp_path, key_dir):
    """A small message still in memory (bytes) gets the signatures its file would."""
    signer = S.Signer(K.KeyStore(key_dir), sync_io, Clock())
    prefix = b"Message-ID: <1@mx.example.test>\r\n"
    from_file = signer.sign_file(prefix, write(tmp_path, MESSAGE), [], now=1000.0)
    from_bytes = signer.sign_file(prefix, MESSAGE, [], now=1000.0)
    assert from_bytes[1:] == from_file[1:] == (DOMAIN, [])
    # Ed25519 signatures are deterministic, as RSA PKCS#1 v1.5 ones are.
    assert from_bytes[0] == from_file[0]
    signed = b"".join(from_bytes[0]) + prefix + MESSAGE
    assert verify_all(signed, published(key_dir)) == [(DOMAIN, "ed", True), (DOMAIN, "rs", True)]

def test_large_body_is_hashed_in_chunks(tmp_path, key_dir):
    body = b"".join(b"line %d with  spaces \r\n" % i for i in range(20000))
    content = MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + body
    signer = S.Signer(K.KeyStore(key_dir, selectors=("ed",)), sync_io)
    lines, _d, _p = signer.sign_file(b"", write(tmp_path, content), [])
    assert verify_all(b"".join(lines) + content, published(key_dir)) == [(DOMAIN, "ed", True)]


def test_envelope_domain_when_from_has_no_key(tmp_path, key_dir):
    content = MESSAGE.replace(b"alice@example.test", b"alice@other.example")
    signer = S.Signer(K.KeyStore(key_dir), sync_io)
    lines, domain, _p = signer.sign_file(b"", write(tmp_path, content), ["example.test"])
    assert domain == DOMAIN and len(lines) == 2
    lines, domain, _p = signer.sign_file(b"", write(tmp_path, content), ["nokeys.example"])
    assert (lines, domain) == ([], "")


def test_pinned_selectors_and_a_missing_key(key_dir):
    store = K.KeyStore(key_dir, selectors=("rs", "gone"))
    keys, problems = store.keys_for(DOMAIN)
    assert [k.selector for k in keys] == ["rs"]
    assert len(problems) == 1 and "gone.key" in problems[0]
    per_domain = K.KeyStore(key_dir, selectors=("gone",), domain_selectors={DOMAIN: ("ed",)})
    assert [k.selector for k in per_domain.keys_for(DOMAIN)[0]] == ["ed"]


# -- the submission check ----------------------------------------------------------------

def test_submission_check_adds_signatures_below_the_added_fields(tmp_path, key_dir):
    txn = Transaction(sender="alice@example.test")
    txn.message = SimpleNamespace(queue_id="Q1", path=write(tmp_path, MESSAGE))
    txn.add_header("Message-ID", "<Q1@mx.example.test>")
    check = S.DKIMSigning(S.Signer(K.KeyStore(key_dir), sync_io, Clock()))
    with capturedLogs() as events:
        assert result(check.on_data(LOGGED_IN, txn)) is None
    assert len(txn.headers) == 3 and txn.headers[1].startswith(b"DKIM-Signature:")
    text = [e["log_format"].format(**e) for e in events]
    assert any("Q1: dkim: signed d=example.test (s=ed a=ed25519-sha256, s=rs a=rsa-sha256)" in t
               for t in text), text
    stored = b"".join(txn.headers) + MESSAGE
    assert [ok for _d, _s, ok in verify_all(stored, published(key_dir))] == [True, True]


def test_broken_key_leaves_the_mail_unsigned_with_an_error(tmp_path, key_dir):
    with open(K.key_path(key_dir, DOMAIN, "rs"), "wb") as f:
        f.write(b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    txn = Transaction(sender="alice@example.test")
    txn.message = SimpleNamespace(queue_id="Q2", path=write(tmp_path, MESSAGE))
    check = S.DKIMSigning(S.Signer(K.KeyStore(key_dir, selectors=("rs",)), sync_io))
    with capturedLogs() as events:
        assert result(check.on_data(LOGGED_IN, txn)) is None
    assert txn.headers == []
    errors = [e["log_format"].format(**e) for e in events if e["log_level"].name == "error"]
    assert any("Q2: dkim: key for example.test unusable" in t for t in errors), errors
    assert any("Q2: dkim: not signed" in t for t in errors), errors


def test_signing_crash_leaves_the_mail_unsigned(tmp_path, key_dir):
    def failing_io(f, *a, **kw):
        return defer.fail(RuntimeError("pool stopped"))

    txn = Transaction(sender="alice@example.test")
    txn.message = SimpleNamespace(queue_id="Q3", path=write(tmp_path, MESSAGE))
    with capturedLogs():
        assert result(S.DKIMSigning(S.Signer(K.KeyStore(key_dir), failing_io))
                      .on_data(LOGGED_IN, txn)) is None
    assert txn.headers == []


# -- forwarded copies ----------------------------------------------------------------------

def test_forward_signed_for_the_forwarding_domain(tmp_path, key_dir):
    """Mail from outside forwarded by a local address: d= the local domain."""
    content = MESSAGE.replace(b"alice@example.test", b"friend@elsewhere.example")
    message = Message("Q4", "friend@elsewhere.example", write(tmp_path, content),
                      prefix=b"Received: by mx.example.test; today\r\n")
    signer = S.Signer(K.KeyStore(key_dir), sync_io)
    copy = result(signer.sign_forward(message, ["fwd@example.test"]))
    assert copy.prefix.startswith(message.prefix) and copy.prefix.count(b"DKIM-Signature") == 2
    assert [ok for _d, _s, ok in verify_all(copy.prefix + content, published(key_dir))] == \
        [True, True]


@pytest.mark.parametrize("from_domain", [b"example.test", b"sub.example.test"])
def test_forward_never_vouches_for_an_aligned_from(tmp_path, key_dir, from_domain):
    """From: our own (organisational) domain arriving from outside: not signed."""
    content = MESSAGE.replace(b"example.test", from_domain, 1)
    message = Message("Q5", "x@elsewhere.example", write(tmp_path, content))
    signer = S.Signer(K.KeyStore(key_dir), sync_io)
    assert result(signer.sign_forward(message, ["fwd@example.test"])) is message


def test_forward_signing_can_be_off(tmp_path, key_dir):
    message = Message("Q6", "x@elsewhere.example", write(tmp_path, MESSAGE))
    signer = S.Signer(K.KeyStore(key_dir), sync_io, forwarded=False)
    assert result(signer.sign_forward(message, ["fwd@example.test"])) is message


def test_key_files_are_read_again_only_when_changed(key_dir, pems):
    store = K.KeyStore(key_dir)
    first = store.keys_for(DOMAIN)[0]
    assert store.keys_for(DOMAIN)[0][0] is first[0]
    path = K.key_path(key_dir, DOMAIN, "ed")
    os.unlink(path)
    K.write_key(path, K.generate("ed25519"))
    again = store.keys_for(DOMAIN)[0]
    assert again[0].public != first[0].public


def test_unauthenticated_sessions_are_not_signed(tmp_path, key_dir):
    txn = Transaction(sender="alice@example.test")
    txn.message = SimpleNamespace(queue_id="Q7", path=write(tmp_path, MESSAGE))
    check = S.DKIMSigning(S.Signer(K.KeyStore(key_dir), sync_io))
    assert result(check.on_data(SimpleNamespace(authenticated=False), txn)) is None
    assert txn.headers == []


def test_submission_listeners_sign_last():
    """The signing check comes after SubmissionHeaders (it signs what that adds)."""
    from mailserver.listeners import _submission_checks
    from mailserver.pipeline.submission import SubmissionHeaders

    config = SimpleNamespace(submission=SimpleNamespace(check_from_header=True,
                                                        send_as_anyone=()),
                             server=SimpleNamespace(hostname="mx.example.test"))
    parts = SimpleNamespace(config=config, rate_limiter=None, reactor=Clock(), signer=object())
    checks = _submission_checks(parts, None)
    assert isinstance(checks[-2], SubmissionHeaders) and isinstance(checks[-1], S.DKIMSigning)
    parts.signer = None
    assert not any(isinstance(c, S.DKIMSigning) for c in _submission_checks(parts, None))


# -- no thread hop without a key ------------------------------------------------------------

def test_no_key_no_thread_hop(tmp_path, key_dir):
    """Submission and forwards skip the I/O pool when no candidate domain has a key."""
    from mailserver.received import HeaderScanner

    hops = []

    def counting_io(f, *a, **kw):
        hops.append(f)
        return sync_io(f, *a, **kw)

    clock = Clock()
    signer = S.Signer(K.KeyStore(key_dir, clock=clock.seconds), counting_io)
    check = S.DKIMSigning(signer)

    def submit(sender, from_line):
        content = MESSAGE.replace(b"From: Alice <alice@example.test>", from_line)
        assert content != MESSAGE
        txn = Transaction(sender=sender)
        txn.message = SimpleNamespace(queue_id="Q8", path=write(tmp_path, content))
        txn.scanner = HeaderScanner(keep=("from",))
        txn.scanner.feed(content)
        assert result(check.on_data(LOGGED_IN, txn)) is None
        return len(txn.headers)

    assert submit("a@nokeys.example", b"From: a@nokeys.example") == 0 and hops == []
    assert submit("a@nokeys.example", b"From: A <a@Example.Test>") == 2 and len(hops) == 1
    assert submit("a@example.test", b"From: a@nokeys.example") == 2 and len(hops) == 2
    message = Message("Q9", "x@elsewhere.example", write(tmp_path, MESSAGE))
    assert result(signer.sign_forward(message, ["fwd@nokeys.example"])) is message
    assert len(hops) == 2
    # A domain's first key signs once the listing is older than LISTING_TTL.
    K.write_key(K.key_path(key_dir, "nokeys.example", "ed"), K.generate("ed25519"))
    assert submit("a@nokeys.example", b"From: a@nokeys.example") == 0
    clock.advance(K.KeyStore.LISTING_TTL)
    assert submit("a@nokeys.example", b"From: a@nokeys.example") == 1 and len(hops) == 3


def test_may_sign_follows_configured_selectors(key_dir):
    assert K.KeyStore(key_dir, selectors=("ed",)).may_sign("nokeys.example")  # listed: try
    store = K.KeyStore(key_dir, domain_selectors={"other.example": ("ed",)})
    assert store.may_sign("other.example") and store.may_sign("EXAMPLE.test.")
    assert not store.may_sign("nokeys.example")
    assert not K.KeyStore(key_dir + "/missing").may_sign(DOMAIN)
