"""Child-process bodies for test_faults.py (run by memory_store.testing.CrashRunner: importable by name)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from _store_helpers import LAYOUT

from memory_store import StoreConfig, TieredStore
from memory_store.testing.workload import block_data

NOBODY = 65534


def _outcome(fn: Callable[[], object]) -> dict:
    """What calling fn did: {"ok": value} or the error's class names (MRO) and message."""
    try:
        return {"ok": fn()}
    except Exception as e:  # reported to the parent, which asserts on the class and message
        return {"error": [c.__name__ for c in type(e).__mro__], "message": str(e)}


def as_nobody(path: str, n_blocks: int, *, ack: Callable[[object], None]) -> None:
    """Drop to uid/gid nobody, then try what a user without write permission tries; ack each outcome."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    cfg = StoreConfig(device="cpu", device_budget_bytes=0, host_budget_bytes=0)

    def read_all() -> int:
        with TieredStore.open(path, "r", config=cfg) as s:
            ids = list(range(n_blocks))
            k, v, _ = block_data(LAYOUT, ids)
            for layer in range(LAYOUT.n_layers):
                gk, gv = s.get_layer(ids, layer)
                if not (torch.equal(gk, k[:, layer]) and torch.equal(gv, v[:, layer])):
                    raise AssertionError(f"layer {layer} differs")
            return len(s)

    ack({"write": _outcome(lambda: TieredStore.open(path, "a", config=cfg).close())})
    ack({"read": _outcome(read_all)})
