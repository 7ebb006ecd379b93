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

Trained byte-level models on real text (Austen; the held-out novel Persuasion for evaluation):
autoencoding at ratio 8 and 32 (teacher-forced byte accuracy of rebuilding a window from its
memory, beside the same model without it), and the perplexity of a document's last window
against the document's length (4, 16, 32, 64 windows of 64 bytes) with and without the
memories, for models trained on 16-window documents with S = 2 with / without the factor,
S = 0 (detached), S = 1, 4, 6, and the transfer head's LoRA off (rank 0: the base W_K, W_V).
Landmark retrieval beside UIO, UIO + landmark, and passkey against distance are not measured
here (issue 18's note).

Writes runs/bench/uio.json and uio.md beside it (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from bench import RUNS, machine, write_results
from engine.config import ModelConfig
from engine.model import LandmarkTransformer
from engine.uio import UIOConfig, attach
from train.uio_tbptt import IncrementalTBPTT, full_bptt

RESULTS = RUNS


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
    out = {"with_factor": {}, "without_factor": {}, "mean_estimate": {"with_factor": {}, "without_factor": {}}}
    sums = {(S, f): 0.0 for S in S_values for f in (True, False)}
    bias = {(S, f): 0.0 for S in S_values for f in (True, False)}
    n = 0
    for ms in range(model_seeds):
        m = _model(ms)
        doc = _document(100 + ms, n_windows)
        m.zero_grad(set_to_none=True)
        full_bptt(m, doc, _loss)
        g = _flat_grad(m)
        means = {k: torch.zeros_like(g) for k in sums}
        for seed in range(seeds):
            for S in S_values:
                for f in (True, False):
                    m.zero_grad(set_to_none=True)
                    IncrementalTBPTT(m, S=S, factor=f, seed=1000 * seed + S).run_document(doc, _loss)
                    gh = _flat_grad(m)
                    sums[(S, f)] += float(gh.norm() / g.norm())
                    means[(S, f)] += gh / seeds
            n += 1
        for k in bias:  # ||mean over draws of g_hat|| / ||g||: the bias alone (variance averages out)
            bias[k] += float(means[k].norm() / g.norm()) / model_seeds
    for (S, f), v in sums.items():
        key = "with_factor" if f else "without_factor"
        out[key][str(S)] = round(v / n, 4)
        out["mean_estimate"][key][str(S)] = round(bias[(S, f)], 4)
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


# -- trained models on real text ----------------------------------------------------------------

def _text_windows(text: str, T: int) -> torch.Tensor:
    """A text as consecutive byte windows (n, T) (the byte tokenizer's ids are the bytes)."""
    b = torch.tensor(list(text.encode("utf-8", errors="replace")), dtype=torch.long)
    n = b.numel() // T
    return b[:n * T].view(n, T)


def _byte_model(ratio: int, *, T: int = 64, seed: int = 0, S: int = 2, factor: bool = True,
                head_rank: int = 8) -> LandmarkTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=260, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=352,
                      max_seq_len=T, block_len=8, attention="causal",
                      uio={"ratio": ratio, "enc_rank": 8, "head_rank": head_rank, "S": S, "factor": factor,
                           "train_base": True})
    return LandmarkTransformer(cfg)


def _lr_at(step: int, steps: int, lr: float) -> float:
    return lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))


