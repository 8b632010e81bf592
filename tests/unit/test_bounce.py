"""Delivery status notifications: RFC 3464 structure, RFC 3461 NOTIFY/RET/ENVID/ORCPT."""

from __future__ import annotations

import base64
import email
import re
from email import policy

import pytest

from mailserver.queue.bounce import (
    bounce_envelope, is_8bit, make_dsn, should_notify,
)
from mailserver.queue.envelope import ClientInfo, Envelope, Recipient
from mailserver.reply import Reply

NOW = 1_700_000_000.0
ORIGINAL = (b"Received: from c.example ([192.0.2.9]) by mx.example.org\r\n"
            b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
            b"Subject: lunch\r\nMessage-ID: <m1@example.org>\r\n\r\n"
            b"Shall we?\r\n.leading dot\r\n")


def rcpt(address="bob@example.net", reply=Reply(550, (5, 1, 1), "<bob@example.net>: User unknown"),
         **kw):
    r = Recipient(address, **kw)
    if reply is not None:
        r.record(reply, "mx.example.net[192.0.2.1]", NOW - 60)
    return r


def env(recipients=None, **kw) -> Envelope:
    values = dict(id="ABCDEF", sender="alice@example.org",
                  recipients=recipients or [rcpt()], arrival=NOW - 3600,
                  client=ClientInfo(address="192.0.2.9", helo="c.example"))
    values.update(kw)
    return Envelope(**values)


