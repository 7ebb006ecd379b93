"""Needle-in-a-haystack evaluation of a pretrained chat model on real prose.

A trial hides one key sentence ("The pass key is 48213. Remember it. 48213 is the pass
key.", or a secret word, or an access code like K7Q-42M) at depth d in [0, 1] of a haystack
cut from a real text (default: the held-out novel `austen:persuasion`, from a seeded random
sentence, whole sentences only), sized so that document + question fill N tokens of the
model's own tokenizer. The document opens a user turn of the chat template
(`chat_document`), the question closes it (`question_tokens(..., continues_turn=True)`),
and the greedy answer is correct when it contains the key.

Modes, on the same tokens:
- `retrieval`: the document is ingested into a temporary store, the question asked through
  training-free retrieval (`engine.inference.ingest` + `generate`);
- `full`: the model's own causal attention over everything (a KV cache), for N up to
  `full_max_len` (its trained range) and the lengths in `full_beyond`;
- `local`: the same store path with no retrieved blocks and no sinks (the window alone).

The trials of one length and trial number share their haystack; how each mode answers them
(computing the shared prefix once) is engine/needle_answers.py.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine import corpora
from engine.inference import chat_document, question_tokens
from engine.model import LandmarkTransformer
from engine.needle_answers import answers_from_store, answers_full, mode_config
from engine.tokenizer import Tokenizer
from engine.retrieval import RetrievalConfig
from engine.training_free import TrainingFreeConfig

KEY_FORMATS = ("passkey", "word", "code")
MODES = ("retrieval", "full", "local")

# distinctive nouns that do not occur in Austen's novels, so the haystack never holds a decoy
WORDS = ("avocado", "bulldozer", "cactus", "dolphin", "flamingo", "giraffe", "hammock", "igloo",
         "jaguar", "kangaroo", "lighthouse", "meteor", "narwhal", "octopus", "pineapple", "quokka",
         "raccoon", "saxophone", "telescope", "tornado", "volcano", "walrus", "xylophone", "zeppelin",
         "trombone", "penguin", "avalanche", "origami", "nebula", "waffle", "zucchini", "parachute")
_CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: they read as 1 and 0
KEY_PATTERNS = {
    "passkey": r"[1-9][0-9]{4,6}",
    "word": "|".join(WORDS),
    "code": rf"[{_CODE_LETTERS}][0-9][{_CODE_LETTERS}]-[0-9]{{2}}[{_CODE_LETTERS}]",
}
NEEDLES = {
    "passkey": "The pass key is {key}. Remember it. {key} is the pass key.",
    "word": "The secret word is {key}. Remember it. {key} is the secret word.",
    "code": "The access code is {key}. Remember it. {key} is the access code.",
}
QUESTIONS = {
    "passkey": "What is the pass key?",
    "word": "What is the secret word?",
    "code": "What is the access code?",
}
# without a chat template the model completes text, so the question ends in the answer's opening
CUES = {"passkey": "The pass key is", "word": "The secret word is", "code": "The access code is"}


# --- keys ----------------------------------------------------------------------------------------

def make_key(fmt: str, rng: random.Random) -> str:
    """A random key of format `fmt` (one of KEY_FORMATS): 5-7 digits, a word of WORDS, or a
    code like K7Q-42M. Raises ValueError for an unknown format."""
    if fmt == "passkey":
        digits = rng.randint(5, 7)
        return str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    if fmt == "word":
        return rng.choice(WORDS)
    if fmt == "code":
        L, d = (lambda: rng.choice(_CODE_LETTERS)), (lambda: str(rng.randrange(10)))
        return f"{L()}{d()}{L()}-{d()}{d()}{L()}"
    raise ValueError(f"key format {fmt!r} is unknown: one of {KEY_FORMATS}")


def is_key(fmt: str, text: str) -> bool:
    """Whether `text` is a well-formed key of format `fmt`."""
    if fmt not in KEY_PATTERNS:
        raise ValueError(f"key format {fmt!r} is unknown: one of {KEY_FORMATS}")
    return re.fullmatch(KEY_PATTERNS[fmt], text) is not None


def find_key(fmt: str, text: str) -> str | None:
    """The first key of format `fmt` in `text` (an answer), or None."""
    m = re.search(rf"(?<![A-Za-z0-9])(?:{KEY_PATTERNS[fmt]})(?![A-Za-z0-9])", text, flags=re.IGNORECASE)
    return m.group(0) if m else None


def is_correct(answer: str, key: str) -> bool:
    """Whether the answer contains the key as a whole token (case-insensitive): "48213." counts,
    "148213" does not."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", answer, flags=re.IGNORECASE) is not None


