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
    import os
    import socket

    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed (dev extra)")
    pytest.importorskip("s3fs", reason="s3fs not installed (dev extra)")
    import boto3

    with socket.socket() as s:  # a free loopback port (the server binds it right after)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (one log line per request otherwise)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="folio-test")
        yield {"endpoint_url": env["AWS_ENDPOINT_URL"], "bucket": "folio-test", "env": env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_url(s3_server, request) -> str:
    """A fresh store URL in the moto bucket for this test."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"s3://{s3_server['bucket']}/{name}-{uuid.uuid4().hex[:8]}"
