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

  1. `landmark_attention_reference` — loops, float64, the paper's definition literally.
  2. `landmark_attention` — vectorized over a training window; (B, H, T, S) scores. On
     the CPU in float32 its softmax passes run in fused C row kernels
     (engine/landmark_cpu.c via engine/cpu_kernels.py; the same formulas as the torch
     code below, which is the fallback and is tested equal to them).
  3. `landmark_attention_blockwise` — online softmax over key chunks with a custom
     backward that recomputes tiles; peak memory is linear in the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.tuning import BLOCKWISE_Q_CHUNK, VECTORIZED_Q_CHUNK, default_k_chunk

NEG_INF = float("-inf")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_len: int,
               q_offset: int) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"k and v must be (B={B}, Hkv, S, D={D}) and equal; got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv}")
    if not isinstance(block_len, int) or block_len < 2:
        raise ValueError(f"block_len={block_len!r} is invalid: must be an int >= 2")
    if not 0 <= q_offset or q_offset + T > S:
        raise ValueError(f"q_offset={q_offset} with T={T} queries must satisfy "
                         f"0 <= q_offset and q_offset + T <= S={S}")
    return B, H, T, D, Hkv, S


# ---------------------------------------------------------------------------------------
# 1. Reference: the paper's definition, loops in float64. Tests only.
# ---------------------------------------------------------------------------------------

def landmark_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 block_len: int, *, q_offset: int = 0,
                                 scale: float | None = None) -> torch.Tensor:
    """Slow, obvious grouped-softmax attention. q (B, H, T, D); k, v (B, Hkv, S, D).

    Returns (B, H, T, D) in q's dtype; computes in float64 with Python loops over
    queries and groups. Differentiable (autograd through the loops).
    """
    B, H, T, D, Hkv, S = _check_qkv(q, k, v, block_len, q_offset)
    G = H // Hkv
    L = block_len
    scale = D ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            kh, vh = kd[b, h // G], vd[b, h // G]  # (S, D)
            outs = []
            for i in range(T):
                p = q_offset + i
                c = p // L
                s = (kh @ qd[b, h, i]) * scale  # (S,)
                own = [j for j in range(c * L, p + 1) if j % L != L - 1]
                lms = [bb * L + L - 1 for bb in range(c)]
                g0 = torch.softmax(torch.stack([s[j] for j in own + lms]), 0)
                out = torch.zeros(D, dtype=torch.float64, device=q.device)
                for n, j in enumerate(own):
                    out = out + g0[n] * vh[j]
                for n, bb in enumerate(range(c)):
                    toks = list(range(bb * L, bb * L + L - 1))
                    gb = torch.softmax(torch.stack([s[j] for j in toks]), 0)
                    gate = g0[len(own) + n]
                    for m, j in enumerate(toks):
                        out = out + gate * gb[m] * vh[j]
                outs.append(out)
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows).to(q.dtype)


# ---------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------

