"""UIO-LLMs' estimator, measured as the paper's Table 4 and its timing claim.

    python -m bench.uio            # the full run
    python -m bench.uio --quick    # under 60 s

grad_norm_ratio: for S in {1, 4, 8}, the mean over draws (and model seeds) of ||g_hat|| / ||g||,
g the full-BPTT gradient of a document (one graph, memories not detached) and g_hat the
incremental TBPTT estimate with a reservoir of S live encoder graphs, with and without the
unbiasing factor c_t = max(1, t/S). Paper (Table 4): without 0.676 / 0.818 / 0.935, with
0.994 / 0.980 / 1.024. Model: a small random float64 UIO model in the paper's setting (base
frozen; encoder LoRA, transfer-head LoRA and slot trained), documents of 16 windows of random
tokens whose later windows' targets are the first window's tokens. Also the wall time of one document's forward + backward against S (the incremental form
runs one encoder backward per memory whatever S is: flat), and the peak number of live graphs.

Writes bench/results/uio.json and uio.md. The trained-model parts of the evaluation
(autoencoding, perplexity against length, passkey) are not built yet (see issue 18's note).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.model import LandmarkTransformer
from engine.uio import UIOConfig, attach
from train.uio_tbptt import IncrementalTBPTT, full_bptt

RESULTS = Path(__file__).resolve().parent / "results"


def _model(seed: int, *, d_model: int = 16, n_layers: int = 2, dtype=torch.float64) -> LandmarkTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, d_model=d_model, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                      ffn_hidden=2 * d_model, max_seq_len=256, block_len=4, attention="causal")
    m = LandmarkTransformer(cfg).to(dtype)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    mods = attach(m, UIOConfig(ratio=4, enc_rank=2, head_rank=2), slot_token=3)
    for lora in [*mods.enc_q, *mods.enc_v, *mods.head_k, *mods.head_v]:
        torch.nn.init.normal_(lora.B, std=0.3)
    return m


def _document(seed: int, n_windows: int, T: int = 8):
    """Windows of random tokens whose targets (from the second window on) are the first window's
    tokens: every later loss wants the same thing from the first memories, as a document's later
    text depends on its beginning (on random targets the memory terms of the gradient point
    every way and the ratio says nothing)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(0, 39, (1, T), generator=g) for _ in range(n_windows)]
    return [(x, torch.randint(0, 39, (1, T), generator=g) if t == 0 else xs[0]) for t, x in enumerate(xs)]


def _loss(logits, y):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _flat_grad(m) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in m.parameters() if p.requires_grad])


def norm_ratios(S_values=(1, 4, 8), seeds: int = 32, n_windows: int = 16, model_seeds: int = 2) -> dict:
    """{"with_factor": {S: mean ratio}, "without_factor": {...}}: mean over model seeds x draws."""
    out = {"with_factor": {}, "without_factor": {}}
    sums = {(S, f): 0.0 for S in S_values for f in (True, False)}
    n = 0
    for ms in range(model_seeds):
        m = _model(ms)
        doc = _document(100 + ms, n_windows)
        m.zero_grad(set_to_none=True)
        full_bptt(m, doc, _loss)
        g = _flat_grad(m).norm()
        for seed in range(seeds):
            for S in S_values:
                for f in (True, False):
                    m.zero_grad(set_to_none=True)
                    IncrementalTBPTT(m, S=S, factor=f, seed=1000 * seed + S).run_document(doc, _loss)
                    sums[(S, f)] += float(_flat_grad(m).norm() / g)
            n += 1
    for (S, f), v in sums.items():
        out["with_factor" if f else "without_factor"][str(S)] = round(v / n, 4)
    return out


def time_against_S(S_values=(0, 1, 2, 4, 8), n_windows: int = 16, repeats: int = 3) -> list[dict]:
    """Seconds per document (forward + backward, float32, d_model 64, windows of 64) against S."""
    m = _model(0, d_model=64, n_layers=2, dtype=torch.float32)
    doc = _document(7, n_windows, T=64)
    rows = []
    for S in S_values:
        best, live, enc = float("inf"), 0, 0
        for r in range(repeats):
            m.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            res = IncrementalTBPTT(m, S=S, seed=r).run_document(doc, _loss)
            best = min(best, time.perf_counter() - t0)
            live, enc = res.max_live, res.encoder_backwards
        rows.append({"S": S, "seconds_per_document": round(best, 4), "max_live_graphs": live,
                     "encoder_backwards": enc})
    m.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    full_bptt(m, doc, _loss)
    rows.append({"S": "full BPTT", "seconds_per_document": round(time.perf_counter() - t0, 4),
                 "max_live_graphs": n_windows - 1, "encoder_backwards": n_windows - 1})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None, help="draws per model (default 64; quick 12)")
    ap.add_argument("--out", default=str(RESULTS / "uio.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    seeds = args.seeds or (12 if args.quick else 64)
    res = {"command": "python -m bench.uio" + (" --quick" if args.quick else ""),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "grad_norm_ratio": norm_ratios(seeds=seeds, model_seeds=1 if args.quick else 4),
           "paper_table4": {"without_factor": {"1": 0.676, "4": 0.818, "8": 0.935},
                            "with_factor": {"1": 0.994, "4": 0.980, "8": 1.024}},
           "time_against_S": time_against_S(repeats=1 if args.quick else 3)}
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    md = format_md(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} in {res['total_seconds']} s")
    return 0


def format_md(res: dict) -> str:
    r, p = res["grad_norm_ratio"], res["paper_table4"]
    Ss = list(r["with_factor"])
    lines = [f"`{res['command']}` — {res['machine']}", "",
             "| mean ‖ĝ‖/‖g‖ | " + " | ".join(f"S={s}" for s in Ss) + " |", "|---|" + "---|" * len(Ss)]
    for k in ("without_factor", "with_factor"):
        lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(f"{r[k][s]:.3f}" for s in Ss) + " |")
        lines.append(f"| paper, {k.replace('_', ' ')} | " + " | ".join(f"{p[k].get(s, float('nan')):.3f}" for s in Ss)
                     + " |")
    lines += ["", "| S | s / document | live graphs (max) | encoder backwards |", "|---|---|---|---|"]
    for row in res["time_against_S"]:
        lines.append(f"| {row['S']} | {row['seconds_per_document']} | {row['max_live_graphs']} | "
                     f"{row['encoder_backwards']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
