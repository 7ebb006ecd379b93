"""Inference benchmark: retrieval decode and ingest against their baselines, same run.

    python -m bench.inference [--quick] [--out PATH]

The tiny preset, randomly initialised (seed 0: costs do not depend on the weights), on documents
of random printable bytes. Every context length runs in its own child process (a clean peak-RSS
reading), which ingests the document into a fresh store with fixed budgets (BUDGETS: every
measured context fills both memory tiers and spills to disk) and decodes with retrieval through
`engine.inference.generate` (the time between two yielded tokens is one decode step).

Figures (each against a baseline measured in the same run; BENCHMARKS.md says how and why):

  decode_speedup_vs_full_64k   per-token decode with full landmark attention over a 64k-token KV
                               cache (implementation 3, random K/V) / retrieval decode with 64k
                               tokens stored, both in the 64k child, in alternation, on jemalloc
                               and again on glibc's malloc when jemalloc is there: the lower ratio
                               (decode_speedup_vs_full_64k_separate: the baseline in the parent)
  decode_growth_4k_to_1m       retrieval decode per token at 1M tokens of context / at 4k (goal
                               <= 1.5; --quick: 4k -> 64k, named so), both stores in the 1M child,
                               decoded in alternation (decode_growth_4k_to_1m_separate_children:
                               one child each)
  ingest_store_overhead        `ingest` into the tiered store (zarr on disk, write-behind, landmark
                               index, durable commits) / the same `ingest` with the store replaced
                               by an in-RAM list of blocks searched by the same exact search code
                               (goal <= 1.15)
  peak_rss_mb_{16k,256k,1m}    peak RSS (VmHWM) of the child that ingested and decoded that
                               context (goal: flat, 1M within 10% of 16k; --quick: 16k and 64k),
                               on the allocator `folio` uses (`allocator`, engine/runtime.py);
                               when that is jemalloc, again on glibc's malloc:
                               peak_rss_mb_system_malloc_{16k,256k,1m}

Writes runs/bench/inference.json (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import RUNS
from engine import runtime

RESULTS = RUNS
BUDGETS = dict(device_budget_bytes=4 << 20, host_budget_bytes=8 << 20, write_queue_bytes=16 << 20)
DECODE_STEPS = 24
GROWTH_ROUNDS = 4  # decode-growth: alternating rounds of DECODE_STEPS steps per store
SPEEDUP_ROUNDS = 3  # decode speedup: alternating rounds of full attention / retrieval decode
FULL_STEPS = 12  # full-attention decode steps per round (the first two allocate: not timed)
QUESTION = "What is the pass key? The pass key is"


def _model():
    from engine.config import preset
    from engine.model import LandmarkTransformer

    torch.manual_seed(0)
    return LandmarkTransformer(preset("tiny")).eval()


def _document(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=g).to(torch.uint8)  # a byte document: 1 byte per token


def _store_config(**kw):
    from memory_store import StoreConfig

    return StoreConfig(device="cpu", **{**BUDGETS, **kw})


def _retrieval():
    from engine.retrieval import RetrievalConfig

    return RetrievalConfig()  # the defaults users get: top-4, 2 local blocks, chunks of window - 2 blocks (384)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def retrieval_decode_times(model, store, stream: str, steps: int) -> list[float]:
    """Seconds per decode step of `generate` over `stream`, after the question's prefill."""
    from engine.inference import GenerateConfig, generate
    from engine.tokenizer import ByteTokenizer

    prompt = ByteTokenizer().encode(QUESTION)
    it = generate(model, store, prompt, streams=[stream], retrieval=_retrieval(),
                  gen=GenerateConfig(max_new_tokens=steps + 1))
    times = []
    with torch.no_grad():
        next(it)  # the prefill of the question
        t = time.perf_counter()
        for _ in it:
            now = time.perf_counter()
            times.append(now - t)
            t = now
    return times


