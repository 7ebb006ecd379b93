"""Benchmarks, each run as `python -m bench.NAME`.

Each writes its JSON to runs/bench/NAME.json (gitignored, so a run leaves the tree clean)
unless `--out PATH` says where; bench/results/ holds the deliberate reference copies
(see bench/results/README.md).
"""

from pathlib import Path

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
"""Default directory of every benchmark's output."""
