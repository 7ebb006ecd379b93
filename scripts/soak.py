"""A bounded soak of the store: one writer appending and flushing, a deleter of old streams, four
reader processes reopening and reading random committed blocks with crc checks.

    python scripts/soak.py [--seconds 120] [--readers 4] [--seed 0] [--s3]

--s3: the store on a real S3 API server (moto's server mode on loopback: the dev extra), written
as segments (memory_store/segments.py) under the writer's lease, readers in other processes.

memory_store/testing/soak.py says what is checked. Prints the operations done; exits 1 on any
inconsistency or lost flushed block (printing the first ones).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memory_store.testing.soak import run_soak  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--s3", action="store_true", help="the store on a local moto S3 server")
    args = ap.parse_args()
    if args.s3:
        from memory_store.testing.s3_server import moto_server

        with moto_server("folio-soak") as s3:
            r = run_soak(f"s3://{s3['bucket']}/store", args.seconds, readers=args.readers, seed=args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="folio-soak-") as d:
            r = run_soak(os.path.join(d, "store"), args.seconds, readers=args.readers, seed=args.seed)
    problems = r.pop("problems")
    print(f"soak{' on S3' if args.s3 else ''} {r['seconds']} s, 1 writer + deleter, {r['readers']} readers: {r['puts']} puts "
          f"({r['blocks_put']} blocks), {r['flushes']} flushes, {r['streams_deleted']} streams deleted "
          f"({r['blocks_deleted']} blocks); readers {r['opens']} opens, {r['blocks_read']} blocks read and "
          f"checked, {r['raced_delete']} reads raced a delete; {r['inconsistencies']} inconsistencies, "
          f"{r['lost']} lost flushed blocks")
    for p in problems[:10]:
        print("  " + p.replace("\n", "\n  "))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
