"""The reply type and catalog."""

import pytest

from mailserver import reply as R
from mailserver.reply import Reply


def test_catalog_classes_agree():
    """Every catalog entry's basic code class equals its enhanced code class."""
    for name, reply in R.catalog().items():
        if reply.enhanced is not None:
            assert reply.code // 100 == reply.enhanced[0], name


def test_catalog_has_enhanced_codes():
    """Only the 354 intermediate reply lacks an enhanced code."""
    missing = [n for n, r in R.catalog().items() if r.enhanced is None]
    assert missing == ["START_DATA"]


def test_mismatched_class_is_refused():
    """A 451 with a 5.x.x enhanced code cannot be built (maddy's bug)."""
    with pytest.raises(ValueError):
        Reply(451, (5, 1, 1), "nope")


def test_multiline_serialisation():
    """Multi-line replies use '-' on all but the last line, each with the enhanced code."""
    r = Reply(250, (2, 0, 0), "one\ntwo")
    assert r.to_bytes() == b"250-2.0.0 one\r\n250 2.0.0 two\r\n"


def test_cr_in_text_refused():
    """Reply text cannot carry CR (no reply injection)."""
    with pytest.raises(ValueError):
        Reply(250, (2, 0, 0), "a\rb")
