"""Tests for mailserver.address: RFC 5321 paths and ESMTP parameters."""

from __future__ import annotations

import pytest

from mailserver import reply as R
from mailserver.address import (
    Address,
    AddressError,
    check_mail_params,
    parse_params,
    parse_path,
    split_argument,
    split_path,
)
from mailserver.errors import ProtocolError

VALID_PATHS = [
    ("<a@example.com>", Address("a", "example.com")),
    ("<First.Last@Example.COM>", Address("First.Last", "example.com")),
    ("<a+tag@sub-domain.example>", Address("a+tag", "sub-domain.example")),
    ("<a@localhost>", Address("a", "localhost")),
    ("<!#$%&'*+-/=?^_`{|}~@example.com>", Address("!#$%&'*+-/=?^_`{|}~", "example.com")),
    ("<a@1example.com>", Address("a", "1example.com")),
    ("<@a.example,@b.example:user@d.example>", Address("user", "d.example")),
    ("<@relay.example:user@d.example>", Address("user", "d.example")),
    ('<"a b"@d.example>', Address('"a b"', "d.example")),
    ('<"a@evil.example"@d.example>', Address('"a@evil.example"', "d.example")),
    ('<"a\\"b"@d.example>', Address('"a\\"b"', "d.example")),
    ('<""@d.example>', Address('""', "d.example")),
    ("<a%evil.example@d.example>", Address("a%evil.example", "d.example")),
    ("<evil.example!a@d.example>", Address("evil.example!a", "d.example")),
    ("<a@[192.0.2.1]>", Address("a", "[192.0.2.1]")),
    ("<a@[IPv6:2001:DB8::1]>", Address("a", "[IPv6:2001:db8::1]")),
    ("<a@[ipv6:2001:db8:0:0:0:0:0:1]>", Address("a", "[IPv6:2001:db8::1]")),
    ("<a@[IPv6:::ffff:192.0.2.1]>", Address("a", "[IPv6:::ffff:c000:201]")),
]


@pytest.mark.parametrize("text, expected", VALID_PATHS)
def test_valid_paths(text: str, expected: Address) -> None:
    """Valid paths parse to the normalised address, source routes dropped."""
    assert parse_path(text, smtputf8=False) == expected
    assert parse_path(text, smtputf8=False, for_rcpt=True) == expected


BAD_PATHS = [
    "a@example.com",
    "<a@example.com",
    "a@example.com>",
    "<a>",
    "<a@>",
    "<@example.com>",
    "<a@example.com.>",
    "<a@.example.com>",
    "<a@example..com>",
    "<a..b@example.com>",
    "<.a@example.com>",
    "<a.@example.com>",
    "<a@-example.com>",
    "<a@example-.com>",
    "<a@exa_mple.com>",
    "<a b@example.com>",
    "<a@exa mple.com>",
    "<a@b@example.com>",
    '<"unterminated@example.com>',
    '<"a"b@example.com>',
    '<"a@evil.example\\"@example.com>',  # the quoted-pair takes the closing quote
    "<a@" + "x" * 64 + ".com>",
    "<@a.example u@d.example>",
    "<@a.example,b.example:u@d.example>",
    "<@a.example.:u@d.example>",
    "<@:u@d.example>",
    "<a@[1.2.3]>",
    "<a@[256.1.1.1]>",
    "<a@[01.2.3.4]>",
    "<a@[IPv6:zz::1]>",
    "<a@[IPv6:fe80::1%eth0]>",
    "<a@[tag:content]>",
    "<a@[192.0.2.1>",
    "<a\x00@example.com>",
    "<a\r@example.com>",
    "<a\n@example.com>",
    "<a\t@example.com>",
    "<a@example.com\x7f>",
    '<"a\x00"@example.com>',
    "<postmaster>",
    "<>x",
]


@pytest.mark.parametrize("text", BAD_PATHS)
def test_bad_sender_paths(text: str) -> None:
    """Malformed sender paths raise AddressError carrying BAD_SENDER_SYNTAX."""
    with pytest.raises(AddressError) as info:
        parse_path(text, smtputf8=True)
    assert info.value.reply == R.BAD_SENDER_SYNTAX


@pytest.mark.parametrize("text", [t for t in BAD_PATHS if t != "<postmaster>"] + ["<>"])
def test_bad_recipient_paths(text: str) -> None:
    """Malformed recipient paths (and <>) raise BAD_RCPT_SYNTAX."""
    with pytest.raises(AddressError) as info:
        parse_path(text, smtputf8=True, for_rcpt=True)
    assert info.value.reply == R.BAD_RCPT_SYNTAX


