"""Benchmarks, each run as `python -m bench.NAME`.

Each writes its JSON to runs/bench/NAME.json (gitignored, so a run leaves the tree clean)
unless `--out PATH` says where; bench/results/ holds the deliberate reference copies
(see bench/results/README.md).
"""

from pathlib import Path

RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench"
"""Default directory of every benchmark's output."""


def machine() -> str:
    """The machine line of a result: architecture, torch threads, torch version."""
    import platform

    import torch

    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write_results(res: dict, out: str | Path, md: str) -> None:
    """Write a benchmark's result `res` as JSON to `out` and its table `md` beside it (.md), print
    the table and where it went."""
    import json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} in {res['total_seconds']} s")
