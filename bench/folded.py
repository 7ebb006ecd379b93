"""Folded context (variant A) against no memory and landmark retrieval, as the paper measures it.

    python -m bench.folded            # the full run (minutes; BENCHMARKS.md gives its wall time)
    python -m bench.folded --quick    # one small model, under 60 s

Small models with windows N in {12, 32} and {4, 8, 13} layers are trained here on a pass-key
task: a marker, a one-token key (10 values: chance is 10%), then random filler in which query
tokens appear; at every query the next token is the key. Training runs each sequence as one
forward through a `FoldedMemory` (BPTT over every window, equal to streaming by test P1);
evaluation streams one window per forward, the carry passed on, the query the last position at
distance D from the key, D up to 2 N (layers + 1); test sequences are padded in front with filler
to whole windows (variant B runs whole windows), so the query closes its window and the key sits
at four offsets within its own. Same run, same test sequences:
  folded      the trained model with its carry (engine/folded.py, a reconstruction; variant A);
  folded_B    variant B, the folded recurrence (the previous window's top-layer states as a prefix
              at layer 0), trained with BPTT through every window (first N, fewest layers only);
  none        the same weights with the carry reset every window (no memory beyond the window);
  landmark    a landmark model (block 4 = 3 tokens + landmark) trained with the grouped softmax on
              whole sequences, streamed with retrieval from a block store (top-2 blocks per layer
              and KV head, the previous window local): Landmark Attention at the same window.
The reach limit: a key k windows before the query's window reaches it iff k <= layers, so with
the query closing its window every D <= N (layers + 1) - 1 is reachable and none beyond (a
query early in its window would reach only N x layers for every offset). Also: the folded state's bytes and the process's peak RSS against document
length (constant), beside what a full KV cache would hold.

Writes runs/bench/folded.json (--out PATH to choose; top-level `window12_accuracy_at_150`: the N = 12, 13-layer
model's accuracy at distance 150, full run only) and folded.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import RUNS, machine, write_results
from engine.config import ModelConfig
from engine.folded import FoldedMemory, FoldedRecurrence, reach, state_numbers
from engine.model import LandmarkTransformer

RESULTS = RUNS
FILLER = 20  # filler symbols 0..19
KEY0, N_KEYS = 20, 10  # key symbols 20..29
MARK, ASK = 30, 31
VOCAB = 33  # + the landmark (32) of the landmark baseline
LANDMARK = 32


def _cfg(N: int, layers: int, *, landmark: bool = False, max_len: int = 1024) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                       max_seq_len=max_len, block_len=4, attention="landmark" if landmark else "causal",
                       folded_window=0 if landmark else N)


def _sequences(g: torch.Generator, B: int, T: int, n_ask: int, key_pos: int | None = None):
    """B sequences of T tokens: MARK, key at key_pos (random in the first 8 positions if None), filler,
    n_ask ASK tokens at random later positions. Returns tokens (B, T), targets (B, T) (-100 except
    after an ASK: the key), distance of each ASK from its key (B, T) (-1 elsewhere)."""
    x = torch.randint(0, FILLER, (B, T), generator=g)
    keys = torch.randint(KEY0, KEY0 + N_KEYS, (B,), generator=g)
    tgt = torch.full((B, T), -100)
    dist = torch.full((B, T), -1)
    for b in range(B):
        kp = key_pos if key_pos is not None else int(torch.randint(1, 8, (1,), generator=g))
        x[b, kp - 1], x[b, kp] = MARK, keys[b]
        asks = torch.randperm(T - kp - 1, generator=g)[:n_ask] + kp + 1
        x[b, asks] = ASK
        tgt[b, asks] = keys[b]
        dist[b, asks] = asks - kp
    return x, tgt, dist


def _landmarked(x: torch.Tensor, tgt: torch.Tensor, L: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Insert a landmark after every L-1 tokens (targets of landmarks: none)."""
    B, T = x.shape
    nb = -(-T // (L - 1))
    xs = torch.full((B, nb * L), LANDMARK)
    ts = torch.full((B, nb * L), -100)
    idx = torch.arange(T)
    pos = idx + idx // (L - 1)
    xs[:, pos], ts[:, pos] = x, tgt
    n = int(pos[-1]) + 1
    return xs[:, :n], ts[:, :n]


def train_model(cfg: ModelConfig, *, steps: int, seq_len: int, batch: int, lr: float, seed: int,
                N: int = 12, variant: str = "A", log=print) -> tuple[LandmarkTransformer, dict]:
    """Train on pass-key sequences of up to seq_len tokens, each as one forward (BPTT over all windows)."""
    torch.manual_seed(seed)
    model = LandmarkTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    losses = []
    short = min(seq_len, 2 * N)
    for step in range(steps):
        # curriculum: sequences grow from two windows to seq_len over the first 60% of the steps, so
        # the model learns one hop back before it must chain one per layer
        T = round(short + (seq_len - short) * min(1.0, step / (0.6 * steps)))
        x, tgt, _ = _sequences(g, batch, T, max(4, T // 16))
        if cfg.landmarks:
            x, tgt = _landmarked(x, tgt, cfg.block_len)
            logits = model(x)
        elif variant == "B":  # the recurrence, window by window, BPTT through every window
            Tw = x.shape[1] // N * N
            x, tgt = x[:, :Tw], tgt[:, :Tw]
            rec = FoldedRecurrence(cfg, lanes=batch, detach=False)
            logits = torch.cat([model(x[:, a:a + N], memory=rec) for a in range(0, Tw, N)], 1)
        else:
            logits = model(x, memory=FoldedMemory(cfg, lanes=[None] * batch))
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return model.eval(), {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                          "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "seq_len": seq_len,
                          "batch": batch, "lr": lr}


@torch.no_grad()
def _stream_folded(model: LandmarkTransformer, x: torch.Tensor, carry: bool) -> torch.Tensor:
    """Logits of the last position, one window per forward (carry reset every window if not carry)."""
    N = model.cfg.folded_window
    mem = FoldedMemory(model.cfg, lanes=[None] * x.shape[0])
    logits = None
    for a in range(0, x.shape[1], N):
        if not carry:
            mem.reset()
        logits = model(x[:, a:a + N], memory=mem)
        mem.end_chunk()
    return logits[:, -1]


@torch.no_grad()
def _stream_recurrence(model: LandmarkTransformer, x: torch.Tensor) -> torch.Tensor:
    """Variant B: logits of the last position, one window per forward (x a whole number of windows)."""
    N = model.cfg.folded_window
    rec = FoldedRecurrence(model.cfg, lanes=x.shape[0])
    logits = None
    for a in range(0, x.shape[1], N):
        logits = model(x[:, a:a + N], memory=rec)
    return logits[:, -1]


@torch.no_grad()
def _stream_landmark(model: LandmarkTransformer, x: torch.Tensor, N: int, store_dir: str) -> torch.Tensor:
    """Logits of the last position, streamed in chunks of the folded window's tokens with retrieval."""
    from engine.inference import open_store
    from engine.retrieval import RetrievalConfig, RetrievalMemory

    L = model.cfg.block_len
    chunk = N // (L - 1) * L  # the same tokens per window as the folded model, landmarks added
    rc = RetrievalConfig(top_k=2, local_blocks=chunk // L, chunk_len=chunk)
    out = []
    store = open_store(store_dir, model.cfg, "w")
    try:
        for b in range(x.shape[0]):
            xs, _ = _landmarked(x[b:b + 1], torch.zeros_like(x[b:b + 1]), L)
            if xs[0, -1] == LANDMARK:  # the query is the last token; a landmark after it is not read
                xs = xs[:, :-1]
            mem = RetrievalMemory(model.cfg, store, stream=f"t{b}", retrieval=rc, persist=True)
            logits = None
            for a in range(0, xs.shape[1], chunk):
                logits = model(xs[:, a:a + chunk], memory=mem)
                mem.end_chunk()
            out.append(logits[0, -1])
            store.delete_stream(f"t{b}")
    finally:
        store.close()
    return torch.stack(out)


def evaluate(models: dict, N: int, distances: list[int], trials: int, seed: int, store_dir: str) -> dict:
    """Accuracy of each model at each distance on the same test sequences (the query last)."""
    g = torch.Generator().manual_seed(seed)
    acc: dict[str, dict[str, float]] = {name: {} for name in models}
    for D in distances:
        hits = {name: 0 for name in models}
        n = 0
        for off in range(4):  # the key at 4 offsets within its window
            kp = 1 + (off * N // 4)
            pad = -(kp + D + 1) % N  # filler in front: whole windows (the recurrence runs whole windows)
            x, _, _ = _sequences(g, trials // 4, pad + kp + D + 1, 0, key_pos=pad + kp)
            kp += pad
            x[:, -1] = ASK
            key = x[:, kp]
            for name, (kind, m) in models.items():
                if kind == "landmark":
                    logits = _stream_landmark(m, x, N, store_dir)
                elif kind == "B":
                    logits = _stream_recurrence(m, x)
                else:
                    logits = _stream_folded(m, x, carry=kind == "folded")
                pred = logits[:, KEY0:KEY0 + N_KEYS].argmax(-1) + KEY0
                hits[name] += int((pred == key).sum())
            n += x.shape[0]
        for name in models:
            acc[name][str(D)] = round(hits[name] / n, 3)
    return acc


@torch.no_grad()
def memory_against_length(model: LandmarkTransformer, lengths: list[int]) -> list[dict]:
    """Folded state bytes and peak RSS while streaming documents of growing length."""
    N = model.cfg.folded_window
    g = torch.Generator().manual_seed(0)
    rows = []
    c = model.cfg
    for n in lengths:
        mem = FoldedMemory(c)
        x = torch.randint(0, FILLER, (1, n), generator=g)
        t0 = time.perf_counter()
        for a in range(0, n, N * 16):
            model(x[:, a:a + N * 16], memory=mem)
            mem.end_chunk()
        rows.append({"tokens": n, "state_bytes": mem.state_bytes(),
                     "full_kv_cache_bytes": c.n_layers * 2 * n * c.n_kv_heads * c.head_dim * 4,
                     "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                     "tokens_per_s": round(n / (time.perf_counter() - t0))})
    return rows


def _distances(N: int, layers: int, n: int) -> list[int]:
    top = 2 * N * (layers + 1)
    # N x layers (the last distance every key offset reaches), half a window on (half the offsets
    # do), the reach limit N (layers + 1) - 1 (only a key at a window's first position would)
    pts = {max(2, round(top * i / (n - 1))) for i in range(n)} | {N * layers, N * layers + N // 2, reach(N, layers)}
    if N == 12 and layers == 13:
        pts.add(150)
    return sorted(p for p in pts if p <= top)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small model, few steps (< 60 s)")
    ap.add_argument("--windows", default="12,32", help="folded windows N (default 12,32)")
    ap.add_argument("--layers", default="4,8,13", help="layer counts (default 4,8,13)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per model (default 1000 for N <= 16, else 800 at half the batch; quick 300)")
    ap.add_argument("--trials", type=int, default=24, help="test sequences per distance (default 24; quick 16)")
    ap.add_argument("--no-landmark", action="store_true", help="skip the landmark-retrieval baseline")
    ap.add_argument("--no-b", action="store_true", help="skip variant B (the folded recurrence)")
    ap.add_argument("--out", default=str(RESULTS / "folded.json"), help="where to write the JSON (folded.md beside it)")
    args = ap.parse_args(argv)
    windows = [12] if args.quick else [int(v) for v in args.windows.split(",")]
    layer_counts = [4] if args.quick else [int(v) for v in args.layers.split(",")]
    def steps_batch(N: int) -> tuple[int, int]:
        if args.quick:
            return args.steps or 300, 16
        return (args.steps or (1000 if N <= 16 else 800)), (16 if N <= 16 else 8)

    trials = 16 if args.quick else args.trials
    t_all = time.perf_counter()
    res: dict = {"command": "python -m bench.folded" + (" --quick" if args.quick else ""),
                 "machine": machine(),
                 "task": "one-token key (10 values, chance 0.1) after a marker; random filler; the query last",
                 "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for N in windows:
            landmark = None
            if not args.no_landmark:
                lm_layers = min(layer_counts)
                print(f"landmark baseline: {lm_layers} layers, block 4, window {N}", flush=True)
                seq = N * (lm_layers + 2)
                steps, batch = steps_batch(N)
                steps = min(steps, 400)  # the landmark model learns this task fast (1.0 by 300 steps in --quick)
                lm, lm_info = train_model(_cfg(N, lm_layers, landmark=True, max_len=4 * seq), steps=steps,
                                          seq_len=seq, batch=batch, lr=3e-3, seed=1, N=N)
                landmark = (lm, lm_info, lm_layers)
            for layers in layer_counts:
                print(f"folded: N={N}, {layers} layers (reach {reach(N, layers)})", flush=True)
                seq = N * (layers + 2)
                steps, batch = steps_batch(N)
                m, info = train_model(_cfg(N, layers), steps=steps, seq_len=seq, batch=batch, lr=3e-3, seed=0, N=N)
                models = {"folded": ("folded", m), "none": ("none", m)}
                if layers == min(layer_counts) and N == windows[0] and not args.no_b:
                    print(f"folded B (recurrence): N={N}, {layers} layers", flush=True)
                    mb, info_b = train_model(_cfg(N, layers), steps=min(steps, 600), seq_len=seq, batch=batch, lr=3e-3,
                                             seed=0, N=N, variant="B")
                    models["folded_B"] = ("B", mb)
                if landmark is not None and layers == landmark[2]:
                    models["landmark"] = ("landmark", landmark[0])
                t0 = time.perf_counter()
                acc = evaluate(models, N, _distances(N, layers, 5 if args.quick else 9), trials, seed=7,
                               store_dir=str(Path(tmp) / f"s{N}_{layers}"))
                run = {"window": N, "layers": layers, "reach": reach(N, layers), "n_x_layers": N * layers,
                       "train": info, "eval_seconds": round(time.perf_counter() - t0, 1), "accuracy": acc}
                if "landmark" in models:
                    run["landmark_train"] = landmark[1]
                if "folded_B" in models:
                    run["folded_B_train"] = info_b
                res["runs"].append(run)
                print(f"  accuracy: {json.dumps(acc)}", flush=True)
                if N == 12 and layers == 13:
                    res["window12_accuracy_at_150"] = acc["folded"].get("150")
                if N == windows[0] and layers == layer_counts[0]:
                    res["memory_against_length"] = memory_against_length(
                        m, [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000])
    res["state_numbers_example"] = {"window": 12, "layers": 13,
                                    "numbers": state_numbers(_cfg(12, 13))}
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    write_results(res, args.out, format_md(res))
    return 0


def format_md(res: dict) -> str:
    lines = [f"`{res['command']}` — {res['machine']}; {res['task']}", ""]
    for run in res["runs"]:
        acc = run["accuracy"]
        ds = list(next(iter(acc.values())))
        lines.append(f"N={run['window']}, {run['layers']} layers: reach N(layers+1)-1 = {run['reach']}, "
                     f"N x layers = {run['n_x_layers']}; trained {run['train']['steps']} steps in "
                     f"{run['train']['seconds']} s (final loss {run['train']['final_loss']})")
        lines.append("")
        lines.append("| D | " + " | ".join(ds) + " |")
        lines.append("|---|" + "---|" * len(ds))
        for name, row in acc.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[d]:.2f}" for d in ds) + " |")
        lines.append("")
    if "memory_against_length" in res:
        lines.append("| tokens | folded state bytes | full KV cache bytes | peak RSS MiB | tokens/s |")
        lines.append("|---|---|---|---|---|")
        for r in res["memory_against_length"]:
            lines.append(f"| {r['tokens']:,} | {r['state_bytes']:,} | {r['full_kv_cache_bytes']:,} | "
                         f"{r['peak_rss_mib']} | {r['tokens_per_s']:,} |")
    if res.get("window12_accuracy_at_150") is not None:
        lines.append("")
        lines.append(f"window12_accuracy_at_150 = {res['window12_accuracy_at_150']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
