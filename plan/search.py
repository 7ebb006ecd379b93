"""The planner's search: the fastest setting that fits, and the inverse questions.

Search space. Train: ZeRO stage 0-3 x optimizer offload (none, cpu, nvme) x parameter
offload (ZeRO 3: none, cpu, nvme) x micro-batch (divisors of the global batch) x
activation checkpointing x attention implementation. Infer: parameters resident or
streamed from the host x prefill chunk. Both: the store's device and host tier
budgets, and two quality settings, the window and top-k.

Quality first, then speed. Window and top-k change what the model sees, so they are
only reduced when nothing fits at the requested values: levels are tried in the order
(window, top_k) = (W, k), (W, k/2), ..., (W/2, k), ...; the first level where anything
fits wins, and inside it the fastest setting (lowest predicted seconds per token).
Tier budgets take the largest candidate that fits (more budget never slows a step).

Cost model (seconds per token; no overlap assumed, so it is a pessimistic bound):
  compute    6*P*tokens + 12*L*B*H*T*S*hd flops (x 4/3 with checkpointing; blockwise
             attention x 1.5 for its recomputing backward) at `gpu_tflops`
  PCIe       optimizer offload: grads down every micro-step, params up every step;
             parameter offload: params up twice (fwd, bwd) every micro-step; retrieval
             misses of the device tier (half of a resident step's blocks assumed reused)
  NVMe       optimizer on NVMe: 12P read + written per step; parameters on NVMe: read
             twice per micro-step; retrieval misses of the host tier
  CPU Adam   P / `cpu_adam_params_per_s` per step when the optimizer is offloaded
  launches   0.2 ms x layers per micro-step (favours larger micro-batches)
Inference counts one decoded token: 2P + 4*L*H*S*hd flops, streamed parameters over
PCIe, and that token's retrievals.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from engine.config import ModelConfig

from engine.units import format_bytes, format_context

from .components import estimate, kv_store_disk_bytes, layer_fetch_bytes
from .settings import (FRAGMENTATION, TIERS, Estimate, GiB, PlanSettings, block_entry_bytes, compute_bytes,
                       n_blocks)

LAUNCH_S_PER_LAYER = 2e-4
RETRIEVAL_REUSE = 0.5


@dataclass(kw_only=True, slots=True)
class Hardware:
    """Budgets of one node and the speeds of the cost model."""

    device_bytes: int
    """Memory of one GPU."""
    host_bytes: int
    """Host RAM of the node."""
    disk_bytes: int
    """Free disk (NVMe) of the node."""
    gpus: int = 1
    """GPUs on the node (data parallel)."""
    gpu_tflops: float = 100.0
    """Sustained bf16 matmul throughput of one GPU."""
    pcie_gbps: float = 16.0
    """Host-device bandwidth, GB/s per direction."""
    nvme_gbps: float = 2.0
    """Disk bandwidth, GB/s."""
    cpu_adam_params_per_s: float = 1e9
    """DeepSpeed CPUAdam throughput (parameters updated per second)."""

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes", "gpus"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Hardware.{name}={v!r} is invalid: must be a positive int")
        for name in ("gpu_tflops", "pcie_gbps", "nvme_gbps", "cpu_adam_params_per_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"Hardware.{name}={v!r} is invalid: must be a positive number")

    def budget(self, tier: str) -> int:
        return {"device": self.device_bytes, "host": self.host_bytes, "disk": self.disk_bytes}[tier]


@dataclass(kw_only=True, slots=True)
class SearchSpace:
    """What the search may vary; None = the planner's default candidates."""

    mode: str = "train"
    global_batch: int = 8
    """Train: sequences per optimizer step over all GPUs."""
    window: int | None = None
    """Fix the window (default: the model's max_seq_len, halved if nothing fits)."""
    top_k: int | None = None
    """Fix top-k (default: 4, halved if nothing fits)."""
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    attention_impls: tuple[str, ...] = ("vectorized", "blockwise")
    precision: str = "bf16"

    def __post_init__(self) -> None:
        if self.mode not in ("train", "infer"):
            raise ValueError(f"SearchSpace.mode={self.mode!r} is invalid: one of ('train', 'infer')")
        if not isinstance(self.global_batch, int) or self.global_batch < 1:
            raise ValueError(f"SearchSpace.global_batch={self.global_batch!r} is invalid: a positive int")
        for name in ("window", "top_k"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (1 if name == "window" else 0)):
                raise ValueError(f"SearchSpace.{name}={v!r} is invalid: None or a "
                                 f"{'positive' if name == 'window' else 'non-negative'} int")
        bad = [s for s in self.zero_stages if s not in (0, 1, 2, 3)]
        if bad or not self.zero_stages:
            raise ValueError(f"SearchSpace.zero_stages={self.zero_stages!r} is invalid: a non-empty subset of 0-3")


