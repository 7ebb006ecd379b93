"""Bad input to the store's Python API, systematically (hypothesis, bounded examples).

Bad tensors (shapes, dtypes, NaN/Inf, not tensors), stream names (path separators, control
characters, not str), ids and layers that do not exist, stream metadata that is not JSON, files of
the store truncated or replaced by garbage, a store written by another model. Every bad call must
raise a typed StoreError whose message names what was wrong; an untyped exception (TypeError,
IndexError, OverflowError, ...) fails the test. Every block is checksummed before and after:
the store reads back bit-exact and its files are unchanged. The number of cases tried is printed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _store_helpers import LAYOUT, make_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_store import StoreConfig, TieredStore
from memory_store.errors import FormatVersionError, InvalidArgumentError, LayoutMismatchError, ShapeError, StoreError
from memory_store.writer_lock import LOCK_NAME

CFG = StoreConfig(device="cpu", device_budget_bytes=2 * LAYOUT.block_bytes(), host_budget_bytes=2 * LAYOUT.block_bytes(),
                  sync_mode="none", index_backend="exact")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
K, V, LM = make_blocks(9, seed=31)
L, H, T, D = LAYOUT.n_layers, LAYOUT.n_kv_heads, LAYOUT.block_len, LAYOUT.head_dim
CASES: Counter = Counter()


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def block_digests(store: TieredStore) -> dict[str, list[str]]:
    """sha256 of every block's K and V of every layer, per stream: checksum every block."""
    out = {}
    for s in store.streams():
        ids = store.stream_blocks(s).tolist()
        out[s] = [hashlib.sha256(k.contiguous().view(torch.uint8).numpy().tobytes()
                                 + v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                  for k, v in (store.get_layer(ids, layer) for layer in range(L))]
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict, dict]:
    path = tmp_path_factory.mktemp("fuzz") / "s"
    with TieredStore.open(path, "w", layout=LAYOUT, config=CFG) as s:
        s.put_blocks("doc", K[:6], V[:6], LM[:6])
        s.put_blocks("two", K[6:], V[6:], LM[6:])
        s.set_stream_meta("doc", {"source": "doc.txt"})
        s.flush()
        s.delete_stream("two")
        s.put_blocks("three", K[6:8], V[6:8], LM[6:8])
    with TieredStore.open(path, "r", config=CFG) as r:
        digests = block_digests(r)
    return path, tree(path), digests


@pytest.fixture
def writer(base):
    """The base store opened for writing; afterwards its files and every block are checked unchanged."""
    path, files, digests = base
    s = TieredStore.open(path, "a", config=CFG)
    yield s
    assert block_digests(s) == digests, "the open writer reads back other bytes"
    s.close()
    assert tree(path) == files, "bad input changed the store's files"
    with TieredStore.open(path, "r", config=CFG) as r:
        assert block_digests(r) == digests


def refused(kind: str, call, *, error: type[StoreError] = StoreError, says: str | None = None) -> StoreError:
    """call() must raise `error` (a StoreError) whose message says `says`; counts the case."""
    CASES[kind] += 1
    try:
        call()
    except StoreError as e:
        assert isinstance(e, error), f"{kind}: {type(e).__name__} ({e}), expected {error.__name__}"
        assert str(e), f"{kind}: empty message"
        if says is not None:
            assert says in str(e), f"{kind}: {says!r} not in {e}"
        return e
    except Exception as e:  # noqa: BLE001 - the point: any other exception is untyped
        raise AssertionError(f"{kind}: untyped {type(e).__name__}: {e}") from e
    raise AssertionError(f"{kind}: accepted")


# -- tensors ------------------------------------------------------------------------------------------
BAD_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int8, torch.int64, torch.uint8, torch.bool,
              torch.complex64]
GOOD = {"k": (1, L, H, T, D), "v": (1, L, H, T, D), "landmarks": (1, L, H, D)}


def _good(name: str) -> torch.Tensor:
    return {"k": K[:1], "v": V[:1], "landmarks": LM[:1]}[name].clone()


