"""The fused CPU kernels (engine/landmark_cpu.c via engine/cpu_kernels.py): built on first
use, cached, equal to the torch path, and a clean fallback where they cannot be built."""

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from engine import cpu_kernels
from engine.attention import landmark_attention
from tests.engine.test_attention import require_fused_kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded; restored afterwards."""
    monkeypatch.setenv("FOLIO_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("FOLIO_CPU_KERNELS", "1")
    cpu_kernels.reset()
    yield tmp_path / "kernels"
    cpu_kernels.reset()


def _run(monkeypatch, fused: bool, q, k, v, L, off, kv_valid, const_keys, grad):
    monkeypatch.setenv("FOLIO_CPU_KERNELS", "1" if fused else "0")
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = landmark_attention(q, k, v, L, q_offset=off, kv_valid=kv_valid, const_keys=const_keys)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), dq, dk, dv


@pytest.mark.parametrize("case", [
    # B, H, Hkv, T, S, D, L, absent blocks, const_keys: training shapes (query chunks of
    # 128 rows, a retrieved prefix with absent blocks) and odd ones (last block short)
    (2, 4, 2, 300, 300, 16, 16, (), 0),
    (3, 4, 2, 512, 768, 32, 64, ((0, 0, 0), (1, 1, 2), (2, 0, 1)), 256),
    (1, 2, 1, 45, 100, 8, 8, ((0, 0, 3),), 55),
    (2, 2, 2, 130, 130, 8, 5, (), 0),
])
def test_fused_equals_torch_path_outputs_and_grads(case, monkeypatch):
    require_fused_kernels(monkeypatch)
    B, H, Hkv, T, S, D, L, absent, c0 = case
    g = torch.Generator().manual_seed(sum(case[:7]))
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    kv_valid = None
    if absent:
        kv_valid = torch.ones(B, Hkv, S, dtype=torch.bool)
        for b, h, blk in absent:
            kv_valid[b, h, blk * L:(blk + 1) * L] = False
    grad = torch.randn(B, H, T, D, generator=g)
    off = S - T
    fused = _run(monkeypatch, True, q, k, v, L, off, kv_valid, c0, grad)
    plain = _run(monkeypatch, False, q, k, v, L, off, kv_valid, c0, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, plain):
        assert torch.allclose(a, b, atol=2e-6, rtol=1e-5), f"{name}: max diff {(a - b).abs().max():.3e}"


def test_fused_kernels_take_over_only_where_they_apply(monkeypatch):
    """float32 on the CPU without a per-key mask: fused; float64 or a mask inside a
    block: the torch path (a spy on the kernel entry point counts calls)."""
    require_fused_kernels(monkeypatch)
    calls = []
    real = cpu_kernels.landmark_forward
    monkeypatch.setattr(cpu_kernels, "landmark_forward", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    landmark_attention(q, k, v, 4)
    assert calls, "float32 on the CPU should take the fused kernels"
    calls.clear()
    landmark_attention(q.double(), k.double(), v.double(), 4)
    one_key = torch.ones(1, 1, 16, dtype=torch.bool)
    one_key[0, 0, 1] = False
    landmark_attention(q, k, v, 4, kv_valid=one_key)
    assert not calls


def test_built_once_then_loaded_from_the_cache(fresh):
    lib = cpu_kernels.get()
    if lib is None:
        pytest.skip("no working C compiler here")
    built = sorted(fresh.glob("landmark_cpu-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    cpu_kernels.reset()
    assert cpu_kernels.get() is not None
    assert sorted(fresh.glob("landmark_cpu-*.so")) == built and built[0].stat().st_mtime_ns == mtime
    assert not list(fresh.glob("*.so.tmp*")) and len(list(fresh.iterdir())) == 1  # no temporaries left


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_attention_falls_back_with_one_warning(fresh, monkeypatch, cc):
    monkeypatch.setenv("CC", cc)
    q, k, v = torch.randn(1, 2, 20, 8), torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8)
    with pytest.warns(RuntimeWarning, match="fused CPU attention kernels unavailable"):
        out = landmark_attention(q, k, v, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every call
        again = landmark_attention(q, k, v, 4)
    monkeypatch.setenv("FOLIO_CPU_KERNELS", "0")
    assert torch.equal(out, again) and torch.equal(out, landmark_attention(q, k, v, 4))
    assert not list(fresh.glob("*.so"))


def test_build_error_names_the_compiler_and_its_message(fresh, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho 'fakecc: error: no such target' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"(?s)fakecc failed.*no such target"):
        cpu_kernels.build(str(fake))


def test_switched_off_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("FOLIO_CPU_KERNELS", "0")
    assert cpu_kernels.get() is None
    assert not os.path.exists(fresh)  # nothing built


def test_a_cache_dir_that_cannot_be_made_builds_under_the_temp_dir(fresh, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")  # mkdir below it fails, even as root
    monkeypatch.setenv("FOLIO_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    try:
        path = cpu_kernels.build()
    except RuntimeError as e:
        pytest.skip(f"no working C compiler here: {e}")
    assert path.parent.parent == tmp_path / "tmp" and path.exists()
    assert cpu_kernels.build() == path  # found there again, not rebuilt


def test_loading_the_kernels_leaves_float_semantics_alone(fresh):
    """-ffast-math only compiles the kernels: linking with it would add gcc's crtfastmath
    constructor, which turns flush-to-zero on for the process when the library loads."""
    import subprocess

    if cpu_kernels.get() is None:
        pytest.skip("no working C compiler here")
    tiny = torch.tensor([1e-30], dtype=torch.float32) * torch.tensor([1e-10], dtype=torch.float32)
    assert tiny.item() != 0.0, "a subnormal float32 was flushed to zero after loading the kernels"
    assert float(np.float32(1e-30) * np.float32(1e-10)) != 0.0
    (so,) = fresh.glob("landmark_cpu-*.so")
    syms = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout + \
        subprocess.run(["nm", str(so)], capture_output=True, text=True).stdout
    assert "set_fast_math" not in syms


def test_the_temp_dir_fallback_refuses_a_directory_others_can_write(fresh, monkeypatch, tmp_path):
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        pytest.skip("no C compiler: build() stops before the cache directory")
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("FOLIO_KERNEL_CACHE", str(tmp_path / "a-file" / "kernels"))
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    planted = tmp_path / "tmp" / f"folio-kernels-{os.getuid()}"
    planted.mkdir(parents=True)
    planted.chmod(0o777)  # anyone could have put a library there
    with pytest.raises(RuntimeError, match="not a private directory"):
        cpu_kernels.build()


@pytest.mark.parametrize("shape", [
    # B, Q, N, D: a 1M ingest's chunk (2 KV heads, 768 queries), SmolLM2's head_dim, odd sizes
    # (N not a multiple of the 64-key tile, odd Q, D not a multiple of the vector width)
    (2, 768, 1000, 32), (3, 100, 257, 64), (1, 1, 1, 8), (4, 7, 130, 13), (2, 2, 64, 16),
])
def test_max_scores_equals_the_matmul_and_max(shape, monkeypatch):
    """folio_max_dot: best[b, n] = max_q q[b, q] . k[b, n], the bmm + amax of the torch path."""
    require_fused_kernels(monkeypatch)
    B, Q, N, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    q, k = torch.randn(B, Q, D, generator=g), torch.randn(B, N, D, generator=g)
    got = cpu_kernels.max_scores(q, k)
    want = torch.bmm(k, q.transpose(1, 2)).amax(dim=2)
    assert got.shape == (B, N)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"max diff {(got - want).abs().max():.3e}"
    # strided batches read in place: a key tile of a larger tensor, written into a view of a larger output
    big = torch.randn(B, N + 50, D, generator=g)
    out = torch.full((B, N + 9), 7.0)
    assert cpu_kernels.max_scores(q, big[:, 20:20 + N], out[:, 3:3 + N]) is not None
    assert torch.allclose(out[:, 3:3 + N], torch.bmm(big[:, 20:20 + N], q.transpose(1, 2)).amax(dim=2), atol=1e-5)
    assert (out[:, :3] == 7).all() and (out[:, 3 + N:] == 7).all()  # nothing written outside the view


def test_max_scores_declines_what_it_does_not_handle(monkeypatch):
    """Another dtype, no queries or keys, or the kernels off: None (the caller's torch path runs)."""
    require_fused_kernels(monkeypatch)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 9, 8)
    assert cpu_kernels.max_scores(q.double(), k.double()) is None
    assert cpu_kernels.max_scores(q[:, :0], k) is None and cpu_kernels.max_scores(q, k[:, :0]) is None
    with pytest.raises(ValueError, match="out of shape"):
        cpu_kernels.max_scores(q, k, torch.empty(2, 8))
    monkeypatch.setenv("FOLIO_CPU_KERNELS", "0")
    cpu_kernels.reset()
    try:
        assert cpu_kernels.max_scores(q, k) is None
    finally:
        cpu_kernels.reset()


def test_the_index_uses_the_registered_kernel():
    """Loading engine.cpu_kernels registers max_scores with the landmark index (memory_store)."""
    from memory_store import max_scores as ms

    assert ms.kernel() is cpu_kernels.max_scores