# A quoted local part whose content needs no quotes is the same address as
# the unquoted form (RFC 5322 3.2.4, RFC 5321 4.1.2): it becomes that form.
# One that needs them stays quoted, with only '"' and '\\' escaped.
QUOTED_LOCAL_PARTS = [
    ('"alice"', "alice"),
    ('"Alice"', "Alice"),  # the local part keeps its case
    ('"first.last"', "first.last"),
    ('"a+tag"', "a+tag"),
    ('"\\a\\l\\i\\c\\e"', "alice"),  # "\a\l\i\c\e": needless quoted-pairs
    ('"a%evil.example"', "a%evil.example"),  # as unquoted: looked up literally
    ('"a b"', '"a b"'),
    ('"a\\ b"', '"a b"'),  # "a\ b": a space needs quotes, not a backslash
    ('"a\\"b"', '"a\\"b"'),  # "a\"b"
    ('"a\\\\b"', '"a\\\\b"'),  # "a\\b": a backslash stays escaped
    ('"a@evil.example"', '"a@evil.example"'),
    ('"\\a@evil.example"', '"a@evil.example"'),
    ('""', '""'),
    ('".alice"', '".alice"'),  # not a dot-atom: a leading, trailing or doubled dot
    ('"alice."', '"alice."'),
    ('"a..b"', '"a..b"'),
    ('"a,b"', '"a,b"'),
    ('"a(b)"', '"a(b)"'),
]


@pytest.mark.parametrize("local, expected", QUOTED_LOCAL_PARTS)
def test_quoted_local_part_is_normalised(local: str, expected: str) -> None:
    """A quoted local part loses the quotes (and needless backslashes) it
    does not need, for MAIL and RCPT alike."""
    for for_rcpt in (False, True):
        assert parse_path(f"<{local}@Example.TEST>", smtputf8=False, for_rcpt=for_rcpt) == \
            Address(expected, "example.test")


def test_quoted_utf8_local_part_is_normalised() -> None:
    """With SMTPUTF8, a quoted UTF-8 local part that is a dot-atom is unquoted too."""
    assert parse_path('<"jürgen"@example.test>', smtputf8=True) == Address("jürgen",
                                                                           "example.test")


@pytest.mark.parametrize("text", [
    '<"bob@evil.example"@example.test>',
    '<@relay.example:"bob@evil.example"@example.test>',
    '<"bob@evil.example\\\\"@example.test>',  # ends in a quoted backslash
    '<"bob\\@evil.example"@example.test>',
])
def test_quoted_at_sign_never_moves_the_domain(text: str) -> None:
    """A quoted "@" stays inside the quoted local part: the address is a
    (probably unknown) user of the local domain, never bob@evil.example."""
    address = parse_path(text, smtputf8=False, for_rcpt=True)
    assert address is not None
    assert address.domain == "example.test"
    assert address.local.startswith('"') and address.local.endswith('"')
    assert str(address).rpartition("@")[2] == "example.test"


def test_quoted_local_part_length_is_counted_as_sent() -> None:
    """The 64-octet limit applies to the local part as the client sent it."""
    with pytest.raises(AddressError) as info:
        parse_path('<"' + "a" * 63 + '"@example.com>', smtputf8=False)
    assert info.value.reply == R.SENDER_LOCAL_PART_TOO_LONG


def test_address_error_is_protocol_error() -> None:
    """AddressError is a ProtocolError, so the core turns it into its reply."""
    assert issubclass(AddressError, ProtocolError)


def test_null_path_for_mail() -> None:
    """<> is the null reverse-path: None."""
    assert parse_path("<>", smtputf8=False) is None