@pytest.fixture
def original(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(ORIGINAL)
    return str(p)


def dsn(e, original, kind="failure", recipients=None, **kw):
    return make_dsn(e, e.recipients if recipients is None else recipients,
                    reporting_mta="mx.example.org", original_path=original, now=NOW, kind=kind,
                    **kw)


def parse(data: bytes):
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    return email.message_from_bytes(data, policy=policy.default)


def parts(msg):
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    return msg.get_payload()


def status_blocks(msg):
    """(per-message fields, [per-recipient fields]) from the delivery-status part."""
    part = parts(msg)[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


def test_failure_dsn(original):
    e = env()
    msg = parse(dsn(e, original))
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"].datetime.timestamp() == NOW
    assert re.fullmatch(r"<[^@>]+@mx\.example\.org>", msg["Message-ID"])
    human, status, returned = parts(msg)
    text = " ".join(human.get_content().split())  # undo the wrapping
    assert human.get_content_type() == "text/plain"
    assert "<bob@example.net>" in text
    assert "host mx.example.net[192.0.2.1] said: 550 5.1.1 <bob@example.net>: User unknown" \
        in text
    head, (r,) = status_blocks(msg)
    assert head["Reporting-MTA"] == "dns; mx.example.org"
    assert head["Received-From-MTA"] == "dns; c.example ([192.0.2.9])"
    assert email.utils.parsedate_to_datetime(head["Arrival-Date"]).timestamp() == NOW - 3600
    assert head["Original-Envelope-Id"] is None
    assert r["Final-Recipient"] == "rfc822; bob@example.net"
    assert r["Action"] == "failed"
    assert r["Status"] == "5.1.1"
    assert r["Remote-MTA"] == "dns; mx.example.net"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: User unknown"
    assert email.utils.parsedate_to_datetime(r["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert r["Original-Recipient"] is None
    assert r["Will-Retry-Until"] is None
    assert returned.get_content_type() == "message/rfc822"
    assert ORIGINAL in dsn(e, original), "the original is returned byte for byte"
    assert returned.get_payload(0)["Subject"] == "lunch"


def test_several_recipients_in_one_report(original):
    rs = [rcpt("a@example.net"), rcpt("b@example.net", reply=Reply(552, (5, 2, 2), "full"))]
    msg = parse(dsn(env(rs), original))
    _, blocks = status_blocks(msg)
    assert [(b["Final-Recipient"], b["Status"]) for b in blocks] == [
        ("rfc822; a@example.net", "5.1.1"), ("rfc822; b@example.net", "5.2.2")]


def test_expired_recipient_gets_4_4_7_and_its_last_reply(original):
    r = rcpt(reply=Reply(451, (4, 4, 1), "connection timed out"))
    text = dsn(env([r]), original)
    _, (b,) = status_blocks(parse(text))
    assert b["Action"] == "failed" and b["Status"] == "4.4.7"
    assert b["Diagnostic-Code"] == "smtp; 451 4.4.1 connection timed out"
    assert b"delivery time expired" in text


def test_failure_without_any_reply(original):
    _, (b,) = status_blocks(parse(dsn(env([rcpt(reply=None)]), original)))
    assert b["Status"] == "4.4.7" and b["Diagnostic-Code"] is None
    assert b["Remote-MTA"] is None


def test_delay_dsn(original):
    r = rcpt(reply=Reply(451, (4, 3, 0), "try later"))
    data = dsn(env([r]), original, kind="delay", will_retry_until=NOW + 4 * 86400)
    msg = parse(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, (b,) = status_blocks(msg)
    assert b["Action"] == "delayed" and b["Status"] == "4.3.0"
    assert email.utils.parsedate_to_datetime(b["Will-Retry-Until"]).timestamp() == \
        NOW + 4 * 86400
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Shall we?" not in data and b"Subject: lunch" in data
    assert "need not send" in parts(msg)[0].get_content()


def test_success_dsn(original):
    r = rcpt(reply=Reply(250, (2, 0, 0), "queued as X"), notify=("SUCCESS",))
    msg = parse(dsn(env([r]), original, kind="success"))
    _, (b,) = status_blocks(msg)
    assert (b["Action"], b["Status"]) == ("delivered", "2.0.0")
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_ret_hdrs_returns_only_the_header(original):
    data = dsn(env(ret="HDRS"), original)
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Shall we?" not in data
    assert "Subject: lunch" in returned.get_content()
    header = returned.get_content().replace("\r\n", "\n").rstrip("\n")
    assert header.endswith("Message-ID: <m1@example.org>")


def test_large_original_returns_only_the_header(original):
    data = dsn(env(ret="FULL"), original, max_full_size=len(ORIGINAL) - 1)
    msg = parse(data)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "too large" in parts(msg)[0].get_content()
    assert parts(parse(dsn(env(ret="FULL"), original)))[2].get_content_type() == \
        "message/rfc822"


def test_envid_and_orcpt_are_decoded_from_xtext(original):
    r = rcpt(orcpt="rfc822;bob+2Bsales@example.net")
    head, (b,) = status_blocks(parse(dsn(env([r], envid="Q123+2Bx"), original)))
    assert head["Original-Envelope-Id"] == "Q123+x"
    assert b["Original-Recipient"] == "rfc822; bob+sales@example.net"


def test_long_multiline_reply_is_folded_and_ascii(original):
    reply = Reply(550, (5, 7, 1), "rejected: " + "word " * 60 + "\nsee https://x.example/é")
    data = dsn(env([rcpt(reply=reply)]), original)
    _, (b,) = status_blocks(parse(data))
    assert b["Diagnostic-Code"].startswith("smtp; 550 5.7.1 rejected: word word")
    assert "\\x{E9}" in b["Diagnostic-Code"]
    status = data.split(b"message/delivery-status")[1].split(b"--=")[0]
    assert status.isascii()
    assert max(len(line) for line in status.split(b"\r\n")) <= 78


def test_8bit_original_goes_in_as_8bit_rfc822(original, tmp_path):
    p = tmp_path / "8bit"
    p.write_bytes(ORIGINAL.replace(b"Shall we?", "Gehen wir essen? Grüße".encode()))
    data = dsn(env(eight_bit=True), str(p))
    assert is_8bit(data)
    returned = parts(parse(data))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert "Grüße".encode() in data


def test_smtputf8_original_goes_in_as_base64_message_global(tmp_path):
    body = ORIGINAL.replace(b"Subject: lunch", "Subject: Mittagessen für Jörg".encode())
    p = tmp_path / "utf8"
    p.write_bytes(body)
    r = rcpt("jörg@example.net")
    data = dsn(env([r], smtputf8=True), str(p))
    assert not is_8bit(data), "the DSN itself stays 7-bit"
    msg = parse(data)
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/global"
    b64 = data.split(b"Content-Description: Undelivered message\r\n\r\n")[1].split(b"\r\n--")[0]
    assert base64.b64decode(b64) == body
    _, (b,) = status_blocks(msg)
    assert b["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.net"
    assert "jörg@example.net" in parts(msg)[0].get_content()
    hdrs = parse(dsn(env([r], smtputf8=True, ret="HDRS"), str(p)))
    assert parts(hdrs)[2].get_content_type() == "message/global-headers"


def test_missing_original_gives_a_two_part_report(tmp_path):
    msg = parse(dsn(env(), str(tmp_path / "gone")))
    assert len(parts(msg)) == 2
    msg = parse(dsn(env(), None))
    assert len(parts(msg)) == 2


def test_never_bounce_a_bounce(original):
    e = env(sender="")
    assert not should_notify(e, e.recipients[0], "failure")
    with pytest.raises(ValueError, match="never bounce a bounce"):
        dsn(e, original)
    with pytest.raises(ValueError):
        bounce_envelope(e, "X", NOW, b"")


@pytest.mark.parametrize("notify, failure, delay, success", [
    ((), True, True, False),
    (("NEVER",), False, False, False),
    (("FAILURE",), True, False, False),
    (("DELAY",), False, True, False),
    (("SUCCESS",), False, False, True),
    (("SUCCESS", "FAILURE", "DELAY"), True, True, True),
])
def test_should_notify_follows_notify(notify, failure, delay, success):
    e = env([rcpt(notify=notify)])
    r = e.recipients[0]
    assert should_notify(e, r, "failure") is failure
    assert should_notify(e, r, "delay") is delay
    assert should_notify(e, r, "success") is success
    assert should_notify(e, r, "relayed") is success


def test_delay_default_and_once_only():
    e = env([rcpt(reply=None)])
    r = e.recipients[0]
    assert not should_notify(e, r, "delay", delay_default=False)
    assert should_notify(e, r, "delay")
    r.delay_notified = True
    assert not should_notify(e, r, "delay")


def test_bounce_envelope(original):
    e = env()
    data = dsn(e, original)
    b = bounce_envelope(e, "BOUNCE1", NOW, data, reporting_mta="mx.example.org")
    assert b.sender == "" and [r.address for r in b.recipients] == ["alice@example.org"]
    assert b.recipients[0].notify == ("NEVER",)
    assert b.size == len(data) and not b.eight_bit and not b.smtputf8
    assert b.next_attempt == NOW
    b.validate()


def test_unknown_kind_and_empty_recipients(original):
    with pytest.raises(ValueError):
        dsn(env(), original, kind="maybe")
    with pytest.raises(ValueError):
        dsn(env(), original, recipients=[])


@pytest.mark.parametrize("remote, mta", [
    ("mx1.example.org[192.0.2.1]:25", "mx1.example.org"),
    ("[192.0.2.1]:2525", "[192.0.2.1]"),
    ("[2001:db8::1]:25", "[2001:db8::1]"),
    ("localhost:2525", "localhost"),
    ("local", ""),
    ("unix:/run/lmtp", ""),
    ("", ""),
])
def test_remote_mta_names(remote, mta):
    """Remote-MTA names the host, or the address literal, never a port."""
    from mailserver.queue.bounce import remote_mta

    assert remote_mta(remote) == mta
