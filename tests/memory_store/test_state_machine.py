"""Hypothesis state machine: random put/get/delete/flush/reopen against a plain dict oracle.

The oracle never uses store code: it is a dict id -> (stream, ordinal, k, v, landmarks) of
what was put, plus per-stream id lists. Budgets and tier exclusivity are checked after every step.
"""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
import numpy as np
import torch
from _store_helpers import LAYOUT, make_blocks
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memory_store import StoreConfig, TieredStore
from memory_store.errors import UnknownBlockError

EB = LAYOUT.block_bytes()
STREAMS = st.sampled_from(["a", "b", "c"])


class StoreMachine(RuleBasedStateMachine):
    @initialize(device_entries=st.integers(0, 4), host_entries=st.integers(0, 6), write_behind=st.booleans())
    def open_store(self, device_entries, host_entries, write_behind):
        self.dir = tempfile.mkdtemp(prefix="folio-sm-")
        self.config = StoreConfig(device_budget_bytes=device_entries * EB, host_budget_bytes=host_entries * EB,
                                  write_behind=write_behind, sync_mode="none", write_queue_bytes=4 * EB * 4)
        self.store = TieredStore.open(self.dir, "w", layout=LAYOUT, config=self.config)
        self.blocks: dict[int, tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.stream_ids: dict[str, list[int]] = {}
        self.next_id = 0
        self.seed = 0

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(stream=STREAMS, n=st.integers(1, 3))
    def put(self, stream, n):
        self.seed += 1
        k, v, lm = make_blocks(n, seed=self.seed)
        ids = self.store.put_blocks(stream, k, v, lm)
        assert ids.tolist() == list(range(self.next_id, self.next_id + n))
        start = len(self.stream_ids.setdefault(stream, []))
        for i, bid in enumerate(ids.tolist()):
            self.blocks[bid] = (stream, start + i, k[i], v[i], lm[i])
            self.stream_ids[stream].append(bid)
        self.next_id += n

    @precondition(lambda self: self.blocks)
    @rule(data=st.data(), layer=st.integers(0, LAYOUT.n_layers - 1))
    def get_layer(self, data, layer):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.blocks)), min_size=1, max_size=6))
        k, v = self.store.get_layer(ids, layer)
        assert torch.equal(k, torch.stack([self.blocks[i][2][layer] for i in ids]))
        assert torch.equal(v, torch.stack([self.blocks[i][3][layer] for i in ids]))
        names, ords = self.store.block_meta(ids)
        assert names == [self.blocks[i][0] for i in ids] and ords.tolist() == [self.blocks[i][1] for i in ids]

    @rule(bid=st.integers(0, 30))
    def get_whole_block(self, bid):
        b = self.store.get(bid)
        if bid not in self.blocks:
            assert b is None
            return
        stream, ordinal, k, v, lm = self.blocks[bid]
        assert (b.stream, b.ordinal) == (stream, ordinal)
        assert torch.equal(b.k, k) and torch.equal(b.v, v) and torch.equal(b.landmarks, lm)

    @rule(bid=st.integers(30, 40))
    def unknown_id(self, bid):
        try:
            self.store.get_layer([bid], 0)
        except UnknownBlockError:
            return
        raise AssertionError("unknown id was served")

    @rule(stream=STREAMS)
    def delete(self, stream):
        ids = self.stream_ids.pop(stream, [])
        assert self.store.delete_stream(stream) == len(ids)
        for bid in ids:
            del self.blocks[bid]

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def prefetch(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.blocks)), min_size=1, max_size=4))
        self.store.prefetch(ids)

    @rule()
    def flush(self):
        self.store.flush()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = TieredStore.open(self.dir, "a", layout=LAYOUT, config=self.config)

    @invariant()
    def budgets_and_contents(self):
        if not hasattr(self, "store"):
            return
        dev, host = self.store.tiers[0], self.store.tiers[1]
        for tier in (dev, host):
            assert tier.nbytes <= tier.budget_bytes and tier.allocated_bytes <= tier.budget_bytes
        assert not set(dev.keys()) & set(host.keys())
        assert len(self.store) == len(self.blocks)
        assert sorted(self.store.streams()) == sorted(s for s, ids in self.stream_ids.items() if ids)
        for s, ids in self.stream_ids.items():
            assert self.store.stream_blocks(s).tolist() == ids
        assert len(self.store.index) == len(self.blocks)
        if self.blocks:
            q = torch.stack([self.blocks[i][4][0].float() for i in sorted(self.blocks)[:2]])  # (Q, H, D)
            ids, _ = self.store.index.search(0, q, k=1)
            assert set(np.asarray(ids).flatten().tolist()) <= set(self.blocks)


StoreMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStoreMachine = StoreMachine.TestCase
