"""The submission pipeline: AUTH, sender ownership, rate limits and the RFC 6409 header fixes."""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import email.utils
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailserver import reply as R
from mailserver.delivery.recipients import Target
from mailserver.directory.cred import DirectoryChecker
from mailserver.directory.interfaces import Account
from mailserver.errors import DirectoryUnavailable
from mailserver.pipeline.acceptance import KEPT_HEADERS
from mailserver.pipeline.auth import Authenticator
from mailserver.pipeline.session import Session, Transaction
from mailserver.pipeline.submission import RateLimit, SenderOwnership, SubmissionHeaders
from mailserver.received import HeaderScanner
from mailserver.sasl import Credentials
from mailserver.sansio.smtp_server import Mode
from mailserver.throttle import LoginThrottle, RateLimiter, RateLimits

from tests.unit.test_protocol_smtp import Harness, replies


# -- helpers -------------------------------------------------------------------

def result(coro_or_d):
    """The result of a coroutine or Deferred that must have fired already."""
    d = defer.ensureDeferred(coro_or_d) if not isinstance(coro_or_d, defer.Deferred) else coro_or_d
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def code(reply):
    """``"553 5.7.1"`` for a reply."""
    return f"{reply.code} {reply.lines()[0].split(' ')[0]}"


def fired(d):
    """Whether ``d`` has a result yet (without consuming it)."""
    return d.called


def session(login=None, senders=(), client="192.0.2.7"):
    s = Session(listener="submission", kind="submission", hostname="mx.example.test",
                client_ip=client, client_key=client)
    if login is not None:
        s.login = login
        s.senders = frozenset(senders)
    return s


ALICE = dict(login="alice", senders={"alice@example.test", "sales@example.test"})


class AuthDirectory:
    """A directory whose canonical logins differ from what users type; ``pending``
    makes ``authenticate`` answer with a Deferred the test fires."""

    def __init__(self):
        # typed login (lower-case) -> (canonical login, password)
        self.accounts = {"alice@example.test": ("alice", "secret")}
        self.senders = {"alice": {"Alice@Example.TEST", "sales@example.test"}}
        self.calls = []
        self.down = False
        self.senders_down = False
        self.hold = False
        self.pending = []

    def authenticate(self, login, password):
        self.calls.append(("authenticate", login))
        if self.down:
            raise DirectoryUnavailable("fake outage")
        entry = self.accounts.get(login.lower())
        account = None
        if entry is not None and entry[1] == password:
            account = Account(login=entry[0], address=login.lower())
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, account))
            return d
        return defer.succeed(account)

    def senders_for(self, login):
        self.calls.append(("senders_for", login))
        if self.senders_down:
            raise DirectoryUnavailable("fake outage")
        return defer.succeed(frozenset(self.senders.get(login, ())))


class AuthSetup:
    def __init__(self, max_failures=3):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.directory = AuthDirectory()
        self.throttle = LoginThrottle(self.clock, base_delay=2.0, max_delay=15.0,
                                      max_failures=max_failures)
        self.auth = Authenticator(DirectoryChecker(self.directory), self.throttle,
                                  self.directory, self.clock)
        self.session = session()

    def attempt(self, login, password, sess=None):
        return defer.ensureDeferred(self.auth.authenticate(
            sess or self.session, Credentials("PLAIN", login, password)))

    def failed_after(self, d, delay):
        """Advance to just before ``delay``: not fired; then to ``delay``: fired."""
        self.clock.advance(delay - 0.001)
        assert not fired(d)
        self.clock.advance(0.001)
        return result(d)


@pytest.fixture
def a():
    return AuthSetup()


# -- Authenticator -------------------------------------------------------------

def test_auth_success_sets_canonical_login_and_senders(a):
    """A right password answers 235 at once and the session gets the directory's login and its lower-cased senders."""
    reply = result(a.attempt("alice@example.test", "secret"))
    assert reply is R.AUTH_OK
    assert a.session.login == "alice"
    assert a.session.authenticated
    assert a.session.senders == frozenset({"alice@example.test", "sales@example.test"})
    assert ("senders_for", "alice") in a.directory.calls


@pytest.mark.parametrize("login, password", [
    ("alice@example.test", "wrong"),
    ("nobody@example.test", "secret"),
])
def test_auth_failure_after_exactly_the_throttle_delay(a, login, password):
    """A wrong password and an unknown login both answer 535 exactly at the throttle's delay."""
    d = a.attempt(login, password)
    assert a.failed_after(d, 2.0) is R.AUTH_FAILED
    assert not a.session.authenticated
    assert a.throttle.clients.count(a.session.client_key, a.clock.seconds()) == 1