def autoencoding(ratio: int, *, steps: int, T: int = 64, batch: int = 16, log=print) -> dict:
    """Train a byte model to rebuild a window from its memory: the decoder reads [BOS, x[:-1]] and
    predicts x, with the memory of x (every other batch: without, so the same model has a no-memory
    baseline). Returns held-out (Persuasion) teacher-forced byte accuracy with and without the memory."""
    from engine.corpora import held_out_documents, load, training_documents
    from engine.uio import UIOMemory, encode

    train_w = torch.cat([_text_windows(load(d), T) for d in training_documents("austen")])
    held_w = _text_windows(load(held_out_documents("austen")[0]), T)
    m = _byte_model(ratio, T=T)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    bos = 256
    t0 = time.perf_counter()
    for step in range(steps):
        x = train_w[torch.randint(0, train_w.shape[0], (batch,), generator=g)]
        inp = torch.cat([torch.full((batch, 1), bos), x[:, :-1]], 1)
        mem = UIOMemory(m, [encode(m, x)] if step % 2 == 0 else [])
        loss = F.cross_entropy(m(inp, memory=mem).flatten(0, 1), x.flatten())
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, 2e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  autoencoding ratio {ratio}: step {step + 1}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    m.eval()
    hits = {"with_memory": 0, "without_memory": 0}
    n = 0
    with torch.no_grad():
        for a in range(0, min(held_w.shape[0], 512), 64):
            x = held_w[a:a + 64]
            inp = torch.cat([torch.full((x.shape[0], 1), bos), x[:, :-1]], 1)
            for key, mems in (("with_memory", [encode(m, x)]), ("without_memory", [])):
                pred = m(inp, memory=UIOMemory(m, mems))[..., :256].argmax(-1)
                hits[key] += int((pred == x).sum())
            n += x.numel()
    return {"ratio": ratio, "slots_per_window": T // ratio, "window": T, "train_steps": steps,
            "train_seconds": round(time.perf_counter() - t0, 1),
            **{f"accuracy_{k}": round(v / n, 4) for k, v in hits.items()}}


