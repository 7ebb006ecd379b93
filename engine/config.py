"""Model configuration: one validated dataclass and its presets.

Presets are plain data (a dict of field values). `tiny` trains on a CPU in minutes, `small`
is ~25M parameters, and `llama-1b` / `llama-7b` carry the shapes of Llama-style models;
those two are for planning and are never built in tests. Choice fields are `Literal`s whose
values `__post_init__` checks at run time too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

AttentionMode = Literal["landmark", "causal"]
DType = Literal["float32", "bfloat16", "float16"]
RopeScalingType = Literal["llama3", "linear"]
ATTENTION_MODES: tuple[str, ...] = get_args(AttentionMode)
DTYPES: tuple[str, ...] = get_args(DType)
ROPE_SCALING_TYPES: tuple[str, ...] = get_args(RopeScalingType)
# fields added after stores and checkpoints were first written: left out of the fingerprint
# while they hold their default, so existing stores and checkpoints keep theirs
_LATER_FIELDS = {"rope_scaling": None, "qkv_bias": False, "o_bias": False, "source": "", "folded_window": 0, "uio": None}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling of long-context checkpoints (hashable, for rope tables).

    llama3: Llama 3.1's piecewise rule (wavelengths longer than
    original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than
    ... / high_freq_factor kept, smooth in between); linear: every frequency divided by `factor`.
    """

    rope_type: RopeScalingType
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, inv: "Any") -> "Any":
        """Scale base inverse frequencies (a float64 tensor (D/2,)) -> scaled (D/2,)."""
        if self.rope_type == "linear":
            return inv / self.factor
        old = self.original_max_position_embeddings
        low_wl, high_wl = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = inv.where(wavelen <= low_wl, inv / self.factor)  # long wavelengths: divided
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return smoothed.where(medium, scaled)


