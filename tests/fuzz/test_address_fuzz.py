"""Fuzz the MAIL/RCPT path parser (mailserver.address.parse_path)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailserver.address import Address, AddressError, parse_params, parse_path, split_path
from mailserver.errors import ProtocolError
from tests.fuzz.conftest import FUZZ

PIECES = ["<", ">", "@", ".", '"', "\\", ":", ",", "[", "]", "IPv6:", "::1", "127.0.0.1",
          "postmaster", "a", "example.test", "xn--", "-", " ", "é", "\x00", "\udcff", "x" * 70]

paths = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=20).map(
    "".join)


@FUZZ
@given(paths, st.booleans(), st.booleans())
def test_parse_path_only_raises_address_error(text, smtputf8, for_rcpt):
    """parse_path returns None or a normalised Address, or raises AddressError with a 5xx reply."""
    try:
        address = parse_path(text, smtputf8=smtputf8, for_rcpt=for_rcpt)
    except AddressError as e:
        assert 500 <= e.reply.code <= 599
        return
    if address is None:
        assert text == "<>" and not for_rcpt
        return
    assert isinstance(address, Address)
    assert address.domain == address.domain.lower()
    assert "\x00" not in str(address) and "\r" not in str(address)
    if not smtputf8:
        assert str(address).isascii()
    # Parsing is idempotent: the normalised form parses to itself.
    again = parse_path(f"<{address}>", smtputf8=smtputf8, for_rcpt=for_rcpt)
    assert again == address


@FUZZ
@given(paths)
def test_split_path_and_params(text):
    """split_path and parse_params raise only their documented errors."""
    try:
        path, rest = split_path(text)
        assert path + rest == text
    except ValueError:
        pass
    try:
        parse_params(text)
    except ProtocolError as e:  # documented: BAD_ARGUMENTS
        assert 500 <= e.reply.code <= 599