def _train_document(m, opt, tb, step_fn, wins, loss_fn, *, step: int, steps: int, lr: float, label: str, t0: float,
                    log, per_window: bool = False) -> None:
    """One document through incremental TBPTT, then (only then) one optimizer step."""
    for grp in opt.param_groups:
        grp["lr"] = _lr_at(step, steps, lr)
    opt.zero_grad(set_to_none=True)
    res = tb.run_document(wins, loss_fn)
    if per_window:  # the mean over windows, as a batch of windows would be
        for p in m.parameters():
            if p.grad is not None:
                p.grad /= len(wins)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    step_fn()
    if (step + 1) % max(1, steps // 4) == 0:
        log(f"  {label}: document {step + 1}/{steps} loss {sum(res.losses) / len(res.losses):.3f} "
            f"({time.perf_counter() - t0:.0f} s)")


def _documents(windows: torch.Tensor, n: int, count: int, g: torch.Generator) -> list[torch.Tensor]:
    starts = torch.randint(0, windows.shape[0] - n, (count,), generator=g)
    return [windows[s:s + n] for s in starts.tolist()]


def perplexity_against_length(*, steps: int, lengths=(4, 16, 32, 64), T: int = 64, train_windows: int = 8,
                              variants=(("UIO S=2, factor", 2, True), ("UIO S=2, no factor", 2, False),
                                        ("UIO S=0 (detached memories)", 0, True)), log=print) -> dict:
    """Train a byte model per variant with incremental TBPTT on Austen documents of `train_windows`
    windows (next-byte loss of every window, memories of the earlier ones), then the held-out
    (Persuasion) perplexity of a document's LAST window against the document's length, with the
    memories and without (the same weights)."""
    from engine.corpora import held_out_documents, load, training_documents
    from engine.uio import UIOMemory, encode

    train_w = torch.cat([_text_windows(load(d), T + 1)[:, :T] for d in training_documents("austen")])
    held_w = _text_windows(load(held_out_documents("austen")[0]), T)
    g_eval = torch.Generator().manual_seed(5)
    eval_docs = {n: _documents(held_w, n, 24, g_eval) for n in lengths}
    out: dict = {"window": T, "train_windows": train_windows, "train_documents": steps, "lengths": list(lengths),
                 "variants": {}}
    for name, S, factor, *rest in variants:
        m = _byte_model(8, T=T, seed=1, S=S, factor=factor, head_rank=rest[0] if rest else 8)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        g = torch.Generator().manual_seed(1)
        tb = IncrementalTBPTT(m, seed=0)
        step_fn = tb.guard(opt.step)
        t0 = time.perf_counter()
        for step in range(steps):
            doc = _documents(train_w, train_windows + 1, 1, g)[0]  # +1: targets run one byte on
            flat = doc.flatten()
            wins = [(flat[i * T:(i + 1) * T][None], flat[i * T + 1:(i + 1) * T + 1][None])
                    for i in range(train_windows)]
            _train_document(m, opt, tb, step_fn, wins, lambda lg, y: F.cross_entropy(lg.flatten(0, 1), y.flatten()),
                            step=step, steps=steps, lr=2e-3, label=name, t0=t0, log=log, per_window=True)
        m.eval()
        row = {"train_seconds": round(time.perf_counter() - t0, 1)}
        with torch.no_grad():
            for n in lengths:
                for key in ("with_memory", "without_memory"):
                    nll, cnt = 0.0, 0
                    for doc in eval_docs[n]:
                        mems = [encode(m, doc[i][None]) for i in range(n - 1)] if key == "with_memory" else []
                        x = doc[-1][None]
                        lg = m(x[:, :-1], memory=UIOMemory(m, mems))
                        nll += float(F.cross_entropy(lg.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
                        cnt += x.shape[1] - 1
                    row[f"ppl_{key}_{n}"] = round(math.exp(nll / cnt), 3)
        out["variants"][name] = row
        log(f"  {name}: {row}")
    return out


def passkey_against_distance(*, steps: int, N: int = 16, n_windows: int = 6, batch: int = 16, trials: int = 48,
                             log=print) -> dict:
    """bench.folded's pass-key task (a one-token key of 10 values after a marker, random filler,
    queries) with windows of N positions: the key in the first window, queries anywhere after, so
    every later window needs the first window's memory. A UIO model (ratio 4, S = 2, factor on)
    trained with incremental TBPTT on documents of n_windows windows; accuracy of the key at the
    query against the distance in windows, with the memories and without (the same weights)."""
    from bench.folded import ASK, KEY0, MARK, N_KEYS, _sequences
    from engine.uio import UIOMemory, encode

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=33, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=N, block_len=4, attention="causal",
                      uio={"ratio": 4, "enc_rank": 8, "head_rank": 8, "S": 2, "factor": True, "train_base": True})
    m = LandmarkTransformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    tb = IncrementalTBPTT(m, seed=0)
    step_fn = tb.guard(opt.step)
    g = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    loss_fn = lambda lg, y: F.cross_entropy(lg.flatten(0, 1), y.flatten(), ignore_index=-100)  # noqa: E731
    for step in range(steps):
        x, tgt, _ = _sequences(g, batch, N * n_windows, max(4, n_windows))
        wins = [(x[:, i * N:(i + 1) * N], tgt[:, i * N:(i + 1) * N]) for i in range(n_windows)]
        _train_document(m, opt, tb, step_fn, wins, loss_fn, step=step, steps=steps, lr=3e-3, label="passkey UIO",
                        t0=t0, log=log)
    m.eval()
    acc: dict = {"with_memory": {}, "without_memory": {}}
    ge = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for w in range(0, n_windows * 2):  # the query's window: up to twice the training documents
            x, _, _ = _sequences(ge, trials, N * (w + 1), 0)
            x[:, -1] = ASK
            kp = (x == MARK).float().argmax(1) + 1
            key = x[torch.arange(trials), kp]
            for name in acc:
                mems = [encode(m, x[:, i * N:(i + 1) * N]) for i in range(w)] if name == "with_memory" else []
                lg = m(x[:, w * N:], memory=UIOMemory(m, mems))[:, -1, KEY0:KEY0 + N_KEYS]
                acc[name][str(w)] = round(float((lg.argmax(-1) + KEY0 == key).float().mean()), 3)
    return {"window": N, "slots_per_window": N // 4, "train_windows": n_windows, "train_steps": steps,
            "train_seconds": round(time.perf_counter() - t0, 1), "accuracy_by_window_distance": acc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None, help="draws per model (default 64; quick 12)")
    ap.add_argument("--no-trained", action="store_true", help="only the estimator's figures (no model trained)")
    ap.add_argument("--out", default=str(RESULTS / "uio.json"), help="where to write the JSON (uio.md beside it)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    seeds = args.seeds or (6 if args.quick else 64)
    res = {"command": "python -m bench.uio" + (" --quick" if args.quick else ""),
           "machine": machine(),
           "grad_norm_ratio": norm_ratios(seeds=seeds, model_seeds=1 if args.quick else 4),
           "paper_table4": {"without_factor": {"1": 0.676, "4": 0.818, "8": 0.935},
                            "with_factor": {"1": 0.994, "4": 0.980, "8": 1.024}},
           "time_against_S": time_against_S(repeats=1 if args.quick else 3)}
    if not args.no_trained:
        ae_steps = 30 if args.quick else 800
        res["autoencoding"] = [autoencoding(r, steps=ae_steps) for r in ((8,) if args.quick else (8, 32))]
        res["perplexity"] = perplexity_against_length(
            steps=10 if args.quick else 300, lengths=(4, 16) if args.quick else (4, 16, 32, 64),
            train_windows=8 if args.quick else 16,
            variants=(("UIO S=2, factor", 2, True),) if args.quick else
            (("UIO S=2, factor", 2, True), ("UIO S=2, no factor", 2, False), ("UIO S=0 (detached memories)", 0, True),
             ("UIO S=1, factor", 1, True), ("UIO S=4, factor", 4, True), ("UIO S=6, factor", 6, True),
             ("UIO S=2, factor, transfer head off", 2, True, 0)))
        res["passkey"] = passkey_against_distance(steps=10 if args.quick else 300)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(res, args.out, format_md(res))
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
    if "mean_estimate" in r:
        lines += ["", "‖mean over draws of ĝ‖ / ‖g‖ (the bias alone; the variance averages out):", "",
                  "| | " + " | ".join(f"S={s}" for s in Ss) + " |", "|---|" + "---|" * len(Ss)]
        for k in ("without_factor", "with_factor"):
            lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(f"{r['mean_estimate'][k][s]:.3f}" for s in Ss) + " |")
    lines += ["", "| S | s / document | live graphs (max) | encoder backwards |", "|---|---|---|---|"]
    for row in res["time_against_S"]:
        lines.append(f"| {row['S']} | {row['seconds_per_document']} | {row['max_live_graphs']} | "
                     f"{row['encoder_backwards']} |")
    if "autoencoding" in res:
        lines += ["", "| autoencoding (held-out Persuasion) | slots / window | byte accuracy with memory | without |",
                  "|---|---|---|---|"]
        for a in res["autoencoding"]:
            lines.append(f"| ratio {a['ratio']} ({a['train_steps']} steps, {a['train_seconds']} s) | "
                         f"{a['slots_per_window']} | {a['accuracy_with_memory']:.3f} | {a['accuracy_without_memory']:.3f} |")
    if "passkey" in res:
        pk = res["passkey"]
        acc = pk["accuracy_by_window_distance"]
        ws = list(acc["with_memory"])
        lines += ["", f"Pass key, windows of {pk['window']} ({pk['slots_per_window']} slots each), trained on "
                      f"{pk['train_windows']}-window documents ({pk['train_steps']} steps, {pk['train_seconds']} s); "
                      f"the query's window index (the key is in window 0; chance 0.1):", "",
                  "| query window | " + " | ".join(ws) + " |", "|---|" + "---|" * len(ws)]
        for k in ("with_memory", "without_memory"):
            lines.append(f"| {k.replace('_', ' ')} | " + " | ".join(f"{acc[k][w]:.2f}" for w in ws) + " |")
    if "perplexity" in res:
        pp = res["perplexity"]
        ns = pp["lengths"]
        lines += ["", "| last-window perplexity, held out | " + " | ".join(f"{n} windows" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for name, row in pp["variants"].items():
            for key in ("with_memory", "without_memory"):
                lines.append(f"| {name}, {key.replace('_', ' ')} | "
                             + " | ".join(f"{row[f'ppl_{key}_{n}']:.3f}" for n in ns) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
