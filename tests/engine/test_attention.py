"""Implementations 2 (vectorized) and 3 (blockwise) against the float64 reference (1).

Outputs and gradients must match within 1e-5 in float32 on random inputs: several
block lengths, a last block that is not full, GQA, batch > 1, queries offset into the
key axis (chunked prefill / decoding).
"""

import os
import shutil

import pytest
import torch

import engine.attention as attention
from engine import cpu_kernels
from engine.attention import (causal_attention, landmark_attention,
                              landmark_attention_blockwise, landmark_attention_reference)

TOL = 1e-5

CASES = [
    # B, H, Hkv, T, D, block_len, q_offset
    (2, 4, 2, 24, 8, 4, 0),     # GQA, batch 2, whole blocks
    (2, 4, 2, 23, 8, 4, 0),     # last block not full
    (1, 2, 1, 17, 4, 5, 0),     # GQA 2:1, odd block
    (2, 3, 3, 19, 6, 3, 0),     # MHA, tiny blocks
    (1, 4, 2, 9, 8, 4, 11),     # queries after 11 cached positions
    (2, 2, 1, 1, 8, 6, 30),     # a single decoding query
    (1, 2, 2, 40, 8, 16, 0),    # block longer than a chunk below
]


def _inputs(B, H, Hkv, T, D, S, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).requires_grad_(True)  # noqa: E731
    return mk(B, H, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)


def _report(name, a, b):
    d = (a.double() - b.double()).abs()
    return f"{name}: max {d.max().item():.3e} mean {d.mean().item():.3e}"


def require_fused_kernels(monkeypatch) -> None:
    """Turn the fused CPU kernels on; they must build wherever a C compiler is present."""
    monkeypatch.setenv("FOLIO_CPU_KERNELS", "1")
    if cpu_kernels.get() is None:
        cc = os.environ.get("CC") or "cc"
        if shutil.which(cc):
            pytest.fail(f"{cc} is on PATH but the fused CPU kernels did not build (see the warning)")
        pytest.skip("no C compiler: the fused CPU kernels cannot be built here")


@pytest.fixture(params=["fused", "shift_free", "shifted"])
def exp_path(request, monkeypatch):
    """Every softmax path of the vectorized kernel: the fused CPU kernels
    (engine/landmark_cpu.c, the default), and the torch path's two exp paths — random test
    scores are small, so they take the shift-free one; a negative bound forces the
    per-block max subtraction. The blockwise kernel has only the torch paths (its "fused"
    run repeats "shift_free")."""
    if request.param == "fused":
        require_fused_kernels(monkeypatch)
    else:
        monkeypatch.setenv("FOLIO_CPU_KERNELS", "0")
    if request.param == "shifted":
        monkeypatch.setattr(attention, "SHIFT_FREE_BOUND", -1.0)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}T{}D{}L{}off{}".format(*c))
@pytest.mark.parametrize("impl", ["vectorized", "blockwise"])
def test_matches_reference_outputs_and_grads(case, impl, exp_path):
    B, H, Hkv, T, D, L, off = case
    q, k, v = _inputs(B, H, Hkv, T, D, T + off, seed=hash(case) % 1000)
    ref = landmark_attention_reference(q, k, v, L, q_offset=off)
    if impl == "vectorized":
        out = landmark_attention(q, k, v, L, q_offset=off)
    else:  # small chunks so tiles split queries and keys in many places
        out = landmark_attention_blockwise(q, k, v, L, q_offset=off, q_chunk=5, k_chunk=2 * L)
    assert out.dtype == torch.float32 and out.shape == (B, H, T, D)
    assert (out - ref).abs().max() <= TOL, _report("out", out, ref)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert (a - b).abs().max() <= TOL, _report("d" + name, a, b)


