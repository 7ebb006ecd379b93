"""LandmarkIndex: top-k search of queries against the landmark keys of stored blocks.

Per layer and KV head, a query's score against a block is the inner product
<query, landmark key> (no scaling). The index owns a copy of every block's landmark
keys (float32, on `device`) and answers `search` either exactly (one einsum over
all KV heads on the device, then top-k) or through a faiss backend
(index_backends.py: flat, ivf, hnsw; faiss on GPU when CUDA and a GPU faiss are
present). `backend="auto"` searches exactly while the searched set has at most
`exact_threshold` keys and above that uses `AUTO_APPROX_BACKEND` (chosen with
bench/store_index.py; its figures are in BENCHMARKS.md).

Rows are appended in insertion order; `remove_stream` compacts the key rows and
removes the stream's ids from the faiss indexes by id (no retraining, no re-add).
faiss structures are built lazily on the first search that needs them and kept in
sync incrementally afterwards.

Not thread-safe by itself beyond one re-entrant lock around every public method.
Batched lane search lives in index_lanes.py, persistence in index_io.py (both mixed in).

Shape letters: N keys, L layers, H KV heads, D head_dim, Q queries, K top-k.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from .errors import LandmarkIndexError, ShapeError, UnknownBlockError
from .index_backends import FAISS_BACKENDS, AnnParams, FaissBackend
from .index_io import IndexPersistence
from .index_lanes import LanesSearch
from .max_scores import max_scores

__all__ = ["LandmarkIndex", "aggregate_max", "AnnParams", "BACKENDS", "AUTO_APPROX_BACKEND", "DEFAULT_EXACT_THRESHOLD"]

BACKENDS = ("auto", "exact") + FAISS_BACKENDS

# Clustered keys (what real landmark keys look like) reach recall@10 ~1.0 with ivf at a fraction of
# exact search's time; random-like keys do not, so auto checks faiss's recall against exact on the
# live queries (AUTO_MIN_RECALL) and stays exact below it. ivf over hnsw: one index per (layer, KV
# head) makes build time count. Figures: bench/store_index.py, BENCHMARKS.md.
AUTO_APPROX_BACKEND = "ivf"
AUTO_MIN_RECALL = 0.95
AUTO_CALIBRATION_QUERIES = 32
# Below this many keys exact search is fast enough that building a faiss index does not pay for itself.
DEFAULT_EXACT_THRESHOLD = 65_536

_SCORE_CHUNK_ELEMS = 1 << 24  # exact search: at most 16M scores (64 MB) alive per chunk
_ROWS_CACHE_MAX = 64  # distinct stream sets whose rows are kept between index changes
_FEW_QUERIES = 16  # search_max with at most this many queries: one untiled matmul (decode)


def aggregate_max(ids: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query results (Q, H, k') -> per head the k distinct ids with the best max score over the
    queries: ids (1, H, k) padded with -1 and scores (1, H, k) padded with -inf, by descending score.
    Entries with id < 0 or a non-finite score are ignored."""
    H = ids.shape[1]
    out_ids = torch.full((1, H, k), -1, dtype=torch.int64)
    out_s = torch.full((1, H, k), float("-inf"), dtype=torch.float32)
    for h in range(H):
        fi, fs = ids[:, h].reshape(-1).cpu(), scores[:, h].reshape(-1).float().cpu()
        keep = (fi >= 0) & torch.isfinite(fs)
        if not keep.any():
            continue
        uniq, inv = torch.unique(fi[keep], return_inverse=True)
        best = torch.full((len(uniq),), float("-inf")).scatter_reduce(0, inv, fs[keep], "amax")
        n = min(k, len(uniq))
        top_s, top = torch.topk(best, n)
        out_ids[0, h, :n], out_s[0, h, :n] = uniq[top], top_s
    return out_ids.to(ids.device), out_s.to(ids.device)


