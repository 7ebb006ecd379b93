"""Document sources: text files and folders, JSONL, built-in generators, the named corpora.

A source is an endless, indexable sequence of documents: `document(i)` is a pure
function of (seed, i), so a run can be resumed from a few integers and every process
of a multi-process run sees the same order. File sources visit every document once per
epoch in a seeded shuffled order. `DocumentMixer` picks which source the j-th document
comes from, by weight, also as a pure function of (seed, j).

The default real corpus is the Python standard library's own .py files, found at run
time under `sysconfig.get_paths()["stdlib"]` (every machine with Python has them). A
fixed 10% of its files (by a hash of their relative path) is held out: 'stdlib' trains
on the rest, 'stdlib-heldout' is the evaluation split.

The named corpora of `engine.corpora` (fetched at install time) are sources too:
'austen', 'sotu' and 'sample' train on their documents outside the held-out split
(`engine.corpora.HELD_OUT`, the one place that split is declared), 'austen-heldout',
'sotu-heldout' and 'sample-heldout' are the evaluation documents, and one document is
its name, e.g. 'austen:emma' or 'sotu:1862-lincoln'.

Synthetic sources take options in their spec, `name:key=value,...`:

- `answer_weight=N` (int >= 1): the answer tokens of each document (the passkey's
  " K." after the question; the values recalled after each recall query) weigh N times
  an ordinary token in the loss (`Document.answer_spans`, packed into the targets by
  `train.windows`). The filler is predictable and would otherwise dominate the loss.
- `key_digits=LO-HI` (passkey only): keys of LO..HI digits (digit count uniform), e.g.
  `1-5` as in the evaluation's 5-digit keys; default: 1..50000 as in the paper.

- `filler=prose` (passkey only): excerpts of the real training texts (Austen but the held-out
  novel, the addresses outside the held-out years) around the key instead of the generated
  sentences, so the model learns to find the key in ordinary prose.
- `distractors=LO-HI` (passkey only): that many sentences with other numbers (a labelled
  number, a numbered heading, a year, a price; never the key) at random places of the
  filler, so the answer is the number the key sentence gives, not any number.
- `max_keys=N`, `plain=F` (needles only): up to N keys per document (one asked, the others
  distractors), and the share F of documents that are the prose excerpt alone.
- `chars=LO-HI`: this source's document lengths in characters (default: the run's
  `synthetic_chars`), e.g. a second `needles` source of long documents beside short ones.

The generators: `needles` (keys of several formats hidden in excerpts of the real training
texts, a question in the model's chat format: `train.prose_tasks`), `passkey` (the paper's
task, varied filler), `recall` (key/value facts
among filler, then queries), `repeat` (random words, then the same words again: a dense
signal for the copy-from-context lookup a passkey answer needs; its answer span is the
second copy).

e.g. `--data passkey:answer_weight=16,key_digits=1-5`.
"""

from __future__ import annotations

import json
import os
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.corpora import (FETCHED, CorpusError, held_out_documents, is_held_out, load, stdlib_dir,
                            stdlib_relpaths, training_documents)
from train.errors import DataError
from train.tasks import passkey_prompt, recall_document, repeat_document

_SNIFF_BYTES = 8192
_NAMED_CORPORA = (*FETCHED, "sample")  # 'stdlib' keeps its FileSource (same names, same order)


@dataclass(frozen=True, slots=True)
class Document:
    """One document: a stable name (for logs and store stream names) and its text."""

    name: str
    text: str
    answer_spans: tuple[tuple[int, int], ...] = ()
    """(start, end) character ranges of `text` whose tokens weigh `answer_weight` in the loss."""
    answer_weight: int = 1
    """Loss weight of the tokens in answer_spans (1 = an ordinary token)."""
    specials: bool = False
    """Whether special-token strings in `text` are tokens (a generated chat turn); in real
    documents they are ordinary text."""


class DocumentSource(ABC):
    """An endless sequence of documents, addressable by index."""

    name: str

    @abstractmethod
    def document(self, i: int) -> Document:
        """The i-th document (i >= 0). Same i, same seed -> same document."""


_RECALL_ANSWER = re.compile(r"What does (\w{3}) hold\? \1 holds (\d+\.)")