def test_auth_failure_delay_counts_from_the_start_of_the_attempt():
    """A slow directory answer for a wrong password does not lengthen the delay: both failures answer at the same time."""
    fast = AuthSetup()
    unknown = fast.attempt("nobody@example.test", "secret")
    slow = AuthSetup()
    slow.directory.hold = True
    wrong = slow.attempt("alice@example.test", "wrong")
    slow.clock.advance(0.5)
    [(pending, account)] = slow.directory.pending
    assert account is None
    assert not fired(wrong)
    pending.callback(account)  # the bind answered after half a second
    assert not fired(wrong)
    assert slow.failed_after(wrong, 1.5) is R.AUTH_FAILED  # 0.5 + 1.5: 2.0 from the start
    assert fast.failed_after(unknown, 2.0) is R.AUTH_FAILED


def test_auth_directory_outage_is_temporary_and_not_a_failure(a):
    """When the directory is down the answer is 454 4.7.0 at once, and no failure is counted."""
    a.directory.down = True
    reply = result(a.attempt("alice@example.test", "secret"))
    assert reply is R.AUTH_TEMPORARY
    assert code(reply) == "454 4.7.0"
    assert len(a.throttle.clients) == 0 and len(a.throttle.accounts) == 0
    assert not a.session.authenticated


def test_auth_senders_outage_is_temporary(a):
    """When the senders cannot be looked up the answer is 454 and the session stays unauthenticated."""
    a.directory.senders_down = True
    assert result(a.attempt("alice@example.test", "secret")) is R.AUTH_TEMPORARY
    assert not a.session.authenticated
    assert a.session.login is None and a.session.senders == frozenset()
    assert len(a.throttle.clients) == 0


def test_auth_blocked_after_max_failures(a):
    """The max_failures-th failure answers 421 4.7.0, and later tries are refused at once even with the right password."""
    assert a.failed_after(a.attempt("alice@example.test", "x1"), 2.0) is R.AUTH_FAILED
    assert a.failed_after(a.attempt("alice@example.test", "x2"), 4.0) is R.AUTH_FAILED
    third = a.failed_after(a.attempt("alice@example.test", "x3"), 8.0)
    assert third is R.LOGIN_BLOCKED
    assert code(third) == "421 4.7.0"
    a.directory.calls.clear()
    assert result(a.attempt("alice@example.test", "secret")) is R.LOGIN_BLOCKED
    assert a.directory.calls == []  # the directory is not even asked
    assert not a.session.authenticated


def test_auth_blocked_account_from_another_client(a):
    """An account blocked by failures from one client is refused from another client too."""
    for n, delay in enumerate((2.0, 4.0, 8.0)):
        a.failed_after(a.attempt("alice@example.test", f"x{n}"), delay)
    other = session(client="198.51.100.9")
    assert result(a.attempt("Alice@Example.Test", "secret", other)) is R.LOGIN_BLOCKED
    assert not other.authenticated


def test_auth_success_takes_back_only_its_own_attempt():
    """A successful login is not counted, but earlier failures stay (a valid
    account must not wipe the guesses made from its address): the next
    failure waits as the third."""
    a = AuthSetup(max_failures=10)
    a.failed_after(a.attempt("alice@example.test", "x1"), 2.0)
    a.failed_after(a.attempt("alice@example.test", "x2"), 4.0)
    assert result(a.attempt("alice@example.test", "secret")) is R.AUTH_OK
    assert a.failed_after(a.attempt("alice@example.test", "x3"), 8.0) is R.AUTH_FAILED


def test_auth_empty_password_fails_without_asking_the_directory(a):
    """An empty password is 535 after the delay and never reaches the directory (no anonymous bind)."""
    d = a.attempt("alice@example.test", "")
    assert a.failed_after(d, 2.0) is R.AUTH_FAILED
    assert a.directory.calls == []


# -- SenderOwnership -------------------------------------------------------------

def txn_with(sender="alice@example.test", header=b""):
    txn = Transaction(sender=sender)
    txn.scanner = HeaderScanner(keep=KEPT_HEADERS)
    if header:
        txn.scanner.feed(header + b"\r\nbody\r\n")
    return txn


def mail(check, sess, sender):
    return result(check.on_mail(sess, txn_with(sender)))


