"""DNS for tests: an in-process fake resolver and a real loopback DNS server.

Both read the same zone description, a dict of zones::

    {"example.test": {                       # the zone's origin
        "@":    {"MX": [[10, "mx1"], [20, "mx2.example.test"]]},
        "mx1":  {"A": "127.0.0.1", "AAAA": ["::1"]},
        "mx2":  {"A": ["192.0.2.2"], "ttl": 5},
        "www":  {"CNAME": "mx1"},
        "none": {"MX": [[0, "."]]},          # null MX (RFC 7505)
        "slow": {"timeout": True},           # never answered (or a list of types)
        "bad":  {"servfail": ["MX"]},        # SERVFAIL for these types
        "shut": {"refused": True},           # REFUSED
    }}

Names: ``@`` is the origin, a name without a dot is relative to the origin,
a name with a dot is absolute (a trailing dot is allowed).  The same rule
holds for MX and CNAME targets; ``.`` is the root (null MX).  Types: ``A``,
``AAAA``, ``MX`` (``[pref, target]`` pairs or ``"pref target"`` strings),
``CNAME``, ``TXT`` (a value longer than 255 octets becomes several strings
of one record, as a DKIM RSA key needs), ``TLSA`` (``"usage selector mtype hexdata"`` strings,
e.g. ``"_25._tcp.mx1.example.test": {"TLSA": "3 1 1 ab12..."}``).  Names
under a zone that are not listed are NXDOMAIN; a listed name without the
queried type is an empty answer (NODATA).

DNSSEC, as a validating resolver reports it: ``"secure": true`` on a name
makes the server's answers about that name carry the AD (authenticated
data) bit; a ``"secure": true`` key at the zone level (beside the names)
does so for every name of the zone, NXDOMAIN included.  A validating
resolver's verdict on bogus data is SERVFAIL: use ``servfail``.

:class:`FakeResolver` answers ``IResolver`` lookups from that data without
a network, as a recursive resolver would (CNAMEs chased), with failures as
the exceptions twisted.names raises.  :class:`DNSServer` runs this module as
a subprocess, an authoritative twisted.names server on 127.0.0.1 (UDP and
TCP on one port)::

    python -m tests.support.dns --port 0 --zones zones.json --portfile FILE \\
        [--loaded FILE] [--querylog FILE]

SIGHUP re-reads the zones file (a broken file keeps the old zones) and then
writes the number of loads so far to ``--loaded``.  ``--querylog`` gets one
``name TYPE`` line per query received.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error

ROOT = Path(__file__).resolve().parents[2]
TLSA = 52


class Record_TLSA(dns.UnknownRecord):
    """A TLSA record (RFC 6698) for the test server; clients see its RDATA."""

    TYPE = TLSA
    fancybasename = "TLSA"


TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "CNAME": dns.CNAME, "TXT": dns.TXT,
         "TLSA": TLSA}
SPECIALS = ("timeout", "servfail", "refused")
DEFAULT_TTL = 60

Records = Dict[int, list]  # type -> record payloads


def _absolute(name: str, origin: str) -> str:
    name = name.strip().lower()
    if name == "@":
        return origin
    if name == ".":
        return ""
    if "." not in name.rstrip("."):
        return f"{name}.{origin}"
    return name.rstrip(".")


def _payloads(rtype: str, values, origin: str, ttl: int) -> list:
    if rtype == "CNAME":
        return [dns.Record_CNAME(_absolute(values, origin), ttl=ttl)]
    if not isinstance(values, list) or (rtype == "MX" and values and isinstance(values[0], int)):
        values = [values]
    out = []
    for v in values:
        if rtype == "A":
            out.append(dns.Record_A(v, ttl=ttl))
        elif rtype == "AAAA":
            out.append(dns.Record_AAAA(v, ttl=ttl))
        elif rtype == "TXT":
            data = v.encode()  # one string at most 255 octets: longer ones are split
            out.append(dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)]
                                      or [b""], ttl=ttl))
        elif rtype == "TLSA":
            usage, selector, mtype, data = v.split()
            out.append(Record_TLSA(bytes((int(usage), int(selector), int(mtype)))
                                   + bytes.fromhex(data), ttl=ttl))
        else:
            pref, target = v.split() if isinstance(v, str) else v
            out.append(dns.Record_MX(int(pref), _absolute(target, origin).encode("idna"), ttl=ttl))
    return out


Specials = Dict[str, Dict[str, frozenset]]  # name -> {"timeout": types, ...}


def load_zones(zones: dict) -> Dict[str, Tuple[Dict[str, Records], Specials]]:
    """``{origin: (records by name, specials by name)}``; ValueError when bad."""
    out = {}
    for origin, names in zones.items():
        origin = origin.lower().rstrip(".")
        records: Dict[str, Records] = {}
        specials: Specials = {}
        if names.get("secure") is True:  # the whole zone is signed
            specials.setdefault("*", {})["secure"] = frozenset()
        for name, data in names.items():
            if name == "secure":
                continue
            owner = _absolute(name, origin)
            if owner != origin and not owner.endswith("." + origin):
                raise ValueError(f"zone {origin}: {name!r} is outside the zone")
            ttl = int(data.get("ttl", DEFAULT_TTL))
            entry = records.setdefault(owner, {})
            for key, values in data.items():
                if key == "ttl":
                    continue
                if key == "secure":
                    if values is True:
                        specials.setdefault(owner, {})["secure"] = frozenset()
                    continue
                if key in SPECIALS:
                    kinds = TYPES if values is True else {t: TYPES[t] for t in values}
                    specials.setdefault(owner, {})[key] = frozenset(kinds.values())
                elif key in TYPES:
                    entry.setdefault(TYPES[key], []).extend(_payloads(key, values, origin, ttl))
                else:
                    raise ValueError(f"zone {origin}: {name}: unknown key {key!r}")
        out[origin] = (records, specials)
    return out


class _ServFail(Exception):
    """Answer SERVFAIL (not a DomainError, so resolver chains stop here)."""


class _Refused(Exception):
    """Answer REFUSED."""


def _special(specials: Specials, name: str, qtype: int) -> Optional[str]:
    for kind, types in specials.get(name, {}).items():
        if qtype in types:
            return kind
    return None


class FakeResolver:
    """In-process ``IResolver`` over a zones dict; ``queries`` records
    ``(name, TYPE)`` for each lookup.  Timeouts fail at once with
    ``DNSQueryTimeoutError``; SERVFAIL and REFUSED are ``DNSServerError`` and
    ``DNSQueryRefusedError``; unknown names ``DNSNameError``.  With
    ``chase_cnames`` (default) an answer holds the CNAME chain and the
    target's records, as from a recursive resolver; without it only the
    CNAME, as from an authoritative server for another zone."""

    def __init__(self, zones: dict, chase_cnames: bool = True) -> None:
        self.zones = load_zones(zones)
        self.chase_cnames = chase_cnames
        self.queries: List[Tuple[str, str]] = []

    def _find(self, name: str):
        for origin in sorted(self.zones, key=len, reverse=True):
            if name == origin or name.endswith("." + origin):
                return self.zones[origin]
        return None

    def _answer(self, name, qtype: int) -> defer.Deferred:
        name = dns.domainString(name).decode("ascii").lower().rstrip(".")
        self.queries.append((name, dns.QUERY_TYPES.get(qtype, str(qtype))))
        answers = []
        for _hop in range(10):
            zone = self._find(name)
            if zone is None or name not in zone[0]:
                if answers:  # a dangling CNAME: NOERROR, the chain only
                    break
                return defer.fail(dns_error.DNSNameError(name))
            kind = _special(zone[1], name, qtype)
            if kind == "timeout":
                return defer.fail(dns_error.DNSQueryTimeoutError(0))
            if kind:
                if kind == "servfail":
                    return defer.fail(dns_error.DNSServerError(name))
                return defer.fail(dns_error.DNSQueryRefusedError(name))
            records = zone[0][name]
            if dns.CNAME in records and qtype != dns.CNAME:
                cname = records[dns.CNAME][0]
                answers.append(dns.RRHeader(name, dns.CNAME, dns.IN, cname.ttl, cname))
                if not self.chase_cnames:
                    break
                name = cname.name.name.decode("ascii")
                continue
            answers.extend(dns.RRHeader(name, qtype, dns.IN, p.ttl, p)
                           for p in records.get(qtype, ()))
            break
        return defer.succeed((answers, [], []))

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(name, dns.MX)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, dns.A)

    def lookupIPV6Address(self, name, timeout=None):
        return self._answer(name, dns.AAAA)

    def lookupCanonicalName(self, name, timeout=None):
        return self._answer(name, dns.CNAME)

    def lookupText(self, name, timeout=None):
        return self._answer(name, dns.TXT)


# -- the server (runs in a subprocess) ------------------------------------------------

def _build_authorities(zones: dict) -> list:
    from twisted.names import authority

    class ZoneAuthority(authority.FileAuthority):
        def __init__(self, origin, records, specials):
            self.origin, self._records, self.specials = origin, records, specials
            super().__init__(None)

        def loadFile(self, _filename):
            soa = dns.Record_SOA(mname=f"ns.{self.origin}", rname=f"hostmaster.{self.origin}",
                                 serial=1, refresh=60, retry=60, expire=60, minimum=DEFAULT_TTL)
            self.soa = (self.origin.encode(), soa)
            self.records = {self.origin.encode(): [soa]}
            for name, by_type in self._records.items():
                for payloads in by_type.values():
                    self.records.setdefault(name.encode(), []).extend(payloads)

        def _lookup(self, name, cls, type, timeout=None):
            kind = _special(self.specials, name.decode("ascii").lower().rstrip("."), type)
            if kind == "timeout":
                return defer.Deferred()  # never fires: the client times out
            if kind:
                return defer.fail(_ServFail() if kind == "servfail" else _Refused())
            return super()._lookup(name, cls, type, timeout)

    loaded = load_zones(zones)
    return [ZoneAuthority(o, *loaded[o]) for o in sorted(loaded, key=len, reverse=True)]


def _is_secure(authorities, name: str) -> bool:
    """Does the zone data mark ``name`` (or its whole zone) secure?"""
    name = name.lower().rstrip(".")
    for zone in (a for a in authorities if hasattr(a, "specials")):  # longest origin first
        if name == zone.origin or name.endswith("." + zone.origin):
            marks = zone.specials
            return "secure" in marks.get(name, {}) or "secure" in marks.get("*", {})
    return False


def _serve(args) -> None:
    from twisted.internet import reactor
    from twisted.names import resolve, server

    class Factory(server.DNSServerFactory):
        def handleQuery(self, message, protocol, address):
            if args.querylog:
                with open(args.querylog, "a") as f:
                    for q in message.queries:
                        f.write(f"{q.name.name.decode('ascii', 'replace').lower()} "
                                f"{dns.QUERY_TYPES.get(q.type, q.type)}\n")
            return super().handleQuery(message, protocol, address)

        def sendReply(self, protocol, message, address):
            if message.queries and message.rCode in (dns.OK, dns.ENAME):
                name = message.queries[0].name.name.decode("ascii", "replace")
                message.authenticData = _is_secure(self.resolver.resolvers, name)
            return super().sendReply(protocol, message, address)

        def gotResolverError(self, failure, protocol, message, address):
            if failure.check(dns.DomainError, dns.AuthoritativeDomainError):
                return super().gotResolverError(failure, protocol, message, address)
            rcode = dns.EREFUSED if failure.check(_Refused) else dns.ESERVER
            response = self._responseFromMessage(message=message, rCode=rcode)
            self.sendReply(protocol, response, address)

    def read() -> list:
        with open(args.zones) as f:
            return _build_authorities(json.load(f))

    factory = Factory(authorities=read())
    loads = [1]

    def mark_loaded() -> None:
        if args.loaded:
            _write_atomic(args.loaded, str(loads[0]))

    def reload() -> None:
        try:
            factory.resolver = resolve.ResolverChain(read())
        except Exception as e:  # keep serving the old zones
            print(f"dns: reload failed, old zones kept: {e}", file=sys.stderr, flush=True)
            return
        loads[0] += 1
        mark_loaded()

    for _try in range(50):
        # a fresh protocol each try: one that was connected cannot be reused
        protocol = dns.DNSDatagramProtocol(controller=factory)
        udp = reactor.listenUDP(args.port, protocol, interface=args.interface)
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface=args.interface)
            break
        except Exception:
            if args.port:
                raise
            udp.stopListening()
    else:
        raise SystemExit("dns: no port free for both UDP and TCP")
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))
    mark_loaded()
    _write_atomic(args.portfile, str(port))
    reactor.run()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dns",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--zones", required=True)
    parser.add_argument("--portfile", required=True)
    parser.add_argument("--loaded")
    parser.add_argument("--querylog")
    _serve(parser.parse_args(argv))


# -- the pytest side --------------------------------------------------------------------

class DNSServer:
    """A loopback DNS server subprocess serving ``zones`` (see the module
    docstring).  ``start()`` returns once it answers; ``port``,
    ``address`` (``("127.0.0.1", port)``) and ``nameserver``
    (``"127.0.0.1:PORT"``) say where; ``update(zones)`` swaps the data and
    returns once it is served; ``queries()`` lists ``(name, TYPE)`` received;
    ``stop()`` ends it.  Also a context manager."""

    def __init__(self, zones: dict, directory: Optional[str] = None) -> None:
        load_zones(zones)  # fail early, in the test, on bad data
        self.zones = zones
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="dns-"))
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None
        self._loads = 0

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_zones(self, zones: dict) -> None:
        _write_atomic(str(self.dir / "zones.json"), json.dumps(zones, indent=1))

    def _wait_for(self, path: Path, want: Optional[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                errors = (self.dir / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"DNS server exited with {self.process.returncode}: {errors}")
            if path.exists():
                text = path.read_text().strip()
                if text and (want is None or text == want):
                    return text
            time.sleep(0.02)
        raise RuntimeError(f"DNS server did not write {path.name} in {timeout}s")

    def start(self, timeout: float = 15) -> "DNSServer":
        self._write_zones(self.zones)
        for name in ("port", "loaded", "queries.log"):
            (self.dir / name).unlink(missing_ok=True)
        argv = [sys.executable, "-m", "tests.support.dns", "--port", str(self.port or 0),
                "--zones", str(self.dir / "zones.json"), "--portfile", str(self.dir / "port"),
                "--loaded", str(self.dir / "loaded"), "--querylog", str(self.dir / "queries.log")]
        path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
        with open(self.dir / "stderr.log", "ab") as errors:
            self.process = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL,
                                            stderr=errors)
        self.port = int(self._wait_for(self.dir / "port", None, timeout))
        self._loads = int(self._wait_for(self.dir / "loaded", "1", timeout))
        return self

    def update(self, zones: dict, timeout: float = 10) -> None:
        """Serve ``zones`` from now on (rewrite the file, SIGHUP, wait)."""
        load_zones(zones)
        self.zones = zones
        self._write_zones(zones)
        self.process.send_signal(signal.SIGHUP)
        self._loads += 1
        self._wait_for(self.dir / "loaded", str(self._loads), timeout)

    def queries(self) -> List[Tuple[str, str]]:
        log = self.dir / "queries.log"
        if not log.exists():
            return []
        return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines() if line]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