def test_large_scores_take_the_shifted_path_and_stay_accurate(exp_path):
    """Scores of magnitude ~100 (past exp's float32 range if not shifted), including a
    block whose ordinary keys score far below its landmark. Tolerance 1e-4: float32
    scores this large carry ~1e-5 rounding of their own."""
    B, H, Hkv, T, D, L = 1, 2, 1, 20, 8, 4
    q, k, v = _inputs(B, H, Hkv, T, D, T, seed=11)
    with torch.no_grad():
        q.mul_(12.0)
        k[:, :, 0:3] *= -8.0  # block 0's ordinary keys: scores far from its landmark's
    assert not attention._shift_free(q, k, D ** -0.5, torch.float32)
    ref = landmark_attention_reference(q, k, v, L)
    for fn in (landmark_attention, landmark_attention_blockwise):
        out = fn(q, k, v, L)
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max() <= 1e-4, _report(fn.__name__, out, ref)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_vectorized_without_grad_matches_with_grad():
    q, k, v = _inputs(2, 4, 2, 23, 8, 23, seed=13)
    with torch.no_grad():
        a = landmark_attention(q, k, v, 4)
    b = landmark_attention(q, k, v, 4)
    assert torch.equal(a, b.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_compute_and_return_in_kind(dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in _inputs(1, 2, 1, 12, 8, 12, seed=17))
    ref = landmark_attention_reference(q, k, v, 4).double()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-12
    for fn in (landmark_attention, landmark_attention_blockwise):
        out = fn(q, k, v, 4)
        assert out.dtype == dtype
        assert (out.double() - ref).abs().max() <= tol, _report(fn.__name__, out, ref)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert dq.dtype == dk.dtype == dv.dtype == dtype


def test_weights_follow_paper_definition_by_hand(exp_path):
    """One query, two blocks of L=3, values = one-hot, so the output IS the weights."""
    L = 3
    s = torch.tensor([0.3, -1.0, 2.0, 0.7, 0.1, 0.0], dtype=torch.float64)  # scores to keys 0..5
    # query at position 4 (block 1): own block ordinary = {3, 4}; group 0 = {3, 4, lm 2}
    z0 = s[3].exp() + s[4].exp() + s[2].exp()
    zb = s[0].exp() + s[1].exp()
    expect = torch.tensor([(s[0].exp() / zb) * (s[2].exp() / z0), (s[1].exp() / zb) * (s[2].exp() / z0),
                           0.0, s[3].exp() / z0, s[4].exp() / z0, 0.0], dtype=torch.float64)
    # build q, k with q.k_j = s_j: D = 6, k = identity rows, q = s, scale 1
    q = s.view(1, 1, 1, 6).float()
    k = torch.eye(6).view(1, 1, 6, 6)
    v = torch.eye(6).view(1, 1, 6, 6)
    for fn in (landmark_attention_reference, landmark_attention, landmark_attention_blockwise):
        out = fn(q, k, v, L, q_offset=4, scale=1.0)[0, 0, 0].double()
        assert torch.allclose(out, expect, atol=1e-6), (fn.__name__, out, expect)
        assert abs(out.sum().item() - 1.0) < 1e-6


def test_own_landmark_never_attended(exp_path):
    """Changing the value at a query's own landmark changes nothing for that block's queries."""
    q, k, v = _inputs(1, 2, 2, 8, 4, 8, seed=3)
    out1 = landmark_attention(q, k, v, 4)
    v2 = v.detach().clone()
    v2[:, :, 7] += 100.0  # landmark of block 1 (positions 4..7)
    out2 = landmark_attention(q, k, v2, 4)
    assert torch.equal(out1[:, :, 4:8], out2[:, :, 4:8])


def test_blockwise_kv_valid_drops_whole_blocks(exp_path):
    """Masking a block out equals deleting it from the key axis (its landmark too)."""
    B, H, Hkv, D, L = 1, 2, 1, 8, 4
    q, k, v = _inputs(B, H, Hkv, 4, D, 16, seed=5)
    valid = torch.ones(B, Hkv, 16, dtype=torch.bool)
    valid[..., 4:8] = False  # block 1 absent
    out = landmark_attention_blockwise(q, k, v, L, q_offset=12, kv_valid=valid)
    keep = torch.cat([torch.arange(0, 4), torch.arange(8, 16)])
    ref = landmark_attention_reference(q, k[:, :, keep], v[:, :, keep], L, q_offset=8)
    assert (out - ref).abs().max() <= TOL, _report("out", out, ref)


@pytest.mark.parametrize("impl", ["vectorized", "blockwise"])
def test_kv_valid_outputs_and_grads_equal_deleting_the_blocks(exp_path, impl):
    """Per batch row and KV head, different blocks absent (as retrieval pads them): outputs
    and gradients equal the reference on the keys with those blocks deleted; the absent
    keys get zero gradient."""
    B, H, Hkv, T, D, L = 2, 4, 2, 7, 8, 4
    S = 5 * L + T  # 5 stored blocks, then the window
    q, k, v = _inputs(B, H, Hkv, T, D, S, seed=11)
    valid = torch.ones(B, Hkv, S, dtype=torch.bool)
    absent = {(0, 0): [1], (0, 1): [0, 3], (1, 0): [], (1, 1): [2, 4]}
    for (b, h), blocks in absent.items():
        for blk in blocks:
            valid[b, h, blk * L:(blk + 1) * L] = False
    fn = landmark_attention if impl == "vectorized" else landmark_attention_blockwise
    out = fn(q, k, v, L, q_offset=5 * L, kv_valid=valid)
    g_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g_out)
    for b in range(B):
        for h in range(Hkv):
            keep = valid[b, h].nonzero().squeeze(1)
            qs = q[b:b + 1, h * 2:(h + 1) * 2].detach().requires_grad_(True)
            ks = k[b:b + 1, h:h + 1, keep].detach().requires_grad_(True)
            vs = v[b:b + 1, h:h + 1, keep].detach().requires_grad_(True)
            ref = landmark_attention_reference(qs, ks, vs, L, q_offset=len(keep) - T)
            rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), g_out[b:b + 1, h * 2:(h + 1) * 2].double())
            assert (out[b:b + 1, h * 2:(h + 1) * 2] - ref).abs().max() <= TOL, (b, h)
            assert (dq[b:b + 1, h * 2:(h + 1) * 2] - rq).abs().max() <= TOL, (b, h)
            assert (dk[b:b + 1, h:h + 1, keep] - rk).abs().max() <= TOL, (b, h)
            assert (dv[b:b + 1, h:h + 1, keep] - rv).abs().max() <= TOL, (b, h)
            gone = (~valid[b, h]).nonzero().squeeze(1)
            assert bool((dk[b, h, gone] == 0).all()) and bool((dv[b, h, gone] == 0).all())


