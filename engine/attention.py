"""Landmark grouped-softmax attention (Mohtashami & Jaggi, 2023): three implementations.

Shape letters: B batch, H query heads, Hkv key/value heads, G = H // Hkv (grouped-query
attention), T query positions, S key positions, D head dim, L block_len, nb key blocks.

The key axis is laid out in blocks of L positions; slot L-1 of every block is its
landmark. Query i sits at key position p_i = q_offset + i; its own block is p_i // L.
The paper's grouped softmax for a query in block c:
  group 0 = ordinary tokens j <= p_i of block c, plus the landmarks of blocks b < c;
  group b = the ordinary tokens of an earlier block b;
  weight(j in block b < c) = softmax_b(j) * softmax_0(landmark_b)
  weight(j in block c)     = softmax_0(j)
  landmarks carry no value weight (a query never attends its own block's landmark).

Every implementation here uses the same exact identity (derived in
`grouped_scores`): the grouped weights equal ONE ordinary softmax over the
non-landmark keys j <= p_i of the modified scores
    s'_ij = s_ij + beta_{i,b(j)},   beta_ib = s_{i,landmark_b} - logsumexp_{j in b} s_ij
for j in an earlier block (beta = 0 in the own block). That turns the grouped softmax
into causal attention with landmark columns masked and a per-(query, block) bias, so
the blockwise version is a plain online softmax (FlashAttention-style) over key chunks.

  1. `landmark_attention_reference` — loops, float64, the paper's definition literally
     (engine/attention_reference.py, with `grouped_scores`, the identity in torch ops).
  2. `landmark_attention` — vectorized over a training window; (B, H, T, S) scores. On
     the CPU in float32 its softmax passes run in fused C row kernels
     (engine/landmark_cpu.c via engine/cpu_kernels.py; the same formulas as the torch
     code below, which is the fallback and is tested equal to them).
  3. `landmark_attention_blockwise` — online softmax over key chunks with a custom
     backward that recomputes tiles; peak memory is linear in the sequence length.

2 and 3 share the tile kernel of engine/attention_tiles.py (its comment derives it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.attention_reference import grouped_scores, landmark_attention_reference
from engine.attention_tiles import (NEG_INF, TINY, _block_positions, _check_kv_valid, _check_qkv, _chunks,
                                    _compute_dtype, _earlier_present, _exp_blocks, _fused_kernels,
                                    _group0_logits, _pad_keys, _prepare_kv_valid, _scores_grad)
from engine.tuning import BLOCKWISE_Q_CHUNK, VECTORIZED_Q_CHUNK, default_k_chunk

SHIFT_FREE_BOUND = 80.0  # exp(+-80) is a normal float32: no overflow, no denormals


def _shift_free(q: torch.Tensor, k: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """True if every score |scale * q.k| is <= SHIFT_FREE_BOUND (Cauchy-Schwarz bound).

    q: (..., T, D), k: (..., S, D). Then the per-block max subtraction can be skipped
    (two passes over each tile fewer) with the same result: it only guards exp against
    overflow and underflow. float32 only (float64 inputs keep the shifted path).
    """
    if dtype != torch.float32 or q.numel() == 0 or k.numel() == 0:
        return False
    bound = abs(scale) * q.float().norm(dim=-1).amax() * k.float().norm(dim=-1).amax()
    return bool(bound <= SHIFT_FREE_BOUND)


# ---------------------------------------------------------------------------------------
# 2. Vectorized: training windows.
# ---------------------------------------------------------------------------------------
class _VectorizedLandmark(torch.autograd.Function):
    """Query row chunks, each against all keys up to its last row (causal skipping).

    One key tile per chunk, so no online softmax: the forward keeps each chunk's final
    weights P (together about half the (T, S) matrix) and the backward reuses them
    instead of recomputing scores.
    """

    @staticmethod
    def forward(ctx, q, k, v, kv_valid, block_len, q_offset, scale, q_chunk, const_keys=0):
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G, L = H // Hkv, block_len
        cd = _compute_dtype(q.dtype)
        Sp = -(-S // L) * L
        kp, vp = _pad_keys(k, Sp, cd), _pad_keys(v, Sp, cd)  # (B, Hkv, Sp, D)
        kp, vp, kvp, present = _prepare_kv_valid(kv_valid, kp, vp, L)
        masked = kv_valid is not None
        q5 = q.reshape(B, Hkv, G, T, D)
        out = torch.empty(B, Hkv, G, T, D, dtype=cd, device=q.device)
        keep = any(ctx.needs_input_grad[:3])
        lib = _fused_kernels(q, cd, kvp)
        pres = None if lib is None or present is None else present.reshape(B * Hkv, -1).to(torch.uint8)
        shift = lib is None and not _shift_free(q, kp, scale, cd)
        saved = []
        for t0, t1 in _chunks(T, q_chunk):
            C = t1 - t0
            Kc = -(-(q_offset + t1) // L) * L  # keys past the chunk's last row never count
            nb = Kc // L
            qc = (q5[:, :, :, t0:t1].to(cd) * scale).reshape(B * Hkv, G * C, D)
            x = torch.bmm(qc, kp[:, :, :Kc].flatten(0, 1).transpose(-1, -2))  # (B*Hkv, G*C, Kc)
            if lib is not None:  # the same arithmetic, fused row by row (engine/landmark_cpu.c)
                g = torch.empty(B, Hkv, G, C, nb, dtype=cd)
                cpu_kernels.landmark_forward(lib, x, g, pres, C, L, q_offset + t0)
            else:
                q_pos = q_offset + torch.arange(t0, t1, device=q.device)  # (C,)
                x6 = x.view(B, Hkv, G, C, nb, L)
                kv6 = None if kvp is None else kvp[..., :Kc].reshape(B, Hkv, 1, 1, nb, L)
                s_lm, m, ssum = _exp_blocks(x6, q_pos, q_offset + t0, 0, L, kv6, shift)
                earlier, own = _block_positions(q_pos, nb, L)
                earlier = _earlier_present(earlier, kv6, ssum, present, 0, nb)
                g = torch.softmax(_group0_logits(s_lm, m, ssum, earlier, own), -1)  # (B, Hkv, G, C, nb)
                x6.mul_((g / ssum.clamp_(min=TINY)).unsqueeze(-1))  # x is now P
            out[:, :, :, t0:t1] = torch.bmm(x, vp[:, :, :Kc].flatten(0, 1)).view(B, Hkv, G, C, D)
            if keep:
                saved += [x, g, earlier] if masked and lib is None else [x, g]
        ctx.save_for_backward(q, kp, vp, out, pres, *saved)
        ctx.fused = lib
        ctx.cfg = (block_len, q_offset, scale, q_chunk, S, k.dtype, v.dtype, masked and lib is None, const_keys)
        return out.view(B, H, T, D).to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, kp, vp, out, pres, *saved = ctx.saved_tensors
        block_len, q_offset, scale, q_chunk, S, k_dtype, v_dtype, masked, c0 = ctx.cfg
        lib = ctx.fused
        per = 3 if masked else 2  # saved tensors per chunk: P, g (, earlier: the torch path with a mask)
        B, H, T, D = q.shape
        Hkv = kp.shape[1]
        G, L = H // Hkv, block_len
        cd = out.dtype
        q5 = q.reshape(B, Hkv, G, T, D)
        do5 = d_out.reshape(B, Hkv, G, T, D).to(cd)
        delta = (do5 * out).sum(-1)  # (B, Hkv, G, T)
        dq = torch.empty(B, Hkv, G, T, D, dtype=cd, device=q.device)
        k3, v3 = kp.flatten(0, 1), vp.flatten(0, 1)  # (B*Hkv, Sp, D)
        dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)
        dp_buf = torch.empty(max(p.numel() for p in saved[::per]), dtype=cd, device=q.device)  # the largest tile
        kv_buf = torch.empty(k3.shape[0] * max(0, k3.shape[1] - c0) * D, dtype=cd, device=q.device)
        for n, (t0, t1) in enumerate(_chunks(T, q_chunk)):
            C = t1 - t0
            p, g = saved[per * n], saved[per * n + 1]  # (B*Hkv, G*C, Kc), (B, Hkv, G, C, nb)
            Kc = p.shape[-1]
            nb = Kc // L
            qc = (q5[:, :, :, t0:t1].to(cd) * scale).reshape(B * Hkv, G * C, D)
            doc = do5[:, :, :, t0:t1].reshape(B * Hkv, G * C, D)
            dp = torch.bmm(doc, v3[:, :Kc].transpose(-1, -2),
                           out=dp_buf[: p.numel()].view_as(p))  # (B*Hkv, G*C, Kc)
            if lib is not None:
                cpu_kernels.landmark_backward(lib, dp, p, g, delta[:, :, :, t0:t1].contiguous(), pres, C, L,
                                              q_offset + t0)
                ds = dp
            else:
                q_pos = q_offset + torch.arange(t0, t1, device=q.device)
                earlier, own = _block_positions(q_pos, nb, L)
                if masked:
                    earlier = saved[per * n + 2]
                ds = _scores_grad(p.view(B, Hkv, G, C, nb, L), dp.view(B, Hkv, G, C, nb, L), g,
                                  earlier, own, delta[:, :, :, t0:t1], L).view_as(dp)
            dq[:, :, :, t0:t1] = torch.bmm(ds, k3[:, :Kc]).view(B, Hkv, G, C, D)
            if c0 < Kc:  # keys before c0 are constants: no dK, dV for them
                # into a contiguous scratch, then added: baddbmm_ into the row slice dk[:, c0:Kc]
                # (batch stride Sp*D) is slow on CPU
                part = kv_buf[: dk.shape[0] * (Kc - c0) * D].view(dk.shape[0], Kc - c0, D)
                dk[:, c0:Kc].add_(torch.bmm(ds[:, :, c0:].transpose(-1, -2), qc, out=part))
                dv[:, c0:Kc].add_(torch.bmm(p[:, :, c0:].transpose(-1, -2), doc, out=part))
        dq.mul_(scale)
        dk, dv = dk.view_as(kp)[:, :, :S], dv.view_as(vp)[:, :, :S]
        return (dq.view(B, H, T, D).to(q.dtype), dk.to(k_dtype), dv.to(v_dtype),
                None, None, None, None, None, None)


def landmark_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_len: int,
                       *, q_offset: int = 0, scale: float | None = None,
                       kv_valid: torch.Tensor | None = None, const_keys: int = 0) -> torch.Tensor:
    """Grouped-softmax attention over a window, vectorized per chunk of query rows.

    q (B, H, T, D); k, v (B, Hkv, S, D) with the key axis starting at a block boundary;
    query i sits at key position q_offset + i. Returns (B, H, T, D) in q's dtype
    (computes in float32, or float64 for float64 inputs). Memory is O(B * H * T * S)
    (the weights are kept for the backward): use `landmark_attention_blockwise` for
    long sequences. kv_valid: optional (B, Hkv, S) bool, False for keys of an absent
    (padded) block, as in `landmark_attention_blockwise`. Raises ValueError on
    inconsistent shapes or arguments. const_keys: the first const_keys keys and values are
    constants (retrieved blocks): their gradient is returned as zeros without being
    computed (two of the backward's four matmuls skip them).
    """
    B, H, T, D, Hkv, S = _check_qkv(q, k, v, block_len, q_offset)
    _check_kv_valid(kv_valid, B, Hkv, S)
    if not isinstance(const_keys, int) or isinstance(const_keys, bool) or not 0 <= const_keys <= S:
        raise ValueError(f"const_keys={const_keys!r} must be an int in [0, S={S}]")
    scale = D ** -0.5 if scale is None else scale
    return _VectorizedLandmark.apply(q, k, v, kv_valid, block_len, q_offset, scale, VECTORIZED_Q_CHUNK, const_keys)


# ---------------------------------------------------------------------------------------
# 3. Blockwise online softmax with a recomputing backward: linear memory.
# ---------------------------------------------------------------------------------------

class _BlockwiseLandmark(torch.autograd.Function):
    """Online softmax over key tiles; only the group-0 normaliser crosses tiles.

    Block quantities (m_b, sum_b, s_lm_b) are local to a tile because tiles hold whole
    blocks, so the online part is a running logsumexp of the group-0 logits a0.
    """

    @staticmethod
    def forward(ctx, q, k, v, kv_valid, block_len, q_offset, scale, q_chunk, k_chunk):
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G, L = H // Hkv, block_len
        cd = _compute_dtype(q.dtype)
        Sp = -(-S // L) * L
        kp, vp = _pad_keys(k, Sp, cd), _pad_keys(v, Sp, cd)  # (B, Hkv, Sp, D)
        kp, vp, kvp, present = _prepare_kv_valid(kv_valid, kp, vp, L)
        q5 = q.reshape(B, Hkv, G, T, D)
        out = torch.empty(B, Hkv, G, T, D, dtype=cd, device=q.device)
        lse = torch.empty(B, Hkv, G, T, dtype=cd, device=q.device)
        shift = not _shift_free(q, kp, scale, cd)
        for t0, t1 in _chunks(T, q_chunk):
            C = t1 - t0
            q_pos = q_offset + torch.arange(t0, t1, device=q.device)  # (C,)
            qc = (q5[:, :, :, t0:t1].to(cd) * scale).reshape(B, Hkv, G * C, D)
            m_run = torch.full((B, Hkv, G, C), NEG_INF, dtype=cd, device=q.device)
            l_run = torch.zeros(B, Hkv, G, C, dtype=cd, device=q.device)
            acc = torch.zeros(B * Hkv, G * C, D, dtype=cd, device=q.device)
            earlier_c, own_c = _block_positions(q_pos, Sp // L, L)  # (C, Sp/L)
            for k0, k1 in _key_tiles(q_offset + t1, k_chunk, L):
                nb = (k1 - k0) // L
                x = torch.matmul(qc, kp[:, :, k0:k1].transpose(-1, -2))  # (B, Hkv, G*C, kw)
                x6 = x.view(B, Hkv, G, C, nb, L)
                kv6 = None if kvp is None else kvp[..., k0:k1].reshape(B, Hkv, 1, 1, nb, L)
                s_lm, m, ssum = _exp_blocks(x6, q_pos, q_offset + t0, k0, L, kv6, shift)
                earlier, own = earlier_c[:, k0 // L: k1 // L], own_c[:, k0 // L: k1 // L]
                earlier = _earlier_present(earlier, kv6, ssum, present, k0 // L, k1 // L)
                a0 = _group0_logits(s_lm, m, ssum, earlier, own)
                m_new = torch.maximum(m_run, a0.amax(-1))  # (B, Hkv, G, C)
                m_safe = m_new.nan_to_num(neginf=0.0)  # rows with nothing allowed so far
                corr = (m_run - m_safe).exp_()
                g = (a0 - m_safe.unsqueeze(-1)).exp_()  # unnormalised group-0 weights
                l_run = l_run * corr + g.sum(-1)
                x6.mul_((g / ssum.clamp_(min=TINY)).unsqueeze(-1))
                acc.mul_(corr.view(B * Hkv, G * C, 1)).baddbmm_(x.flatten(0, 1),
                                                                vp[:, :, k0:k1].flatten(0, 1))
                m_run = m_new
            o = acc.view(B, Hkv, G, C, D) / l_run.unsqueeze(-1)
            out[:, :, :, t0:t1] = o
            lse[:, :, :, t0:t1] = m_run + l_run.log()
        ctx.save_for_backward(q, kp, vp, out, lse, kvp, present)
        ctx.cfg = (block_len, q_offset, scale, q_chunk, k_chunk, S, k.dtype, v.dtype, shift)
        return out.view(B, H, T, D).to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        q, kp, vp, out, lse, kvp, present = ctx.saved_tensors
        block_len, q_offset, scale, q_chunk, k_chunk, S, k_dtype, v_dtype, shift = ctx.cfg
        B, H, T, D = q.shape
        Hkv = kp.shape[1]
        G, L = H // Hkv, block_len
        cd = out.dtype
        q5 = q.reshape(B, Hkv, G, T, D)
        do5 = d_out.reshape(B, Hkv, G, T, D).to(cd)
        dq = torch.empty(B, Hkv, G, T, D, dtype=cd, device=q.device)
        dk, dv = torch.zeros_like(kp).flatten(0, 1), torch.zeros_like(vp).flatten(0, 1)
        delta = (do5 * out).sum(-1)  # (B, Hkv, G, T)
        for t0, t1 in _chunks(T, q_chunk):
            C = t1 - t0
            q_pos = q_offset + torch.arange(t0, t1, device=q.device)
            qc = (q5[:, :, :, t0:t1].to(cd) * scale).reshape(B * Hkv, G * C, D)
            doc = do5[:, :, :, t0:t1].reshape(B * Hkv, G * C, D)
            lse_c = lse[:, :, :, t0:t1].unsqueeze(-1)  # (B, Hkv, G, C, 1)
            dl_c = delta[:, :, :, t0:t1]
            dqc = torch.zeros(B * Hkv, G * C, D, dtype=cd, device=q.device)
            earlier_c, own_c = _block_positions(q_pos, kp.shape[2] // L, L)  # (C, Sp/L)
            for k0, k1 in _key_tiles(q_offset + t1, k_chunk, L):
                nb = (k1 - k0) // L
                kc, vc = kp[:, :, k0:k1].flatten(0, 1), vp[:, :, k0:k1].flatten(0, 1)
                x = torch.bmm(qc, kc.transpose(-1, -2))  # (B*Hkv, G*C, kw)
                x6 = x.view(B, Hkv, G, C, nb, L)
                kv6 = None if kvp is None else kvp[..., k0:k1].reshape(B, Hkv, 1, 1, nb, L)
                s_lm, m, ssum = _exp_blocks(x6, q_pos, q_offset + t0, k0, L, kv6, shift)
                earlier, own = earlier_c[:, k0 // L: k1 // L], own_c[:, k0 // L: k1 // L]
                earlier = _earlier_present(earlier, kv6, ssum, present, k0 // L, k1 // L)
                a0 = _group0_logits(s_lm, m, ssum, earlier, own)
                g = (a0 - lse_c).exp_()  # group-0 weights (B, Hkv, G, C, nb)
                x6.mul_((g / ssum.clamp_(min=TINY)).unsqueeze(-1))  # x is now P
                dp = torch.bmm(doc, vc.transpose(-1, -2))  # (B*Hkv, G*C, kw)
                ds = _scores_grad(x6, dp.view_as(x6), g, earlier, own, dl_c, L).view_as(dp)
                dqc.baddbmm_(ds, kc)
                dk[:, k0:k1].baddbmm_(ds.transpose(-1, -2), qc)
                dv[:, k0:k1].baddbmm_(x.transpose(-1, -2), doc)
            dq[:, :, :, t0:t1] = dqc.view(B, Hkv, G, C, D)
        dq.mul_(scale)
        dk, dv = dk.view_as(kp)[:, :, :S], dv.view_as(vp)[:, :, :S]
        return (dq.view(B, H, T, D).to(q.dtype), dk.to(k_dtype), dv.to(v_dtype),
                None, None, None, None, None, None)


def _key_tiles(end: int, k_chunk: int, L: int) -> list[tuple[int, int]]:
    """Whole-block key tiles covering positions 0..end-1 (keys past `end` never count)."""
    return _chunks(-(-end // L) * L, k_chunk)


def landmark_attention_blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 block_len: int, *, q_offset: int = 0,
                                 scale: float | None = None,
                                 kv_valid: torch.Tensor | None = None,
                                 q_chunk: int = BLOCKWISE_Q_CHUNK, k_chunk: int | None = None) -> torch.Tensor:
    """Grouped-softmax attention with an online softmax over key chunks.

    q (B, H, T, D); k, v (B, Hkv, S, D); query i at key position q_offset + i.
    kv_valid: optional (B, Hkv, S) bool marking absent (padded) keys False; a block
    whose landmark slot is invalid does not count as a group.
    Peak memory beyond the inputs is O(q_chunk * k_chunk) per head, forward and
    backward (the backward recomputes tiles, as FlashAttention does). Computes in
    float32 (float64 for float64 inputs); returns (B, H, T, D) in q's dtype.
    """
    B, H, T, D, Hkv, S = _check_qkv(q, k, v, block_len, q_offset)
    if k_chunk is None:
        k_chunk = default_k_chunk(S, block_len)
    if k_chunk % block_len:
        raise ValueError(f"k_chunk={k_chunk} must be a multiple of block_len={block_len}")
    if q_chunk < 1:
        raise ValueError(f"q_chunk={q_chunk} must be >= 1")
    _check_kv_valid(kv_valid, B, Hkv, S)
    scale = D ** -0.5 if scale is None else scale
    return _BlockwiseLandmark.apply(q, k, v, kv_valid, block_len, q_offset, scale,
                                    q_chunk, k_chunk)


# ---------------------------------------------------------------------------------------
# Plain causal attention (baseline mode, no landmarks)
# ---------------------------------------------------------------------------------------

def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     q_offset: int = 0, scale: float | None = None) -> torch.Tensor:
    """Ordinary causal attention via SDPA. q (B, H, T, D); k, v (B, Hkv, S, D)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    if G > 1:
        k = k.repeat_interleave(G, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(G, dim=1)
    if q_offset == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    q_pos = q_offset + torch.arange(T, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


__all__ = [
    "landmark_attention_reference", "landmark_attention", "landmark_attention_blockwise",
    "causal_attention", "grouped_scores", "max_abs_diff", "default_k_chunk",
]
