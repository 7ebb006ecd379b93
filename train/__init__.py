"""Folio's trainer: data, DeepSpeed engine setup, the windowed training loop, checkpoints.

Import direction is `train -> engine -> memory_store`; only `train/ds_engine.py`
imports deepspeed (lazily), so importing this package stays cheap.
"""
