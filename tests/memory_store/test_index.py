"""LandmarkIndex against a brute-force numpy reference, for every backend.

The reference (`ref_topk`) is an independent numpy einsum + argsort; exact and flat
must return identical ids, ivf and hnsw (with generous parameters) recall >= 0.9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memory_store.errors import (FormatVersionError, LandmarkIndexError, ShapeError, StoreError,
                                 UnknownBlockError)
from memory_store.index import AUTO_APPROX_BACKEND, LandmarkIndex, aggregate_max
from memory_store.index_backends import AnnParams, faiss_gpu_available

L, H, D = 2, 3, 16
BACKENDS = ["exact", "flat", "ivf", "hnsw", "auto"]


def generous() -> AnnParams:
    # small data: train ivf early and probe a quarter of the cells; wide hnsw beam
    return AnnParams(ivf_min_train=256, ivf_probe_fraction=0.25, hnsw_m=16, hnsw_ef_construction=40,
                     hnsw_ef_search=128)


def make(backend: str, device: str = "cpu") -> LandmarkIndex:
    # auto keeps its default threshold, so on this small data it searches exactly
    return LandmarkIndex(L, H, D, backend=backend, device=device, params=generous())


def data(n: int, seed: int) -> np.ndarray:
    """Clustered keys (n, L, H, D), as landmark keys are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, L, H, D)).astype(np.float32)
    return centres[rng.integers(0, 32, n)] + 0.3 * rng.standard_normal((n, L, H, D)).astype(np.float32)