def grouped_scores(s: torch.Tensor, q_pos: torch.Tensor, k_start: int, block_len: int,
                   S: int, kv_valid: torch.Tensor | None = None, *, with_block_probs: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Turn raw scores of one key range into the grouped-softmax scores s'.

    s: (..., R, C) raw scaled scores of R query rows against keys k_start..k_start+C-1;
    k_start and C are multiples of block_len (keys past S are padding). q_pos: (R,)
    key position of each row. kv_valid: optional (..., C) bool, False for keys of a
    padded (absent) block.

    Why this is the grouped softmax: for j in an earlier block b,
      softmax_b(j) * softmax_0(lm_b) = exp(s_j - lse_b) * exp(s_lm) / Z0
                                     = exp(s_j + beta_b) / Z0,  beta_b = s_lm - lse_b,
    and sum_{j in b} exp(s_j + beta_b) = exp(s_lm), so Z0 (the group-0 normaliser) is
    exactly the sum of exp(s') over all allowed non-landmark keys.

    Returns (s_prime (..., R, C) with -inf where not allowed, p_block (..., R, nb, L-1)
    softmax within each earlier block, zeros elsewhere (only if with_block_probs; the
    backward pass needs it),
    earlier (..., R, nb) bool: block is an earlier, present block of that row).
    """
    L = block_len
    R, C = s.shape[-2:]
    nb = C // L
    dev = s.device
    kpos = torch.arange(k_start, k_start + C, device=dev)  # (C,)
    kblock = kpos.view(nb, L)[:, 0] // L  # (nb,)
    qblock = q_pos // L  # (R,)
    earlier = kblock[None, :] < qblock[:, None]  # (R, nb)
    allowed = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] % L != L - 1) \
        & (kpos[None, :] < S)  # (R, C)
    if kv_valid is not None:
        allowed = allowed & kv_valid.unsqueeze(-2)
        earlier = earlier & kv_valid.view(*kv_valid.shape[:-1], nb, L)[..., -1].unsqueeze(-2)
    sb = s.view(*s.shape[:-1], nb, L)  # (..., R, nb, L)
    ordinary = sb[..., : L - 1]
    lse_b = torch.logsumexp(ordinary, dim=-1)  # (..., R, nb)
    beta = torch.where(earlier, sb[..., L - 1] - lse_b, torch.zeros_like(lse_b))
    s_prime = (sb + beta.unsqueeze(-1)).view_as(s).masked_fill(~allowed, NEG_INF)
    p_block = None
    if with_block_probs:
        p_block = torch.where(earlier.unsqueeze(-1), torch.exp(ordinary - lse_b.unsqueeze(-1)),
                              torch.zeros_like(ordinary))
    return s_prime, p_block, earlier


# ---------------------------------------------------------------------------------------
# Shared tile kernel of implementations 2 and 3 (the fast form of the same identity)
# ---------------------------------------------------------------------------------------
#
# For a tile of raw scores x (B, Hkv, G, C, nb, L) — C query rows, nb whole key blocks —
# the final weight of an ordinary key j of block b factorises as
#     P_j = e_j * g_b / sum_b,   e_j = exp(s_j - m_b),   sum_b = sum_{j in b} e_j
# (m_b: max of b's allowed ordinary scores), where g = softmax(a0) over the group-0
# members: a0_b = s_lm_b for an earlier block b, a0_c = m_c + log sum_c (the log of the
# own block's ordinary mass) for the row's own block c, -inf otherwise. e_j / sum_b is
# softmax_b(j) (own block: the share of j in the block's mass) and g_b = softmax_0(lm_b),
# so this is the paper's definition, and equals softmax(s') with s' = s + beta (see
# `grouped_scores`). It touches the (rows x keys) tile in five passes (max, subtract,
# exp, sum, scale) instead of the dozen of logsumexp + add + mask + softmax; every other
# quantity is (rows x blocks), L times smaller. Stability: e <= 1 and sum_b >= 1 for any
# block with an allowed key, so nothing underflows where it matters.
#
# Backward: with dP = dO V^T, W = P * dP, w_b = sum_{j in b} W_j, g_b = sum_{j in b} P_j,
# delta = rowsum(dO * O), the gradient wrt the raw scores is
#     ordinary j of an earlier block b: P_j (dP_j - w_b / g_b)
#     ordinary j of the own block:      P_j (dP_j - delta)
#     landmark of an earlier block b:   w_b - g_b * delta
# (chain rule through beta_b = s_lm_b - logsumexp_b: softmax_b(j) = P_j / g_b), so it is
# W - P * mu with a per-(row, block) mu: three passes over the tile.
# The fused CPU kernels (engine/landmark_cpu.c) do the same per row while it is in L1: two
# passes each way (they always subtract the block max: one more read of each block, in L1).


def _block_positions(q_pos: torch.Tensor, nb: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """earlier, own: (C, nb) bool — key block b is before / is the block of row q_pos."""
    kblock = torch.arange(nb, device=q_pos.device)  # (nb,)
    qblock = (q_pos // L)[:, None]  # (C, 1)
    return kblock < qblock, kblock == qblock


def _exp_blocks(x6: torch.Tensor, q_pos: torch.Tensor, p0: int, k0: int, L: int,
                kv6: torch.Tensor | None, shift: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """In place: raw scores x6 (B, Hkv, G, C, nb, L) -> e = exp(s - m_b), 0 where not allowed.

    q_pos (C,) row positions, p0 = q_pos[0] (a Python int), k0 the tile's first key.
    shift=False skips the block max (m_b = 0): only for scores known to lie in
    [-SHIFT_FREE_BOUND, SHIFT_FREE_BOUND], where exp neither overflows nor underflows.
    Returns s_lm (landmark scores), m (block max of allowed ordinary scores, the most
    negative float if none; None if not shifted) and ssum (sum of e per block, > 0 if
    any key is allowed, else 0), each (B, Hkv, G, C, nb).
    """
    nb = x6.shape[-2]
    s_lm = x6[..., L - 1].clone()
    lm = x6[..., L - 1]  # landmarks carry no value weight
    # causal: only blocks from the first row's own block on can hold keys after a row
    d0 = max(0, p0 // L * L - k0) // L
    tail, future = x6[..., d0:, :], None
    if d0 < nb:
        kpos = torch.arange(k0 + d0 * L, k0 + nb * L, device=x6.device)  # (nbd*L,)
        future = (kpos > q_pos[:, None]).view(-1, nb - d0, L)  # (C, nbd, L)
    if not shift:  # every score is in range: exp everything, then zero what is not allowed
        x6.exp_()
        _fill_masked(lm, tail, future, x6, kv6, 0.0)
        return s_lm, None, x6.sum(-1)
    _fill_masked(lm, tail, future, x6, kv6, NEG_INF)
    m = x6.amax(-1).clamp_(min=torch.finfo(x6.dtype).min)  # no allowed key: e = 0 below
    x6.sub_(m.unsqueeze(-1))
    # exp of -inf (of anything below about -87) takes a ~20x slower path on CPU: the
    # masked slots (landmarks, the causal triangle) get a harmless 0 and are zeroed after
    _fill_masked(lm, tail, future, x6, kv6, 0.0)
    x6.exp_()
    _fill_masked(lm, tail, future, x6, kv6, 0.0)
    return s_lm, m, x6.sum(-1)


TINY = torch.finfo(torch.float32).tiny  # ssum is 0 only where g is 0
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


def _fill_masked(lm: torch.Tensor, tail: torch.Tensor, future: torch.Tensor | None,
                 x6: torch.Tensor, kv6: torch.Tensor | None, value: float) -> None:
    """Set the slots that are never attended: landmarks, causal future, absent keys."""
    lm.fill_(value)
    if future is not None:
        tail.masked_fill_(future, value)
    if kv6 is not None:
        x6.masked_fill_(~kv6, value)


def _group0_logits(s_lm: torch.Tensor, m: torch.Tensor | None, ssum: torch.Tensor,
                   earlier: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """a0 (B, Hkv, G, C, nb): s_lm of an earlier block, log of the own block's ordinary
    mass (m + log sum), -inf for any other block (not a member of group 0)."""
    own_mass = ssum.log() if m is None else m + ssum.log()
    return torch.where(earlier, s_lm, torch.where(own, own_mass, NEG_INF))


def _scores_grad(p6: torch.Tensor, dp6: torch.Tensor, g: torch.Tensor, earlier: torch.Tensor,
                 own: torch.Tensor, delta: torch.Tensor, L: int) -> torch.Tensor:
    """In place: dP (B, Hkv, G, C, nb, L) -> gradient wrt the raw scores (see above).

    p6: final weights P; g: (B, Hkv, G, C, nb) block sums of P (the group-0 weights);
    delta: (B, Hkv, G, C).
    """
    w6 = dp6.mul_(p6)  # W = P * dP
    w = w6.sum(-1)  # (B, Hkv, G, C, nb)
    d = delta.unsqueeze(-1)
    # g == 0 only where every P of the block is 0 (so is w): any finite mu works there
    mu = torch.where(earlier, w / g.clamp(min=torch.finfo(g.dtype).tiny),
                     torch.where(own, d, 0.0))
    w6.addcmul_(p6, mu.unsqueeze(-1), value=-1.0)
    w6[..., L - 1] = torch.where(earlier, w - g * d, 0.0)
    return w6


# ---------------------------------------------------------------------------------------
# 2. Vectorized: training windows.
# ---------------------------------------------------------------------------------------

def _fused_kernels(q: torch.Tensor, cd: torch.dtype, kvp: torch.Tensor | None):
    """The fused CPU kernels (engine/cpu_kernels.py) when they apply: float32 on the CPU,
    no per-key mask (whole absent blocks are fine); else None (the torch path)."""
    if q.device.type != "cpu" or cd != torch.float32 or kvp is not None:
        return None
    return cpu_kernels.get()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pad_keys(t: torch.Tensor, Sp: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv, Sp, D) in dtype, zero rows past S (always masked)."""
    t = t.to(dtype)
    return F.pad(t, (0, 0, 0, Sp - t.shape[2])) if Sp != t.shape[2] else t.contiguous()


def _prepare_kv_valid(kv_valid: torch.Tensor | None, kp: torch.Tensor, vp: torch.Tensor, L: int):
    """-> (kp, vp, kvp, present) for a key-validity mask.

    When every block is either wholly valid or wholly absent (how retrieval pads: absent
    blocks, never absent single keys), the absent blocks' keys and values are zeroed (new
    tensors; unless they are zeros already, as the store pads them: then kp and vp are
    returned as they are) and `present` (B, Hkv, 1, 1, nb) bool only removes them from
    group 0: their weight g is then 0, so their P, dK and dV are exactly 0, with no pass
    over the score tiles (the per-key path below masks each tile three times: ~25% of a
    training step's attention). Positions past S are counted valid here: no row ever sees
    them.
    Otherwise kvp is the (B, Hkv, Sp) mask padded with False, applied key by key, and
    present is None. Without a mask both are None.
    """
    if kv_valid is None:
        return kp, vp, None, None
    B, Hkv, S = kv_valid.shape
    Sp = kp.shape[2]
    keys = F.pad(kv_valid, (0, Sp - S), value=True).view(B, Hkv, Sp // L, L)
    present = keys.all(-1)  # (B, Hkv, nb)
    if torch.equal(present, keys.any(-1)):
        absent = ~present
        D = kp.shape[-1]
        # only the absent blocks are read to see whether they need zeroing (two whole copies)
        if bool(kp.view(B, Hkv, -1, L, D)[absent].any() | vp.view(B, Hkv, -1, L, D)[absent].any()):  # one sync
            on = keys.reshape(B, Hkv, Sp, 1)
            kp, vp = kp.masked_fill(~on, 0.0), vp.masked_fill(~on, 0.0)
        return kp, vp, None, present[:, :, None, None]
    return kp, vp, F.pad(kv_valid, (0, Sp - S), value=False), None


def _earlier_present(earlier: torch.Tensor, kv6: torch.Tensor | None, ssum: torch.Tensor,
                     present: torch.Tensor | None, b0: int, b1: int) -> torch.Tensor:
    """Restrict `earlier` to blocks that exist: per key (kv6: landmark and a token present)
    or per whole block (present, blocks b0..b1 of the key axis)."""
    if kv6 is not None:  # a block counts only if its landmark and a token are present
        return earlier & kv6[..., -1] & (ssum > 0)
    if present is not None:
        return earlier & present[..., b0:b1]
    return earlier


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
                # (batch stride Sp*D) runs ~2x slower on CPU than into a contiguous output
                part = kv_buf[: dk.shape[0] * (Kc - c0) * D].view(dk.shape[0], Kc - c0, D)
                dk[:, c0:Kc].add_(torch.bmm(ds[:, :, c0:].transpose(-1, -2), qc, out=part))
                dv[:, c0:Kc].add_(torch.bmm(p[:, :, c0:].transpose(-1, -2), doc, out=part))
        dq.mul_(scale)
        dk, dv = dk.view_as(kp)[:, :, :S], dv.view_as(vp)[:, :, :S]
        return (dq.view(B, H, T, D).to(q.dtype), dk.to(k_dtype), dv.to(v_dtype),
                None, None, None, None, None, None)


def _check_kv_valid(kv_valid: torch.Tensor | None, B: int, Hkv: int, S: int) -> None:
    if kv_valid is not None and (kv_valid.dtype != torch.bool or kv_valid.shape != (B, Hkv, S)):
        raise ValueError(f"kv_valid must be (B={B}, Hkv={Hkv}, S={S}) bool, got "
                         f"{tuple(kv_valid.shape)} {kv_valid.dtype}")


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

def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


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