def needle_sentence(fmt: str, key: str) -> str:
    return NEEDLES[fmt].format(key=key)


def question_text(fmt: str, tokenizer: Tokenizer) -> str:
    q = QUESTIONS[fmt]
    return q if tokenizer.chat_parts() is not None else f"{q} {CUES[fmt]}"


# --- haystacks -----------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)])\s+")


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences of `text` (split after . ! ? and a closing quote)."""
    flat = " ".join(text.split())  # the novels' hard line wraps are not sentence structure
    return [s for s in _SENTENCE_END.split(flat) if s]


class HaystackSource:
    """The sentences of one or more documents, each tokenized once with a leading space (so a
    haystack is the concatenation of sentence encodings and a needle can go between any two)."""

    def __init__(self, tokenizer: Tokenizer, names: Sequence[str], *, texts: Sequence[str] | None = None):
        if not names:
            raise ValueError("a haystack needs at least one document name")
        self.names = tuple(names)
        texts = list(texts) if texts is not None else [corpora.load(n) for n in names]
        self.sentences = [s for t in texts for s in split_sentences(t)]
        if not self.sentences:
            raise ValueError(f"documents {self.names} hold no sentences")
        self.encoded = [tokenizer.encode(" " + s) for s in self.sentences]
        self.total = sum(len(e) for e in self.encoded)

    def cut(self, budget: int, rng: random.Random) -> tuple[list[list[int]], int, bool]:
        """Whole sentences from a random start, as many as fit in `budget` tokens:
        (sentence encodings, start sentence, wrapped past the end of the source)."""
        n = len(self.encoded)
        # the latest start from which the rest of the source still fills the budget
        tail, last = 0, 0
        for i in range(n - 1, -1, -1):
            tail += len(self.encoded[i])
            if tail >= budget:
                last = i
                break
        start = rng.randrange(last + 1) if tail >= budget else 0
        out, used, i = [], 0, start
        while used + len(self.encoded[i % n]) <= budget and i - start < 4 * n:
            out.append(self.encoded[i % n])
            used += len(self.encoded[i % n])
            i += 1
        return out, start, i > n


@dataclass(frozen=True, slots=True)
class NeedleTrial:
    """One prompt: head (chat turn opening) + hay[:cut] + needle + hay[cut:], then the question."""

    fmt: str
    key: str
    depth: float
    """The requested depth; `actual_depth` is where the sentence boundary put the needle."""
    head: list[int]
    hay: list[int]
    cut: int
    needle: list[int]
    question: list[int]

    @property
    def document(self) -> list[int]:
        return self.head + self.hay[:self.cut] + self.needle + self.hay[self.cut:]

    @property
    def needle_pos(self) -> int:
        """Position of the needle's first token in the document."""
        return len(self.head) + self.cut

    @property
    def n_tokens(self) -> int:
        return len(self.head) + len(self.hay) + len(self.needle) + len(self.question)

    @property
    def actual_depth(self) -> float:
        return self.cut / len(self.hay) if self.hay else 0.0


def place_needle(sentences: list[list[int]], depth: float) -> int:
    """Tokens before the sentence boundary closest to `depth` of the haystack's tokens."""
    bounds = [0]
    for s in sentences:
        bounds.append(bounds[-1] + len(s))
    target = depth * bounds[-1]
    return min(bounds, key=lambda b: abs(b - target))


