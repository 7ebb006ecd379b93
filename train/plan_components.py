"""The planner's component model: bytes per component and tier for one setting.

`estimate(model, settings, context)` returns every component of a training or an
inference run, each split over the three tiers (device = one GPU, host = the node's
RAM, disk = the node's disk), from shapes alone; nothing is built. The search
(plan_search.py) calls it thousands of times, so it is plain integer arithmetic.

Symbols: P parameters, c bytes per compute element (2 for bf16, 4 for fp32), N data
parallel GPUs (world size), L layers, d d_model, H query heads, Hkv KV heads, hd head
dim, F ffn_hidden, V vocab, B micro-batch, T training window (positions), bl block_len,
k top-k, n_b stored blocks.

Model states (mixed precision, Adam; "/N" = partitioned over the N ranks):

    component         bytes    stage 0   stage 1   stage 2   stage 3
    params (c)        P*c      device    device    device    /N device, or host/disk (offload_param)
    grads (c)         P*c      device    device    /N        /N
    fp32 master       4P       device    /N        /N        /N  (device, or host/disk: offload_optimizer)
    fp32 grads        4P       device    /N        /N        /N  (follows the optimizer)
    Adam moments      8P       device    /N        /N        /N  (follows the optimizer)

With optimizer offload the c-byte gradients never sit whole on the device: they leave
through DeepSpeed's reduce buckets into the fp32 grads on the host. Stage 3 gathers one
layer at a time: its device working set is (params + grads) of the largest layer. These
are DeepSpeed's own multipliers (2 + 18/N bytes per parameter without offload, 16
(stage 2) or 18 (stage 3, params too) bytes per parameter on the host with offload);
tests/train/test_plan.py checks them against DeepSpeed's estimators. One divergence,
kept on purpose (over- beats under-predicting): for stage 3 without offload DeepSpeed's
estimator counts 18/N bytes per parameter, we count 20/N (its 18 leaves out one of the
2-byte partitions, params or grads, both of which exist at the optimizer step). With fp32
training and no ZeRO the parameters are the master copy (no separate fp32 master or
fp32 grads); ZeRO 1-3 always keep their own flat fp32 partitions.

Activations of one training window, per layer, derived from the ops of engine/model.py
and engine/attention.py (bytes saved by autograd for backward; c = compute bytes, a = 4:
both attention kernels compute in float32) and checked against the CPU allocator's own
count of live tensors at the step's peak (train/plan_measure.py, bench/plan.py):

    2 RMSNorms: float32 x, x*rsqrt cast to c, times weight     2*B*T*d*(4 + 2c)
    SwiGLU gate, up, silu(gate), product                       4*B*T*F*c
    q after RoPE (c), the kernel's output buffer (a), its
      re-laid-out copy for wo (c)                              B*T*d*(2c + a)
  vectorized (`landmark_attention`, query chunks of 128 rows, each against the keys up
    to its last row, S = T + k*bl keys with retrieval):
    K, V padded to whole blocks, in float32                    2*B*Sp*Hkv*hd*a
    the weights P of every chunk and their block sums          B*H*sum_n(C_n*Kc_n)*a*(bl+1)/bl
  blockwise (`landmark_attention_blockwise`): K after RoPE and V as passed (2*B*S*Hkv*hd*c)
    and the log-sum-exp (B*H*T*a)
  final norm and loss: saved the norm and the float32 log-softmax, B*T*d*(4 + 2c) + 4*B*T*V

Backward frees each op's saved tensors as it passes it, so what it adds on top is taken
at its worst moment, not summed (`layer_transient_bytes`): the loss's gradients
B*T*V*(c + 4) while everything is saved; then, once the head's saved tensors are gone, a
layer's SwiGLU phase (2*B*T*F*c) or its attention phase (dq, dO, dk, dv, delta in float32
plus the score tiles: vectorized, dP of a chunk and the previous chunk's dS; blockwise,
a tile's scores and dP and the previous tile's dS (256 rows x the whole key axis up to 1024
positions, else 512); minus the SwiGLU, ffn-norm
and wo inputs already freed).

    no checkpointing:  L * layer_saved + head_saved + max(head transient, layer transient - head_saved)
    checkpointing:     L * B*T*d*c (layer inputs) + head_saved
                       + max(head transient, layer_saved + layer transient - head_saved)

Inference (one prefill chunk of C tokens, no grad, `infer_activation_bytes`): one layer
at a time: the chunk's q, k, v; about four float32 copies of K, V over the retrieved
blocks and the local window (concatenated, rotated, joined); the kernel's output,
accumulator and a score tile twice; or the SwiGLU's three (C, F) tensors; or the logits.

KV store: n_b = ceil(context / (bl - 1)) blocks (each block holds bl - 1 tokens and
its landmark, i.e. context * (1 + 1/(bl-1)) positions); each block holds per layer K
(before RoPE) and V, (Hkv, bl, hd) each, in the compute dtype, and one landmark key
(Hkv, hd) per layer. The index keeps the keys in host memory (float32, plus an int64
id and an int32 stream code per row) in an array that doubles from 1024 rows; above
`DEFAULT_EXACT_THRESHOLD` blocks a faiss index holds a second copy of the vectors. On
disk (`kv_store_disk_bytes`): the zarr K/V chunks with their crc32c, the landmark keys,
the row metadata and the index saved on close. At inference the local window (W
positions: `local_blocks` whole blocks plus the chunk) is kept in float32 by
engine/retrieval.py, which is c on the CPU runs measured here.

Margin: `DEVICE_RESERVED` (CUDA context, cuBLAS/NCCL workspaces) + 10% of the device
tensors for allocator fragmentation; `HOST_RESERVED` per process (Python, torch,
DeepSpeed) + 10%; 5% of the disk bytes.
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

# DeepSpeed buffer sizes (elements) that plan_output.py writes into ds_config.json.
REDUCE_BUCKET = 50_000_000
ALLGATHER_BUCKET = 50_000_000
PREFETCH_BUCKET = 50_000_000
NVME_PARAM_BUFFERS = (5, 100_000_000)       # buffer_count, buffer_size (elements)
NVME_OPT_BUFFERS = 4                        # buffer_count
SUB_GROUP_SIZE = 100_000_000                # ZeRO-3 optimizer sub-group (elements)

VECTORIZED_Q_CHUNK = 128
"""Query rows per chunk of engine.attention.landmark_attention (a test keeps them equal)."""
BLOCKWISE_Q_CHUNK, BLOCKWISE_K_CHUNK, BLOCKWISE_ONE_TILE_MAX = 256, 512, 1024
"""landmark_attention_blockwise's default tile: query rows, then key columns — the whole key
axis (whole blocks) when it is at most BLOCKWISE_ONE_TILE_MAX, else k_chunk rounded down to
whole blocks (engine.attention.default_k_chunk; a test keeps them equal)."""


def blockwise_k_chunk(keys: int, bl: int) -> int:
    """The kernel's default key-tile width for a key axis of `keys` positions."""
    padded = -(-keys // bl) * bl
    if padded <= BLOCKWISE_ONE_TILE_MAX:
        return max(bl, padded)
    return max(bl, (BLOCKWISE_K_CHUNK // bl) * bl)

EXACT_THRESHOLD_BLOCKS = 65_536
INDEX_MIN_ROWS = 1024
"""LandmarkIndex grows its key array by doubling from this many rows."""
"""memory_store.index.DEFAULT_EXACT_THRESHOLD: above it a faiss index is built too."""


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


def index_capacity(n: int) -> int:
    """Rows memory_store.index.LandmarkIndex allocates for n keys (added a few at a time): 1024,
    then 1.5x as it fills."""
    if n <= 0:
        return 0
    cap = INDEX_MIN_ROWS
    while cap < n:
        cap += cap // 2
    return cap


def kv_store_disk_bytes(model: ModelConfig, context: int, elem: int) -> int:
    """Size on disk of the store for `context` tokens of one stream (memory_store/disk.py layout).

    Per block: per layer one chunk holding K and V (2, Hkv, bl, hd) in the compute dtype and
    a 4-byte crc32c; the landmark keys (L, Hkv, hd) in the compute dtype + crc; its stream
    code (int32) and ordinal (int64). The index saved on close adds the float32 keys and
    the int64 id and int32 code of every block.
    """
    nb = n_blocks(context, model.block_len)
    L = model.n_layers
    per_block = L * (block_entry_bytes(model, elem) + 4) \
        + L * model.n_kv_heads * model.head_dim * elem + 4 + 12 + landmark_key_bytes(model) + 12
    return nb * per_block


# ---------------------------------------------------------------------------------------
# Model states
# ---------------------------------------------------------------------------------------

def model_state_components(model: ModelConfig, s: PlanSettings) -> list[Component]:
    """Parameters, gradients, optimizer states (and stage-3 working set) per tier."""
    P, N, c = model.num_params(), s.gpus, compute_bytes(s)
    if s.mode == "infer":
        if s.offload_param == "cpu":
            # layers stream from pinned host memory; two on the device (current + next)
            return [Component("parameters", device=2 * largest_layer_params(model) * c, host=P * c,
                              note="streamed from host, 2 layers resident")]
        return [Component("parameters", device=P * c, note=f"P*{c}")]

    fp32_shadow = not (c == 4 and s.zero_stage == 0)  # fp32 + no ZeRO: params are the master
    parts = 1 if s.zero_stage == 0 else N
    opt_bytes = {"fp32 master": 4 * P if fp32_shadow else 0,
                 "fp32 grads": 4 * P if fp32_shadow else 0,
                 "Adam moments": 8 * P}
    out: list[Component] = []

    # parameters in the compute dtype
    if s.zero_stage < 3:
        out.append(Component("parameters", device=P * c, note=f"P*{c}"))
    elif s.offload_param == "none":
        out.append(Component("parameters", device=P * c // N, note=f"P*{c}/N"))
    else:
        tier = "host" if s.offload_param == "cpu" else "disk"
        out.append(Component("parameters", **{tier: P * c}, note=f"P*{c} offloaded to {s.offload_param}"))

    # gradients in the compute dtype
    if s.offload_optimizer != "none" and s.zero_stage >= 2:
        out.append(Component("gradients", note="leave through reduce buckets (see DeepSpeed buffers)"))
    elif s.zero_stage <= 1:
        out.append(Component("gradients", device=P * c, note=f"P*{c}"))
    else:
        out.append(Component("gradients", device=P * c // N, note=f"P*{c}/N"))

    # fp32 master, fp32 grads, moments: partitioned for ZeRO >= 1
    where = {"none": "device", "cpu": "host", "nvme": "disk"}[s.offload_optimizer]
    for name, b in opt_bytes.items():
        if where == "device":
            out.append(Component(name, device=b // parts, note=f"{b // P}P/{parts}"))
        elif where == "disk" and name == "fp32 grads":
            out.append(Component(name, host=b, note="fp32 grads stay in host memory"))
        else:
            out.append(Component(name, **{where: b}, note=f"{b // P}P on {s.offload_optimizer}"))

    if s.zero_stage == 3:
        ws = largest_layer_params(model) * 2 * c  # gathered params + grads of one module
        out.append(Component("ZeRO-3 working set", device=ws, note="params+grads of the largest layer"))
    return out


def deepspeed_buffer_component(model: ModelConfig, s: PlanSettings) -> Component:
    """Reduce/all-gather buckets on the device, pinned staging and NVMe swap buffers on the host."""
    if s.mode == "infer":
        return Component("DeepSpeed buffers", note="not used at inference")
    P, c = model.num_params(), compute_bytes(s)
    dev = host = 0
    if s.zero_stage >= 1:
        dev += 2 * min(P, REDUCE_BUCKET) * c  # double-buffered reduce bucket
    if s.zero_stage in (1, 2) and s.gpus > 1:
        dev += min(P, ALLGATHER_BUCKET) * c
    if s.zero_stage == 3:
        dev += min(P, PREFETCH_BUCKET) * c
    if s.offload_optimizer != "none" or s.offload_param != "none":
        host += 2 * min(P, REDUCE_BUCKET) * 4  # pinned fp32 staging of gradients
    if s.offload_param == "nvme":
        count, size = NVME_PARAM_BUFFERS
        host += count * min(P, size) * c
    if s.offload_optimizer == "nvme":
        host += NVME_OPT_BUFFERS * min(P, SUB_GROUP_SIZE) * 4 * 3  # fp32 param + 2 moments
    return Component("DeepSpeed buffers", device=dev, host=host,
                     note="buckets, pinned staging, NVMe swap buffers")


# ---------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------

def attention_keys(model: ModelConfig, s: PlanSettings, stored_blocks: int) -> int:
    """Key positions a training query row sees: the window plus retrieved blocks."""
    k = min(s.top_k, stored_blocks)
    return s.window + k * model.block_len


def attention_compute_bytes(s: PlanSettings) -> int:
    """Bytes per element inside attention: both kernels compute in float32 (bf16 too)."""
    return 4


def vectorized_chunks(T: int, keys: int, block_len: int, q_chunk: int = VECTORIZED_Q_CHUNK) -> list[tuple[int, int]]:
    """(rows C, keys Kc) of each query chunk of the vectorized kernel.

    The T queries sit at the end of the `keys` axis (q_offset = keys - T); chunk n
    scores its C rows against the keys up to its last row, rounded up to a block.
    """
    q0, out = keys - T, []
    for t0 in range(0, T, q_chunk):
        t1 = min(t0 + q_chunk, T)
        out.append((t1 - t0, -(-(q0 + t1) // block_len) * block_len))
    return out


def blockwise_tile(model: ModelConfig, rows: int, keys: int) -> tuple[int, int]:
    """(query rows, key columns) of one tile of the blockwise kernel (its defaults)."""
    bl = model.block_len
    return min(rows, BLOCKWISE_Q_CHUNK), min(blockwise_k_chunk(keys, bl), -(-keys // bl) * bl)


def layer_saved_bytes(model: ModelConfig, s: PlanSettings, keys: int) -> int:
    """Bytes one layer saves for backward over a training window (see module docstring)."""
    B, T, d, c, a = s.micro_batch, s.window, model.d_model, compute_bytes(s), attention_compute_bytes(s)
    H, kv, bl = model.n_heads, model.n_kv_heads * model.head_dim, model.block_len
    norms = 2 * B * T * d * (4 + 2 * c)
    ffn = 4 * B * T * model.ffn_hidden * c
    # q after RoPE, the kernel's own output buffer (a), its re-laid-out copy for wo (c)
    linear = norms + ffn + B * T * d * (2 * c + a)
    if s.attention_impl == "vectorized":
        Sp = -(-keys // bl) * bl
        kv_saved = 2 * B * Sp * kv * a  # K, V padded to whole blocks, in the compute dtype
        rows_keys = sum(C * Kc for C, Kc in vectorized_chunks(T, keys, bl))
        quad = B * H * rows_keys * a * (bl + 1) // bl  # weights P and their block sums
    else:
        kv_saved = 2 * B * keys * kv * c  # K after RoPE and V as passed in
        quad = B * H * T * a  # log-sum-exp
    return linear + kv_saved + quad


def blockwise_tiles(model: ModelConfig, rows: int, keys: int) -> list[int]:
    """Elements (rows x keys) of each score tile of the blockwise kernel, in the order it runs.

    Query chunks of BLOCKWISE_Q_CHUNK rows at the end of the key axis; each sees the keys
    up to its last row, in tiles of k_chunk (whole blocks) columns.
    """
    bl = model.block_len
    k_chunk = blockwise_k_chunk(keys, bl)
    q0, out = keys - rows, []
    for t0 in range(0, rows, BLOCKWISE_Q_CHUNK):
        t1 = min(t0 + BLOCKWISE_Q_CHUNK, rows)
        last = min(keys, q0 + t1)
        for k0 in range(0, last, k_chunk):
            out.append((t1 - t0) * -(-(min(k0 + k_chunk, last) - k0) // bl) * bl)
    return out


def layer_transient_bytes(model: ModelConfig, s: PlanSettings, keys: int, rows: int) -> int:
    """Bytes one layer's backward adds on top of everything saved, at its worst moment.

    Backward frees each op's saved tensors as it passes it, so the layer has two phases:
      SwiGLU: two (B, T, F) gradients on top of everything saved          2*B*T*F*c
      attention kernel: by then the SwiGLU, ffn-norm and wo inputs are freed
        (4*B*T*F*c + B*T*d*(4 + 3c)); it adds dq, dO (re-laid out) and dk, dv, delta in
        float32 (a), and its score tiles: vectorized, dP of a chunk plus the previous
        chunk's dS (a Python name holds it while the next matmul runs); blockwise, a
        tile's scores and dP plus the previous tile's dS.
    Returns the larger phase (never below 0).
    """
    B, c, a = s.micro_batch, compute_bytes(s), attention_compute_bytes(s)
    H, d, F, bl = model.n_heads, model.d_model, model.ffn_hidden, model.block_len
    kv = model.n_kv_heads * model.head_dim
    Sp = -(-keys // bl) * bl
    ffn_phase = 2 * B * rows * F * c
    grads = B * (2 * rows * d + 2 * Sp * kv) * a + B * H * rows * a
    if s.attention_impl == "vectorized":
        tiles = [C * Kc for C, Kc in vectorized_chunks(rows, keys, bl)]
    else:
        tiles = blockwise_tiles(model, rows, keys)
    worst = max(2 * t + (tiles[i - 1] if i else 0) for i, t in enumerate(tiles))
    freed = 4 * B * rows * F * c + B * rows * d * (4 + 3 * c)
    attn_phase = grads + B * H * worst * a - freed
    return max(0, ffn_phase, attn_phase)


def activation_breakdown(model: ModelConfig, s: PlanSettings, stored_blocks: int) -> tuple[int, int]:
    """(saved, transient) activation bytes of one training window (see module docstring).

    `saved` is what autograd holds at the end of the forward pass; `transient` what the
    backward adds on top at its peak: the loss's gradients while everything is saved, or
    a layer's (`layer_transient_bytes`) once the head's saved tensors are freed; with
    checkpointing, a layer is first recomputed (its saved tensors come back).
    """
    B, c, V, T, d = s.micro_batch, compute_bytes(s), model.vocab_size, s.window, model.d_model
    keys = attention_keys(model, s, stored_blocks)
    layer = layer_saved_bytes(model, s, keys)
    head_saved = B * T * d * (4 + 2 * c) + B * T * V * 4      # final norm; float32 log-softmax
    head_transient = B * T * V * (c + 4)                   # logits (c) + float32 grad
    layer_transient = layer_transient_bytes(model, s, keys, T)
    if s.activation_checkpointing:
        saved = model.n_layers * B * T * d * c + head_saved
        layer_transient += layer  # the recomputed layer
    else:
        saved = model.n_layers * layer + head_saved
    return saved, max(head_transient, layer_transient - head_saved)


def infer_activation_bytes(model: ModelConfig, s: PlanSettings, stored_blocks: int) -> int:
    """Peak bytes one prefill chunk of C tokens adds (no grad: nothing is saved).

    engine/retrieval.py's attend for one layer holds q, k, v of the chunk (c); the local
    window and the chunk concatenated, rotated, and joined to the retrieved blocks:
    K, V over S = k*bl + W keys, about 4 copies in float32; the rotated queries, the
    kernel's output and accumulator (C*d float32 each) and its score tile (H x q_chunk x
    k_chunk, float32; without grad every pass over it is in place) and the tile's causal
    mask (q_chunk x k_chunk bool). The SwiGLU phase holds three
    (C, F) tensors; the head the (C, V) logits. Plus the residual stream and its update.
    """
    B, c, a, bl = s.micro_batch, compute_bytes(s), attention_compute_bytes(s), model.block_len
    d, H, F, V = model.d_model, model.n_heads, model.ffn_hidden, model.vocab_size
    kv = model.n_kv_heads * model.head_dim
    C = min(s.chunk, s.window)
    S = min(s.top_k, stored_blocks) * bl + s.window
    qc, kw = blockwise_tile(model, C, S)
    attn = C * (d + 2 * kv) * c + 4 * S * kv * a + 3 * C * d * a + H * qc * kw * a + qc * kw
    phase = max(attn, 3 * C * F * c, C * V * c)
    return B * (phase + 2 * C * d * c)


def step_peak_bytes(model: ModelConfig, s: PlanSettings, stored_blocks: int) -> int:
    """Activations + gradients at the peak of one process's training step, on its timeline.

    The estimate lists gradients and activations as separate components and adds them
    (right under ZeRO, where gradients leave through buckets; pessimistic otherwise).
    Without ZeRO the gradients appear as the backward runs, while the saved tensors go:
    loss (head gradients only), then layer by layer from the last (each adds its
    gradients and frees its saved tensors), then all gradients at the optimizer step.
    This is the total `folio plan --measure` compares a CPU step against.
    """
    B, c, V, T, d = s.micro_batch, compute_bytes(s), model.vocab_size, s.window, model.d_model
    keys = attention_keys(model, s, stored_blocks)
    layer = layer_saved_bytes(model, s, keys)
    head_saved = B * T * d * (4 + 2 * c) + B * T * V * 4
    head_transient = B * T * V * (c + 4)
    layer_transient = layer_transient_bytes(model, s, keys, T)
    g_head = (model.vocab_size * d + d) * c if not model.tie_embeddings else d * c
    g_layer = layer_params(model) * c
    saved, _ = activation_breakdown(model, s, stored_blocks)
    worst = saved + head_transient + g_head
    inputs = B * T * d * c
    for j in range(model.n_layers):  # j layers already done
        if s.activation_checkpointing:
            live = (model.n_layers - j) * inputs + layer + layer_transient
        else:
            live = (model.n_layers - j) * layer + layer_transient
        worst = max(worst, live + g_head + (j + 1) * g_layer)
    return max(worst, model.num_params() * c)


def activation_component(model: ModelConfig, s: PlanSettings, stored_blocks: int) -> Component:
    """Peak activation bytes of one training window, or of one inference chunk."""
    B, c, V = s.micro_batch, compute_bytes(s), model.vocab_size
    if s.mode == "infer":
        return Component("activations", device=infer_activation_bytes(model, s, stored_blocks),
                         note=f"one chunk of {min(s.chunk, s.window)} tokens, one layer at a time")
    saved, transient = activation_breakdown(model, s, stored_blocks)
    keys = attention_keys(model, s, stored_blocks)
    note = "layer inputs + one recomputed layer" if s.activation_checkpointing else "all layers saved"
    return Component("activations", device=saved + transient,
                     note=f"{note}, S={keys} keys, {s.attention_impl}")


# ---------------------------------------------------------------------------------------
# KV: local window, retrieved blocks, store tiers, index, disk
# ---------------------------------------------------------------------------------------

def layer_fetch_bytes(model: ModelConfig, s: PlanSettings, stored_blocks: int) -> int:
    """Store entries one layer's retrieval pulls at worst: every KV head picks k other blocks."""
    return min(s.top_k * model.n_kv_heads, stored_blocks) * block_entry_bytes(model, compute_bytes(s)) \
        * s.micro_batch


def kv_components(model: ModelConfig, s: PlanSettings, context: int) -> list[Component]:
    """Local window, retrieved blocks, store tiers, landmark index and the store on disk."""
    c, L, Hkv, hd, bl = compute_bytes(s), model.n_layers, model.n_kv_heads, model.head_dim, model.block_len
    streams = s.micro_batch * (s.gpus if s.mode == "train" else 1)
    nb_stream = n_blocks(context, bl) if s.top_k > 0 else 0
    nb = nb_stream * streams
    out = []
    window_kv = L * s.micro_batch * 2 * Hkv * s.window * hd * c
    out.append(Component("local KV window", device=window_kv,
                         note="L*B*2*Hkv*W*hd*c" + (" (K pre-RoPE, V kept for store.put)"
                                                     if s.mode == "train" else "")))
    k_eff = min(s.top_k, nb_stream)
    retrieved = k_eff * L * Hkv * 2 * bl * hd * c * s.micro_batch
    out.append(Component("retrieved blocks", device=retrieved, note=f"k={k_eff} x L x Hkv x 2*bl*hd*c"))
    if nb == 0:
        out.append(Component("store tiers", note="retrieval off"))
        return out
    hosts = s.gpus if s.mode == "train" else 1
    out.append(Component("store tiers", device=s.device_tier_bytes, host=s.host_tier_bytes * hosts,
                         note="the store's byte budgets (never exceeded)"))
    keys = nb * landmark_key_bytes(model)
    cap = index_capacity(nb_stream) * streams
    index = cap * (landmark_key_bytes(model) + 12)  # float32 keys + int64 id + int32 stream code per row
    if nb_stream > EXACT_THRESHOLD_BLOCKS:
        index += keys + nb * L * Hkv * 8  # faiss copy of the vectors and its id maps
    out.append(Component("landmark index", host=index, note=f"{nb} blocks, {cap} rows allocated x L*Hkv*hd float32"
                         + (" + faiss copy" if nb_stream > EXACT_THRESHOLD_BLOCKS else "")))
    out.append(Component("KV store", disk=kv_store_disk_bytes(model, context, c) * streams,
                         note=f"{nb} blocks: K/V chunks + crc, landmark keys, row meta, saved index"))
    return out


# ---------------------------------------------------------------------------------------
# Everything
# ---------------------------------------------------------------------------------------

def estimate(model: ModelConfig, s: PlanSettings, context: int) -> Estimate:
    """Every component of `s` for `context` tokens, per tier, with the margin last."""
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} is invalid: must be a positive int of tokens")
    stored = n_blocks(context, model.block_len) if s.top_k > 0 else 0
    if s.mode == "train":
        # the store holds the document's earlier windows, never the current one
        stored = max(0, stored - s.window // model.block_len)
    est = Estimate(settings=s, context=context)
    est.components.extend(model_state_components(model, s))
    est.components.append(activation_component(model, s, stored))
    est.components.extend(kv_components(model, s, context))
    est.components.append(deepspeed_buffer_component(model, s))
    if s.mode == "train":
        P = model.num_params()
        est.components.append(Component("checkpoint", disk=P * (compute_bytes(s) + 12),
                                        note="one DeepSpeed checkpoint: params + fp32 master + moments"))
    procs = s.gpus if s.mode == "train" else 1
    dev = est.total("device")
    host = est.total("host")
    disk = est.total("disk")
    est.components.append(Component(
        "margin", device=DEVICE_RESERVED + int(FRAGMENTATION * dev),
        host=HOST_RESERVED * procs + int(FRAGMENTATION * host), disk=int(DISK_MARGIN * disk),
        note=f"device {DEVICE_RESERVED / GiB:.2f} GiB + 10%, host {HOST_RESERVED // GiB} GiB/process + 10%, disk 5%"))
    return est