@FUZZ
@given(which=st.sampled_from(list(GOOD)), shape=st.lists(st.integers(0, 9), min_size=0, max_size=6))
def test_wrong_shapes(writer, which, shape):
    if tuple(shape) == GOOD[which]:
        shape = [*shape, 1]
    args = {n: _good(n) for n in GOOD}
    args[which] = torch.zeros(shape, dtype=LAYOUT.torch_dtype)
    refused("tensor shape", lambda: writer.put_blocks("doc", args["k"], args["v"], args["landmarks"]),
            error=ShapeError, says="shape")


@FUZZ
@given(which=st.sampled_from(list(GOOD)), dtype=st.sampled_from([d for d in BAD_DTYPES if d != LAYOUT.torch_dtype]))
def test_wrong_dtypes(writer, which, dtype):
    args = {n: _good(n) for n in GOOD}
    args[which] = torch.zeros(GOOD[which], dtype=dtype)
    refused("tensor dtype", lambda: writer.put_blocks("doc", args["k"], args["v"], args["landmarks"]),
            error=ShapeError, says="dtype")


@FUZZ
@given(which=st.sampled_from(list(GOOD)), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
       pos=st.integers(0, 10 ** 6))
def test_nan_and_inf_values(writer, which, value, pos):
    args = {n: _good(n) for n in GOOD}
    flat = args[which].view(-1)
    flat[pos % flat.numel()] = value
    refused("NaN/Inf tensor", lambda: writer.put_blocks("doc", args["k"], args["v"], args["landmarks"]),
            says=which.removesuffix("s"))  # (landmarks: LandmarkIndexError "landmark keys must be finite")


@pytest.mark.parametrize("thing", [None, 1.5, "k", [[0.0]], np.zeros((1, L, H, T, D), np.float32)])
def test_not_tensors(writer, thing):
    refused("not a tensor", lambda: writer.put_blocks("doc", thing, V[:1], LM[:1]), error=ShapeError)
    refused("not a tensor", lambda: writer.put_streams([("doc", 1)], K[:1], V[:1], thing), error=ShapeError)


@FUZZ
@given(parts=st.lists(st.tuples(st.sampled_from(["doc", "x", ""]), st.integers(-3, 4)), max_size=4))
def test_put_streams_parts_that_do_not_add_up(writer, parts):
    n = sum(c for _, c in parts)
    if all(s and c >= 0 for s, c in parts) and n == 1:
        parts = [*parts, ("doc", 1)]
    refused("put_streams parts", lambda: writer.put_streams(parts, K[:1], V[:1], LM[:1]))


# -- stream names -----------------------------------------------------------------------------------------
CONTROL = [chr(c) for c in (*range(0, 32), 127, *range(0x80, 0xa0))]
bad_names = st.one_of(
    st.builds(lambda a, sep, b: a + sep + b, st.text(max_size=8), st.sampled_from(["/", "\\"]), st.text(max_size=8)),
    st.builds(lambda a, c, b: a + c + b, st.text(max_size=8), st.sampled_from(CONTROL), st.text(max_size=8)),
    st.sampled_from(["", "..", ".", "\ud800", "a\udfff"]),
)


@FUZZ
@given(name=bad_names)
def test_stream_names_with_separators_or_control_characters(writer, name):
    refused("stream name", lambda: writer.put_blocks(name, K[:1], V[:1], LM[:1]), error=InvalidArgumentError,
            says="stream")
    refused("stream name", lambda: writer.set_stream_meta(name, {}), error=InvalidArgumentError, says="stream")


@pytest.mark.parametrize("name", [None, 3, b"doc", ("doc",), 1.0])
def test_stream_names_that_are_not_str(writer, name):
    refused("stream name type", lambda: writer.put_blocks(name, K[:1], V[:1], LM[:1]), error=InvalidArgumentError)
    refused("stream name type", lambda: writer.set_stream_meta(name, {}), error=InvalidArgumentError)
    refused("stream name type", lambda: writer.delete_stream(name), error=InvalidArgumentError)


@FUZZ
@given(meta=st.one_of(st.just([1]), st.just("x"), st.just(None),
                      st.dictionaries(st.text(max_size=4), st.sampled_from([object(), {1, 2}, b"x", float("nan"),
                                                                             float("inf")]), min_size=1)))
