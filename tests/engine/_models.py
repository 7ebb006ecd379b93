"""Shared test models: a tiny random causal (no landmarks) transformer over byte tokens."""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.model import LandmarkTransformer


def tiny_causal_model(seed: int = 0, *, block_len: int = 8) -> LandmarkTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                      max_seq_len=512, block_len=block_len, attention="causal")
    return LandmarkTransformer(cfg).eval()