def child(context: int, growth_base: int | None = None, full_baseline: bool = False) -> dict[str, Any]:
    """Ingest `context` tokens into a fresh store, then decode; runs in its own process.

    growth_base: after the peak-RSS reading, also ingest that many tokens into a second
    store and decode from the two stores in alternation (GROWTH_ROUNDS rounds): the
    decode-growth figure, taken side by side in one process so that the machine's speed
    drifting between children (minutes apart) does not enter the ratio. full_baseline: then
    decode with full attention over a `context`-token KV cache and with retrieval from the
    store in alternation (SPEEDUP_ROUNDS rounds): the decode-speedup figure, side by side."""
    from engine.inference import ingest, open_store

    threads = os.environ.get("FOLIO_BENCH_THREADS")
    runtime.set_threads(int(threads) if threads else None)
    model = _model()
    doc = _document(context)
    out: dict[str, Any] = {"context": context}
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        store = open_store(os.path.join(d, "store"), model.cfg, "w", config=_store_config())
        t0 = time.perf_counter()
        ingest(model, store, "doc", doc, retrieval=_retrieval())
        ingest_s = time.perf_counter() - t0
        times = retrieval_decode_times(model, store, "doc", DECODE_STEPS)
        out.update(ingest_s=ingest_s, ingest_tokens_per_s=context / ingest_s, decode_step_s=statistics.median(times),
                   decode_steps=len(times), blocks=len(store), peak_rss_bytes=_peak_rss_bytes(),
                   allocator=_allocator())
        if growth_base:
            base = open_store(os.path.join(d, "base"), model.cfg, "w", config=_store_config())
            ingest(model, base, "doc", _document(growth_base), retrieval=_retrieval())
            alt: dict[str, list[float]] = {"base": [], "this": []}
            for _ in range(GROWTH_ROUNDS):
                alt["base"] += retrieval_decode_times(model, base, "doc", DECODE_STEPS)
                alt["this"] += retrieval_decode_times(model, store, "doc", DECODE_STEPS)
            out["growth_base"] = growth_base
            out["alternating_decode_step_s"] = {k: statistics.median(v) for k, v in alt.items()}
            base.close()
        if full_baseline:
            pair: dict[str, list[float]] = {"full": [], "retrieval": []}
            for _ in range(SPEEDUP_ROUNDS):
                pair["full"] += full_attention_decode_times(model, context, FULL_STEPS)
                pair["retrieval"] += retrieval_decode_times(model, store, "doc", DECODE_STEPS)
            out["alternating_full_vs_retrieval_step_s"] = {k: statistics.median(v) for k, v in pair.items()}
        store.close()
    return out


def _label(context: int) -> str:
    """A context length as figure names spell it: 16k, 256k, 1m."""
    return "1m" if context == 1048576 else f"{context // 1024}k"


def _allocator() -> str:
    return runtime.active()


