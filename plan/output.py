"""What `folio plan` writes: the table, ds_config.json, the Folio configs and the PNG.

Files (in the output folder):
  ds_config.json     train: DeepSpeed settings only, in the form the repository's
                     ds_config.json takes (micro-batch and accumulation come from the
                     train config)
  folio_train.json   train: a TrainConfig (train/config.py) with every setting the plan
                     chose; the printed `folio train` command sets the same fields
  folio_ingest.json  infer: {"retrieval": RetrievalConfig fields, "store": StoreConfig
                     tier budgets}; the printed `folio ingest` command sets the same
  folio_plan.json    the report: settings, predicted bytes per component and tier,
                     the rejected settings and why
  plan.png           memory per component against context length, one panel per tier
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.config import PRESETS, ModelConfig

from engine.units import format_bytes, format_context

from .components import estimate
from .search import Candidate, SearchResult
from .settings import (ALLGATHER_BUCKET, NVME_OPT_BUFFERS, NVME_PARAM_BUFFERS, PREFETCH_BUCKET, REDUCE_BUCKET,
                       SUB_GROUP_SIZE, TIERS, Estimate, PlanSettings)


def components_table(est: Estimate, budgets: dict[str, int] | None = None) -> str:
    """One row per component, one column per tier, totals and budgets last."""
    rows = [("component", "device", "host", "disk", "how")]
    for c in est.components:
        if c.device or c.host or c.disk:
            rows.append((c.name, *(format_bytes(c.on(t)) if c.on(t) else "-" for t in TIERS), c.note))
    rows.append(("total", *(format_bytes(est.total(t)) for t in TIERS), ""))
    if budgets:
        rows.append(("budget", *(format_bytes(budgets[t]) for t in TIERS), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [r[j].rjust(widths[j]) for j in (1, 2, 3)]
        lines.append("  ".join(cells) + ("  " + r[4] if r[4] else ""))
        if i == 0 or (i == len(rows) - (3 if budgets else 2)):
            lines.append("-" * (sum(widths) + 2 * 3))
    return "\n".join(lines)


def candidates_table(result: SearchResult, limit: int = 8) -> str:
    """The fastest feasible settings, then the rejected ones with their reasons."""
    out = []
    if result.feasible:
        out.append(f"fits ({len(result.feasible)} settings; fastest first):")
        for cand in result.feasible[:limit]:
            t = cand.estimate.totals()
            out.append(f"  {cand.tokens_per_s:10.1f} tok/s  {cand.settings.label():58s} "
                       f"dev {format_bytes(t['device']):>10s}  host {format_bytes(t['host']):>10s}  "
                       f"disk {format_bytes(t['disk']):>10s}")
        if len(result.feasible) > limit:
            out.append(f"  ... {len(result.feasible) - limit} more")
    if result.rejected:
        out.append(f"does not fit ({len(result.rejected)} settings):")
        seen: dict[str, list[str]] = {}
        hw = result.hardware
        # closest misses first: they are the interesting ones
        for r in sorted(result.rejected, key=lambda r: sum(v / hw.budget(t) for t, v in r.shortfall.items())):
            seen.setdefault(r.reason, []).append(r.settings.label())
        for reason, labels in list(seen.items())[:limit]:
            more = f" (+{len(labels) - 1} similar)" if len(labels) > 1 else ""
            out.append(f"  {labels[0]}{more}: {reason}")
        if len(seen) > limit:
            out.append(f"  ... {len(seen) - limit} more reasons (all in folio_plan.json)")
    return "\n".join(out)


def ds_config(s: PlanSettings) -> dict[str, Any]:
    """DeepSpeed settings for a training plan ("auto" where the train config decides)."""
    zero: dict[str, Any] = {"stage": s.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                            "reduce_bucket_size": REDUCE_BUCKET, "allgather_bucket_size": ALLGATHER_BUCKET}
    if s.zero_stage >= 1:
        opt = {"device": s.offload_optimizer, "pin_memory": "auto"}
        if s.offload_optimizer == "nvme":
            opt.update(nvme_path="/local_nvme", buffer_count=NVME_OPT_BUFFERS)
        zero["offload_optimizer"] = opt
    if s.zero_stage == 3:
        par: dict[str, Any] = {"device": s.offload_param, "pin_memory": "auto"}
        if s.offload_param == "nvme":
            par.update(nvme_path="/local_nvme", buffer_count=NVME_PARAM_BUFFERS[0],
                       buffer_size=NVME_PARAM_BUFFERS[1])
        zero["offload_param"] = par
        zero.update(stage3_prefetch_bucket_size=PREFETCH_BUCKET, sub_group_size=SUB_GROUP_SIZE,
                    stage3_max_live_parameters=1_000_000_000)
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": "auto"}},
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": False},
        "steps_per_print": 1_000_000_000, "wall_clock_breakdown": False,
    }


def model_ref(model: ModelConfig, name: str | None) -> tuple[str, dict[str, Any]]:
    """(preset, overrides) that rebuild `model`, as TrainConfig takes a model."""
    if name in PRESETS:
        base = name
    else:
        base = "tiny"
    defaults = ModelConfig(**PRESETS[base]).to_dict()
    return base, {k: v for k, v in model.to_dict().items() if defaults.get(k) != v}


def _set_fields(s: PlanSettings) -> dict[str, Any]:
    """TrainConfig fields of the plan that have no named `folio train` flag (set with --set)."""
    # the plan budgets top_k retrieved blocks per layer and KV head (0: plain-window training)
    d: dict[str, Any] = {"retrieval": s.top_k > 0, "attention_impl": s.attention_impl,
                         "activation_checkpointing": s.activation_checkpointing}
    if s.top_k > 0:
        d.update(retrieval_top_k=s.top_k, store_device_budget_bytes=s.device_tier_bytes,
                 store_host_budget_bytes=s.host_tier_bytes)
    return d


def train_config_dict(model: ModelConfig, name: str | None, s: PlanSettings) -> dict[str, Any]:
    """Fields of train/config.py's TrainConfig for the plan (the rest keep their defaults)."""
    base, overrides = model_ref(model, name)
    return {"model": base, "model_overrides": overrides, "window_len": s.window,
            "micro_batch": s.micro_batch, "grad_accum": s.grad_accum, "precision": s.precision,
            "retrieval_top_k": max(1, s.top_k), **_set_fields(s)}


