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
    """Build the server.  Started as root, decide the user to run as (twistd's
    ``--uid``/``--gid``, else ``[server] user``/``group``, which twistd is
    then told to switch to) and hand it the server's files; refuse, with one
    line, before anything binds."""
    from mailserver import privileges
    from mailserver.service import build_service

    twistd = getattr(options, "parent", None)  # twistd's own options (--uid, --logfile, -n)
    uid = twistd.get("uid") if twistd is not None else None
    gid = twistd.get("gid") if twistd is not None else None
    try:
        who = privileges.identity(options.config, uid, gid)
        if who is not None and twistd is not None:  # [server] user: twistd switches
            if uid is None:
                twistd["uid"] = who.uid
            if gid is None:
                twistd["gid"] = who.gid
        return build_service(options.config, identity=who, twistd_options=twistd)
    except ConfigError as e:
        raise SystemExit(f"mailserver: {e}") from None
