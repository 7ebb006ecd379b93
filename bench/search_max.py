"""The landmark index's exact max-aggregated search: the fused CPU kernel against the torch path.

    flock /tmp/folio-bench.lock python -m bench.search_max [--quick] [--out PATH]

A chunk's queries choose blocks by their best score over the chunk (`search_max`); exact
search computes, per KV head, the max over Q queries of q . k for every stored landmark key.
The torch path is a bmm per key tile and a max over its scores; `folio_max_dot`
(engine/landmark_cpu.c) computes the same without writing the scores. Same run, in
alternating rounds, both on `LandmarkIndex.search_max` (memory_store.max_scores.set_kernel
switches between them):

  search_max_kernel_vs_torch_<shape>   torch time / kernel time per search (median), at the
                                       tiny model's ingest shape (2 KV heads, head_dim 32, a
                                       384-position chunk x 2 query heads = 768 queries) over
                                       4k and 16k keys (a 262k and a 1M-token stream), and at
                                       SmolLM2's (3 KV heads, head_dim 64, 3 x 1,024 queries,
                                       2k keys: a 128k stream)
  ingest_kernel_vs_torch_<n>           tokens/s of `ingest` of a passkey document of n tokens
                                       (the shipped models/passkey-tiny-prose, landmark
                                       retrieval, a fresh store each) with the kernel / without
                                       (n = 262,144, 3 runs each; --quick 65,536, 2 runs),
                                       alternating, medians; ingest_search_max_kernel_vs_torch_<n>:
                                       the same for the seconds spent inside search_max

Writes runs/bench/search_max.json (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import RUNS, machine, write_results

RESULTS = RUNS / "search_max.json"
SHAPES = {  # name: (KV heads, head_dim, queries, keys)
    "tiny_4k_keys": (2, 32, 768, 4096),
    "tiny_16k_keys": (2, 32, 768, 16384),
    "smollm2_2k_keys": (3, 64, 3072, 2048),
}
MODEL = Path(__file__).resolve().parents[1] / "models" / "passkey-tiny-prose"


def _index_with(H: int, D: int, n: int, seed: int):
    from memory_store.index import LandmarkIndex

    g = torch.Generator().manual_seed(seed)
    ix = LandmarkIndex(1, H, D, backend="exact")
    ix.add("s", torch.arange(n).numpy(), torch.randn(n, 1, H, D, generator=g).numpy())
    return ix


def search_figures(quick: bool) -> dict:
    from engine import cpu_kernels
    from memory_store import max_scores as ms

    if cpu_kernels.get() is None:
        raise SystemExit("the fused CPU kernels did not build (no C compiler?): nothing to compare")
    out: dict = {}
    reps = 5 if quick else 15
    for name, (H, D, Q, N) in SHAPES.items():
        ix = _index_with(H, D, N, seed=N)
        q = torch.randn(Q, H, D, generator=torch.Generator().manual_seed(1))
        times: dict[str, list[float]] = {"kernel": [], "torch": []}
        results = {}
        for r in range(reps + 1):  # round 0 warms both
            for impl in ("kernel", "torch"):
                ms.set_kernel(cpu_kernels.max_scores if impl == "kernel" else None)
                t0 = time.perf_counter()
                results[impl] = ix.search_max(0, q, 8)
                if r:
                    times[impl].append(time.perf_counter() - t0)
        ms.set_kernel(cpu_kernels.max_scores)
        same = torch.equal(results["kernel"][0], results["torch"][0])
        tk, tt = statistics.median(times["kernel"]), statistics.median(times["torch"])
        out[f"search_max_kernel_vs_torch_{name}"] = round(tt / tk, 3)
        out[f"search_max_ms_kernel_{name}"] = round(tk * 1e3, 3)
        out[f"search_max_ms_torch_{name}"] = round(tt * 1e3, 3)
        out[f"search_max_same_top8_{name}"] = same
        print(f"{name:>16}: H {H}, D {D}, {Q} queries x {N:,} keys: kernel {tk * 1e3:.2f} ms, torch "
              f"{tt * 1e3:.2f} ms, ratio {tt / tk:.2f}; same top-8: {same}", flush=True)
    return out


def ingest_figures(n: int, rounds: int) -> dict:
    from engine import cpu_kernels
    from engine.checkpoint import load_model
    from engine.inference import TOKENIZER, ingest, open_store
    from engine.passkey import build_passkey_prompt
    from memory_store import max_scores as ms
    from memory_store.index import LandmarkIndex

    model = load_model(MODEL)
    doc, _ = build_passkey_prompt(n, 0.5, "40213")
    ids = TOKENIZER.encode(doc)
    spent = [0.0]
    real = LandmarkIndex.search_max

    def timed_search_max(self, *a, **kw):  # the time ingest spends in search_max
        t = time.perf_counter()
        try:
            return real(self, *a, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    totals: dict[str, list[float]] = {"torch": [], "kernel": []}
    searches: dict[str, list[float]] = {"torch": [], "kernel": []}
    LandmarkIndex.search_max = timed_search_max
    try:
        for r in range(rounds):
            for impl in ("torch", "kernel") if r % 2 == 0 else ("kernel", "torch"):
                ms.set_kernel(cpu_kernels.max_scores if impl == "kernel" else None)
                spent[0] = 0.0
                with tempfile.TemporaryDirectory() as d, torch.no_grad():
                    store = open_store(Path(d) / "store", model.cfg, "w")
                    t0 = time.perf_counter()
                    ingest(model, store, "doc", ids, progress=False)
                    dt = time.perf_counter() - t0
                    store.close()
                totals[impl].append(dt)
                searches[impl].append(spent[0])
                print(f"ingest {len(ids):,} tokens, {impl}: {dt:.1f} s ({len(ids) / dt:,.0f} tokens/s), "
                      f"{spent[0]:.1f} s of it in search_max", flush=True)
    finally:
        LandmarkIndex.search_max = real
        ms.set_kernel(cpu_kernels.max_scores)
    out: dict = {}
    for impl in ("torch", "kernel"):
        out[f"ingest_tokens_per_s_{impl}_{n}"] = round(len(ids) / statistics.median(totals[impl]), 1)
        out[f"ingest_search_max_s_{impl}_{n}"] = round(statistics.median(searches[impl]), 2)
    out[f"ingest_kernel_vs_torch_{n}"] = round(statistics.median(totals["torch"]) / statistics.median(totals["kernel"]), 3)
    out[f"ingest_search_max_kernel_vs_torch_{n}"] = round(statistics.median(searches["torch"])
                                                         / statistics.median(searches["kernel"]), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a 64k ingest")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"command": "python -m bench.search_max" + (" --quick" if args.quick else ""), "machine": machine()}
    res.update(search_figures(args.quick))
    res.update(ingest_figures(65_536, 2) if args.quick else ingest_figures(262_144, 3))
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    md = "\n".join(["| figure | value |", "|---|---|"] + [f"| `{k}` | {v} |" for k, v in res.items()
                                                          if k not in ("command", "machine", "total_seconds")])
    write_results(res, args.out, md)


if __name__ == "__main__":
    main()
