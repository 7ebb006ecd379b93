"""`folio plan --measure`: run a plan for real on this CPU and compare with the prediction.

Probes run in a fresh child process (a clean resident-set baseline), in float32.

Train: builds `engine.model.LandmarkTransformer`, runs AdamW steps of the plan's
micro-batch, window, attention implementation and activation checkpointing, and reports
  parameters, gradients, Adam moments    exact tensor bytes
  activations saved                      distinct storages autograd saved (saved_tensors_hooks),
                                         parameters excluded
  peak tensors                           live tensor bytes at the step's peak: params and
                                         optimizer state, plus the growth the CPU allocator
                                         counts during the last step (`tracked_peak_bytes`)
  baseline RSS                           the resident set after imports and a small warm-up
                                         (Python, torch, thread pools): its own component,
                                         reported, not predicted (the planner reserves
                                         HOST_RESERVED per process for it)
  peak RSS - baseline                    VmHWM minus that baseline, before the profiled step
The prediction is the same setting on one CPU process: fp32, no ZeRO, no offload,
retrieval off (DeepSpeed's flat fp32 copies under ZeRO 1-3 are not exercised). Its peak
is params + moments + `step_peak_bytes` (saved activations, what the backward adds, and
the gradients present at that moment, on the step's timeline).

Infer: ingests a generated document into a fresh store with the plan's tier budgets
(on the CPU the device tier is ordinary memory), then asks one question, and reports
parameters, the largest local KV window and retrieved blocks (all layers) of one chunk,
the tiers' allocated slabs, the landmark index's arrays, the store's size on disk, the
tracked tensor peak and peak RSS, against `estimate` of the same setting. The store's
libraries, threads and a first small ingest are part of the baseline. The window and
retrieval peaks are the memory's own counters (`RetrievalStats`, via `IngestResult.stats`).

Allocator slack. glibc's malloc raises its mmap threshold dynamically once a large block
is freed, after which freed tensors stay in the heap and RSS drifts well above the live
tensors. The probes fix the threshold (MALLOC_MMAP_THRESHOLD_, `probe_env`) so large
blocks are returned on free; what remains above the tracked tensors is the
small-allocation heap.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from typing import Any

from engine import runtime
from engine.config import ModelConfig

from .activations import activation_breakdown, step_peak_bytes
from .components import estimate
from .errors import MeasureUnavailableError
from .settings import HOST_RESERVED, PlanSettings

COMPONENTS = ("parameters", "gradients", "Adam moments", "activations saved", "peak tensors",
              "baseline RSS", "peak RSS - baseline")
SCORED = ("activations saved", "peak tensors", "peak RSS - baseline")
"""Rows whose error counts toward the goal (the baseline is reported, not predicted)."""
MALLOC_MMAP_THRESHOLD = 1 << 16
"""glibc: blocks from 64 KiB up are mmap'ed and given back on free (see the module docstring)."""


def cpu_settings(s: PlanSettings) -> PlanSettings:
    """The setting as one CPU process runs it: fp32, no ZeRO, no offload, no retrieval."""
    return dataclasses.replace(s, mode="train", zero_stage=0, offload_optimizer="none", offload_param="none",
                               precision="fp32", top_k=0, gpus=1, device_tier_bytes=0, host_tier_bytes=0)


def predict(model: ModelConfig, s: PlanSettings) -> dict[str, int]:
    """Predicted bytes of the components the probe measures, for `cpu_settings(s)`."""
    cs = cpu_settings(s)
    est = estimate(model, cs, 1)
    saved, transient = activation_breakdown(model, cs, 0)
    pred = {"parameters": est.get("parameters").device, "gradients": est.get("gradients").device,
            "Adam moments": est.get("Adam moments").device, "activations saved": saved}
    # no ZeRO on one process: gradients appear as the backward frees the saved tensors
    pred["peak tensors"] = pred["parameters"] + pred["Adam moments"] + step_peak_bytes(model, cs, 0)
    pred["peak RSS - baseline"] = pred["peak tensors"]
    pred["baseline RSS"] = HOST_RESERVED
    return pred


