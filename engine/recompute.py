"""Activation checkpointing: a model's layers recomputed in backward instead of kept.

`checkpoint_layers(model)` wraps every layer of a `LandmarkTransformer` (anything with a
`layers` list of modules) in torch's non-reentrant checkpoint: backward holds each
layer's input only, and the recomputed layer while its gradient is taken. The trainer
(`TrainConfig.activation_checkpointing`) and the planner's probe (plan/measure.py) both
call it, so the planner measures what training runs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Recompute each of `model.layers` in backward (in place; forward results unchanged)."""
    for layer in model.layers:
        fwd = layer.forward

        def ck_forward(*args, _f=fwd, **kwargs):
            # non-reentrant: the recomputed layer's tensors are what backward holds
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        layer.forward = ck_forward
