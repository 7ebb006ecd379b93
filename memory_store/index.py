"""LandmarkIndex: top-k search of queries against the landmark keys of stored blocks.

Per layer and KV head, a query's score against a block is the inner product
<query, landmark key> (no scaling). The index owns a copy of every block's landmark
keys (float32, on `device`) and answers `search` either exactly (one einsum over
all KV heads on the device, then top-k) or through a faiss backend
(index_backends.py: flat, ivf, hnsw; faiss on GPU when CUDA and a GPU faiss are
present). `backend="auto"` searches exactly while the searched set has at most
`exact_threshold` keys and above that uses `AUTO_APPROX_BACKEND`, chosen from the
measurements of bench/store_index.py (see the comment there).

Rows are appended in insertion order; `remove_stream` compacts the key rows and
removes the stream's ids from the faiss indexes by id (no retraining, no re-add).
faiss structures are built lazily on the first search that needs them and kept in
sync incrementally afterwards.

Not thread-safe by itself beyond one re-entrant lock around every public method.

Shape letters: N keys, L layers, H KV heads, D head_dim, Q queries, K top-k.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .errors import FormatVersionError, LandmarkIndexError, ShapeError, UnknownBlockError
from .index_backends import FAISS_BACKENDS, AnnParams, FaissBackend

__all__ = ["LandmarkIndex", "aggregate_max", "AnnParams", "BACKENDS", "AUTO_APPROX_BACKEND", "DEFAULT_EXACT_THRESHOLD"]

BACKENDS = ("auto", "exact") + FAISS_BACKENDS

# Measured by `python -m bench.store_index --quick` (200k keys, 2-core CPU, 256 queries; baseline =
# torch exact, which beat faiss Flat 2-5x here). Clustered keys: hnsw (M=32, efC=80) efSearch=128
# recall@10 0.997-0.999 at 23-51x, ivf (nlist=512) nprobe=8 recall 1.0 at 9-10x. Random Gaussian
# keys: no backend reaches recall 0.95 faster than exact (hnsw efSearch=512 0.99 at 0.33x (d=64),
# 0.84 at 1.3x (d=128); ivf nprobe=256 0.95 at 0.8x). So auto uses hnsw, but only after checking
# its recall against exact on the live queries (AUTO_MIN_RECALL); below that it stays exact.
# At 1M keys (`python -m bench.store_index`, d=64, bench/results/store_index_1M_partial.txt):
# clustered ivf nlist=1024 nprobe=16 recall@10 1.000 at 26.9x (build 4.4 s) vs hnsw efSearch=128
# 0.989 at 28.8x (build 65 s); one index per (layer, KV head) makes build cost count, so ivf.
AUTO_APPROX_BACKEND = "ivf"
AUTO_MIN_RECALL = 0.95
AUTO_CALIBRATION_QUERIES = 32
# Exact search of 256 queries over 64k keys takes ~40 ms on 2 cores; below that an hnsw graph
# (build ~1 s per 10k keys per (layer, head)) does not pay for itself.
DEFAULT_EXACT_THRESHOLD = 65_536

FORMAT_NAME = "folio-landmark-index"
FORMAT_VERSION = 1
_SCORE_CHUNK_ELEMS = 1 << 24  # exact search: at most 16M scores (64 MB) alive per chunk
_MAX_CHUNK_ELEMS = 1 << 20  # search_max: 1M scores (4 MB) per key tile (cache-sized; GPUs do not mind)
_ROWS_CACHE_MAX = 64  # distinct stream sets whose rows are kept between index changes
_FEW_QUERIES = 16  # search_max with at most this many queries: one untiled matmul (decode)


def _npy_bytes(a: np.ndarray) -> bytearray:
    """The .npy file of `a` (what np.save writes), built with one copy of the data: a 1M-token
    store's keys are not copied three times over when the index is saved."""
    a = np.asarray(a)
    h = io.BytesIO()
    np.lib.format.write_array_header_1_0(h, np.lib.format.header_data_from_array_1_0(a))
    head = h.getvalue()
    out = bytearray(len(head) + a.nbytes)
    out[:len(head)] = head
    if a.size:
        np.copyto(np.frombuffer(out, dtype=a.dtype, offset=len(head)).reshape(a.shape), a)
    return out


def _npy_load(b: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(b), allow_pickle=False)
    except ValueError as e:  # bad header / object arrays
        raise LandmarkIndexError(f"saved landmark index: {what} is not a readable .npy array ({e})") from e


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


