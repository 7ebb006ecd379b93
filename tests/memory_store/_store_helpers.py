"""Helpers for the memory_store tests (imported as a plain module: tests/ has no __init__.py)."""

from __future__ import annotations

from memory_store.testing.blocks import TEST_LAYOUT as LAYOUT
from memory_store.testing.blocks import make_blocks

__all__ = ["LAYOUT", "make_blocks"]