def probe(model_dict: dict[str, Any], settings: dict[str, Any], steps: int = 2, seed: int = 0) -> dict[str, int]:
    """Run the training window in this process and return measured bytes (see module docstring)."""
    import psutil
    import torch
    import torch.nn.functional as F
    from engine.model import LandmarkTransformer
    from engine.recompute import checkpoint_layers

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({**model_dict, "dtype": "float32"})
    s = PlanSettings(**settings)
    _warm_up(cfg, s.attention_impl)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    model = LandmarkTransformer(cfg)
    if s.activation_checkpointing:
        checkpoint_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    B, T = s.micro_batch, s.window
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, min(256, cfg.vocab_size), (B, T + 1), generator=g)  # (B, T+1)
    lm = (torch.arange(T + 1) % cfg.block_len) == cfg.block_len - 1
    tokens[:, lm] = cfg.vocab_size - 1  # landmark slots (the attention mask is positional)
    x, y = tokens[:, :T], tokens[:, 1:]  # (B, T)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs and t.device.type != "meta":
            saved[st.data_ptr()] = st.nbytes()
        return t

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, impl=s.attention_impl).float().flatten(0, 1), y.flatten()).backward()
        opt.step()

    out: dict[str, int] = {}
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(x, impl=s.attention_impl)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    out["activations saved"] = sum(saved.values())
    del logits
    loss.backward()
    del loss
    out["gradients"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    opt.step()
    for _ in range(max(1, steps - 1)):
        step()
    # RSS before the profiled step: the profiler's own event buffers are not the plan's memory
    peak = peak_rss_bytes()
    # the last step under the profiler: at its start only parameters and optimizer state live
    opt.zero_grad(set_to_none=True)
    gc.collect()
    live0 = sum(p.nbytes for p in model.parameters()) + sum(
        v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    out["peak tensors"] = live0 + tracked_peak_bytes(step)
    out["parameters"] = sum(p.nbytes for p in model.parameters())
    out["Adam moments"] = sum(v.nbytes for st in opt.state.values() for k, v in st.items()
                              if k in ("exp_avg", "exp_avg_sq"))
    out["baseline RSS"] = rss0
    out["peak RSS - baseline"] = peak - rss0
    return out


def tracked_peak_bytes(fn: Any) -> int:
    """Peak growth of live tensor bytes while `fn()` runs, from the CPU allocator's own count.

    torch.profiler(profile_memory=True) records every allocation and free with the
    allocator's running total ("Total Allocated" of the "[memory]" events of the chrome
    trace); it starts from 0 at the profiler's start, so the result excludes what was
    live before.
    """
    import tempfile

    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            totals = [e["args"]["Total Allocated"] for e in json.load(f)["traceEvents"]
                      if e.get("name") == "[memory]"]
    return max(totals, default=0)


def _warm_up(cfg: ModelConfig, impl: str) -> None:
    """One small step first: thread pools and kernel workspaces are not the plan's memory."""
    import torch
    import torch.nn.functional as F

    from engine.model import LandmarkTransformer

    mini = LandmarkTransformer(ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 1, "d_model": 64,
                                                       "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 128,
                                                       "vocab_size": min(cfg.vocab_size, 260)}))
    opt = torch.optim.AdamW(mini.parameters(), foreach=False)
    x = torch.randint(0, 256, (1, 2 * cfg.block_len))  # (1, T)
    F.cross_entropy(mini(x, impl=impl).float().flatten(0, 1), x.flatten()).backward()
    opt.step()


def peak_rss_bytes() -> int:
    """This process's peak resident set since its exec: VmHWM of /proc/self/status.

    Not getrusage's ru_maxrss: Linux carries the parent's high-water mark into a child
    across fork/vfork and execve, so a probe started from a large process (a test run,
    a trainer) would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def probe_env() -> dict[str, str]:
    """Environment of a probe child: 2 threads, glibc's mmap threshold fixed (see module docstring)."""
    return runtime.child_env(default_threads=2, mmap_threshold=MALLOC_MMAP_THRESHOLD)


INFER_COMPONENTS = ("parameters", "local KV window", "retrieved blocks", "device tier", "host tier",
                    "landmark index", "KV store on disk", "peak tensors", "baseline RSS", "peak RSS - baseline")
INFER_SCORED = ("local KV window", "retrieved blocks", "device tier", "host tier", "landmark index",
                "KV store on disk", "peak tensors", "peak RSS - baseline")


def retrieval_kwargs(model: ModelConfig, s: PlanSettings) -> dict[str, int]:
    """RetrievalConfig fields of an infer plan (what folio_ingest.json holds)."""
    from .output import ingest_config_dict

    return ingest_config_dict(model, s)["retrieval"]


def infer_cpu_settings(s: PlanSettings) -> PlanSettings:
    """The infer plan as this CPU runs it: fp32, parameters resident."""
    return dataclasses.replace(s, mode="infer", precision="fp32", offload_param="none", micro_batch=1, gpus=1)