def data(check, sess, header, sender="alice@example.test"):
    return result(check.on_data(sess, txn_with(sender, header)))


def test_owned_envelope_sender_ok():
    """An envelope sender the login owns is accepted."""
    assert mail(SenderOwnership(), session(**ALICE), "alice@example.test") is None
    assert mail(SenderOwnership(), session(**ALICE), "sales@example.test") is None


def test_not_owned_envelope_sender_refused():
    """An envelope sender the login does not own is 553 5.7.1 at MAIL."""
    reply = mail(SenderOwnership(), session(**ALICE), "bob@example.test")
    assert reply is R.SENDER_NOT_OWNED
    assert code(reply) == "553 5.7.1"


def test_envelope_sender_case_insensitive():
    """Ownership ignores case in the envelope sender."""
    assert mail(SenderOwnership(), session(**ALICE), "ALICE@Example.Test") is None


def test_null_sender_allowed():
    """The null reverse-path is allowed (vacation replies, delivery reports)."""
    assert mail(SenderOwnership(), session(**ALICE), "") is None


def test_send_as_anyone_exempt():
    """A login listed in send_as_anyone may use any envelope sender and From:."""
    check = SenderOwnership(send_as_anyone={"Alice"})
    assert mail(check, session(**ALICE), "ceo@example.test") is None
    assert data(check, session(**ALICE), b"From: ceo@example.test\r\n") is None


def test_unauthenticated_session_not_checked():
    """Without a login (port 25 mail from outside) neither sender nor From: is checked."""
    check = SenderOwnership()
    assert mail(check, session(), "someone@example.org") is None
    assert data(check, session(), b"From: someone@example.org\r\n") is None


def test_from_header_owned_ok():
    """A From: naming an owned address, with a display name and any case, is accepted."""
    assert data(SenderOwnership(), session(**ALICE), b"From: Alice <ALICE@example.test>\r\n") is None


def test_from_header_not_owned_refused():
    """A From: naming an address the login does not own is 550 5.7.1 after the data."""
    reply = data(SenderOwnership(), session(**ALICE), b"From: Bob <bob@example.test>\r\n")
    assert reply is R.FROM_NOT_OWNED
    assert code(reply) == "550 5.7.1"


def test_from_header_checked_for_null_sender():
    """The null sender is allowed at MAIL but its From: is still checked."""
    reply = data(SenderOwnership(), session(**ALICE), b"From: bob@example.test\r\n", sender="")
    assert reply is R.FROM_NOT_OWNED


def test_from_header_two_addresses_one_not_owned():
    """A From: with two addresses is refused when either is not owned."""
    check = SenderOwnership()
    header = b"From: alice@example.test, Bob <bob@example.test>\r\n"
    assert data(check, session(**ALICE), header) is R.FROM_NOT_OWNED
    header = b"From: alice@example.test, Sales <sales@example.test>\r\n"
    assert data(check, session(**ALICE), header) is None


def test_from_header_quoted_comma_in_display_name():
    """A display name with a quoted comma is one address, not two."""
    header = b'From: "Smith, Alice" <alice@example.test>\r\n'
    assert data(SenderOwnership(), session(**ALICE), header) is None


def test_from_header_folded():
    """A folded From: is read whole: the address on the continuation line counts."""
    check = SenderOwnership()
    ok = b'From: "Smith, Alice"\r\n\t<alice@example.test>\r\nSubject: x\r\n'
    assert data(check, session(**ALICE), ok) is None
    bad = b"From: alice@example.test,\r\n bob@example.test\r\nSubject: x\r\n"
    assert data(check, session(**ALICE), bad) is R.FROM_NOT_OWNED


def test_from_header_name_case_insensitive():
    """The From field is found whatever the case of its name."""
    assert data(SenderOwnership(), session(**ALICE), b"FROM: bob@example.test\r\n") \
        is R.FROM_NOT_OWNED


def test_from_header_in_body_ignored():
    """A From: line in the body is not a header and is not checked."""
    txn = txn_with()
    txn.scanner.feed(b"Subject: x\r\n\r\nFrom: bob@example.test\r\n")
    assert result(SenderOwnership().on_data(session(**ALICE), txn)) is None


def test_from_header_with_no_address_refused():
    """A From: that names no address is refused (nobody owns it)."""
    assert data(SenderOwnership(), session(**ALICE), b"From: undisclosed\r\n") \
        is R.FROM_NOT_OWNED


