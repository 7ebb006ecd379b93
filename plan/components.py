"""The planner's component model: bytes per component and tier for one setting.

`estimate(model, settings, context)` returns every component of a training or an
inference run, each split over the three tiers (device = one GPU, host = the node's
RAM, disk = the node's disk), from shapes alone; nothing is built. The search
(search.py) calls it thousands of times, so it is plain integer arithmetic. Symbols as
in settings.py; activations are modelled in activations.py.

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
tests/plan/test_plan.py checks them against DeepSpeed's estimators. One divergence,
kept on purpose (over- beats under-predicting): for stage 3 without offload DeepSpeed's
estimator counts 18/N bytes per parameter, we count 20/N (its 18 leaves out one of the
2-byte partitions, params or grads, both of which exist at the optimizer step). With fp32
training and no ZeRO the parameters are the master copy (no separate fp32 master or
fp32 grads); ZeRO 1-3 always keep their own flat fp32 partitions.

KV store: n_b = ceil(context / (bl - 1)) blocks (each block holds bl - 1 tokens and
its landmark, i.e. context * (1 + 1/(bl-1)) positions); each block holds per layer K
(before RoPE) and V, (Hkv, bl, hd) each, in the compute dtype, and one landmark key
(Hkv, hd) per layer. The index keeps the keys in host memory (float32, plus an int64
id and an int32 stream code per row) in an array that grows 1.5x from 1024 rows; above
`DEFAULT_EXACT_THRESHOLD` (memory_store.index) blocks a faiss index holds a second copy of the vectors. On
disk (`kv_store_disk_bytes`): the zarr K/V chunks with their crc32c, the landmark keys,
the row metadata and the index saved on close. At inference the local window (W
positions: `local_blocks` whole blocks plus the chunk) is kept in float32 by
engine/retrieval.py.

Margin: `DEVICE_RESERVED` (CUDA context, cuBLAS/NCCL workspaces) + 10% of the device
tensors for allocator fragmentation; `HOST_RESERVED` per process (Python, torch,
DeepSpeed) + 10%; 5% of the disk bytes.
"""

from __future__ import annotations

from engine.config import ModelConfig
from memory_store.index import DEFAULT_EXACT_THRESHOLD, grown_capacity

from .activations import activation_component
from .settings import (ALLGATHER_BUCKET, DEVICE_RESERVED, DISK_MARGIN, FRAGMENTATION, GiB, HOST_RESERVED,
                       NVME_OPT_BUFFERS, NVME_PARAM_BUFFERS, PREFETCH_BUCKET, REDUCE_BUCKET, SUB_GROUP_SIZE,
                       Component, Estimate, PlanSettings, block_entry_bytes, compute_bytes, landmark_key_bytes,
                       largest_layer_params, n_blocks)


def index_capacity(n: int) -> int:
    """Rows memory_store's LandmarkIndex allocates for n keys added a few at a time."""
    cap = 0
    while cap < n:
        cap = grown_capacity(cap, cap + 1)
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
    if nb_stream > DEFAULT_EXACT_THRESHOLD:
        index += keys + nb * L * Hkv * 8  # faiss copy of the vectors and its id maps
    out.append(Component("landmark index", host=index, note=f"{nb} blocks, {cap} rows allocated x L*Hkv*hd float32"
                         + (" + faiss copy" if nb_stream > DEFAULT_EXACT_THRESHOLD else "")))
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
