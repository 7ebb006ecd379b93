"""A real S3 API server for tests, scripts and benchmarks: moto's server mode on a loopback port.

    with moto_server("folio-test") as s3:   # s3 = {"endpoint_url", "bucket", "env"}
        TieredStore.open(f"s3://{s3['bucket']}/store", "w", ...)

The server runs in a thread of this process and answers other processes too (readers, killed
writers). The endpoint and dummy credentials go into os.environ (AWS_ENDPOINT_URL, ...) for the
block, where s3fs/botocore in this process and in children started inside it find them; the old
values come back after. Needs moto[server] and s3fs (the dev extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

__all__ = ["moto_server"]


@contextlib.contextmanager
def moto_server(bucket: str = "folio-test") -> Iterator[dict]:
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:  # a free loopback port (the server binds it right after)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # (one log line per request otherwise)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield {"endpoint_url": env["AWS_ENDPOINT_URL"], "bucket": bucket, "env": env}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
