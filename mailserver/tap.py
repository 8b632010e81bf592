# -*- test-case-name: tests.integration.test_server -*-
"""The twistd plugin's options: ``twistd -n mailserver --config FILE``.

``postOptions`` loads and validates the configuration; an error ends the
process with one line naming the file, the key and the problem, before
anything binds.  Parsing options has no other side effect.
"""

from __future__ import annotations

from twisted.python import usage

from mailserver.config import load_config
from mailserver.errors import ConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            raise SystemExit(f"mailserver: {e}") from None


def makeService(options: Options):
    from mailserver.service import build_service

    # twistd's own options (its --logfile, -n) say where [log] lines go by default.
    return build_service(options.config, twistd_options=getattr(options, "parent", None))
