# -*- test-case-name: tests.unit.test_relay_domains -*-
"""Corporate relay domains: ours to check, someone else's to store.

A relay domain (``[domains] relay``) is a domain this server receives mail
for from the internet, like a local domain, but whose mailboxes live on an
internal mail system (Exchange, another Postfix, a Dovecot LMTP).  The rules:

* At RCPT time its recipients are checked in the directory exactly as local
  ones are: unknown is ``550 5.1.1``, a disabled account ``550 5.2.1``, an
  outage ``451 4.4.3``, sender restrictions apply.  Anyone may send to them:
  it is inbound mail, not relaying.
* The directory resolves the address as usual (aliases and groups expand,
  nested groups too), but a mailbox whose address is in a relay domain is
  not a maildir: it becomes a *relayed* address of the
  :class:`~mailserver.directory.interfaces.Resolution` (its primary address),
  and never reaches the maildir store.  Forwards stay forwards.
* Relayed addresses are queued with the original envelope sender (no SRS:
  the internal host is part of the organisation) and the queue's router
  sends every address of a relay domain to that domain's internal next hop,
  before it looks at the transport map, the local domains or MX records.

The next hop of each relay domain is ``[relay.internal]`` for that domain,
else ``[relay] internal_host``; both take transport map values limited to
a fixed SMTP or LMTP host (``smtp:[host]:port``, ``smtp:host`` for the MX of
``host``, ``lmtp:host:port``, ``lmtp:unix:/path``, or Postfix's relayhost
form ``[host]:port``).
"""

from __future__ import annotations

from typing import Collection, Dict, Mapping

from mailserver.delivery.routing import Transport, parse_transport


def parse_internal_host(value: str, key: str) -> Transport:
    """A relay domain's next hop; ``ValueError("key: problem")`` when it is not
    a fixed SMTP or LMTP host."""
    text = value.strip()
    if text.partition(":")[0].lower() not in ("smtp", "lmtp", "local", "error", "defer"):
        text = "smtp:" + text  # Postfix relayhost form: [host]:port
    try:
        transport = parse_transport(text)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if transport.kind not in ("smtp", "lmtp") or (transport.host is None
                                                  and not transport.unix_path):
        raise ValueError(f"{key}: {value!r} is not an smtp: or lmtp: next hop with a host")
    return transport


def relay_next_hops(local: Collection[str], relay: Collection[str],
                    internal: Mapping[str, str], internal_host: str = "",
                    transports: Mapping[str, str] = ()) -> Dict[str, Transport]:
    """``{relay domain: next hop}``, checked.

    Raises ``ValueError("config.key: problem")``: a domain both local and
    relay, a relay domain without a next hop, an ``internal`` entry for a
    domain that is not a relay domain, a next hop that is not a fixed SMTP or
    LMTP host, or a transport map entry naming a relay domain exactly (the
    relay domain's next hop belongs in ``[relay.internal]``).
    """
    local_set = {d.lower().rstrip(".") for d in local}
    relay_list = [d.lower().rstrip(".") for d in relay]
    for domain in relay_list:
        if domain in local_set:
            raise ValueError(f"domains.relay: {domain} is also in domains.local; a domain is "
                             "either delivered here or relayed to its internal host")
    entries = {k.lower().rstrip("."): (k, v) for k, v in dict(internal).items()}
    for domain, (key, _v) in entries.items():
        if domain not in relay_list:
            raise ValueError(f"relay.internal.{key}: {key} is not in domains.relay")
    for key in dict(transports or {}):
        if key.strip().lower().rstrip(".") in relay_list:
            raise ValueError(f"relay.transports.{key}: {key} is a relay domain; give its next "
                             "hop in [relay.internal]")
    default = None
    if internal_host:
        default = parse_internal_host(internal_host, "relay.internal_host")
    hops: Dict[str, Transport] = {}
    for domain in relay_list:
        if domain in entries:
            key, value = entries[domain]
            hops[domain] = parse_internal_host(value, f"relay.internal.{key}")
        elif default is not None:
            hops[domain] = default
        else:
            raise ValueError(f"relay.internal: relay domain {domain} has no next hop; add "
                             f'"{domain}" = "smtp:[host]:25" to [relay.internal] or set '
                             "relay.internal_host")
    return hops


def config_next_hops(config) -> Dict[str, Transport]:
    """:func:`relay_next_hops` for a loaded :class:`~mailserver.config.Config`."""
    return relay_next_hops(config.domains.local, config.domains.relay, config.relay.internal,
                           config.relay.internal_host, config.relay.transports)