def test_stream_meta_that_is_not_a_json_dict(writer, meta):
    refused("stream meta", lambda: writer.set_stream_meta("doc", meta), error=InvalidArgumentError)


# -- ids and layers ---------------------------------------------------------------------------------------
VALID_IDS = [0, 1, 2, 3, 4, 5, 9, 10]  # "doc" 0-5, "three" 9-10; "two" (6-8) was deleted
unknown_ids = st.one_of(st.integers(-2 ** 70, -1), st.sampled_from([6, 7, 8]), st.integers(11, 2 ** 70))


@FUZZ
@given(bad=st.lists(unknown_ids, min_size=1, max_size=4), good=st.lists(st.sampled_from(VALID_IDS), max_size=3),
       layer=st.integers(0, L - 1), data=st.data())
def test_ids_that_do_not_exist(writer, bad, good, layer, data):
    ids = data.draw(st.permutations(good + bad), label="ids")
    refused("unknown id", lambda: writer.get_layer(ids, layer))
    refused("unknown id", lambda: writer.block_meta(ids))
    refused("unknown id", lambda: writer.prefetch(ids))
    heads = [i for i in bad if -2 ** 62 < i < 2 ** 62 and i != -1]  # (-1 in a selection means "none")
    if heads:
        sel = torch.tensor([[[heads[h % len(heads)]] for h in range(H)]], dtype=torch.int64)  # (1, H, 1)
        refused("unknown id", lambda: writer.get_heads(sel, layer))


@FUZZ
@given(layer=st.one_of(st.integers(-10, -1), st.integers(L, 10 ** 12), st.floats(allow_nan=True),
                       st.sampled_from([None, "0", True, [0]])))
def test_layers_that_do_not_exist(writer, layer):
    refused("bad layer", lambda: writer.get_layer([0], layer), error=InvalidArgumentError, says="layer")


@pytest.mark.parametrize("ids", [[0.5], [[0, 1]], ["0"], [None], np.array([1.0])])
def test_ids_of_the_wrong_kind(writer, ids):
    refused("id type", lambda: writer.get_layer(ids, 0), error=ShapeError)