def train_command(model: ModelConfig, name: str | None, s: PlanSettings, ds_path: str | Path) -> str:
    """The `folio train` command line that runs the plan (flags train/cli.py accepts)."""
    base, overrides = model_ref(model, name)
    parts = ["folio train", f"--model {base}"]
    parts += [f"--model-set {k}={v}" for k, v in sorted(overrides.items())]
    parts += [f"--micro-batch {s.micro_batch}", f"--grad-accum {s.grad_accum}", f"--window {s.window}",
              f"--precision {s.precision}", f"--ds-config {ds_path}"]
    parts += [f"--set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in _set_fields(s).items()]
    return " ".join(parts)


def ingest_config_dict(model: ModelConfig, s: PlanSettings) -> dict[str, Any]:
    """An infer plan as engine.retrieval.RetrievalConfig fields and StoreConfig tier budgets.

    The local window holds `local_blocks` whole blocks plus the chunk being prefilled, so
    W = local_blocks * block_len + chunk."""
    return {"retrieval": {"top_k": s.top_k, "chunk_len": s.chunk,
                          "local_blocks": max(0, (s.window - s.chunk) // model.block_len)},
            "store": {"device_budget_bytes": s.device_tier_bytes, "host_budget_bytes": s.host_tier_bytes}}


def ingest_command(model: ModelConfig, s: PlanSettings) -> str:
    """The `folio ingest` options that apply an infer plan (flags train/cli.py defines)."""
    d = ingest_config_dict(model, s)
    r = d["retrieval"]
    parts = [f"folio ingest --top-k {r['top_k']} --local-blocks {r['local_blocks']} --chunk {r['chunk_len']}"]
    # no store tiers without retrieval: the flags' defaults stand (they take no 0)
    parts += [f"--{k.split('_')[0]}-budget {v}" for k, v in d["store"].items() if v]
    return " ".join(parts)


def plan_dict(result: SearchResult, model_name: str | None) -> dict[str, Any]:
    """Everything about the plan as JSON: settings, bytes per component, rejections."""
    chosen = result.chosen
    d: dict[str, Any] = {
        "model": model_name, "model_config": result.model.to_dict(), "mode": result.mode,
        "context_tokens": result.context,
        "budgets": {t: result.hardware.budget(t) for t in TIERS}, "gpus": result.hardware.gpus,
        "fits": chosen is not None,
        "rejected": [{"settings": _settings_dict(r.settings), "reason": r.reason} for r in result.rejected],
    }
    if chosen is not None:
        s = chosen.settings
        d["settings"] = _settings_dict(s)
        d["store"] = {"device_budget_bytes": s.device_tier_bytes, "host_budget_bytes": s.host_tier_bytes}
        d["retrieval"] = {"window": s.window, **ingest_config_dict(result.model, s)["retrieval"]}
        d["predicted"] = {c.name: {t: c.on(t) for t in TIERS} for c in chosen.estimate.components}
        d["predicted_total"] = chosen.estimate.totals()
        d["tokens_per_s"] = chosen.tokens_per_s
        if result.mode == "train":
            d["train_command"] = train_command(result.model, model_name, s, "ds_config.json")
        else:
            d["ingest_command"] = ingest_command(result.model, s)
    return d


def _settings_dict(s: PlanSettings) -> dict[str, Any]:
    return {name: getattr(s, name) for name in PlanSettings.__slots__}


def write_configs(result: SearchResult, model_name: str | None, out_dir: str | Path) -> list[Path]:
    """Write ds_config.json and folio_train.json (train) or folio_ingest.json (infer), and
    folio_plan.json; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if result.chosen is not None and result.mode == "train":
        s = result.chosen.settings
        p = out / "ds_config.json"
        p.write_text(json.dumps(ds_config(s), indent=2) + "\n")
        written.append(p)
        p = out / "folio_train.json"
        p.write_text(json.dumps(train_config_dict(result.model, model_name, s), indent=2, sort_keys=True) + "\n")
        written.append(p)
    elif result.chosen is not None:
        p = out / "folio_ingest.json"
        p.write_text(json.dumps(ingest_config_dict(result.model, result.chosen.settings), indent=2) + "\n")
        written.append(p)
    p = out / "folio_plan.json"
    p.write_text(json.dumps(plan_dict(result, model_name), indent=2) + "\n")
    written.append(p)
    return written


def plot_plan(model: ModelConfig, cand: Candidate, budgets: dict[str, int], path: str | Path,
              *, title: str = "", lo: int = 1_000, hi: int = 10_000_000, points: int = 25) -> Path:
    """Stacked memory per component against context (log x), one panel per tier, budget lines.

    The chosen settings are held fixed; only the context varies, so the panels show what
    grows with context (index, store tiers, KV store on disk) against what does not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = [int(round(lo * (hi / lo) ** (i / (points - 1)))) for i in range(points)]
    ests = [estimate(model, cand.settings, c) for c in ctxs]
    names = [c.name for c in ests[-1].components]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    gib = 1024**3
    for ax, tier in zip(axes, TIERS):
        series = [[e.get(n).on(tier) / gib for e in ests] for n in names]
        keep = [(n, v) for n, v in zip(names, series) if any(v)]
        if keep:
            ax.stackplot(ctxs, *[v for _, v in keep], labels=[n for n, _ in keep], alpha=0.85)
        ax.axhline(budgets[tier] / gib, color="k", ls="--", lw=1.5, label=f"budget {format_bytes(budgets[tier])}")
        ax.axvline(cand.estimate.context, color="r", ls=":", lw=1,
                   label=f"planned context {format_context(cand.estimate.context)}")
        ax.set_xscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("GiB")
        ax.set_title(tier)
        top = max(budgets[tier] / gib, max((sum(v[i] for _, v in keep) for i in range(len(ctxs))), default=0))
        ax.set_ylim(0, top * 1.1 if math.isfinite(top) and top > 0 else 1)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or cand.settings.label())
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
