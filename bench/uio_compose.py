"""UIO memories and landmark retrieval in one attention layer, on real text.

    python -m bench.uio_compose            # the full run
    python -m bench.uio_compose --quick    # under a minute

A byte-level landmark model (2 layers, d 128, windows of 64 positions = 56 bytes + 8 landmarks,
blocks of 8) is trained with UIO's incremental TBPTT (ratio 8: 8 slots per window, S = 2, the
factor on) on Austen documents of `train_windows` windows; retrieval is not used in training
(the Landmark paper trains the landmarks inside the window and retrieves at inference). A second
model of the same shape is trained on the same windows without memories (a plain landmark
model). Then, on held-out Persuasion, the perplexity of a document's LAST window against the
document's length, every mode with the same local window (the last window itself) and different
memory sources, all measured in this run on the same documents:

  window only       no memory
  landmark          top-k retrieved blocks of every earlier window (store-backed, `RetrievalMemory`)
  UIO               every earlier window's memory tokens (`UIOMemory`)
  UIO + landmark    both in one grouped softmax (`engine.uio_inference.composed_memory`)

and for the plain landmark model: window only, landmark. Earlier windows pass through the same
memory (persisting their blocks) before the last window is scored, as `folio ingest` does.

Writes runs/bench/uio_compose.json and .md beside it (--out PATH to choose).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F
import zarr

from bench import RUNS, machine, write_results
from bench.uio import _documents, _lr_at, _train_document
from engine.config import ModelConfig
from engine.landmarks import insert_landmarks, next_token_targets
from engine.model import LandmarkTransformer
from engine.tokenizer import ByteTokenizer
from train.uio_tbptt import IncrementalTBPTT

T, L, RATIO = 64, 8, 8
PER = T - T // L  # bytes per window
LM = ByteTokenizer().landmark_id
MODES = ("window only", "landmark", "UIO", "UIO + landmark")


def _model(seed: int, uio: bool) -> LandmarkTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=260, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=352,
                      max_seq_len=T, block_len=L, attention="landmark",
                      uio={"ratio": RATIO, "enc_rank": 8, "head_rank": 8, "S": 2, "factor": True,
                           "train_base": True} if uio else None)
    return LandmarkTransformer(cfg)


def _byte_rows(text: str) -> torch.Tensor:
    """A text as consecutive rows of PER bytes (n, PER)."""
    b = torch.tensor(list(text.encode("utf-8", errors="replace")), dtype=torch.long)
    n = b.numel() // PER
    return b[:n * PER].view(n, PER)


def _windows(doc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A document of n + 1 byte rows -> n windows (x (1, T) with landmarks, next-byte targets
    (1, T), the last position's target the next window's first byte)."""
    seq = insert_landmarks(doc.flatten(), L, LM)[None]  # (1, (n + 1) T)
    tgt = next_token_targets(seq, LM, -1)
    n = doc.shape[0] - 1
    return [(seq[:, i * T:(i + 1) * T], tgt[:, i * T:(i + 1) * T]) for i in range(n)]


def _loss(lg, y):
    return F.cross_entropy(lg.flatten(0, 1), y.flatten(), ignore_index=-100)


def train_uio(train_rows, *, steps: int, train_windows: int, lr: float = 2e-3, log=print):
    m = _model(1, uio=True)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    tb = IncrementalTBPTT(m, seed=0)
    step_fn = tb.guard(opt.step)
    t0 = time.perf_counter()
    for step in range(steps):
        wins = _windows(_documents(train_rows, train_windows + 1, 1, g)[0])
        _train_document(m, opt, tb, step_fn, wins, _loss, step=step, steps=steps, lr=lr, label="UIO landmark model",
                        t0=t0, log=log, per_window=True)
    return m.eval(), round(time.perf_counter() - t0, 1)


