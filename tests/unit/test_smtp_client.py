"""Tests for mailserver.sansio.smtp_client: the sans-IO outbound SMTP/LMTP client.

Server replies are scripted bytes; the assertions are on the commands the
client writes, its events and the per-recipient results.  The last tests pair
the client with the real server core (mailserver.sansio.smtp_server) in memory.
"""

from __future__ import annotations

import base64
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver import reply as R
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.sansio._client_commands import DotStuffer, orcpt, sendable, xtext
from mailserver.sansio._client_replies import (
    MalformedReply,
    RawReply,
    ReplyReader,
    make_reply,
    parse_extensions,
)
from mailserver.sansio import smtp_events as sev
from mailserver.sansio.lines import DotReader
from mailserver.sansio.smtp_client import (
    NEED_DATA,
    ClientResult,
    Closed,
    MessageDone,
    NeedTLS,
    Phase,
    SendContent,
    SMTPClientConnection,
    UsageError,
)
from mailserver.sansio.smtp_server import Limits, Mode, SMTPServerConnection
from mailserver.reply import Reply

GREETING = b"220 mx.example.org ESMTP test\r\n"


def ehlo(*extensions: str, name: str = "mx.example.org") -> bytes:
    return Reply(250, None, "\n".join([name, *extensions])).to_bytes()


FULL = ehlo("PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN",
            "SMTPUTF8")
PLAIN = ehlo("SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES")  # no PIPELINING


def message(*rcpts: str, **kwargs) -> OutboundMessage:
    recipients = tuple(OutboundRecipient(r) if isinstance(r, str) else r
                       for r in (rcpts or ("bob@example.org",)))
    kwargs.setdefault("size", 1000)
    return OutboundMessage(queue_id="Q1", sender=kwargs.pop("sender", "alice@example.test"),
                           recipients=recipients, content_path="/nonexistent", **kwargs)


class Session:
    """A client and what it wrote, fed with scripted server bytes."""

    def __init__(self, msg: Optional[OutboundMessage] = None, **kwargs) -> None:
        kwargs.setdefault("tls_available", False)
        kwargs.setdefault("require_tls", False)
        kwargs.setdefault("auth", None)
        self.client = SMTPClientConnection("client.example.test", message=msg or message(),
                                           **kwargs)
        self.events: list = []
        self.sent = b""

    def feed(self, data: bytes = b"") -> bytes:
        """Feed ``data``; return what the client wrote in response."""
        if data:
            self.client.receive_data(data)
        while True:
            event = self.client.next_event()
            if event is NEED_DATA:
                break
            self.events.append(event)
        out = self.client.data_to_send()
        self.sent += out
        return out

    def eof(self) -> bytes:
        self.client.receive_data(b"")
        return self.feed()

    def greet(self, extensions: bytes = FULL) -> bytes:
        assert self.feed(GREETING) == b"EHLO client.example.test\r\n"
        return self.feed(extensions)

    def content(self, data: bytes) -> bytes:
        self.client.send_content(data)
        self.client.end_content()
        return self.feed()

    @property
    def result(self) -> ClientResult:
        done = [e for e in self.events if isinstance(e, MessageDone)]
        assert len(done) == 1, self.events
        return done[0].result

    @property
    def closed(self) -> bool:
        return any(isinstance(e, Closed) for e in self.events)


def codes(result: ClientResult) -> dict:
    return {rcpt: (r.code, r.enhanced) for rcpt, r in result.replies.items()}


class GreetingAndHelloTests:
    def test_refused_greeting_answers_everyone_and_moves_on(self):
        """A 554 greeting gives 5.0.0 to all, QUIT, and says try the next host."""
        s = Session(message("a@example.org", "b@example.org"))
        assert s.feed(b"554 go away\r\n") == b"QUIT\r\n"
        assert codes(s.result) == {"a@example.org": (554, (5, 0, 0)),
                                   "b@example.org": (554, (5, 0, 0))}
        assert s.result.retry_elsewhere and s.result.connection_error.code == 554
        assert s.result.details["a@example.org"] == "554 5.0.0 go away"
        assert s.closed

    def test_greeting_421_is_temporary_without_quit(self):
        """421 closes the channel: temporary for all, no QUIT, next host."""
        s = Session()
        assert s.feed(b"421 4.3.2 busy\r\n") == b""
        assert s.result.replies["bob@example.org"].code == 421
        assert s.result.retry_elsewhere and s.closed

    def test_ehlo_5xx_falls_back_to_helo(self):
        """EHLO refused with 502: HELO, then a plain MAIL without parameters."""
        s = Session()
        s.feed(GREETING)
        assert s.feed(b"502 5.5.1 what\r\n") == b"HELO client.example.test\r\n"
        assert s.feed(b"250 mx.example.org\r\n") == b"MAIL FROM:<alice@example.test>\r\n"
        assert not s.client.esmtp and s.client.extensions == {}

    def test_helo_refused_too(self):
        """EHLO and HELO both refused: the HELO reply answers everyone."""
        s = Session()
        s.feed(GREETING)
        s.feed(b"500 no\r\n")
        assert s.feed(b"550 not you\r\n") == b"QUIT\r\n"
        assert s.result.replies["bob@example.org"].code == 550
        assert s.result.retry_elsewhere

    def test_ehlo_4xx_is_temporary(self):
        """A 4xx to EHLO does not fall back: temporary, next host."""
        s = Session()
        s.feed(GREETING)
        assert s.feed(b"451 later\r\n") == b"QUIT\r\n"
        assert codes(s.result) == {"bob@example.org": (451, (4, 0, 0))}
        assert s.result.retry_elsewhere

    def test_extensions_parsed(self):
        """EHLO keywords are upper-cased; AUTH= counts as AUTH."""
        raw = RawReply(250, ("mx", "pipelining", "SIZE 123", "AUTH PLAIN", "AUTH=LOGIN",
                             "8BITMIME"))
        ext = parse_extensions(raw)
        assert ext["PIPELINING"] == "" and ext["SIZE"] == "123" and "8BITMIME" in ext
        assert ext["AUTH"].split() == ["PLAIN", "LOGIN"]


