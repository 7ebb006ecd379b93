"""A zygote process for the crash and concurrency tests (and scripts/store_stress.py).

Importing torch costs ~2 s per process, so one zygote imports everything once and forks a
cheap child per writer or reader. Commands on stdin, one per line:

    writer PATH BATCH_MAX      fork a writer: appends blocks whose contents derive from their ids, flushes,
                               prints "ACK <pid> <n_rows>" after each flush returned; runs until killed
    reader PATH ROUNDS         fork a reader: ROUNDS times opens PATH read-only, checks every visible block
                               bit-exact, prints "READ <pid> <n_rows>" (or "ERR <pid> <message>"), then "END <pid>"
    reap PID                   waitpid(PID); prints "REAPED <pid> <status>"
    quit

Every fork prints "PID <pid>" first. No thread is started in the zygote itself, so forking is safe.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _store_helpers import LAYOUT, make_blocks  # noqa: E402

from memory_store import StoreConfig, TieredStore  # noqa: E402

STREAMS = ("alpha", "beta")


def block_data(block_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The content of block `block_id`: a pure function of the id, so any process can check it."""
    k, v, lm = make_blocks(1, seed=1000 + block_id)
    return k[0], v[0], lm[0]


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def writer(path: str, batch_max: int) -> None:
    cfg = StoreConfig(device_budget_bytes=4 * LAYOUT.block_bytes(), host_budget_bytes=4 * LAYOUT.block_bytes(),
                      save_index="never")
    store = TieredStore.open(path, "a", layout=LAYOUT, config=cfg)
    rng = torch.Generator().manual_seed(os.getpid())
    pid = os.getpid()
    while True:
        n = int(torch.randint(1, batch_max + 1, (1,), generator=rng))
        start = len(store)  # ids are dense here: this writer never deletes
        parts = [block_data(start + i) for i in range(n)]
        stream = STREAMS[start % 2]
        store.put_blocks(stream, *(torch.stack(p) for p in zip(*parts)))
        store.set_stream_meta(stream, {"n_rows_after": start + n})
        store.flush()
        say(f"ACK {pid} {start + n}")


def check(path: str) -> int:
    """Open read-only and verify everything visible; returns the committed row count."""
    with TieredStore.open(path, "r", config=StoreConfig(device_budget_bytes=0, host_budget_bytes=0)) as s:
        n = len(s)
        if n:
            ids = list(range(n))
            want = [block_data(i) for i in ids]
            for layer in range(LAYOUT.n_layers):
                k, v = s.get_layer(ids, layer)
                assert torch.equal(k, torch.stack([w[0][layer] for w in want])), f"K mismatch at layer {layer}"
                assert torch.equal(v, torch.stack([w[1][layer] for w in want])), f"V mismatch at layer {layer}"
            assert len(s.index) == n, f"index has {len(s.index)} keys for {n} blocks"
            lm_ids, _ = s.index.search(0, torch.stack([w[2][0].float() for w in want[-2:]]), k=1)
            assert set(lm_ids.flatten().tolist()) <= set(ids)
            assert sum(len(s.stream_blocks(x)) for x in STREAMS) == n
            metas = [s.get_stream_meta(x).get("n_rows_after", 0) for x in STREAMS]
            assert max(metas) == n, f"stream meta says {metas} but {n} blocks are committed"
        return n


def reader(path: str, rounds: int) -> None:
    pid = os.getpid()
    for _ in range(rounds):
        try:
            say(f"READ {pid} {check(path)}")
        except Exception as e:  # report any failure to the test, which fails on it
            say(f"ERR {pid} {e!r} {traceback.format_exc().replace(chr(10), ' | ')}")
    say(f"END {pid}")


def main() -> None:
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "quit":
            return
        if cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            say(f"REAPED {args[0]} {status}")
            continue
        pid = os.fork()
        if pid:
            say(f"PID {pid}")
            continue
        code = 0
        try:
            if cmd == "writer":
                writer(args[0], int(args[1]))
            elif cmd == "reader":
                reader(args[0], int(args[1]))
        except BaseException:  # the child must never return into the zygote loop
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            os._exit(code)


if __name__ == "__main__":
    main()