@dataclass(slots=True)
class Candidate:
    """A setting that fits, with its estimate and predicted speed."""

    settings: PlanSettings
    estimate: Estimate
    seconds_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token


@dataclass(slots=True)
class Rejection:
    """A setting that does not fit, and why."""

    settings: PlanSettings
    reason: str
    shortfall: dict[str, int]
    """Bytes missing per tier (0 where it fits)."""


@dataclass(slots=True)
class SearchResult:
    model: ModelConfig
    hardware: Hardware
    context: int
    mode: str
    chosen: Candidate | None
    feasible: list[Candidate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    level: tuple[int, int] | None = None
    """(window, top_k) of the quality level the plan was found at."""


# ---------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------

def seconds_per_token(model: ModelConfig, s: PlanSettings, hw: Hardware, context: int) -> float:
    """Predicted seconds per token of `s` (see the module docstring)."""
    P, c, L = model.num_params(), compute_bytes(s), model.n_layers
    pcie, nvme = hw.pcie_gbps * 1e9, hw.nvme_gbps * 1e9
    flops_s = hw.gpu_tflops * 1e12
    nb = n_blocks(context, model.block_len) if s.top_k else 0
    k = min(s.top_k, nb)
    fetch = layer_fetch_bytes(model, s, nb) * L if nb else 0
    store = max(1, kv_store_disk_bytes(model, context, c) * (s.micro_batch if s.mode == "train" else 1))
    h_dev = RETRIEVAL_REUSE * min(1.0, s.device_tier_bytes / fetch) if fetch else 1.0
    h_host = min(1.0, s.host_tier_bytes / store)
    retrieval = fetch * (1 - h_dev) / pcie + fetch * (1 - h_dev) * (1 - h_host) / nvme

    if s.mode == "infer":
        S = s.window + k * model.block_len
        t = (2 * P + 4 * L * model.n_heads * S * model.head_dim) / flops_s
        if s.offload_param == "cpu":
            t += P * c / pcie
        return t + retrieval + LAUNCH_S_PER_LAYER * L

    B, T = s.micro_batch, s.window
    S = T + k * model.block_len
    attn = 12 * L * B * model.n_heads * T * S * model.head_dim
    if s.attention_impl == "blockwise":
        attn *= 1.5
    flops = 6 * P * B * T + attn
    if s.activation_checkpointing:
        flops *= 4 / 3
    micro = flops / flops_s + LAUNCH_S_PER_LAYER * L + retrieval
    if s.offload_optimizer != "none":
        micro += P * c / s.gpus / pcie  # this rank's grads to the host, every micro-step
    if s.offload_param == "cpu":
        micro += 2 * P * c / pcie
    elif s.offload_param == "nvme":
        micro += 2 * P * c / pcie + 2 * P * c / nvme
    step = micro * s.grad_accum
    if s.offload_optimizer != "none":
        step += P * c / pcie + P / s.gpus / hw.cpu_adam_params_per_s
    if s.offload_optimizer == "nvme":
        step += 2 * 12 * P / nvme
    return step / (B * T * s.grad_accum)


# ---------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------

def _state_options(mode: str, stages: tuple[int, ...]) -> list[tuple[int, str, str]]:
    if mode == "infer":
        return [(0, "none", "none"), (0, "none", "cpu")]
    out = []
    for st in stages:
        for opt in ("none", "cpu", "nvme"):
            if (st == 0 and opt != "none") or (opt == "nvme" and st != 3):
                continue  # DeepSpeed: offload needs ZeRO >= 1, NVMe (ZeRO-Infinity) ZeRO 3
            params = ("none",) if st < 3 else ("none", "cpu", "nvme")
            for par in params:
                if par == "nvme" and opt == "none":
                    continue
                out.append((st, opt, par))
    return out


def quality_levels(model: ModelConfig, space: SearchSpace) -> list[tuple[int, int]]:
    """(window, top_k) pairs, best first."""
    if space.window is not None:
        windows = [space.window]
    else:
        windows, w = [], model.max_seq_len
        while w >= 2 * model.block_len and len(windows) < 3:
            windows.append(w)
            w //= 2
        windows = windows or [model.max_seq_len]
    if space.top_k is not None:
        ks = [space.top_k]
    else:
        ks, k = [], 4
        while k >= 1:
            ks.append(k)
            k //= 2
    return [(w, k) for w in windows for k in ks]


def _tier_candidates(model: ModelConfig, s: PlanSettings, context: int) -> tuple[list[int], list[int]]:
    """Device- and host-tier budgets to try, largest first; the last is the minimum."""
    if s.top_k == 0:
        return [0], [0]
    c = compute_bytes(s)
    nb = n_blocks(context, model.block_len)
    streams = s.micro_batch
    layer = layer_fetch_bytes(model, s, nb)
    step = layer * model.n_layers
    store = nb * streams * model.n_layers * block_entry_bytes(model, c)
    dev = sorted({min(x, store) for x in (4 * step, step, layer)}, reverse=True)
    host = sorted({min(x, store) for x in (store, store // 4, store // 16, step)}, reverse=True)
    host = [h for h in host if h >= min(layer, store)]
    return dev, host


def _shortfall(est: Estimate, hw: Hardware) -> dict[str, int]:
    return {t: max(0, est.total(t) - hw.budget(t)) for t in TIERS}


def _reason(est: Estimate, hw: Hardware, short: dict[str, int]) -> str:
    parts = []
    for t in TIERS:
        if short[t]:
            big = max(est.components, key=lambda c: c.on(t))
            parts.append(f"{t} needs {format_bytes(est.total(t))} > {format_bytes(hw.budget(t))} "
                         f"(largest: {big.name} {format_bytes(big.on(t))})")
    return "; ".join(parts)


def _base_settings(model: ModelConfig, space: SearchSpace, hw: Hardware,
                   level: tuple[int, int]) -> list[PlanSettings]:
    window, top_k = level
    out = []
    for st, opt, par in _state_options(space.mode, space.zero_stages):
        if space.mode == "infer":
            for chunk in sorted({min(256, window), min(128, window)}, reverse=True):
                out.append(PlanSettings(mode="infer", offload_param=par, window=window, top_k=top_k,
                                        chunk=chunk, micro_batch=1, gpus=1, zero_stage=0,
                                        precision=space.precision))
            continue
        per_step = space.global_batch // hw.gpus if space.global_batch % hw.gpus == 0 else 0
        micros = [m for m in (1, 2, 4, 8, 16, 32) if per_step and per_step % m == 0] or [1]
        for mb in micros:
            accum = max(1, per_step // mb)
            for ckpt in (False, True):
                for impl in space.attention_impls:
                    out.append(PlanSettings(mode="train", zero_stage=st, offload_optimizer=opt,
                                            offload_param=par, micro_batch=mb, grad_accum=accum,
                                            activation_checkpointing=ckpt, attention_impl=impl,
                                            window=window, top_k=top_k, gpus=hw.gpus,
                                            precision=space.precision))
    return out


def _fit_tiers(model: ModelConfig, base: PlanSettings, hw: Hardware,
               context: int) -> tuple[Estimate, PlanSettings, dict[str, int]]:
    """The largest tier budgets that fit (device first, then host); else the minimum's estimate.

    Besides the fixed candidates, the host tier may take all the host memory left free
    (the margin grows by 10% of what the tier takes, hence the / 1.1).
    """
    dev_c, host_c = _tier_candidates(model, base, context)
    if len(host_c) > 1:
        s0 = dataclasses.replace(base, device_tier_bytes=dev_c[-1], host_tier_bytes=0)
        free = (hw.host_bytes - estimate(model, s0, context).total("host")) / (1 + FRAGMENTATION)
        free = int(free) // (base.gpus if base.mode == "train" else 1)
        if host_c[-1] < free < host_c[0]:
            host_c = sorted({*host_c, free}, reverse=True)
    s = base
    for dev in dev_c:
        s = dataclasses.replace(base, device_tier_bytes=dev, host_tier_bytes=host_c[-1])
        est = estimate(model, s, context)
        if est.total("device") <= hw.device_bytes:
            break
    for host in host_c:
        s = dataclasses.replace(s, host_tier_bytes=host)
        est = estimate(model, s, context)
        if est.total("host") <= hw.host_bytes:
            break
    return est, s, _shortfall(est, hw)


def search(model: ModelConfig, hw: Hardware, context: int, space: SearchSpace,
           *, first_fit: bool = False) -> SearchResult:
    """The fastest setting that fits at the best quality level; all rejections recorded.

    With `first_fit` it stops at the first setting that fits (feasibility only).
    """
    result = SearchResult(model=model, hardware=hw, context=context, mode=space.mode, chosen=None)
    for level in quality_levels(model, space):
        feasible: list[Candidate] = []
        for base in _base_settings(model, space, hw, level):
            est, s, short = _fit_tiers(model, base, hw, context)
            if any(short.values()):
                result.rejected.append(Rejection(settings=s, reason=_reason(est, hw, short), shortfall=short))
                continue
            feasible.append(Candidate(settings=s, estimate=est,
                                      seconds_per_token=seconds_per_token(model, s, hw, context)))
            if first_fit:
                break
        if feasible:
            feasible.sort(key=lambda c: c.seconds_per_token)
            result.feasible, result.chosen, result.level = feasible, feasible[0], level
            return result
    return result


# ---------------------------------------------------------------------------------------
# What would make it fit; the inverse questions
# ---------------------------------------------------------------------------------------

def smallest_change(result: SearchResult, space: SearchSpace) -> str:
    """Name the smallest change that makes an infeasible search fit."""
    hw, model = result.hardware, result.model
    lines = []
    single = [r for r in result.rejected if sum(1 for v in r.shortfall.values() if v) == 1]
    if single:
        best = min(single, key=lambda r: max(r.shortfall[t] / hw.budget(t) for t in TIERS))
        tier = next(t for t in TIERS if best.shortfall[t])
        need = hw.budget(tier) + best.shortfall[tier]
        flag = {"device": "--device-mem", "host": "--host-mem", "disk": "--disk"}[tier]
        lines.append(f"+{format_bytes(best.shortfall[tier])} of {tier} memory ({flag} "
                     f"{math.ceil(need / GiB)}GiB) with {best.settings.label()}")
    elif result.rejected:
        best = min(result.rejected, key=lambda r: sum(r.shortfall[t] / hw.budget(t) for t in TIERS))
        more = ", ".join(f"+{format_bytes(v)} {t}" for t, v in best.shortfall.items() if v)
        lines.append(f"{more} with {best.settings.label()}")
    if space.mode == "train":
        for g in (2, 4, 8):
            if g <= hw.gpus or space.global_batch % g:
                continue
            hw2 = dataclasses.replace(hw, gpus=g, host_bytes=hw.host_bytes, disk_bytes=hw.disk_bytes)
            if search(model, hw2, result.context, space, first_fit=True).chosen is not None:
                lines.append(f"or {g} GPUs of {format_bytes(hw.device_bytes)} (--gpus {g})")
                break
    longest = solve_context(model, hw, space)
    if longest:
        lines.append(f"or a shorter context: up to {format_context(longest)} tokens fits (--context)")
    return "; ".join(lines) if lines else "no setting in the search space fits"


def solve_context(model: ModelConfig, hw: Hardware, space: SearchSpace,
                  *, lo: int = 1000, hi: int = 10**12) -> int | None:
    """Longest context (tokens) with some setting that fits; None if not even `lo` fits.

    Bisection on the context (memory grows monotonically with it); returns `hi` when the
    context does not limit the plan (retrieval off).
    """
    def fits(ctx: int) -> bool:
        return search(model, hw, ctx, space, first_fit=True).chosen is not None

    if not fits(lo):
        return None
    if fits(hi):
        return hi
    while hi - lo > max(1, lo // 1000):  # 0.1% is precise enough for a plan
        mid = int(math.sqrt(lo * hi)) if hi > 4 * lo else (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def solve_model(models: dict[str, ModelConfig], hw: Hardware, context: int,
                space: SearchSpace) -> tuple[str, SearchResult] | None:
    """The largest model (by parameters) of `models` that fits; None if none does."""
    for name, m in sorted(models.items(), key=lambda kv: -kv[1].num_params()):
        res = search(m, hw, context, space)
        if res.chosen is not None:
            return name, res
    return None


def min_budget(model: ModelConfig, hw: Hardware, context: int, space: SearchSpace, tier: str) -> int | None:
    """Least bytes of `tier` (the other budgets as in `hw`) with which some setting fits.

    None when nothing fits even with 64x the given budget of that tier.
    """
    if tier not in TIERS:
        raise ValueError(f"tier={tier!r} is invalid: one of {TIERS}")
    field_name = f"{tier}_bytes"

    def fits(n: int) -> bool:
        return search(model, dataclasses.replace(hw, **{field_name: n}), context, space,
                      first_fit=True).chosen is not None

    hi = hw.budget(tier) * 64
    if not fits(hi):
        return None
    lo = 1
    while hi - lo > max(1 << 20, hi // 1000):  # to 0.1% (or 1 MiB)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
