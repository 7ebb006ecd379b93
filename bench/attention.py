"""Attention benchmark: landmark grouped softmax against PyTorch's fused causal SDPA.

    python -m bench.attention [--quick] [--out PATH]

Figures (each a ratio against a baseline measured in the same run):
  landmark_vs_sdpa_fwd_bwd_T2048    forward+backward time of implementation 2
                                    (vectorized) / F.scaled_dot_product_attention(causal)
  blockwise_vs_sdpa_fwd_bwd_T2048   the same for implementation 3 (blockwise)
  blockwise_peak_mem_ratio_T8192_vs_T2048
                                    peak memory of implementation 3 (forward+backward)
                                    at T=8192 / at T=2048; linear growth gives 4,
                                    quadratic 16. Measured as the peak of live tensor
                                    bytes counted by the CPU allocator (profiler memory
                                    events) above what was live before the call.
  landmark_vs_sdpa_fwd_bwd_T2048_1thread, blockwise_vs_sdpa_fwd_bwd_T2048_1thread
                                    the same two time ratios with torch limited to one
                                    thread (both sides): steadier when other work shares
                                    the cores, which stalls every parallel region.
  landmark_fwd_bwd_matmul_fraction_T2048
                                    share of implementation 2's forward+backward CPU time
                                    spent in matrix products (bmm/addmm, profiler, one
                                    thread); the rest is elementwise passes and overhead.
Writes runs/bench/attention.json (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import RUNS
from engine import runtime
from engine.attention import landmark_attention, landmark_attention_blockwise

RESULTS = RUNS / "attention.json"
SHAPE = dict(B=1, H=8, D=64, L=64)


def _inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["D"]
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(True) for _ in range(3)]


def _time_fwd_bwd(fn, T: int, reps: int) -> float:
    q, k, v = _inputs(T)

    def once():
        out = fn(q, k, v)
        out.sum().backward()
        q.grad = k.grad = v.grad = None

    once()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def vectorized(q, k, v):
    return landmark_attention(q, k, v, SHAPE["L"])


def blockwise(q, k, v):
    return landmark_attention_blockwise(q, k, v, SHAPE["L"])


def matmul_fraction(fn, T: int) -> float:
    """Share of fn's forward+backward self CPU time spent in matrix-product kernels."""
    q, k, v = _inputs(T)
    fn(q, k, v).sum().backward()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(q, k, v).sum().backward()
    total = mm = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if e.key in ("aten::bmm", "aten::mm", "aten::addmm", "aten::addmm_", "aten::baddbmm",
                     "aten::baddbmm_", "aten::addbmm"):
            mm += e.self_cpu_time_total
    return mm / total


def peak_mem_bytes(fn, T: int) -> int:
    """Peak growth of live tensor bytes during a forward+backward of `fn` at length T.

    Read from the CPU allocator's own count ("Total Allocated" of the profiler's memory
    events), so it measures tensors, not the allocator's arenas or thread pools.
    """
    q, k, v = _inputs(T)
    g = torch.randn_like(q)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn(q, k, v).backward(g)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    first = events[0]
    before = first["Total Allocated"] - first["Bytes"]  # live bytes when the call began
    return max(e["Total Allocated"] for e in events) - before


def run(quick: bool) -> dict:
    reps = 2 if quick else 5
    T = 2048
    res: dict = {}
    t_sdpa = _time_fwd_bwd(sdpa_causal, T, reps)
    t_vec = _time_fwd_bwd(vectorized, T, reps)
    t_blk = _time_fwd_bwd(blockwise, T, reps)
    res["sdpa_fwd_bwd_T2048_s"] = t_sdpa
    res["landmark_fwd_bwd_T2048_s"] = t_vec
    res["blockwise_fwd_bwd_T2048_s"] = t_blk
    res["landmark_vs_sdpa_fwd_bwd_T2048"] = t_vec / t_sdpa
    res["blockwise_vs_sdpa_fwd_bwd_T2048"] = t_blk / t_sdpa
    with runtime.threads(1):
        s1 = _time_fwd_bwd(sdpa_causal, T, reps)
        res["sdpa_fwd_bwd_T2048_1thread_s"] = s1
        res["landmark_vs_sdpa_fwd_bwd_T2048_1thread"] = _time_fwd_bwd(vectorized, T, reps) / s1
        res["blockwise_vs_sdpa_fwd_bwd_T2048_1thread"] = _time_fwd_bwd(blockwise, T, reps) / s1
        res["landmark_fwd_bwd_matmul_fraction_T2048"] = matmul_fraction(vectorized, T)
    m2, m8 = peak_mem_bytes(blockwise, 2048), peak_mem_bytes(blockwise, 8192)
    res["blockwise_peak_mem_T2048_bytes"] = m2
    res["blockwise_peak_mem_T8192_bytes"] = m8
    res["blockwise_peak_mem_ratio_T8192_vs_T2048"] = m8 / m2
    # contrast: the vectorized path materialises (B, H, T, T) scores, so it grows 4x per doubling
    v1, v2 = peak_mem_bytes(vectorized, 1024), peak_mem_bytes(vectorized, 2048)
    res["vectorized_peak_mem_ratio_T2048_vs_T1024"] = v2 / v1
    if not quick:
        for t in (512, 1024, 4096):
            s = _time_fwd_bwd(sdpa_causal, t, reps)
            res[f"landmark_vs_sdpa_fwd_bwd_T{t}"] = _time_fwd_bwd(vectorized, t, reps) / s
            res[f"blockwise_vs_sdpa_fwd_bwd_T{t}"] = _time_fwd_bwd(blockwise, t, reps) / s
    res["shape"] = dict(SHAPE)
    res["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "quick": quick}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under 60 s)")
    ap.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    args = ap.parse_args(argv)
    t0 = time.time()
    res = run(args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{'figure':45s} {'value':>12s}")
    for key, val in res.items():
        if isinstance(val, float):
            print(f"{key:45s} {val:12.4g}")
    print(f"goals: landmark_vs_sdpa <= 1.5, peak_mem_ratio <= 5   ({time.time() - t0:.1f} s, "
          f"wrote {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