@pytest.mark.parametrize("text", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_postmaster_without_domain_for_rcpt(text: str) -> None:
    """RCPT may name <postmaster> without a domain, case-insensitively."""
    assert parse_path(text, smtputf8=False, for_rcpt=True) == Address("postmaster", "")


def test_postmaster_with_domain_is_ordinary() -> None:
    """<postmaster@domain> is an ordinary address."""
    assert parse_path("<postmaster@Example.com>", smtputf8=False, for_rcpt=True) == Address(
        "postmaster", "example.com"
    )


def test_str() -> None:
    """str(Address) is local@domain, or the bare local part without a domain."""
    assert str(Address("a", "example.com")) == "a@example.com"
    assert str(Address('"a b"', "example.com")) == '"a b"@example.com'
    assert str(Address("postmaster", "")) == "postmaster"


def test_address_is_frozen() -> None:
    """Address values cannot be changed."""
    address = Address("a", "b")
    with pytest.raises(AttributeError):
        address.local = "c"  # type: ignore[misc]




def test_local_part_length_limit() -> None:
    """A 64-octet local part is fine; 65 gives SENDER_LOCAL_PART_TOO_LONG in MAIL."""
    assert parse_path("<" + "a" * 64 + "@example.com>", smtputf8=False).local == "a" * 64
    with pytest.raises(AddressError) as info:
        parse_path("<" + "a" * 65 + "@example.com>", smtputf8=False)
    assert info.value.reply == R.SENDER_LOCAL_PART_TOO_LONG


def test_local_part_length_counts_octets() -> None:
    """The local part limit counts UTF-8 octets, not characters."""
    with pytest.raises(AddressError) as info:
        parse_path("<" + "ü" * 33 + "@example.com>", smtputf8=True)
    assert info.value.reply == R.SENDER_LOCAL_PART_TOO_LONG


def test_domain_length_limit() -> None:
    """A 255-octet domain is fine; 256 gives SENDER_DOMAIN_TOO_LONG in MAIL."""
    domain255 = ".".join(["x" * 63] * 4)
    domain256 = "y." + ".".join(["x" * 63] * 3 + ["x" * 62])
    assert (len(domain255), len(domain256)) == (255, 256)
    assert parse_path(f"<a@{domain255}>", smtputf8=False).domain == domain255
    with pytest.raises(AddressError) as info:
        parse_path(f"<a@{domain256}>", smtputf8=False)
    assert info.value.reply == R.SENDER_DOMAIN_TOO_LONG


def test_limits_are_keywords() -> None:
    """max_local and max_domain change the limits."""
    with pytest.raises(AddressError) as info:
        parse_path("<abcd@example.com>", smtputf8=False, max_local=3)
    assert info.value.reply == R.SENDER_LOCAL_PART_TOO_LONG
    with pytest.raises(AddressError) as info:
        parse_path("<a@example.com>", smtputf8=False, max_domain=5)
    assert info.value.reply == R.SENDER_DOMAIN_TOO_LONG


EIGHTBIT = ["<ü@example.com>", "<a@bücher.example>", '<"ü"@example.com>', "<a@\udcff.example>"]


@pytest.mark.parametrize("text", EIGHTBIT)
def test_eightbit_without_smtputf8(text: str) -> None:
    """Non-ASCII (or non-UTF-8) addresses need SMTPUTF8: EIGHTBIT_ADDRESS."""
    with pytest.raises(AddressError) as info:
        parse_path(text, smtputf8=False)
    assert info.value.reply == R.EIGHTBIT_ADDRESS


def test_utf8_with_smtputf8() -> None:
    """With SMTPUTF8, UTF-8 local parts and domains are kept, domain lower-cased."""
    assert parse_path("<Jürgen@BÜCHER.example>", smtputf8=True) == Address(
        "Jürgen", "bücher.example"
    )
    assert parse_path('<"ü b"@example.com>', smtputf8=True) == Address('"ü b"', "example.com")


def test_invalid_utf8_with_smtputf8_is_syntax() -> None:
    """Bytes that were not UTF-8 (surrogate-escaped) are a syntax error even with SMTPUTF8."""
    with pytest.raises(AddressError) as info:
        parse_path("<a\udcff@example.com>", smtputf8=True)
    assert info.value.reply == R.BAD_SENDER_SYNTAX


def test_controls_are_syntax_even_without_smtputf8() -> None:
    """A control character is a syntax error, checked before the 8-bit rule."""
    with pytest.raises(AddressError) as info:
        parse_path("<ü\x00@example.com>", smtputf8=False, for_rcpt=True)
    assert info.value.reply == R.BAD_RCPT_SYNTAX


SPLITS = [
    ("<a@b> SIZE=1", ("<a@b>", " SIZE=1")),
    ("<a@b>", ("<a@b>", "")),
    ("<>", ("<>", "")),
    ('<"x>y"@b> X', ('<"x>y"@b>', " X")),
    ('<"x\\">"@b>', ('<"x\\">"@b>', "")),
]


@pytest.mark.parametrize("text, expected", SPLITS)
def test_split_path(text: str, expected: tuple[str, str]) -> None:
    """split_path ends the path at the first '>' outside quotes."""
    assert split_path(text) == expected


@pytest.mark.parametrize("text", ["a@b>", "<a@b", '<"a>@b', ""])
def test_split_path_errors(text: str) -> None:
    """split_path raises ValueError without '<' or a closing '>'."""
    with pytest.raises(ValueError):
        split_path(text)


ARGUMENTS = [
    ("FROM:<a@b>", ("<a@b>", "")),
    ("from:<a@b> SIZE=1", ("<a@b>", " SIZE=1")),
    ("FROM: <a@b>", ("<a@b>", "")),
    ("FROM:   <a@b>", ("<a@b>", "")),
]


@pytest.mark.parametrize("text, expected", ARGUMENTS)
def test_split_argument(text: str, expected: tuple[str, str]) -> None:
    """split_argument takes the keyword case-insensitively and tolerates spaces."""
    assert split_argument(text, "FROM:", R.BAD_SENDER_SYNTAX) == expected


@pytest.mark.parametrize(
    "text, reply",
    [
        ("TO:<a@b>", R.BAD_ARGUMENTS),
        ("FROM <a@b>", R.BAD_ARGUMENTS),
        ("", R.BAD_ARGUMENTS),
        ("FROM:a@b", R.BAD_SENDER_SYNTAX),
        ("FROM:<a@b", R.BAD_SENDER_SYNTAX),
        ("FROM:<a@b>SIZE=1", R.BAD_SENDER_SYNTAX),
    ],
)
def test_split_argument_errors(text: str, reply: R.Reply) -> None:
    """A missing keyword is BAD_ARGUMENTS; a bad path is the given syntax reply."""
    with pytest.raises(ProtocolError) as info:
        split_argument(text, "FROM:", R.BAD_SENDER_SYNTAX)
    assert info.value.reply == reply


PARAMS = [
    ("", {}),
    (" ", {}),
    ("SIZE=10", {"SIZE": "10"}),
    ("size=10 body=8bitmime", {"SIZE": "10", "BODY": "8bitmime"}),
    ("SMTPUTF8", {"SMTPUTF8": None}),
    ("  SIZE=1   SMTPUTF8 ", {"SIZE": "1", "SMTPUTF8": None}),
    ("ENVID=abc+2Bdef ORCPT=rfc822;a@b", {"ENVID": "abc+2Bdef", "ORCPT": "rfc822;a@b"}),
    ("X-FOO=bär", {"X-FOO": "bär"}),
]


@pytest.mark.parametrize("text, expected", PARAMS)
def test_parse_params(text: str, expected: dict) -> None:
    """Parameters parse to an upper-cased-key dict, None for valueless keys."""
    assert parse_params(text) == expected


@pytest.mark.parametrize(
    "text",
    ["=x", "SIZE=", "A=b=c", "SIZE=1 SIZE=2", "size=1 SIZE=2", "-A", "A_B", "A=\x7f", "A=\x01"],
)
def test_parse_params_errors(text: str) -> None:
    """Malformed or repeated parameters raise BAD_ARGUMENTS."""
    with pytest.raises(ProtocolError) as info:
        parse_params(text)
    assert info.value.reply == R.BAD_ARGUMENTS


MAIL_ALLOWED = frozenset({"SIZE", "BODY", "SMTPUTF8"})


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, (None, None)),
        ({"SIZE": "100"}, (100, None)),
        ({"SIZE": "1000"}, (1000, None)),
        ({"BODY": "8bitmime"}, (None, "8BITMIME")),
        ({"BODY": "7BIT", "SMTPUTF8": None}, (None, "7BIT")),
    ],
)
def test_check_mail_params(params: dict, expected: tuple) -> None:
    """SIZE and BODY are read from valid MAIL parameters."""
    assert check_mail_params(params, MAIL_ALLOWED, 1000) == expected