def predict_infer(model: ModelConfig, s: PlanSettings, context: int) -> dict[str, int]:
    """Predicted bytes of what the inference probe measures, for `infer_cpu_settings(s)`."""
    est = estimate(model, infer_cpu_settings(s), context)
    tensors = sum(c.device + c.host for c in est.components if c.name not in ("margin",))
    return {"parameters": est.get("parameters").device, "local KV window": est.get("local KV window").device,
            "retrieved blocks": est.get("retrieved blocks").device,
            "device tier": est.get("store tiers").device, "host tier": est.get("store tiers").host,
            "landmark index": est.get("landmark index").host, "KV store on disk": est.get("KV store").disk,
            "peak tensors": tensors, "baseline RSS": HOST_RESERVED, "peak RSS - baseline": tensors}


def probe_infer(model_dict: dict[str, Any], settings: dict[str, Any], context: int, seed: int = 0) -> dict[str, int]:
    """Ingest `context` generated tokens into a fresh store with the plan's tier budgets, then
    ask one question; returns measured bytes per component (see the module docstring)."""
    import tempfile

    import psutil
    import torch

    from engine.inference import GenerateConfig, ask, ingest, open_store
    from engine.model import LandmarkTransformer
    from engine.retrieval import RetrievalConfig
    from memory_store import StoreConfig

    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({**model_dict, "dtype": "float32"})
    s = PlanSettings(**settings)
    _warm_up(cfg, "blockwise")
    rc = RetrievalConfig(**retrieval_kwargs(cfg, s))
    with tempfile.TemporaryDirectory() as d:
        # the store's libraries (zarr, faiss), its threads and the first ingest are baseline
        mcfg = ModelConfig.from_dict({**cfg.to_dict(), "n_layers": 1, "d_model": 64, "n_heads": 2,
                                      "n_kv_heads": 1, "ffn_hidden": 128})
        mini = LandmarkTransformer(mcfg).eval()
        with open_store(os.path.join(d, "warm"), mcfg, "a", config=StoreConfig(
                device_budget_bytes=0, host_budget_bytes=0, device="cpu", sync_mode="none")) as st:
            ingest(mini, st, "warm", torch.randint(32, 127, (3 * s.chunk,)), retrieval=rc)
            ask(mini, st, "?", streams=["warm"], retrieval=rc, gen=GenerateConfig(max_new_tokens=2))
        del mini
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    model = LandmarkTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(32, 127, (context,), generator=g)  # printable bytes
    out: dict[str, int] = {"parameters": sum(p.nbytes for p in model.parameters())}
    with tempfile.TemporaryDirectory() as d:
        sc = StoreConfig(device_budget_bytes=s.device_tier_bytes, host_budget_bytes=s.host_tier_bytes,
                         device="cpu", sync_mode="none")
        def run(where: str) -> tuple[Any, Any]:
            store = open_store(os.path.join(d, where), cfg, "a", config=sc)
            res = ingest(model, store, "doc", doc, retrieval=rc)
            ask(model, store, "What is the pass key?", streams=["doc"], retrieval=rc,
                gen=GenerateConfig(max_new_tokens=8))
            return store, res.stats

        # first run unprofiled: its RSS and its store; the profiler's event buffers would
        # count as RSS, so the tracked tensor peak comes from a second run on a fresh store
        store, seen = run("store")
        peak = peak_rss_bytes()
        st = store.stats()["tiers"]
        out["device tier"], out["host tier"] = st["device"]["allocated_bytes"], st["host"]["allocated_bytes"]
        idx = store.index
        out["landmark index"] = idx.nbytes
        store.close()
        out["KV store on disk"] = sum(os.path.getsize(os.path.join(r, f))
                                      for r, _, fs in os.walk(os.path.join(d, "store")) for f in fs)
        out["peak tensors"] = out["parameters"] + tracked_peak_bytes(lambda: run("profiled")[0].close())
    # the ingest's chunks hold the largest window and retrieval (a question is shorter than a chunk)
    out["local KV window"], out["retrieved blocks"] = seen.peak_window_bytes, seen.peak_retrieved_bytes
    out["baseline RSS"], out["peak RSS - baseline"] = rss0, peak - rss0
    return out


