# -*- test-case-name: tests.unit.test_publish_cli -*-
"""``mailserverctl dkim genkey`` and ``mailserverctl dns``: what a domain publishes.

``mailserverctl dkim genkey DOMAIN [--selector S] [--algorithm ed25519|rsa]``
writes a new signing key where ``[dkim] key_dir`` says (0600, owned by
``server.user`` when run as root) and prints its TXT record.

``mailserverctl dns DOMAIN [--check]`` prints every record the domain
should publish (:mod:`mailserver.dnsrecords`) as a zone-file fragment; with
``--check`` it asks the configured nameservers (``[relay] nameservers``,
else /etc/resolv.conf) and prints ``match``, ``missing``, ``different`` or
``error`` per record.  Exit status: 0 all match, 1 a record missing or
different, 75 a lookup failed, 78 the configuration is unusable.
"""

from __future__ import annotations

import os
import sys
import time

from mailserver.errors import ConfigError

EX_OK, EX_DIFFERENT, EX_TEMPFAIL, EX_CONFIG = 0, 1, 75, 78


def _fail(message: str) -> None:
    print(f"mailserverctl: {message}", file=sys.stderr)


def _load(path: str):
    from mailserver.config import load_config

    return load_config(path, check_files=False)


def _owner(config):
    """(uid, gid) of server.user when running as root, so the service can
    read the key it signs with; else None (the file stays the caller's)."""
    if os.geteuid() != 0 or not config.server.user:
        return None
    import grp
    import pwd

    user = pwd.getpwnam(config.server.user)
    gid = grp.getgrnam(config.server.group).gr_gid if config.server.group else user.pw_gid
    return user.pw_uid, gid


def genkey(args) -> int:
    from mailserver.msgauth import keys

    try:
        config = _load(args.config)
        domain = keys.check_name("domain", args.domain)
        selector = args.selector or f"{'ed' if args.algorithm == 'ed25519' else 'rsa'}" \
                                    f"{time.strftime('%Y%m', time.gmtime())}"
        selector = keys.check_name("selector", selector)
        owner = _owner(config)
    except (ConfigError, ValueError, KeyError) as e:
        _fail(str(e))
        return EX_CONFIG
    path = keys.key_path(config.dkim.key_dir, domain, selector)
    try:
        keys.write_key(path, keys.generate(args.algorithm), owner)
    except FileExistsError:
        _fail(f"{path} exists: choose another --selector (a key is never overwritten)")
        return EX_CONFIG
    except OSError as e:
        _fail(f"{path}: {e.strerror}")
        return EX_CONFIG
    key = keys.load_key(path, domain, selector)
    print(f"wrote {path} ({args.algorithm}, mode 0600)", file=sys.stderr)
    if domain not in config.domains.local:
        print(f"note: {domain} is not in domains.local", file=sys.stderr)
    listed = config.dkim.domain_selectors.get(domain, "").replace(",", " ").split() \
        or config.dkim.selectors
    if listed and selector not in listed:
        print(f"note: it signs once dkim.selectors (or dkim.domain_selectors) lists "
              f"{selector!r}; publish this record first", file=sys.stderr)
    elif not listed:
        print("note: every key of the domain signs (dkim.selectors is empty): this one "
              "does from the next message on", file=sys.stderr)
    print(keys.dns_record(key, config.dns.ttl or None))
    return EX_OK


def dns(args) -> int:
    from mailserver import dnsrecords
    from mailserver.msgauth.keys import KeyStore, check_name

    try:
        config = _load(args.config)
        domain = check_name("domain", args.domain)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
        return EX_CONFIG
    d = config.dkim
    per_domain = {k: tuple(v.replace(",", " ").split()) for k, v in d.domain_selectors.items()}
    keys, problems = KeyStore(d.key_dir, d.selectors, per_domain).keys_for(domain)
    notes = [f"DKIM key unusable: {p}" for p in problems]
    if not keys:
        notes.append(f"no DKIM key for {domain}: run mailserverctl dkim genkey {domain}")
    if domain not in config.domains.local:
        notes.append(f"{domain} is not in domains.local")
    published = dnsrecords.records_for(config, domain, keys, notes)
    if not args.check:
        sys.stdout.write(dnsrecords.zone_text(published))
        return EX_OK
    for note in notes:
        print(f"; WARNING: {note}")
    lookup = dnsrecords.dnspython_lookup(config.relay.nameservers, timeout=args.timeout)
    comparisons = dnsrecords.compare(published.records, lookup)
    sys.stdout.write(dnsrecords.report(comparisons))
    return dnsrecords.exit_status(comparisons)


def add_publish_commands(sub, config_option) -> None:
    from mailserver.msgauth.keys import ALGORITHMS

    p = sub.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = p.add_subparsers(dest="dkim_command", required=True)
    g = dkim_sub.add_parser("genkey", help="write a new signing key and print its DNS record")
    g.add_argument("domain")
    g.add_argument("--selector", "-s", help="default: ed or rsa and the year and month")
    g.add_argument("--algorithm", "-a", choices=ALGORITHMS, default="ed25519")
    config_option(g)
    g.set_defaults(func=genkey)
    p = sub.add_parser("dns", help="print (or --check) the DNS records a local domain publishes")
    p.add_argument("domain")
    p.add_argument("--check", action="store_true", help="compare with what DNS answers now")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per lookup (default 5)")
    config_option(p)
    p.set_defaults(func=dns)
