# -*- test-case-name: tests.unit.test_observe_cli -*-
"""``mailserverctl status`` and ``mailserverctl log``: watching the server.

``mailserverctl status [-c FILE] [--json]`` checks, from outside the process:

* each listener (and the metrics endpoint): does a connection to its
  address succeed?  A listener that refuses is critical;
* the queue: messages per state (a listing of each state directory, as
  ``mailserverctl queue`` reads them); anything in ``corrupt/`` is a warning;
* the directory: one lookup (``postmaster@`` the first local domain) through
  the configured backend, as ``mailserverctl lookup`` does; an outage is
  critical, an answer slower than a second a warning;
* each TLS certificate: days left, a warning under 14, critical once expired;
* failed, blocked and rate-limited logins since the server started, read
  from the metrics endpoint when ``[metrics]`` is on, else "unknown".

Exit status, as Nagios plugins have it: 0 ok, 1 warning, 2 critical.

``mailserverctl log QUEUE_ID [--file F]...`` prints every line of the log
files (``[log] file`` by default) that names the message, and follows the
messages it spawned: copies queued for forwards or retries and delivery
reports, which the log names with ``as <id>`` or ``notification: <id>``.
Text and JSON lines alike.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional

OK, WARNING, CRITICAL, UNKNOWN = "ok", "warning", "critical", "unknown"
EXIT = {OK: 0, WARNING: 1, CRITICAL: 2, UNKNOWN: 0}  # unknown never pages anyone
CERT_WARNING_DAYS = 14
SLOW_DIRECTORY = 1.0  # seconds
CONNECT_TIMEOUT = 3.0


@dataclass
class Check:
    """One line of the status report."""

    check: str  # listener, metrics, queue, directory, certificate, logins
    name: str
    state: str
    detail: str
    data: Dict = field(default_factory=dict)


# -- the checks -----------------------------------------------------------
def _connect_target(address: str):
    """(family, sockaddr) to reach a listener address from this host."""
    from mailserver.config import parse_address

    kind, host, port = parse_address(address)
    if kind == "unix":
        return socket.AF_UNIX, host
    if kind == "tcp6":
        return socket.AF_INET6, ("::1" if host in ("", "::") else host, port)
    return socket.AF_INET, ("127.0.0.1" if host in ("", "0.0.0.0") else host, port)


def probe(address: str, timeout: float = CONNECT_TIMEOUT) -> tuple:
    """(connected, seconds or the error text) for one address."""
    family, target = _connect_target(address)
    started = time.monotonic()
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(target)
        except OSError as e:
            return False, e.strerror or str(e)
    return True, time.monotonic() - started


def check_listeners(config) -> List[Check]:
    out = []
    addresses = [(lc.name, lc.address, "listener") for lc in config.listeners]
    if config.metrics.address:
        addresses.append(("metrics", config.metrics.address, "metrics"))
    for name, address, kind in addresses:
        up, what = probe(address)
        if up:
            out.append(Check(kind, name, OK, f"{address} accepts connections "
                             f"({what * 1000:.1f} ms)", {"address": address,
                                                         "seconds": round(what, 6)}))
        else:
            out.append(Check(kind, name, CRITICAL, f"{address}: {what}",
                             {"address": address, "error": what}))
    return out


def check_queue(config) -> Check:
    from mailserver.metrics import QueueDepthCollector

    counts = QueueDepthCollector(config.queue.directory).counts()
    text = ", ".join(f"{state} {n}" for state, n in counts.items())
    if counts.get("corrupt"):
        return Check("queue", config.queue.directory, WARNING,
                     f"{text} (see corrupt/: mailserverctl queue list --state corrupt)", counts)
    return Check("queue", config.queue.directory, OK, text, counts)


def check_directory(config) -> Check:
    from mailserver.directory.factory import directory_from_config
    from mailserver.errors import DirectoryUnavailable

    address = f"postmaster@{config.domains.local[0]}"
    name = config.directory.backend
    try:
        directory = directory_from_config(config.directory, config.domains.local, None, None)
    except (OSError, ValueError) as e:
        return Check("directory", name, CRITICAL, f"unusable settings: {e}")
    started = time.monotonic()
    try:
        resolution = directory.resolve_sync(address)
    except DirectoryUnavailable as e:
        return Check("directory", name, CRITICAL, f"unavailable: {e.reason or e}",
                     {"seconds": round(time.monotonic() - started, 6)})
    finally:
        directory.close()
    took = time.monotonic() - started
    found = "found" if resolution.found else "unknown"
    state = WARNING if took > SLOW_DIRECTORY else OK
    return Check("directory", name, state, f"answered in {took * 1000:.1f} ms "
                 f"({address}: {found})", {"seconds": round(took, 6), "lookup": address,
                                          "found": resolution.found})


def _certificate_files(config) -> List[str]:
    files = [config.tls.certificate] if config.tls.certificate else []
    return files + [p for p in config.tls.sni.values() if p not in files]


def check_certificate(path: str, now: Optional[float] = None) -> Check:
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        return Check("certificate", path, WARNING, f"cannot read: {e}")
    expires = cert.not_valid_after_utc.timestamp()
    days = (expires - (time.time() if now is None else now)) / 86400
    when = time.strftime("%Y-%m-%d", time.gmtime(expires))
    data = {"days_left": int(days), "expires": when}
    if days < 0:
        return Check("certificate", path, CRITICAL, f"expired on {when}", data)
    state = WARNING if days < CERT_WARNING_DAYS else OK
    return Check("certificate", path, state, f"{int(days)} days left (until {when})", data)


def read_metrics(address: str, timeout: float = CONNECT_TIMEOUT) -> Dict[str, float]:
    """{sample name: value summed over its labels} from the endpoint."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host.strip("[]")
    if ":" in host:
        host = f"[{host}]"
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    sums: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


