"""Retrieval-backed inference: ingest a long document into a store, then ask / generate.

Chain: `ingest` (tokens -> landmarks -> chunked prefill through a `RetrievalMemory` that
writes completed blocks to the store) and `generate` (prompt prefill through a memory
that reads the store but writes nothing -> decode one token per step, retrieval at
every step). The cost of an ingest chunk does not grow with the document: it sees its
local window plus top-k retrieved blocks per layer and KV head.

Resumable ingest: each stream's metadata in the store records the ordinary tokens of
its unfinished last block ("tail") and how many tokens of each source were consumed,
and is committed together with the blocks by `store.flush()`. Re-running an ingest of
the same source continues where the flushed part ends.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import ModelConfig
from engine.folded import FoldedConfig, FoldedMemory
from engine.landmark_stream import LandmarkedStream
from engine.landmarks import insert_landmarks
from engine.model import LandmarkTransformer
from engine.retrieval import RetrievalConfig, RetrievalMemory, RetrievalStats
from engine.runtime import trim_heap
from engine.tokenizer import ByteTokenizer, Tokenizer
from engine.training_free import TrainingFreeConfig, TrainingFreeMemory
from engine.uio_inference import UIO_META, generate_uio, ingest_uio

TOKENIZER = ByteTokenizer()
_TRIM_EVERY = 16  # chunks between heap trims when no commit (which trims too) happened
AnyRetrievalConfig = RetrievalConfig | TrainingFreeConfig | FoldedConfig


def retrieval_for(cfg: ModelConfig, retrieval: AnyRetrievalConfig | None) -> AnyRetrievalConfig:
    """The memory config a model uses: folded context for a model trained with it
    (`ModelConfig.folded_window`), else landmark retrieval for a landmark-trained model,
    training-free retrieval for a plain causal one (defaults when None). Raises ValueError
    when the given config is of another kind."""
    want = (FoldedConfig if cfg.folded_window else RetrievalConfig if cfg.landmarks else TrainingFreeConfig)
    if retrieval is None:
        return want()
    if not isinstance(retrieval, want):
        kind = f"folded_window={cfg.folded_window}" if cfg.folded_window else f"attention={cfg.attention!r}"
        raise ValueError(f"a model with {kind} takes a {want.__name__}, got a {type(retrieval).__name__}")
    return retrieval


def make_memory(cfg: ModelConfig, store, *, stream: str | None, retrieval: AnyRetrievalConfig | None,
                persist: bool, read_streams="own"):
    """The memory for this model: `FoldedMemory` (a folded-context model; it reads its own
    stream only, see `generate`), `RetrievalMemory` (landmarks) or `TrainingFreeMemory` (a
    pretrained model without landmarks)."""
    rc = retrieval_for(cfg, retrieval)
    if isinstance(rc, FoldedConfig):
        return FoldedMemory(cfg, store, stream=stream, persist=persist, config=rc)
    cls = RetrievalMemory if cfg.landmarks else TrainingFreeMemory
    return cls(cfg, store, stream=stream, retrieval=rc, persist=persist, read_streams=read_streams)


def store_layout_for(cfg: ModelConfig):
    """The store layout a model reads and writes (shapes, dtype, fingerprint)."""
    from memory_store import StoreLayout

    return StoreLayout(n_layers=cfg.n_layers, n_kv_heads=cfg.n_kv_heads, block_len=cfg.block_len,
                       head_dim=cfg.head_dim, dtype=cfg.dtype, fingerprint=cfg.fingerprint())


def open_store(where, cfg: ModelConfig, mode: str = "a", config=None, wait_s: float = 0.0):
    """Open (or create) a store for this model; refuses a store of another model, and (writing)
    a store another process is writing to, after waiting up to wait_s seconds for it."""
    from memory_store import LayoutMismatchError, StoreNotFoundError, TieredStore

    if isinstance(where, (str, os.PathLike)) and os.path.exists(where) and not os.path.isdir(where):
        raise StoreNotFoundError(f"--store {os.fspath(where)}: a file, not a store directory")
    try:
        return TieredStore.open(where, mode, layout=store_layout_for(cfg), config=config, wait_s=wait_s)
    except LayoutMismatchError as e:
        uio = _holds_uio_memories(where)
        if uio is not None and cfg.uio is None:
            from engine.errors import ModelMismatchError

            raise ModelMismatchError(f"{where}: this store holds UIO memories (stream {uio!r}), written by a model "
                                     f"trained with UIO; this model was trained without UIO and cannot read them "
                                     f"(use the UIO model, or ingest into another store)") from e
        raise


def _holds_uio_memories(where) -> str | None:
    """The first stream of the store at `where` marked as UIO memories, or None (or unreadable)."""
    from memory_store import TieredStore

    try:
        with TieredStore.open(where, "r") as st:
            return next((s for s in st.streams() if st.get_stream_meta(s).get(UIO_META)), None)
    except Exception:  # noqa: BLE001 - only to word the error better; the original is raised anyway
        return None


@dataclass(slots=True)
class IngestResult:
    stream: str
    tokens: int  # ordinary tokens ingested by this call
    skipped: int  # tokens already ingested earlier (resume)
    blocks_put: int
    seconds: float
    bytes_fetched: int
    stats: RetrievalStats | None = None  # the memory's counters (window and retrieved K/V peaks); None for UIO

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr,
                dynamic_ncols=True, leave=True)


@torch.no_grad()
def ingest(model: LandmarkTransformer, store, stream: str, tokens: Sequence[int] | torch.Tensor, *,
           source: str | None = None, retrieval: AnyRetrievalConfig | None = None,
           flush_interval_s: float = 5.0, flush_every: int | None = None,
           progress: bool = False, tokenizer: Tokenizer | None = None,
           meta_update: dict | None = None) -> IngestResult:
    """Append ordinary `tokens` (no landmarks) to `stream`, prefilling in chunks.

    tokenizer: the model's (default: the byte tokenizer); its landmark id may not appear in
    `tokens`. A landmark model gets a landmark after every block_len - 1 tokens; a causal
    model's blocks are block_len ordinary tokens (training-free retrieval).
    meta_update: fields recorded in the stream's metadata with the first commit (e.g.
    {CHAT_META: True} for a document made by `chat_document`).

    source: a name for these tokens (e.g. a file path). If the stream's metadata says
    n tokens of this source were already ingested, the first n are skipped (resume).
    The store is flushed with the stream's metadata (a durable commit) at the first chunk
    end `flush_interval_s` seconds after the last one (and after every `flush_every`
    chunks when that is set), and at the end: a crash loses at most about that much work,
    and a re-run resumes from the last commit. Between commits the store's background
    writer keeps writing, so the prefill does not wait on the disk. Returns an `IngestResult`.
    """
    if not flush_interval_s > 0:
        raise ValueError(f"flush_interval_s={flush_interval_s!r}: expected seconds > 0")
    if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, int)
                                    or flush_every < 1):
        raise ValueError(f"flush_every={flush_every!r}: expected None or an int >= 1 (chunks)")
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream={stream!r} is invalid: a non-empty name")
    cfg = model.cfg
    rc = retrieval_for(cfg, retrieval) if cfg.uio is None or cfg.landmarks else None
    tok = tokenizer or TOKENIZER
    byte = isinstance(tok, ByteTokenizer)
    top, what = (255, "byte tokens") if byte else (tok.vocab_size - 1, "token ids")
    toks = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    toks = toks.reshape(-1)  # kept in the caller's dtype: a 1M-token uint8 document stays 1 MB
    if toks.numel() and (toks.is_floating_point() or toks.is_complex()):
        raise ValueError(f"ingest takes integer {what} 0..{top}, got dtype {toks.dtype}")
    if toks.numel() and (int(toks.min()) < 0 or int(toks.max()) > top or bool((toks == tok.landmark_id).any())):
        raise ValueError(f"ingest takes ordinary {what} 0..{top}, not the landmark {tok.landmark_id} "
                         f"(specials and landmarks are added here)")
    meta = {**store.get_stream_meta(stream), **(meta_update or {})}
    sources = dict(meta.get("sources", {}))
    skip = int(sources.get(source, 0)) if source else 0
    skip = min(skip, toks.numel())
    if cfg.uio is not None:
        return ingest_uio(model, store, stream, toks, source=source, meta=meta, sources=sources, skip=skip,
                          tok=tok, progress=progress, retrieval=rc)
    new = toks[skip:]
    tail = torch.as_tensor(meta.get("tail", []), dtype=torch.long)
    t0 = time.perf_counter()
    mem = make_memory(cfg, store, stream=stream, retrieval=rc, persist=True)
    mem.resume_from_store()
    # starts at a block boundary
    seq = LandmarkedStream(tail, new, cfg.block_len, tok.landmark_id if cfg.landmarks else None)
    bar = _progress(new.numel(), f"ingest {stream}", progress)
    done_pos = 0
    chunks = since_flush = 0
    last_flush = time.perf_counter()
    # chunks are aligned to multiples of chunk_len in stream positions, so a run resumed
    # from a flush (always at a chunk end) processes exactly the chunks an uninterrupted run would
    start_pos = mem.n_pos
    chunk_len = rc.chunk_for(cfg)
    first = chunk_len - start_pos % chunk_len
    bounds = [0] + list(range(first, seq.numel(), chunk_len)) + [seq.numel()]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        chunk = seq.slice(a, b)
        model(chunk[None].to(model.tok_emb.weight.device), memory=mem)
        mem.end_chunk()
        done_pos = a + chunk.numel()
        chunks += 1
        if bar is not None:
            ord_done = seq.ordinary_before(done_pos) - tail.numel()
            bar.n = max(0, min(new.numel(), ord_done))
            moved = store.stats().get("bytes_moved", {})
            bar.set_postfix_str(
                f"blocks={len(store)} pulled {mem.stats.bytes_fetched / 2**20:.0f}MiB "
                f"(from host {moved.get('host_to_device', 0) / 2**20:.0f}MiB, "
                f"disk {moved.get('disk_to_device', 0) / 2**20:.0f}MiB)")
            bar.refresh()
        since_flush += 1
        if (done_pos == seq.numel() or time.perf_counter() - last_flush >= flush_interval_s
                or (flush_every is not None and since_flush >= flush_every)):
            _commit(store, stream, meta, sources, source, seq, done_pos, cfg, skip, tail.numel())
            last_flush, since_flush = time.perf_counter(), 0
        elif chunks % _TRIM_EVERY == 0:
            trim_heap()
    if seq.numel() == 0:
        _commit(store, stream, meta, sources, source, seq, 0, cfg, skip, tail.numel())
    if bar is not None:
        bar.close()
    return IngestResult(stream=stream, tokens=new.numel(), skipped=skip, blocks_put=mem.stats.blocks_put,
                        seconds=time.perf_counter() - t0, bytes_fetched=mem.stats.bytes_fetched, stats=mem.stats)




def _commit(store, stream, meta, sources, source, seq, done_pos, cfg, skip, n_tail_old):
    """Record the unfinished block's tokens and source progress, then flush."""
    L = cfg.block_len
    complete = (done_pos // L) * L
    tail = seq[complete:done_pos].tolist()  # ordinary tokens of the unfinished block
    ord_done = seq.ordinary_before(done_pos)  # ordinary tokens processed (old tail included)
    if source:
        sources[source] = skip + max(0, ord_done - n_tail_old)
    new_meta = {**meta, "tail": tail, "sources": sources,
                "positions": int(store.stream_blocks(stream).shape[0]) * L + len(tail)}
    store.set_stream_meta(stream, new_meta)
    store.flush()
    trim_heap()


@dataclass(kw_only=True, slots=True)
class GenerateConfig:
    """Decoding settings."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"GenerateConfig.max_new_tokens={self.max_new_tokens!r}: must be an int >= 0")
        if not self.temperature >= 0:
            raise ValueError(f"GenerateConfig.temperature={self.temperature!r}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerateConfig.top_p={self.top_p!r}: must be in (0, 1]")


def _sample(logits: torch.Tensor, gc: GenerateConfig, gen: torch.Generator, banned: torch.Tensor) -> int:
    logits = logits.float()
    logits[banned] = float("-inf")  # landmarks are inserted, not sampled (and the byte model's specials)
    if gc.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / gc.temperature, -1)
    if gc.top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < gc.top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model: LandmarkTransformer, store, prompt: Sequence[int] | torch.Tensor, *,
             streams: Sequence[str] | None = None, retrieval: AnyRetrievalConfig | None = None,
             gen: GenerateConfig | None = None, continue_stream: bool = True,
             on_text: Callable[[str], None] | None = None, tokenizer: Tokenizer | None = None) -> Iterator[int]:
    """Decode after `prompt` (ordinary tokens), retrieving from `streams` at every step.

    streams: None = every stream in the store. With exactly one stream and
    continue_stream, the prompt continues that stream: its unfinished tail is placed before
    the prompt (and, for a model without landmarks, its last blocks are the local window and
    its first the attention sinks), so a question continues its document. Nothing is written
    to the store. Decoding stops at `gen.stop` strings and at the tokenizer's end-of-sequence
    token (not for the byte tokenizer, which never samples it).
    Yields token ids; `on_text` receives decoded text as it is produced (streaming).
    """
    gc = gen or GenerateConfig()
    cfg = model.cfg
    tok = tokenizer or TOKENIZER
    L = cfg.block_len
    dev = model.tok_emb.weight.device
    prompt = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    if cfg.uio is not None:
        yield from generate_uio(model, store, prompt, streams=streams, gc=gc, on_text=on_text, tok=tok,
                                continue_stream=continue_stream,
                                retrieval=retrieval_for(cfg, retrieval) if cfg.landmarks else None)
        return
    rc = retrieval_for(cfg, retrieval)
    if cfg.folded_window:  # its state is one stream's: that stream (or the store's only one)
        streams, one = _folded_stream(store, streams, continue_stream)
    else:
        one = streams is not None and len(streams) == 1 and continue_stream
    tail = store.get_stream_meta(streams[0]).get("tail", []) if one else []
    mem = make_memory(cfg, store, stream=None, retrieval=rc, persist=False, read_streams=streams)
    seq = torch.cat([torch.as_tensor(tail, dtype=torch.long), prompt])
    if one and (cfg.folded_window or not cfg.landmarks):
        mem.resume_from_store(streams[0])
    if cfg.landmarks:
        seq = insert_landmarks(seq, L, tok.landmark_id)
    if seq.numel() == 0:
        seq = torch.tensor([tok.bos_id if tok.bos_id is not None else 0])
    logits = None
    chunk_len = rc.chunk_for(cfg)
    scoring = getattr(mem, "wants_scoring_pass", False)  # training-free question_selection='shared'
    for a in range(0, seq.numel(), chunk_len):
        chunk = seq[None, a:a + chunk_len].to(dev)
        if scoring:  # pick the blocks every layer shares, then run the chunk on them
            mem.begin_scoring()
            model(chunk, memory=mem)
            mem.finish_scoring()
        logits = model(chunk, memory=mem)
        mem.end_chunk()
    yield from _decode(model, mem, logits, gc, tok, on_text)


def _decode(model, mem, logits, gc: GenerateConfig, tok: Tokenizer, on_text) -> Iterator[int]:
    """Sample after `logits` (of the prompt's last position) one token per forward through `mem`."""
    cfg, L, dev = model.cfg, model.cfg.block_len, model.tok_emb.weight.device
    rng = torch.Generator().manual_seed(gc.seed)
    banned = torch.tensor(tok.never_sampled(), dtype=torch.long)
    eos = None if isinstance(tok, ByteTokenizer) else tok.eos_id
    decoder = tok.stream_decoder()
    decoded = ""
    for _ in range(gc.max_new_tokens):
        t = _sample(logits[0, -1], gc, rng, banned)
        if t == eos:
            return
        yield t
        piece = decoder.push(t)
        decoded += piece
        if piece and on_text is not None:
            on_text(piece)
        if any(s and s in decoded for s in gc.stop):
            return
        step = [t]
        if cfg.landmarks and (mem.n_pos + 1) % L == L - 1:  # the next slot is a landmark: insert it
            step.append(tok.landmark_id)
        logits = model(torch.tensor([step], device=dev), memory=mem)
        mem.end_chunk()


def _folded_stream(store, streams: Sequence[str] | None, continue_stream: bool,
                   what: str = "a folded-context model") -> tuple[list[str] | None, bool]:
    """The stream a folded-context (or UIO) model continues: its state is one stream's, so it
    reads exactly one (None = the store's only stream; a store of none starts fresh)."""
    if streams is None:
        streams = store.streams()
        if len(streams) > 1:
            raise ValueError(f"{what} continues one stream; the store holds {len(streams)} "
                             f"({', '.join(sorted(streams)[:5])}{', ...' if len(streams) > 5 else ''}): name one")
    elif len(streams) > 1:
        raise ValueError(f"{what} continues one stream, got {len(streams)}: {list(streams)}")
    return list(streams), bool(streams) and continue_stream


CHAT_META = "chat"  # stream metadata: the stream is the user's text of one chat turn


def chat_document(tokenizer: Tokenizer, text: str) -> list[int]:
    """A document as the start of a user turn of the tokenizer's chat template (a question
    asked later closes the turn; see `ask`); the plain tokens without a template."""
    parts = tokenizer.chat_parts()
    if parts is None:
        return tokenizer.encode(text)
    return tokenizer.encode(parts[0], specials=True) + tokenizer.encode(text)


def continues_chat_turn(store, streams: Sequence[str] | None) -> bool:
    """Whether a question about `streams` closes the user turn the one stream's document opened
    (ingested with `chat_document`, recorded under CHAT_META)."""
    return bool(streams is not None and len(streams) == 1 and store.get_stream_meta(streams[0]).get(CHAT_META))


def question_tokens(tokenizer: Tokenizer, question: str, *, chat: bool, continues_turn: bool) -> list[int]:
    """The prompt for a question: the rest of the user's turn after a document ingested with
    `chat_document` (continues_turn), one whole user turn, or the raw text (chat=False or no
    chat template)."""
    parts = tokenizer.chat_parts() if chat else None
    if parts is None:
        return tokenizer.encode(question)
    if continues_turn:
        return tokenizer.encode("\n\n" + question) + tokenizer.encode(parts[1], specials=True)
    return tokenizer.encode(parts[0], specials=True) + tokenizer.encode(question) + tokenizer.encode(parts[1], specials=True)


def ask(model: LandmarkTransformer, store, question: str, *, streams: Sequence[str] | None = None,
        retrieval: AnyRetrievalConfig | None = None, gen: GenerateConfig | None = None,
        on_text: Callable[[str], None] | None = None, tokenizer: Tokenizer | None = None,
        chat: bool = True) -> str:
    """Answer `question` from what the store holds; returns the decoded answer.

    chat: when the tokenizer has a chat template, the question is asked in it: it closes the
    user turn a stream ingested with `chat_document` opened (one stream), or is a user turn
    of its own. False sends the raw text."""
    tok = tokenizer or TOKENIZER
    prompt = question_tokens(tok, question, chat=chat, continues_turn=continues_chat_turn(store, streams))
    ids = list(generate(model, store, prompt,
                        streams=streams, retrieval=retrieval, gen=gen, on_text=on_text, tokenizer=tok))
    text = tok.decode(ids)
    for s in (gen.stop if gen else ()):
        if s and s in text:
            text = text[:text.index(s)]
    return text
