"""Perplexity of a pretrained model on held-out long documents against context length.

The same final M tokens of one long document are scored given the C tokens before them,
for each context length C and mode:

- `full`: the model's own causal attention over the C + M tokens (a KV cache, prefilled in
  chunks), for C up to `full_max_len`; when C + M passes `full_max_len` (the trained range),
  a sliding window of C positions instead (each chunk of scored tokens run afresh over the C
  tokens ending at it: a scored token sees C - chunk + 1 to C tokens; the row's `full_window`);
- `retrieval`: the C context tokens ingested into a temporary store (`ingest`), then the M
  tokens run through a memory that continues that stream (its sinks, its last blocks as the
  window, its unfinished tail re-run first, as `generate` continues a stream), chunk by chunk;
- `local`: the same store path with no retrieved blocks and no sinks (the window alone).

Token i is scored from the logits at position i - 1, so the context's last token is part of
every mode's input. The default document is the held-out `austen:persuasion`, preceded by
held-out State of the Union addresses when the longest context needs more tokens than the
novel has: the scored tokens are the novel's last M tokens in every case.
"""

from __future__ import annotations

import dataclasses

import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine import corpora
from engine.inference import ingest, make_memory, open_store
from engine.model import LandmarkTransformer
from engine.needle import machine_info, write_json
from engine.needle_answers import mode_config
from engine.tokenizer import Tokenizer
from engine.retrieval import RetrievalConfig
from engine.training_free import TrainingFreeConfig

MODES = ("full", "retrieval", "local")
STREAM = "doc"
NOVEL = "austen:persuasion"
SEPARATOR = "\n\n"


def default_texts() -> list[str]:
    """The held-out SOTU addresses in year order, then the held-out novel (`build_document`
    takes them from the end: the novel, then the latest addresses as far as needed)."""
    return [*corpora.held_out_documents("sotu"), NOVEL]


