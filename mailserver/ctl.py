# -*- test-case-name: tests.unit.test_ctl -*-
"""``mailserverctl``: the administrator's command line.

``mailserverctl check-config FILE`` validates a configuration offline, the
same way the server does at start, and prints ``FILE: ok`` or the error.
"""

from __future__ import annotations

import argparse
import sys

from mailserver.config import load_config
from mailserver.errors import ConfigError


def check_config(args) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"mailserverctl: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(config.listeners)} listener(s), "
          f"local domains: {', '.join(config.domains.local)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailserverctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file offline")
    p.add_argument("file")
    p.set_defaults(func=check_config)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
