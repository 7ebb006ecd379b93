"""Passkey retrieval evaluation (the Landmark Attention paper's test).

Prompt: the paper's preamble, its filler sentences repeated, "The pass key is K.
Remember it. K is the pass key." at a chosen depth, more filler, then
"What is the pass key? The pass key is". The document part (everything before the
question) is ingested into a store; the question is asked with retrieval, and the
answer counts as correct when its first digits are the key.

Baselines in the same run: the same model on the local window only (the last
`max_seq_len` positions of the whole prompt, no store) and, up to `full_max_len`
tokens, full landmark attention over the whole prompt.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.inference import GenerateConfig, TOKENIZER, generate, ingest, open_store
from engine.landmarks import insert_landmarks
from engine.model import LandmarkTransformer
from engine.retrieval import RetrievalConfig

PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize them. I will quiz you about the important information there. ")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def passkey_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def prose_filler(text: str, n_chars: int, rng: random.Random) -> list[str]:
    """Whole sentences of `text` (a real document), from a random sentence on, cycling past
    its end, at least n_chars characters in all (ASCII-folded: byte tokens = characters)."""
    import unicodedata

    flat = unicodedata.normalize("NFKD", " ".join(text.split())).encode("ascii", "ignore").decode()
    sents = [x for x in re.split(r"(?<=[.!?])\s+", flat) if x]
    if not sents:
        raise ValueError("the filler text holds no sentences")
    i, out, total = rng.randrange(len(sents)), [], 0
    while total < n_chars:
        out.append(sents[i % len(sents)] + " ")
        total += len(out[-1])
        i += 1
    return out


def build_passkey_prompt(n_tokens: int, depth: float, key: str, *, filler: list[str] | None = None
                         ) -> tuple[str, str]:
    """(document, question) whose total length is about `n_tokens` byte tokens.

    depth in [0, 1]: where the key line sits within the filler. filler: sentences of real
    prose to use instead of the paper's repeated filler (`prose_filler`); the key line then
    sits between two of them.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is invalid: must be in [0, 1]")
    fixed = len(PREAMBLE) + len(passkey_line(key)) + len(QUESTION)
    if filler is not None:
        budget, kept = max(0, n_tokens - fixed), []
        for s_ in filler:
            if sum(map(len, kept)) + len(s_) > budget:
                break
            kept.append(s_)
        before = int(round(len(kept) * depth))
        return PREAMBLE + "".join(kept[:before]) + passkey_line(key) + "".join(kept[before:]), QUESTION
    n_fill = max(0, (n_tokens - fixed) // len(FILLER))
    before = int(round(n_fill * depth))
    doc = PREAMBLE + FILLER * before + passkey_line(key) + FILLER * (n_fill - before)
    return doc, QUESTION


def parse_answer(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


@dataclass(kw_only=True, slots=True)
class PasskeyConfig:
    lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    trials: int = 2
    key_digits: int = 5
    seed: int = 0
    full_max_len: int = 8192
    """Full-attention baseline up to this many tokens (it costs O(T^2))."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    filler: str = "generator"
    """'generator': the paper's repeated filler sentences; or a document name (e.g. the
    held-out novel 'austen:persuasion') or a text file: its real prose as the haystack."""

    def __post_init__(self) -> None:
        if not self.lengths or any((not isinstance(n, int)) or n < 64 for n in self.lengths):
            raise ValueError(f"PasskeyConfig.lengths={self.lengths!r}: ints >= 64 required")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"PasskeyConfig.depths={self.depths!r}: values in [0, 1] required")
        if self.trials < 1:
            raise ValueError(f"PasskeyConfig.trials={self.trials}: must be >= 1")
        if not 1 <= self.key_digits <= 12:
            raise ValueError(f"PasskeyConfig.key_digits={self.key_digits}: allowed 1..12")
        if self.filler != "generator" and not Path(self.filler).is_file():
            from engine import corpora

            corpora.split_name(self.filler)  # a malformed name is refused here


def _greedy_digits(model, seq: torch.Tensor, n: int) -> str:
    """Greedy-decode n tokens after a landmarked sequence with full (blockwise) attention."""
    L, lm = model.cfg.block_len, model.cfg.landmarks
    cache = model.new_cache(1, seq.numel() + 2 * n + 4)
    logits = model(seq[None], cache=cache, impl="blockwise" if lm else "sdpa")
    out = []
    for _ in range(n):
        lg = logits[0, -1].clone()
        lg[256:] = float("-inf")
        tok = int(lg.argmax())
        out.append(tok)
        step = [tok] + ([TOKENIZER.LANDMARK] if lm and (cache.length + 1) % L == L - 1 else [])
        logits = model(torch.tensor([step]), cache=cache, impl="blockwise" if lm else "sdpa")
    return TOKENIZER.decode(out)


@torch.no_grad()
def run_passkey(model: LandmarkTransformer, pc: PasskeyConfig, *, progress: bool = True,
                log=print) -> dict:
    """Accuracy per (length, depth) for retrieval, local-window-only and full attention.

    A model with its own memory (folded context, UIO memories) answers through it in the
    'retrieval' column (ingest, then ask: whatever memory the model has; a landmark UIO model
    with pc.retrieval's landmark retrieval beside its memories), 'local' is the model on its
    window alone (the folded window; UIO's training window) and 'full' is not run."""
    rng = random.Random(pc.seed)
    cfg = model.cfg
    own_memory = bool(cfg.folded_window) or cfg.uio is not None
    L, W = cfg.block_len, (cfg.folded_window or cfg.max_seq_len)
    uio_landmark = cfg.uio is not None and cfg.landmarks
    rc = pc.retrieval if not own_memory or uio_landmark else None
    prose = None
    if pc.filler != "generator":
        from engine import corpora

        p = Path(pc.filler)
        prose = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else corpora.load(pc.filler)
    rows = []
    for n in pc.lengths:
        for depth in pc.depths:
            acc = {"retrieval": 0, "local": 0, "full": 0}
            wrong: list[dict] = []  # the retrieval mode's wrong answers: what the model said
            full_ok = n <= pc.full_max_len and not own_memory
            t0 = time.perf_counter()
            for _ in range(pc.trials):
                key = str(rng.randrange(10 ** (pc.key_digits - 1), 10 ** pc.key_digits))
                fill = None if prose is None else prose_filler(prose, n, rng)
                doc, q = build_passkey_prompt(n, depth, key, filler=fill)
                with tempfile.TemporaryDirectory() as d:
                    store = open_store(Path(d) / "store", cfg, "w")
                    ingest(model, store, "doc", TOKENIZER.encode(doc), retrieval=rc,
                           progress=progress and n >= 100_000)
                    ans = TOKENIZER.decode(generate(model, store, TOKENIZER.encode(q), streams=["doc"],
                                                    retrieval=rc,
                                                    gen=GenerateConfig(max_new_tokens=pc.key_digits + 2)))
                    store.close()
                right = parse_answer(ans) == key
                acc["retrieval"] += right
                if not right:
                    wrong.append({"key": key, "answer": ans})
                whole = torch.tensor(TOKENIZER.encode(doc + q))
                if cfg.landmarks:
                    whole = insert_landmarks(whole, L, TOKENIZER.LANDMARK)
                # local window only: the last W positions, starting at a block boundary
                start = max(0, whole.numel() - W + (whole.numel() % L))
                start -= start % L
                acc["local"] += parse_answer(_greedy_digits(model, whole[start:], pc.key_digits + 2)) == key
                if full_ok:
                    acc["full"] += parse_answer(_greedy_digits(model, whole, pc.key_digits + 2)) == key
            row = {"length": n, "depth": depth, "trials": pc.trials,
                   "retrieval": acc["retrieval"] / pc.trials, "local": acc["local"] / pc.trials,
                   "full": acc["full"] / pc.trials if full_ok else None,
                   "seconds": time.perf_counter() - t0, "wrong": wrong}
            rows.append(row)
            if log:
                full = "   -" if row["full"] is None else f"{row['full']:.2f}"
                log(f"len {n:>9,d} depth {depth:.2f}: retrieval {row['retrieval']:.2f}  "
                    f"local {row['local']:.2f}  full {full}  ({row['seconds']:.1f} s)")
    return {"rows": rows, "config": {"lengths": pc.lengths, "depths": pc.depths, "trials": pc.trials,
                                     "filler": pc.filler,
                                     "memory": ("folded" if cfg.folded_window
                                                else ("uio+landmark" if uio_landmark and rc.top_k else "uio")
                                                if cfg.uio is not None else "retrieval"),
                                     "top_k": None if rc is None else rc.top_k,
                                     "positions": None if rc is None else rc.positions,
                                     "window": W, "block_len": L}}


def format_table(result: dict) -> str:
    lines = [f"{'length':>10} {'depth':>6} {'retrieval':>10} {'local':>7} {'full':>6}"]
    for r in result["rows"]:
        full = "-" if r["full"] is None else f"{r['full']:.2f}"
        lines.append(f"{r['length']:>10,d} {r['depth']:>6.2f} {r['retrieval']:>10.2f} "
                     f"{r['local']:>7.2f} {full:>6}")
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """JSON and a heatmap PNG (retrieval and local-only accuracy per length x depth)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in result["rows"]})
    depths = sorted({r["depth"] for r in result["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
    for ax, key in zip(axes, ("retrieval", "local")):
        # a cell the run did not evaluate (e.g. one depth only at the longest length) stays blank
        grid = [[next((r[key] for r in result["rows"] if r["length"] == n and r["depth"] == d), float("nan"))
                 for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(f"passkey accuracy: {key}")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(out / "passkey.png", dpi=120)
    plt.close(fig)
    return [out / "passkey.json", out / "passkey.png"]