def test_no_from_header_ok():
    """A message without From: claims nobody and is accepted."""
    assert data(SenderOwnership(), session(**ALICE), b"Subject: hi\r\n") is None


def test_check_from_false_skips_the_header():
    """With check_from=False only the envelope sender is checked."""
    check = SenderOwnership(check_from=False)
    assert data(check, session(**ALICE), b"From: bob@example.test\r\n") is None
    assert mail(check, session(**ALICE), "bob@example.test") is R.SENDER_NOT_OWNED


def test_from_header_longer_than_the_scanner_keeps_is_not_a_bypass():
    """A From: folded beyond the scanner's value limit cannot hide an unowned address past the limit."""
    padding = b" x\r\n" * 5000  # a comment folded over many short lines
    header = b"From: alice@example.test (\r\n" + padding + b" ), bob@example.test\r\n"
    unfolded = header[len(b"From:"):].replace(b"\r\n", b"").decode()
    assert [a for _n, a in email.utils.getaddresses([unfolded])] == [
        "alice@example.test", "bob@example.test"]  # what a reader of the message sees
    assert data(SenderOwnership(), session(**ALICE), header) is R.FROM_NOT_OWNED


def test_eleventh_from_header_is_checked():
    """Every From: field is checked, however many there are."""
    header = b"From: alice@example.test\r\n" * 10 + b"From: bob@example.test\r\n"
    assert data(SenderOwnership(), session(**ALICE), header) is R.FROM_NOT_OWNED


# -- RateLimit -------------------------------------------------------------------

def rate_setup(**limits):
    clock = Clock()
    clock.advance(1_000_000)
    values = dict(messages_per_hour=2, messages_per_day=0, recipients_per_hour=3,
                  recipients_per_day=0)
    values.update(limits)
    limiter = RateLimiter(clock, RateLimits(**values))
    return clock, limiter, RateLimit(limiter)


def accepted_txn(n):
    txn = Transaction(sender="alice@example.test")
    txn.targets = [Target(f"r{i}@example.org") for i in range(n)]
    return txn


def test_rate_limit_messages_at_mail():
    """The (N+1)th MAIL of a login in the hour is 450 4.7.1."""
    _clock, _limiter, check = rate_setup()
    sess = session(**ALICE)
    for _ in range(2):
        assert result(check.on_mail(sess, Transaction())) is None
    reply = result(check.on_mail(sess, Transaction()))
    assert reply is R.RATE_LIMITED
    assert code(reply) == "450 4.7.1"


def test_rate_limit_window_slides():
    """Once the hour has passed the login may send again."""
    clock, _limiter, check = rate_setup()
    sess = session(**ALICE)
    for _ in range(2):
        result(check.on_mail(sess, Transaction()))
    assert result(check.on_mail(sess, Transaction())) is R.RATE_LIMITED
    clock.advance(3600 + 120)
    assert result(check.on_mail(sess, Transaction())) is None


def test_rate_limit_recipients_at_rcpt():
    """A recipient past the recipients limit is refused at RCPT, counting earlier ones."""
    _clock, _limiter, check = rate_setup()
    sess = session(**ALICE)
    target = Target("x@example.org")
    assert result(check.on_rcpt(sess, accepted_txn(0), target)) is None  # one earlier
    txn = accepted_txn(0)
    for _ in range(2):
        assert result(check.on_rcpt(sess, txn, target)) is None
        txn.targets.append(target)
    assert result(check.on_rcpt(sess, txn, target)) is R.RATE_LIMITED


def test_rate_limit_counts_parallel_sessions_at_once():
    """Two sessions of one login cannot both pass MAIL on the last message of
    the hour, nor share out more recipients than the limit: both are counted
    when accepted, not after the data."""
    _clock, _limiter, check = rate_setup(messages_per_hour=1, recipients_per_hour=2)
    first, second = session(**ALICE), session(**ALICE)
    assert result(check.on_mail(first, Transaction())) is None
    assert result(check.on_mail(second, Transaction())) is R.RATE_LIMITED
    target = Target("x@example.org")
    assert result(check.on_rcpt(first, accepted_txn(0), target)) is None
    assert result(check.on_rcpt(second, accepted_txn(0), target)) is None
    assert result(check.on_rcpt(first, accepted_txn(1), target)) is R.RATE_LIMITED