def build_trials(tokenizer: Tokenizer, source: HaystackSource, n_tokens: int, specs: Sequence[tuple[str, float, str]],
                 rng: random.Random) -> tuple[list[NeedleTrial], dict]:
    """Trials sharing one haystack, one per (format, depth, key) of `specs`, each at most
    `n_tokens` long (the haystack leaves room for the longest needle + question).
    Returns (trials, facts about the haystack). Raises ValueError when not even the needle fits."""
    head = chat_document(tokenizer, "")
    needles = [tokenizer.encode(" " + needle_sentence(f, k)) for f, _, k in specs]
    questions = {f: question_tokens(tokenizer, question_text(f, tokenizer), chat=True, continues_turn=True)
                 for f, _, _ in specs}
    fixed = len(head) + max(len(nd) + len(questions[f]) for nd, (f, _, _) in zip(needles, specs))
    budget = n_tokens - fixed
    if budget < 1:
        raise ValueError(f"length {n_tokens} is too short: the chat turn, needle and question alone take {fixed} tokens")
    sentences, start, wrapped = source.cut(budget, rng)
    hay = [t for s in sentences for t in s]
    trials = [NeedleTrial(fmt=f, key=k, depth=d, head=head, hay=hay, cut=place_needle(sentences, d),
                          needle=nd, question=questions[f]) for nd, (f, d, k) in zip(needles, specs)]
    return trials, {"start_sentence": start, "wrapped": wrapped, "hay_tokens": len(hay)}


# --- config --------------------------------------------------------------------------------------

@dataclass(kw_only=True, slots=True)
class NeedleConfig:
    """What one needle run evaluates."""

    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 32768])
    """Prompt lengths N in tokens (document + question)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    """Where the needle sits in the haystack, 0 = first, 1 = last."""
    trials: int = 1
    """Haystacks (random offsets and keys) per length."""
    formats: tuple[str, ...] = KEY_FORMATS
    modes: tuple[str, ...] = MODES
    full_max_len: int = 8192
    """`full` runs for lengths up to this (the model's trained range)..."""
    full_beyond: tuple[int, ...] = ()
    """...and for these longer lengths too, to show what happens past it."""
    retrieval: TrainingFreeConfig = field(default_factory=TrainingFreeConfig)
    """The `retrieval` mode's settings; `local` takes its window and chunk."""
    landmark: RetrievalConfig | None = None
    """A landmark-trained model's `retrieval` mode: its landmark retrieval (None:
    `RetrievalConfig` defaults with `retrieval.top_k`, see `needle_answers.memory_config`)."""
    seed: int = 0
    text: tuple[str, ...] = ("austen:persuasion",)
    """Documents the haystack is cut from (cycled when shorter than a length)."""
    max_new_tokens: int = 12

    def __post_init__(self) -> None:
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"NeedleConfig.lengths={self.lengths!r} is invalid: a non-empty list of ints >= 64")
        if not self.depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"NeedleConfig.depths={self.depths!r} is invalid: a non-empty list of values in [0, 1]")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"NeedleConfig.trials={self.trials!r} is invalid: an int >= 1")
        for name, allowed in (("formats", KEY_FORMATS), ("modes", MODES)):
            v = tuple(getattr(self, name))
            if not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
                raise ValueError(f"NeedleConfig.{name}={v!r} is invalid: distinct values of {allowed}")
            setattr(self, name, v)
        if isinstance(self.full_max_len, bool) or not isinstance(self.full_max_len, int) or self.full_max_len < 1:
            raise ValueError(f"NeedleConfig.full_max_len={self.full_max_len!r} is invalid: an int >= 1")
        self.full_beyond = tuple(self.full_beyond)
        if not isinstance(self.retrieval, TrainingFreeConfig):
            raise ValueError(f"NeedleConfig.retrieval must be a TrainingFreeConfig, got {type(self.retrieval).__name__}")
        if self.landmark is not None and not isinstance(self.landmark, RetrievalConfig):
            raise ValueError(f"NeedleConfig.landmark must be None or a RetrievalConfig, got "
                             f"{type(self.landmark).__name__}")
        self.text = (self.text,) if isinstance(self.text, str) else tuple(self.text)
        if not self.text:
            raise ValueError("NeedleConfig.text is empty: name at least one document (e.g. austen:persuasion)")
        for name in self.text:
            corpora.split_name(name)  # CorpusError (a ValueError) for a malformed name
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"NeedleConfig.max_new_tokens={self.max_new_tokens!r} is invalid: an int >= 1")

    def modes_for(self, n: int) -> tuple[str, ...]:
        return tuple(m for m in self.modes if m != "full" or n <= self.full_max_len or n in self.full_beyond)

    def local(self) -> TrainingFreeConfig:
        """The window-only config: no retrieved blocks, no sinks, the same window and chunk."""
        rc = self.retrieval
        return TrainingFreeConfig(top_k=0, sink_blocks=0, local_blocks=rc.local_blocks, chunk_len=rc.chunk_len,
                                  block_key=rc.block_key)


