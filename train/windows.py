"""Documents -> consecutive training windows, trained in order, one document per lane.

A document is tokenized (BOS + tokens + EOS; the byte tokenizer or a checkpoint's own),
landmarks are inserted, and it is cut into consecutive windows of `window` positions (a
multiple of block_len, so every window starts at a block boundary). A batch has
`micro_batch` lanes; each lane trains its document window after window, in order, and draws
the next document when it ends.

The seam for retrieval in training (TBPTT over the store) is `DocumentState.memory`
and the `WindowMemory` hooks. The loop calls:

- `begin_document(state)` when a lane starts a document (open its store stream),
- `for_step(states)` before the forward: what the model gets as `memory=` (None = the
  paper's plain-window training),
- `after_windows(states, window_indices)` after the optimizer step, once for all lanes
  (by default `after_window(state, window_index)` for each lane in order: put the
  window's completed blocks into the stream; from the second window on they are
  retrieved),
- `end_document(state)` for each lane whose last window that was, after every lane's
  window has been put (delete the stream).

`NoMemory` does nothing; `train.store_memory.StoreWindowMemory` (retrieval) and
`train.folded_memory.FoldedWindowMemory` implement the hooks.

Weighted targets: a document may mark answer spans that weigh more in the loss
(`Document.answer_spans`). The loop hands the model only (tokens, targets), so a
weight w > 1 travels inside the int64 target: `target + (w - 1) << TARGET_WEIGHT_SHIFT`
(`pack_targets`); `train.loop.LanguageModelLoss` unpacks it (`unpack_targets`). Targets
of unweighted documents are plain token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.landmarks import IGNORE_INDEX, insert_landmarks, next_token_targets
from engine.tokenizer import ByteTokenizer, Tokenizer
from train.data import Document, DocumentMixer

TARGET_WEIGHT_SHIFT = 32
"""Bits below which a packed target holds the token id (any vocabulary fits)."""


def pack_targets(targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Fold integer loss weights (>= 1) into targets; IGNORE_INDEX entries stay as they are."""
    extra = (weights.to(torch.long) - 1).clamp_min(0) << TARGET_WEIGHT_SHIFT
    return torch.where(targets >= 0, targets + extra, targets)