def rope_scaling_from_dict(d: dict[str, Any] | None) -> RopeScaling | None:
    """A config's `rope_scaling` dict (Hugging Face's keys) -> RopeScaling, or None.

    Raises ValueError naming the key when the type or a value is not supported."""
    if d is None:
        return None
    if not isinstance(d, dict):
        _fail("rope_scaling", d, "None or a dict with rope_type and factor")
    kind = d.get("rope_type", d.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALING_TYPES:
        _fail("rope_scaling", d, f"rope_type one of {ROPE_SCALING_TYPES} (or default)")
    try:
        factor = float(d["factor"])
    except (KeyError, TypeError, ValueError):
        _fail("rope_scaling", d, "needs a numeric 'factor'")
    if not factor >= 1:
        _fail("rope_scaling", d, "factor must be >= 1")
    if kind == "linear":
        return RopeScaling("linear", factor)
    try:
        rs = RopeScaling("llama3", factor, float(d.get("low_freq_factor", 1.0)),
                         float(d.get("high_freq_factor", 4.0)),
                         int(d.get("original_max_position_embeddings", 8192)))
    except (TypeError, ValueError):
        _fail("rope_scaling", d, "numeric low_freq_factor, high_freq_factor, original_max_position_embeddings")
    if not rs.high_freq_factor > rs.low_freq_factor > 0 or rs.original_max_position_embeddings < 1:
        _fail("rope_scaling", d, "0 < low_freq_factor < high_freq_factor and original_max_position_embeddings >= 1")
    return rs


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ModelConfig.{field}={value!r} is invalid: {allowed}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shapes and options of a decoder-only landmark transformer."""

    vocab_size: int = 260
    """Vocabulary size, special tokens included (the byte tokenizer uses 260)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per layer."""
    n_kv_heads: int = 2
    """Key/value heads per layer (grouped-query attention); divides n_heads."""
    ffn_hidden: int = 352
    """Hidden width of the SwiGLU feed-forward."""
    max_seq_len: int = 512
    """Training window in positions (landmarks included)."""
    block_len: int = 64
    """Positions per block; each block is block_len - 1 tokens then its landmark."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    attention: AttentionMode = "landmark"
    """'landmark' (grouped softmax, the paper's) or 'causal' (plain, a baseline)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection."""
    dtype: DType = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling as in a Hugging Face config (rope_type 'llama3' or 'linear'), or None."""
    qkv_bias: bool = False
    """Bias on the query, key and value projections (Qwen2; Llama with attention_bias)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama with attention_bias)."""
    source: str = ""
    """Where imported weights came from (file name and a hash of the weights), '' for Folio's
    own models: part of the fingerprint, so a store written by one checkpoint refuses another
    of the same shape."""
    folded_window: int = 0
    """Folded context (engine/folded.py, a reconstruction of arXiv 2405.04620): every layer also
    attends to the previous window of this many positions at the same layer; 0 = off. A multiple
    of block_len (windows hold whole blocks, which the store keeps)."""

    uio: dict[str, Any] | None = None
    """UIO-LLMs' compressed memories (engine/uio.py): the `UIOConfig` fields as a dict (ratio,
    LoRA ranks, reservoir S, factor, ...), or None = off. The model then carries the UIO modules."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "ffn_hidden", "max_seq_len", "block_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(name, v, "must be a positive int")
        if self.block_len < 2:
            _fail("block_len", self.block_len, "must be >= 2 (at least one token and its landmark)")
        if self.d_model % self.n_heads:
            _fail("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            _fail("d_model", self.d_model, "d_model / n_heads must be even for RoPE")
        if self.attention not in ATTENTION_MODES:
            _fail("attention", self.attention, f"one of {ATTENTION_MODES}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {DTYPES}")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if not self.norm_eps > 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")
        rope_scaling_from_dict(self.rope_scaling)  # raises on an unsupported scaling
        for name in ("qkv_bias", "o_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool")
        if not isinstance(self.source, str):
            _fail("source", self.source, "must be a str")
        if self.uio is not None:
            if not isinstance(self.uio, dict):
                _fail("uio", self.uio, "None or a dict of UIOConfig fields")
            from engine.uio import UIOConfig

            try:
                UIOConfig(**self.uio)
            except TypeError as e:
                _fail("uio", self.uio, f"UIOConfig fields only ({e})")
        fw = self.folded_window
        if not isinstance(fw, int) or isinstance(fw, bool) or fw < 0 or (fw and fw % self.block_len):
            _fail("folded_window", fw, f"0 (off) or a positive multiple of block_len={self.block_len}")

    @property
    def rope(self) -> tuple[float, RopeScaling | None]:
        """(theta, scaling): what RoPE tables are computed from."""
        if self.rope_scaling is None:  # the hot path: every layer call of retrieval asks
            return float(self.rope_theta), None
        return float(self.rope_theta), rope_scaling_from_dict(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def landmarks(self) -> bool:
        return self.attention == "landmark"

    def num_params(self) -> int:
        """Parameter count computed from the shapes (no model is built)."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d
        attn += (self.n_heads + 2 * self.n_kv_heads) * hd * self.qkv_bias + d * self.o_bias
        ffn = 3 * d * self.ffn_hidden
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + emb + head + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def fingerprint(self) -> str:
        """A short stable hash of the fields that change what the KV store holds."""
        import hashlib

        d = {k: v for k, v in self.to_dict().items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a CPU in minutes.
    "tiny": dict(vocab_size=260, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                 ffn_hidden=352, max_seq_len=512, block_len=64),
    # ~25M parameters.
    "small": dict(vocab_size=260, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                  ffn_hidden=1536, max_seq_len=1024, block_len=64),
    # Shapes of Llama-style models, for planning; never built in tests.
    "llama-1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     ffn_hidden=8192, max_seq_len=2048, block_len=64, rope_theta=500000.0,
                     tie_embeddings=True, dtype="bfloat16"),
    "llama-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     ffn_hidden=11008, max_seq_len=2048, block_len=64, dtype="bfloat16"),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a preset name, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} does not exist; allowed: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