def machine_info() -> dict:
    """Where a run happened: CPU count, torch version and threads, accelerator, Python."""
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform()}


# --- the run -------------------------------------------------------------------------------------

@torch.no_grad()
def run_needle(model: LandmarkTransformer, tok: Tokenizer, cfg: NeedleConfig, *, progress: bool = True,
               on_update: Callable[[dict], None] | None = None, source: HaystackSource | None = None) -> dict:
    """Accuracy per (length, depth, format, mode). Lengths run shortest first; `on_update`
    receives the result so far after each (length, trial, mode) group (for partial outputs).
    source: the haystack's sentences (default: `cfg.text` loaded from the corpora).
    Returns {"rows": [...], "trials": [...], "config": ..., "machine": ..., "seconds": ...}.
    A landmark-trained model (a landmark fine-tune) runs `retrieval` and `local` through its
    own landmark retrieval (`needle_answers.memory_config`); `full` is for causal models only and is skipped."""
    t_start = time.perf_counter()
    source = source or HaystackSource(tok, cfg.text)
    rng = random.Random(cfg.seed)
    lengths = sorted(cfg.lengths)
    modes_for = (lambda n: tuple(m for m in cfg.modes_for(n) if m != "full")) if model.cfg.landmarks else cfg.modes_for
    n_cells = sum(len(modes_for(n)) for n in lengths) * cfg.trials * len(cfg.depths) * len(cfg.formats)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_cells, desc="needle", unit="trial", file=sys.stderr, dynamic_ncols=True)
    done = (lambda: bar.update(1)) if bar is not None else (lambda: None)
    records: list[dict] = []
    result = {"rows": [], "trials": records, "config": _config_record(cfg, model, source), "machine": machine_info()}
    for n in lengths:
        for trial in range(cfg.trials):
            specs = [(f, d, make_key(f, rng)) for d in cfg.depths for f in cfg.formats]
            trials, facts = build_trials(tok, source, n, specs, rng)
            for mode in modes_for(n):
                if bar is not None:
                    bar.set_postfix_str(f"{n:,} tokens, {mode}")
                if mode == "full":
                    answers = answers_full(model, tok, trials, cfg.max_new_tokens, done)
                else:
                    answers = answers_from_store(model, tok, trials, mode_config(cfg, mode, model.cfg),
                                                 cfg.max_new_tokens, done)
                for t, (answer, secs) in zip(trials, answers):
                    records.append({"length": n, "trial": trial, "mode": mode, "format": t.fmt, "depth": t.depth,
                                    "actual_depth": round(t.actual_depth, 4), "key": t.key, "answer": answer,
                                    "correct": is_correct(answer, t.key), "tokens": t.n_tokens,
                                    "seconds": round(secs, 2), **facts})
                result["rows"] = aggregate(records)
                result["seconds"] = round(time.perf_counter() - t_start, 1)
                if on_update is not None:
                    on_update(result)
    if bar is not None:
        bar.close()
    result["rows"] = aggregate(records)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def _config_record(cfg: NeedleConfig, model: LandmarkTransformer, source: HaystackSource) -> dict:
    rec = asdict(cfg)
    rec["text"] = list(source.names)
    rec["held_out"] = all(_held_out(n) for n in source.names)
    rec["source_tokens"] = source.total
    rec["model"] = {"source": model.cfg.source, "fingerprint": model.cfg.fingerprint(),
                    "max_seq_len": model.cfg.max_seq_len, "block_len": model.cfg.block_len}
    return rec


