"""`folio plan`: what fits on a given card, with which settings, and what it needs.

    folio plan --model llama-7b --context 1M --mode train \\
               --device-mem 24GiB --host-mem 128GiB --disk 2TiB

The planner predicts every component per tier (plan_components.py), searches the
settings for the fastest that fits (plan_search.py), and writes the configs and a plot
(plan_output.py). `--solve context` / `--solve model` answer the inverse questions. A
budget nothing fits raises `InfeasiblePlanError` naming the smallest change that would
fit; the CLI prints it (exit code 1), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import PRESETS, ModelConfig, preset

from .plan_components import TIERS
from .plan_errors import InfeasiblePlanError, MeasureUnavailableError, PlanError
from .plan_output import candidates_table, components_table, plot_plan, train_command, write_configs
from .plan_search import Hardware, SearchResult, SearchSpace, search, smallest_change, solve_context, solve_model
from engine.units import format_bytes, format_context, parse_bytes, parse_context

SOLVE = (None, "context", "model")


@dataclass(kw_only=True, slots=True)
class PlanRequest:
    """A user's question, as parsed from the command line (or built in Python)."""

    model: str = "llama-7b"
    """A preset name or a ModelConfig JSON file."""
    mode: str = "train"
    """'train' or 'infer'."""
    context: int = 1_000_000
    """Tokens of context (train: document length; infer: ingested tokens)."""
    device_bytes: int = 24 * 1024**3
    host_bytes: int = 128 * 1024**3
    disk_bytes: int = 2 * 1024**4
    gpus: int = 1
    solve: str | None = None
    """None, 'context' (longest that fits) or 'model' (largest preset that fits)."""
    window: int | None = None
    top_k: int | None = None
    global_batch: int = 8
    precision: str = "bf16"
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    out_dir: str | None = "plan_out"
    """Where configs and the PNG go; None writes nothing."""
    plot: bool = True
    gpu_tflops: float = 100.0
    pcie_gbps: float = 16.0
    nvme_gbps: float = 2.0

    def __post_init__(self) -> None:
        if self.mode not in ("train", "infer"):
            raise ValueError(f"PlanRequest.mode={self.mode!r} is invalid: one of ('train', 'infer')")
        if self.solve not in SOLVE:
            raise ValueError(f"PlanRequest.solve={self.solve!r} is invalid: one of {SOLVE}")
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"PlanRequest.gpus={self.gpus!r} is invalid: a positive int")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"PlanRequest.precision={self.precision!r} is invalid: one of ('bf16', 'fp32')")

    def hardware(self) -> Hardware:
        return Hardware(device_bytes=self.device_bytes, host_bytes=self.host_bytes, disk_bytes=self.disk_bytes,
                        gpus=self.gpus, gpu_tflops=self.gpu_tflops, pcie_gbps=self.pcie_gbps,
                        nvme_gbps=self.nvme_gbps)

    def space(self) -> SearchSpace:
        return SearchSpace(mode=self.mode, global_batch=self.global_batch, window=self.window,
                           top_k=self.top_k, zero_stages=self.zero_stages, precision=self.precision)


@dataclass(slots=True)
class PlanReport:
    """The answer: the search result, the model it is for, and the files written."""

    model_name: str | None
    result: SearchResult
    text: str
    files: list[Path] = field(default_factory=list)


def load_model(spec: str) -> tuple[str | None, ModelConfig]:
    """(name, config) for a preset name or a ModelConfig JSON file; ValueError otherwise."""
    if spec in PRESETS:
        return spec, preset(spec)
    path = Path(spec)
    if path.suffix == ".json" and path.is_file():
        return None, ModelConfig.load_json(path)
    raise ValueError(f"model={spec!r} is invalid: a preset ({', '.join(sorted(PRESETS))}) "
                     f"or a ModelConfig .json file that exists")


