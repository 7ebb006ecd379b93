"""memory_store test fixtures."""

from __future__ import annotations

import pytest
from _store_helpers import LAYOUT

from memory_store.layout import StoreLayout


@pytest.fixture
def layout() -> StoreLayout:
    return LAYOUT


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on a loopback port: moto's server mode in a thread of this process (its
    HTTP server answers other processes too). The endpoint and dummy credentials go into os.environ
    (AWS_ENDPOINT_URL...), where s3fs/botocore in this process and in children find them. Skips when
    moto[server] or s3fs is not installed (pip install -e '.[dev]')."""
    pytest.importorskip("moto.server", reason="moto[server] not installed (dev extra)")
    pytest.importorskip("s3fs", reason="s3fs not installed (dev extra)")
    from memory_store.testing.s3_server import moto_server

    with moto_server("folio-test") as s3:
        yield s3


@pytest.fixture
def s3_url(s3_server, request) -> str:
    """A fresh store URL in the moto bucket for this test."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"s3://{s3_server['bucket']}/{name}-{uuid.uuid4().hex[:8]}"
