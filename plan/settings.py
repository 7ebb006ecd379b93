"""One point of the planner's search space, and the bytes it needs per component and tier.

`PlanSettings` is everything the planner chooses; `Component` is one entry of the
memory table (bytes on the device = one GPU, the host = the node's RAM, the disk = the
node's disk); `Estimate` holds all of them for one setting (components.py fills it).
The shape helpers below are shared by the component and activation models.

Symbols: P parameters, c bytes per compute element (2 for bf16, 4 for fp32), N data
parallel GPUs (world size), L layers, d d_model, H query heads, Hkv KV heads, hd head
dim, F ffn_hidden, V vocab, B micro-batch, T training window (positions), bl block_len,
k top-k, n_b stored blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import ModelConfig

TIERS = ("device", "host", "disk")
MODES = ("train", "infer")
OFFLOAD_TARGETS = ("none", "cpu", "nvme")
ATTENTION_IMPLS = ("vectorized", "blockwise")
PRECISIONS = ("bf16", "fp32")

GiB = 1024**3
DEVICE_RESERVED = int(0.75 * GiB)
"""CUDA context and library workspaces, not seen by the caching allocator."""
HOST_RESERVED = 2 * GiB
"""Python, torch and DeepSpeed per process (the resident set before any tensor)."""
FRAGMENTATION = 0.10
DISK_MARGIN = 0.05

# DeepSpeed buffer sizes (elements) that output.py writes into ds_config.json.
REDUCE_BUCKET = 50_000_000
ALLGATHER_BUCKET = 50_000_000
PREFETCH_BUCKET = 50_000_000
NVME_PARAM_BUFFERS = (5, 100_000_000)       # buffer_count, buffer_size (elements)
NVME_OPT_BUFFERS = 4                        # buffer_count
SUB_GROUP_SIZE = 100_000_000                # ZeRO-3 optimizer sub-group (elements)


def _fail(cls: str, name: str, value: object, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is invalid: {allowed}")


@dataclass(kw_only=True, slots=True)
class PlanSettings:
    """One point of the search space: everything the planner can choose."""

    mode: str = "train"
    """'train' (DeepSpeed trainer) or 'infer' (ingest / ask)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (train only)."""
    offload_optimizer: str = "none"
    """Where the fp32 master, fp32 grads and Adam moments live: none (GPU), cpu, nvme."""
    offload_param: str = "none"
    """Parameters: none (GPU), cpu, nvme; train needs ZeRO 3 for cpu/nvme; infer streams layers from cpu."""
    micro_batch: int = 1
    """Sequences per GPU per forward (inference: streams answered together)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    activation_checkpointing: bool = False
    """Recompute each layer in backward instead of keeping its activations."""
    attention_impl: str = "vectorized"
    """'vectorized' ((B, H, T, S) scores) or 'blockwise' (online softmax, linear memory)."""
    window: int = 512
    """Training window, or the local KV window at inference, in positions."""
    top_k: int = 4
    """Blocks retrieved per layer and KV head (0 = retrieval off)."""
    chunk: int = 256
    """Inference: prefill chunk in tokens."""
    device_tier_bytes: int = 0
    """The block store's device tier budget."""
    host_tier_bytes: int = 0
    """The block store's host tier budget."""
    gpus: int = 1
    """Data-parallel GPUs on this node (world size)."""
    precision: str = "bf16"
    """'bf16' (bf16 on the GPU, fp32 master) or 'fp32' throughout (CPU runs)."""

    def __post_init__(self) -> None:
        c = "PlanSettings"
        if self.mode not in MODES:
            _fail(c, "mode", self.mode, f"one of {MODES}")
        if self.zero_stage not in (0, 1, 2, 3):
            _fail(c, "zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        for name in ("offload_optimizer", "offload_param"):
            if getattr(self, name) not in OFFLOAD_TARGETS:
                _fail(c, name, getattr(self, name), f"one of {OFFLOAD_TARGETS}")
        if self.mode == "train":
            if self.offload_optimizer != "none" and self.zero_stage == 0:
                _fail(c, "offload_optimizer", self.offload_optimizer, "needs zero_stage >= 1")
            if self.offload_param != "none" and self.zero_stage != 3:
                _fail(c, "offload_param", self.offload_param, "needs zero_stage 3")
            if self.offload_param == "nvme" and self.offload_optimizer == "none":
                _fail(c, "offload_param", self.offload_param,
                      "nvme parameters need offload_optimizer cpu or nvme")
        elif self.offload_param == "nvme":
            _fail(c, "offload_param", self.offload_param, "inference streams from 'cpu' or keeps 'none'")
        if self.attention_impl not in ATTENTION_IMPLS:
            _fail(c, "attention_impl", self.attention_impl, f"one of {ATTENTION_IMPLS}")
        if self.precision not in PRECISIONS:
            _fail(c, "precision", self.precision, f"one of {PRECISIONS}")
        for name in ("micro_batch", "grad_accum", "window", "chunk", "gpus"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(c, name, v, "must be a positive int")
        for name in ("top_k", "device_tier_bytes", "host_tier_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                _fail(c, name, v, "must be an int >= 0")

    def label(self) -> str:
        """A short human-readable summary, used in tables."""
        if self.mode == "infer":
            return (f"params={self.offload_param if self.offload_param != 'none' else 'gpu'} "
                    f"W={self.window} k={self.top_k} chunk={self.chunk}")
        off = f"opt={self.offload_optimizer}"
        if self.zero_stage == 3:
            off += f" param={self.offload_param}"
        ck = "ckpt" if self.activation_checkpointing else "no-ckpt"
        return (f"Z{self.zero_stage} {off} mb={self.micro_batch}x{self.grad_accum} {ck} "
                f"{self.attention_impl} T={self.window} k={self.top_k}")


@dataclass(frozen=True, slots=True)
class Component:
    """Bytes of one component on each tier, and how they were computed."""

    name: str
    device: int = 0
    host: int = 0
    disk: int = 0
    note: str = ""

    def on(self, tier: str) -> int:
        return getattr(self, tier)


@dataclass(slots=True)
class Estimate:
    """All components of one setting; totals per tier include the margin."""

    settings: PlanSettings
    context: int
    components: list[Component] = field(default_factory=list)

    def total(self, tier: str) -> int:
        return sum(c.on(tier) for c in self.components)

    def totals(self) -> dict[str, int]:
        return {t: self.total(t) for t in TIERS}

    def get(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------

def compute_bytes(settings: PlanSettings) -> int:
    """Bytes per element of parameters, activations and stored K/V."""
    return 2 if settings.precision == "bf16" else 4


def layer_params(model: ModelConfig) -> int:
    """Parameters of one transformer block."""
    d, hd = model.d_model, model.head_dim
    attn = d * model.n_heads * hd + 2 * d * model.n_kv_heads * hd + model.n_heads * hd * d
    return attn + 3 * d * model.ffn_hidden + 2 * d


def largest_layer_params(model: ModelConfig) -> int:
    """The largest module ZeRO-3 gathers at once: a block, or the embedding/head."""
    return max(layer_params(model), model.vocab_size * model.d_model)


def n_blocks(context: int, block_len: int) -> int:
    """Blocks a context of `context` tokens fills: each holds block_len - 1 tokens."""
    return math.ceil(context / (block_len - 1))


def block_entry_bytes(model: ModelConfig, elem: int) -> int:
    """One (block, layer) store entry: K and V, (Hkv, bl, hd) each."""
    return 2 * model.n_kv_heads * model.block_len * model.head_dim * elem


def landmark_key_bytes(model: ModelConfig) -> int:
    """Landmark keys of one block: (L, Hkv, hd) float32."""
    return model.n_layers * model.n_kv_heads * model.head_dim * 4