def check_logins(config) -> Check:
    if not config.metrics.address:
        return Check("logins", "since start", UNKNOWN,
                     "unknown: metrics are off (set [metrics] address)")
    try:
        sums = read_metrics(config.metrics.address)
    except Exception as e:  # refused, timed out, not Prometheus text
        return Check("logins", "since start", UNKNOWN, f"unknown: metrics unreadable: {e}")
    data = {"auth_failures": int(sums.get("mailserver_auth_failures_total", 0)),
            "login_blocks": int(sums.get("mailserver_login_blocks_total", 0)),
            "rate_limit_hits": int(sums.get("mailserver_rate_limit_hits_total", 0))}
    return Check("logins", "since start", OK,
                 f"{data['auth_failures']} failed, {data['login_blocks']} blocked by the "
                 f"throttle, {data['rate_limit_hits']} rate-limited", data)


def gather(config) -> List[Check]:
    checks = check_listeners(config)
    checks.append(check_queue(config))
    checks.append(check_directory(config))
    checks.extend(check_certificate(p) for p in _certificate_files(config))
    checks.append(check_logins(config))
    return checks


def overall(checks: Iterable[Check]) -> str:
    states = {c.state for c in checks}
    for state in (CRITICAL, WARNING):
        if state in states:
            return state
    return OK


def status(args) -> int:
    from mailserver.config import load_config
    from mailserver.errors import ConfigError

    try:
        config = load_config(args.config, check_files=False)
    except ConfigError as e:
        print(f"mailserverctl: {e}", file=sys.stderr)
        return EXIT[CRITICAL]
    checks = gather(config)
    state = overall(checks)
    if args.json:
        json.dump({"status": state, "exit": EXIT[state], "checks": [asdict(c) for c in checks]},
                  sys.stdout, indent=2)
        print()
    else:
        print(f"mailserver {state.upper()}")
        for c in checks:
            print(f"  {c.state:<9} {c.check} {c.name}: {c.detail}")
    return EXIT[state]


# -- following one message ----------------------------------------------------
#: How the log names a message made from another one.
SPAWNED = re.compile(r"(?:\bas|\bnotification:)\s+<?([A-Z0-9]{6,32})\b")


def follow(lines: Iterable[str], queue_id: str) -> Iterator[str]:
    """The lines naming ``queue_id`` or a message spawned from it, in order."""
    wanted = {queue_id}
    pattern = re.compile(r"\b(" + re.escape(queue_id) + r")\b")
    for line in lines:
        if not pattern.search(line):
            continue
        yield line
        new = {m.group(1) for m in SPAWNED.finditer(line)} - wanted
        if new:
            wanted |= new
            pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(wanted))) + r")\b")


def log(args) -> int:
    files = args.file
    if not files:
        from mailserver.config import load_config
        from mailserver.errors import ConfigError

        try:
            config = load_config(args.config, check_files=False)
        except ConfigError as e:
            print(f"mailserverctl: {e}", file=sys.stderr)
            return 78
        if not config.log.file:
            print("mailserverctl: [log] file is not set: name the log with --file "
                  "(journalctl -t mailserver > F, or twistd.log)", file=sys.stderr)
            return 78
        files = [config.log.file]
    found = 0

    def lines() -> Iterator[str]:
        for name in files:
            try:
                with open(name, encoding="utf-8", errors="replace") as f:
                    yield from f
            except OSError as e:
                print(f"mailserverctl: {name}: {e.strerror}", file=sys.stderr)

    for line in follow(lines(), args.queue_id):
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        found += 1
    if not found:
        print(f"mailserverctl: no line names {args.queue_id}", file=sys.stderr)
    return 0 if found else 1


def add_observe_commands(sub, config_option) -> None:
    """``status`` and ``log`` on mailserverctl's sub-command parser."""
    p = sub.add_parser("status", help="check listeners, queue, directory, certificates; "
                       "exit 0 ok, 1 warning, 2 critical")
    config_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=status)
    p = sub.add_parser("log", help="print every log line about one message and those it "
                       "spawned")
    p.add_argument("queue_id")
    p.add_argument("--file", action="append", default=[],
                   help="log file to read (repeat for rotated files, oldest first); "
                        "default: [log] file")
    config_option(p)
    p.set_defaults(func=log)


__all__ = ["status", "log", "follow", "gather", "overall", "check_certificate",
           "add_observe_commands"]
