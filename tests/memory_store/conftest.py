"""memory_store test fixtures."""

from __future__ import annotations

import pytest
from _store_helpers import LAYOUT

from memory_store.layout import StoreLayout


@pytest.fixture
def layout() -> StoreLayout:
    return LAYOUT
