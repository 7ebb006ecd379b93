"""faiss backends of the landmark index: one faiss index per (layer, KV head).

`LandmarkIndex` (index.py) owns the landmark keys and the exact torch search; this
file owns the approximate/faiss side: a `FaissBackend` holds, for every layer and
KV head, one faiss index over the same rows, addressed by the blocks' own int64
ids, and keeps it in sync incrementally (add, remove by id) so that deleting a
stream never rebuilds everything.

    flat  IndexIDMap2(IndexFlatIP)             exact inner product, remove_ids is O(N) compaction
    ivf   IndexIVFFlat(METRIC_INNER_PRODUCT)   trained once enough keys exist; until then the
                                               caller searches exactly (`ready()` is False)
    hnsw  IndexIDMap2(IndexHNSWFlat, IP)       faiss HNSW cannot remove: removed ids are
                                               filtered out by an IDSelector and the graph is
                                               rebuilt only once they outnumber the live ones

On a CUDA device with a GPU build of faiss, flat and ivf searches run on a GPU
copy of each index (`faiss.index_cpu_to_gpu`), refreshed lazily after mutation;
the CPU index stays the truth (it is what gets serialised). Stream-restricted
searches use IDSelectors, which faiss GPU does not support, so they run on CPU.

Threads. faiss runs its calls with FOLIO_FAISS_THREADS OpenMP threads (default 1: two
busy thread pools on the same cores slowed or hung runs on small machines; set it
higher on large machines where index build time matters). torch and faiss can end up
on ONE OpenMP runtime in a process, where faiss's thread setting is torch's too: an
import-time `omp_set_num_threads(1)` silently made every torch op in any process that
imported memory_store single-threaded (training with retrieval ran ~2x slower than
without for that reason alone). So the setting is made around each faiss call only,
and torch's own thread count is put back after it (`_faiss_threads_scope`).

Shape letters: N keys, L layers, H KV heads, D head_dim, Q queries, K top-k.
"""

from __future__ import annotations

import math
import os
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .errors import LandmarkIndexError

__all__ = ["AnnParams", "FaissBackend", "FAISS_BACKENDS", "faiss_gpu_available"]

FAISS_BACKENDS = ("flat", "ivf", "hnsw")


def _faiss_threads() -> int:
    raw = os.environ.get("FOLIO_FAISS_THREADS", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"FOLIO_FAISS_THREADS={raw!r} is not an integer; use a thread count >= 1") from None
    if n < 1:
        raise ValueError(f"FOLIO_FAISS_THREADS={n} is not allowed; use a thread count >= 1")
    return n


@contextmanager
def _faiss_threads_scope():
    """Run a faiss call with FOLIO_FAISS_THREADS OpenMP threads, then give torch back its
    own thread count (one OpenMP runtime may serve both libraries)."""
    torch_threads = torch.get_num_threads()
    n = _faiss_threads()
    if n == torch_threads:  # nothing to change, nothing to restore
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)


def _in_faiss_threads(fn):
    """Decorator: the whole call runs inside `_faiss_threads_scope`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _faiss_threads_scope():
            return fn(*args, **kwargs)
    return wrapper


_faiss_threads()  # a malformed FOLIO_FAISS_THREADS fails at import, as it always did


def faiss_gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass(kw_only=True, slots=True)
class AnnParams:
    """Tuning of the approximate backends (defaults from bench/store_index.py, see index.py)."""

    ivf_nlist: int | None = None
    """IVF cells; None = about sqrt(N) at training time (power of two, 16..16384)."""
    ivf_nprobe: int | None = None
    """Cells probed per query; None = ceil(nlist * ivf_probe_fraction)."""
    ivf_probe_fraction: float = 1 / 64
    """Fraction of cells probed when ivf_nprobe is None."""
    ivf_min_train: int = 4096
    """IVF is trained once this many keys exist; below it searches are exact."""
    ivf_retrain_growth: float = 16.0
    """Retrain (and re-add) when N has grown this many times since the last training."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    hnsw_ef_construction: int = 80
    """HNSW build beam width."""
    hnsw_ef_search: int = 128
    """HNSW search beam width (faiss' default 16 gives poor recall on d=64-128); raised to k if smaller."""

    def __post_init__(self) -> None:
        for name in ("ivf_nlist", "ivf_nprobe"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"AnnParams.{name}={v!r}: expected None or an int >= 1")
        if not 0.0 < self.ivf_probe_fraction <= 1.0:
            raise ValueError(f"AnnParams.ivf_probe_fraction={self.ivf_probe_fraction!r}: expected a float in (0, 1]")
        if not isinstance(self.ivf_min_train, int) or self.ivf_min_train < 1:
            raise ValueError(f"AnnParams.ivf_min_train={self.ivf_min_train!r}: expected an int >= 1")
        if not self.ivf_retrain_growth > 1.0:
            raise ValueError(f"AnnParams.ivf_retrain_growth={self.ivf_retrain_growth!r}: expected a float > 1")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                raise ValueError(f"AnnParams.{name}={v!r}: expected an int >= 2")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict) -> "AnnParams":
        return cls(**{k: v for k, v in d.items() if k in cls.__slots__})


