"""Retrieval in training: each lane's document keeps its earlier windows in the block store.

`StoreWindowMemory` implements the `train.windows.WindowMemory` hooks with the engine's
one retrieval attention (`engine.retrieval.RetrievalMemory`, the same code ingest and
ask use):
- a document starts: it gets a stream `doc<draw>` in this process's store;
- before each step: every lane's queries retrieve, per layer and KV head, the top-k
  blocks of that document's EARLIER windows and attend over [retrieved + window] with
  the grouped softmax (the first window of a document sees only itself);
- after the step: the window's completed blocks (K before RoPE, V, landmark keys;
  detached, so gradients stay inside the window) are put under the stream;
- the document ends: its stream is deleted;
- a checkpoint: the store is flushed, so a resumed run retrieves exactly what an
  uninterrupted one would.
Only the selected blocks are moved to the device; `pulled_bytes()` says how many bytes
came from each tier since the last call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.inference import open_store, store_layout_for
from engine.retrieval import RetrievalConfig, RetrievalMemory
from engine.retrieval_lanes import BatchMemory, end_chunks
from train.windows import DocumentState, WindowMemory, unpack_targets


class StoreWindowMemory(WindowMemory):
    """Per-document store streams + retrieval attention for the training loop."""

    def __init__(self, cfg: ModelConfig, store_dir: str | os.PathLike, *, top_k: int = 4, sink_blocks: int = 0,
                 window: int = 512, store_config=None, fresh: bool = True, kernel: str = "auto",
                 device_budget_bytes: int = 256 << 20, host_budget_bytes: int = 1 << 30):
        from memory_store import StoreConfig

        self.cfg = cfg
        # 'auto': vectorized, the training window's kernel
        self.rc = RetrievalConfig(top_k=top_k, sink_blocks=sink_blocks, local_blocks=0, chunk_len=window,
                                  kernel="vectorized" if kernel == "auto" else kernel)
        # no fsync on the hot path: durability is asked for at checkpoints only. Write-back: a
        # document's stream lives a few steps and is deleted when it ends, so its blocks stay in
        # the write queue and are mostly never written; a checkpoint's flush writes what is alive.
        # The queue holds at least 8 lane-windows (64 MiB for the tiny model; a large model's
        # window of blocks can be bigger than that alone, and a put bigger than the queue would
        # wait for it to drain every step).
        lane_window = window // cfg.block_len * cfg.n_layers * store_layout_for(cfg).block_bytes()
        sc = store_config or StoreConfig(device_budget_bytes=device_budget_bytes, host_budget_bytes=host_budget_bytes,
                                         lazy_writes=True, write_queue_bytes=max(64 << 20, 8 * lane_window))
        Path(store_dir).parent.mkdir(parents=True, exist_ok=True)
        self.store = open_store(str(store_dir), cfg, "w" if fresh else "a", config=sc)
        self._fetched = 0
        self._moved: dict[str, int] = self.store.bytes_moved()

    def begin_document(self, state: DocumentState) -> None:
        mem = RetrievalMemory(self.cfg, self.store, stream=state.stream, retrieval=self.rc, persist=True)
        if state.window > 0:  # resumed mid-document: its earlier windows are in the (flushed) store
            mem.resume_from_store()
        state.memory = mem

    def for_step(self, states: list[DocumentState]) -> Any:
        return BatchMemory([s.memory for s in states])

    def after_windows(self, states: list[DocumentState], windows: list[int]) -> None:
        end_chunks([s.memory for s in states])  # every lane's window in one store put (end_chunk for one lane)

    def end_document(self, state: DocumentState) -> None:
        if state.memory is not None:
            self._fetched += state.memory.stats.take_fetched()
        self.store.delete_stream(state.stream)
        state.memory = None

    def checkpoint(self) -> None:
        self.store.flush()

    def close(self) -> None:
        self.store.close()

    def pulled_bytes(self, states: list[DocumentState] | None = None) -> dict[str, int]:
        """Bytes of K/V moved to the device since the last call, by the tier they came from."""
        moved = self.store.bytes_moved()  # every step: not stats(), which sorts get latencies
        d = {k: int(moved.get(k, 0)) - int(self._moved.get(k, 0)) for k in moved}
        self._moved = moved
        fetched = self._fetched + sum(s.memory.stats.take_fetched() for s in (states or [])
                                      if s.memory is not None)
        self._fetched = 0
        host, disk = d.get("host_to_device", 0), d.get("disk_to_device", 0)
        return {"device": max(0, fetched - host - disk), "host": host, "disk": disk}


def queries_before_answer(targets: torch.Tensor) -> torch.Tensor | None:
    """(B, T) packed targets (`train.windows.pack_targets`) -> (B, T) bool: the queries before
    each row's first answer token (a target weighted > 1), whose input holds none of the
    answer. The query predicting the first answer token is kept; the ones reading it and
    everything after are not. None when no target is weighted (every query selects)."""
    _, weights = unpack_targets(targets)
    if weights is None:
        return None
    answer = (weights > 1).to(torch.int32)  # target t = input t+1
    seen = torch.cumsum(answer, dim=1)  # answers among targets 0..t
    keep = torch.ones_like(answer, dtype=torch.bool)
    keep[:, 1:] = seen[:, :-1] == 0  # input t is (or follows) an answer token iff a target before t was one
    return keep


def set_query_keep(memory: Any, targets: torch.Tensor) -> None:
    """`TrainConfig.selection_before_answer`: this step's lanes select blocks with their queries
    before the answer only (`RetrievalMemory.query_keep`). memory: what `for_step` returned (a
    `BatchMemory` of the lanes' retrieval memories; anything else is left alone)."""
    if not isinstance(memory, BatchMemory):
        return
    keep = queries_before_answer(targets.cpu())
    for b, m in enumerate(memory.memories):
        m.query_keep = None if keep is None else keep[b]


MAX_TOKEN_ROWS = 32
"""`answer_rows` keeps at most this many rows per lane (the first): each costs an attention call per layer."""


def answer_rows(targets: torch.Tensor) -> list[torch.Tensor | None]:
    """(B, T) packed targets -> per row, the positions (int64, ascending) whose input is an
    answer token and whose target is one too: the queries that, at inference, are decode
    steps writing the answer's second token on (`TrainConfig.answer_token_selection`). At most
    `MAX_TOKEN_ROWS` per row; None for a row without any (or unweighted targets)."""
    _, weights = unpack_targets(targets)
    if weights is None:
        return [None] * targets.shape[0]
    answer = weights > 1  # target t is an answer token
    reads = torch.zeros_like(answer)
    reads[:, 1:] = answer[:, :-1]  # input t (= target t-1) is an answer token
    out = []
    for row in (answer & reads):
        idx = row.nonzero()[:, 0][:MAX_TOKEN_ROWS]
        out.append(idx if idx.numel() else None)
    return out


def set_token_rows(memory: Any, targets: torch.Tensor) -> None:
    """`TrainConfig.answer_token_selection`: this step's lanes recompute their answer queries'
    rows with each query's own block selection (`RetrievalMemory.token_rows`). memory: what
    `for_step` returned; anything but a `BatchMemory` is left alone."""
    if not isinstance(memory, BatchMemory):
        return
    for m, rows in zip(memory.memories, answer_rows(targets.cpu())):
        m.token_rows = rows
