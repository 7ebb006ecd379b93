"""GPU path: the same code on CUDA (skipped without a GPU). CPU twins: test_attention.py,
test_model.py, test_retrieval.py run the identical functions on the CPU."""

import pytest
import torch
import zarr

from engine.attention import landmark_attention, landmark_attention_blockwise, max_abs_diff
from engine.config import preset
from engine.inference import TOKENIZER, ingest, open_store
from engine.model import LandmarkTransformer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_attention_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    for fn in (landmark_attention, landmark_attention_blockwise):
        cpu = fn(q, k, v, 64)
        gpu = fn(q.cuda(), k.cuda(), v.cuda(), 64).cpu()
        assert max_abs_diff(cpu, gpu) < 1e-4


def test_bf16_model_forward_and_decode_on_cuda():
    torch.manual_seed(0)
    m = LandmarkTransformer(preset("tiny", dtype="bfloat16")).cuda().eval()
    toks = torch.randint(0, 256, (1, 200), device="cuda")
    with torch.no_grad():
        full = m(toks, impl="blockwise").float()
        cache = m.new_cache(1, 256)
        inc = torch.cat([m(toks[:, :100], cache=cache)] +
                        [m(toks[:, t:t + 1], cache=cache) for t in range(100, 200)], 1).float()
    assert torch.isfinite(full).all() and max_abs_diff(full, inc) < 0.1  # bf16 rounding


def test_retrieval_with_cuda_device_tier():
    from memory_store import StoreConfig

    torch.manual_seed(0)
    m = LandmarkTransformer(preset("tiny")).cuda().eval()
    store = open_store(zarr.storage.MemoryStore(), m.cfg, "w",
                       config=StoreConfig(device="cuda", device_budget_bytes=1 << 20,
                                          host_budget_bytes=1 << 20, sync_mode="none"))
    ingest(m, store, "doc", TOKENIZER.encode("gpu text " * 400))
    k, v = store.get_layer(store.stream_blocks("doc")[:3].tolist(), 1)
    assert k.is_cuda and v.is_cuda and k.shape[0] == 3


def _training_lanes_outputs(device: str) -> torch.Tensor:
    """Three training windows of two lanes through the batched retrieval path on `device`:
    lane 0 starts a new document at the third window (a lane without blocks beside one with),
    top_k covers every stored block (no tie can pick different blocks on another device),
    every step ends with one put (end_chunks)."""
    from engine.landmarks import insert_landmarks
    from engine.retrieval import BatchMemory, RetrievalConfig, RetrievalMemory, end_chunks
    from memory_store import StoreConfig

    g = torch.Generator().manual_seed(11)
    docs = [insert_landmarks(torch.randint(0, 256, (168,), generator=g), 8, TOKENIZER.LANDMARK) for _ in range(2)]
    rc = RetrievalConfig(top_k=16, local_blocks=0, chunk_len=64, kernel="vectorized")
    torch.manual_seed(0)
    m = LandmarkTransformer(preset("tiny", block_len=8, max_seq_len=64)).to(device).eval()
    store = open_store(zarr.storage.MemoryStore(), m.cfg, "w",
                       config=StoreConfig(device=device, device_budget_bytes=1 << 20, host_budget_bytes=1 << 20,
                                          sync_mode="none"))
    mems = [RetrievalMemory(m.cfg, store, stream=f"d{i}", retrieval=rc) for i in range(2)]
    outs = []
    with torch.no_grad():
        for w in range(3):
            if w == 2:
                store.delete_stream("d0")
                mems[0] = RetrievalMemory(m.cfg, store, stream="next", retrieval=rc)
            x = torch.stack([d[w * 64:(w + 1) * 64] for d in docs]).to(device)
            outs.append(m(x, memory=BatchMemory(mems)).float().cpu())
            assert end_chunks(mems) == [8, 8]
    store.close()
    return torch.cat(outs, 1)


def test_training_lanes_on_cuda_match_cpu():
    """The training retrieval path (lanes batched, a lane without blocks beside one with, one
    store put per step) with a CUDA store gives the CPU's outputs. CPU twin:
    test_retrieval.py::test_batch_memory_with_lanes_at_different_depths_matches_row_by_row."""
    assert max_abs_diff(_training_lanes_outputs("cpu"), _training_lanes_outputs("cuda")) < 1e-3
