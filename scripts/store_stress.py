"""Longer crash-safety stress run of the store: many SIGKILLed writers, then readers beside a writer.

    flock /tmp/folio-bench.lock python scripts/store_stress.py [--trials 200] [--max-delay 0.5] [--seed 0]

Uses the same zygote and checks as tests/memory_store/test_crash.py (memory_store/testing/sigkill.py) (every acknowledged flush
survives bit-exact, nothing beyond the commit is visible, the index and stream metadata agree),
with more trials and longer random kill offsets. Exits non-zero on the first violation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from memory_store.testing.sigkill import Zygote, run_crash_trials


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--max-delay", type=float, default=0.5, help="kill offsets are uniform in [0, max-delay] s")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    z = Zygote()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="folio-stress-") as d:
            results = run_crash_trials(z, os.path.join(d, "store"), args.trials, args.seed, args.max_delay)
    finally:
        z.close()
    late = sum(1 for acked, visible in results if visible > acked)
    print(f"{args.trials} SIGKILL trials passed in {time.perf_counter() - t0:.1f} s; final store {results[-1][1]} "
          f"blocks; {late} trials had a commit land after its last acknowledgement was printed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