def test_rate_limit_counts_requests_as_accepted():
    """An accepted MAIL counts one message and each accepted RCPT one
    recipient; a refused one counts nothing."""
    _clock, limiter, check = rate_setup(recipients_per_hour=3)
    sess = session(**ALICE)
    result(check.on_mail(sess, Transaction()))
    for _ in range(4):
        result(check.on_rcpt(sess, accepted_txn(0), Target("x@example.org")))
    usage = result(limiter.usage("alice"))
    assert (usage["messages_hour"], usage["recipients_hour"]) == (1, 3)


def test_rate_limit_unauthenticated_not_limited():
    """Unauthenticated sessions are neither limited nor counted."""
    _clock, limiter, check = rate_setup(messages_per_hour=1, recipients_per_hour=1)
    anon = session()
    for _ in range(3):
        assert result(check.on_mail(anon, Transaction())) is None
        assert result(check.on_rcpt(anon, accepted_txn(5), Target("x@example.org"))) is None
        result(check.accepted(anon, accepted_txn(5)))
    assert result(limiter.snapshot()) == {}


# -- SubmissionHeaders -----------------------------------------------------------

def utc_seconds(dt):
    """Epoch seconds of a parsed Date ("-0000" parses naive: it is UTC, not local time)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def headers_txn(header: bytes):
    txn = txn_with(header=header)
    txn.message = SimpleNamespace(queue_id="QID123")
    return txn


def test_submission_headers_added_when_missing():
    """Message-ID <queueid@host> and Date are added when the client wrote neither."""
    clock = Clock()
    clock.advance(1_700_000_000)
    txn = headers_txn(b"From: alice@example.test\r\nSubject: x\r\n")
    assert result(SubmissionHeaders("mx.example.test", clock).on_data(session(**ALICE), txn)) \
        is None
    assert len(txn.headers) == 2
    assert all(line.endswith(b"\r\n") and line.count(b"\r\n") == 1 for line in txn.headers)
    content = b"".join(txn.headers) + b"From: alice@example.test\r\nSubject: x\r\n\r\nbody\r\n"
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg["Message-ID"] == "<QID123@mx.example.test>"
    assert utc_seconds(msg["Date"].datetime) == 1_700_000_000
    assert not msg.defects
    assert not msg["Date"].defects and not msg["Message-ID"].defects
    assert utc_seconds(email.utils.parsedate_to_datetime(str(msg["Date"]))) == 1_700_000_000


def test_submission_headers_kept_when_present():
    """A client's own Message-ID and Date are kept, whatever the case of the field names."""
    clock = Clock()
    txn = headers_txn(b"message-id: <own@client.example>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n")
    result(SubmissionHeaders("mx.example.test", clock).on_data(session(**ALICE), txn))
    assert txn.headers == []


def test_submission_headers_only_the_missing_one():
    """Only the missing field is added."""
    clock = Clock()
    txn = headers_txn(b"Message-Id: <own@client.example>\r\n")
    result(SubmissionHeaders("mx.example.test", clock).on_data(session(**ALICE), txn))
    assert [line.split(b":")[0] for line in txn.headers] == [b"Date"]


# -- through the adapter ---------------------------------------------------------

def submission_harness(tmp_path, hide_client=False):
    h = Harness(tmp_path, mode=Mode.SUBMISSION, name="submission",
                auth_mechanisms=("PLAIN", "LOGIN"), auth_requires_tls=False)
    h.clock.advance(1_700_000_000)
    h.directory.passwords["alice@example.test"] = "secret"
    h.throttle = LoginThrottle(h.clock)
    h.pipeline.authenticator = Authenticator(DirectoryChecker(h.directory), h.throttle,
                                             h.directory, h.clock)
    h.pipeline.checks = (SenderOwnership(), SubmissionHeaders("mx.example.test", h.clock))
    h.pipeline.hide_client = hide_client
    return h


def plain(login, password):
    return base64.b64encode(b"\0" + login + b"\0" + password)


