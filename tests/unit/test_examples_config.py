"""The example deployments in etc/examples/ are valid configuration files."""

from pathlib import Path

import pytest

from mailserver.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "etc" / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_loads(name):
    """Each example passes the server's own validation as written (files aside)."""
    config = load_config(str(EXAMPLES / name), check_files=False)
    assert config.listeners


def test_three_examples_exist():
    """The three documented deployments and the Postfix snippet are all there."""
    names = {p.name for p in EXAMPLES.iterdir()}
    assert {"small-organisation.toml", "corporate-relay.toml", "lmtp-behind-postfix.toml",
            "postfix-main.cf.snippet"} <= names