@dataclass(kw_only=True, slots=True)
class PerplexityConfig:
    """What one perplexity run scores."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 32768, 131072])
    """Context lengths C in tokens before the scored tokens."""
    modes: tuple[str, ...] = MODES
    scored_tokens: int = 512
    """M: the final tokens of the document, the same for every (mode, C)."""
    full_max_len: int = 8192
    """`full` runs for C up to this (the model's trained range)."""
    local_max_len: int | None = 32768
    """`local` runs for C up to this (None: every C); past its window it sees the same tokens."""
    retrieval: TrainingFreeConfig = field(default_factory=TrainingFreeConfig)
    """The `retrieval` mode's settings; `local` takes its window and chunk."""
    landmark: RetrievalConfig | None = None
    """A landmark-trained model's `retrieval` mode: its landmark retrieval (None:
    `RetrievalConfig` defaults with `retrieval.top_k`, see `needle_answers.memory_config`)."""
    texts: tuple[str, ...] | None = None
    """Documents joined into one (the last one holds the scored tokens); None: `default_texts()`,
    as many of them as the longest context needs."""
    chunk: int = 1024
    """Tokens per forward of the `full` prefill (bounds the logits' memory)."""

    def __post_init__(self) -> None:
        if not self.contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.contexts):
            raise ValueError(f"PerplexityConfig.contexts={self.contexts!r} is invalid: a non-empty list of ints >= 1")
        self.modes = tuple(self.modes)
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"PerplexityConfig.modes={self.modes!r} is invalid: distinct values of {MODES}")
        for name in ("scored_tokens", "full_max_len", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PerplexityConfig.{name}={v!r} is invalid: an int >= 1")
        if self.local_max_len is not None and (not isinstance(self.local_max_len, int) or self.local_max_len < 1):
            raise ValueError(f"PerplexityConfig.local_max_len={self.local_max_len!r} is invalid: None or an int >= 1")
        if not isinstance(self.retrieval, TrainingFreeConfig):
            raise ValueError(f"PerplexityConfig.retrieval must be a TrainingFreeConfig, got "
                             f"{type(self.retrieval).__name__}")
        if self.landmark is not None and not isinstance(self.landmark, RetrievalConfig):
            raise ValueError(f"PerplexityConfig.landmark must be None or a RetrievalConfig, got "
                             f"{type(self.landmark).__name__}")
        if self.texts is not None:
            self.texts = (self.texts,) if isinstance(self.texts, str) else tuple(self.texts)
            if not self.texts:
                raise ValueError("PerplexityConfig.texts is empty: None (the default) or document names")
            for name in self.texts:
                corpora.split_name(name)

    def cells(self) -> list[tuple[str, int]]:
        """(mode, C) pairs that run, cheapest first within each mode."""
        out = []
        for m in self.modes:
            for c in sorted(set(self.contexts)):
                if (m == "full" and c > self.full_max_len) or \
                        (m == "local" and self.local_max_len is not None and c > self.local_max_len):
                    continue
                out.append((m, c))
        return out

    def local(self) -> TrainingFreeConfig:
        rc = self.retrieval
        return TrainingFreeConfig(top_k=0, sink_blocks=0, local_blocks=rc.local_blocks, chunk_len=rc.chunk_len,
                                  block_key=rc.block_key)


def build_document(tok: Tokenizer, n_tokens: int, texts: Sequence[str] | None = None) -> tuple[list[int], list[str]]:
    """Token ids of documents joined with blank lines, at least `n_tokens` long (the last ones
    first: a document is added in front only while more tokens are needed), and the names
    used. Raises ValueError when all of them together are shorter."""
    names = list(texts) if texts is not None else default_texts()
    parts: list[list[int]] = []
    used: list[str] = []
    total = 0
    for name in reversed(names):
        text = corpora.load(name)
        ids = tok.encode(text + SEPARATOR if parts else text)
        parts.insert(0, ids)
        used.insert(0, name)
        total += len(ids)
        if total >= n_tokens:
            return [t for p in parts for t in p], used
    raise ValueError(f"documents {names} hold {total:,} tokens, fewer than the {n_tokens:,} needed "
                     f"(longest context + scored tokens)")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood: logits (T, V), targets (T,) -> (T,) float64. The
    landmark (Folio's last vocabulary row) is left out of the softmax: it is inserted, never
    predicted, and a fine-tune trains its row, so counting it would score models unevenly."""
    return F.cross_entropy(logits[..., :-1].float(), targets, reduction="none").double()


def score_full(model: LandmarkTransformer, seq: Sequence[int], m: int, *, chunk: int = 1024,
               window: int | None = None) -> torch.Tensor:
    """NLL (m,) of the last m tokens of `seq` under full causal attention.

    window None: over all of `seq` (one KV cache; the last scored token sees len(seq) - 1
    tokens). window W: a sliding window of W positions, so no position passes W (the model's
    trained range): the scored tokens go in chunks of `chunk`, each run afresh over the W
    tokens ending at its last input, so a scored token sees between W - chunk + 1 and W
    tokens (always ending just before it)."""
    dev = model.tok_emb.weight.device
    x = torch.tensor(seq, dtype=torch.long)
    n = x.numel()
    first = n - m - 1  # logits from this position on predict the scored tokens
    if window is not None and window < 1:
        raise ValueError(f"score_full: window={window!r} is invalid: None or an int >= 1")
    if window is None or n - 1 <= window:
        spans = [(0, first, n - 1)]  # (input start, first scored input, input end)
    else:
        step, spans = min(chunk, window), []
        for a in range(first, n - 1, step):
            end = min(a + step, n - 1)
            spans.append((max(0, end - window), a, end))
    out = []
    for s0, a0, end in spans:
        cache = model.new_cache(1, end - s0)
        for a in range(s0, a0, chunk):
            model(x[None, a:min(a + chunk, a0)].to(dev), cache=cache)
        for a in range(a0, end, chunk):
            b = min(a + chunk, end)
            logits = model(x[None, a:b].to(dev), cache=cache)[0]  # (b - a, V)
            out.append(_nll(logits, x[a + 1:b + 1].to(dev)))
    return torch.cat(out).cpu()


def score_store(model: LandmarkTransformer, tok: Tokenizer, seq: Sequence[int], m: int, rc: TrainingFreeConfig,
                where: str | Path) -> tuple[torch.Tensor, float]:
    """NLL (m,) of the last m tokens of `seq` when everything before them (but the last
    context token) is ingested into a store at `where` and the rest continues that stream
    through retrieval; and the ingest's tokens per second."""
    from memory_store import StoreConfig

    cfg, dev = model.cfg, model.tok_emb.weight.device
    x = torch.tensor(seq, dtype=torch.long)
    n = x.numel()
    first = n - m - 1
    if cfg.landmarks:
        return _score_store_landmarks(model, tok, x, m, rc, where)
    # the store is temporary: syncing it to disk buys nothing
    with open_store(where, cfg, "w", config=StoreConfig(sync_mode="none")) as store:
        res = ingest(model, store, STREAM, x[:first], retrieval=rc, tokenizer=tok, flush_interval_s=1e9)
        tail = torch.as_tensor(store.get_stream_meta(STREAM).get("tail", []), dtype=torch.long)
        mem = make_memory(cfg, store, stream=None, retrieval=rc, persist=False, read_streams=[STREAM])
        mem.resume_from_store(STREAM)
        rest = torch.cat([tail, x[first:n - 1]])  # from the last stored block's end
        nll = []
        for a in range(0, rest.numel(), rc.chunk_len):
            logits = model(rest[None, a:a + rc.chunk_len].to(dev), memory=mem)[0]  # (T, V)
            mem.end_chunk()
            lo = max(a, tail.numel())  # the tail's logits predict context tokens: not scored
            if lo < a + logits.shape[0]:
                tgt = x[first + 1 + lo - tail.numel():first + 1 + a + logits.shape[0] - tail.numel()]
                nll.append(_nll(logits[lo - a:], tgt.to(dev)))
    return torch.cat(nll).cpu(), res.tokens_per_s


def _score_store_landmarks(model: LandmarkTransformer, tok: Tokenizer, x: torch.Tensor, m: int, rc,
                           where: str | Path) -> tuple[torch.Tensor, float]:
    """`score_store` for a landmark-trained model: its landmark retrieval, landmarks inserted
    as ingest and generate insert them; a token's NLL is read off the position before it
    (a landmark position predicts the token after its block)."""
    from engine.landmarks import insert_landmarks
    from engine.needle_answers import memory_config
    from memory_store import StoreConfig

    cfg, dev = model.cfg, model.tok_emb.weight.device
    rc = memory_config(cfg, rc)
    n = x.numel()
    first = n - m - 1
    with open_store(where, cfg, "w", config=StoreConfig(sync_mode="none")) as store:
        res = ingest(model, store, STREAM, x[:first], retrieval=rc, tokenizer=tok, flush_interval_s=1e9)
        tail = torch.as_tensor(store.get_stream_meta(STREAM).get("tail", []), dtype=torch.long)
        # the stream continued (its last blocks the local window, positions after them), nothing written
        mem = make_memory(cfg, store, stream=STREAM, retrieval=rc, persist=False, read_streams=[STREAM])
        mem.resume_from_store()
        seq = insert_landmarks(torch.cat([tail, x[first:]]), cfg.block_len, tok.landmark_id)  # ends with the last scored token
        chunk = rc.chunk_for(cfg)
        logits = []
        for a in range(0, seq.numel() - 1, chunk):
            logits.append(model(seq[None, a:min(a + chunk, seq.numel() - 1)].to(dev), memory=mem)[0].float().cpu())
            mem.end_chunk()
        lg = torch.cat(logits)  # (len(seq) - 1, V): position j predicts seq[j + 1]
        nxt = seq[1:]
        keep = nxt != tok.landmark_id
        nll = _nll(lg[keep], nxt[keep])
    return nll[-m:], res.tokens_per_s


@torch.no_grad()
def run_perplexity(model: LandmarkTransformer, tok: Tokenizer, cfg: PerplexityConfig, *, progress: bool = True,
                   on_update: Callable[[dict], None] | None = None) -> dict:
    """Perplexity per (mode, C) on the same scored tokens. Returns {"rows": [{"mode", "context",
    "nll", "ppl", "seconds", ...}], "config", "machine", "document", "seconds"}; `on_update`
    receives the result so far after each cell. Raises ValueError for a landmark-trained model
    or a document shorter than the longest context + M."""
    if model.cfg.landmarks and "full" in cfg.modes:
        cfg = dataclasses.replace(cfg, modes=tuple(m for m in cfg.modes if m != "full"))  # causal models only
    t_start = time.perf_counter()
    m = cfg.scored_tokens
    cells = cfg.cells()
    ids, names = build_document(tok, max(c for _, c in cells) + m, cfg.texts)
    scored = tok.decode(ids[-m:])
    result = {"rows": [], "config": {**asdict(cfg), "texts": names,
                                     "held_out": all(corpora.is_held_out(n) for n in names),
                                     "model": {"source": model.cfg.source, "fingerprint": model.cfg.fingerprint(),
                                               "max_seq_len": model.cfg.max_seq_len}},
              "machine": machine_info(),
              "document": {"tokens": len(ids), "scored_text_start": scored[:80], "scored_text_end": scored[-80:]}}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="perplexity", unit="cell", file=sys.stderr, dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="folio-ppl-") as d:
        for i, (mode, c) in enumerate(cells):
            if bar is not None:
                bar.set_postfix_str(f"{mode} C={c:,}")
            seq = ids[len(ids) - c - m:]
            t0 = time.perf_counter()
            ingest_tps = None
            window = None
            if mode == "full":
                # C + M past the trained range: a sliding window of C positions (see score_full)
                window = c if c + m > cfg.full_max_len else None
                nll = score_full(model, seq, m, chunk=cfg.chunk, window=window)
            else:
                nll, ingest_tps = score_store(model, tok, seq, m, mode_config(cfg, mode, model.cfg),
                                              Path(d) / f"store{i}")
            mean = float(nll.mean())
            result["rows"].append({"mode": mode, "context": c, "tokens": m, "nll": round(mean, 5),
                                   "ppl": round(math.exp(mean), 4), "seconds": round(time.perf_counter() - t0, 1),
                                   "ingest_tokens_per_s": None if ingest_tps is None else round(ingest_tps, 1),
                                   "full_window": window,
                                   "nll_tokens": [round(float(v), 4) for v in nll]})
            result["seconds"] = round(time.perf_counter() - t_start, 1)
            if bar is not None:
                bar.update(1)
            if on_update is not None:
                on_update(result)
    if bar is not None:
        bar.close()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def reference_row(result: dict) -> dict | None:
    """The baseline the others are compared with: full attention at its longest context."""
    full = [r for r in result["rows"] if r["mode"] == "full"]
    return max(full, key=lambda r: r["context"]) if full else None


def paired_delta(row: dict, ref: dict) -> tuple[float, float]:
    """Mean per-token NLL difference row - ref on the same tokens, and its standard error."""
    d = torch.tensor(row["nll_tokens"], dtype=torch.float64) - torch.tensor(ref["nll_tokens"], dtype=torch.float64)
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
    return float(d.mean()), se


def format_table(result: dict) -> str:
    """Markdown: perplexity per context (rows) and mode (columns), then each cell's mean NLL
    change against full attention at its longest context (paired, ± one standard error)."""
    rows = result["rows"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    contexts = sorted({r["context"] for r in rows})
    cell = {(r["mode"], r["context"]): r for r in rows}
    ref = reference_row(result)
    head = "| context C | " + " | ".join(f"{m} ppl" for m in modes)
    lines = [head + (f" | Δnll vs full {ref['context']:,} ({', '.join(modes)}) |" if ref else " |"),
             "|---:|" + "---:|" * len(modes) + ("---|" if ref else "")]
    for c in contexts:
        ppl = " | ".join(f"{cell[(m, c)]['ppl']:.2f}" if (m, c) in cell else "-" for m in modes)
        line = f"| {c:,} | {ppl} |"
        if ref:
            deltas = []
            for m in modes:
                if (m, c) not in cell:
                    deltas.append("-")
                    continue
                mean, se = paired_delta(cell[(m, c)], ref)
                deltas.append(f"{mean:+.3f}±{se:.3f}")
            line += " " + ", ".join(deltas) + " |"
        lines.append(line)
    slid = [f"{r['context']:,}" for r in rows if r["mode"] == "full" and r.get("full_window")]
    if slid:
        lines.append(f"\nfull at C = {', '.join(slid)}: C + M passes the trained range, so a sliding window of C "
                     f"positions (each scored token sees C - chunk + 1 to C tokens)")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """perplexity.json, perplexity.md (the table) and perplexity.png (ppl against C per mode)."""
    out = Path(out_dir)
    path = write_json(result, out, "perplexity.json", indent=1)
    (out / "perplexity.md").write_text(format_table(result) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for mode, marker in zip(MODES, "os^"):
        pts = sorted((r["context"], r["ppl"]) for r in result["rows"] if r["mode"] == mode)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context before the scored tokens (tokens)")
    ax.set_ylabel(f"perplexity of the last {result['config']['scored_tokens']} tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)
    return [path, out / "perplexity.md", out / "perplexity.png"]
