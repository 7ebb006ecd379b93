"""Activation bytes of a training window and of an inference chunk.

Per layer, derived from the ops of engine/model.py and engine/attention.py (bytes saved
by autograd for backward; c = compute bytes, a = 4: both attention kernels compute in
float32) and checked against the CPU allocator's own count of live tensors at the
step's peak (plan/measure.py):

    2 RMSNorms: float32 x, x*rsqrt cast to c, times weight     2*B*T*d*(4 + 2c)
    SwiGLU gate, up, silu(gate), product                       4*B*T*F*c
    q after RoPE (c), the kernel's output buffer (a), its
      re-laid-out copy for wo (c)                              B*T*d*(2c + a)
  vectorized (`landmark_attention`, query chunks of VECTORIZED_Q_CHUNK rows, each
    against the keys up to its last row, S = T + k*bl keys with retrieval):
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
a tile's scores and dP and the previous tile's dS; minus the SwiGLU, ffn-norm and wo
inputs already freed).

    no checkpointing:  L * layer_saved + head_saved + max(head transient, layer transient - head_saved)
    checkpointing:     L * B*T*d*c (layer inputs) + head_saved
                       + max(head transient, layer_saved + layer transient - head_saved)

Inference (one prefill chunk of C tokens, no grad, `infer_activation_bytes`): one layer
at a time: the chunk's q, k, v; about four float32 copies of K, V over the retrieved
blocks and the local window (concatenated, rotated, joined); the kernel's output,
accumulator and a score tile twice; or the SwiGLU's three (C, F) tensors; or the logits.
The tile sizes are the kernels' own (engine/tuning.py).
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.tuning import BLOCKWISE_Q_CHUNK, VECTORIZED_Q_CHUNK, default_k_chunk

from .settings import Component, PlanSettings, compute_bytes, layer_params

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
    return min(rows, BLOCKWISE_Q_CHUNK), min(default_k_chunk(keys, bl), -(-keys // bl) * bl)


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
    k_chunk = default_k_chunk(keys, bl)
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
    if s.mode == "infer":
        return Component("activations", device=infer_activation_bytes(model, s, stored_blocks),
                         note=f"one chunk of {min(s.chunk, s.window)} tokens, one layer at a time")
    saved, transient = activation_breakdown(model, s, stored_blocks)
    keys = attention_keys(model, s, stored_blocks)
    note = "layer inputs + one recomputed layer" if s.activation_checkpointing else "all layers saved"
    return Component("activations", device=saved + transient,
                     note=f"{note}, S={keys} keys, {s.attention_impl}")