def _default_nlist(n: int) -> int:
    # ~sqrt(N) cells of ~sqrt(N) keys balances quantizer cost against list scans;
    # at least 39 training points per cell (faiss' k-means warns below that).
    nlist = 2 ** round(math.log2(max(16.0, math.sqrt(n))))
    return int(max(1, min(nlist, 16384, n // 39)))


class FaissBackend:
    """One faiss index per (layer, KV head) over the same block ids."""

    def __init__(self, kind: str, n_layers: int, n_kv_heads: int, head_dim: int, params: AnnParams,
                 *, gpu_device: int | None = None) -> None:
        if kind not in FAISS_BACKENDS:
            raise LandmarkIndexError(f"faiss backend {kind!r} unknown; expected one of {FAISS_BACKENDS}")
        self.kind = kind
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.params = params
        self._indexes: list[faiss.Index] | None = None  # L*H, row-major (layer, head); None = untrained ivf
        self.trained_n = 0  # ivf: number of keys at the last training
        self.nlist = 0
        self._deleted: set[int] = set()  # hnsw only: ids removed but still in the graph
        self._gpu_device = gpu_device if (gpu_device is not None and kind in ("flat", "ivf") and faiss_gpu_available()) else None
        self._gpu_res = None
        self._gpu: dict[int, tuple[faiss.Index, np.ndarray | None]] = {}  # slot -> (gpu index, label->id map)

    # -- building -------------------------------------------------------------------
    def _new_index(self) -> faiss.Index:
        d = self.head_dim
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if self.kind == "hnsw":
            h = faiss.IndexHNSWFlat(d, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = self.params.hnsw_ef_construction
            h.hnsw.efSearch = self.params.hnsw_ef_search
            return faiss.IndexIDMap2(h)
        quantizer = faiss.IndexFlatIP(d)
        # faiss' Python constructor keeps a reference to the quantizer alive for us.
        return faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)

    def ready(self) -> bool:
        """False while an ivf index waits for enough keys to be trained (search exactly meanwhile)."""
        return self._indexes is not None

    @_in_faiss_threads
    def rebuild(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Build every per-(layer, head) index from scratch from all live rows.

        ids (N,) int64; keys (L, H, N, D) float32. For ivf, trains when N >= ivf_min_train
        and otherwise leaves the backend not ready.
        """
        self._gpu.clear()
        self._deleted.clear()
        n = len(ids)
        if self.kind == "ivf":
            if n < self.params.ivf_min_train:
                self._indexes, self.trained_n = None, 0
                return
            self.nlist = self.params.ivf_nlist or _default_nlist(n)
            self.nlist = min(self.nlist, n)
        indexes = []
        rng = np.random.default_rng(0)
        for layer in range(self.n_layers):
            for head in range(self.n_kv_heads):
                x = np.ascontiguousarray(keys[layer, head])  # (N, D)
                index = self._new_index()
                if self.kind == "ivf":
                    # k-means on <= 64 points per cell: the extra samples cost time, not recall.
                    n_train = min(n, 64 * self.nlist)
                    sample = x if n_train == n else x[rng.choice(n, n_train, replace=False)]
                    index.train(sample)
                if n:
                    index.add_with_ids(x, ids)
                indexes.append(index)
        self._indexes = indexes
        self.trained_n = n

    def needs_rebuild(self, n_live: int) -> bool:
        """True when growth (ivf) or accumulated removals (hnsw) make a rebuild pay off."""
        if self.kind == "ivf":
            if self._indexes is None:
                return n_live >= self.params.ivf_min_train
            return n_live >= self.params.ivf_retrain_growth * max(1, self.trained_n)
        if self.kind == "hnsw":
            return len(self._deleted) > max(1024, n_live)
        return False

    # -- mutation -------------------------------------------------------------------
    @_in_faiss_threads
    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """ids (M,) int64 new; keys (L, H, M, D) float32."""
        if self._indexes is None:
            return
        self._gpu.clear()
        for slot, index in enumerate(self._indexes):
            layer, head = divmod(slot, self.n_kv_heads)
            index.add_with_ids(np.ascontiguousarray(keys[layer, head]), ids)

    @_in_faiss_threads
    def remove(self, ids: np.ndarray) -> None:
        """Drop these ids from every index (hnsw: mark them deleted)."""
        if self._indexes is None or len(ids) == 0:
            return
        self._gpu.clear()
        if self.kind == "hnsw":
            self._deleted.update(int(i) for i in ids)
            return
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        for index in self._indexes:
            index.remove_ids(sel)

    # -- search ---------------------------------------------------------------------
    def nprobe(self) -> int:
        if self.params.ivf_nprobe is not None:
            return min(self.params.ivf_nprobe, self.nlist)
        return max(1, min(self.nlist, math.ceil(self.nlist * self.params.ivf_probe_fraction)))

    def _search_params(self, k: int, sel: faiss.IDSelector | None):
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=self.nprobe(), sel=sel)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(self.params.hnsw_ef_search, k), sel=sel)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _gpu_index(self, slot: int) -> tuple[faiss.Index, np.ndarray | None]:
        """GPU copy of one index (and, for flat, its label -> id map), made on first use after a mutation."""
        if slot not in self._gpu:
            if self._gpu_res is None:
                self._gpu_res = faiss.StandardGpuResources()
            cpu = self._indexes[slot]
            if self.kind == "flat":
                # IndexIDMap2 has no GPU twin: copy the inner flat index and map labels back.
                inner = faiss.downcast_index(cpu.index)
                label_to_id = faiss.vector_to_array(cpu.id_map).astype(np.int64)
                gpu = faiss.index_cpu_to_gpu(self._gpu_res, self._gpu_device, inner)
                self._gpu[slot] = (gpu, label_to_id)
            else:
                gpu = faiss.index_cpu_to_gpu(self._gpu_res, self._gpu_device, cpu)
                gpu.nprobe = self.nprobe()
                self._gpu[slot] = (gpu, None)
        return self._gpu[slot]

    @_in_faiss_threads
    def search(self, layer: int, queries: np.ndarray, k: int,
               allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, H, D) float32; allowed: ids to restrict to (None = all live).

        Returns ids (Q, H, K) int64 (-1 pad) and scores (Q, H, K) float32 (-inf pad).
        """
        assert self._indexes is not None
        n_q = queries.shape[0]
        out_ids = np.full((n_q, self.n_kv_heads, k), -1, dtype=np.int64)  # (Q, H, K)
        out_scores = np.full((n_q, self.n_kv_heads, k), -np.inf, dtype=np.float32)  # (Q, H, K)
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        elif self._deleted:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._deleted, dtype=np.int64)))
        use_gpu = self._gpu_device is not None and sel is None and k <= 2048  # faiss GPU: no selectors, k <= 2048
        params = None if use_gpu else self._search_params(k, sel)
        for head in range(self.n_kv_heads):
            slot = layer * self.n_kv_heads + head
            q = np.ascontiguousarray(queries[:, head])  # (Q, D)
            if use_gpu:
                gpu, label_to_id = self._gpu_index(slot)
                scores, labels = gpu.search(q, k)  # (Q, K) each
                if label_to_id is not None:
                    labels = np.where(labels >= 0, label_to_id[np.maximum(labels, 0)], -1)
            else:
                scores, labels = self._indexes[slot].search(q, k, params=params)  # (Q, K) each
            missing = labels < 0
            scores[missing] = -np.inf  # faiss pads with -FLT_MAX for inner product
            out_ids[:, head] = labels
            out_scores[:, head] = scores
        return out_ids, out_scores

    # -- persistence ----------------------------------------------------------------
    def state(self) -> tuple[dict, list[np.ndarray]]:
        """JSON-able metadata and one serialised uint8 array per (layer, head) (empty if not built)."""
        meta = {"kind": self.kind, "trained_n": self.trained_n, "nlist": self.nlist,
                "built": self._indexes is not None}
        blobs = [faiss.serialize_index(ix) for ix in self._indexes] if self._indexes is not None else []
        return meta, blobs

    def deleted_ids(self) -> np.ndarray:
        return np.array(sorted(self._deleted), dtype=np.int64)

    def restore(self, meta: dict, blobs: list[np.ndarray], deleted: np.ndarray) -> None:
        """Inverse of state(); raises LandmarkIndexError when the blobs do not fit this backend."""
        self._gpu.clear()
        if not meta.get("built"):
            self._indexes, self.trained_n = None, 0
            return
        if len(blobs) != self.n_layers * self.n_kv_heads:
            raise LandmarkIndexError(
                f"saved {self.kind} index has {len(blobs)} faiss indexes, expected "
                f"n_layers*n_kv_heads={self.n_layers * self.n_kv_heads}")
        indexes = [faiss.deserialize_index(b) for b in blobs]
        for ix in indexes:
            if ix.d != self.head_dim:
                raise LandmarkIndexError(f"saved faiss index has d={ix.d}, expected head_dim={self.head_dim}")
        self._indexes = indexes
        self.trained_n = int(meta["trained_n"])
        self.nlist = int(meta["nlist"])
        self._deleted = set(int(i) for i in deleted)

    def ntotal(self) -> int:
        """Rows held by each faiss index (hnsw: including rows marked deleted)."""
        return int(self._indexes[0].ntotal) if self._indexes else 0
