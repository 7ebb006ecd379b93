"""The shared pieces of the landmark attention kernels (engine/attention.py): argument checks,
key padding and validity masks, and the tile kernel both fast implementations run.

Shape letters as in engine/attention.py: B batch, Hkv key/value heads, G = H // Hkv, C query
rows of a chunk, nb key blocks, L block_len, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import cpu_kernels

NEG_INF = float("-inf")
TINY = torch.finfo(torch.float32).tiny  # ssum is 0 only where g is 0


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


def _check_kv_valid(kv_valid: torch.Tensor | None, B: int, Hkv: int, S: int) -> None:
    if kv_valid is not None and (kv_valid.dtype != torch.bool or kv_valid.shape != (B, Hkv, S)):
        raise ValueError(f"kv_valid must be (B={B}, Hkv={Hkv}, S={S}) bool, got "
                         f"{tuple(kv_valid.shape)} {kv_valid.dtype}")



def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


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
    # exp of -inf (of anything below about -87) takes a much slower path on CPU: the
    # masked slots (landmarks, the causal triangle) get a harmless 0 and are zeroed after
    _fill_masked(lm, tail, future, x6, kv6, 0.0)
    x6.exp_()
    _fill_masked(lm, tail, future, x6, kv6, 0.0)
    return s_lm, m, x6.sum(-1)




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