def ref_topk(keys: np.ndarray, ids: np.ndarray, layer: int, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: keys (N, L, H, D), q (Q, H, D) -> ids, scores (Q, H, min(k, N))."""
    s = np.einsum("qhd,nhd->qhn", q.astype(np.float64), keys[:, layer].astype(np.float64))  # (Q, H, N)
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return ids[order], np.take_along_axis(s, order, -1)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    k = want.shape[-1]
    g, w = got.reshape(-1, got.shape[-1]), want.reshape(-1, k)
    return float(np.mean([len(np.intersect1d(a[:k], b)) / k for a, b in zip(g, w)]))


def filled(backend: str, n_a: int = 1200, n_b: int = 800, device: str = "cpu"):
    keys = data(n_a + n_b, seed=1)
    ids = np.random.default_rng(2).permutation(10 * (n_a + n_b))[: n_a + n_b].astype(np.int64)  # sparse, unordered ids
    ix = make(backend, device)
    ix.add("a", ids[:n_a], torch.from_numpy(keys[:n_a]))
    ix.add("b", ids[n_a:], keys[n_a:])  # numpy keys accepted too
    return ix, ids, keys


def check_against_ref(ix, backend, keys, ids, layer, q, k):
    got_ids, got_s = ix.search(layer, torch.from_numpy(q), k)
    want_ids, want_s = ref_topk(keys, ids, layer, q, k)
    assert got_ids.shape == (q.shape[0], H, k) and got_ids.dtype == torch.int64
    assert got_s.shape == (q.shape[0], H, k) and got_s.dtype == torch.float32
    s = got_s.numpy()
    assert (np.diff(s, axis=-1) <= 1e-6).all(), "scores not sorted descending"
    if backend in ("exact", "flat", "auto"):
        diff = np.abs(s - want_s)
        assert (got_ids.numpy() == want_ids).all(), f"ids differ; score max diff {diff.max():.2e} mean {diff.mean():.2e}"
        assert np.allclose(s, want_s, atol=1e-4)
    else:
        r = recall(got_ids.numpy(), want_ids)
        assert r >= 0.9, f"{backend} recall {r:.3f} < 0.9"
        # the scores returned are the true inner products of the returned ids
        key_of = {int(i): keys[j] for j, i in enumerate(ids)}
        true = np.array([[[key_of[int(i)][layer, h] @ q[qi, h] for i in got_ids[qi, h].tolist()]
                          for h in range(H)] for qi in range(q.shape[0])])
        assert np.allclose(s, true, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_bruteforce(backend):
    ix, ids, keys = filled(backend)
    q = data(20, seed=3)[:, 1]  # (Q, H, D): queries from the key distribution
    for layer in range(L):
        check_against_ref(ix, backend, keys, ids, layer, q, k=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_restriction_and_remove(backend):
    ix, ids, keys = filled(backend)
    q = data(12, seed=4)[:, 0]
    n_a = 1200
    got, _ = ix.search(0, torch.from_numpy(q), 5, streams=["b"])
    want, _ = ref_topk(keys[n_a:], ids[n_a:], 0, q, 5)
    assert set(got.numpy().ravel()) <= set(ids[n_a:].tolist())
    assert recall(got.numpy(), want) >= (1.0 if backend in ("exact", "flat", "auto") else 0.9)
    got, _ = ix.search(0, torch.from_numpy(q), 5, streams=["a", "nope"])  # unknown names add nothing
    assert set(got.numpy().ravel()) <= set(ids[:n_a].tolist())
    got, scores = ix.search(0, torch.from_numpy(q), 5, streams=["nope"])
    assert (got == -1).all() and torch.isinf(scores).all()

    assert ix.streams() == ["a", "b"]
    assert (ix.stream_ids("a") == ids[:n_a]).all()
    assert ix.remove_stream("a") == n_a
    assert ix.remove_stream("a") == 0
    assert len(ix) == len(ids) - n_a and ix.streams() == ["b"] and len(ix.stream_ids("a")) == 0
    check_against_ref(ix, backend, keys[n_a:], ids[n_a:], 1, q, k=8)
    with pytest.raises(UnknownBlockError):
        ix.keys(0, torch.from_numpy(ids[:3]))
    # keys of the survivors are intact after compaction
    assert np.array_equal(ix.keys(1, torch.from_numpy(ids[n_a:][::7])).numpy(), keys[n_a:][::7, 1])
    # a re-added stream is searchable again
    ix.add("a", ids[:n_a], keys[:n_a])
    check_against_ref(ix, backend, np.concatenate([keys[n_a:], keys[:n_a]]),
                      np.concatenate([ids[n_a:], ids[:n_a]]), 0, q, k=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_roundtrip(backend):
    ix, ids, keys = filled(backend)
    q = torch.from_numpy(data(9, seed=5)[:, 0])
    before = ix.search(1, q, 6)  # builds faiss, so its state is saved too
    ix.remove_stream("a")
    before = ix.search(1, q, 6)
    ix.generation = 7
    files: dict[str, bytes] = {}
    ix.save(files.__setitem__)
    assert all(isinstance(v, (bytes, bytearray)) for v in files.values())
    back = LandmarkIndex.load(files.get)
    assert back.generation == 7 and len(back) == len(ix) and back.streams() == ix.streams()
    assert back.backend == backend
    after = back.search(1, q, 6)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert np.array_equal(back.stream_ids("b"), ix.stream_ids("b"))
    back.add("c", np.array([10**9], dtype=np.int64), keys[:1])  # still mutable after load
    assert len(back) == len(ix) + 1
    assert LandmarkIndex.load({}.get) is None


def test_load_refuses_other_format():
    ix, _, _ = filled("exact", 50, 50)
    files: dict[str, bytes] = {}
    ix.save(files.__setitem__)
    files["meta.json"] = files["meta.json"].replace(b'"version": 1', b'"version": 99')
    with pytest.raises(FormatVersionError):
        LandmarkIndex.load(files.get)
    files2: dict[str, bytes] = {}
    ix.save(files2.__setitem__)
    del files2["keys.npy"]
    with pytest.raises(LandmarkIndexError, match="keys.npy"):
        LandmarkIndex.load(files2.get)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_when_k_exceeds_candidates(backend):
    ix = make(backend)
    keys = data(5, seed=6)
    ids = np.array([40, 10, 30, 20, 50], dtype=np.int64)
    ix.add("s", ids, keys)
    q = data(3, seed=7)[:, 0]
    got, s = ix.search(0, torch.from_numpy(q), 8)
    assert got.shape == (3, H, 8)
    assert (got[..., 5:] == -1).all() and torch.isneginf(s[..., 5:]).all()
    want, want_s = ref_topk(keys, ids, 0, q, 5)
    assert (got[..., :5].numpy() == want).all()  # 5 keys: every backend is exact here
    empty = make(backend)
    got, s = empty.search(0, torch.from_numpy(q), 2)
    assert (got == -1).all() and torch.isneginf(s).all()


def snapshot(ix: LandmarkIndex):
    q = torch.from_numpy(data(4, seed=8)[:, 0])
    return len(ix), ix.streams(), [ix.stream_ids(s).tolist() for s in ix.streams()], ix.search(0, q, 7)


def same(a, b) -> bool:
    return a[:3] == b[:3] and torch.equal(a[3][0], b[3][0]) and torch.equal(a[3][1], b[3][1])


@pytest.mark.parametrize("backend", ["exact", "ivf", "hnsw"])
def test_bad_input_raises_and_changes_nothing(backend):
    ix, ids, keys = filled(backend, 300, 300)
    before = snapshot(ix)
    good_keys = torch.from_numpy(data(2, seed=9))
    new = np.array([10**8, 10**8 + 1], dtype=np.int64)
    q = torch.zeros(2, H, D)
    bad_calls = [
        (ShapeError, lambda: ix.add("c", new.astype(np.int32), good_keys)),                # ids not int64
        (ShapeError, lambda: ix.add("c", torch.from_numpy(new).float(), good_keys)),       # float ids
        (ShapeError, lambda: ix.add("c", new.reshape(2, 1), good_keys)),                   # ids not 1-D
        (ShapeError, lambda: ix.add("c", new, good_keys[:, :, :, :-1])),                   # wrong head_dim
        (ShapeError, lambda: ix.add("c", new, good_keys[:1])),                             # N mismatch
        (ShapeError, lambda: ix.add("c", new, good_keys.to(torch.int32))),                 # int keys
        (LandmarkIndexError, lambda: ix.add("c", np.array([5, 5], dtype=np.int64), good_keys)),  # duplicate
        (LandmarkIndexError, lambda: ix.add("c", np.array([ids[0], 10**8], dtype=np.int64), good_keys)),  # existing
        (LandmarkIndexError, lambda: ix.add("c", np.array([-1, 10**8], dtype=np.int64), good_keys)),  # negative
        (LandmarkIndexError, lambda: ix.add("c", new, good_keys * float("nan"))),          # non-finite
        (LandmarkIndexError, lambda: ix.add("", new, good_keys)),                           # bad stream name
        (LandmarkIndexError, lambda: ix.search(L, q, 3)),                                   # layer out of range
        (LandmarkIndexError, lambda: ix.search(-1, q, 3)),
        (LandmarkIndexError, lambda: ix.search(0, q, 0)),                                   # k < 1
        (LandmarkIndexError, lambda: ix.search(0, q, 3, streams="a")),                      # str, not a sequence
        (ShapeError, lambda: ix.search(0, q[:, :, :-1], 3)),                                # wrong head_dim
        (ShapeError, lambda: ix.search(0, q[0], 3)),                                        # 2-D
        (ShapeError, lambda: ix.search(0, q.to(torch.int64), 3)),                           # int queries
        (ShapeError, lambda: ix.keys(0, torch.tensor([1, 2], dtype=torch.int32))),
        (UnknownBlockError, lambda: ix.keys(0, torch.tensor([10**8]))),
        (LandmarkIndexError, lambda: ix.keys(L, torch.from_numpy(ids[:2]))),
    ]
    for err, call in bad_calls:
        with pytest.raises(err) as info:
            call()
        assert isinstance(info.value, StoreError) and str(info.value)
        assert same(snapshot(ix), before), f"index changed after a bad call raising {info.value}"


def test_auto_switches_at_threshold():
    keys = data(600, seed=10)
    ids = np.arange(600, dtype=np.int64)
    ix = LandmarkIndex(L, H, D, backend="auto", exact_threshold=1000, params=generous())
    ix.add("s", ids, keys)
    ix.search(0, torch.from_numpy(keys[:2, 0]), 3)
    assert not ix.describe()["faiss_built"]  # below the threshold: exact, faiss never built
    ix.exact_threshold = 100
    ix.search(0, torch.from_numpy(keys[:2, 0]), 3)
    assert ix.describe()["faiss_built"]


def test_ivf_untrained_falls_back_to_exact_then_trains():
    ix = LandmarkIndex(L, H, D, backend="ivf", params=AnnParams(ivf_min_train=500, ivf_probe_fraction=0.5))
    keys = data(1000, seed=11)
    ids = np.arange(1000, dtype=np.int64)
    ix.add("s", ids[:300], keys[:300])
    q = data(5, seed=12)[:, 0]
    got, _ = ix.search(0, torch.from_numpy(q), 4)
    assert (got.numpy() == ref_topk(keys[:300], ids[:300], 0, q, 4)[0]).all()
    assert not ix.describe()["faiss_built"]
    ix.add("s", ids[300:], keys[300:])
    got, _ = ix.search(0, torch.from_numpy(q), 4)
    assert ix.describe()["faiss_built"] and ix.describe()["ivf_nlist"] >= 1
    assert recall(got.numpy(), ref_topk(keys, ids, 0, q, 4)[0]) >= 0.9


def test_keys_lookup_and_dtypes():
    ix = make("exact")
    keys = torch.from_numpy(data(10, seed=13)).to(torch.bfloat16)  # any float dtype, stored float32
    ids = torch.arange(100, 110)
    ix.add("s", ids, keys)
    got = ix.keys(1, torch.tensor([107, 101]))
    assert got.shape == (2, H, D) and got.dtype == torch.float32
    assert torch.equal(got, keys[[7, 1], 1].float())
    ids_out, _ = ix.search(0, keys[:2, 0].to(torch.float16), 1)  # half queries accepted
    assert ids_out.dtype == torch.int64


def test_many_small_adds_grow_capacity():
    ix = make("flat")
    keys = data(2100, seed=14)
    for i in range(0, 2100, 300):
        ix.add(f"s{i % 2}", np.arange(i, i + 300, dtype=np.int64), keys[i:i + 300])
        ix.search(0, torch.from_numpy(keys[:1, 0]), 2)  # keep faiss built so later adds are incremental
    check_against_ref(ix, "flat", keys, np.arange(2100, dtype=np.int64), 0, data(6, seed=15)[:, 1], 5)


def _device_twin(device: str):
    ix, ids, keys = filled("exact", device=device)
    q = torch.from_numpy(data(7, seed=16)[:, 0]).to(device)
    got, s = ix.search(1, q, 9, streams=["b", "a"])
    assert got.device == q.device and s.device == q.device
    want, _ = ref_topk(keys, ids, 1, q.cpu().numpy(), 9)
    assert (got.cpu().numpy() == want).all()
    if faiss_gpu_available() and device != "cpu":
        ixf, _, _ = filled("ivf", device=device)
        assert ixf.describe()["faiss_gpu"]
        gf, _ = ixf.search(1, q, 9)
        assert recall(gf.cpu().numpy(), want) >= 0.9


def test_device_path_cpu_twin():
    _device_twin("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_path_gpu():
    _device_twin("cuda")


def test_auto_falls_back_to_exact_when_measured_recall_is_low():
    # random keys + a 2-wide hnsw beam / 1 of 64 ivf lists: recall far below 0.95, so auto
    # must answer exactly whichever approximate backend it is set to use
    rng = np.random.default_rng(17)
    keys = rng.standard_normal((3000, L, H, D)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int64)
    bad = AnnParams(hnsw_m=4, hnsw_ef_construction=8, hnsw_ef_search=2,
                    ivf_nlist=64, ivf_nprobe=1, ivf_min_train=1000)
    ix = LandmarkIndex(L, H, D, backend="auto", exact_threshold=100, params=bad)
    ix.add("s", ids, keys)
    q = rng.standard_normal((40, H, D)).astype(np.float32)
    got, _ = ix.search(0, torch.from_numpy(q), 10)
    assert ix.describe()["auto_recall"] < 0.95
    assert (got.numpy() == ref_topk(keys, ids, 0, q, 10)[0]).all()
    # the same graph searched directly is approximate, so the check above can fail
    ix.backend = AUTO_APPROX_BACKEND
    raw, _ = ix.search(0, torch.from_numpy(q), 10)
    assert recall(raw.numpy(), ref_topk(keys, ids, 0, q, 10)[0]) < 0.95


@pytest.fixture(params=["torch-one-tile", "torch-64-key-tiles", "kernel"])
def scores_impl(request, monkeypatch):
    """How exact search_max scores many queries (memory_store/max_scores.py): the torch path in
    one key tile or in tiles of 64 keys (a tile boundary inside every stream), or the fused
    CPU kernel (engine/cpu_kernels.py; its calls are counted in the list yielded)."""
    from memory_store import max_scores as ms

    if request.param == "kernel":
        from engine import cpu_kernels

        if cpu_kernels.get() is None:
            pytest.skip("no working C compiler: the fused kernel is not built")
        calls: list[int] = []
        monkeypatch.setattr(ms, "_kernel", lambda *a: calls.append(1) or cpu_kernels.max_scores(*a))
        return calls
    monkeypatch.setattr(ms, "_kernel", None)
    if request.param == "torch-64-key-tiles":
        monkeypatch.setattr(ms, "_MAX_CHUNK_ELEMS", 1)
    return None


@pytest.mark.parametrize("n_q", [24, 3], ids=["many-queries", "decode-few-queries"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_max_equals_aggregating_per_query_results(backend, scores_impl, n_q):
    """search_max == per-query top-k, then per head the k distinct ids with the best max score."""
    ix, ids, keys = filled(backend)
    q = torch.from_numpy(data(n_q, seed=8)[:, 1])
    for streams in (None, ["b"]):
        for layer in range(L):
            got_i, got_s = ix.search_max(layer, q, 6, streams=streams)
            assert got_i.shape == (1, H, 6) and got_s.shape == (1, H, 6)
            if backend in ("exact", "flat", "auto"):
                # exact: the true per-head max over queries of every allowed key, top 6
                allowed = np.arange(len(ids)) if streams is None else np.arange(1200, len(ids))
                for h in range(H):
                    best = (keys[allowed, layer, h] @ q[:, h].numpy().T).max(axis=1)  # (M,)
                    order = np.argsort(-best)[:6]
                    assert set(got_i[0, h].tolist()) == set(ids[allowed][order].tolist())
                    assert np.allclose(got_s[0, h].numpy(), best[order], atol=1e-4)
            want_i, _ = aggregate_max(*ix.search(layer, q, 6, streams=streams), 6)
            assert got_i.tolist() == want_i.tolist() or backend not in ("exact", "flat", "auto")
    got_i, got_s = ix.search_max(0, q, 5, streams=["nope"])
    assert (got_i == -1).all() and torch.isinf(got_s).all()
    if scores_impl is not None and backend in ("exact", "auto"):
        assert bool(scores_impl) == (n_q > 16)  # many queries go through the kernel; a decode step's do not


@pytest.mark.parametrize("backend", ["exact", "flat"])
def test_search_max_lanes_equals_search_max_per_lane(backend, scores_impl, monkeypatch):
    """Each lane of the batched search == search_max over that lane's own streams alone:
    lanes over one stream, both, a missing one, and one with too few keys for k."""
    ix, ids, keys = filled(backend)
    ix.add("c", np.array([99_999, 99_998]), data(2, seed=5))  # 2 keys < k
    lanes = [["a"], ["b"], ["nope"], ["a", "b"], ["c"]]  # lengths far apart: scored lane by lane
    q = torch.from_numpy(np.stack([data(7, seed=20 + i)[:, 1] for i in range(len(lanes))]))  # (B, Q, H, D)
    for layer in range(L):
        got_i, got_s = ix.search_max_lanes(layer, q, 6, lanes)
        assert got_i.shape == (len(lanes), H, 6) and got_s.shape == (len(lanes), H, 6)
        for b, streams in enumerate(lanes):
            want_i, want_s = ix.search_max(layer, q[b], 6, streams=streams)
            assert got_i[b].tolist() == want_i[0].tolist(), (layer, streams)
            assert torch.allclose(got_s[b], want_s[0], atol=1e-5)
        similar = [["a"], ["b"], ["a"]]  # lengths close: one batched matmul for all lanes
        sim_i, sim_s = ix.search_max_lanes(layer, q[:3], 6, similar)
        for b, streams in enumerate(similar):
            want_i, want_s = ix.search_max(layer, q[b], 6, streams=streams)
            assert sim_i[b].tolist() == want_i[0].tolist(), (layer, streams)
            assert torch.allclose(sim_s[b], want_s[0], atol=1e-5)
    assert (got_i[2] == -1).all() and (got_i[4, :, 2:] == -1).all() and (got_i[4, :, :2] >= 0).all()
    if scores_impl is not None and backend == "exact":
        assert scores_impl  # the lanes were scored by the kernel (flat: by faiss)
    # a key map M scores q . (k @ M): the same as search_max with the queries q @ M^T
    M = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3)))[0]
    for layer in range(L):
        got_i, got_s = ix.search_max_lanes(layer, q, 6, lanes, key_map=M)
        for b, streams in enumerate(lanes):
            want_i, want_s = ix.search_max(layer, q[b] @ M.T, 6, streams=streams)
            assert got_i[b].tolist() == want_i[0].tolist(), (layer, streams)
            assert torch.allclose(got_s[b], want_s[0], atol=1e-4)
    assert not torch.equal(got_i, ix.search_max_lanes(L - 1, q, 6, lanes)[0])  # the map changed the choice
    hf_i, hf_s = ix.search_max_lanes(L - 1, q.transpose(1, 2).contiguous(), 6, lanes, key_map=M, heads_first=True)
    assert torch.equal(hf_i, got_i) and torch.allclose(hf_s, got_s, atol=1e-5)  # (B, H, Q, D) queries: the same
    with pytest.raises(ShapeError, match="key_map"):
        ix.search_max_lanes(0, q, 6, lanes, key_map=torch.eye(D + 1))
    if backend == "exact":  # untied scores take the one-top-k path: one topk for every lane
        calls = []
        real_topk = torch.Tensor.topk
        monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **kw: calls.append(1) or real_topk(self, *a, **kw))
        ix.search_max_lanes(0, q, 6, lanes)
        monkeypatch.setattr(torch.Tensor, "topk", real_topk)
        assert len(calls) == 1
    # tied scores (a stream whose landmark keys are all the same, as at layer 0): each lane
    # still gets exactly search_max's choice among the ties
    ix.add("same", np.arange(50_000, 50_040), np.broadcast_to(data(1, seed=9), (40, L, H, D)).copy())
    tied = [["same"], ["a"], ["same", "c"]]
    for layer in range(L):
        got_i, got_s = ix.search_max_lanes(layer, q[:3], 6, tied)
        for b, streams in enumerate(tied):
            want_i, want_s = ix.search_max(layer, q[b], 6, streams=streams)
            assert got_i[b].tolist() == want_i[0].tolist(), (layer, streams)
            assert torch.allclose(got_s[b], want_s[0], atol=1e-5)
    with pytest.raises(LandmarkIndexError, match="one per lane"):
        ix.search_max_lanes(0, q, 6, lanes[:2])
    with pytest.raises(ShapeError, match="lanes"):
        ix.search_max_lanes(0, q[0], 6, lanes)


def test_faiss_never_changes_torchs_thread_count():
    """faiss and torch may share one OpenMP runtime: importing the store and running faiss
    calls must leave torch's thread count as it was (an import-time
    omp_set_num_threads(1) once made every torch op in the process single-threaded)."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "torch.set_num_threads(3)\n"
        "import memory_store\n"
        "from memory_store.index import LandmarkIndex\n"
        "a = torch.get_num_threads()\n"
        "ix = LandmarkIndex(1, 1, 8, backend='flat')\n"
        "ix.add('s', np.arange(100), torch.randn(100, 1, 1, 8))\n"
        "ix.search(0, torch.randn(3, 1, 8), 4)\n"
        "print(a, torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "3"], out.stdout


