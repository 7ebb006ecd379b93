"""Persistence of the LandmarkIndex: its own files, and its place beside a store's data.

The index is derived: a store saves it (keys index/g<generation>/... through its blob store)
on close, or every flush with save_index="flush", tagged with the commit generation; on open
it is loaded when its generation, size, shape and backend match the commit record, else
rebuilt from the persisted landmark keys of the live blocks. Files: meta.json (last: a
reader that finds it finds everything it names), ids.npy, codes.npy, keys.npy (L, H, N, D)
float32 and, when built, the faiss indexes (faiss.serialize_index). No pickle anywhere.
"""

from __future__ import annotations

import io
import json
from tokenize import TokenError
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import CorruptBlockError, FormatVersionError, LandmarkIndexError, StoreError
from .index_backends import AnnParams
from .protocols import BlobStore

if TYPE_CHECKING:
    from .index import LandmarkIndex

__all__ = ["IndexPersistence", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "folio-landmark-index"
FORMAT_VERSION = 1
_REBUILD_ROWS = 4096  # landmark rows read per batch when rebuilding


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
    except (ValueError, EOFError, SyntaxError, TokenError) as e:  # bad or truncated header / object arrays
        raise LandmarkIndexError(f"saved landmark index: {what} is not a readable .npy array ({e})") from e



class IndexPersistence:
    """LandmarkIndex's save/load, and saving into / opening from a store (mixed into LandmarkIndex)."""

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
        if not isinstance(meta, dict):
            raise LandmarkIndexError(f"saved landmark index: meta.json holds a {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise FormatVersionError(f"saved landmark index has format {meta.get('format')!r} version "
                                     f"{meta.get('version')!r}; this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}")

        def need(key: str) -> bytes:
            b = read(key)
            if b is None:
                raise LandmarkIndexError(f"saved landmark index: {key} is missing")
            return b

        try:
            index = cls(meta["n_layers"], meta["n_kv_heads"], meta["head_dim"], backend=meta["backend"], device=device,
                        exact_threshold=meta["exact_threshold"], params=AnnParams.from_dict(meta["params"]))
            n = int(meta["n"])
        except (KeyError, TypeError, ValueError) as e:  # a field missing or of the wrong kind
            raise LandmarkIndexError(f"saved landmark index: meta.json does not describe an index ({e!r})") from e
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

    # -- beside a store's data ------------------------------------------------------
    def save_generation(self, blobs: BlobStore, generation: int) -> None:
        """Save under index/g<generation>/ and remove every other generation's files."""
        self.generation = generation
        prefix = f"index/g{generation}"
        self.save(lambda key, data: blobs.write_blob(f"{prefix}/{key}", data))
        for name in blobs.list_dir("index"):
            if name != f"g{generation}":
                blobs.delete_prefix(f"index/{name}")

    @classmethod
    def open_or_rebuild(cls, blobs: BlobStore, generation: int, n_rows: int, n_live: int,
                        streams: Iterable[tuple[str, np.ndarray]],
                        read_keys: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *,
                        n_layers: int, n_kv_heads: int, head_dim: int, backend: str,
                        device: str | torch.device, where: str = "") -> tuple[LandmarkIndex, str]:
        """The index of a store at commit `generation` with `n_rows` rows, `n_live` of them live, and
        where it came from: "loaded" (saved for this generation and matching), "rebuilt" (from the
        landmark keys read_keys(rows) -> ((M, L, H, D) float, found (M,)) of every (stream, rows) in
        `streams`) or "new" (a store no row was ever put into). CorruptBlockError when a live block's landmark chunk is missing."""
        if n_rows:
            try:
                idx = cls.load(lambda key: blobs.read_blob(f"index/g{generation}/{key}"), device=device)
            except (StoreError, ValueError, OSError, KeyError, TypeError):
                idx = None  # unreadable, damaged or half-deleted by a writer: it is derived, rebuild it
            if idx is not None and (idx.generation != generation or len(idx) != n_live
                                    or (idx.n_layers, idx.n_kv_heads, idx.head_dim) != (n_layers, n_kv_heads, head_dim)
                                    or idx.backend != backend):
                idx = None
            if idx is not None:
                return idx, "loaded"
        idx = cls(n_layers, n_kv_heads, head_dim, backend=backend, device=device)
        source = "new"
        if n_rows:
            source = "rebuilt"
            for name, rows in streams:
                for s in range(0, rows.shape[0], _REBUILD_ROWS):
                    part = rows[s:s + _REBUILD_ROWS]
                    keys, found = read_keys(part)
                    if not found.all():
                        raise CorruptBlockError(f"block {int(part[~found][0])}: landmark chunk missing from "
                                                f"{where}", block_id=int(part[~found][0]))
                    idx.add(name, part, keys)
        idx.generation = generation
        return idx, source