def grown_capacity(cap: int, need: int) -> int:
    """Key rows the index allocates when `need` rows exceed its capacity `cap`: 1.5x (a 1M-token
    store's keys are not doubled), at least 1024. The planner predicts the index's size with it."""
    return max(need, cap + cap // 2, 1024)


class LandmarkIndex(LanesSearch, IndexPersistence):
    """Inner-product top-k search over landmark keys, per layer and KV head, restricted to streams on demand."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, backend: str = "auto",
                 device: str | torch.device = "cpu", exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                 params: AnnParams | None = None) -> None:
        for name, v in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LandmarkIndex {name}={v!r}: expected an int >= 1")
        if backend not in BACKENDS:
            raise ValueError(f"LandmarkIndex backend={backend!r}: expected one of {BACKENDS}")
        if not isinstance(exact_threshold, int) or exact_threshold < 0:
            raise ValueError(f"LandmarkIndex exact_threshold={exact_threshold!r}: expected an int >= 0")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.backend = backend
        self.device = torch.device(device)
        self.exact_threshold = exact_threshold
        self.params = params or AnnParams()
        self.generation = 0
        self._lock = threading.RLock()

        self._n = 0
        self._keys = torch.empty((n_layers, n_kv_heads, 0, head_dim), dtype=torch.float32, device=self.device)  # (L, H, cap, D)
        self._ids = np.empty(0, dtype=np.int64)  # (cap,) block id of each row
        self._codes = np.empty(0, dtype=np.int32)  # (cap,) stream code of each row
        self._stream_code: dict[str, int] = {}  # insertion order = streams() order
        self._stream_count: dict[str, int] = {}
        self._next_code = 0
        self._sorted_ids = np.empty(0, dtype=np.int64)  # (N,) for id -> row lookups
        self._sorted_rows = np.empty(0, dtype=np.int64)  # (N,)
        self._ids_dev: torch.Tensor | None = None  # (N,) ids on device, cached for exact search
        self._rows_cache: dict = {}  # _stream_rows and _lanes_layout, until the next add or delete

        kind = backend if backend in FAISS_BACKENDS else (AUTO_APPROX_BACKEND if backend == "auto" else None)
        gpu = self.device.index or 0 if self.device.type == "cuda" else None
        self._faiss = FaissBackend(kind, n_layers, n_kv_heads, head_dim, self.params, gpu_device=gpu) if kind in FAISS_BACKENDS else None
        self._faiss_synced = False  # True once the faiss indexes mirror every row
        self._auto_recall: float | None = None  # auto: last measured recall of faiss vs exact
        self._auto_calibrated_n = 0

    # -- small queries --------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the keys, ids and stream codes the index holds (allocated capacity included)."""
        with self._lock:
            return self._keys.nbytes + self._ids.nbytes + self._codes.nbytes

    def streams(self) -> list[str]:
        """Names of the streams holding at least one block, in order of first add."""
        with self._lock:
            return list(self._stream_code)

    def stream_ids(self, stream: str) -> np.ndarray:
        """(M,) int64 ids of a stream's blocks in insertion order (empty for an unknown stream)."""
        with self._lock:
            code = self._stream_code.get(stream)
            if code is None:
                return np.empty(0, dtype=np.int64)
            return self._ids[: self._n][self._codes[: self._n] == code].copy()

    def describe(self) -> dict:
        """Backend, sizes and faiss parameters (for stats / `folio store inspect`)."""
        with self._lock:
            d = {"backend": self.backend, "n_keys": self._n, "n_streams": len(self._stream_code),
                 "exact_threshold": self.exact_threshold, "device": str(self.device), "generation": self.generation}
            if self._faiss is not None:
                d.update(faiss=self._faiss.kind, faiss_built=self._faiss_synced and self._faiss.ready(),
                         faiss_gpu=self._faiss._gpu_device is not None)
                if self.backend == "auto":
                    d.update(auto_recall=self._auto_recall, auto_min_recall=AUTO_MIN_RECALL)
                if self._faiss.kind == "ivf" and self._faiss.ready():
                    d.update(ivf_nlist=self._faiss.nlist, ivf_nprobe=self._faiss.nprobe())
            return d

    # -- validation -----------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            if ids.dtype != torch.int64:
                raise ShapeError(f"{what}: ids dtype {ids.dtype}, expected torch.int64")
            ids = ids.detach().cpu().numpy()
        elif isinstance(ids, np.ndarray):
            if ids.dtype != np.int64:
                raise ShapeError(f"{what}: ids dtype {ids.dtype}, expected int64")
        else:
            raise ShapeError(f"{what}: ids of type {type(ids).__name__}, expected an int64 np.ndarray or torch.Tensor")
        if ids.ndim != 1:
            raise ShapeError(f"{what}: ids shape {tuple(ids.shape)}, expected (N,)")
        return ids

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise LandmarkIndexError(f"layer={layer!r}: expected an int in [0, {self.n_layers})")

    def _rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ids (M,), and a (M,) bool mask of which ids are present."""
        pos = np.searchsorted(self._sorted_ids, ids)  # (M,)
        pos_c = np.minimum(pos, max(0, len(self._sorted_ids) - 1))
        found = (pos < len(self._sorted_ids)) & (self._sorted_ids[pos_c] == ids) if len(self._sorted_ids) else np.zeros(len(ids), bool)
        rows = self._sorted_rows[pos_c] if len(self._sorted_rows) else np.zeros(len(ids), np.int64)
        return rows, found

    # -- mutation -------------------------------------------------------------------
    def add(self, stream: str, ids: np.ndarray | torch.Tensor, keys: torch.Tensor | np.ndarray) -> None:
        """Add blocks to a stream.

        ids (N,) int64, unique, >= 0, not yet in the index; keys (N, n_layers, n_kv_heads, head_dim),
        any float dtype, finite (stored as float32). Raises ShapeError (shape/dtype) or
        LandmarkIndexError (duplicate/existing/negative ids, non-finite keys, bad stream name);
        on error nothing is changed.
        """
        self.add_parts([(stream, ids, keys)])

    def add_parts(self, parts: Sequence[tuple[str, np.ndarray | torch.Tensor, torch.Tensor | np.ndarray]]) -> None:
        """`add` for several (stream, ids, keys) parts at once: every part is checked (and
        ids across parts must be distinct) and the key storage grown before anything is
        written, so an error leaves the index as it was. The parts are checked and written
        together (one id check, one sorted-id insert; a key copy per part: training adds
        every lane's window each step)."""
        with self._lock:
            checked = [c for c in (self._check_part(*part) for part in parts) if c is not None]
            if not checked:
                return
            ids = np.concatenate([c[1] for c in checked]) if len(checked) > 1 else checked[0][1]
            if (ids < 0).any():
                raise LandmarkIndexError(f"add: negative id {int(ids[ids < 0][0])}; ids must be >= 0 (-1 is the search padding)")
            order = np.argsort(ids, kind="stable")
            new_sorted = ids[order]
            dup = new_sorted[1:] == new_sorted[:-1]
            if dup.any():
                raise LandmarkIndexError(f"add: duplicate ids, e.g. {int(new_sorted[1:][dup][0])}; ids must be unique "
                                         "(within a part and across parts)")
            _, found = self._rows_of(ids)
            if found.any():
                raise LandmarkIndexError(f"add: id {int(ids[found][0])} is already in the index; ids must be new")
            for _, _, keys_f in checked:
                # numpy on CPU: single-threaded (a torch OpenMP kernel stalls while the store's writer holds a core)
                finite = np.isfinite(keys_f.numpy()).all() if keys_f.device.type == "cpu" else torch.isfinite(keys_f).all()
                if not finite:
                    raise LandmarkIndexError("add: keys contain NaN or inf; landmark keys must be finite")
            m, n = len(ids), self._n
            self._grow(n + m)  # the one allocation, before any write
            codes = np.empty(m, dtype=np.int32)
            at = 0
            for stream, part_ids, keys_f in checked:
                if stream not in self._stream_code:
                    self._stream_code[stream] = self._next_code
                    self._stream_count[stream] = 0
                    self._next_code += 1
                codes[at:at + len(part_ids)] = self._stream_code[stream]
                self._stream_count[stream] += len(part_ids)
                self._keys[:, :, n + at:n + at + len(part_ids)] = keys_f.to(self.device).permute(1, 2, 0, 3)  # (L, H, N, D)
                at += len(part_ids)
            self._ids[n:n + m] = ids
            self._codes[n:n + m] = codes
            self._n = n + m
            pos = np.searchsorted(self._sorted_ids, new_sorted)
            self._sorted_ids = np.insert(self._sorted_ids, pos, new_sorted)
            self._sorted_rows = np.insert(self._sorted_rows, pos, n + order.astype(np.int64))
            self._ids_dev = None
            self._rows_cache.clear()
            if self._faiss is not None and self._faiss_synced:
                for _, part_ids, keys_f in checked:
                    self._faiss.add(part_ids, keys_f.cpu().numpy().transpose(1, 2, 0, 3))  # (L, H, N, D)

    def _check_part(self, stream: object, ids: object, keys: object) -> tuple[str, np.ndarray, torch.Tensor] | None:
        """The type and shape checks of `add` for one part (lock held): (stream, ids, float32
        keys), or None if empty. The ids' and keys' contents are checked by add_parts."""
        if not isinstance(stream, str) or not stream:
            raise LandmarkIndexError(f"stream={stream!r}: expected a non-empty str")
        ids = self._check_ids(ids, "add")
        want = (len(ids), self.n_layers, self.n_kv_heads, self.head_dim)
        if isinstance(keys, np.ndarray):
            if not np.issubdtype(keys.dtype, np.floating):
                raise ShapeError(f"add: keys dtype {keys.dtype}, expected a float dtype")
            keys = torch.from_numpy(keys)
        elif not isinstance(keys, torch.Tensor):
            raise ShapeError(f"add: keys of type {type(keys).__name__}, expected torch.Tensor or np.ndarray")
        elif not keys.is_floating_point():
            raise ShapeError(f"add: keys dtype {keys.dtype}, expected a float dtype")
        if tuple(keys.shape) != want:
            raise ShapeError(f"add: keys shape {tuple(keys.shape)}, expected (N, n_layers, n_kv_heads, head_dim)={want}")
        if len(ids) == 0:
            return None
        return stream, ids, keys.detach().to(torch.float32)

    def _grow(self, need: int) -> None:
        cap = self._keys.shape[2]
        if need <= cap:
            return
        new_cap = grown_capacity(cap, need)
        keys = torch.empty((self.n_layers, self.n_kv_heads, new_cap, self.head_dim), dtype=torch.float32, device=self.device)
        keys[:, :, : self._n] = self._keys[:, :, : self._n]
        self._keys = keys
        self._ids = np.concatenate([self._ids[: self._n], np.empty(new_cap - self._n, np.int64)])
        self._codes = np.concatenate([self._codes[: self._n], np.empty(new_cap - self._n, np.int32)])

    def remove_stream(self, stream: str) -> int:
        """Remove every block of a stream; returns how many (0 for an unknown stream).

        Compacts the key rows (O(N) copy) and removes the ids from the faiss indexes by id;
        nothing is retrained or re-added.
        """
        with self._lock:
            code = self._stream_code.get(stream)
            if code is None:
                return 0
            n = self._n
            gone = self._codes[:n] == code  # (N,)
            removed_ids = self._ids[:n][gone]
            keep = np.nonzero(~gone)[0]
            n_new = len(keep)
            keep_t = torch.from_numpy(keep).to(self.device)
            self._keys[:, :, :n_new] = self._keys[:, :, :n].index_select(2, keep_t)
            self._ids[:n_new] = self._ids[:n][keep]
            self._codes[:n_new] = self._codes[:n][keep]
            self._n = n_new
            del self._stream_code[stream], self._stream_count[stream]
            order = np.argsort(self._ids[:n_new], kind="stable")
            self._sorted_ids, self._sorted_rows = self._ids[:n_new][order], order.astype(np.int64)
            self._ids_dev = None
            self._rows_cache.clear()
            if self._faiss is not None and self._faiss_synced:
                self._faiss.remove(removed_ids)
            return len(removed_ids)

    # -- lookups --------------------------------------------------------------------
    def keys(self, layer: int, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Landmark keys (M, n_kv_heads, head_dim) float32 of one layer for ids (M,) int64.

        On ids.device for a tensor, else on the index's device. UnknownBlockError names a missing id.
        """
        with self._lock:
            self._check_layer(layer)
            out_device = ids.device if isinstance(ids, torch.Tensor) else self.device
            ids_np = self._check_ids(ids, "keys")
            rows, found = self._rows_of(ids_np)
            if not found.all():
                missing = ids_np[~found]
                raise UnknownBlockError(f"keys: {len(missing)} unknown block id(s), e.g. {missing[:5].tolist()}")
            rows_t = torch.from_numpy(rows).to(self.device)
            return self._keys[layer].index_select(1, rows_t).transpose(0, 1).to(out_device)  # (M, H, D)

    # -- search ---------------------------------------------------------------------
    def search(self, layer: int, queries: torch.Tensor, k: int,
               streams: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k blocks per query and KV head by inner product with their landmark keys.

        queries (Q, n_kv_heads, head_dim) float tensor. streams=None searches every stream;
        otherwise only those (names with no blocks contribute nothing). Returns ids (Q, H, k)
        int64 padded with -1 and scores (Q, H, k) float32 padded with -inf, sorted by
        descending score, both on queries.device. Raises ShapeError / LandmarkIndexError
        on bad input.
        """
        with self._lock:
            self._check_search(layer, queries, k, streams)
            k = int(k)
            n_q = queries.shape[0]
            out_ids = torch.full((n_q, self.n_kv_heads, k), -1, dtype=torch.int64)  # (Q, H, K)
            out_scores = torch.full((n_q, self.n_kv_heads, k), float("-inf"), dtype=torch.float32)  # (Q, H, K)
            rows, m = self._stream_rows(streams)
            if m == 0 or n_q == 0:
                return out_ids.to(queries.device), out_scores.to(queries.device)
            k_eff = min(k, m)

            if self._use_faiss(m) and self._auto_trusts_faiss(layer, queries, k_eff, rows):
                allowed = None if rows is None else self._ids[rows]
                ids_np, scores_np = self._faiss.search(layer, queries.detach().to("cpu", torch.float32).numpy(), k_eff, allowed)
                out_ids[..., :k_eff] = torch.from_numpy(ids_np)
                out_scores[..., :k_eff] = torch.from_numpy(scores_np)
                return out_ids.to(queries.device), out_scores.to(queries.device)

            ids_t, scores_t = self._exact_search(layer, queries, k_eff, rows)
            out_ids, out_scores = out_ids.to(self.device), out_scores.to(self.device)
            out_ids[..., :k_eff] = ids_t
            out_scores[..., :k_eff] = scores_t
            return out_ids.to(queries.device), out_scores.to(queries.device)

    def search_max(self, layer: int, queries: torch.Tensor, k: int,
                   streams: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k blocks per KV head by their best score over ALL the queries (max-aggregated).

        The same blocks as taking each query's top-k and keeping, per head, the k distinct
        ids with the highest max score (a block in the aggregated top-k is in the top-k of
        the query attaining its max), without a per-query top-k over every key: exact
        search reduces the (queries x keys) scores with a max, so its cost per call grows
        with the keys by one matmul only. Returns ids (1, H, k) int64 padded with -1 and
        scores (1, H, k) float32 padded with -inf, sorted by descending score.
        """
        with self._lock:
            self._check_search(layer, queries, k, streams)
            rows, m = self._stream_rows(streams)
            if m == 0 or queries.shape[0] == 0 or self._use_faiss(m):
                return aggregate_max(*self.search(layer, queries, k, streams), int(k))
            keys, ids = self._exact_keys(layer, rows)
            q = queries.detach().to(self.device, torch.float32)
            if q.shape[0] <= _FEW_QUERIES:
                # decode (a few queries): one (H, Q, D) x (H, D, N) matmul, then the max over
                # Q rows; faster on CPU than (H, N, D) x (H, D, Q), whose output is too narrow
                best = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)).amax(dim=1)  # (H, N)
            else:
                # the fused CPU kernel where registered, else key tiles of a bmm (max_scores.py)
                best = torch.empty(self.n_kv_heads, m, dtype=torch.float32, device=self.device)
                max_scores(q.transpose(0, 1).contiguous(), keys, best)  # queries (H, Q, D)
            k_eff = min(int(k), m)
            top_s, top_i = best.topk(k_eff, dim=-1)  # (H, k')
            out_ids = torch.full((1, self.n_kv_heads, int(k)), -1, dtype=torch.int64, device=self.device)
            out_s = torch.full((1, self.n_kv_heads, int(k)), float("-inf"), dtype=torch.float32, device=self.device)
            out_ids[0, :, :k_eff], out_s[0, :, :k_eff] = ids[top_i], top_s
            return out_ids.to(queries.device), out_s.to(queries.device)

    def _check_search(self, layer: int, queries: object, k: object, streams: object) -> None:
        """The argument checks of `search` and `search_max` (ShapeError / LandmarkIndexError)."""
        self._check_layer(layer)
        if not isinstance(queries, torch.Tensor):
            raise ShapeError(f"search: queries of type {type(queries).__name__}, expected torch.Tensor")
        if not queries.is_floating_point():
            raise ShapeError(f"search: queries dtype {queries.dtype}, expected a float dtype")
        if queries.ndim != 3 or tuple(queries.shape[1:]) != (self.n_kv_heads, self.head_dim):
            raise ShapeError(f"search: queries shape {tuple(queries.shape)}, expected (n_q, n_kv_heads, head_dim)="
                             f"(n_q, {self.n_kv_heads}, {self.head_dim})")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise LandmarkIndexError(f"search: k={k!r}, expected an int >= 1")
        if isinstance(streams, (str, bytes)) or (streams is not None and not all(isinstance(s, str) for s in streams)):
            raise LandmarkIndexError(f"search: streams={streams!r}, expected None or a sequence of str")

    def _bound_rows_cache(self) -> None:
        """Keep the row cache small when many stream sets are searched between changes."""
        if len(self._rows_cache) >= _ROWS_CACHE_MAX:
            self._rows_cache.clear()

    def _stream_rows(self, streams: Sequence[str] | None) -> tuple[np.ndarray | None, int]:
        """(rows of those streams or None for every row, number of rows searched). Cached until
        the next add or delete (every layer of a step searches the same streams)."""
        if streams is not None:
            key = frozenset(streams)
            if key not in self._rows_cache:
                self._bound_rows_cache()
                codes = [self._stream_code[s] for s in key if s in self._stream_code]
                # shared by every search until the next change: callers only read it (it is not
                # flagged read-only because torch.from_numpy warns about such arrays)
                self._rows_cache[key] = (np.nonzero(np.isin(self._codes[: self._n], codes))[0]
                                         if len(codes) < len(self._stream_code) else None)
            rows = self._rows_cache[key]
            if rows is not None:
                return rows, len(rows)
        return None, self._n

    def _device_ids(self) -> torch.Tensor:
        """The ids (N,) on the index's device, cached until the next add or delete."""
        if self._ids_dev is None:
            self._ids_dev = torch.from_numpy(self._ids[: self._n].copy()).to(self.device)
        return self._ids_dev

    def _exact_keys(self, layer: int, rows: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Landmark keys (H, M, D) of `layer` and their ids (M,) on the device, restricted to rows."""
        keys = self._keys[layer, :, : self._n]  # (H, N, D)
        ids = self._device_ids()  # (N,)
        if rows is not None:
            rows_t = torch.from_numpy(rows).to(self.device)
            keys, ids = keys.index_select(1, rows_t), ids.index_select(0, rows_t)
        return keys, ids

    def _use_faiss(self, m: int) -> bool:
        """Whether a search over m keys goes through faiss (building/updating it first)."""
        if self._faiss is None or (self.backend == "auto" and m <= self.exact_threshold):
            return False
        if not self._faiss_synced or self._faiss.needs_rebuild(self._n):
            keys = self._keys[:, :, : self._n].cpu().numpy()  # (L, H, N, D)
            self._faiss.rebuild(self._ids[: self._n].copy(), keys)
            self._faiss_synced = True
        return self._faiss.ready()  # an untrained ivf searches exactly

    def _auto_trusts_faiss(self, layer: int, queries: torch.Tensor, k: int, rows: np.ndarray | None) -> bool:
        """auto only: use faiss only if its recall@k against exact search, measured on (up to
        AUTO_CALIBRATION_QUERIES of) the live queries, reaches AUTO_MIN_RECALL. Measured once per
        faiss build and again whenever N has doubled since; random-like keys fail this (see the
        benchmark) and stay exact."""
        if self.backend != "auto":
            return True
        if self._auto_recall is None or self._n >= 2 * self._auto_calibrated_n:
            q = queries[:AUTO_CALIBRATION_QUERIES]
            exact_ids, _ = self._exact_search(layer, q, k, rows)  # (q, H, k)
            allowed = None if rows is None else self._ids[rows]
            approx_ids, _ = self._faiss.search(layer, q.detach().to("cpu", torch.float32).numpy(), k, allowed)
            e, a = exact_ids.cpu().numpy().reshape(-1, k), approx_ids.reshape(-1, k)
            self._auto_recall = float(np.mean([len(np.intersect1d(x, y)) for x, y in zip(e, a)])) / k
            self._auto_calibrated_n = self._n
        return self._auto_recall >= AUTO_MIN_RECALL

    def _exact_search(self, layer: int, queries: torch.Tensor, k: int,
                      rows: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k on the device: ids (Q, H, k) int64 and scores (Q, H, k) float32."""
        keys, ids = self._exact_keys(layer, rows)
        q = queries.detach().to(self.device, torch.float32)  # (Q, H, D)
        n_q, m = q.shape[0], keys.shape[1]
        chunk = max(k, _SCORE_CHUNK_ELEMS // max(1, n_q * self.n_kv_heads))
        best_s = best_i = None
        for start in range(0, m, chunk):
            s = torch.einsum("qhd,hnd->hqn", q, keys[:, start:start + chunk])  # (H, Q, C)
            top_s, top_i = s.topk(min(k, s.shape[-1]), dim=-1)  # (H, Q, k')
            top_i = top_i + start
            if best_s is not None:
                top_s, sel = torch.cat([best_s, top_s], -1).topk(k, dim=-1)  # (H, Q, k)
                top_i = torch.cat([best_i, top_i], -1).gather(-1, sel)
            best_s, best_i = top_s, top_i
        return ids[best_i].permute(1, 0, 2), best_s.permute(1, 0, 2)  # (Q, H, k) each