class SyntheticSource(DocumentSource):
    """Generated passkey, associative-recall or repeat documents of [min, max] chars.

    answer_weight: loss weight of the answer tokens (1 = plain language modelling).
    key_digits: (lo, hi) digit counts of passkeys; None = 1..50000 as in the paper.
    """

    KINDS = ("passkey", "recall", "repeat", "needles")

    def __init__(self, kind: str, *, seed: int, chars: tuple[int, int], answer_weight: int = 1,
                 key_digits: tuple[int, int] | None = None, max_keys: int = 3, plain: float = 0.0,
                 chat: tuple[str, str] | None = None, filler: str = "generator", stream: str = "",
                 distractors: tuple[int, int] = (0, 0)) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r} is invalid: one of {self.KINDS}")
        if not isinstance(answer_weight, int) or isinstance(answer_weight, bool) or answer_weight < 1:
            raise ValueError(f"answer_weight={answer_weight!r} is invalid: an int >= 1")
        if key_digits is not None and (kind != "passkey" or not 1 <= key_digits[0] <= key_digits[1] <= 12):
            raise ValueError(f"key_digits={key_digits!r} is invalid: (lo, hi) with 1 <= lo <= hi <= 12, "
                             f"passkey only")
        if filler not in ("generator", "prose") or (filler == "prose" and kind != "passkey"):
            raise ValueError(f"filler={filler!r} is invalid: 'generator', or 'prose' (passkey only: real "
                             f"training text around the key)")
        if not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys={max_keys!r} is invalid: an int >= 1")
        if tuple(distractors) != (0, 0) and (kind != "passkey" or not 0 <= distractors[0] <= distractors[1]):
            raise ValueError(f"distractors={distractors!r} is invalid: (lo, hi) with 0 <= lo <= hi, passkey only")
        if not 0.0 <= plain <= 1.0:
            raise ValueError(f"plain={plain!r} is invalid: a fraction in [0, 1]")
        self.kind, self.seed, self.chars = kind, seed, chars
        self.answer_weight, self.key_digits = answer_weight, key_digits
        self.max_keys, self.plain, self.chat, self.filler = max_keys, plain, chat, filler
        self.distractors = tuple(distractors)
        self._hay = None
        # the name keys the data order, so the plain spec keeps the plain name; `stream` sets
        # apart the documents of a second source of the same kind (e.g. its own `chars`)
        self.name = kind
        self.stream = stream

    def document(self, i: int) -> Document:
        # A str seed is hashed with sha512 by `random`, so it is stable across processes.
        rng = random.Random(f"{self.seed}:{self.kind}{self.stream}:{i}")
        n = rng.randint(*self.chars)
        if self.kind == "passkey":
            prose = None
            if self.filler == "prose":
                from train.prose_tasks import ProseHay

                if self._hay is None:
                    self._hay = ProseHay(("austen", "sotu"))
                prose = self._hay
            prompt, answer = passkey_prompt(rng, n, key_digits=self.key_digits, prose=prose,
                                            distractors=self.distractors)
            text = prompt + answer
            spans: tuple[tuple[int, int], ...] = ((len(prompt), len(text)),)
        elif self.kind == "repeat":
            text, span = repeat_document(rng, n)
            spans = (span,)
        elif self.kind == "needles":
            from train.prose_tasks import ProseHay, needle_document

            if self._hay is None:
                self._hay = ProseHay()
            name, text, span = needle_document(rng, self._hay, n, max_keys=self.max_keys,
                                               chat=self.chat, plain=self.plain)
            spans = () if span is None or self.answer_weight == 1 else (span,)
            return Document(f"needles#{i}:{name}", text, spans, self.answer_weight, specials=self.chat is not None)
        else:
            text = recall_document(rng, n)
            spans = tuple(m.span(2) for m in _RECALL_ANSWER.finditer(text))
        if self.answer_weight == 1:
            spans = ()
        return Document(f"{self.kind}#{i}", text, spans, self.answer_weight)


class _EpochOrder:
    """Which of n items the i-th visit takes: a seeded shuffle per epoch, each item once per epoch."""

    def __init__(self, seed: int, name: str, n: int) -> None:
        self.seed, self.name, self.n = seed, name, n
        self._epoch = -1
        self._perm: list[int] = []

    def __call__(self, i: int) -> int:
        epoch, k = divmod(i, self.n)
        if epoch != self._epoch:
            self._perm = list(range(self.n))
            random.Random(f"{self.seed}:{self.name}:epoch{epoch}").shuffle(self._perm)
            self._epoch = epoch
        return self._perm[k]


@dataclass(frozen=True, slots=True)
class _Entry:
    path: Path
    label: str
    offset: int = -1  # byte offset of a JSONL line; -1 = the whole file
    lineno: int = 0


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut by the sniff window is still text
        return e.start >= len(head) - 3
    return True


