"""A short soak (scripts/soak.py runs it for minutes): a writer, a deleter, four readers at once."""

from __future__ import annotations

from memory_store.testing.soak import run_soak


def test_soak_writer_deleter_and_readers_nothing_inconsistent_nothing_lost(tmp_path):
    r = run_soak(str(tmp_path / "store"), 8.0, readers=4)
    problems = r.pop("problems")
    print(f"soak: {r}")
    assert not problems, "\n".join(problems[:10])
    assert r["flushes"] > 5 and r["streams_deleted"] > 0 and r["opens"] > 20 and r["blocks_read"] > 100, r
