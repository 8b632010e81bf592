# -*- test-case-name: tests.unit.test_config -*-
"""The configuration: one TOML file, validated before anything binds.

Each TOML table maps onto a frozen dataclass below.  Field types, defaults and
the ``doc`` metadata are the schema; :func:`load_config` checks every key
(unknown keys, wrong types, bad values, unreadable files) and raises
:class:`~mailserver.errors.ConfigError` naming the file, the key and the
problem.  ``etc/mailserver.toml`` documents every key with its default, and a
test keeps that file and these dataclasses in step.

Relative paths are resolved against ``server.base_dir``, which defaults to the
working directory the server (or ``mailserverctl``) was started in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from mailserver.errors import ConfigError

PROTOCOLS = ("smtp", "submission", "lmtp", "pop3")
TLS_MODES = ("none", "starttls", "implicit")
BACKENDS = ("ldif", "ldap")
TLS_POLICIES = ("none", "may", "encrypt", "verify")


def _doc(text: str, **kw: Any) -> dict:
    return {"doc": text, **kw}


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(
        default="", metadata=_doc("Name used in greetings and Received headers; default: the FQDN.")
    )
    base_dir: str = field(
        default="", metadata=_doc("Relative paths resolve against this; default: working directory.")
    )
    max_connections: int = field(default=200, metadata=_doc("Connections per listener.", min=1))
    max_connections_per_client: int = field(
        default=20, metadata=_doc("Connections from one client address.", min=1)
    )
    io_threads: int = field(default=8, metadata=_doc("Threads for disk writes and fsync.", min=1))
    workers: int = field(
        default=0, metadata=_doc("Worker processes taking connections: 0 = one per core, "
                                 "1 = everything in one process.", min=0))
    spool_dir: str = field(
        default="var/spool", metadata=_doc("Where message data waits until it is delivered.", path=True)
    )
    # -- lifecycle: privileges and shutdown ---------------------------------
    user: str = field(
        default="", metadata=_doc("Run as this user once ports are bound (only when started "
                                  "as root; twistd --uid wins)."))
    group: str = field(
        default="", metadata=_doc("Run as this group; default: the user's primary group "
                                  "(twistd --gid wins)."))
    allow_root: bool = field(
        default=False, metadata=_doc("Allow running as root without dropping privileges."))
    shutdown_grace: float = field(
        default=30.0, metadata=_doc("Seconds SIGTERM leaves transactions in flight to finish.",
                                    min=0))


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = field(default="", metadata=_doc("PEM certificate chain.", path=True))
    private_key: str = field(default="", metadata=_doc("PEM private key.", path=True))
    self_signed: bool = field(
        default=False, metadata=_doc("Create a self-signed pair at those paths when missing.")
    )
    sni: Dict[str, str] = field(
        default_factory=dict,
        metadata=_doc("More certificates chosen by the client's server name: host name "
                      "(or *.domain) = PEM file holding key and chain.", path_values=True))


@dataclass(frozen=True)
class DomainsConfig:
    local: Tuple[str, ...] = field(
        default=(), metadata=_doc("Domains whose mail is delivered here (recipients checked).")
    )
    catch_all: bool = field(
        default=False, metadata=_doc("Unknown users of a domain go to the entry owning @domain.")
    )
    # -- corporate relay domains (see mailserver/delivery/relaydomains.py) --
    relay: Tuple[str, ...] = field(
        default=(), metadata=_doc("Domains whose recipients are checked in the directory and "
                                  "whose mail goes to an internal host ([relay] internal), "
                                  "never to a maildir.")
    )


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: int = field(
        default=26214400, metadata=_doc("Octets; advertised in SIZE. 0 = no limit.", min=0)
    )
    max_recipients: int = field(default=100, metadata=_doc("Recipients per message.", min=1))
    max_errors: int = field(default=20, metadata=_doc("Error replies per session before 421.", min=1))
    max_received_headers: int = field(
        default=50, metadata=_doc("More Received headers than this is a loop (554 5.4.6).", min=1)
    )
    command_line_limit: int = field(
        default=512, metadata=_doc("Octets per command line, CRLF included (RFC 5321 4.5.3.1.4).", min=512)
    )
    text_line_limit: int = field(
        default=1000, metadata=_doc("Octets per message line, CRLF included (RFC 5321 4.5.3.1.6).", min=1000)
    )
    command_timeout: float = field(
        default=300.0, metadata=_doc("Seconds to wait for a command (RFC 5321 4.5.3.2).", min=1)
    )
    data_timeout: float = field(
        default=180.0, metadata=_doc("Seconds to wait for each block of message data.", min=1)
    )
    # -- slow and repetitive clients (issue 13 item 2; Postfix's names in brackets)
    min_data_rate: int = field(
        default=500, metadata=_doc("Octets per second a client must keep up during DATA/BDAT: "
                                   "the data may take data_timeout plus one second per this "
                                   "many octets received [smtpd_min_data_rate]. 0 = off.", min=0))
    junk_command_limit: int = field(
        default=100, metadata=_doc("NOOP/RSET/VRFY/HELP/ETRN, repeated HELO/EHLO and RCPTs past "
                                   "max_recipients per session (counted again after "
                                   "each accepted message) before 421 4.7.0 "
                                   "[smtpd_junk_command_limit]. 0 = no limit.", min=0))
    connection_rate_limit: int = field(
        default=60, metadata=_doc("Connections per client (address or IPv6 /64) per minute on "
                                  "each SMTP, submission or LMTP listener before 421 4.7.0 "
                                  "(relay.trusted_networks exempt) [smtpd_client_connection_rate_limit]. "
                                  "0 = no limit.", min=0))
    requiretls: bool = field(
        default=False, metadata=_doc("Offer REQUIRETLS (RFC 8689) on TLS sessions."))


@dataclass(frozen=True)
class AuthConfig:
    mechanisms: Tuple[str, ...] = field(
        default=("PLAIN", "LOGIN"), metadata=_doc("SASL mechanisms offered, in this order."))
    failure_delay: float = field(
        default=2.0, metadata=_doc("Seconds before answering a failed login; doubles per failure.",
                                   min=0.1))
    max_failure_delay: float = field(
        default=15.0, metadata=_doc("The longest delay after a failed login, seconds.", min=0))
    max_failures: int = field(
        default=10, metadata=_doc("Failed logins per client address or per account before "
                                  "421 and disconnect.", min=1))
    failure_window: float = field(
        default=900.0, metadata=_doc("Seconds a failed login is remembered.", min=1))


@dataclass(frozen=True)
class SubmissionConfig:
    check_from_header: bool = field(
        default=True, metadata=_doc("The From: addresses must be owned by the login too."))
    send_as_anyone: Tuple[str, ...] = field(
        default=(), metadata=_doc("Logins that may use any envelope sender and From:."))
    hide_client_address: bool = field(
        default=False, metadata=_doc("Leave the client's address and HELO out of Received."))
    messages_per_hour: int = field(default=200, metadata=_doc("Per login; 0 = no limit.", min=0))
    messages_per_day: int = field(default=1000, metadata=_doc("Per login; 0 = no limit.", min=0))
    recipients_per_hour: int = field(default=1000, metadata=_doc("Per login; 0 = no limit.",
                                                                 min=0))
    recipients_per_day: int = field(default=5000, metadata=_doc("Per login; 0 = no limit.",
                                                                min=0))
    rate_limit_exempt: Tuple[str, ...] = field(
        default=(), metadata=_doc("Logins never rate limited (still counted)."))


@dataclass(frozen=True)
class POP3Config:
    idle_timeout: float = field(
        default=600.0, metadata=_doc("Seconds a POP3 session may stay idle (RFC 1939: at least "
                                     "600).", min=1))
    connection_rate_limit: int = field(
        default=60, metadata=_doc("Connections per client (address or IPv6 /64) per minute on "
                                  "each POP3 listener before -ERR [SYS/TEMP] (relay."
                                  "trusted_networks exempt). 0 = no limit.", min=0))
    junk_command_limit: int = field(
        default=100, metadata=_doc("NOOP, RSET and CAPA per POP3 session before -ERR [SYS/TEMP] "
                                   "and disconnect. 0 = no limit.", min=0))


@dataclass(frozen=True)
class ListenerConfig:
    protocol: str = field(default="smtp", metadata=_doc("smtp, submission, lmtp or pop3.",
                                                        choices=PROTOCOLS))
    address: str = field(
        default="", metadata=_doc("host:port, [v6]:port, :port (all addresses) or unix:/path.")
    )
    tls: str = field(
        default="", metadata=_doc("starttls, implicit (TLS from the first byte, port 465) or none; "
                                  "default starttls for smtp and submission when a certificate "
                                  "is set.", choices=TLS_MODES + ("",))
    )
    auth: bool = field(
        default=False, metadata=_doc("Offer SMTP AUTH on an smtp listener; submission always does."))
    plaintext_auth: bool = field(
        default=False, metadata=_doc("Allow AUTH without TLS (loopback or a trusted network only)."))
    name: str = field(default="", metadata=_doc("Name used in logs; default: protocol and address."))
    socket_mode: int = field(default=0o660, metadata=_doc("Permissions of a UNIX socket.", min=0))


@dataclass(frozen=True)
class DirectoryConfig:
    backend: str = field(default="ldif", metadata=_doc("ldif (embedded) or ldap.", choices=BACKENDS))
    ldif_file: str = field(default="", metadata=_doc("LDIF loaded by the embedded backend.", path=True))
    uris: Tuple[str, ...] = field(default=(), metadata=_doc("LDAP server URIs, tried in order."))
    base_dn: str = field(default="", metadata=_doc("Search base."))
    tls_ca_file: str = field(default="", metadata=_doc("CA bundle for ldaps:// and StartTLS.", path=True))
    tls_cert_file: str = field(default="", metadata=_doc("Client certificate (PEM).", path=True))
    tls_key_file: str = field(default="", metadata=_doc("Client certificate key (PEM).", path=True))
    starttls: bool = field(default=False, metadata=_doc("StartTLS on ldap:// URIs."))
    bind_dn: str = field(default="", metadata=_doc("Service account DN; empty = anonymous."))
    bind_password: str = field(default="", metadata=_doc("Service account password."))
    scope: str = field(default="subtree", metadata=_doc("subtree or one.", choices=("subtree", "one")))
    schema: str = field(default="openldap", metadata=_doc("Preset schema mapping."))
    address_filter: str = field(default="", metadata=_doc("Override: entries owning {address}."))
    login_filter: str = field(default="", metadata=_doc("Override: the account for {login}."))
    entry_filter: str = field(default="", metadata=_doc("Override: filter for entries read by DN."))
    mail_attribute: str = field(default="", metadata=_doc("Override: primary address attribute."))
    address_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    login_attribute: str = field(default="", metadata=_doc("Override: login name attribute."))
    target_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    group_classes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    member_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    account_filter: str = field(default="", metadata=_doc("Override: what an account is."))
    login_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override: login names."))
    proxy_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    member_of_attribute: str = field(default="", metadata=_doc("Override."))
    disabled_attribute: str = field(default="", metadata=_doc("Override."))
    disabled_mask: int = field(default=0, metadata=_doc("Override.", min=0))
    allowed_sender_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    members_only_attribute: str = field(default="", metadata=_doc("Override."))
    authenticated_only_attribute: str = field(default="", metadata=_doc("Override."))
    send_as_attributes: Tuple[str, ...] = field(default=(), metadata=_doc("Override."))
    nested_groups: str = field(default="walk", metadata=_doc("walk or in_chain.",
                                                             choices=("walk", "in_chain")))
    domain_filter: str = field(default="", metadata=_doc("Entries making {domain} local."))
    domain_base_dn: str = field(default="", metadata=_doc("Search base for domain_filter."))
    connect_timeout: float = field(default=5.0, metadata=_doc("Seconds.", min=0.1))
    operation_timeout: float = field(default=10.0, metadata=_doc("Seconds.", min=0.1))
    pool_size: int = field(default=4, metadata=_doc("Threads (and connections) for LDAP calls.", min=1))
    max_depth: int = field(default=10, metadata=_doc("Alias/group nesting followed.", min=1))
    max_expansions: int = field(default=1000, metadata=_doc("Entries read per address.", min=1))
    cache_ttl: float = field(default=60.0, metadata=_doc("Seconds a found address is cached.", min=0))
    negative_cache_ttl: float = field(
        default=10.0, metadata=_doc("Seconds an unknown address is cached.", min=0))
    cache_size: int = field(default=10000, metadata=_doc("Cached answers, at most; 0 = no cache.",
                                                         min=0))


@dataclass(frozen=True)
class StoreConfig:
    maildir_root: str = field(default="var/mail", metadata=_doc("Root of all maildirs.", path=True))
    template: str = field(
        default="{domain}/{localpart}", metadata=_doc("Maildir of a mailbox under the root.")
    )
    fsync: bool = field(default=True, metadata=_doc("fsync each delivery. Never turn off in production."))


@dataclass(frozen=True)
class QueueConfig:
    directory: str = field(default="var/queue", metadata=_doc("The outbound queue.", path=True))
    max_active: int = field(default=100, metadata=_doc("Messages being delivered at once.", min=1))
    min_backoff: float = field(default=300.0, metadata=_doc("First retry delay, seconds.", min=1))
    max_backoff: float = field(default=3600.0, metadata=_doc("Longest retry delay, seconds.", min=1))
    lifetime: float = field(default=432000.0, metadata=_doc("Bounce after this many seconds.", min=1))
    delay_warning: float = field(default=0.0, metadata=_doc("Warn the sender after; 0 = never.",
                                                            min=0))
    scan_interval: float = field(default=60.0, metadata=_doc("Seconds between queue scans.", min=1))
    destination_concurrency: int = field(
        default=20, metadata=_doc("Parallel deliveries to one destination.", min=1))
    # -- issue 13 item 9: undeliverable bounces --
    notify_postmaster: bool = field(
        default=True, metadata=_doc("Tell postmaster@<first local domain> of undeliverable "
                                    "bounces."))


@dataclass(frozen=True)
class RelayConfig:
    trusted_networks: Tuple[str, ...] = field(
        default=("127.0.0.0/8", "::1/128"),
        metadata=_doc("Clients that may relay through port 25 (Postfix mynetworks)."))
    etrn: bool = field(default=True, metadata=_doc("Accept ETRN from trusted networks."))
    helo_name: str = field(default="", metadata=_doc("EHLO name outbound; default hostname."))
    tls: str = field(default="may", metadata=_doc("Outbound TLS policy.", choices=TLS_POLICIES))
    tls_policies: Dict[str, str] = field(default_factory=dict,
                                         metadata=_doc("Per-domain TLS policy."))
    tls_ca_file: str = field(default="", metadata=_doc("CAs for tls = verify.", path=True))
    smarthost: str = field(default="", metadata=_doc("Send everything non-local here."))
    smarthost_username: str = field(default="", metadata=_doc("AUTH login at the smarthost."))
    smarthost_password: str = field(default="", metadata=_doc("AUTH password at the smarthost."))
    transports: Dict[str, str] = field(default_factory=dict, metadata=_doc("Transport map."))
    nameservers: Tuple[str, ...] = field(default=(), metadata=_doc("DNS servers; [] = resolv.conf."))
    mta_sts: bool = field(default=False, metadata=_doc("Honour recipient domains' MTA-STS."))
    mta_sts_ca_file: str = field(
        default="", metadata=_doc("CAs for MTA-STS; \"\" = the system's.", path=True))
    dane: bool = field(default=False, metadata=_doc("DANE; the nameservers validate DNSSEC."))
    connect_timeout: float = field(default=30.0, metadata=_doc("Seconds to connect.", min=1))
    srs_secret: str = field(default="", metadata=_doc("SRS for forwarded mail; \"\" = off."))
    srs_domain: str = field(default="", metadata=_doc("Domain of SRS addresses; first local."))
    srs_max_age: int = field(default=21, metadata=_doc("Days an SRS address stays valid.", min=1))
    # -- next hops of the corporate relay domains ([domains] relay) --
    internal_host: str = field(
        default="", metadata=_doc("Next hop for relay domains without their own entry."))
    internal: Dict[str, str] = field(
        default_factory=dict, metadata=_doc("Next hop per relay domain (smtp: or lmtp:)."))


# -- DKIM signing and the records to publish (issue 12) ------------------------
DMARC_POLICIES = ("none", "quarantine", "reject")
MTA_STS_MODES = ("none", "testing", "enforce")


@dataclass(frozen=True)
class DKIMConfig:
    sign: bool = field(
        default=True, metadata=_doc("Sign mail leaving a local domain that has a key."))
    key_dir: str = field(
        default="var/dkim", metadata=_doc("Keys: key_dir/DOMAIN/SELECTOR.key (0600).", path=True))
    selectors: Tuple[str, ...] = field(
        default=(), metadata=_doc("Selectors signing for every domain; [] = every key file of "
                                  "the domain."))
    domain_selectors: Dict[str, str] = field(
        default_factory=dict, metadata=_doc("Selectors per domain (space separated); wins over "
                                            "selectors."))
    sign_forwarded: bool = field(
        default=True, metadata=_doc("Sign copies that forwards send outside, for the "
                                    "forwarding address's domain."))


@dataclass(frozen=True)
class DNSRecordsConfig:
    mx: Tuple[str, ...] = field(
        default=(), metadata=_doc("MX hosts in preference order; [] = server.hostname."))
    spf: str = field(default="v=spf1 mx -all", metadata=_doc("The SPF record to publish."))
    dmarc_policy: str = field(default="none", metadata=_doc("DMARC p=.",
                                                            choices=DMARC_POLICIES))
    dmarc_reports: str = field(
        default="postmaster@{domain}", metadata=_doc("Where DMARC aggregate reports go."))
    mta_sts_mode: str = field(default="testing", metadata=_doc("The MTA-STS policy's mode.",
                                                               choices=MTA_STS_MODES))
    mta_sts_max_age: int = field(
        default=604800, metadata=_doc("The MTA-STS policy's max_age, seconds.", min=86400))
    tls_reports: str = field(
        default="postmaster@{domain}", metadata=_doc("Where TLS-RPT reports go."))
    ttl: int = field(default=3600, metadata=_doc("TTL of the printed records.", min=0))
# -- inbound message authentication: [checks] ----------------------------------
@dataclass(frozen=True)
class ChecksConfig:
    enabled: bool = field(
        default=True, metadata=_doc("SPF, DKIM, ARC and DMARC on smtp listeners (port 25)."))
    authserv_id: str = field(
        default="", metadata=_doc("Name in Authentication-Results; \"\" = server.hostname."))
    dmarc_reject: bool = field(
        default=True, metadata=_doc("550 5.7.1 when a p=reject domain's DMARC check fails."))
    dmarc_quarantine: bool = field(
        default=True, metadata=_doc("Mark as junk when a p=quarantine domain's check fails."))
    spf_reject: bool = field(default=False, metadata=_doc("550 5.7.23 at MAIL when SPF fails."))
    junk_folder: str = field(
        default="", metadata=_doc("Maildir++ folder for junk (\"Junk\" = .Junk); \"\" = none."))
    dns_timeout: float = field(
        default=10.0, metadata=_doc("Seconds of DNS per check (SPF; DKIM, ARC and DMARC).",
                                    min=0.1))
    threads: int = field(default=4, metadata=_doc("Threads for the checks' DNS.", min=1))


# -- observation: [metrics] and [log] ------------------------------------------
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class MetricsConfig:
    address: str = field(
        default="", metadata=_doc("host:port of the Prometheus endpoint; \"\" = off."))
    allow_remote: bool = field(
        default=False, metadata=_doc("Allow a non-loopback metrics address."))


@dataclass(frozen=True)
class LogConfig:
    format: str = field(default="text", metadata=_doc("text or json lines.",
                                                      choices=LOG_FORMATS))
    file: str = field(default="", metadata=_doc("Log file; \"\" = twistd's output.", path=True))
    syslog: bool = field(default=False, metadata=_doc("Send lines to the local syslog (mail)."))
    syslog_socket: str = field(default="/dev/log", metadata=_doc("The syslog socket."))


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    tls: TLSConfig
    domains: DomainsConfig
    smtp: SMTPConfig
    directory: DirectoryConfig
    store: StoreConfig
    queue: QueueConfig
    relay: RelayConfig
    auth: AuthConfig
    submission: SubmissionConfig
    pop3: POP3Config
    listeners: Tuple[ListenerConfig, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    dns: DNSRecordsConfig = field(default_factory=DNSRecordsConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    @property
    def has_tls(self) -> bool:
        return bool(self.tls.certificate)


SECTIONS = {
    "server": ServerConfig,
    "tls": TLSConfig,
    "domains": DomainsConfig,
    "smtp": SMTPConfig,
    "directory": DirectoryConfig,
    "store": StoreConfig,
    "queue": QueueConfig,
    "relay": RelayConfig,
    "auth": AuthConfig,
    "submission": SubmissionConfig,
    "pop3": POP3Config,
}
SECTIONS["metrics"] = MetricsConfig
SECTIONS["log"] = LogConfig
SECTIONS["dkim"] = DKIMConfig
SECTIONS["dns"] = DNSRecordsConfig
SECTIONS["checks"] = ChecksConfig


def _check_value(path: str, key: str, f: dataclasses.Field, value: Any) -> Any:
    hint = f.type if not isinstance(f.type, str) else _HINTS[f.type]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, key, f"expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, key, f"expected a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, key, f"expected a string, got {value!r}")
    elif hint == Dict[str, str]:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ConfigError(path, key, f"expected a table of strings, got {value!r}")
        value = dict(value)
    elif hint == Tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(path, key, f"expected a list of strings, got {value!r}")
        value = tuple(value)
    meta = f.metadata
    if "min" in meta and value < meta["min"]:
        raise ConfigError(path, key, f"must be at least {meta['min']}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(c for c in meta["choices"] if c)
        raise ConfigError(path, key, f"must be one of {allowed}; got {value!r}")
    return value


_HINTS = {
    "str": str, "int": int, "bool": bool, "float": float,
    "Tuple[str, ...]": Tuple[str, ...],
    "Dict[str, str]": Dict[str, str],
}


def _build(path: str, prefix: str, cls: type, table: Any, base_dir: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(path, prefix, "expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError(path, full, "unknown key")
        f = fields[key]
        try:
            value = _check_value(path, full, f, value)
        except ConfigError as e:
            if not _secret_key(key):
                raise
            # The error goes to stderr and, on SIGHUP, to the log: never the value.
            raise ConfigError(path, full, e.problem.replace(repr(value), "(value hidden)")) \
                from None
        if f.metadata.get("path") and value:
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        if f.metadata.get("path_values"):
            value = {k: os.path.normpath(os.path.join(base_dir, os.path.expanduser(v)))
                     for k, v in value.items()}
        values[key] = value
    # Defaults that are paths resolve against base_dir too.
    for name, f in fields.items():
        if name not in values and f.metadata.get("path") and f.default:
            values[name] = os.path.normpath(os.path.join(base_dir, f.default))
    return cls(**values)


def _secret_key(key: str) -> bool:
    """A key whose value must not appear in an error (a password, a secret)."""
    return any(word in key for word in ("password", "secret"))


def parse_address(address: str) -> Tuple[str, str, Optional[int]]:
    """Split a listener address into (kind, host-or-path, port).

    ``kind`` is ``tcp4``, ``tcp6`` or ``unix``.  Raises ValueError.
    """
    if address.startswith("unix:"):
        p = address[5:]
        if not p:
            raise ValueError("unix: needs a path")
        return "unix", p, None
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            raise ValueError("expected [ipv6]:port")
        ipaddress.IPv6Address(host)
        kind = "tcp6"
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            raise ValueError("expected host:port, [ipv6]:port, :port or unix:/path")
        if host:
            ipaddress.IPv4Address(host)
        kind = "tcp4"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port {port!r}")
    return kind, host, int(port)


def _listeners(path: str, raw: Any, base_dir: str, has_cert: bool) -> Tuple[ListenerConfig, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, "listeners", "at least one [[listeners]] table is required")
    out = []
    for i, table in enumerate(raw):
        prefix = f"listeners[{i}]"
        lc = _build(path, prefix, ListenerConfig, table, base_dir)
        if not lc.address:
            raise ConfigError(path, f"{prefix}.address", "is required")
        try:
            kind, host, _port = parse_address(lc.address)
        except ValueError as e:
            raise ConfigError(path, f"{prefix}.address", f"{lc.address!r}: {e}") from None
        if lc.protocol == "lmtp" and _port == 25:  # issue 13 item 8
            raise ConfigError(path, f"{prefix}.address", f"{lc.address}: LMTP must not listen "
                              "on TCP port 25 (RFC 2033 section 5); use 24 or a UNIX socket")
        tls = lc.tls or ("starttls" if has_cert and lc.protocol != "lmtp" else "none")
        if tls != "none" and not has_cert:
            raise ConfigError(path, f"{prefix}.tls", f"{tls} needs tls.certificate")
        if lc.protocol == "lmtp" and lc.auth:
            raise ConfigError(path, f"{prefix}.auth", "LMTP has no AUTH")
        if lc.protocol in ("submission", "pop3") and tls == "none" and not lc.plaintext_auth:
            raise ConfigError(path, f"{prefix}.tls", f"{lc.protocol} without TLS cannot log anyone "
                              "in; configure a certificate or set plaintext_auth = true")
        if lc.protocol == "pop3" and lc.auth:
            raise ConfigError(path, f"{prefix}.auth", "POP3 always logs users in; leave it out")
        if tls == "implicit" and kind == "unix":
            raise ConfigError(path, f"{prefix}.tls", "implicit TLS needs a TCP address")
        address = lc.address
        if kind == "unix":
            address = "unix:" + os.path.normpath(os.path.join(base_dir, host))
        name = lc.name or f"{lc.protocol}/{address}"
        out.append(dataclasses.replace(lc, tls=tls, address=address, name=name))
    return tuple(out)


def load_config(path: str, *, check_files: bool = True) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` on any problem."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"invalid TOML: {e}") from None
    for key in raw:
        if key not in SECTIONS and key != "listeners":
            raise ConfigError(path, key, "unknown section")
    server = _build(path, "server", ServerConfig, raw.get("server", {}), os.getcwd())
    base_dir = os.path.abspath(server.base_dir or os.getcwd())
    server = _build(path, "server", ServerConfig, raw.get("server", {}), base_dir)
    if not server.hostname:
        server = dataclasses.replace(server, hostname=socket.getfqdn())
    sections = {"server": server}
    for name, cls in SECTIONS.items():
        if name != "server":
            sections[name] = _build(path, name, cls, raw.get(name, {}), base_dir)
    tls: TLSConfig = sections["tls"]
    if bool(tls.certificate) != bool(tls.private_key):
        raise ConfigError(path, "tls.private_key" if tls.certificate else "tls.certificate",
                          "certificate and private_key go together")
    domains = sections["domains"]
    sections["domains"] = dataclasses.replace(
        domains, local=tuple(d.lower().rstrip(".") for d in domains.local),
        relay=tuple(d.lower().rstrip(".") for d in domains.relay),
    )
    listeners = _listeners(path, raw.get("listeners"), base_dir, bool(tls.certificate))
    config = Config(path=path, listeners=listeners, **sections)
    _check_semantics(config)
    if check_files:
        check_files_readable(config)
    return config


def _check_semantics(config: Config) -> None:
    path = config.path
    d = config.directory
    if d.backend == "ldif" and not d.ldif_file:
        raise ConfigError(path, "directory.ldif_file", "is required with backend = \"ldif\"")
    if d.backend == "ldap":
        if not d.uris:
            raise ConfigError(path, "directory.uris", "is required with backend = \"ldap\"")
        for uri in d.uris:
            if not uri.startswith(("ldap://", "ldaps://", "ldapi://")):
                raise ConfigError(path, "directory.uris", f"{uri!r} is not an ldap:// or ldaps:// URI")
        if not d.base_dn:
            raise ConfigError(path, "directory.base_dn", "is required with backend = \"ldap\"")
    from mailserver.directory.factory import settings_from_config

    try:
        settings_from_config(d, config.domains.local, config.domains.relay)
    except ValueError as e:
        problem = str(e)
        key = problem.split(" ", 1)[0]
        if key not in {f.name for f in dataclasses.fields(DirectoryConfig)}:
            key = "schema"
        raise ConfigError(path, f"directory.{key}", problem) from None
    if not config.domains.local and not config.domains.relay:
        raise ConfigError(path, "domains.local", "name at least one local (or relay) domain")
    _check_relay_domains(config)
    from mailserver.store.maildir import MaildirStore

    try:  # the store's own check, so config and store never disagree
        MaildirStore(config.store.maildir_root, template=config.store.template)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(path, "store.template", str(e)) from None
    for net in config.relay.trusted_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(path, "relay.trusted_networks", f"{net!r} is not a network") from None
    for domain, policy in config.relay.tls_policies.items():
        if policy not in TLS_POLICIES:
            raise ConfigError(path, f"relay.tls_policies.{domain}",
                              f"must be one of {', '.join(TLS_POLICIES)}; got {policy!r}")
    if config.relay.dane and not config.relay.nameservers:
        raise ConfigError(path, "relay.dane", "needs relay.nameservers: the validating DNSSEC "
                                              "resolvers whose AD bit is trusted")
    for server in config.relay.nameservers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        try:
            ipaddress.ip_address(host or server)
        except ValueError:
            raise ConfigError(path, "relay.nameservers",
                              f"{server!r} is not an IP address (with an optional :port)") from None
    from mailserver.delivery.routing import parse_smarthost, parse_transport_map

    try:
        parse_transport_map(config.relay.transports)
    except ValueError as e:
        raise ConfigError(path, "relay.transports", str(e)) from None
    if config.relay.smarthost:
        if "*" in config.relay.transports:
            raise ConfigError(path, "relay.smarthost",
                              "give a smarthost or a \"*\" transport, not both")
        try:
            parse_smarthost(config.relay.smarthost)
        except ValueError as e:
            raise ConfigError(path, "relay.smarthost", str(e)) from None
    from mailserver import sasl

    for mech in config.auth.mechanisms:
        if mech.upper() not in sasl.MECHANISMS:
            raise ConfigError(path, "auth.mechanisms", f"{mech!r} is not one of "
                              f"{', '.join(sasl.MECHANISMS)}")
    if not config.auth.mechanisms and any(
            lc.protocol in ("submission", "pop3") or lc.auth for lc in config.listeners):
        raise ConfigError(path, "auth.mechanisms", "a listener offers AUTH: name a mechanism")
    if config.tls.sni and not config.tls.certificate:
        raise ConfigError(path, "tls.sni", "needs tls.certificate (the default)")
    seen = set()
    for i, lc in enumerate(config.listeners):
        if lc.address in seen:
            raise ConfigError(path, f"listeners[{i}].address", f"{lc.address} is used twice")
        seen.add(lc.address)
    _check_directories(config)
    _check_metrics(config)
    _check_dkim(config)
    folder = config.checks.junk_folder
    if folder and not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", folder):
        raise ConfigError(path, "checks.junk_folder", f"{folder!r}: use letters, digits, "
                          "- and _, with dots between sub-folder names (Maildir++)")


def _check_metrics(config: Config) -> None:
    """The metrics endpoint: host:port, on loopback unless allow_remote."""
    m = config.metrics
    if not m.address:
        return
    try:
        kind, host, _port = parse_address(m.address)
    except ValueError as e:
        raise ConfigError(config.path, "metrics.address", f"{m.address!r}: {e}") from None
    if kind == "unix":
        raise ConfigError(config.path, "metrics.address", "needs host:port, not a UNIX socket")
    if not m.allow_remote and (not host or not ipaddress.ip_address(host).is_loopback):
        raise ConfigError(config.path, "metrics.address", f"{m.address} is not a loopback "
                          "address; set metrics.allow_remote = true to expose it")


def _check_dkim(config: Config) -> None:
    """Selectors and domains of ``[dkim]`` are DNS names (they name files too)."""
    from mailserver.msgauth.keys import check_name

    d = config.dkim
    names = [("dkim.selectors", "selector", s) for s in d.selectors]
    for domain, selectors in d.domain_selectors.items():
        names.append(("dkim.domain_selectors", "domain", domain))
        names.extend(("dkim.domain_selectors", "selector", s)
                     for s in selectors.replace(",", " ").split())
    for key, kind, value in names:
        try:
            check_name(kind, value)
        except ValueError as e:
            raise ConfigError(config.path, key, str(e)) from None
    if config.dns.mta_sts_max_age > 31557600:
        raise ConfigError(config.path, "dns.mta_sts_max_age",
                          "must be at most 31557600 (one year, RFC 8461 3.2)")


def _check_relay_domains(config: Config) -> None:
    """``[domains] relay``: never also local, each with a next hop."""
    from mailserver.delivery.relaydomains import relay_next_hops

    try:
        relay_next_hops(config.domains.local, config.domains.relay, config.relay.internal,
                        config.relay.internal_host, config.relay.transports)
    except ValueError as e:
        key, _, problem = str(e).partition(": ")
        raise ConfigError(config.path, key, problem) from None


def _check_directories(config: Config) -> None:
    """The spool, the maildir root and the queue must not share any directory.

    Each owns what lies below it: at start the spool empties ``incoming/``,
    which is also where the queue keeps envelopes of messages due now, and
    maildirs are created from addresses anywhere under their root.  Equal or
    nested directories would have one of them delete the other's files.
    """
    dirs = (("server.spool_dir", config.server.spool_dir),
            ("store.maildir_root", config.store.maildir_root),
            ("queue.directory", config.queue.directory))
    for i, (key, value) in enumerate(dirs):
        mine = os.path.realpath(value)
        for other_key, other_value in dirs[:i]:
            other = os.path.realpath(other_value)
            if mine == other:
                problem = f"{value} is also {other_key}"
            elif os.path.commonpath((mine, other)) == other:
                problem = f"{value} is inside {other_key} ({other_value})"
            elif os.path.commonpath((mine, other)) == mine:
                problem = f"{value} contains {other_key} ({other_value})"
            else:
                continue
            raise ConfigError(config.path, key, problem + "; each needs a directory of its own")


def check_files_readable(config: Config) -> None:
    """Files the server reads at start must be readable (certificate, LDIF)."""
    path = config.path
    tls = config.tls
    for key, value in (("tls.certificate", tls.certificate), ("tls.private_key", tls.private_key)):
        if not value:
            continue
        if os.path.exists(value):
            if not os.access(value, os.R_OK):
                raise ConfigError(path, key, f"{value}: not readable")
        elif not tls.self_signed:
            raise ConfigError(path, key, f"{value}: no such file (set tls.self_signed to create one)")
    if tls.certificate and os.path.exists(tls.certificate):
        from mailserver.tls import load_certificate

        try:
            load_certificate(tls.certificate, tls.private_key)
        except ValueError as e:
            raise ConfigError(path, "tls.certificate", str(e)) from None
    for name, bundle in tls.sni.items():
        from mailserver.tls import load_pem_bundle

        try:
            load_pem_bundle(bundle)
        except ValueError as e:
            raise ConfigError(path, f"tls.sni.{name}", str(e)) from None
    d = config.directory
    if d.backend == "ldif":
        if not os.path.isfile(d.ldif_file) or not os.access(d.ldif_file, os.R_OK):
            raise ConfigError(path, "directory.ldif_file", f"{d.ldif_file}: not a readable file")


def schema_fields() -> dict[str, list[dataclasses.Field]]:
    """Every section and its fields (used to check etc/mailserver.toml)."""
    out = {name: list(dataclasses.fields(cls)) for name, cls in SECTIONS.items()}
    out["listeners"] = list(dataclasses.fields(ListenerConfig))
    return out