def run_probe_infer(model: ModelConfig, s: PlanSettings, context: int, *, timeout: float = 300.0) -> dict[str, int]:
    """`probe_infer` in a child process (a clean RSS baseline); returns its measurements."""
    cs = infer_cpu_settings(s)
    arg = json.dumps({"kind": "infer", "model": model.to_dict(), "context": context,
                      "settings": {k: getattr(cs, k) for k in PlanSettings.__slots__}})
    proc = subprocess.run([sys.executable, "-m", "plan.measure", arg], capture_output=True, text=True,
                          timeout=timeout, env=probe_env())
    if proc.returncode != 0:
        raise MeasureUnavailableError(f"the inference probe failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_infer(model: ModelConfig, s: PlanSettings, context: int, measured: dict[str, int]) -> list[dict[str, Any]]:
    """Rows of component, predicted, measured, error % for an infer plan."""
    pred = predict_infer(model, s, context)
    return [{"component": n, "predicted": pred[n], "measured": measured[n], "scored": n in INFER_SCORED,
             "error_pct": 100.0 * (measured[n] - pred[n]) / pred[n] if pred[n] else 0.0}
            for n in INFER_COMPONENTS]


def run_probe(model: ModelConfig, s: PlanSettings, *, steps: int = 2, timeout: float = 300.0) -> dict[str, int]:
    """`probe` in a child process (a clean RSS baseline); returns its measurements."""
    cs = cpu_settings(s)
    arg = json.dumps({"model": model.to_dict(), "settings": {k: getattr(cs, k) for k in PlanSettings.__slots__},
                      "steps": steps})
    env = probe_env()
    proc = subprocess.run([sys.executable, "-m", "plan.measure", arg], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise MeasureUnavailableError(f"the training probe failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(model: ModelConfig, s: PlanSettings, measured: dict[str, int]) -> list[dict[str, Any]]:
    """Rows of component, predicted, measured, error % (measured vs predicted)."""
    pred = predict(model, s)
    rows = []
    for name in COMPONENTS:
        p, m = pred[name], measured[name]
        rows.append({"component": name, "predicted": p, "measured": m, "scored": name in SCORED,
                     "error_pct": 100.0 * (m - p) / p if p else 0.0})
    return rows


def measure_plan(report: Any, *, steps: int = 2, infer_context: int = 8192) -> str:
    """Run `report`'s plan on this machine; the measured-vs-predicted table.

    Train: a few steps of the plan's window. Infer: an ingest of `infer_context`
    generated tokens (or the plan's context, if shorter) with the plan's store budgets,
    then an ask. Raises MeasureUnavailableError when the plan does not fit this machine.
    """
    import psutil

    from engine.units import format_bytes

    result = report.result
    s = result.chosen.settings
    have = psutil.virtual_memory().available
    if result.mode == "infer":
        context = min(result.context, infer_context)
        pred = predict_infer(result.model, s, context)
        if pred["peak tensors"] > 0.7 * have:
            raise MeasureUnavailableError(f"the infer plan needs about {format_bytes(pred['peak tensors'])} in "
                                          f"fp32 on this CPU, {format_bytes(have)} is available; measure a "
                                          f"smaller model (e.g. --model tiny or small)")
        rows = compare_infer(result.model, s, context, run_probe_infer(result.model, s, context))
        head = f"measured on this CPU ({infer_cpu_settings(s).label()}, fp32, ingest {context:,} tokens + ask):"
    else:
        need = predict(result.model, s)["peak tensors"]
        if need > 0.7 * have:
            raise MeasureUnavailableError(f"the plan's training window needs about {format_bytes(need)} in fp32 "
                                          f"on this CPU, {format_bytes(have)} is available; measure a smaller "
                                          f"model (e.g. --model tiny or small)")
        rows = compare(result.model, s, run_probe(result.model, s, steps=steps))
        head = f"measured on this CPU ({cpu_settings(s).label()}, fp32, {steps} steps):"
    return format_rows(head, rows)


def format_rows(head: str, rows: list[dict[str, Any]]) -> str:
    """The printed table of `compare` / `compare_infer` rows."""
    from engine.units import format_bytes

    lines = [head, f"{'component':22s} {'predicted':>12s} {'measured':>12s} {'error':>8s}"]
    for r in rows:
        lines.append(f"{r['component']:22s} {format_bytes(r['predicted']):>12s} "
                     f"{format_bytes(r['measured']):>12s} {r['error_pct']:+7.1f}%"
                     + ("" if r["scored"] else "  (reference)"))
    worst = max((abs(r["error_pct"]) for r in rows if r["scored"]), default=0.0)
    lines.append(f"largest error of the scored rows: {worst:.1f}% (goal <= 15%); baseline RSS is "
                 f"Python + torch + libraries before the run, the planner reserves "
                 f"{format_bytes(HOST_RESERVED)} for it")
    return "\n".join(lines)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    if spec.get("kind") == "infer":
        print(json.dumps(probe_infer(spec["model"], spec["settings"], spec["context"])))
    else:
        print(json.dumps(probe(spec["model"], spec["settings"], steps=spec.get("steps", 2))))
