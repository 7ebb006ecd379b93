"""The readable paths of landmark attention: the paper's grouped softmax as loops in float64
(`landmark_attention_reference`, the tests' oracle) and the exact identity every fast kernel
uses (`grouped_scores`: the grouped softmax as ONE ordinary softmax of modified scores), which
the memory sources' composition (engine/sources.py) also uses for keys outside the block layout.
"""

from __future__ import annotations

import torch

from engine.attention_tiles import NEG_INF, _check_qkv


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

