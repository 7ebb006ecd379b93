"""Benchmark of `folio plan`: predicted vs measured memory per component on this CPU.

    python -m bench.plan --quick     # under 60 s: tiny, three training settings + ingest/ask
    python -m bench.plan             # + the small preset, and a longer ingest

Each case runs a probe of plan/measure.py in a fresh process (train: a few AdamW
steps; infer: an ingest of a generated document into a store with small tier budgets,
then an ask) and compares it with the planner's prediction for the same setting. The
baseline is the prediction itself, computed in the same run; the figure is the error of
each measured total against it. Writes runs/bench/plan.json (--out PATH to choose) with `max_abs_error_pct`
over the scored rows of every case (tracked tensor peak, peak RSS above the measured
Python/torch baseline, saved activations; infer also every store component) and every
row, the baseline RSS included (reported, not scored: it is not a prediction).
Run it under the shared lock: `flock /tmp/folio-bench.lock python -m bench.plan --quick`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from bench import RUNS
from engine.config import preset
from plan.measure import compare, compare_infer, run_probe, run_probe_infer
from plan.settings import PlanSettings

KiB = 1024
INFER = dict(mode="infer", zero_stage=0, window=512, top_k=4, chunk=256, precision="fp32",
             device_tier_bytes=512 * KiB, host_tier_bytes=2048 * KiB)
"""Store budgets far below the store (about 1 MiB per 1k tokens for tiny): blocks spill to disk."""
QUICK = [
    ("tiny", dict(window=512, micro_batch=4), None),
    ("tiny", dict(window=512, micro_batch=4, activation_checkpointing=True), None),
    ("tiny", dict(window=512, micro_batch=4, attention_impl="blockwise"), None),
    ("tiny", INFER, 4096),
]
FULL = QUICK + [
    ("tiny", dict(window=512, micro_batch=4, attention_impl="blockwise", activation_checkpointing=True), None),
    ("tiny", INFER, 32768),
    ("small", dict(window=512, micro_batch=1), None),
    ("small", dict(window=1024, micro_batch=1, activation_checkpointing=True), None),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plan")
    ap.add_argument("--quick", action="store_true", help="tiny preset only (under 60 s)")
    ap.add_argument("--out", default=str(RUNS / "plan.json"), help="where to write the JSON")
    args = ap.parse_args(argv)
    cases = QUICK if args.quick else FULL
    rows, worst = [], 0.0
    t0 = time.perf_counter()
    for name, kw, context in cases:
        model, s = preset(name), PlanSettings(**{"mode": "train", **kw})
        t = time.perf_counter()
        if s.mode == "infer":
            comp = compare_infer(model, s, context, run_probe_infer(model, s, context))
        else:
            comp = compare(model, s, run_probe(model, s))
        dt = time.perf_counter() - t
        print(f"{name} {s.mode} {s.label()}" + (f" context={context}" if context else "") + f" ({dt:.1f} s)")
        for r in comp:
            print(f"   {r['component']:20s} predicted {r['predicted'] / 2**20:9.2f} MiB  measured "
                  f"{r['measured'] / 2**20:9.2f} MiB  ratio {r['measured'] / max(1, r['predicted']):.3f}  "
                  f"error {r['error_pct']:+6.1f}%" + ("" if r["scored"] else "  (not scored)"))
            if r["scored"]:
                worst = max(worst, abs(r["error_pct"]))
        rows.append({"model": name, "mode": s.mode, "settings": kw, "context": context, "rows": comp,
                     "seconds": dt})
    result = {"command": "python -m bench.plan" + (" --quick" if args.quick else ""),
              "max_abs_error_pct": worst, "cases": rows,
              "seconds": time.perf_counter() - t0, "python": platform.python_version(),
              "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"max_abs_error_pct = {worst:.1f} (goal <= 15); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