@pytest.mark.parametrize(
    "params, reply",
    [
        ({"SIZE": "1001"}, R.MESSAGE_TOO_BIG),
        ({"SIZE": "x"}, R.BAD_ARGUMENTS),
        ({"SIZE": None}, R.BAD_ARGUMENTS),
        ({"SIZE": "-1"}, R.BAD_ARGUMENTS),
        ({"BODY": "BINARYMIME"}, R.BODY_NOT_SUPPORTED),
        ({"BODY": None}, R.BODY_NOT_SUPPORTED),
        ({"SMTPUTF8": "yes"}, R.BAD_ARGUMENTS),
        ({"RET": "FULL"}, R.PARAM_NOT_RECOGNIZED),
    ],
)
def test_check_mail_params_errors(params: dict, reply: R.Reply) -> None:
    """Bad MAIL parameters raise the matching catalog reply."""
    with pytest.raises(ProtocolError) as info:
        check_mail_params(params, MAIL_ALLOWED, 1000)
    assert info.value.reply == reply


def test_check_mail_params_unlimited_size() -> None:
    """max_size 0 accepts any SIZE."""
    assert check_mail_params({"SIZE": "9" * 30}, MAIL_ALLOWED, 0) == (int("9" * 30), None)


def test_check_mail_params_extra_allowed() -> None:
    """Parameters added to the allowed set pass through unchecked."""
    assert check_mail_params({"RET": "FULL"}, MAIL_ALLOWED | {"RET"}, 0) == (None, None)