class TransactionTests:
    def test_pipelined_transaction(self):
        """With PIPELINING, MAIL, every RCPT and DATA go in one write."""
        s = Session(message("a@example.org", "b@example.org", "c@example.org"))
        out = s.greet()
        assert out == (b"MAIL FROM:<alice@example.test> SIZE=1000\r\n"
                       b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
                       b"RCPT TO:<c@example.org>\r\nDATA\r\n")
        assert s.client.phase is Phase.MAIL
        s.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n"
               b"450 4.2.1 greylisted\r\n354 go\r\n")
        assert isinstance(s.events[-1], SendContent)
        out = s.content(b"Subject: x\r\n\r\n.hi\r\n")
        assert out == b"Subject: x\r\n\r\n..hi\r\n.\r\n"
        assert s.client.phase is Phase.DOT
        s.feed(b"250 2.0.0 queued as X\r\n")
        assert codes(s.result) == {"a@example.org": (250, (2, 0, 0)),
                                   "b@example.org": (550, (5, 1, 1)),
                                   "c@example.org": (450, (4, 2, 1))}
        assert s.result.replies["b@example.org"].text == "no such user"
        assert s.result.details["b@example.org"] == "550 5.1.1 no such user"
        assert not s.result.retry_elsewhere and s.result.connection_error is None
        assert s.client.phase is Phase.IDLE
        s.client.quit()
        assert s.feed() == b"QUIT\r\n"
        s.feed(b"221 2.0.0 bye\r\n")
        assert s.closed

    def test_lock_step_without_pipelining(self):
        """Without PIPELINING each command waits for the previous reply."""
        s = Session(message("a@example.org", "b@example.org"))
        assert s.greet(PLAIN) == b"MAIL FROM:<alice@example.test> SIZE=1000\r\n"
        assert s.feed(b"250 ok\r\n") == b"RCPT TO:<a@example.org>\r\n"
        assert s.feed(b"250 ok\r\n") == b"RCPT TO:<b@example.org>\r\n"
        assert s.feed(b"250 ok\r\n") == b"DATA\r\n"
        s.feed(b"354 go\r\n")
        s.content(b"x\r\n")
        s.feed(b"250 ok\r\n")
        assert [r.code for r in s.result.replies.values()] == [250, 250]

    def test_no_data_when_every_rcpt_refused(self):
        """Lock-step: every RCPT refused means no DATA; the connection stays usable."""
        s = Session(message("a@example.org"))
        s.greet(PLAIN)
        s.feed(b"250 ok\r\n")
        assert s.feed(b"550 5.1.1 unknown\r\n") == b""
        assert codes(s.result) == {"a@example.org": (550, (5, 1, 1))}
        assert s.client.phase is Phase.IDLE and b"DATA" not in s.sent

    def test_pipelined_data_refused_without_recipients(self):
        """Pipelined DATA after refused RCPTs gets 554: the RCPT replies stand."""
        s = Session(message("a@example.org"))
        s.greet()
        s.feed(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
        assert codes(s.result) == {"a@example.org": (550, (5, 1, 1))}
        assert s.client.phase is Phase.IDLE

    def test_pipelined_354_without_recipients_sends_empty_message(self):
        """A 354 for a transaction without recipients gets "." and is ignored."""
        s = Session(message("a@example.org"))
        s.greet()
        assert s.feed(b"250 ok\r\n550 nope\r\n354 go\r\n") == b".\r\n"
        assert not any(isinstance(e, SendContent) for e in s.events)
        s.feed(b"554 no valid recipients\r\n")
        assert s.result.replies["a@example.org"].code == 550

    @pytest.mark.parametrize("code,retry", [(451, True), (550, False)])
    def test_mail_refused_answers_everyone(self, code, retry):
        """A refused MAIL answers every recipient; 4xx says try the next host."""
        s = Session(message("a@example.org", "b@example.org"))
        s.greet()
        s.feed(b"%d %d.1.0 sender refused\r\n503 5.5.1 need MAIL\r\n"
               b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n" % (code, code // 100))
        assert [r.code for r in s.result.replies.values()] == [code, code]
        assert s.result.connection_error.code == code
        assert s.result.retry_elsewhere is retry
        assert s.client.phase is Phase.IDLE

    def test_data_refused(self):
        """A refused DATA answers the accepted recipients; refused RCPTs stand."""
        s = Session(message("a@example.org", "b@example.org"))
        s.greet()
        s.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n451 4.3.0 try later\r\n")
        assert codes(s.result) == {"a@example.org": (451, (4, 3, 0)),
                                   "b@example.org": (550, (5, 1, 1))}

    def test_duplicate_recipients_sent_once(self):
        """A recipient listed twice gets one RCPT and one result."""
        s = Session(message("a@example.org", "a@example.org"))
        out = s.greet()
        assert out.count(b"RCPT TO:<a@example.org>") == 1

    def test_null_sender(self):
        """A bounce goes out as MAIL FROM:<>."""
        s = Session(message(sender=""))
        assert s.greet(PLAIN).startswith(b"MAIL FROM:<> ")

    def test_421_during_rcpts(self):
        """A 421 mid-pipeline answers everyone still open and ends the session."""
        s = Session(message("a@example.org", "b@example.org"))
        s.greet()
        s.feed(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n")
        assert codes(s.result) == {"a@example.org": (550, (5, 1, 1)),
                                   "b@example.org": (421, (4, 3, 2))}
        assert s.result.retry_elsewhere and s.closed

    def test_connection_lost_before_dot_retries_elsewhere(self):
        """EOF while waiting for RCPT replies: temporary, next host."""
        s = Session(remote="mx.example.org[192.0.2.1]")
        s.greet()
        s.feed(b"250 ok\r\n")
        s.eof()
        reply = s.result.replies["bob@example.org"]
        assert (reply.code, reply.enhanced) == (451, (4, 4, 2))
        assert "mx.example.org[192.0.2.1]" in reply.text
        assert s.result.retry_elsewhere and s.closed

    def test_connection_lost_after_dot_does_not(self):
        """EOF after the final dot: temporary, but the mail may have arrived."""
        s = Session()
        s.greet()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.content(b"hi\r\n")
        s.eof()
        assert s.result.replies["bob@example.org"].code == 451
        assert not s.result.retry_elsewhere

    def test_early_reply_during_content(self):
        """A 552 while the content is still being sent answers the recipients."""
        s = Session()
        s.greet()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.client.send_content(b"lots of data\r\n")
        s.feed(b"552 5.3.4 too much\r\n")
        assert codes(s.result) == {"bob@example.org": (552, (5, 3, 4))}
        assert s.closed
        with pytest.raises(UsageError):
            s.client.send_content(b"more")

    def test_abort_on_timeout(self):
        """abort() answers everyone open and closes."""
        s = Session()
        s.greet()
        s.client.abort(R.REMOTE_TIMEOUT)
        s.feed()
        assert s.result.replies["bob@example.org"] == R.REMOTE_TIMEOUT
        assert s.result.retry_elsewhere and s.closed

    def test_unsolicited_421_while_idle(self):
        """A server closing an idle connection just ends the session."""
        s = Session()
        s.greet(PLAIN)
        s.feed(b"550 no\r\n")
        assert s.client.phase is Phase.IDLE
        s.feed(b"421 4.4.2 idle timeout\r\n")
        assert s.closed and len([e for e in s.events if isinstance(e, MessageDone)]) == 1

    def test_usage_errors(self):
        """Calls out of order raise UsageError, never corrupt the session."""
        s = Session()
        with pytest.raises(UsageError):
            s.client.end_content()
        with pytest.raises(UsageError):
            s.client.tls_started()
        with pytest.raises(UsageError):
            s.client.quit()

    def test_quoted_local_parts_with_spaces_are_sent(self):
        """A quoted local part may hold spaces and quoted-pairs: sent as it is."""
        s = Session(message('"john doe"@example.org', '"a\\"b"@example.org',
                            sender='"mary ann"@example.test'))
        assert s.greet() == (b'MAIL FROM:<"mary ann"@example.test> SIZE=1000\r\n'
                             b'RCPT TO:<"john doe"@example.org>\r\n'
                             b'RCPT TO:<"a\\"b"@example.org>\r\nDATA\r\n')

    def test_unsendable_recipient_refused_the_rest_sent(self):
        """A recipient that would inject a command gets 553 5.1.3 and no RCPT;
        the others are delivered in the same transaction."""
        bad = "bob@example.org>\r\nRSET"
        s = Session(message(bad, "carol@example.org", "john doe@example.org"))
        assert s.greet() == (b"MAIL FROM:<alice@example.test> SIZE=1000\r\n"
                             b"RCPT TO:<carol@example.org>\r\nDATA\r\n")
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.content(b"x\r\n")
        s.feed(b"250 2.0.0 queued\r\n")
        assert codes(s.result) == {bad: (553, (5, 1, 3)), "carol@example.org": (250, (2, 0, 0)),
                                   "john doe@example.org": (553, (5, 1, 3))}
        assert bad not in s.result.details and not s.result.retry_elsewhere

    def test_unsendable_sender_refuses_everyone_without_mail(self):
        """A sender no MAIL command can carry: 553 5.1.7 for all, nothing sent,
        the connection still usable."""
        s = Session(message("a@example.org", "b@example.org", sender="al\nice@example.test"))
        assert s.greet() == b""
        assert codes(s.result) == {"a@example.org": (553, (5, 1, 7)),
                                   "b@example.org": (553, (5, 1, 7))}
        assert not s.result.retry_elsewhere and s.client.phase is Phase.IDLE
        s.client.next_message(message())
        assert s.feed() == b"RSET\r\n"

    def test_only_unsendable_recipients_no_mail(self):
        """With nothing left to send, no MAIL either."""
        s = Session(message("<a@example.org>"))
        assert s.greet(PLAIN) == b""
        assert codes(s.result) == {"<a@example.org>": (553, (5, 1, 3))}
        assert s.client.phase is Phase.IDLE

    def test_message_without_recipients_is_a_usage_error(self):
        """A message without recipients is the caller's bug: ValueError."""
        with pytest.raises(ValueError):
            Session(OutboundMessage(queue_id="Q1", sender="", recipients=(),
                                    content_path="/nonexistent", size=10))


@pytest.mark.parametrize("address, ok", [
    ('"john doe"@example.org', True),
    ('"a\\"b"@example.org', True),        # quoted-pair
    ('"x@y <z>"@example.org', True),       # specials inside quotes
    ('""@example.org', True),
    ("jörg@bücher.example", True),          # SMTPUTF8 decides elsewhere
    ('"a b"@[IPv6:2001:db8::1]', True),
    ("postmaster", True),
    ("john doe@example.org", False),       # a space outside quotes
    ('"a"b"@example.org', False),
    ('"a\\"@example.org', False),         # the quote is escaped: unterminated
    ('"tab\there"@example.org', False),
    ('"a\rb"@example.org', False),
    ("a@example.org>\r\nRSET", False),
    ("a@example.org> NOTIFY=NEVER", False),
    ("a\x00@example.org", False),
    ("a\udcff@example.org", False),        # a byte that was not UTF-8
    ("a@exa mple.org", False),
    ("a@", False),
    ("", False),
])
def test_sendable(address, ok):
    """What may go between the angle brackets of MAIL and RCPT."""
    assert sendable(address) is ok


class ReuseTests:
    def test_next_message_sends_rset_first(self):
        """A second message on the same connection starts with RSET."""
        s = Session()
        s.greet()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.content(b"one\r\n")
        s.feed(b"250 ok\r\n")
        s.client.next_message(message("carol@example.org"))
        assert s.feed() == b"RSET\r\n"
        assert s.client.phase is Phase.RSET
        out = s.feed(b"250 2.0.0 reset\r\n")
        assert out.startswith(b"MAIL FROM:") and b"RCPT TO:<carol@example.org>" in out
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.content(b"two\r\n")
        s.feed(b"250 ok\r\n")
        results = [e.result for e in s.events if isinstance(e, MessageDone)]
        assert [list(r.replies) for r in results] == [["bob@example.org"], ["carol@example.org"]]

    def test_rset_failure_flags_reset_failed(self):
        """RSET refused or connection gone: reset_failed, nothing was tried."""
        s = Session()
        s.greet(PLAIN)
        s.feed(b"550 no\r\n")
        s.client.next_message(message("carol@example.org"))
        s.feed()
        s.eof()
        results = [e.result for e in s.events if isinstance(e, MessageDone)]
        assert results[-1].reset_failed and s.closed

    def test_rset_after_previous_refusal(self):
        """A message refused by our own check leaves the connection reusable."""
        s = Session(message(size=10**6))
        assert s.greet() == b""
        assert codes(s.result) == {"bob@example.org": (552, (5, 3, 4))}
        s.client.next_message(message())
        assert s.feed() == b"RSET\r\n"


class ExtensionTests:
    def test_size_too_big_no_mail_sent(self):
        """A message over the server's SIZE is refused 552 5.3.4 without MAIL."""
        s = Session(message("a@example.org", "b@example.org", size=100001))
        assert s.greet() == b""
        assert all(r == R.REMOTE_SIZE_EXCEEDED for r in s.result.replies.values())
        assert not s.result.retry_elsewhere and not s.closed

    def test_size_zero_means_no_limit(self):
        """SIZE 0 (or no number) sets no limit, but SIZE= is still sent."""
        s = Session(message(size=10**9))
        assert b"SIZE=1000000000" in s.greet(ehlo("SIZE 0", "PIPELINING"))

    def test_no_size_parameter_without_size(self):
        """SIZE= only when the server has SIZE."""
        s = Session()
        assert b"SIZE=" not in s.greet(ehlo("PIPELINING"))

    def test_eight_bit_to_seven_bit_server_refused(self):
        """8-bit content never goes to a server without 8BITMIME: 554 5.6.3."""
        s = Session(message(eight_bit=True))
        assert s.greet(ehlo("PIPELINING", "ENHANCEDSTATUSCODES")) == b""
        assert codes(s.result) == {"bob@example.org": (554, (5, 6, 3))}
        assert b"MAIL" not in s.sent

    def test_eight_bit_after_helo_refused(self):
        """A HELO-only server has no 8BITMIME either."""
        s = Session(message(eight_bit=True))
        s.feed(GREETING)
        s.feed(b"500 what\r\n")
        assert s.feed(b"250 hi\r\n") == b""
        assert s.result.replies["bob@example.org"] == R.REMOTE_NO_8BITMIME

    def test_eight_bit_declared(self):
        """8-bit content to an 8BITMIME server carries BODY=8BITMIME."""
        s = Session(message(eight_bit=True))
        assert b"MAIL FROM:<alice@example.test> SIZE=1000 BODY=8BITMIME\r\n" in s.greet()

    def test_smtputf8_needed_but_missing(self):
        """A message needing SMTPUTF8 for a server without it: 553 5.6.7."""
        s = Session(message("b\u00f6b@example.org"))
        assert s.greet(PLAIN) == b""
        assert s.result.replies["b\u00f6b@example.org"] == R.REMOTE_NO_SMTPUTF8

    def test_smtputf8_sent(self):
        """SMTPUTF8 on MAIL when needed and offered; the address goes as UTF-8."""
        s = Session(message("b\u00f6b@example.org"))
        out = s.greet()
        assert b" SMTPUTF8" in out and "RCPT TO:<b\u00f6b@example.org>".encode() in out

    def test_dsn_parameters_only_when_offered(self):
        """RET/ENVID and NOTIFY/ORCPT go out only to a server with DSN."""
        rcpt = OutboundRecipient("bob@example.org", notify=("SUCCESS", "FAILURE"),
                                 orcpt="rfc822;bob@example.org")
        msg = message(rcpt, ret="HDRS", envid="abc+2B1")
        with_dsn = Session(msg).greet()
        assert b"RET=HDRS ENVID=abc+2B1\r\n" in with_dsn
        assert b"RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org\r\n" in with_dsn
        without = Session(msg).greet(ehlo("PIPELINING", "SIZE 100000"))
        assert b"RET=" not in without and b"NOTIFY=" not in without and b"ORCPT" not in without

    def test_xtext(self):
        """xtext encodes +, =, spaces and non-ASCII; valid xtext passes as is."""
        assert xtext("a b=c") == "a+20b+3Dc"
        assert xtext("abc+2B1") == "abc+2B1"
        assert xtext("a+b") == "a+2Bb"
        assert xtext("\u00e9") == "+C3+A9"
        assert orcpt("bob@example.org") == "rfc822;bob@example.org"
        assert orcpt("rfc822;b=b@example.org") == "rfc822;b+3Db@example.org"


class EnhancedCodeTests:
    def test_parsed_only_with_enhancedstatuscodes(self):
        """Without ENHANCEDSTATUSCODES a 5.1.1 in the text is just text."""
        s = Session()
        s.greet(ehlo("PIPELINING"))
        s.feed(b"250 ok\r\n550 5.1.1 unknown\r\n554 no\r\n")
        reply = s.result.replies["bob@example.org"]
        assert reply.enhanced == (5, 0, 0) and reply.text == "5.1.1 unknown"

    def test_mismatched_class_not_believed(self):
        """A 451 claiming 5.1.1 keeps its text and gets 4.0.0."""
        reply = make_reply(RawReply(451, ("5.1.1 odd",)), enhanced=True)
        assert reply.enhanced is None and reply.text == "5.1.1 odd"

    def test_multiline_enhanced(self):
        """Every line of a multi-line reply loses its enhanced code."""
        reply = make_reply(RawReply(550, ("5.7.1 one", "5.7.1 two")), enhanced=True)
        assert reply.enhanced == (5, 7, 1) and reply.text == "one\ntwo"

    def test_every_result_agrees_in_class(self):
        """Every reply in a result has an enhanced code of its own class."""
        s = Session(message("a@example.org", "b@example.org"))
        s.greet(ehlo("PIPELINING"))
        s.feed(b"250 ok\r\n250 ok\r\n452 full\r\n354 go\r\n")
        s.content(b"x\r\n")
        s.feed(b"250 ok\r\n")
        for reply in s.result.replies.values():
            assert reply.enhanced[0] == reply.code // 100


class MalformedReplyTests:
    @pytest.mark.parametrize("garbage", [
        b"hello there\r\n",
        b"2500 ok\r\n",
        b"150 what\r\n",
        b"250-one\r\n251 two\r\n",
        b"250 " + b"x" * 5000 + b"\r\n",
        b"250-x\r\n" * 200 + b"250 x\r\n",
    ])
    def test_malformed_reply_is_temporary_failure(self, garbage):
        """Anything that is not a reply ends the session with 451 4.5.0."""
        s = Session()
        s.feed(GREETING)
        s.feed(garbage)
        assert s.result.replies["bob@example.org"] == R.REMOTE_PROTOCOL_ERROR
        assert s.result.retry_elsewhere and s.closed

    def test_endless_line_stops_at_the_limit(self):
        """A line without end is refused once it passes the limit, not buffered."""
        s = Session(max_reply_line=512)
        s.feed(GREETING)
        s.feed(b"250 " + b"x" * 600)
        assert s.result.replies["bob@example.org"] == R.REMOTE_PROTOCOL_ERROR

    def test_control_characters_cleaned(self):
        """NUL, bare CR and the like in reply text become '?'."""
        reader = ReplyReader()
        buf = bytearray(b"550 bad\x00 \rthing\r\n")
        assert reader.next_reply(buf).lines == ("bad? ?thing",)

    def test_bare_lf_line_ends_accepted(self):
        """A reply ending in a bare LF is still read."""
        buf = bytearray(b"250-a\n250 b\n")
        assert ReplyReader().next_reply(buf) == RawReply(250, ("a", "b"))

    def test_reader_raises_malformed(self):
        with pytest.raises(MalformedReply):
            ReplyReader().next_reply(bytearray(b"xyz\r\n"))

    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes_never_raise(self, data):
        """Whatever the server sends, next_event() never raises."""
        s = Session()
        s.feed(data)
        s.eof()
        assert s.closed


class TLSTests:
    def test_starttls_discards_injected_replies(self):
        """Replies pipelined after the 220 to STARTTLS are never believed."""
        s = Session(tls_available=True)
        out = s.greet(ehlo("PIPELINING", "STARTTLS", "ENHANCEDSTATUSCODES"))
        assert out == b"STARTTLS\r\n"
        assert s.feed(b"220 ready\r\n250 fake\r\n") == b""
        assert isinstance(s.events[-1], NeedTLS) and s.client.phase is Phase.TLS
        s.feed(b"250 more plaintext\r\n")  # arrives before the handshake is done
        s.client.tls_started()
        assert s.feed() == b"EHLO client.example.test\r\n"
        assert s.client.phase is Phase.HELLO and s.client.tls_active
        out = s.feed(FULL)
        assert out.startswith(b"MAIL FROM:")
        assert not any(isinstance(e, MessageDone) for e in s.events)

    def test_require_tls_not_offered(self):
        """TLS required, STARTTLS not offered: 451 4.7.4, nothing in clear."""
        s = Session(tls_available=True, require_tls=True)
        assert s.greet() == b"QUIT\r\n"
        assert s.result.replies["bob@example.org"] == R.REMOTE_TLS_NOT_OFFERED
        assert s.result.retry_elsewhere and b"MAIL" not in s.sent

    def test_require_tls_refused(self):
        """TLS required, STARTTLS refused: 4.7.4 with the remote reply kept."""
        s = Session(tls_available=True, require_tls=True)
        s.greet(ehlo("STARTTLS", "ENHANCEDSTATUSCODES"))
        assert s.feed(b"454 4.7.0 TLS not available\r\n") == b"QUIT\r\n"
        assert s.result.replies["bob@example.org"] == R.REMOTE_TLS_REFUSED
        assert s.result.details["bob@example.org"] == "454 4.7.0 TLS not available"

    def test_opportunistic_tls_refused_goes_on_in_clear(self):
        """Without require_tls, a refused STARTTLS continues in plaintext."""
        s = Session(tls_available=True)
        s.greet(ehlo("STARTTLS", "PIPELINING"))
        assert s.feed(b"454 4.7.0 no\r\n").startswith(b"MAIL FROM:")

    def test_no_starttls_without_tls_available(self):
        """tls_available=False ("none") never sends STARTTLS."""
        s = Session(tls_available=False)
        assert s.greet(ehlo("STARTTLS", "PIPELINING")).startswith(b"MAIL FROM:")

    def test_tls_handshake_failure(self):
        """The adapter reports a failed handshake with abort()."""
        s = Session(tls_available=True, require_tls=True)
        s.greet(ehlo("STARTTLS"))
        s.feed(b"220 go\r\n")
        s.client.abort(R.REMOTE_TLS_FAILED)
        s.feed()
        assert s.result.replies["bob@example.org"] == R.REMOTE_TLS_FAILED
        assert s.result.retry_elsewhere


class AuthTests:
    def tls_session(self, extensions: bytes, **kwargs) -> Session:
        s = Session(tls_available=True, auth=("user", "s3cret"), **kwargs)
        s.greet(ehlo("STARTTLS"))
        s.feed(b"220 go\r\n")
        s.client.tls_started()
        s.feed()
        return s

    def test_auth_plain_after_tls(self):
        """AUTH PLAIN with an initial response, then the transaction."""
        s = self.tls_session(b"")
        token = base64.b64encode(b"\0user\0s3cret")
        assert s.feed(ehlo("AUTH LOGIN PLAIN", "PIPELINING")) == b"AUTH PLAIN " + token + b"\r\n"
        assert s.client.phase is Phase.AUTH
        assert s.feed(b"235 2.7.0 ok\r\n").startswith(b"MAIL FROM:")

    def test_auth_login(self):
        """AUTH LOGIN when PLAIN is not offered."""
        s = self.tls_session(b"")
        assert s.feed(ehlo("AUTH LOGIN")) == b"AUTH LOGIN\r\n"
        assert s.feed(b"334 VXNlcm5hbWU6\r\n") == base64.b64encode(b"user") + b"\r\n"
        assert s.feed(b"334 UGFzc3dvcmQ6\r\n") == base64.b64encode(b"s3cret") + b"\r\n"
        assert s.feed(b"235 ok\r\n").startswith(b"MAIL FROM:")

    def test_auth_failure_defers(self):
        """A 535 defers the mail (454 4.7.8) and keeps the remote reply."""
        s = self.tls_session(b"")
        s.feed(ehlo("AUTH PLAIN", "ENHANCEDSTATUSCODES"))
        assert s.feed(b"535 5.7.8 bad credentials\r\n") == b"QUIT\r\n"
        reply = s.result.replies["bob@example.org"]
        assert (reply.code, reply.enhanced) == (454, (4, 7, 8))
        assert "535 5.7.8 bad credentials" in reply.text
        assert s.result.retry_elsewhere

    def test_auth_not_offered(self):
        """Credentials set but no AUTH after TLS: temporary failure."""
        s = self.tls_session(b"")
        assert s.feed(ehlo("PIPELINING")) == b"QUIT\r\n"
        assert s.result.replies["bob@example.org"] == R.REMOTE_AUTH_NOT_OFFERED

    def test_no_auth_in_clear(self):
        """Credentials are never sent without TLS unless explicitly allowed."""
        s = Session(auth=("user", "pw"))
        assert s.greet(ehlo("AUTH PLAIN")) == b"QUIT\r\n"
        assert s.result.replies["bob@example.org"] == R.REMOTE_AUTH_NEEDS_TLS
        assert b"AUTH" not in s.sent

    def test_auth_in_clear_when_allowed(self):
        """allow_plaintext_auth sends AUTH without TLS (a trusted local link)."""
        s = Session(auth=("user", "pw"), allow_plaintext_auth=True)
        assert s.greet(ehlo("AUTH PLAIN")).startswith(b"AUTH PLAIN ")


class LMTPTests:
    def test_lmtp_per_recipient_replies(self):
        """LHLO, then one reply per accepted recipient after the data, in order."""
        s = Session(message("a@example.org", "b@example.org", "c@example.org"), lmtp=True)
        assert s.feed(b"220 lmtp ready\r\n") == b"LHLO client.example.test\r\n"
        s.feed(FULL)
        s.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n")
        s.content(b"hi\r\n")
        assert s.client.phase is Phase.DOT
        s.feed(b"250 2.0.0 a done\r\n")
        assert not any(isinstance(e, MessageDone) for e in s.events)
        s.feed(b"452 4.2.2 c over quota\r\n")
        assert codes(s.result) == {"a@example.org": (250, (2, 0, 0)),
                                   "b@example.org": (550, (5, 1, 1)),
                                   "c@example.org": (452, (4, 2, 2))}

    def test_lmtp_has_no_helo_fallback(self):
        """A refused LHLO is final for this host."""
        s = Session(lmtp=True)
        s.feed(GREETING)
        assert s.feed(b"500 5.5.1 no\r\n") == b"QUIT\r\n"
        assert s.result.replies["bob@example.org"].code == 500


class DotStufferTests:
    @pytest.mark.parametrize("chunks,expected", [
        ([b".a\r\n"], b"..a\r\n.\r\n"),
        ([b"a\r\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b"\n.b"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\n.\nb"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\r.\r"], b"a\r\n..\r\n.\r\n"),
        ([b"no end"], b"no end\r\n.\r\n"),
        ([], b".\r\n"),
        ([b"x.\r\n"], b"x.\r\n.\r\n"),
    ])
    def test_stuffing(self, chunks, expected):
        stuffer = DotStuffer()
        assert b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish() == expected

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"\r", b"\n", b".\r\n", b"\xff"]),
                    max_size=40),
           st.data())
    def test_any_chunking_round_trips(self, pieces, data):
        """The server core's DotReader gets back the content, whatever the chunking."""
        content = b"".join(pieces)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=5)))
        chunks = [content[a:b] for a, b in zip([0] + cuts, cuts + [len(content)])]
        stuffer = DotStuffer()
        wire = b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()
        whole = DotStuffer()
        assert wire == whole.feed(content) + whole.finish()
        reader = DotReader()
        buf = bytearray(wire)
        got = b""
        while not reader.ended:
            got += reader.read(buf)
        assert not buf
        normal = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if normal and not normal.endswith(b"\r\n"):
            normal += b"\r\n"
        assert got == normal


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_reply_chunking_gives_the_same_result(data):
    """However the server's bytes are cut, the client reaches the same result."""
    script = (GREETING + FULL + b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n"
              b"354 go\r\n")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(script)), max_size=8)))
    s = Session(message("a@example.org", "b@example.org"))
    for a, b in zip([0] + cuts, cuts + [len(script)]):
        s.feed(script[a:b])
    assert isinstance(s.events[-1], SendContent)
    s.content(b"hi\r\n")
    s.feed(b"250 2.0.0 ok\r\n")
    assert codes(s.result) == {"a@example.org": (250, (2, 0, 0)),
                               "b@example.org": (550, (5, 1, 1))}


