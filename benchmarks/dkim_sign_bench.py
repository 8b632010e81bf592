#!/usr/bin/env python
"""CPU cost of DKIM signing, per message and per megabyte of body.

Run from the repository root::

    python benchmarks/dkim_sign_bench.py [--rounds R] [--json]

What one run does: makes an Ed25519 and an RSA-2048 key in a temporary key
directory, then measures with ``time.process_time`` (CPU, so a busy machine
disturbs it less than wall-clock time would):

* ``sign ed25519`` / ``sign rsa``: ``Signer.sign_file`` of a 6 KB message
  with one key: reading the spooled file, the body hash and one signature
  (dkimpy's RSA is pure Python: most of the RSA figure is its modular
  exponentiation);
* ``body hash plain`` / ``body hash spaced``: ``RelaxedBodyHash`` over 10 MB
  in 64 KiB chunks, of text with single spaces and CRLF line ends (the
  common case, no regular expression needed) and of text with double spaces
  and trailing white space on every line (format=flowed-like, the worst
  case), beside a bare SHA-256 of the same bytes.

Each figure is the best of ``R`` rounds (default 5).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailserver.msgauth import dkim_sign as S  # noqa: E402
from mailserver.msgauth import keys as K  # noqa: E402

HEADER = b"From: a@example.test\r\nTo: b@elsewhere.example\r\nSubject: bench\r\n\r\n"
SPACED = b"Lorem ipsum dolor sit amet,  consectetur adipiscing elit \r\n"
PLAIN = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit\r\n"


def best(rounds: int, f, repeat: int = 1) -> float:
    """The lowest CPU seconds of one call of ``f`` over ``rounds`` rounds."""
    out = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(repeat):
            f()
        out.append((time.process_time() - t) / repeat)
    return min(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for selector, algorithm in (("ed", "ed25519"), ("rs", "rsa")):
            K.write_key(K.key_path(d, "example.test", selector), K.generate(algorithm))
        path = os.path.join(d, "message")
        with open(path, "wb") as f:
            f.write(HEADER + PLAIN * 100)
        for selector, algorithm in (("ed", "ed25519"), ("rs", "rsa")):
            signer = S.Signer(K.KeyStore(d, selectors=(selector,)), None)
            signer.sign_file(b"", path, [])  # load the key once
            results[f"sign {algorithm} (ms)"] = 1000 * best(
                args.rounds, lambda: signer.sign_file(b"", path, []), repeat=20)
    for label, line in (("plain", PLAIN), ("spaced", SPACED)):
        body = line * (10_000_000 // len(line))

        def hash_body(body=body):
            h = S.RelaxedBodyHash()
            for i in range(0, len(body), S.CHUNK):
                h.update(body[i:i + S.CHUNK])
            h.digest()

        results[f"body hash {label} (ms per 10 MB)"] = 1000 * best(args.rounds, hash_body)
    body = PLAIN * (10_000_000 // len(PLAIN))
    results["bare sha256 (ms per 10 MB)"] = 1000 * best(
        args.rounds, lambda: hashlib.sha256(body).digest())
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for name, value in results.items():
            print(f"{name:<34} {value:8.1f}")


if __name__ == "__main__":
    main()
