"""`folio plan`: what fits on a given card, with which settings, and what it needs.

    folio plan --model llama-7b --context 1M --mode train \\
               --device-mem 24GiB --host-mem 128GiB --disk 2TiB

The planner predicts every component per tier (components.py, activations.py),
searches the settings for the fastest that fits (search.py), and writes the configs
and a plot (output.py). `--solve context` / `--solve model` answer the inverse
questions. A budget nothing fits prints the smallest change that would fit (exit code
1), never a traceback. The parser only needs argparse; `run` imports the planner.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .planner import PlanRequest


HELP = "what fits on a given card: settings, configs, memory per tier"


def add_plan_command(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register `plan` on the root parser's subparsers; `run` handles it."""
    p = sub.add_parser("plan", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `folio plan` flags (the attributes `request_from_args` and `run` read)."""
    p.add_argument("--model", default="llama-7b", help="preset name or ModelConfig .json (default llama-7b)")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--context", default="1M", help="tokens of context: 4096, 128k, 1M, 10M (default 1M)")
    p.add_argument("--device-mem", default="24GiB", help="memory of one GPU (default 24GiB)")
    p.add_argument("--host-mem", default="128GiB", help="host RAM (default 128GiB)")
    p.add_argument("--disk", default="2TiB", help="free disk (default 2TiB)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default 1)")
    p.add_argument("--solve", choices=("context", "model"), default=None,
                   help="longest context / largest preset that fits")
    p.add_argument("--window", type=int, default=None, help="fix the window (default: model's, halved if needed)")
    p.add_argument("--top-k", type=int, default=None, help="fix top-k (default 4, halved if needed)")
    p.add_argument("--global-batch", type=int, default=8, help="train: sequences per optimizer step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--zero-stage", type=int, action="append", choices=(0, 1, 2, 3), default=None,
                   help="restrict ZeRO stages (repeatable)")
    p.add_argument("--out", default="plan_out", help="folder for configs and plan.png (default plan_out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--gpu-tflops", type=float, default=100.0)
    p.add_argument("--pcie-gbps", type=float, default=16.0)
    p.add_argument("--nvme-gbps", type=float, default=2.0)
    p.add_argument("--measure", action="store_true", help="run the plan on this machine and compare")


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


def main(argv: list[str] | None = None) -> int:
    """`python -m plan ...` (the same as `folio plan ...`)."""
    root = argparse.ArgumentParser(prog="folio")
    sub = root.add_subparsers(dest="command", required=True)
    add_plan_command(sub)
    args = root.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