def submit(h, body=b"From: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n"):
    p, t = h.connect("192.0.2.7")
    p.dataReceived(b"EHLO laptop.example\r\nAUTH PLAIN " + plain(b"alice@example.test", b"secret")
                   + b"\r\n")
    assert replies(t)[-1] == "235 2.7.0"
    p.dataReceived(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert replies(t) == ["250 2.1.0", "250 2.1.5", "354 End d"]
    p.dataReceived(body + b".\r\n")
    return p, t


def test_submission_end_to_end(tmp_path):
    """AUTH PLAIN, MAIL, RCPT and DATA store a message with ESMTPA, Message-ID, Date and Return-Path."""
    h = submission_harness(tmp_path)
    p, t = submit(h)
    out = replies(t)
    assert out == ["250 2.0.0"]
    [msg] = h.messages("bob")
    assert msg["Return-Path"] == "<alice@example.test>"
    assert "with ESMTPA id" in msg["Received"]
    assert "192.0.2.7" in msg["Received"]
    queue_id = msg["Received"].split(" id ")[1].split()[0].rstrip(";")
    assert msg["Message-ID"] == f"<{queue_id}@mx.example.test>"
    assert utc_seconds(email.utils.parsedate_to_datetime(msg["Date"])) == 1_700_000_000
    keys = [k.lower() for k in msg.keys()]
    assert keys.index("received") < keys.index("message-id") < keys.index("from")


def test_submission_hide_client(tmp_path):
    """With hide_client the Received header names neither the client's address nor its HELO."""
    h = submission_harness(tmp_path, hide_client=True)
    submit(h)
    [msg] = h.messages("bob")
    received = msg["Received"]
    assert "192.0.2.7" not in received and "laptop" not in received
    assert received.startswith("by mx.example.test (mailserver) with ESMTPA id ")


def test_submission_not_owned_sender_refused_over_the_wire(tmp_path):
    """Through the adapter, a sender the login does not own is 553 and a foreign From: 550; nothing is stored."""
    h = submission_harness(tmp_path)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nAUTH PLAIN " + plain(b"alice@example.test", b"secret") + b"\r\n"
                   b"MAIL FROM:<bob@example.test>\r\n")
    assert replies(t)[-2:] == ["235 2.7.0", "553 5.7.1"]
    p.dataReceived(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                   b"DATA\r\nFrom: bob@example.test\r\n\r\nx\r\n.\r\n")
    assert replies(t)[-1] == "550 5.7.1"
    assert h.messages("bob") == []


def test_submission_wrong_password_over_the_wire(tmp_path):
    """Through the adapter a wrong password is 535 after the throttle delay, and MAIL still needs AUTH."""
    h = submission_harness(tmp_path)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nAUTH PLAIN " + plain(b"alice@example.test", b"bad") + b"\r\n")
    t.clear()
    h.clock.advance(1.9)
    assert t.value() == b""
    h.clock.advance(0.1)
    assert replies(t) == ["535 5.7.8"]
    p.dataReceived(b"MAIL FROM:<alice@example.test>\r\n")
    assert replies(t) == ["530 5.7.0"]


def test_hide_client_only_for_authenticated_sessions(tmp_path):
    """hide_client leaves the client's address in the Received line of unauthenticated mail."""
    h = Harness(tmp_path)
    h.pipeline.hide_client = True
    p, t = h.connect("192.0.2.7")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    [msg] = h.messages("alice")
    assert msg["Received"].startswith("from c (unknown [192.0.2.7])")
    assert "with ESMTP id" in msg["Received"]


def test_unterminated_from_in_last_bdat_chunk_is_checked(tmp_path):
    """BDAT content may end without a line end: a forged From: as its last,
    unterminated line is still checked (550 5.7.1), and nothing is stored."""
    h = submission_harness(tmp_path)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nAUTH PLAIN " + plain(b"alice@example.test", b"secret") + b"\r\n"
                   b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n")
    content = b"Subject: pay this invoice\r\nFrom: Boss <boss@example.test>"
    p.dataReceived(b"BDAT %d LAST\r\n" % len(content) + content)
    assert replies(t)[-1] == "550 5.7.1"
    assert h.messages("bob") == []


def test_content_without_final_line_end_is_stored_with_one(tmp_path):
    """A BDAT message whose content stops mid-line is stored with the line
    ended, and its unterminated Message-ID is seen (none is added)."""
    h = submission_harness(tmp_path)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nAUTH PLAIN " + plain(b"alice@example.test", b"secret") + b"\r\n"
                   b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n")
    content = b"From: alice@example.test\r\nMessage-ID: <own@example.test>"
    p.dataReceived(b"BDAT %d LAST\r\n" % len(content) + content)
    assert replies(t)[-1] == "250 2.0.0"
    [msg] = h.messages("bob")
    assert msg.get_all("Message-ID") == ["<own@example.test>"]
    path = next((tmp_path / "mail" / "example.test" / "bob" / "new").iterdir())
    assert path.read_bytes().endswith(b"Message-ID: <own@example.test>\n")