class FileSource(DocumentSource):
    """Documents from text files, folders of text files (recursive) and .jsonl files.

    A text file is one document; each non-empty line of a .jsonl file is one document,
    its text in `jsonl_field`. Folders are walked in sorted order, skipping hidden
    entries, empty files and files that are not UTF-8 text. Raises DataError when a path
    does not exist or nothing under it holds text.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, seed: int, jsonl_field: str = "text",
                 name: str | None = None, root: Path | None = None,
                 files: Sequence[Path] | None = None) -> None:
        self.seed, self.jsonl_field = seed, jsonl_field
        self.name = name or ",".join(str(p) for p in paths)
        self._root = root
        entries: list[_Entry] = []
        if files is None:
            files = []
            for p in paths:
                files.extend(self._expand(Path(p)))
        for f in files:
            if f.suffix == ".jsonl":
                entries.extend(self._jsonl_entries(f))
            elif f.stat().st_size > 0 and _looks_like_text(f):
                entries.append(_Entry(f, self._label(f)))
        if not entries:
            raise DataError(f"data source {self.name!r} holds no text "
                            f"(no non-empty UTF-8 text files or JSONL records found)")
        self._entries = entries
        self._order = _EpochOrder(seed, self.name, len(entries))

    def __len__(self) -> int:
        return len(self._entries)

    def _label(self, f: Path) -> str:
        if self._root is not None:
            return f.relative_to(self._root).as_posix()
        return str(f)

    @staticmethod
    def _expand(p: Path) -> list[Path]:
        if not p.exists():
            raise DataError(f"data path {str(p)!r} does not exist")
        if p.is_file():
            return [p]
        out: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))
        return out

    def _jsonl_entries(self, f: Path) -> list[_Entry]:
        entries: list[_Entry] = []
        offset = 0
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    entries.append(_Entry(f, f"{self._label(f)}:{lineno}", offset, lineno))
                offset += len(line)
        if entries:  # fail early on a file whose records lack the field
            self._read(entries[0])
        return entries

    def _read(self, e: _Entry) -> str:
        if e.offset < 0:
            return e.path.read_bytes().decode("utf-8", errors="replace")
        with open(e.path, "rb") as fh:
            fh.seek(e.offset)
            line = fh.readline()
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{e.path}:{e.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(self.jsonl_field), str):
            raise DataError(f"{e.path}:{e.lineno}: record has no string field "
                            f"{self.jsonl_field!r} (set jsonl_field)")
        return rec[self.jsonl_field]

    def document(self, i: int) -> Document:
        e = self._entries[self._order(i)]
        return Document(f"{self.name}:{e.label}", self._read(e))


class NamedDocumentSource(DocumentSource):
    """Documents of `engine.corpora` by name ('austen:emma', ...), each once per epoch, shuffled.

    Raises DataError when `names` is empty (e.g. a corpus not fetched yet) or a name is unknown.
    """

    def __init__(self, names: Sequence[str], *, seed: int, name: str, cache_dir: Path | None = None) -> None:
        if not names:
            raise DataError(f"data source {name!r} holds no documents: austen and sotu are fetched at install "
                            f"time (`folio data fetch`); without a network use 'sample'")
        self.name, self.names, self.seed, self._cache_dir = name, list(names), seed, cache_dir
        self._order = _EpochOrder(seed, name, len(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def document(self, i: int) -> Document:
        doc = self.names[self._order(i)]
        try:
            return Document(doc, load(doc, cache_dir=self._cache_dir))
        except CorpusError as e:
            raise DataError(str(e)) from None


def named_source(spec: str, *, seed: int) -> NamedDocumentSource | None:
    """'austen', 'austen-heldout', 'sotu', 'sample', 'austen:emma', ... as a source; None for other specs.

    Raises DataError for an unknown document or a corpus that is not fetched.
    """
    corpus, sep, _ = spec.partition(":")
    base, dash, split = spec.rpartition("-")
    try:
        if sep and corpus in (*_NAMED_CORPORA, "stdlib"):
            load(spec)  # fail now, not at the first draw, on a name that is not there
            names = [spec]
        elif spec in _NAMED_CORPORA:
            names = training_documents(spec)
        elif dash and split == "heldout" and base in _NAMED_CORPORA:
            names = held_out_documents(base)
        else:
            return None
    except CorpusError as e:
        raise DataError(f"data source {spec!r}: {e}") from None
    return NamedDocumentSource(names, seed=seed, name=spec)


def stdlib_files(split: str = "train") -> list[Path]:
    """The standard library's .py files (no tests, no site-packages) of one split.

    split: 'train' (about 90% of files) or 'heldout' (the rest, by a hash of the path
    relative to the stdlib directory, so the split is the same on every machine).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is invalid: 'train' or 'heldout'")
    root = stdlib_dir()
    if not root.is_dir():
        raise DataError(f"the standard library directory {str(root)!r} does not exist")
    held = split == "heldout"
    return [root / rel for rel in stdlib_relpaths() if is_held_out(f"stdlib:{rel}") == held]


def stdlib_source(split: str = "train", *, seed: int = 0) -> FileSource:
    """The stdlib corpus as a FileSource ('stdlib' or 'stdlib-heldout')."""
    name = "stdlib" if split == "train" else "stdlib-heldout"
    return FileSource([], seed=seed, name=name, root=stdlib_dir(), files=stdlib_files(split))