def train_plain(train_rows, *, steps: int, train_windows: int, lr: float = 2e-3, log=print):
    """The same windows (same documents, same order) without memories: a landmark model."""
    m = _model(1, uio=False)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        wins = _windows(_documents(train_rows, train_windows + 1, 1, g)[0])
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, lr)
        x = torch.cat([w[0] for w in wins])
        y = torch.cat([w[1] for w in wins])
        loss = _loss(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  plain landmark model: document {step + 1}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return m.eval(), round(time.perf_counter() - t0, 1)


@torch.no_grad()
def last_window_nll(m: LandmarkTransformer, wins, mode: str, top_k: int) -> tuple[float, int]:
    """Summed NLL and count of the last window's targets after the earlier windows in `mode`."""
    from engine.inference import open_store
    from engine.retrieval import RetrievalConfig, RetrievalMemory
    from engine.uio import UIOMemory, encode
    from engine.uio_inference import compose_window, composed_memory
    from memory_store import StoreConfig

    *earlier, (x, y) = wins
    store = None
    if mode == "window only":
        mem = UIOMemory(m, []) if m.cfg.uio is not None else None
    elif mode == "UIO":
        mem = UIOMemory(m, [encode(m, w) for w, _ in earlier])
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an in-memory store takes no writer lock: said once is enough
            store = open_store(zarr.storage.MemoryStore(), m.cfg, "w", config=StoreConfig(sync_mode="none"))
        rc = RetrievalConfig(top_k=top_k, local_blocks=0, chunk_len=T)  # the local window: the window itself
        if mode == "landmark":
            mem = RetrievalMemory(m.cfg, store, stream="d", retrieval=rc, persist=True)
            for w, _ in earlier:
                m(w, memory=mem)
                mem.end_chunk()
        else:  # as ingest runs a landmark UIO model, window by window
            kv = [(torch.zeros(1, m.cfg.n_kv_heads, 0, m.cfg.head_dim),) * 2 for _ in range(m.cfg.n_layers)]
            mem = composed_memory(m, store, kv, rc, stream="d", persist=True, read_streams=["d"])
            for w, _ in earlier:
                kv = compose_window(m, mem, kv, w, T, m.uio.uio.max_memories)[1]
            mem.sources[1].set(kv)
    lg = m(x, memory=mem)
    if store is not None:
        store.close()
    return float(F.cross_entropy(lg.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")), int((y >= 0).sum())


def run(*, steps: int, train_windows: int, lengths, docs: int, top_k: int, log=print) -> dict:
    from engine.corpora import held_out_documents, load, training_documents

    train_rows = torch.cat([_byte_rows(load(d)) for d in training_documents("austen")])
    held_rows = _byte_rows(load(held_out_documents("austen")[0]))
    uio_m, uio_s = train_uio(train_rows, steps=steps, train_windows=train_windows, log=log)
    plain_m, plain_s = train_plain(train_rows, steps=steps, train_windows=train_windows, log=log)
    g = torch.Generator().manual_seed(5)
    eval_docs = {n: [_windows(d) for d in _documents(held_rows, n + 1, docs, g)] for n in lengths}
    rows: dict = {}
    for label, m, modes in (("UIO-trained landmark model", uio_m, MODES),
                            ("plain landmark model (no memories in training)", plain_m, MODES[:2])):
        for mode in modes:
            t0 = time.perf_counter()
            row = {}
            for n in lengths:
                nll = cnt = 0
                for wins in eval_docs[n]:
                    a, b = last_window_nll(m, wins, mode, top_k)
                    nll, cnt = nll + a, cnt + b
                row[str(n)] = round(math.exp(nll / cnt), 3)
            rows[f"{label}: {mode}"] = row
            log(f"  {label}, {mode}: {row} ({time.perf_counter() - t0:.0f} s)")
    return {"window": T, "block_len": L, "slots_per_window": T // RATIO, "top_k": top_k, "train_windows": train_windows,
            "train_documents": steps, "train_seconds": {"uio": uio_s, "plain": plain_s}, "eval_documents": docs,
            "lengths": list(lengths), "perplexity": rows}


def format_md(res: dict) -> str:
    ns = res["lengths"]
    lines = [f"`{res['command']}` — {res['machine']}", "",
             f"Last-window byte perplexity on held-out Persuasion ({res['eval_documents']} documents per length), "
             f"windows of {res['window']} positions, {res['slots_per_window']} memory slots per window, "
             f"top-{res['top_k']} retrieved blocks of {res['block_len']} per layer and KV head; models trained on "
             f"{res['train_documents']} documents of {res['train_windows']} windows "
             f"({res['train_seconds']['uio']} s / {res['train_seconds']['plain']} s):", "",
             "| model: memory | " + " | ".join(f"{n} windows" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for name, row in res["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.3f}" for n in ns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RUNS / "uio_compose.json"), help="where to write the JSON (.md beside it)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = {"command": "python -m bench.uio_compose" + (" --quick" if args.quick else ""),
           "machine": machine()}
    res.update(run(steps=8 if args.quick else 400, train_windows=4 if args.quick else 16,
                   lengths=(4, 8) if args.quick else (4, 16, 32, 64), docs=3 if args.quick else 16, top_k=2))
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(res, args.out, format_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
