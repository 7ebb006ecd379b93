"""The TieredStore's parts on their own: RowTable without tensors or disk, WriteBehind against a
recording DiskLog stand-in, StoreConfig's choice fields, LandmarkIndex.nbytes."""

from __future__ import annotations

import threading
import typing

import numpy as np
import pytest
import torch

from memory_store.commit import StreamRecord
from memory_store.config import StoreConfig
from memory_store.errors import CorruptBlockError, InvalidArgumentError, UnknownBlockError
from memory_store.index import LandmarkIndex
from memory_store.rows import RowTable, check_parts
from memory_store.stats import StoreStats
from memory_store.write_behind import WriteBehind


def test_row_table_plans_appends_and_deletes_without_tensors():
    rows = RowTable([StreamRecord("a", n_blocks=2), StreamRecord("gone", alive=False, n_blocks=1)],
                    np.array([0, 1, 0], np.int32), np.array([0, 0, 1], np.int64))
    assert rows.n_alive == 2 and rows.rows_of("a").tolist() == [0, 2] and rows.live_streams() == ["a"]
    with pytest.raises(UnknownBlockError):
        rows.check_ids([1])  # its stream was deleted
    parts = check_parts([("a", 2), ("b", 0), ("c", 1), ("a", 1)])
    codes, ords = rows.plan(parts)
    assert codes.tolist() == [0, 0, 2, 0] and ords.tolist() == [2, 3, 0, 4]  # "c" takes the next code
    assert rows.next_id == 3  # planning changes nothing
    rows.grow(7)
    ids = [np.arange(3, 5), np.arange(5, 5), np.arange(5, 6), np.arange(6, 7)]
    rows.append(parts, ids, codes, ords)
    assert rows.next_id == 7 and rows.n_alive == 6
    assert rows.rows_of("a").tolist() == [0, 2, 3, 4, 6] and rows.names(np.array([5, 6])) == ["c", "a"]
    rows.set_meta("d", {"x": 1})  # a stream with metadata and no rows
    assert rows.meta_of("d") == {"x": 1} and rows.rows_of("d").size == 0
    assert rows.delete_stream("a").tolist() == [0, 2, 3, 4, 6] and rows.delete_stream("a") is None
    assert rows.n_alive == 1 and not rows.is_live(3) and rows.is_live(5)
    with pytest.raises(InvalidArgumentError):
        check_parts([("x", -1)])
    with pytest.raises(CorruptBlockError):
        RowTable([StreamRecord("a")], np.array([3], np.int32), np.array([0], np.int64))


class RecordingDisk:
    """A DiskLog stand-in that records what the writer thread writes (and can fail once)."""

    def __init__(self) -> None:
        self.written: list[tuple[int, int]] = []
        self.meta_only: list[tuple[int, int]] = []
        self.fail_next = False

    def write_rows(self, start, k, v, landmarks, codes, ords):
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, "No space left on device")
        self.written.append((start, start + k.shape[0]))

    def write_rows_meta(self, start, codes, ords):
        self.meta_only.append((start, start + len(codes)))


def _job(n: int):
    z = np.zeros((n, 1, 1, 1, 1), np.float32)
    return z, z, z[:, :, :, 0], np.zeros(n, np.int32), np.arange(n, dtype=np.int64)


def test_write_behind_writes_in_order_skips_deleted_rows_and_retries_after_a_failure():
    rows = RowTable([], np.empty(0, np.int32), np.empty(0, np.int64))
    rows.grow(7)
    rows.alive[:7] = True
    rows.next_id = 7
    disk, cv = RecordingDisk(), threading.Condition(threading.RLock())
    wb = WriteBehind(disk, rows, StoreStats(), cv, background=True, queue_bytes=1 << 20, lazy=False, nice=0,
                     written_upto=0, io_error=lambda e, doing: RuntimeError(f"{doing}: {e}"))
    try:
        with cv:
            wb.submit(0, *_job(2))
            rows.alive[3] = False  # deleted while queued: recorded without its chunks
            wb.submit(2, *_job(4))
            assert wb.wait_written(wb.seq, None)
        assert disk.written == [(0, 2), (2, 3), (4, 6)] and disk.meta_only == [(3, 4)] and wb.written_upto == 6
        disk.fail_next = True
        with cv:
            wb.submit(6, *_job(1))
            assert not wb.wait_written(wb.seq, None)  # paused on the failure, the job kept
            err = wb.take_error()
            assert isinstance(err, RuntimeError) and "blocks 6-6" in str(err) and wb.take_error() is None
            assert wb.written_upto == 6 and len(wb.jobs) == 1
            wb.resume()
            assert wb.wait_written(wb.seq, None)
        assert disk.written[-1] == (6, 7) and wb.queued_bytes == 0
    finally:
        wb.stop()


def test_store_config_choice_fields_are_literals():
    hints = typing.get_type_hints(StoreConfig)
    assert typing.get_args(hints["sync_mode"]) == ("auto", "syncfs", "fsync", "none")
    assert typing.get_args(hints["save_index"]) == ("close", "flush", "never")
    with pytest.raises(ValueError, match="sync_mode"):
        StoreConfig(sync_mode="sometimes")


def test_landmark_index_nbytes_counts_keys_ids_and_codes():
    ix = LandmarkIndex(2, 2, 4, backend="exact")
    assert ix.nbytes == 0
    ix.add("s", np.arange(3, dtype=np.int64), torch.zeros(3, 2, 2, 4))
    cap = 1024  # the first allocation
    assert ix.nbytes == cap * (2 * 2 * 4 * 4 + 8 + 4)


def test_a_store_whose_streams_were_all_deleted_reopens_with_its_saved_index(tmp_path):
    from memory_store import TieredStore
    from memory_store.testing import TEST_LAYOUT, make_blocks

    cfg = StoreConfig(device_budget_bytes=0, host_budget_bytes=0, sync_mode="none")
    with TieredStore.open(tmp_path / "s", "w", layout=TEST_LAYOUT, config=cfg) as s:
        s.put_blocks("a", *make_blocks(2, seed=1))
        s.flush()
        s.delete_stream("a")
    with TieredStore.open(tmp_path / "s", "r", config=cfg) as r:  # rows were put: loaded, not "new"
        assert len(r) == 0 and r.index_source == "loaded" and len(r.index) == 0
