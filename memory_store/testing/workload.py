"""A scripted store workload, and the plain-dict oracle of what each commit must show.

A script is data, a list of steps:

    ("put", stream, n)      put n blocks (contents a pure function of the block id: `block_data`)
    ("meta", stream, dict)  set_stream_meta
    ("delete", stream)      delete_stream
    ("flush",)              flush(); acknowledged (the `ack` callback) once it returned
    ("close",)              close(); acknowledged likewise

`run_script` plays it against a TieredStore. `Oracle` plays it against dicts, never calling the
store, and yields the StoreState of every commit the script makes: a flush (or close) commits
when anything changed since the last commit, as TieredStore.flush does. `check_state` compares
an open store with a StoreState, bit-exact, and raises AssertionError saying what differs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..layout import StoreLayout
from ..store import StoreConfig, TieredStore

__all__ = ["StoreState", "Oracle", "run_script", "check_state", "block_data", "Step"]

Step = tuple


def block_data(layout: StoreLayout, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v (N, L, H, T, D) and landmarks (N, L, H, D) of blocks `ids`, each from a generator seeded
    by its id (any process recomputes them)."""
    L, H, T, D = layout.n_layers, layout.n_kv_heads, layout.block_len, layout.head_dim
    ks, vs, lms = [], [], []
    for i in ids:
        g = torch.Generator().manual_seed(7919 + int(i))
        ks.append(torch.randn((L, H, T, D), generator=g))
        vs.append(torch.randn((L, H, T, D), generator=g))
        lms.append(torch.randn((L, H, D), generator=g))
    dt = layout.torch_dtype
    return (torch.stack(ks).to(dt), torch.stack(vs).to(dt), torch.stack(lms).to(dt))  # (N, L, H, T, D) x2, (N, L, H, D)


@dataclass(slots=True)
class StoreState:
    """What a commit holds: rows assigned so far, the live blocks, the live streams and their meta."""

    n_rows: int = 0
    blocks: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (stream, ordinal)
    streams: dict[str, dict] = field(default_factory=dict)  # live stream -> meta, in creation order
    n_blocks: dict[str, int] = field(default_factory=dict)  # live stream -> blocks ever put (next ordinal)

    def ids(self, stream: str | None = None) -> list[int]:
        """Live block ids (of one stream: in ordinal order)."""
        if stream is None:
            return sorted(self.blocks)
        return sorted((i for i, (s, _) in self.blocks.items() if s == stream), key=lambda i: self.blocks[i][1])


class Oracle:
    """The states a script commits, computed with dicts alone.

    `commits[0]` is `start` (the commit the store is at before the script); `commits[c]` is the
    state after the script's c-th commit. `acks[a]` is the commit index the a-th acknowledgement
    (flush or close returned) stands for."""

    def __init__(self, script: Sequence[Step], start: StoreState | None = None) -> None:
        state = copy.deepcopy(start) if start is not None else StoreState()
        self.commits: list[StoreState] = [copy.deepcopy(state)]
        self.acks: list[int] = []
        dirty = False
        for step in script:
            op = step[0]
            if op == "put":
                _, stream, n = step
                if stream not in state.streams:
                    state.streams[stream], state.n_blocks[stream] = {}, 0
                for j in range(n):
                    state.blocks[state.n_rows + j] = (stream, state.n_blocks[stream] + j)
                state.n_blocks[stream] += n
                state.n_rows += n
                dirty = dirty or n > 0
            elif op == "meta":
                _, stream, meta = step
                if stream not in state.streams:
                    state.n_blocks[stream] = 0
                state.streams[stream] = copy.deepcopy(meta)
                dirty = True
            elif op == "delete":
                stream = step[1]
                if stream in state.streams:
                    state.blocks = {i: b for i, b in state.blocks.items() if b[0] != stream}
                    del state.streams[stream], state.n_blocks[stream]
                    dirty = True
            elif op in ("flush", "close"):
                if dirty:
                    self.commits.append(copy.deepcopy(state))
                    dirty = False
                self.acks.append(len(self.commits) - 1)
            else:
                raise ValueError(f"script step {step!r}: expected put, meta, delete, flush or close")

    @property
    def final(self) -> StoreState:
        return self.commits[-1]


def run_script(path: str, script: Sequence[Step], layout: StoreLayout, config: StoreConfig,
               ack: Callable[[int], None] = lambda a: None) -> None:
    """Open the store at `path` for writing (created when missing) and play `script` against it;
    ack(a) after the a-th flush/close returned. The store is closed at the end (if no step did)."""
    store = TieredStore.open(path, "a", layout=layout, config=config)
    next_id = store.disk.read_commit().n_rows  # ids continue the committed rows (this is the only writer)
    acks = 0
    try:
        for step in script:
            op = step[0]
            if op == "put":
                _, stream, n = step
                got = store.put_blocks(stream, *block_data(layout, range(next_id, next_id + n)))
                if got.tolist() != list(range(next_id, next_id + n)):
                    raise AssertionError(f"put of {n} blocks got ids {got.tolist()}, expected {next_id}..")
                next_id += n
            elif op == "meta":
                store.set_stream_meta(step[1], step[2])
            elif op == "delete":
                store.delete_stream(step[1])
            elif op in ("flush", "close"):
                store.flush() if op == "flush" else store.close()
                ack(acks)
                acks += 1
    finally:
        store.close()


def check_state(store: TieredStore, state: StoreState, layout: StoreLayout, what: str = "") -> None:
    """Assert that `store` shows exactly `state`: the same live blocks (ids, streams, ordinals,
    K, V and landmark keys bit-exact), streams, stream meta, and nothing else."""
    where = f"{what}: " if what else ""
    ids = state.ids()
    assert store.streams() == list(state.streams), f"{where}streams {store.streams()} != expected {list(state.streams)}"
    assert len(store) == len(ids), f"{where}{len(store)} live blocks, expected {len(ids)}"
    for s, meta in state.streams.items():
        got = store.stream_blocks(s).tolist()
        assert got == state.ids(s), f"{where}stream {s!r} holds blocks {got}, expected {state.ids(s)}"
        assert store.get_stream_meta(s) == meta, f"{where}stream {s!r} meta {store.get_stream_meta(s)} != {meta}"
    dead = [i for i in range(state.n_rows + 4) if i not in state.blocks and store.contains(i)]
    assert not dead, f"{where}blocks {dead} are visible but were never committed live"
    if not ids:
        return
    names, ords = store.block_meta(ids)
    assert [(n, int(o)) for n, o in zip(names, ords)] == [state.blocks[i] for i in ids], f"{where}block meta differs"
    k, v, lm = block_data(layout, ids)
    for layer in range(layout.n_layers):
        gk, gv = store.get_layer(ids, layer, promote=False)
        bad = [i for j, i in enumerate(ids) if not (torch.equal(gk[j].cpu(), k[j, layer])
                                                     and torch.equal(gv[j].cpu(), v[j, layer]))]
        assert not bad, f"{where}blocks {bad} layer {layer}: K/V differ from what was put"
        keys = store.index.keys(layer, torch.tensor(ids, dtype=torch.int64)).cpu()  # (N, H, D)
        assert torch.equal(keys, lm[:, layer].float()), f"{where}landmark keys of layer {layer} differ"
    assert len(store.index) == len(ids), f"{where}index holds {len(store.index)} keys for {len(ids)} blocks"
    for s in state.streams:
        got = sorted(np.asarray(store.index.stream_ids(s)).tolist())
        assert got == sorted(state.ids(s)), f"{where}index: stream {s!r} holds {got}, expected {sorted(state.ids(s))}"
