"""StoreLayout: the fixed shape, dtype and model fingerprint of every block in a store.

A block holds, per layer, K (before RoPE) and V of shape (n_kv_heads, block_len,
head_dim), plus one landmark key per layer and KV head (n_kv_heads, head_dim).
The layout is fixed when a store is created and compared on every open; the
fingerprint names the model that wrote the store, so a store is never read by a
model whose keys mean something else.

bfloat16 has no numpy/zarr dtype: it is stored in zarr as its raw uint16 bits
(`zarr_dtype`) and viewed back as torch.bfloat16 on read, so no value is ever
rounded on the way to disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .errors import ShapeError

__all__ = ["StoreLayout", "DTYPES"]

# name -> (torch dtype, zarr/numpy storage dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "float32": (torch.float32, "float32", 4),
    "float16": (torch.float16, "float16", 2),
    "bfloat16": (torch.bfloat16, "uint16", 2),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreLayout:
    """Shape of one block; fixed for the life of a store."""

    n_layers: int
    """Transformer layers; each block holds K and V for every layer."""
    n_kv_heads: int
    """KV heads per layer (grouped-query attention may have fewer than query heads)."""
    block_len: int
    """Tokens per block, landmark token included."""
    head_dim: int
    """Channels per head."""
    dtype: str = "float32"
    """Element type of K, V and landmark keys: one of DTYPES ("float32", "bfloat16", "float16")."""
    fingerprint: str = ""
    """Identifies the model that wrote the store; compared on open ("" = unspecified)."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_kv_heads", "block_len", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"StoreLayout.{name}={v!r}: expected an int >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"StoreLayout.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if not isinstance(self.fingerprint, str):
            raise ValueError(f"StoreLayout.fingerprint={self.fingerprint!r}: expected a str")

    # -- sizes and dtypes ---------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of K, V and landmarks."""
        return DTYPES[self.dtype][0]

    @property
    def zarr_dtype(self) -> str:
        """The dtype the zarr arrays are declared with (bfloat16 -> its uint16 bits)."""
        return DTYPES[self.dtype][1]

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPES[self.dtype][2]

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """Shape of one layer's K (or V) of one block: (n_kv_heads, block_len, head_dim)."""
        return (self.n_kv_heads, self.block_len, self.head_dim)

    @property
    def landmark_shape(self) -> tuple[int, int, int]:
        """Shape of one block's landmark keys: (n_layers, n_kv_heads, head_dim)."""
        return (self.n_layers, self.n_kv_heads, self.head_dim)

    def block_bytes(self) -> int:
        """Bytes of one (block, layer) cache entry: its K plus its V."""
        return 2 * self.n_kv_heads * self.block_len * self.head_dim * self.itemsize

    def check_blocks(self, k: torch.Tensor, v: torch.Tensor, landmarks: torch.Tensor, n: int) -> None:
        """ShapeError unless k, v are (n, L, H, T, D) and landmarks (n, L, H, D) tensors of this dtype."""
        L, H, T, D = self.n_layers, self.n_kv_heads, self.block_len, self.head_dim
        for name, t, shape in (("k", k, (n, L, H, T, D)), ("v", v, (n, L, H, T, D)), ("landmarks", landmarks, (n, L, H, D))):
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ShapeError(f"{name} has shape {tuple(t.shape)}, expected {shape} "
                                 f"(N, n_layers, n_kv_heads{', block_len' if len(shape) == 5 else ''}, head_dim)")
            if t.dtype != self.torch_dtype:
                raise ShapeError(f"{name} has dtype {t.dtype}, expected {self.torch_dtype} (the store layout dtype)")

    # -- conversions between torch tensors and storage arrays -----------------------
    def to_storage(self, t: torch.Tensor) -> np.ndarray:
        """A CPU tensor of this layout's dtype -> numpy array in the zarr storage dtype (shares memory)."""
        if self.dtype == "bfloat16":
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def from_storage(self, a: np.ndarray) -> torch.Tensor:
        """Inverse of to_storage (shares memory)."""
        if self.dtype == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    # -- (de)serialisation --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreLayout:
        """Inverse of to_dict; ValueError naming unknown or missing fields."""
        names = {"n_layers", "n_kv_heads", "block_len", "head_dim", "dtype", "fingerprint"}
        extra = set(d) - names
        if extra:
            raise ValueError(f"StoreLayout.from_dict: unknown fields {sorted(extra)}; allowed {sorted(names)}")
        return cls(**d)

    def describe(self) -> str:
        """One-line human description, used in error messages and `folio store inspect`."""
        fp = self.fingerprint or "<none>"
        return (f"n_layers={self.n_layers} n_kv_heads={self.n_kv_heads} block_len={self.block_len} "
                f"head_dim={self.head_dim} dtype={self.dtype} fingerprint={fp}")
