"""Received header and header scanning."""

from mailserver.received import HeaderScanner, SessionInfo, received_header, with_keyword


def info(**kw):
    base = dict(peer_ip="192.0.2.1", helo="client.example", hostname="mx.example.test")
    base.update(kw)
    return SessionInfo(**base)


def test_with_keywords():
    """RFC 3848 / RFC 6531 keywords follow TLS, AUTH, LMTP and SMTPUTF8."""
    assert with_keyword(info()) == "ESMTP"
    assert with_keyword(info(esmtp=False)) == "SMTP"
    assert with_keyword(info(tls_version="TLSv1.3")) == "ESMTPS"
    assert with_keyword(info(tls_version="TLSv1.3", authenticated=True)) == "ESMTPSA"
    assert with_keyword(info(protocol="LMTP")) == "LMTP"
    assert with_keyword(info(smtputf8=True, tls_version="TLSv1.2")) == "UTF8SMTPS"


def test_header_shape():
    """The header names client, server, id, TLS details and recipient, and ends in CRLF."""
    h = received_header(info(tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384"),
                        "ABC123", "alice@example.test", now=0).decode()
    assert h.startswith("Received: from client.example (unknown [192.0.2.1])\r\n")
    assert "\tby mx.example.test (mailserver) with ESMTPS id ABC123\r\n" in h
    assert "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)" in h
    assert h.endswith("for <alice@example.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")


def test_hostile_helo_cannot_break_header():
    """Parentheses, CR/LF and control characters from the client are neutralised."""
    h = received_header(info(helo="evil)\r\nX-Injected: 1"), "ID").decode()
    assert "X-Injected" not in h.split("\r\n")[1]
    assert h.count("\r\n") == 3


def test_helo_cannot_forge_trace_fields():
    """A HELO with spaces cannot add by/with/id/for clauses of its own."""
    h = received_header(info(helo="evil.example by mx.example.test with ESMTPS id FAKE"), "ID")
    first = h.decode().split("\r\n")[0]
    assert first == ("Received: from evil.example?by?mx.example.test?with?ESMTPS?id?FAKE "
                     "(unknown [192.0.2.1])")


def test_ipv6_peer_is_an_address_literal():
    """IPv6 clients appear as [IPv6:...] (RFC 5321 4.1.3)."""
    h = received_header(info(peer_ip="2001:db8::1"), "ID").decode()
    assert "(unknown [IPv6:2001:db8::1])" in h


def test_scanner_counts_only_header_section():
    """Received fields in the body, or split across chunks, are counted correctly."""
    s = HeaderScanner()
    for chunk in (b"Received: a\r\nRecei", b"ved: b\r\nSubject: x\r\n\r\nReceived: body\r\n"):
        s.feed(chunk)
    assert s.received == 2
    assert s.done


def test_hide_client_leaves_out_the_from_clause():
    """With hide_client the header starts at "by": neither the client's HELO nor its address appears."""
    h = received_header(info(hide_client=True, authenticated=True), "ID", "alice@example.test",
                        now=0).decode()
    assert h == ("Received: by mx.example.test (mailserver) with ESMTPA id ID\r\n"
                 "\tfor <alice@example.test>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")
    h = received_header(info(hide_client=True), "ID", now=0).decode()
    assert h == ("Received: by mx.example.test (mailserver) with ESMTP id ID;\r\n"
                 "\tThu, 01 Jan 1970 00:00:00 +0000\r\n")
    assert "192.0.2.1" not in h and "client.example" not in h


def test_scanner_keeps_named_fields():
    """Kept fields are stored under lower-case names with folded lines joined, across chunks, header section only."""
    s = HeaderScanner(keep=("from", "message-id", "date"))
    for chunk in (b"FROM: \"Smith, Alice\"\r\n\t<alice@exa", b"mple.test>\r\nSubject: x\r\n",
                  b" continued\r\nMessage-Id: <1@x>\r\n\r\nFrom: body@example.test\r\n"):
        s.feed(chunk)
    assert s.fields == {"from": [' "Smith, Alice"\t<alice@example.test>'],
                        "message-id": [" <1@x>"]}
    assert s.has("Message-ID") and s.has("from") and not s.has("date")
    assert not s.has("subject")  # not kept


def test_scanner_kept_values_are_bounded():
    """A kept value stops growing at max_value octets and a name keeps at most max_fields values."""
    s = HeaderScanner(keep=("from",), max_value=20, max_fields=2)
    s.feed(b"From: a@example.test\r\n" + b" more\r\n" * 10 + b"From: b@x\r\nFrom: c@x\r\n\r\n")
    assert [len(v) for v in s.fields["from"]] == [20, 4]
    assert s.fields["from"][1] == " b@x"