# --- the client against the real server core, in memory ---------------------


class ClientServerPair:
    """Links an SMTPClientConnection to an SMTPServerConnection (h11's ConnectionPair).

    ``known`` recipients are accepted, others get RCPT_UNKNOWN; the content
    the server core hands out is collected in ``received``.
    """

    def __init__(self, msg: OutboundMessage, content: bytes, *, mode: Mode = Mode.MX,
                 limits: Limits = Limits(), known=("a@example.org", "b@example.org"),
                 chunk: int = 7) -> None:
        self.server = SMTPServerConnection(hostname="mx.example.org", mode=mode, limits=limits)
        self.client = SMTPClientConnection("client.example.test", lmtp=mode is Mode.LMTP,
                                           tls_available=False, require_tls=False, auth=None,
                                           message=msg)
        self.content, self.chunk, self.known = content, chunk, known
        self.received: list[bytes] = []
        self.accepted: list[str] = []
        self.results: list[ClientResult] = []
        self.closed = False
        self.server.greeting()

    def run(self) -> None:
        for _ in range(10000):
            moved = self._server_step() | self._client_step()
            if not moved:
                return
        raise AssertionError("no end")

    def _client_step(self) -> bool:
        out = self.server.data_to_send()
        if out:
            self.client.receive_data(out)
        moved = bool(out)
        while (event := self.client.next_event()) is not NEED_DATA:
            moved = True
            if isinstance(event, SendContent):
                for i in range(0, len(self.content), self.chunk):
                    self.client.send_content(self.content[i:i + self.chunk])
                self.client.end_content()
            elif isinstance(event, MessageDone):
                self.results.append(event.result)
                if not self.client.closed:
                    self.client.quit()
            elif isinstance(event, Closed):
                self.closed = True
        sent = self.client.data_to_send()
        if sent:
            self.server.receive_data(sent)
        return moved or bool(sent)

    def _server_step(self) -> bool:
        moved = False
        while True:
            event = self.server.next_event()
            if event is sev.NEED_DATA or event is sev.PAUSED:
                return moved
            moved = True
            if isinstance(event, sev.MailFrom):
                self.server.send(R.SENDER_OK)
            elif isinstance(event, sev.RcptTo):
                ok = event.recipient in self.known
                if ok:
                    self.accepted.append(event.recipient)
                self.server.send(R.RCPT_OK if ok else R.RCPT_UNKNOWN)
            elif isinstance(event, sev.DataChunk):
                self.received.append(event.data)
            elif isinstance(event, sev.DataEnd):
                if self.server.mode is Mode.LMTP:
                    for rcpt in self.accepted:
                        self.server.send(R.OK if rcpt == self.known[0] else R.STORAGE_FULL)
                else:
                    self.server.send(R.QUEUED)