@pytest.mark.parametrize("impl", ["vectorized", "blockwise"])
def test_absent_blocks_holding_huge_values_change_nothing(exp_path, impl):
    """Whole absent blocks are dropped without masking the score tiles: whatever their
    keys and values hold (here 1e6), the output and the other gradients equal the clean run."""
    B, H, Hkv, T, D, L = 2, 4, 2, 6, 8, 4
    S = 4 * L + T
    q, k, v = _inputs(B, H, Hkv, T, D, S, seed=12)
    valid = torch.ones(B, Hkv, S, dtype=torch.bool)
    valid[0, 1, L:3 * L] = False
    valid[1, 0, :L] = False
    fn = landmark_attention if impl == "vectorized" else landmark_attention_blockwise
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~valid], v2[~valid] = 1e6, -1e6
    k2.requires_grad_(True), v2.requires_grad_(True)
    out1 = fn(q, k, v, L, q_offset=4 * L, kv_valid=valid)
    out2 = fn(q, k2, v2, L, q_offset=4 * L, kv_valid=valid)
    assert torch.isfinite(out2).all() and (out1 - out2).abs().max() <= TOL
    g = torch.randn_like(out1)
    g1 = torch.autograd.grad(out1, (q, k, v), g)
    g2 = torch.autograd.grad(out2, (q, k2, v2), g)
    for a, b in zip(g1, g2):
        assert torch.isfinite(b).all() and (a - b).abs().max() <= TOL


def test_absent_blocks_already_zero_are_not_copied():
    """Whole absent blocks are zeroed in new tensors only when they hold something: zeros
    (what the store pads with) keep the caller's tensors; anything else is zeroed."""
    B, Hkv, S, D, L = 2, 2, 12, 4, 4
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    valid = torch.ones(B, Hkv, S, dtype=torch.bool)
    valid[1, 0, :L] = False
    kp, vp, kvp, present = attention._prepare_kv_valid(valid, k, v, L)
    assert kvp is None and not bool(present[1, 0, 0, 0, 0]) and bool(present.sum() == B * Hkv * 3 - 1)
    assert kp is not k and bool((kp[1, 0, :L] == 0).all()) and torch.equal(kp[0], k[0])
    assert bool((vp[1, 0, :L] == 0).all()) and torch.equal(vp[1, 1], v[1, 1])
    k[1, 0, :L], v[1, 0, :L] = 0.0, 0.0
    kp, vp, _, _ = attention._prepare_kv_valid(valid, k, v, L)
    assert kp is k and vp is v


