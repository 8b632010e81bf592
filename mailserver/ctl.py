# -*- test-case-name: tests.unit.test_ctl -*-
"""``mailserverctl``: the administrator's command line.

``mailserverctl check-config FILE`` validates a configuration offline, the
same way the server does at start, and prints ``FILE: ok`` or the error.

``mailserverctl lookup ADDRESS [-c FILE]`` asks the configured directory
where mail for ADDRESS goes and prints every step of the answer.
``mailserverctl auth-test LOGIN [-c FILE]`` checks a password read from the
terminal (or one line of standard input).  Both use the blocking directory
calls directly: no reactor runs.

``mailserverctl queue list|show|flush|hold|release|delete`` look at and
steer the outbound queue, safely while the server runs (see
:mod:`mailserver.queue.cli`).

``mailserverctl dkim genkey DOMAIN`` writes a DKIM signing key and prints
its DNS record; ``mailserverctl dns DOMAIN [--check]`` prints (or checks)
every record a local domain publishes (see :mod:`mailserver.publish_cli`).

``mailserverctl status`` checks a running server for monitoring (exit 0 ok,
1 warning, 2 critical) and ``mailserverctl log QUEUE_ID`` follows one
message through the log (see :mod:`mailserver.observe_cli`).

Exit status of ``lookup`` and ``auth-test``: 0 found / authenticated,
1 unknown address / refused login, 75 (EX_TEMPFAIL) the directory could not
answer, 78 (EX_CONFIG) the configuration or the directory settings are
unusable.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys

from mailserver.config import load_config
from mailserver.errors import ConfigError, DirectoryUnavailable

DEFAULT_CONFIG = "/etc/mailserver/mailserver.toml"
EX_OK, EX_NOTFOUND, EX_TEMPFAIL, EX_CONFIG = 0, 1, 75, 78


def check_config(args) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"mailserverctl: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(config.listeners)} listener(s), "
          f"local domains: {', '.join(config.domains.local)}"
          + (f"; relay domains: {', '.join(config.domains.relay)}" if config.domains.relay
             else "") + ")")
    return 0


def open_directory(config_path: str):
    """The directory ``config_path`` configures, for blocking calls.

    Raises ConfigError when the file or the directory settings are unusable.
    Files only the server needs (TLS keys) are not checked, so an
    administrator can run this without reading them.
    """
    from mailserver.directory.factory import directory_from_config

    config = load_config(config_path, check_files=False)
    try:
        return directory_from_config(config.directory, config.domains.local, None, None,
                                     relay_domains=config.domains.relay)
    except (OSError, ValueError) as e:  # unreadable or malformed LDIF, bad settings
        raise ConfigError(config_path, "directory", str(e)) from None


def _fail(message: str) -> None:
    print(f"mailserverctl: {message}", file=sys.stderr)


def _with_directory(args, action) -> int:
    try:
        directory = open_directory(args.config)
    except ConfigError as e:
        _fail(str(e))
        return EX_CONFIG
    try:
        return action(directory)
    except DirectoryUnavailable as e:
        _fail(f"directory unavailable, try again later: {e.reason or e}")
        return EX_TEMPFAIL
    finally:
        directory.close()


#: Resolution fields printed by name; any other (newer) field is shown as is.
_SHOWN = {"address", "mailboxes", "forwards", "trace", "disabled", "restriction", "relayed"}


def describe_restriction(r) -> str:
    """One line saying who may send to a restricted address."""
    if r is None:
        return "anyone"
    who = []
    if r.any_sender:
        who.append("anyone")
    else:
        if r.allowed_senders:
            who.append("listed senders: " + ", ".join(sorted(r.allowed_senders)))
        if r.members_only:
            who.append(f"its {len(r.members)} member(s)")
        if not who:
            who.append("nobody (the sender list resolved to nothing)")
    text = " or ".join(who)
    return text + (", authenticated only" if r.authenticated_only else "")


def print_resolution(resolution, out=None) -> None:
    """The resolution as text: status, trace, mailboxes, forwards, restriction."""
    out = out or sys.stdout
    if resolution.found:
        status = "found"
    elif getattr(resolution, "disabled", False):
        status = "disabled (every account it leads to is disabled)"
    else:
        status = "unknown (no mailbox, no forward)"
    print(f"{resolution.address}: {status}", file=out)
    print("trace:", file=out)
    for line in resolution.trace or ("(nothing matched)",):
        print(f"  {line}", file=out)
    print(f"mailboxes: {len(resolution.mailboxes)}", file=out)
    for box in resolution.mailboxes:
        print(f"  {box.address}  login={box.login}  dn={box.dn or '-'}", file=out)
    print(f"forwards: {len(resolution.forwards)}", file=out)
    for address in resolution.forwards:
        print(f"  {address}", file=out)
    relayed = getattr(resolution, "relayed", ())
    if relayed:  # mailboxes of corporate relay domains: to their internal host
        print(f"relayed (to the relay domain's internal host): {len(relayed)}", file=out)
        for address in relayed:
            print(f"  {address}", file=out)
    if getattr(resolution, "restriction", None) is not None:
        print(f"senders allowed: {describe_restriction(resolution.restriction)}", file=out)
    for f in dataclasses.fields(resolution):
        value = getattr(resolution, f.name)
        if f.name not in _SHOWN and value:
            print(f"{f.name}: {value}", file=out)


def lookup(args) -> int:
    def action(directory) -> int:
        resolution = directory.resolve_sync(args.address)
        domain = args.address.strip().lower().rpartition("@")[2].rstrip(".")
        is_local = getattr(directory, "is_local_domain_sync", None)
        local = is_local(domain) if domain and is_local is not None else None
        print_resolution(resolution)  # only once every question is answered
        relay = getattr(getattr(directory, "settings", None), "relay_domains", ())
        if domain and domain in relay:
            print(f"domain {domain}: relay (mail goes to its internal host)")
        elif local is not None:
            print(f"domain {domain}: {'local' if local else 'not local'}")
        return EX_OK if resolution.found else EX_NOTFOUND

    return _with_directory(args, action)


def read_password(stdin=None) -> str:
    """From the terminal without echo, or else one line of standard input."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        return getpass.getpass("Password: ")
    return stdin.readline().rstrip("\r\n")


def auth_test(args) -> int:
    password = read_password()

    def action(directory) -> int:
        account = directory.authenticate_sync(args.login, password)
        if account is None:
            print("failed: wrong login or password")
            return EX_NOTFOUND
        where = account.dn or account.address
        print(f"ok: {args.login} authenticated as {where} "
              f"(login {account.login}, address {account.address})")
        senders_for = getattr(directory, "senders_for_sync", None)
        if senders_for is not None:
            senders = sorted(senders_for(account.login))
            print(f"may send as: {', '.join(senders) or '(no address)'}")
        return EX_OK

    return _with_directory(args, action)


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                   help=f"configuration file (default: {DEFAULT_CONFIG})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailserverctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a configuration file offline")
    p.add_argument("file")
    p.set_defaults(func=check_config)
    p = sub.add_parser("lookup", help="show where mail for an address goes, step by step")
    p.add_argument("address")
    _config_option(p)
    p.set_defaults(func=lookup)
    p = sub.add_parser("auth-test", help="check a password (read from the terminal or stdin)")
    p.add_argument("login")
    _config_option(p)
    p.set_defaults(func=auth_test)
    from mailserver.queue.cli import add_queue_commands

    add_queue_commands(sub)
    from mailserver.observe_cli import add_observe_commands

    add_observe_commands(sub, _config_option)
    from mailserver.publish_cli import add_publish_commands

    add_publish_commands(sub, _config_option)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
