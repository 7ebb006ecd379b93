"""UIO memories at inference: ingest stores each window's memory, ask/generate attend to them,
and a landmark model composes them with landmark retrieval in one attention layer.

A UIO model's stream holds memories, not token blocks: every complete window of the model's
max_seq_len positions is encoded (engine/uio.py `encode`) and its memory K/V (through the
transfer head) stored as m / block_len blocks per layer; the unfinished window's ordinary tokens
stay in the stream's metadata (UIO_TAIL).

A model with landmarks also keeps its token blocks, for retrieval, in a companion stream
(`blocks_stream(name)`, marked BLOCKS_OF in its metadata): ingest runs the decoder over every
window with the memories of the windows before it and landmark retrieval of the earlier blocks,
so the stored blocks are the ones that composed attention produces. A question is then one
grouped softmax over [retrieved blocks, local window] with the memory tokens in group 0
(engine/sources.py): local window + landmark retrieval + UIO memories together. `--top-k 0` is
the memories alone; a stream ingested without blocks (a causal model, or an older store) answers
with the memories alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

from engine.landmarks import insert_landmarks
from engine.model import LandmarkTransformer
from engine.retrieval import RetrievalConfig, RetrievalMemory
from engine.sources import KeyGroup
from engine.tokenizer import Tokenizer

UIO_META, UIO_TAIL = "uio", "uio_tail"  # stream metadata of a UIO stream: its flag, the unfinished window
BLOCKS_OF = "uio_blocks_of"  # stream metadata of a companion stream: the UIO stream whose token blocks it holds

KV = list  # per layer (k, v), (1, Hkv, M, D) pre-RoPE; M may be 0


def blocks_stream(stream: str) -> str:
    """The companion stream holding a landmark UIO stream's token blocks."""
    return f"{stream}.blocks"


def is_companion(store, stream: str) -> bool:
    return bool(store.get_stream_meta(stream).get(BLOCKS_OF))