def test_stream_rows_cache_follows_every_add_and_remove():
    """Searches restricted to streams reuse the stream's rows until the index changes: each
    add (one part or several) and each remove shows in the next search."""
    keys = data(40, seed=21)
    ix = make("exact")
    ix.add("a", np.arange(10, dtype=np.int64), keys[:10])
    ix.add("b", np.arange(10, 20, dtype=np.int64), keys[10:20])
    q = torch.from_numpy(keys[25:26, 0]) * 10  # close to key 25's
    assert set(ix.search_max(0, q, 40, ["a"])[0].flatten().tolist()) - {-1} == set(range(10))
    ix.add_parts([("a", np.array([25], dtype=np.int64), keys[25:26]), ("c", np.array([30], dtype=np.int64), keys[30:31])])
    got = ix.search_max(0, q, 40, ["a"])[0]
    assert set(got.flatten().tolist()) - {-1} == set(range(10)) | {25}
    assert set(ix.search_max(0, q, 40, ["c"])[0].flatten().tolist()) - {-1} == {30}
    ix.remove_stream("a")
    assert set(ix.search_max(0, q, 40, ["a", "b"])[0].flatten().tolist()) - {-1} == set(range(10, 20))
    lanes = ix.search_max_lanes(0, torch.stack([q, q]), 40, [["b"], ["a", "c"]])[0]
    assert set(lanes[0].flatten().tolist()) - {-1} == set(range(10, 20)) and set(lanes[1].flatten().tolist()) - {-1} == {30}


def test_add_parts_refuses_an_id_in_two_parts_and_changes_nothing():
    ix = make("exact")
    keys = data(4, seed=22)
    ix.add("a", np.array([0], dtype=np.int64), keys[:1])
    before = snapshot(ix)
    with pytest.raises(LandmarkIndexError, match="duplicate"):
        ix.add_parts([("b", np.array([1, 2], dtype=np.int64), keys[1:3]), ("c", np.array([2], dtype=np.int64), keys[3:])])
    assert same(snapshot(ix), before)
