"""Fuzz the LDIF reader (mailserver.directory.ldif.parse_ldif)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailserver.directory.ldif import LDIFError, parse_ldif
from tests.fuzz.conftest import FUZZ

TOKENS = ["dn: uid=a,dc=example,dc=test\n", "dn:: ", "objectClass: inetOrgPerson\n",
          "mail: a@example.test\n", "uid: a\n", "userPassword: {SSHA}x\n", "\n", " ", "#",
          ":", "::", ":<", "file:///etc/passwd", "dW5v", "=", "\r\n", "version: 1\n",
          "changetype: add\n", "-\n", "DN: UID=A,DC=EXAMPLE,DC=TEST\n"]

texts = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=10)), max_size=30).map(
    "".join)


@FUZZ
@given(st.one_of(texts, texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.binary(max_size=200)))
def test_parse_ldif_only_raises_ldif_error(text):
    """parse_ldif returns (dn, attributes) records or raises LDIFError, never anything else."""
    try:
        records = parse_ldif(text, "fuzz.ldif")
    except LDIFError as e:
        assert str(e).startswith("fuzz.ldif:")
        return
    for dn, attributes in records:
        assert isinstance(dn, str) and dn
        assert all(isinstance(v, bytes) for values in attributes.values() for v in values)