def run_child(context: int, env: dict[str, str] | None = None, growth_base: int | None = None,
              full_baseline: bool = False) -> dict[str, Any]:
    extra = (["--growth-base", str(growth_base)] if growth_base else []) + (["--full-baseline"] if full_baseline else [])
    proc = subprocess.run([sys.executable, "-m", "bench.inference", "--child", str(context), *extra],
                          capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child for context {context} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_attention_decode_times(model, context: int, steps: int) -> list[float]:
    """Per-token decode with the whole context in a KV cache (landmark attention, impl 3)."""
    from engine.kv_cache import KVCache

    cfg = model.cfg
    cache = KVCache(cfg.n_layers, 1, cfg.n_kv_heads, cfg.head_dim, context + steps + 1)
    g = torch.Generator().manual_seed(2)
    for layer in cache.layers:
        for t in (layer.k, layer.k_rot, layer.v):
            t[:, :, :context] = torch.randn(t[:, :, :context].shape, generator=g)
    cache.length = context
    tok = torch.tensor([[65]])
    times = []
    with torch.no_grad():
        for _ in range(steps):
            t = time.perf_counter()
            model(tok, cache=cache)
            times.append(time.perf_counter() - t)
    return times[2:]  # the first calls allocate


class InRamBlocks:
    """The store disabled: completed blocks kept as plain tensors in RAM.

    Implements the part of the TieredStore interface that `ingest` and
    `RetrievalMemory` use, with nothing behind it: no tiers, budgets, disk, checksums,
    write-behind queue or index persistence. Search is the store's own exact search code
    (a `LandmarkIndex` with backend "exact": the landmark keys in one tensor, scored with
    a matmul), so the ratio isolates what the store adds, not a different search.
    """

    def __init__(self, layout):
        from memory_store.index import LandmarkIndex

        self.layout, self.device = layout, torch.device("cpu")
        self.k: list[torch.Tensor] = []  # per block (nl, Hkv, L, D)
        self.v: list[torch.Tensor] = []
        self.meta: dict[str, dict] = {}
        self.index = LandmarkIndex(layout.n_layers, layout.n_kv_heads, layout.head_dim, backend="exact")

    def __len__(self) -> int:
        return len(self.k)

    def put_blocks(self, stream, k, v, landmarks):
        start = len(self.k)
        self.k.extend(k.unbind(0))
        self.v.extend(v.unbind(0))
        ids = np.arange(start, len(self.k), dtype=np.int64)
        self.index.add(stream, ids, landmarks)
        return ids

    def search(self, layer, queries, k, streams=None):
        return self.index.search(layer, queries, k, streams=streams)

    def search_max(self, layer, queries, k, streams=None):
        return self.index.search_max(layer, queries, k, streams=streams)

    def get_layer(self, ids, layer, promote=True):
        ids = [int(i) for i in ids]
        return (torch.stack([self.k[i][layer] for i in ids]), torch.stack([self.v[i][layer] for i in ids]))

    def block_meta(self, ids):
        ids = [int(i) for i in ids]
        return ["doc"] * len(ids), np.asarray(ids, dtype=np.int64)

    def stream_blocks(self, stream):
        return np.arange(len(self.k), dtype=np.int64)

    def get_stream_meta(self, stream):
        return dict(self.meta.get(stream, {}))

    def set_stream_meta(self, stream, meta):
        self.meta[stream] = dict(meta)

    def flush(self):
        pass

    def stats(self):
        return {}


def ingest_overhead(model, context: int, rounds: int) -> dict[str, Any]:
    from engine.inference import ingest, open_store, store_layout_for

    doc = _document(context, seed=3)
    t_store, t_ram = [], []
    with torch.no_grad():
        for r in range(rounds):
            with tempfile.TemporaryDirectory() as d:
                store = open_store(os.path.join(d, "store"), model.cfg, "w", config=_store_config())
                t = time.perf_counter()
                ingest(model, store, "doc", doc, retrieval=_retrieval())
                store.close()  # the write-behind queue drains and the index is saved: part of the cost
                t_store.append(time.perf_counter() - t)
            ram = InRamBlocks(store_layout_for(model.cfg))
            t = time.perf_counter()
            ingest(model, ram, "doc", doc, retrieval=_retrieval())
            t_ram.append(time.perf_counter() - t)
    return {"ingest_store_overhead": round(statistics.median(t_store) / statistics.median(t_ram), 3),
            "ingest_context": context, "ingest_store_s": [round(x, 3) for x in t_store],
            "ingest_in_ram_s": [round(x, 3) for x in t_ram]}


def run(quick: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = _model()
    res: dict[str, Any] = {"command": "python -m bench.inference" + (" --quick" if quick else "")}
    contexts = (4096, 16384, 65536) if quick else (4096, 16384, 65536, 262144, 1048576)
    rss_contexts = (16384, 65536) if quick else (16384, 262144, 1048576)
    # the allocator `folio` runs on: jemalloc when the machine has it (engine.runtime), else glibc's
    jem_env = runtime.preload_env()
    system_env = runtime.child_env(malloc="system")
    kids = {}
    for n in contexts:
        kids[n] = run_child(n, jem_env or system_env, growth_base=contexts[0] if n == contexts[-1] else None,
                            full_baseline=n == 65536)
        k = kids[n]
        print(f"  context {n:>9,}: ingest {k['ingest_tokens_per_s']:,.0f} tok/s, decode "
              f"{1e3 * k['decode_step_s']:.1f} ms/token, peak RSS {k['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"({k['allocator']} malloc)", flush=True)
    res["allocator"] = kids[contexts[0]]["allocator"]
    pairs = {kids[65536]["allocator"]: kids[65536]["alternating_full_vs_retrieval_step_s"]}
    if jem_env is not None:  # the same children on glibc's malloc, for the RSS comparison
        for n in sorted({*rss_contexts, 65536}):
            k = run_child(n, system_env, full_baseline=n == 65536)
            if n == 65536:
                pairs[k["allocator"]] = k["alternating_full_vs_retrieval_step_s"]
            if n in rss_contexts:
                res[f"peak_rss_mb_system_malloc_{_label(n)}"] = round(k["peak_rss_bytes"] / 2**20, 1)
                print(f"  context {n:>9,}: peak RSS {k['peak_rss_bytes'] / 2**20:.0f} MiB ({k['allocator']} malloc)",
                      flush=True)
    # both in one child, alternating; on each allocator when there are two (full attention's
    # big per-step tiles run slower on jemalloc's defaults): the figure is the lower ratio
    speedups = {a: p["full"] / p["retrieval"] for a, p in pairs.items()}
    low = min(speedups, key=speedups.get)
    res["full_attention_decode_step_s_64k"] = round(pairs[low]["full"], 5)
    res["retrieval_decode_step_s"] = {str(n): round(k["decode_step_s"], 5) for n, k in kids.items()}
    res["decode_speedup_vs_full_64k"] = round(speedups[low], 2)
    res["decode_speedup_vs_full_64k_by_allocator"] = {a: round(v, 2) for a, v in speedups.items()}
    res["decode_speedup_alternating_step_s"] = {a: {k: round(v, 5) for k, v in p.items()} for a, p in pairs.items()}
    full = statistics.median(full_attention_decode_times(model, 65536, FULL_STEPS))  # in this process
    res["decode_speedup_vs_full_64k_separate"] = round(full / kids[65536]["decode_step_s"], 2)
    top = contexts[-1]
    name = f"decode_growth_4k_to_{_label(top)}"
    alt = kids[top]["alternating_decode_step_s"]  # both stores in one process, alternating
    res[name] = round(alt["this"] / alt["base"], 3)
    res["decode_growth_alternating_step_s"] = {"4096": round(alt["base"], 5), str(top): round(alt["this"], 5)}
    res[name + "_separate_children"] = round(kids[top]["decode_step_s"] / kids[4096]["decode_step_s"], 3)
    for n in rss_contexts:
        res[f"peak_rss_mb_{_label(n)}"] = round(kids[n]["peak_rss_bytes"] / 2**20, 1)
    res["ingest_tokens_per_s"] = {str(n): round(k["ingest_tokens_per_s"]) for n, k in kids.items()}
    res.update(ingest_overhead(model, 16384 if quick else 65536, rounds=2 if quick else 3))
    res["tier_budgets"] = {k: v for k, v in BUDGETS.items()}
    res["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "quick": quick}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="contexts up to 64k (under a minute)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--growth-base", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--full-baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "inference.json"), help="where to write the JSON")
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.growth_base, args.full_baseline)))
        return 0
    res = run(args.quick)
    print(f"{'figure':45s} value")
    for k, v in res.items():
        if isinstance(v, (int, float)) and k != "wall_s":
            print(f"{k:45s} {v}")
    print("goals: decode_speedup_vs_full_64k >= 10, decode_growth <= 1.5, ingest_store_overhead <= 1.15, "
          "peak RSS flat")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({res['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