def unpack_targets(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(targets, weights) from packed targets; weights is None when every weight is 1."""
    if not bool((packed >> TARGET_WEIGHT_SHIFT).gt(0).any()):
        return packed, None
    valid = packed >= 0
    weights = torch.where(valid, (packed >> TARGET_WEIGHT_SHIFT) + 1, torch.ones_like(packed))
    targets = torch.where(valid, packed & ((1 << TARGET_WEIGHT_SHIFT) - 1), packed)
    return targets, weights


def _encode(doc: Document, tok: Tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """BOS + the document's tokens + EOS, and each token's character range (BOS/EOS: empty).
    A chat document (`specials`) opens with its template's own start instead of BOS."""
    ids, spans = tok.encode_offsets(doc.text, specials=doc.specials)
    if tok.bos_id is not None and not doc.specials:
        ids, spans = [tok.bos_id] + ids, [(0, 0)] + spans
    if tok.eos_id is not None:
        ids, spans = ids + [tok.eos_id], spans + [(len(doc.text), len(doc.text))]
    return ids, spans


def token_weights(doc: Document, block_len: int, tok: Tokenizer | None = None) -> torch.Tensor | None:
    """(n,) int64 loss weight of each landmarked position of `doc` (aligned with
    `tokenize_document`), or None when the document has no weighted spans. A token weighs
    `answer_weight` when its characters overlap an answer span."""
    if not doc.answer_spans or doc.answer_weight == 1:
        return None
    tok = tok or ByteTokenizer()
    _, spans = _encode(doc, tok)
    w = torch.ones(len(spans), dtype=torch.long)  # (n_tokens,) BOS + tokens + EOS
    for i, (s, e) in enumerate(spans):
        if e > s and any(s < b and a < e for a, b in doc.answer_spans):
            w[i] = doc.answer_weight
    return insert_landmarks(w, block_len, 1)  # (n,) landmarks weigh 1 (they are never targets)


def tokenize_document(text: str | Document, block_len: int, tok: Tokenizer | None = None) -> torch.Tensor:
    """Text -> (n,) int64 tokens: BOS, the tokens, EOS, with a landmark closing every block.
    A `Document` with `specials` has its special-token strings (a chat template) parsed."""
    tok = tok or ByteTokenizer()
    doc = text if isinstance(text, Document) else Document("", text)
    ids, _ = _encode(doc, tok)
    return insert_landmarks(ids, block_len, tok.landmark_id)  # (n,)


def n_windows(n_tokens: int, window: int) -> int:
    """How many windows a landmarked document of n_tokens positions is cut into."""
    return max(0, -(-(n_tokens - 1) // window)) if n_tokens > 1 else 0


def window_at(tokens: torch.Tensor, index: int, window: int,
              tok: Tokenizer | None = None, weights: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window `index` of a landmarked document: (inputs (window,), targets (window,)).

    The last position of a window is trained to predict the first token of the next
    window (it is in the document), so no prediction is lost at window borders. A short
    last window is padded with PAD, whose targets are IGNORE_INDEX. weights: (n,) loss
    weight of each document position (`token_weights`); the target predicting position
    p carries weights[p], packed (`pack_targets`).
    """
    tok = tok or ByteTokenizer()
    start = index * window
    piece = tokens[start:start + window + 1]  # (<= window + 1,) one extra: the next target
    if piece.numel() < 2:
        raise IndexError(f"window {index} is past the end of a {tokens.numel()}-position document")
    padded = torch.full((window + 1,), tok.pad_id, dtype=torch.long)
    padded[:piece.numel()] = piece
    # padding is masked by position (a subword tokenizer's pad id may be a real token, e.g. EOS)
    targets = next_token_targets(padded[None], tok.landmark_id, -1)[0, :window]  # (window,)
    inputs = padded[:window]  # (window,)
    targets[piece.numel() - 1:] = IGNORE_INDEX  # predictions of padding, and by padding
    if weights is not None:
        w = torch.ones(window + 1, dtype=torch.long)
        w[:piece.numel()] = weights[start:start + window + 1]
        targets = pack_targets(targets, w[1:])  # target p predicts position p + 1
    return inputs, targets


def document_windows(tokens: torch.Tensor, window: int, *, start: int = 0
                     ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (index, inputs (window,), targets (window,)) for the windows of a document, in order."""
    tok = ByteTokenizer()
    for i in range(start, n_windows(tokens.numel(), window)):
        inputs, targets = window_at(tokens, i, window, tok)
        yield i, inputs, targets


@dataclass(slots=True)
class DocumentState:
    """One document being trained window by window in one batch lane."""

    draw: int
    """Global draw index of the document (unique within the run, across processes)."""
    source: int
    """Index of its source in the mixer."""
    local: int
    """Its index within that source."""
    name: str
    """The document's name (file path, 'passkey#17', ...)."""
    tokens: torch.Tensor
    """(n,) int64 landmarked tokens of the whole document."""
    window: int = 0
    """Index of the next window to train."""
    n_windows: int = 0
    """Windows in this document."""
    memory: Any = None
    """Retrieval state of this document (e.g. its store stream); None without retrieval."""
    weights: torch.Tensor | None = None
    """(n,) int64 loss weight per position (answer spans), None = all 1."""

    @property
    def stream(self) -> str:
        """Store stream name of this document: unique per run, the same after resume."""
        return f"doc{self.draw}"

    @property
    def done(self) -> bool:
        return self.window >= self.n_windows


class WindowMemory:
    """Hooks through which retrieval follows each lane's document (see module docstring)."""

    def begin_document(self, state: DocumentState) -> None:
        """A lane starts `state` (at state.window, > 0 after a resume)."""

    def for_step(self, states: list[DocumentState]) -> Any:
        """What the model receives as `memory=` for this batch; None = plain window."""
        return None

    def after_window(self, state: DocumentState, window_index: int) -> None:
        """`state`'s window `window_index` has been trained."""

    def after_windows(self, states: list[DocumentState], windows: list[int]) -> None:
        """A step's windows have been trained (one per lane): `after_window` for each, in
        order; a memory may do them together."""
        for st, w in zip(states, windows):
            self.after_window(st, w)

    def end_document(self, state: DocumentState) -> None:
        """`state`'s last window has been trained."""

    def checkpoint(self) -> None:
        """A checkpoint is being written: make retrieval state durable with it."""

    def save_state(self, step_dir, states: list[DocumentState | None]) -> None:
        """A checkpoint is being written to `step_dir`: save what the lanes' memories hold that
        a resumed run needs (a memory that keeps nothing, or keeps it elsewhere, does nothing)."""

    def pulled_bytes(self, states: list[DocumentState]) -> dict[str, int]:
        """K/V bytes moved to the device since the last call, per source tier."""
        return {"device": 0, "host": 0, "disk": 0}

    def close(self) -> None:
        """The run is over."""


class NoMemory(WindowMemory):
    """Plain-window training: every window sees only itself."""


@dataclass(slots=True)
class WindowBatch:
    """One micro-batch: a window from each lane."""

    tokens: torch.Tensor
    """(B, T) int64 inputs."""
    targets: torch.Tensor
    """(B, T) int64 next-token targets, IGNORE_INDEX where nothing is predicted."""
    lanes: list[DocumentState] = field(default_factory=list)
    """The lane states that produced each row (before their window counters advance)."""
    windows: list[int] = field(default_factory=list)
    """Window index of each row within its document."""

    @property
    def n_tokens(self) -> int:
        """Positions that are not padding."""
        return int((self.tokens != ByteTokenizer.PAD).sum())


class LaneBatcher:
    """Feeds `lanes` documents in parallel, one window per lane per batch, in order.

    Its state (mixer counters + each lane's draw and next window) is a small dict, so a
    resumed run rebuilds exactly the same batches. Empty documents are skipped.
    """

    def __init__(self, mixer: DocumentMixer, *, lanes: int, window: int, block_len: int,
                 memory: WindowMemory | None = None, tokenizer: Tokenizer | None = None) -> None:
        if window % block_len:
            raise ValueError(f"window={window} is invalid: must be a multiple of block_len={block_len}")
        self.mixer, self.window, self.block_len = mixer, window, block_len
        self.memory = memory or NoMemory()
        self.tok = tokenizer or ByteTokenizer()
        self.lanes: list[DocumentState | None] = [None] * lanes

    def _open(self, draw: int, source: int, local: int, window: int = 0) -> DocumentState:
        doc = self.mixer.document(source, local)
        tokens = tokenize_document(doc, self.block_len, self.tok)
        st = DocumentState(draw=draw, source=source, local=local, name=doc.name, tokens=tokens,
                           window=window, n_windows=n_windows(tokens.numel(), self.window),
                           weights=token_weights(doc, self.block_len, self.tok))
        return st

    def _next_document(self) -> DocumentState:
        for _ in range(10_000):
            draw, s, local = self.mixer.draw()
            st = self._open(draw, s, local)
            if st.n_windows > 0:
                self.memory.begin_document(st)
                return st
        raise RuntimeError("10000 consecutive empty documents: the data sources hold no text")

    def next_batch(self) -> WindowBatch:
        """The next window of every lane, as one (B, T) batch."""
        rows_x, rows_y, states, windows = [], [], [], []
        for i, st in enumerate(self.lanes):
            if st is None or st.done:
                st = self.lanes[i] = self._next_document()
            x, y = window_at(st.tokens, st.window, self.window, self.tok, st.weights)
            rows_x.append(x)
            rows_y.append(y)
            states.append(st)
            windows.append(st.window)
        return WindowBatch(tokens=torch.stack(rows_x), targets=torch.stack(rows_y),  # (B, T)
                           lanes=states, windows=windows)

    def next_sequences(self, max_windows: int) -> list[tuple[DocumentState, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Every lane's next up to `max_windows` windows of its document, in order (UIO's TBPTT
        sequences: train/uio_loop.py); a lane whose document ended draws the next one."""
        out = []
        for i, st in enumerate(self.lanes):
            if st is None or st.done:
                st = self.lanes[i] = self._next_document()
            end = min(st.n_windows, st.window + max_windows)
            out.append((st, [window_at(st.tokens, w, self.window, self.tok, st.weights)
                             for w in range(st.window, end)]))
        return out

    def advance_sequences(self, seqs) -> None:
        """Mark `next_sequences`' windows trained; ends finished documents."""
        for st, windows in seqs:
            st.window += len(windows)
            if st.done:
                self.memory.end_document(st)

    def advance(self, batch: WindowBatch) -> None:
        """Mark the batch's windows trained; runs the memory hooks, ends finished documents."""
        for st, w in zip(batch.lanes, batch.windows):
            st.window = w + 1
        self.memory.after_windows(batch.lanes, batch.windows)
        for st in batch.lanes:
            if st.done:
                self.memory.end_document(st)

    def state_dict(self) -> dict:
        lanes = [None if st is None or st.done else
                 {"draw": st.draw, "source": st.source, "local": st.local, "window": st.window}
                 for st in self.lanes]
        return {"mixer": self.mixer.state_dict(), "lanes": lanes, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        if state["window"] != self.window or len(state["lanes"]) != len(self.lanes):
            raise ValueError(f"data state is for window={state['window']} with {len(state['lanes'])} lanes; "
                             f"this run has window={self.window} with {len(self.lanes)} lanes")
        self.mixer.load_state_dict(state["mixer"])
        for i, ls in enumerate(state["lanes"]):
            if ls is None:
                self.lanes[i] = None
                continue
            st = self._open(ls["draw"], ls["source"], ls["local"], ls["window"])
            self.memory.begin_document(st)
            self.lanes[i] = st