class PairTests:
    CONTENT = (b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\n"
               b"smuggle\n.\r\nMAIL FROM:<evil@example.net>\r\nend")

    def test_smtp_delivery_to_the_server_core(self):
        """Pipelined SMTP to our own server core: per-recipient results, content intact."""
        pair = ClientServerPair(message("a@example.org", "x@example.org", "b@example.org"),
                                self.CONTENT)
        pair.run()
        (result,) = pair.results
        assert result.replies["a@example.org"] == R.QUEUED
        assert result.replies["x@example.org"] == R.RCPT_UNKNOWN
        assert result.replies["b@example.org"] == R.QUEUED
        expected = self.CONTENT.replace(b"smuggle\n", b"smuggle\r\n") + b"\r\n"
        assert b"".join(pair.received) == expected
        assert pair.closed and pair.server.closed

    def test_lmtp_delivery_to_the_server_core(self):
        """LMTP: one reply per accepted recipient, as the server core sends them."""
        pair = ClientServerPair(message("a@example.org", "b@example.org"), b"hi\r\n",
                                mode=Mode.LMTP)
        pair.run()
        (result,) = pair.results
        assert result.replies == {"a@example.org": R.OK, "b@example.org": R.STORAGE_FULL}

    def test_size_limit_of_the_server_core(self):
        """The server core's SIZE limit stops the message before MAIL."""
        pair = ClientServerPair(message("a@example.org", size=5000), b"hi\r\n",
                                limits=Limits(max_message_size=4000))
        pair.run()
        assert pair.results[0].replies["a@example.org"] == R.REMOTE_SIZE_EXCEEDED
        assert pair.server.transaction.mail is None

    def test_eight_bit_accepted_by_the_server_core(self):
        """BODY=8BITMIME is accepted by a server with 8BITMIME."""
        pair = ClientServerPair(message("a@example.org", eight_bit=True), b"caf\xc3\xa9\r\n")
        pair.run()
        assert pair.results[0].replies["a@example.org"] == R.QUEUED
        assert b"".join(pair.received) == b"caf\xc3\xa9\r\n"