def test_kv_valid_within_a_block_masks_single_keys_in_both_kernels(exp_path):
    """A mask that drops single keys (not whole blocks) takes the per-key path: both
    kernels agree, forward and backward, and a masked key gets no weight."""
    B, H, Hkv, T, D, L = 1, 2, 1, 6, 8, 4
    S = 3 * L + T
    q, k, v = _inputs(B, H, Hkv, T, D, S, seed=13)
    valid = torch.ones(B, Hkv, S, dtype=torch.bool)
    valid[0, 0, 1] = False  # one ordinary key of block 0
    valid[0, 0, L:2 * L] = False  # and all of block 1
    outs, grads = [], []
    for fn in (landmark_attention, landmark_attention_blockwise):
        out = fn(q, k, v, L, q_offset=3 * L, kv_valid=valid)
        outs.append(out)
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert (outs[0] - outs[1]).abs().max() <= TOL
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= TOL
    v2 = v.detach().clone()
    v2[0, 0, 1] += 100.0  # the masked key's value must not matter
    assert (landmark_attention(q, k, v2, L, q_offset=3 * L, kv_valid=valid) - outs[0]).abs().max() <= TOL


def test_vectorized_backward_with_a_short_last_query_chunk():
    """T = 128 + 8: the last query chunk's weights are the smallest tile; the backward's
    scratch buffer must fit the largest (it was sized by the last one and failed)."""
    q, k, v = _inputs(1, 2, 1, 136, 8, 136, seed=5)
    outs = [fn(q, k, v, 4) for fn in (landmark_attention, landmark_attention_blockwise)]
    grads = [torch.autograd.grad(o, (q, k, v), torch.ones_like(o)) for o in outs]
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("const_keys", [0, 5, 8, 20])
def test_const_keys_skips_only_the_constant_prefix_gradient(const_keys, monkeypatch):
    """const_keys=c: the same output and dQ, the same dK/dV from key c on, zeros before
    (a prefix inside a block, a whole block, past the first query chunk's keys)."""
    monkeypatch.setattr("engine.attention.VECTORIZED_Q_CHUNK", 3)  # chunks see 16, 19, 22 keys
    B, H, Hkv, T, D, L = 2, 4, 2, 10, 8, 4
    S = 3 * L + T
    q, k, v = _inputs(B, H, Hkv, T, D, S, seed=21)
    valid = torch.ones(B, Hkv, S, dtype=torch.bool)
    valid[1, 0, :L] = False  # an absent retrieved block in one lane
    out = landmark_attention(q, k, v, L, q_offset=3 * L, kv_valid=valid)
    ref = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    out_c = landmark_attention(q, k, v, L, q_offset=3 * L, kv_valid=valid, const_keys=const_keys)
    got = torch.autograd.grad(out_c, (q, k, v), torch.ones_like(out_c))
    assert (out - out_c).abs().max() == 0
    assert (ref[0] - got[0]).abs().max() <= TOL
    for r, g in zip(ref[1:], got[1:]):
        assert (r[:, :, const_keys:] - g[:, :, const_keys:]).abs().max() <= TOL
        assert (g[:, :, :const_keys] == 0).all()
    if const_keys:
        assert ref[1][:, :, :const_keys].abs().max() > 0  # the skipped gradient was not zero anyway
    with pytest.raises(ValueError, match="const_keys"):
        landmark_attention(q, k, v, L, q_offset=3 * L, const_keys=S + 1)


def test_kv_valid_must_be_bool_of_the_key_shape():
    q, k, v = _inputs(1, 2, 1, 4, 4, 8, seed=0)
    for fn in (landmark_attention, landmark_attention_blockwise):
        with pytest.raises(ValueError, match="kv_valid"):
            fn(q, k, v, 4, q_offset=4, kv_valid=torch.ones(1, 1, 7, dtype=torch.bool))
        with pytest.raises(ValueError, match="kv_valid"):
            fn(q, k, v, 4, q_offset=4, kv_valid=torch.ones(1, 1, 8))


def test_causal_attention_matches_manual():
    q, k, v = _inputs(2, 4, 2, 10, 8, 10, seed=7)
    out = causal_attention(q, k, v)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), float("-inf"))
    ref = torch.softmax(s, -1) @ vv
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("bad", [
    dict(block_len=1), dict(q_offset=-1), dict(q_offset=100),
])
def test_bad_arguments_raise_value_error(bad):
    q, k, v = _inputs(1, 2, 1, 4, 4, 8, seed=0)
    block_len, q_offset = bad.get("block_len", 4), bad.get("q_offset", 0)
    for fn in (landmark_attention, landmark_attention_blockwise):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fn(q, k, v, block_len, q_offset=q_offset)


def test_bad_shapes_raise():
    q, k, v = _inputs(1, 3, 2, 4, 4, 4, seed=0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        landmark_attention(q, k, v, 4)
    with pytest.raises(ValueError, match="4-D"):
        landmark_attention(q[0], k, v, 4)
