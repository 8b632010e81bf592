"""Tests for mailserver.sasl: PLAIN and LOGIN exchanges, strict base64, error kinds."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailserver.sasl import (
    AUTHZID,
    CANCELLED,
    MALFORMED,
    MAX_RESPONSE,
    MECHANISMS,
    UNKNOWN_MECHANISM,
    Credentials,
    Exchange,
    SASLError,
    decode_response,
    encode_challenge,
)

SECRET = "hunter2-secret"


def b64(data: bytes) -> str:
    """Encode ``data`` as a client would."""
    return base64.b64encode(data).decode("ascii")


def plain(data: bytes, via: str) -> Credentials:
    """Run a PLAIN exchange carrying ``data`` as initial response or as the first response."""
    exchange = Exchange("PLAIN")
    if via == "initial":
        return exchange.start(b64(data))
    assert exchange.start(None) == b""
    return exchange.respond(b64(data))


def failure(call, *args) -> SASLError:
    """Call and return the SASLError it raised."""
    with pytest.raises(SASLError) as info:
        call(*args)
    return info.value


VIA = pytest.mark.parametrize("via", ["initial", "response"])


class ConstantsTests:
    """Names other modules rely on."""

    def test_mechanisms_in_advertised_order(self):
        """PLAIN is advertised before LOGIN."""
        assert MECHANISMS == ("PLAIN", "LOGIN")

    def test_max_response(self):
        """The response line limit is the 12288 octets of RFC 4954 §4."""
        assert MAX_RESPONSE == 12288

    def test_error_kind(self):
        """SASLError carries its kind and a message made of fixed text."""
        error = SASLError(MALFORMED, "empty field")
        assert error.kind == MALFORMED
        assert str(error) == "malformed: empty field"
        assert str(SASLError(CANCELLED)) == "cancelled"


class CodecTests:
    """encode_challenge and decode_response."""

    @pytest.mark.parametrize("text, data", [
        ("", b""),
        ("=", b""),
        ("QQ==", b"A"),
        ("QUI=", b"AB"),
        ("QUJD", b"ABC"),
        ("AP8=", b"\x00\xff"),
        ("+/+/", b"\xfb\xff\xbf"),
        ("VXNlcm5hbWU6", b"Username:"),
    ])
    def test_decode_valid(self, text, data):
        """Canonical base64, the empty string and a lone "=" decode."""
        assert decode_response(text) == data

    @pytest.mark.parametrize("text", [
        "!!!!",          # outside the alphabet
        "QUJ-",          # URL-safe alphabet
        "QQ",            # padding missing
        "QQ=",           # padding short
        "QQ===",         # padding too long
        "==",            # padding only
        "=QQ=",          # leading padding
        "QQ==QQ==",      # data after padding
        "Q Q==",         # space inside
        "QUJD ",         # trailing space
        " QUJD",         # leading space
        "QUJD\t",        # tab
        "QUJD\r",        # CR left over
        "QU\nJD",        # LF inside
        "QR==",          # non-canonical: unused bits set
        "QUJ=",          # non-canonical: unused bits set
        "*",             # cancel is not base64
        "QUJD*",
        "QUJDé",         # non-ASCII
        "\x00",
    ])
    def test_decode_malformed(self, text):
        """Anything but strict canonical base64 is malformed."""
        assert failure(decode_response, text).kind == MALFORMED

    def test_decode_length_limit(self):
        """A response of MAX_RESPONSE characters decodes; one more is malformed."""
        longest = "A" * MAX_RESPONSE
        assert decode_response(longest) == bytes(MAX_RESPONSE // 4 * 3)
        assert failure(decode_response, longest + "A").kind == MALFORMED
        assert failure(decode_response, "!" * (MAX_RESPONSE * 10)).kind == MALFORMED

    @pytest.mark.parametrize("data, text", [
        (b"", ""),
        (b"Username:", "VXNlcm5hbWU6"),
        (b"Password:", "UGFzc3dvcmQ6"),
        (b"\x00", "AA=="),
    ])
    def test_encode(self, data, text):
        """Challenges are plain base64 with no line break; no data gives ""."""
        assert encode_challenge(data) == text

    @given(st.binary(max_size=MAX_RESPONSE // 4 * 3))
    def test_round_trip(self, data):
        """Whatever is encoded decodes back to the same bytes."""
        assert decode_response(encode_challenge(data)) == data


class PlainTests:
    """The PLAIN mechanism (RFC 4616)."""

    @VIA
    @pytest.mark.parametrize("message, login, password, authzid", [
        (b"\0alice\0secret", "alice", "secret", ""),
        (b"alice\0alice\0secret", "alice", "secret", "alice"),
        (b"\0alice@example.test\0pa ss:wo\rrd\n", "alice@example.test", "pa ss:wo\rrd\n", ""),
        ("\0josé\0pässwörd".encode(), "josé", "pässwörd", ""),
        ("ñ\0ñ\0日本".encode(), "ñ", "日本", "ñ"),
        (b"\0a\0" + b"p" * 9000, "a", "p" * 9000, ""),
    ])
    def test_valid(self, via, message, login, password, authzid):
        """A well-formed message gives its credentials, authzid as sent."""
        assert plain(message, via) == Credentials("PLAIN", login, password, authzid)

    @VIA
    @pytest.mark.parametrize("message", [
        b"",                        # nothing
        b"alice",                   # no NUL
        b"alice\0secret",           # one NUL
        b"\0alice\0secret\0",       # three NULs
        b"\0alice\0sec\0ret",       # NUL in the password
        b"\0\0\0",
        b"\0alice\0",               # empty password
        b"\0\0secret",              # empty authcid
        b"\0\0",                    # both empty
        b"bob\0alice\0",            # malformed wins over a foreign authzid
        b"\0\xffalice\0secret",     # authcid not UTF-8
        b"\0alice\0secr\xc3",       # password truncated UTF-8
        b"\xff\0alice\0secret",     # authzid not UTF-8
        b"\0\xc0\xafx\0secret",     # overlong UTF-8
        b"\0\xed\xa0\x80\0secret",  # encoded surrogate
    ])
    def test_malformed(self, via, message):
        """A message not of the form authzid NUL authcid NUL passwd is malformed."""
        assert failure(plain, message, via).kind == MALFORMED

    @VIA
    @pytest.mark.parametrize("message", [
        b"bob\0alice\0secret",
        b"Alice\0alice\0secret",
        b"alice \0alice\0secret",
    ])
    def test_foreign_authzid(self, via, message):
        """An authzid other than the authcid itself is refused."""
        assert failure(plain, message, via).kind == AUTHZID

    def test_empty_challenge(self):
        """With no initial response the challenge is empty and the exchange waits."""
        exchange = Exchange("PLAIN")
        assert exchange.start(None) == b""
        assert not exchange.done

    @pytest.mark.parametrize("initial", ["=", "*", "", "Q Q==", "A" * (MAX_RESPONSE + 4)])
    def test_bad_initial_response(self, initial):
        """An empty, cancel-looking, non-base64 or over-long initial response is malformed."""
        exchange = Exchange("PLAIN")
        assert failure(exchange.start, initial).kind == MALFORMED
        assert exchange.done

    @pytest.mark.parametrize("line", ["", "=", "!!", "QR==", "A" * (MAX_RESPONSE + 4)])
    def test_bad_response(self, line):
        """An empty, non-base64 or over-long response line is malformed."""
        exchange = Exchange("PLAIN")
        exchange.start(None)
        assert failure(exchange.respond, line).kind == MALFORMED
        assert exchange.done


class LoginTests:
    """The LOGIN mechanism."""

    def test_two_steps(self):
        """Username: then Password: challenges, then the credentials."""
        exchange = Exchange("LOGIN")
        assert exchange.start(None) == b"Username:"
        assert exchange.respond(b64(b"alice")) == b"Password:"
        assert not exchange.done
        assert exchange.respond(b64(SECRET.encode())) == Credentials("LOGIN", "alice", SECRET)
        assert exchange.done

    def test_initial_response(self):
        """An initial response is the username; only Password: follows."""
        exchange = Exchange("LOGIN")
        assert exchange.start("dXNlcg==") == b"Password:"
        creds = exchange.respond(b64("pässwörd".encode()))
        assert creds == Credentials("LOGIN", "user", "pässwörd")

    def test_utf8(self):
        """UTF-8 names and passwords come back as text."""
        exchange = Exchange("LOGIN")
        exchange.start(b64("josé".encode()))
        creds = exchange.respond(b64("日本".encode()))
        assert (creds.login, creds.password, creds.authzid) == ("josé", "日本", "")

    @pytest.mark.parametrize("username, password", [
        (b"", b"secret"),
        (b"alice", b""),
        (b"\xffalice", b"secret"),
        (b"alice", b"secr\xc3"),
        (b"ali\0ce", b"secret"),
        (b"alice", b"sec\0ret"),
        (b"\0alice\0secret", b"secret"),
    ])
    @pytest.mark.parametrize("initial", [False, True])
    def test_malformed(self, username, password, initial):
        """An empty, non-UTF-8 or NUL-bearing username or password is malformed."""
        def run():
            exchange = Exchange("LOGIN")
            if initial:
                exchange.start(b64(username) if username else "=")
            else:
                exchange.start(None)
                exchange.respond(b64(username))
            exchange.respond(b64(password))
        assert failure(run).kind == MALFORMED

    @pytest.mark.parametrize("initial", ["=", "*", "dXNlcg", "A" * (MAX_RESPONSE + 4)])
    def test_bad_initial_response(self, initial):
        """An empty, cancel-looking, non-base64 or over-long initial response is malformed."""
        exchange = Exchange("LOGIN")
        assert failure(exchange.start, initial).kind == MALFORMED
        assert exchange.done

    @pytest.mark.parametrize("line", ["", "=", "d XNlcg==", "A" * (MAX_RESPONSE + 4)])
    def test_bad_password_line(self, line):
        """An empty, non-base64 or over-long password line is malformed."""
        exchange = Exchange("LOGIN")
        exchange.start("dXNlcg==")
        assert failure(exchange.respond, line).kind == MALFORMED


class ExchangeTests:
    """Mechanism selection, cancelling and the single-use state."""

    @pytest.mark.parametrize("name, upper", [
        ("PLAIN", "PLAIN"), ("plain", "PLAIN"), ("Plain", "PLAIN"),
        ("LOGIN", "LOGIN"), ("login", "LOGIN"), ("LoGiN", "LOGIN"),
    ])
    def test_mechanism_name_case(self, name, upper):
        """Mechanism names match case-insensitively and are kept upper-case."""
        exchange = Exchange(name)
        assert exchange.mechanism == upper
        assert not exchange.done

    @pytest.mark.parametrize("name", [
        "CRAM-MD5", "XOAUTH2", "SCRAM-SHA-256", "ANONYMOUS", "", "PLAIN ", " LOGIN",
        "PLAIN\0", "PLAINX", "plaın", "ſcram", "LOGİN",
    ])
    def test_unknown_mechanism(self, name):
        """Other names, padded names and non-ASCII look-alikes are unknown."""
        assert failure(Exchange, name).kind == UNKNOWN_MECHANISM

    @pytest.mark.parametrize("mechanism, initial, before", [
        ("PLAIN", None, []),
        ("LOGIN", None, []),
        ("LOGIN", None, ["YWxpY2U="]),
        ("LOGIN", "YWxpY2U=", []),
    ])
    def test_cancel_at_each_step(self, mechanism, initial, before):
        """A "*" line cancels whatever challenge is pending and ends the exchange."""
        exchange = Exchange(mechanism)
        exchange.start(initial)
        for line in before:
            assert isinstance(exchange.respond(line), bytes)
        assert failure(exchange.respond, "*").kind == CANCELLED
        assert exchange.done
        with pytest.raises(RuntimeError):
            exchange.respond("*")

    def test_respond_before_start(self):
        """Responding before start is a programming error."""
        with pytest.raises(RuntimeError):
            Exchange("LOGIN").respond("YWxpY2U=")

    def test_start_twice(self):
        """Starting an exchange twice is a programming error."""
        exchange = Exchange("LOGIN")
        exchange.start(None)
        with pytest.raises(RuntimeError):
            exchange.start(None)

    @pytest.mark.parametrize("again", [
        lambda e: e.respond(b64(b"\0alice\0secret")),
        lambda e: e.respond("*"),
        lambda e: e.start(None),
    ])
    @pytest.mark.parametrize("finish", [
        lambda e: e.start(b64(b"\0alice\0secret")),   # success
        lambda e: e.start("!!"),                      # malformed
        lambda e: e.start(b64(b"bob\0alice\0x")),     # foreign authzid
        lambda e: (e.start(None), e.respond("*")),    # cancelled
    ])
    def test_done_is_final(self, finish, again):
        """After credentials or any error, every further call is a RuntimeError."""
        exchange = Exchange("PLAIN")
        try:
            finish(exchange)
        except SASLError:
            pass
        assert exchange.done
        with pytest.raises(RuntimeError):
            again(exchange)


class SecrecyTests:
    """The password never shows in a repr, a str or an error."""

    def test_credentials_repr(self):
        """Credentials show mechanism, login and authzid but not the password."""
        creds = Credentials("PLAIN", "alice", SECRET, "alice")
        assert SECRET not in repr(creds)
        assert SECRET not in str(creds)
        assert "alice" in repr(creds) and "PLAIN" in repr(creds)
        assert creds.password == SECRET

    def test_credentials_frozen(self):
        """Credentials cannot be changed after the exchange."""
        creds = Credentials("LOGIN", "alice", SECRET)
        with pytest.raises(dataclasses.FrozenInstanceError):
            creds.password = "other"

    @pytest.mark.parametrize("message", [
        b"bob\0alice\0" + SECRET.encode(),
        b"\0alice\0" + SECRET.encode() + b"\0",
        b"\0alice\0" + SECRET.encode() + b"\xff",
    ])
    def test_errors_hide_secret(self, message):
        """Error messages are fixed texts, without the password or the login."""
        error = failure(plain, message, "initial")
        for shown in (str(error), repr(error)):
            assert SECRET not in shown and "alice" not in shown

    def test_exchange_repr(self):
        """An exchange's repr does not show the username it holds."""
        exchange = Exchange("LOGIN")
        exchange.start(b64(b"alice"))
        assert "alice" not in repr(exchange)