def summary(name: str | None, result: SearchResult) -> str:
    """One README-ready paragraph: settings chosen and what each tier needs."""
    hw = result.hardware
    head = (f"{name or 'model'} {result.mode} @ {format_context(result.context)} tokens on "
            f"{hw.gpus} x {format_bytes(hw.device_bytes)}")
    c = result.chosen
    if c is None:
        return f"{head}: does not fit"
    t = c.estimate.totals()
    level = "" if result.level is None else f" (window {result.level[0]}, top-k {result.level[1]})"
    return (f"{head}: {c.settings.label()}{level}; device {format_bytes(t['device'])}, "
            f"host {format_bytes(t['host'])}, disk {format_bytes(t['disk'])}; "
            f"store tiers device {format_bytes(c.settings.device_tier_bytes)} / host "
            f"{format_bytes(c.settings.host_tier_bytes)}; ~{c.tokens_per_s:,.0f} tok/s predicted")


def make_plan(req: PlanRequest) -> PlanReport:
    """Answer `req`: search, write configs and the PNG, and build the printed text.

    Raises InfeasiblePlanError (message names the smallest change that fits) when
    nothing fits, ValueError for a bad request.
    """
    hw, space = req.hardware(), req.space()
    lines: list[str] = []
    if req.solve == "model":
        models = {n: preset(n) for n in PRESETS}
        found = solve_model(models, hw, req.context, space)
        if found is None:
            smallest = min(models, key=lambda n: models[n].num_params())
            res = search(models[smallest], hw, req.context, space)
            raise InfeasiblePlanError(
                f"no preset fits {req.mode} at {format_context(req.context)} tokens in "
                f"{_budget_text(hw)}; for the smallest ({smallest}): {smallest_change(res, space)}")
        name, result = found
        model = result.model
        lines.append(f"largest preset that fits: {name} ({model.num_params() / 1e6:,.0f}M parameters)")
    else:
        name, model = load_model(req.model)
        context = req.context
        if req.solve == "context":
            longest = solve_context(model, hw, space)
            if longest is None:
                res = search(model, hw, 1000, space)
                raise InfeasiblePlanError(
                    f"{name or req.model} does not fit even 1k tokens of context ({req.mode}) in "
                    f"{_budget_text(hw)}; smallest change: {smallest_change(res, space)}")
            lines.append(f"longest context that fits: {format_context(longest)} tokens ({longest:,})")
            context = longest
        result = search(model, hw, context, space)
        if result.chosen is None:
            raise InfeasiblePlanError(
                f"{name or req.model} ({req.mode}, {format_context(context)} tokens) does not fit in "
                f"{_budget_text(hw)}.\nsmallest change: {smallest_change(result, space)}")
    budgets = {t: hw.budget(t) for t in TIERS}
    lines.insert(0, summary(name, result))
    lines.append("")
    lines.append(components_table(result.chosen.estimate, budgets))
    lines.append("")
    lines.append(candidates_table(result))
    files: list[Path] = []
    if req.out_dir is not None:
        files = write_configs(result, name, req.out_dir)
        if req.plot:
            files.append(plot_plan(model, result.chosen, budgets, Path(req.out_dir) / "plan.png",
                                   title=summary(name, result)[:120]))
        lines.append("")
        lines.append("wrote " + ", ".join(str(p) for p in files))
        if result.mode == "train":
            lines.append("run it: " + train_command(model, name, result.chosen.settings,
                                                    Path(req.out_dir) / "ds_config.json"))
    return PlanReport(model_name=name, result=result, text="\n".join(lines), files=files)


def _budget_text(hw: Hardware) -> str:
    return (f"{hw.gpus} x {format_bytes(hw.device_bytes)} device, {format_bytes(hw.host_bytes)} host, "
            f"{format_bytes(hw.disk_bytes)} disk")


# ---------------------------------------------------------------------------------------
# `folio plan` (its parser is train/cli.py's)
# ---------------------------------------------------------------------------------------

def request_from_args(args: argparse.Namespace) -> PlanRequest:
    """Build a PlanRequest from parsed arguments (ValueError names the bad argument)."""
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
    try:
        req = request_from_args(args)
        if args.measure:
            from .plan_measure import measure_plan

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