class LandmarkIndex:
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
        new_cap = max(need, cap + cap // 2, 1024)  # 1.5x: a 1M-token store's keys are not doubled
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
                # Q rows; ~4x faster on CPU than (H, N, D) x (H, D, Q), whose output is too narrow
                best = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)).amax(dim=1)  # (H, N)
            else:
                qt = q.permute(1, 2, 0).contiguous()  # (H, D, Q)
                # key tiles small enough that the (H, C, Q) scores stay in cache for the max:
                # ~4x faster on CPU than one big matmul followed by a strided reduction
                chunk = max(64, _MAX_CHUNK_ELEMS // max(1, qt.shape[2] * self.n_kv_heads))
                best = torch.empty(self.n_kv_heads, m, dtype=torch.float32, device=self.device)
                for start in range(0, m, chunk):
                    s = torch.bmm(keys[:, start:start + chunk], qt)  # (H, C, Q)
                    best[:, start:start + s.shape[1]] = s.amax(dim=2)
            k_eff = min(int(k), m)
            top_s, top_i = best.topk(k_eff, dim=-1)  # (H, k')
            out_ids = torch.full((1, self.n_kv_heads, int(k)), -1, dtype=torch.int64, device=self.device)
            out_s = torch.full((1, self.n_kv_heads, int(k)), float("-inf"), dtype=torch.float32, device=self.device)
            out_ids[0, :, :k_eff], out_s[0, :, :k_eff] = ids[top_i], top_s
            return out_ids.to(queries.device), out_s.to(queries.device)

    def search_max_lanes(self, layer: int, queries: torch.Tensor, k: int,
                         streams: Sequence[Sequence[str]], key_map: torch.Tensor | None = None, *,
                         heads_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`search_max` for several lanes at once, each over its own streams.

        queries (B, Q, n_kv_heads, head_dim): lane b's Q queries; streams: one sequence of
        stream names per lane (a lane searches only those). Returns ids (B, H, k) int64
        padded with -1 and scores (B, H, k) float32 padded with -inf, sorted by descending
        score: row b equals `search_max(layer, queries[b], k, streams[b])[0]`. Exact search
        scores each lane's queries against its own keys (lanes padded to the longest) in one
        batched matmul per key tile (training: 4 lanes x 1,024 queries per layer); over the
        faiss threshold it runs `search_max` per lane. key_map: optional (head_dim, head_dim)
        matrix; the scores are then q . (k @ key_map) (e.g. every key rotated by one RoPE
        position, so queries already rotated for attention need no second rotation): the
        keys are mapped (a few per lane), or, over the faiss threshold, the queries by its
        transpose (the same scores). heads_first=True: queries are (lanes, n_kv_heads, n_q,
        head_dim) instead (attention's layout: scored without a transposing copy).
        """
        with self._lock:
            if not isinstance(queries, torch.Tensor) or queries.ndim != 4:
                raise ShapeError(f"search_max_lanes: queries of shape {getattr(queries, 'shape', None)}, "
                                 "expected a (lanes, n_q, n_kv_heads, head_dim) tensor")
            if isinstance(streams, (str, bytes)) or len(streams) != queries.shape[0]:
                raise LandmarkIndexError(f"search_max_lanes: {len(streams)} stream lists for "
                                         f"{queries.shape[0]} lanes, expected one per lane")
            if heads_first:
                queries = queries.transpose(1, 2)  # (B, Q, H, D) view
            for s in streams:
                if s is None:
                    raise LandmarkIndexError("search_max_lanes: every lane needs a sequence of streams, got None")
                self._check_search(layer, queries[0], k, s)
            if key_map is not None and (not isinstance(key_map, torch.Tensor)
                                        or tuple(key_map.shape) != (self.head_dim, self.head_dim)):
                raise ShapeError(f"search_max_lanes: key_map of shape {tuple(getattr(key_map, 'shape', ()))}, "
                                 f"expected ({self.head_dim}, {self.head_dim})")
            B, n_q, H = queries.shape[0], queries.shape[1], self.n_kv_heads
            k = int(k)
            lane_rows, rows_t, padding, groups = self._lanes_layout(streams, H)
            m = max((len(r) for r in lane_rows), default=0)
            out_ids = torch.full((B, H, k), -1, dtype=torch.int64, device=self.device)
            out_s = torch.full((B, H, k), float("-inf"), dtype=torch.float32, device=self.device)
            if m == 0 or n_q == 0:
                return out_ids.to(queries.device), out_s.to(queries.device)
            if self._use_faiss(m):
                if key_map is not None:
                    queries = queries.detach().float() @ key_map.to(queries.device, torch.float32).T
                parts = [self.search_max(layer, queries[b], k, streams[b]) for b in range(B)]
                return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            keys = self._keys[layer].index_select(1, rows_t).view(H, B, m, -1).transpose(0, 1).reshape(B * H, m, -1)
            if key_map is not None:
                keys = keys @ key_map.to(self.device, torch.float32)
            # (B*H, D, Q): a view of head-major queries (bmm reads the transpose as it is)
            qt = queries.detach().to(self.device, torch.float32).transpose(1, 2).reshape(B * H, n_q, -1).transpose(1, 2)
            best = torch.empty(B * H, m, dtype=torch.float32, device=self.device)  # past a lane's keys: unused
            for lo, hi, n_keys in groups:
                chunk = max(64, _MAX_CHUNK_ELEMS // max(1, (hi - lo) * n_q))
                for start in range(0, n_keys, chunk):
                    end = min(n_keys, start + chunk)
                    best[lo:hi, start:end] = torch.bmm(keys[lo:hi, start:end], qt[lo:hi]).amax(dim=2)  # (rows, C)
            best = best.view(B, H, m)
            ids = self._device_ids()
            kc = min(k, m)
            # one top-k over every lane (padding -inf) when its result cannot depend on how ties
            # are broken: no two equal finite scores among any lane's best k+1. Otherwise (e.g.
            # layer 0, where every landmark key is the same) per lane as below.
            padded = best.masked_fill(padding, float("-inf"))
            top_s, top_i = padded.topk(min(k + 1, m), dim=-1)  # (B, H, k+1), descending
            fin = torch.isfinite(top_s)
            if not bool(((top_s[..., 1:] == top_s[..., :-1]) & fin[..., 1:]).any()):
                top_s, top_i, fin = top_s[..., :kc], top_i[..., :kc], fin[..., :kc]
                rows = torch.gather(rows_t.view(B, 1, m).expand(B, H, m), 2, top_i)
                out_ids[..., :kc] = ids[rows].masked_fill(~fin, -1)
                out_s[..., :kc] = top_s
                return out_ids.to(queries.device), out_s.to(queries.device)
            for b, r in enumerate(lane_rows):
                # top-k over exactly the lane's keys in row order: the input search_max gets, so
                # equal scores (every block's landmark key is the same at layer 0) resolve alike
                k_eff = min(k, len(r))
                if k_eff:
                    top_s, top_i = best[b, :, : len(r)].topk(k_eff, dim=-1)  # (H, k')
                    out_ids[b, :, :k_eff] = ids[rows_t[b * m:b * m + len(r)][top_i]]
                    out_s[b, :, :k_eff] = top_s
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

    def _lanes_layout(self, streams: Sequence[Sequence[str]], H: int):
        """search_max_lanes' view of the lanes (cached with the stream rows, until the next add
        or delete; every layer of a training step asks for the same lanes): each lane's rows
        in row order (as search_max gathers them), those rows padded to the longest lane
        (B*m,) on the device, which of those padded slots are padding (B, 1, m), and the row groups
        scored together: all lanes in one batched matmul when they are of similar length,
        lane by lane when one long document sits among short ones (padding to the longest
        would more than 1.5x the work)."""
        key = ("lanes", H, tuple(frozenset(st) for st in streams))
        got = self._rows_cache.get(key)
        if got is None:
            self._bound_rows_cache()
            lane_rows = []
            for st in streams:
                rows, _ = self._stream_rows(st)
                lane_rows.append(np.arange(self._n) if rows is None else rows)
            B, m = len(lane_rows), max((len(r) for r in lane_rows), default=0)
            pad = np.zeros((B, m), dtype=np.int64)
            for b, r in enumerate(lane_rows):
                pad[b, : len(r)] = r
            rows_t = torch.from_numpy(pad.reshape(-1)).to(self.device)
            lens = torch.tensor([len(r) for r in lane_rows], device=self.device)
            padding = torch.arange(m, device=self.device) >= lens[:, None, None]  # (B, 1, m)
            if B * m <= 1.5 * sum(len(r) for r in lane_rows):
                groups = [(0, B * H, m)]  # (first row, end row, keys) of best scored together
            else:
                groups = [(b * H, (b + 1) * H, len(r)) for b, r in enumerate(lane_rows)]
            got = self._rows_cache[key] = (lane_rows, rows_t, padding, groups)
        return got

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

    # -- persistence ----------------------------------------------------------------
    def save(self, write: Callable[[str, bytes], None]) -> None:
        """Serialise through write(key, bytes): meta.json, ids.npy, codes.npy, keys.npy and, when built,
        faiss_{layer}_{head}.bin (faiss.serialize_index) plus faiss_deleted.npy. No pickle anywhere.
        The caller namespaces the keys (e.g. under an "index/" prefix)."""
        with self._lock:
            n = self._n
            faiss_meta, blobs, deleted = None, [], np.empty(0, np.int64)
            if self._faiss is not None and self._faiss_synced:
                faiss_meta, blobs = self._faiss.state()
                deleted = self._faiss.deleted_ids()
            meta = {
                "format": FORMAT_NAME, "version": FORMAT_VERSION,
                "n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "backend": self.backend, "exact_threshold": self.exact_threshold, "params": self.params.to_dict(),
                "generation": int(self.generation), "n": n, "next_code": self._next_code,
                "streams": [[s, c] for s, c in self._stream_code.items()], "faiss": faiss_meta,
            }
            write("ids.npy", _npy_bytes(self._ids[:n]))
            write("codes.npy", _npy_bytes(self._codes[:n]))
            write("keys.npy", _npy_bytes(self._keys[:, :, :n].cpu().numpy()))  # (L, H, N, D)
            write("faiss_deleted.npy", _npy_bytes(deleted))
            for slot, blob in enumerate(blobs):
                layer, head = divmod(slot, self.n_kv_heads)
                write(f"faiss_{layer}_{head}.bin", blob.tobytes())
            # meta last: a reader that finds it finds everything it names.
            write("meta.json", json.dumps(meta).encode())

    @classmethod
    def load(cls, read: Callable[[str], bytes | None], *, device: str | torch.device = "cpu") -> LandmarkIndex | None:
        """Inverse of save(); None when nothing was saved (read("meta.json") is None).

        Raises FormatVersionError for another format/version, LandmarkIndexError for inconsistent files.
        """
        raw = read("meta.json")
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LandmarkIndexError(f"saved landmark index: meta.json is not JSON ({e})") from e
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise FormatVersionError(f"saved landmark index has format {meta.get('format')!r} version "
                                     f"{meta.get('version')!r}; this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}")

        def need(key: str) -> bytes:
            b = read(key)
            if b is None:
                raise LandmarkIndexError(f"saved landmark index: {key} is missing")
            return b

        index = cls(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"], backend=meta["backend"], device=device,
                    exact_threshold=meta["exact_threshold"], params=AnnParams.from_dict(meta["params"]))
        n = int(meta["n"])
        ids = _npy_load(need("ids.npy"), "ids.npy")
        codes = _npy_load(need("codes.npy"), "codes.npy")
        keys = _npy_load(need("keys.npy"), "keys.npy")
        want = (index.n_layers, index.n_kv_heads, n, index.head_dim)
        if ids.shape != (n,) or ids.dtype != np.int64 or codes.shape != (n,) or keys.shape != want or keys.dtype != np.float32:
            raise LandmarkIndexError(f"saved landmark index: arrays ids {ids.shape}/{ids.dtype}, codes {codes.shape}, keys "
                                     f"{keys.shape}/{keys.dtype} do not match n={n} and keys shape (L, H, N, D)={want} float32")
        index._grow(n)
        index._keys[:, :, :n] = torch.from_numpy(keys).to(index.device)
        index._ids[:n], index._codes[:n], index._n = ids, codes, n
        index._stream_code = {s: int(c) for s, c in meta["streams"]}
        index._stream_count = {s: int((codes == c).sum()) for s, c in index._stream_code.items()}
        index._next_code = int(meta["next_code"])
        order = np.argsort(ids, kind="stable")
        index._sorted_ids, index._sorted_rows = ids[order], order.astype(np.int64)
        index.generation = int(meta["generation"])
        fm = meta.get("faiss")
        # A faiss state of another kind (AUTO_APPROX_BACKEND changed since) is ignored and rebuilt lazily.
        if index._faiss is not None and fm is not None and fm.get("kind") == index._faiss.kind:
            blobs = []
            if fm.get("built"):
                blobs = [np.frombuffer(need(f"faiss_{l}_{h}.bin"), dtype=np.uint8).copy()
                         for l in range(index.n_layers) for h in range(index.n_kv_heads)]
            index._faiss.restore(fm, blobs, _npy_load(need("faiss_deleted.npy"), "faiss_deleted.npy"))
            index._faiss_synced = True
        return index
