#!/usr/bin/env python
"""RCPT resolutions per second against a real slapd, with a cold and a warm
cache, and the LDAP operations each resolution costs.

Run from the repository root (slapd and slapadd must be installed)::

    /tmp/venv/bin/python benchmarks/directory_bench.py [--users N] [--lookups L]
                         [--embedded-lookups E] [--concurrency C]
                         [--pool-size P] [--rounds R] [--json]

What one run does:

1. writes an LDIF with the quick-start entries plus ``N`` generated users
   (``userNNNNN@example.test``), ``N/10`` aliases to them and ``N/50`` groups
   of 10 members, loads it into a throw-away slapd
   (``tests.support.slapd.Slapd``, stock schemas, mdb, indexed ``mail``,
   ``uid`` and ``mailLocalAddress``) and into the embedded LDIF backend;
2. counts the LDAP operations (searches, binds) one resolution sends, by
   wrapping ldap3's ``Connection.search`` and ``Connection.bind`` for the
   whole process: for a user, an alias, a group of 2 and a group of 10, a
   password check, and the same RCPTs again through a warm cache;
3. for each of ``R`` rounds and each backend, runs ``L`` recipient lookups
   (``E`` on the embedded backend, whose searches scan every entry)
   through the server's own path: ``CachingDirectory`` over ``LDAPDirectory``,
   Deferreds on the real reactor, the blocking ldap3 calls on the directory's
   thread pool (``P`` threads, ``P`` connections), ``C`` lookups in flight:

   * ``no cache``: the bare ``LDAPDirectory``;
   * ``cold cache``: a fresh cache, every address distinct, so every lookup
     goes to LDAP and pays the cache's bookkeeping on top;
   * ``warm cache``: the same addresses again, all answered from the cache;
   * ``storm``: ``L`` lookups of one group address, all issued at once with
     an empty cache: how many resolutions reach the directory (one).

4. prints lookups per second and latency percentiles per phase, and the
   ratios that carry over between machines, each taken within the same round
   (median over rounds): warm / cold, cold / no cache (the cache's overhead on
   a miss), and slapd / embedded (the cost of the network and a real server
   against ldap3's in-process one).

A lookup's latency runs from calling ``resolve`` to its Deferred firing.
The warm phase measures the reactor thread alone (no thread hop, no LDAP).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldap3 import Connection  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from mailserver.directory.cache import CachingDirectory  # noqa: E402
from mailserver.directory.ldap import LDAPDirectory, LDAPSettings  # noqa: E402
from mailserver.directory.ldif import embedded_directory  # noqa: E402
from tests.support.slapd import QUICKSTART_LDIF, Slapd, SlapdUnavailable  # noqa: E402

SUFFIX = "dc=example,dc=test"
SERVICE_DN = "cn=mailserver,dc=example,dc=test"
SERVICE_PASSWORD = "mailserver-password"
GROUP_SIZE = 10


# -- counting LDAP operations --------------------------------------------

class OperationCounter:
    """Counts ``Connection.search`` and ``Connection.bind`` calls, process-wide.

    Every backend opens ldap3 ``Connection`` objects (the embedded one too),
    so wrapping the class counts exactly the operations sent to a server.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.searches = 0
        self.binds = 0
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        counter = self
        search, bind = Connection.search, Connection.bind

        def counted_search(conn, *args, **kwargs):
            with counter.lock:
                counter.searches += 1
            return search(conn, *args, **kwargs)

        def counted_bind(conn, *args, **kwargs):
            with counter.lock:
                counter.binds += 1
            return bind(conn, *args, **kwargs)

        Connection.search, Connection.bind = counted_search, counted_bind

    def snapshot(self):
        with self.lock:
            return self.searches, self.binds


OPERATIONS = OperationCounter()


# -- data -----------------------------------------------------------------