def _held_out(name: str) -> bool:
    try:
        return corpora.is_held_out(name)
    except corpora.CorpusError:  # a text given directly (tests), not a corpus document
        return False


def aggregate(records: Sequence[dict]) -> list[dict]:
    """Rows per (length, depth, format, mode): accuracy over trials and seconds per trial."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["length"], r["depth"], r["format"], r["mode"]), []).append(r)
    return [{"length": n, "depth": d, "format": f, "mode": m, "trials": len(g),
             "accuracy": sum(r["correct"] for r in g) / len(g),
             "seconds": round(sum(r["seconds"] for r in g) / len(g), 2)}
            for (n, d, f, m), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                          kv[0][2], MODES.index(kv[0][3])))]


# --- reporting -----------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def format_table(result: dict) -> str:
    """Markdown: accuracy per length and mode (over depths and formats), then per depth."""
    rows = result["rows"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731

    def acc(**where) -> float | None:
        sel = [r for r in rows if all(r[k] == v for k, v in where.items())]
        return _mean([r["accuracy"] for r in sel for _ in range(r["trials"])])

    lines = ["| length | " + " | ".join(modes) + " | s/trial (" + ", ".join(modes) + ") |",
             "|---:|" + "---:|" * len(modes) + "---|"]
    for n in lengths:
        secs = [_mean([r["seconds"] for r in rows if r["length"] == n and r["mode"] == m]) for m in modes]
        lines.append(f"| {n:,} | " + " | ".join(fmt(acc(length=n, mode=m)) for m in modes) + " | "
                     + ", ".join("-" if s is None else f"{s:.0f}" for s in secs) + " |")
    lines += ["", "| length | mode | " + " | ".join(f"d={d:g}" for d in depths) + " |",
              "|---:|---|" + "---:|" * len(depths)]
    for n in lengths:
        for m in modes:
            if any(r["length"] == n and r["mode"] == m for r in rows):
                lines.append(f"| {n:,} | {m} | " + " | ".join(fmt(acc(length=n, mode=m, depth=d)) for d in depths) + " |")
    formats = [f for f in KEY_FORMATS if any(r["format"] == f for r in rows)]
    if len(formats) > 1:
        lines += ["", "| mode | " + " | ".join(formats) + " |", "|---|" + "---:|" * len(formats)]
        for m in modes:
            lines.append(f"| {m} | " + " | ".join(fmt(acc(mode=m, format=f)) for f in formats) + " |")
    return "\n".join(lines)


def write_json(result: dict, out_dir: str | Path, name: str = "needle.json", *, indent: int = 2) -> Path:
    """`result` as out_dir/name, replaced atomically; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=indent) + "\n")
    tmp.replace(path)  # a partial result being rewritten is never half-visible
    return path


def write_outputs(result: dict, out_dir: str | Path) -> list[Path]:
    """needle.json, needle.md (the table) and needle.png (accuracy per length x depth, one panel a mode)."""
    out = Path(out_dir)
    paths = [write_json(result, out)]
    (out / "needle.md").write_text(format_table(result) + "\n")
    paths.append(out / "needle.md")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes) + 1, 3.5), constrained_layout=True, squeeze=False)
    im = None
    for ax, m in zip(axes[0], modes):
        grid = []
        for d in depths:
            row = []
            for n in lengths:
                sel = [r["accuracy"] for r in rows if r["mode"] == m and r["length"] == n and r["depth"] == d]
                row.append(sum(sel) / len(sel) if sel else float("nan"))  # not evaluated: blank
            grid.append(row)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"needle accuracy: {m}")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(out / "needle.png", dpi=120)
    plt.close(fig)
    paths.append(out / "needle.png")
    return paths