class StoredMemoryTokens:
    """UIO memory keys and values as a key source of another memory (a `RetrievalMemory`): group 0
    (every query sees them), at RoPE positions first - M .. first - 1 just before the local
    window's first position, as `UIOMemory` places them before its window. At most max_memories
    (the newest) are attended."""

    def __init__(self, cfg, kv: KV, max_memories: int):
        self.cfg, self.cap = cfg, max_memories
        self.first_position: Callable[[], int] = lambda: 0
        self.set(kv)

    def set(self, kv: KV) -> None:
        self.kv = [(k[:, :, -self.cap:], v[:, :, -self.cap:]) for k, v in kv]

    @property
    def n_slots(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0

    def keys(self, layer: int, q: torch.Tensor, q_local: torch.Tensor) -> KeyGroup | None:
        if not self.kv or not self.kv[layer][0].shape[2]:
            return None
        from engine.uio import memory_key_group

        return memory_key_group(*self.kv[layer], self.first_position(), self.cfg.rope, torch.float32)


def composed_memory(model: LandmarkTransformer, store, kv: KV, rc: RetrievalConfig, *, stream: str | None,
                    persist: bool, read_streams) -> RetrievalMemory:
    """Landmark retrieval over `read_streams` with the UIO memory tokens `kv` in every layer's
    group 0; the memory tokens are `mem.sources[1]` (`set` them as windows complete)."""
    from engine.uio import _modules

    cfg = model.cfg
    tokens = StoredMemoryTokens(cfg, kv, _modules(model).uio.max_memories)
    mem = RetrievalMemory(cfg, store, stream=stream, retrieval=rc, persist=persist, read_streams=read_streams,
                          sources=[tokens])
    tokens.first_position = lambda: int(mem.local_positions(rc.slots * cfg.block_len, 1, 0)[0])
    return mem


def append_kv(kv: KV, new: KV, cap: int) -> KV:
    """Memory K/V with a window's new ones after them, the newest `cap` kept."""
    return [(torch.cat([k, nk], 2)[:, :, -cap:], torch.cat([v, nv], 2)[:, :, -cap:])
            for (k, v), (nk, nv) in zip(kv, new)]


def compose_window(model: LandmarkTransformer, mem: RetrievalMemory, kv: KV, w: torch.Tensor, chunk: int,
                   cap: int) -> tuple[KV, KV, int]:
    """One window (1, T) through a `composed_memory` as ingest runs it: decoded in chunks with the
    memories `kv` of the windows before it (its blocks go to the memory's stream when it
    persists), then encoded. Returns (the window's memory K/V, kv with them appended and capped,
    blocks put)."""
    from engine.uio import encode, memory_kv

    mem.sources[1].set(kv)
    put = 0
    for a in range(0, w.shape[1], chunk):
        model(w[:, a:a + chunk], memory=mem)
        put += mem.end_chunk()
    new = memory_kv(model, encode(model, w))
    return new, append_kv(kv, new, cap), put


@torch.no_grad()
def ingest_uio(model: LandmarkTransformer, store, stream: str, toks: torch.Tensor, *, source: str | None,
               meta: dict, sources: dict, skip: int, tok: Tokenizer, progress: bool,
               retrieval: RetrievalConfig | None = None):
    """`engine.inference.ingest` for a UIO model (see the module docstring): the memory of every
    complete window into `stream`; for a landmark model also the window's token blocks, decoded
    with the earlier memories and retrieval, into `blocks_stream(stream)`. One commit at the end."""
    from engine.inference import IngestResult, _progress
    from engine.uio import _modules, encode, put_memory, stored_memory_kv

    cfg = model.cfg
    T = cfg.max_seq_len
    t0 = time.perf_counter()
    tail = torch.as_tensor(meta.get(UIO_TAIL, []), dtype=torch.long)
    new = toks[skip:].to(torch.long)
    seq = torch.cat([tail, new])
    if cfg.landmarks:
        per = T - T // cfg.block_len  # ordinary tokens per window of T positions
        windows = [insert_landmarks(seq[a:a + per], cfg.block_len, tok.landmark_id)
                   for a in range(0, seq.numel() - per + 1, per)]
    else:
        per = T
        windows = [seq[a:a + T] for a in range(0, seq.numel() - T + 1, T)]
    bar = _progress(len(windows) * per, f"ingest {stream} (UIO)", progress)
    dev = model.tok_emb.weight.device
    mem = None
    if cfg.landmarks:
        rc = retrieval or RetrievalConfig()
        bstream = blocks_stream(stream)
        cap = _modules(model).uio.max_memories
        kv = stored_memory_kv(store, stream, model)
        mem = composed_memory(model, store, kv, rc, stream=bstream, persist=True, read_streams=[bstream])
        mem.resume_from_store()
        chunk = rc.chunk_for(cfg)
    put = 0
    for w in windows:
        w = w[None].to(dev)
        if mem is not None:  # the window's token blocks, decoded with the memories before it
            mkv, kv, n = compose_window(model, mem, kv, w, chunk, cap)
            put += n + put_memory(store, stream, model, kv=mkv)
        else:
            put += put_memory(store, stream, model, encode(model, w))
        if bar is not None:
            bar.update(per)
    if bar is not None:
        bar.close()
    if source:
        sources[source] = skip + new.numel()
    store.set_stream_meta(stream, {**meta, UIO_META: True, UIO_TAIL: seq[len(windows) * per:].tolist(),
                                   "sources": sources})
    if mem is not None and blocks_stream(stream) in store.streams():
        store.set_stream_meta(blocks_stream(stream), {BLOCKS_OF: stream, "tail": []})
    store.flush()
    return IngestResult(stream=stream, tokens=new.numel(), skipped=skip, blocks_put=put,
                        seconds=time.perf_counter() - t0, bytes_fetched=0 if mem is None else mem.stats.bytes_fetched,
                        stats=None if mem is None else mem.stats)


def uio_stream(store, streams: Sequence[str] | None, continue_stream: bool) -> tuple[list[str] | None, bool]:
    """The one UIO stream a question continues (companion streams are not candidates)."""
    from engine.inference import _folded_stream

    if streams is None:
        streams = [s for s in store.streams() if not is_companion(store, s)]
    return _folded_stream(store, streams, continue_stream, what="a UIO model")


def generate_uio(model: LandmarkTransformer, store, prompt: torch.Tensor, *, streams, gc, on_text, tok,
                 continue_stream: bool, retrieval: RetrievalConfig | None = None) -> Iterator[int]:
    """A UIO model: the prompt (after the stream's unfinished window) is a window that attends to
    every stored memory of the one stream (`ingest_uio`); a landmark model with retrieval (top_k
    > 0) whose stream has token blocks also retrieves from them (`composed_memory`); then decoding
    continues."""
    from engine.inference import _decode
    from engine.uio import UIOMemory, stored_memory_kv

    cfg = model.cfg
    streams, one = uio_stream(store, streams, continue_stream)
    meta = store.get_stream_meta(streams[0]) if one else {}
    if one and not meta.get(UIO_META):
        raise ValueError(f"stream {streams[0]!r} holds no UIO memories (not ingested by a UIO model)")
    tail = meta.get(UIO_TAIL, [])
    kv = stored_memory_kv(store, streams[0], model) if one else None
    rc = retrieval or RetrievalConfig()
    compose = cfg.landmarks and rc.top_k > 0 and one and blocks_stream(streams[0]) in store.streams()
    if compose:
        mem = composed_memory(model, store, kv, rc, stream=None, persist=False,
                              read_streams=[blocks_stream(streams[0])])
    else:
        mem = UIOMemory(model, [], kv=kv, cache=True)
    seq = torch.cat([torch.as_tensor(tail, dtype=torch.long), prompt])
    if cfg.landmarks:
        seq = insert_landmarks(seq, cfg.block_len, tok.landmark_id)
    if seq.numel() == 0:
        seq = torch.tensor([tok.bos_id if tok.bos_id is not None else 0])
    dev = model.tok_emb.weight.device
    step = rc.chunk_for(cfg) if compose else seq.numel()
    logits = None
    for a in range(0, seq.numel(), step):
        logits = model(seq[None, a:a + step].to(dev), memory=mem)
        mem.end_chunk()
    yield from _decode(model, mem, logits, gc, tok, on_text)


__all__ = ["BLOCKS_OF", "UIO_META", "UIO_TAIL", "StoredMemoryTokens", "append_kv", "blocks_stream", "compose_window", "composed_memory",
           "generate_uio", "ingest_uio", "is_companion", "uio_stream"]
