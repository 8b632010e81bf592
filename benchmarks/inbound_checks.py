#!/usr/bin/env python
"""CPU cost of the MX's end-of-data authentication step, per message.

Run from the repository root::

    .venv/bin/python benchmarks/inbound_checks.py [--rounds R] [--messages N] [--json]

For message sizes of 4 KiB, 100 KiB and 1 MiB it times what
:class:`mailserver.msgauth.inbound.InboundAuth` does on its worker thread
after the data (read the spooled file, verify every DKIM signature, the ARC
chain, DMARC), with DNS answered from memory (``FakeResolver``), so only
the libraries' and our own work is measured, not the network.  Cases:
unsigned, one ed25519 signature, one rsa-sha256 (2048) signature, both, and
an ARC-sealed message.  It also times the forged Authentication-Results
rewrite of the spool file.

The reference, measured in the same round, is reading the file and hashing
it once with SHA-256 (what any DKIM verification must at least do); figures
are ratios to it, medians over the rounds, with milliseconds beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailserver.msgauth.inbound import InboundAuth, Settings  # noqa: E402
from mailserver.msgauth.spf_check import SPFResult  # noqa: E402
from mailserver.msgauth.strip import rewrite_without  # noqa: E402
from tests.support.msgauth import (Ed25519Key, FakeResolver, RSAKey, arc_seal,  # noqa: E402
                                   message, sign)

SIZES = (4096, 102400, 1048576)


def cases(size: int, ed, rsa, sealer) -> dict:
    line = b"x" * 76 + b"\r\n"
    body = line * max(size // len(line), 1)
    plain = message(body=body)
    signed_ed = sign(plain, ed, "example.org")
    signed_rsa = sign(plain, rsa, "example.org", selector="rsa")
    hop = b"Authentication-Results: list.example; dkim=pass\r\n" + signed_ed
    return {"unsigned": plain, "ed25519": signed_ed, "rsa-2048": signed_rsa,
            "ed25519+rsa": sign(signed_rsa, ed, "example.org"),
            "arc-sealed": arc_seal(hop, sealer, "list.example", "list.example"),
            "forged A-R rewrite": b"Authentication-Results: mx.example.test; none\r\n" + plain}


def timed(f, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    ed, rsa, sealer = Ed25519Key(), RSAKey(2048), RSAKey(2048)
    zone = {("sel._domainkey.example.org", "TXT"): [ed.record],
            ("rsa._domainkey.example.org", "TXT"): [rsa.record],
            ("arc._domainkey.list.example", "TXT"): [sealer.record],
            ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject"]}
    check = InboundAuth(Settings("mx.example.test"), run=None, clock=None,
                        resolver=FakeResolver(zone))
    spf = SPFResult("pass", "mailfrom", "a@example.org", "example.org")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "msg"
        for size in SIZES:
            for name, data in cases(size, ed, rsa, sealer).items():
                if name.startswith("forged"):
                    def step():
                        path.write_bytes(data)
                        rewrite_without(str(path), "mx.example.test")
                else:
                    def step():
                        check._content(str(path), spf)
                ratios, secs = [], []
                for _ in range(args.rounds):
                    path.write_bytes(data)
                    ref = timed(lambda: hashlib.sha256(path.read_bytes()).digest(),
                                args.messages)
                    t = timed(step, args.messages)
                    ratios.append(t / ref)
                    secs.append(t)
                results[f"{size // 1024} KiB {name}"] = {
                    "ratio": statistics.median(ratios), "ms": statistics.median(secs) * 1000}
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
        return
    print(f"{'case':34} {'x reference':>12} {'ms':>10}")
    for case, r in results.items():
        print(f"{case:34} {r['ratio']:12.1f} {r['ms']:10.2f}")


if __name__ == "__main__":
    main()