_SYNTHETIC_OPTIONS = ("answer_weight", "key_digits", "max_keys", "plain", "filler", "chars", "distractors")


def parse_synthetic_spec(spec: str) -> tuple[str, dict] | None:
    """'passkey:answer_weight=16,key_digits=1-5' -> ('passkey', {...}); None if not synthetic.

    Raises ValueError naming the spec for an unknown option or a malformed value.
    """
    kind, sep, opts = spec.partition(":")
    if kind not in SyntheticSource.KINDS:
        return None
    out: dict = {}
    for item in (opts.split(",") if sep else ()):
        key, eq, raw = item.partition("=")
        try:
            if not eq or key not in _SYNTHETIC_OPTIONS:
                raise ValueError
            if key in ("answer_weight", "max_keys"):
                out[key] = int(raw)
            elif key == "plain":
                out[key] = float(raw)
            elif key == "filler":
                if raw not in ("generator", "prose"):
                    raise ValueError
                out[key] = raw
            else:
                lo, dash, hi = raw.partition("-")
                out[key] = (int(lo), int(hi if dash else lo))
                if key == "chars" and not 1 <= out[key][0] <= out[key][1]:
                    raise ValueError
                if key == "distractors" and not 0 <= out[key][0] <= out[key][1]:
                    raise ValueError
        except ValueError:
            raise ValueError(f"data source {spec!r}: option {item!r} is invalid; allowed "
                             f"answer_weight=N (int >= 1), key_digits=LO-HI, filler=generator|prose and "
                             f"distractors=LO-HI (passkey), "
                             f"max_keys=N and plain=F (needles), chars=LO-HI (1 <= LO <= HI)") from None
    return kind, out


def build_source(spec: str, *, seed: int, jsonl_field: str = "text",
                 synthetic_chars: tuple[int, int] = (300, 1500),
                 chat: tuple[str, str] | None = None) -> DocumentSource:
    """One source from its spec: a generator, 'stdlib[-heldout]', a named corpus, a document name or a path.

    Generators: 'passkey', 'recall', 'repeat', with options, e.g.
    'passkey:answer_weight=16,key_digits=1-5' (see the module docstring). Named corpora:
    'austen', 'sotu', 'sample' (their training documents) and 'austen-heldout', ...;
    one document: 'austen:emma', 'stdlib:json/decoder.py'. Built-in names win over a
    file of the same name; write './passkey' for the file. Raises DataError for a path
    that does not exist or holds no text, or a corpus not fetched, ValueError for a
    malformed synthetic option.
    """
    synthetic = parse_synthetic_spec(spec)
    if synthetic is not None:
        kind, opts = synthetic
        chars = opts.pop("chars", None)
        return SyntheticSource(kind, seed=seed, chars=chars or synthetic_chars, chat=chat,
                               stream=f"@{chars[0]}-{chars[1]}" if chars else "", **opts)
    if spec == "stdlib":
        return stdlib_source("train", seed=seed)
    if spec == "stdlib-heldout":
        return stdlib_source("heldout", seed=seed)
    named = named_source(spec, seed=seed)
    if named is not None:
        return named
    return FileSource([spec], seed=seed, jsonl_field=jsonl_field)


class DocumentMixer:
    """Draws documents from several sources by weight, as a pure function of (seed, j).

    Draw j goes to source `choice(j)`; the document taken is that source's next unused
    index, so each file source is still walked epoch by epoch. With several processes,
    process r takes draws j = r, r + W, r + 2W, ... and counts the others' draws too, so
    processes never train the same draw. Its whole state is `state_dict()` (a few ints).
    """

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float] | None = None, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not sources:
            raise ValueError("DocumentMixer needs at least one source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
        self.sources = list(sources)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sources)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.next_draw = 0
        self.counts = [0] * len(self.sources)

    def _choice(self, j: int) -> int:
        if len(self.sources) == 1:
            return 0
        rng = random.Random(f"{self.seed}:mix:{j}")
        return rng.choices(range(len(self.sources)), weights=self.weights)[0]

    def draw(self) -> tuple[int, int, int]:
        """Take the next draw of this process: (draw index j, source index, local index)."""
        while True:
            j = self.next_draw
            s = self._choice(j)
            local = self.counts[s]
            self.counts[s] += 1
            self.next_draw += 1
            if j % self.world_size == self.rank:
                return j, s, local

    def document(self, source: int, local: int) -> Document:
        return self.sources[source].document(local)

    def state_dict(self) -> dict:
        return {"next_draw": self.next_draw, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.sources):
            raise ValueError(f"data state has {len(state['counts'])} sources, this run has "
                             f"{len(self.sources)}: resume with the same data sources")
        self.next_draw = int(state["next_draw"])
        self.counts = [int(c) for c in state["counts"]]