def generated_ldif(users: int) -> str:
    """Users, aliases and groups under ou=bench, in the quick start's schema."""
    out = ["dn: ou=bench,dc=example,dc=test", "objectClass: organizationalUnit", "ou: bench", ""]
    for i in range(users):
        uid = f"user{i:05d}"
        out += [f"dn: uid={uid},ou=bench,{SUFFIX}", "objectClass: top", "objectClass: person",
                "objectClass: organizationalPerson", "objectClass: inetOrgPerson",
                f"uid: {uid}", f"cn: User {i}", f"sn: {i}", f"mail: {uid}@example.test",
                f"userPassword: {uid}-password", ""]
    for i in range(users // 10):
        out += [f"dn: cn=alias{i:05d},ou=bench,{SUFFIX}", "objectClass: top",
                "objectClass: nisMailAlias", "objectClass: inetLocalMailRecipient",
                f"cn: alias{i:05d}", f"mailLocalAddress: alias{i:05d}@example.test",
                f"rfc822MailMember: user{i:05d}@example.test", ""]
    for g in range(users // 50):
        out += [f"dn: cn=group{g:05d},ou=bench,{SUFFIX}", "objectClass: top",
                "objectClass: groupOfNames", "objectClass: inetLocalMailRecipient",
                f"cn: group{g:05d}", f"mailLocalAddress: group{g:05d}@example.test"]
        out += [f"member: uid=user{(g * GROUP_SIZE + k) % users:05d},ou=bench,{SUFFIX}"
                for k in range(GROUP_SIZE)]
        out.append("")
    return "\n".join(out)


def write_ldif(folder: Path, users: int) -> Path:
    path = folder / "bench.ldif"
    path.write_text(QUICKSTART_LDIF.read_text() + "\n" + generated_ldif(users))
    return path


def settings(uri: str, pool_size: int) -> LDAPSettings:
    return LDAPSettings(uris=(uri,) if uri else (), base_dn=SUFFIX, bind_dn=SERVICE_DN,
                        bind_password=SERVICE_PASSWORD, local_domains=("example.test",),
                        pool_size=pool_size)


# -- driving lookups on the reactor ----------------------------------------

def drive(resolve, addresses, concurrency: int) -> defer.Deferred:
    """Resolve every address, ``concurrency`` at a time; fires with
    (seconds, latencies, failures)."""
    done = defer.Deferred()
    pending = iter(addresses)
    latencies = []
    state = {"inflight": 0, "failures": 0, "pumping": False, "exhausted": False}
    started = time.perf_counter()

    def landed(result, t0):
        latencies.append(time.perf_counter() - t0)
        state["inflight"] -= 1
        if isinstance(result, Failure) or not getattr(result, "found", True):
            state["failures"] += 1
            if isinstance(result, Failure) and state["failures"] == 1:
                print(f"  first failure: {result.getErrorMessage()}", file=sys.stderr)
        if not state["pumping"]:
            pump()

    def pump():
        # A loop, not recursion: cache hits fire inside resolve().
        state["pumping"] = True
        try:
            while state["inflight"] < concurrency and not state["exhausted"]:
                address = next(pending, None)
                if address is None:
                    state["exhausted"] = True
                    break
                state["inflight"] += 1
                t0 = time.perf_counter()
                resolve(address).addBoth(landed, t0)
        finally:
            state["pumping"] = False
        if state["exhausted"] and state["inflight"] == 0 and not done.called:
            done.callback((time.perf_counter() - started, latencies, state["failures"]))

    pump()
    return done


def percentile(values, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def phase(name, seconds, latencies, failures, searches=None):
    n = len(latencies)
    return {
        "phase": name, "lookups": n, "seconds": seconds, "rate": n / seconds if seconds else 0,
        "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        "not_found": failures, "searches": searches,
    }


@defer.inlineCallbacks
def measure_backend(name, make_directory, addresses, concurrency, group_address):
    """The four phases for one backend; returns a dict of phase results."""
    out = {}
    bare = make_directory()
    try:
        # Warm the connections (one per pool thread), then forget nothing: no cache here.
        yield drive(bare.resolve, addresses[: 4 * concurrency], concurrency)

        s0, _ = OPERATIONS.snapshot()
        seconds, lat, bad = yield drive(bare.resolve, addresses, concurrency)
        out["no cache"] = phase("no cache", seconds, lat, bad, OPERATIONS.snapshot()[0] - s0)

        cache = CachingDirectory(bare, positive_ttl=3600, negative_ttl=3600,
                                 max_entries=len(addresses) + 10)
        s0, _ = OPERATIONS.snapshot()
        seconds, lat, bad = yield drive(cache.resolve, addresses, concurrency)
        out["cold cache"] = phase("cold cache", seconds, lat, bad, OPERATIONS.snapshot()[0] - s0)

        s0, _ = OPERATIONS.snapshot()
        seconds, lat, bad = yield drive(cache.resolve, addresses, concurrency)
        out["warm cache"] = phase("warm cache", seconds, lat, bad, OPERATIONS.snapshot()[0] - s0)

        cache.clear()
        misses0 = cache.misses
        s0, _ = OPERATIONS.snapshot()
        seconds, lat, bad = yield drive(cache.resolve, [group_address] * len(addresses),
                                        len(addresses))
        storm = phase("storm", seconds, lat, bad, OPERATIONS.snapshot()[0] - s0)
        storm["resolutions"] = cache.misses - misses0
        out["storm"] = storm
    finally:
        bare.close()
    return out


# -- round trips ------------------------------------------------------------

def round_trips(directory) -> dict:
    """LDAP operations for one RCPT of each kind, on a fresh (cold) path and
    through a warm cache, using the blocking calls (same code, no threads)."""
    directory.resolve_sync("alice@example.test")  # open this thread's connection first
    kinds = {
        "user": "bob@example.test",
        "alias": "postmaster@example.test",
        "group of 2": "team@example.test",
        f"group of {GROUP_SIZE}": "group00000@example.test",
        "unknown": "nobody@example.test",
    }
    out = {}
    for kind, address in kinds.items():
        s0, b0 = OPERATIONS.snapshot()
        resolution = directory.resolve_sync(address)
        s1, b1 = OPERATIONS.snapshot()
        out[kind] = {"address": address, "searches": s1 - s0, "binds": b1 - b0,
                     "mailboxes": len(resolution.mailboxes)}
    s0, b0 = OPERATIONS.snapshot()
    account = directory.authenticate_sync("bob", "bob-password")
    s1, b1 = OPERATIONS.snapshot()
    assert account is not None, "bob should log in"
    out["password check"] = {"address": "bob", "searches": s1 - s0, "binds": b1 - b0,
                             "mailboxes": 0}
    return out


# -- the run ---------------------------------------------------------------

def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main_async(reactor, args) -> defer.Deferred:
    return defer.ensureDeferred(run(reactor, args))


async def run(reactor, args):
    OPERATIONS.install()
    work = Path(tempfile.mkdtemp(prefix="directory-bench-"))
    ldif = write_ldif(work, args.users)
    print(f"loading {args.users} users, {args.users // 10} aliases, "
          f"{args.users // 50} groups into slapd ...", file=sys.stderr)
    server = Slapd([ldif])
    server.start()
    try:
        backends = {
            "slapd": lambda: LDAPDirectory(settings(server.uri, args.pool_size)),
            "embedded": lambda: embedded_directory(str(ldif), settings("", args.pool_size)),
        }
        trips = {}
        for name, make in backends.items():
            directory = make()
            try:
                trips[name] = round_trips(directory)
            finally:
                directory.close()
        counts = {"slapd": args.lookups, "embedded": args.embedded_lookups}
        rounds = []
        for r in range(args.rounds):
            result = {}
            for name, make in backends.items():
                print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr)
                lookups = [f"user{i:05d}@example.test" for i in range(counts[name])]
                result[name] = await measure_backend(name, make, lookups, args.concurrency,
                                                     "group00000@example.test")
            rounds.append(result)
    finally:
        server.cleanup()
    report = summarise(args, trips, rounds)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


def summarise(args, trips, rounds) -> dict:
    def median(backend, ph, key):
        return statistics.median(r[backend][ph][key] for r in rounds)

    phases = {}
    for backend in rounds[0]:
        phases[backend] = {}
        for ph in rounds[0][backend]:
            phases[backend][ph] = {key: median(backend, ph, key)
                                   for key in ("rate", "p50_ms", "p99_ms", "searches",
                                               "not_found")}
        phases[backend]["storm"]["resolutions"] = median(backend, "storm", "resolutions")

    def ratio_median(f):
        return statistics.median(f(r) for r in rounds)

    ratios = {
        "slapd warm / cold cache": ratio_median(
            lambda r: ratio(r["slapd"]["warm cache"]["rate"], r["slapd"]["cold cache"]["rate"])),
        "slapd cold cache / no cache": ratio_median(
            lambda r: ratio(r["slapd"]["cold cache"]["rate"], r["slapd"]["no cache"]["rate"])),
        "slapd / embedded, no cache": ratio_median(
            lambda r: ratio(r["slapd"]["no cache"]["rate"], r["embedded"]["no cache"]["rate"])),
        "embedded warm / cold cache": ratio_median(
            lambda r: ratio(r["embedded"]["warm cache"]["rate"],
                            r["embedded"]["cold cache"]["rate"])),
    }
    return {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "parameters": {"users": args.users, "lookups": args.lookups,
                       "embedded_lookups": args.embedded_lookups,
                       "concurrency": args.concurrency, "pool_size": args.pool_size,
                       "rounds": args.rounds},
        "round_trips": trips,
        "phases": phases,
        "ratios": ratios,
    }


def print_report(report) -> None:
    p = report["parameters"]
    m = report["machine"]
    print(f"\nDirectory benchmark: {p['lookups']} lookups on slapd, {p['embedded_lookups']} on "
          f"the embedded backend, {p['concurrency']} in flight, "
          f"pool of {p['pool_size']} threads, {p['users']} users, median of {p['rounds']} "
          f"round(s); Python {m['python']}, {m['cpus']} CPU(s)\n")
    print("LDAP operations per RCPT (cold; a warm cache sends none):")
    print(f"  {'kind':<16}{'address':<28}{'slapd s/b':>10}{'embedded s/b':>14}{'mailboxes':>11}")
    for kind, row in report["round_trips"]["slapd"].items():
        emb = report["round_trips"]["embedded"][kind]
        print(f"  {kind:<16}{row['address']:<28}{row['searches']:>6}/{row['binds']:<3}"
              f"{emb['searches']:>10}/{emb['binds']:<3}{row['mailboxes']:>11}")
    print("\nLookups per second:")
    print(f"  {'backend':<10}{'phase':<12}{'rate/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'searches':>10}")
    for backend, phases in report["phases"].items():
        for name, ph in phases.items():
            print(f"  {backend:<10}{name:<12}{ph['rate']:>10.0f}{ph['p50_ms']:>9.2f}"
                  f"{ph['p99_ms']:>9.2f}{ph['searches']:>10.0f}")
        storm = phases["storm"]
        n = p["lookups"] if backend == "slapd" else p["embedded_lookups"]
        print(f"  {'':<10}storm: {n} simultaneous lookups of one group -> "
              f"{storm['resolutions']:.0f} resolution(s)")
    print("\nRatios (same round, median):")
    for name, value in report["ratios"].items():
        print(f"  {name:<32}{value:>8.2f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--lookups", type=int, default=2000,
                        help="lookups per phase on slapd (at most --users)")
    parser.add_argument("--embedded-lookups", type=int, default=300,
                        help="lookups per phase on the embedded backend, which is slower")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.users < 50 or min(args.lookups, args.embedded_lookups, args.concurrency,
                              args.rounds) < 1:
        parser.error("need --users >= 50 and positive --lookups, --concurrency, --rounds")
    if max(args.lookups, args.embedded_lookups) > args.users:
        parser.error("lookups per phase must not exceed --users: a cold phase needs "
                     "distinct addresses")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from tests.support.slapd import find_installation

        find_installation()
    except SlapdUnavailable as e:
        print(f"directory_bench: {e}", file=sys.stderr)
        return 2
    task.react(main_async, (args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
