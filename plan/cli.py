"""`folio plan`: what fits on a given card, with which settings, and what it needs.

    folio plan --model llama-7b --context 1M --mode train \\
               --device-mem 24GiB --host-mem 128GiB --disk 2TiB

The planner predicts every component per tier (components.py, activations.py),
searches the settings for the fastest that fits (search.py), and writes the configs
and a plot (output.py). `--solve context` / `--solve model` answer the inverse
questions. A budget nothing fits prints the smallest change that would fit (exit code
1), never a traceback. Its flags are defined with every other command's in train/cli.py;
`run` imports the planner.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .planner import PlanRequest


def request_from_args(args: argparse.Namespace) -> "PlanRequest":
    """Build a PlanRequest from parsed arguments (ValueError names the bad argument)."""
    from engine.units import parse_bytes, parse_context

    from .planner import PlanRequest

    return PlanRequest(
        model=args.model, mode=args.mode, context=parse_context(args.context, arg="--context"),
        device_bytes=parse_bytes(args.device_mem, arg="--device-mem"),
        host_bytes=parse_bytes(args.host_mem, arg="--host-mem"), disk_bytes=parse_bytes(args.disk, arg="--disk"),
        gpus=args.gpus, solve=args.solve, window=args.window, top_k=args.top_k, global_batch=args.global_batch,
        precision=args.precision, zero_stages=tuple(args.zero_stage) if args.zero_stage else (0, 1, 2, 3),
        out_dir=args.out, plot=not args.no_plot, gpu_tflops=args.gpu_tflops, pcie_gbps=args.pcie_gbps,
        nvme_gbps=args.nvme_gbps)


def run(args: argparse.Namespace) -> int:
    """`folio plan`: print the plan; 0 = fits, 1 = does not fit, 2 = bad arguments."""
    from .errors import InfeasiblePlanError, MeasureUnavailableError, PlanError
    from .planner import make_plan

    try:
        req = request_from_args(args)
        if args.measure:
            from .measure import measure_plan

            report = make_plan(req)
            print(report.text)
            print()
            print(measure_plan(report))
            return 0
        report = make_plan(req)
    except InfeasiblePlanError as e:
        print(f"folio plan: does not fit: {e}", file=sys.stderr)
        return 1
    except MeasureUnavailableError as e:
        print(f"folio plan --measure: {e}", file=sys.stderr)
        return 2
    except (ValueError, PlanError) as e:
        print(f"folio plan: {e}", file=sys.stderr)
        return 2
    print(report.text)
    return 0