# -- the store's files ------------------------------------------------------------------------------------
def _victims(path: Path) -> list[str]:
    """Metadata files of the store: the group's zarr.json, commit.json and the saved index (the arrays'
    own zarr.json: test_a_damaged_array_zarr_json below)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != LOCK_NAME
                  and (p.parent == path and p.suffix == ".json" or "index" in str(p.relative_to(path))))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_and_garbage_metadata_files(base, tmp_path_factory, data):
    path, files, digests = base
    victim = data.draw(st.sampled_from(_victims(path)), label="file")
    original = (path / victim).read_bytes()
    kinds = ["truncate", "garbage", "empty", "flip", "json-list", "json-string"]
    how = data.draw(st.sampled_from(kinds), label="how")
    if how == "truncate":
        new = original[:data.draw(st.integers(0, max(0, len(original) - 1)), label="length")]
    elif how == "garbage":
        new = data.draw(st.binary(min_size=1, max_size=200), label="bytes")
    elif how == "empty":
        new = b""
    elif how == "json-list":
        new = b"[1, 2]"
    elif how == "json-string":
        new = b'"zarr"'
    else:
        at = data.draw(st.integers(0, len(original) - 1), label="offset")
        new = original[:at] + bytes([original[at] ^ data.draw(st.integers(1, 255), label="xor")]) + original[at + 1:]
    copy = tmp_path_factory.mktemp("corrupt") / "s"
    shutil.copytree(path, copy)
    (copy / victim).write_bytes(new)
    CASES[f"corrupt {Path(victim).name}"] += 1
    # (commit.json carries a checksum: a flipped digit that makes another valid record is refused too)
    for mode in ("r", "a"):
        try:
            with TieredStore.open(copy, mode, config=CFG) as s:
                got = block_digests(s)
        except StoreError as e:
            assert str(e)
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{victim} {how}: untyped {type(e).__name__} opening with mode {mode!r}: {e}") from e
        # opened: only a file the store can do without (the derived index: rebuilt) or a change that
        # kept its meaning (e.g. whitespace), and then every block reads back the same
        assert got == digests, f"{victim} {how}: opened (mode {mode!r}) but reads back other bytes"
    # whatever the open did, the other files are untouched and putting the file back restores the store
    (copy / victim).write_bytes(original)
    after = tree(copy)
    changed = sorted(k for k in set(files) | set(after) if files.get(k) != after.get(k))
    assert all("index" in k for k in changed), f"{victim} {how}: a failed open changed {changed}"
    with TieredStore.open(copy, "r", config=CFG) as r:
        assert block_digests(r) == digests
    shutil.rmtree(copy.parent)


@pytest.mark.parametrize("name,content", [("kv/zarr.json", None), ("landmarks/zarr.json", None),
                                          ("block_stream/zarr.json", None), ("block_ordinal/zarr.json", None),
                                          ("zarr.json", b"[1, 2]"), ("zarr.json", b'"zarr"'),
                                          ("zarr.json", "flip")])
def test_a_damaged_zarr_json_that_zarr_rejects(base, tmp_path, name, content):
    path, files, digests = base
    copy = tmp_path / "s"
    shutil.copytree(path, copy)
    meta = copy / name
    if content == "flip":  # one bit of a key: "attributes" -> "`ttributes" (TypeError inside zarr)
        content = meta.read_bytes().replace(b'"attributes"', b'"`ttributes"')
    meta.write_bytes(content if content is not None else meta.read_bytes()[:40])  # (None: truncated)
    refused("damaged zarr.json", lambda: TieredStore.open(copy, "r", config=CFG))


def test_a_store_path_that_is_a_file(tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("not a store")
    refused("store path is a file", lambda: TieredStore.open(f, "a", layout=LAYOUT, config=CFG), says=str(f))


def test_a_writer_on_a_commit_record_missing_a_key(base, tmp_path):
    path, files, digests = base
    copy = tmp_path / "s"
    shutil.copytree(path, copy)
    commit = copy / "commit.json"
    commit.write_bytes(commit.read_bytes().replace(b'"shards"', b'"rhards"'))
    try:
        with TieredStore.open(copy, "a", config=CFG) as s:
            block_digests(s)
    except StoreError:
        pass
    after = tree(copy)
    changed = sorted(k for k in files if k != "commit.json" and files[k] != after.get(k))
    assert not changed, f"a writer on a damaged commit record changed {changed}"


def test_a_commit_record_altered_into_another_valid_one_is_refused_by_its_checksum(base, tmp_path):
    import json

    path, files, digests = base
    copy = tmp_path / "s"
    shutil.copytree(path, copy)
    commit = copy / "commit.json"
    rec = json.loads(commit.read_bytes())
    assert rec["checksum"].startswith("crc32c:")
    rec["n_rows"] -= 1  # another record that would parse and be trusted: one block fewer
    commit.write_bytes(json.dumps(rec, sort_keys=True).encode())
    for mode in ("r", "a"):
        with pytest.raises(FormatVersionError, match="failed its checksum"):
            TieredStore.open(copy, mode, config=CFG)
    assert sorted(k for k in files if files[k] != tree(copy).get(k)) == ["commit.json"]  # nothing else touched


def test_a_store_written_by_another_model(base):
    path, files, digests = base
    for other in (dataclasses.replace(LAYOUT, fingerprint="another-model"), dataclasses.replace(LAYOUT, head_dim=16),
                  dataclasses.replace(LAYOUT, n_layers=L + 1), dataclasses.replace(LAYOUT, dtype="float16" if LAYOUT.dtype != "float16" else "float32")):
        for mode in ("r", "a"):
            refused("another model's store", lambda: TieredStore.open(path, mode, layout=other, config=CFG),
                    error=LayoutMismatchError, says=other.describe())
    assert tree(path) == files
    with TieredStore.open(path, "r", config=CFG) as r:
        assert block_digests(r) == digests


def test_zz_cases_counted(capsys):
    """Runs last in this module (pytest keeps file order): prints how many cases were tried."""
    cases = dict(CASES)
    total = sum(cases.values())
    with capsys.disabled():
        print(f"\nstore API fuzz: {total} bad-input cases, each a typed error with the store bit-exact: "
              + ", ".join(f"{k} {n}" for k, n in sorted(cases.items())))
    assert total > 300
