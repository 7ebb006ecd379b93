"""A Folio store on object storage (S3 and other fsspec stores): opening by URL, the commit log.

Opening. `TieredStore.open("s3://bucket/path", ...)` (any fsspec URL) opens a zarr FsspecStore
(`open_url`); credentials and the endpoint come from the usual places of the filesystem (for
s3fs: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws), or pass
`open_url(url, storage_options={...})` to TieredStore.open for explicit options.

Commit records as new objects. A local store replaces commit.json by rename; an object store
has no rename, and overwriting one key gives a reader no older record to fall back on and two
writers no way to notice each other. So on every store that is not a local directory each
commit is a new object, `commits/g<generation>.json`, created only if absent (S3's
`If-None-Match: *` where the filesystem supports it), and a reader takes the newest: the
highest generation listed. Objects are immutable, so a listed record is whole; a writer killed
mid-put leaves no object, or a whole one. The writer keeps the last KEEP_COMMITS records (a
reader that listed one just pruned lists again). A store without any (written by an older
version) falls back to its commit.json.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from .errors import InvalidArgumentError, StoreLockedError

__all__ = ["is_url", "open_url", "is_object_store", "Objects", "read_newest_commit", "write_commit",
           "COMMITS_PREFIX", "KEEP_COMMITS", "commit_key"]

COMMITS_PREFIX = "commits"
KEEP_COMMITS = 4  # records kept behind the newest: readers that listed an older one still find it
_COMMIT_NAME = re.compile(r"^g(\d+)\.json$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(where: object) -> bool:
    """True for an fsspec URL other than file:// (a local path opens as a LocalStore)."""
    return isinstance(where, str) and bool(_URL.match(where)) and not where.startswith("file://")


def open_url(url: str, *, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> FsspecStore:
    """A zarr FsspecStore for `url` (s3://bucket/path, ...), with the filesystem's `storage_options`
    (for s3fs: {"endpoint_url", "key", "secret", ...}). The filesystem must be async-capable (s3fs,
    gcsfs, adlfs, memory). InvalidArgumentError for a bad URL or options."""
    if not is_url(url):
        raise InvalidArgumentError(f"store URL {url!r}: expected <protocol>://<path>, e.g. s3://bucket/store")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidArgumentError(f"storage_options={storage_options!r}: expected a dict of the filesystem's "
                                   f"options (for s3: endpoint_url, key, secret, ...)")
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith(("s3://", "s3a://")) and endpoint and "endpoint_url" not in options:
        options["endpoint_url"] = endpoint  # (the AWS CLI's variable; older s3fs/botocore ignore it)
    try:
        return FsspecStore.from_url(url, storage_options=options or None, read_only=read_only)
    except (ImportError, ValueError, TypeError) as e:
        raise InvalidArgumentError(f"store URL {url!r} cannot be opened ({e}); for s3:// install s3fs "
                                   f"(pip install s3fs)") from e


def is_object_store(store: Store) -> bool:
    """True for the stores that get a writer lease (fsspec stores: visible to other processes)."""
    return isinstance(store, FsspecStore)


def commit_key(generation: int) -> str:
    return f"{COMMITS_PREFIX}/g{generation:012d}.json"


class Objects:
    """Whole-object get / create-if-absent / replace-if-unchanged / delete on a zarr store, with S3's
    conditional writes where the filesystem is s3fs (ETags), else plain puts (`conditional` False: a
    store one process sees, or a filesystem without them; see lease.py for what that costs)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._proto = default_buffer_prototype()
        fs = getattr(store, "fs", None)
        self._s3 = fs if fs is not None and type(fs).__name__ == "S3FileSystem" else None

    @property
    def conditional(self) -> bool:
        return self._s3 is not None

    def _bucket_key(self, key: str) -> tuple[str, str]:
        bucket, path, _ = self._s3.split_path(f"{self.store.path}/{key}")
        return bucket, path

    def get(self, key: str) -> tuple[bytes, str | None] | None:
        """(bytes, etag) or None when absent."""
        if self._s3 is None:
            buf = sync(self.store.get(key, prototype=self._proto))
            return None if buf is None else (buf.to_bytes(), None)
        bucket, path = self._bucket_key(key)

        async def go():
            try:
                r = await self._s3._call_s3("get_object", Bucket=bucket, Key=path)
            except FileNotFoundError:
                return None
            body = await r["Body"].read()
            r["Body"].close()
            return body, r.get("ETag")

        return sync(go())

    def create(self, key: str, data: bytes) -> bool:
        """Put `data` unless `key` exists; False when it does (another writer was first)."""
        if self._s3 is None:
            if sync(self.store.exists(key)):
                return False
            sync(self.store.set(key, self._proto.buffer.from_bytes(data)))
            return True
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str | None) -> bool:
        """Put `data` over the version whose ETag is `etag`; False when it changed since."""
        if self._s3 is None:
            sync(self.store.set(key, self._proto.buffer.from_bytes(data)))
            return True
        return self._put(key, data, IfMatch=etag) if etag else self.create(key, data)

    def _put(self, key: str, data: bytes, **cond: str) -> bool:
        bucket, path = self._bucket_key(key)

        async def go() -> bool:
            try:
                await self._s3._call_s3("put_object", Bucket=bucket, Key=path, Body=data, **cond)
            except OSError as e:
                # s3fs maps 412 PreconditionFailed (and 409 ConditionalRequestConflict) to OSError
                text = f"{e} {getattr(e, '__cause__', '')}"
                if "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text:
                    return False
                raise
            return True

        try:
            return sync(go())
        finally:
            self._s3.invalidate_cache(f"{bucket}/{path}")

    def delete(self, key: str) -> None:
        sync(self.store.delete(key))


async def _list_commits(store: Store) -> list[int]:
    gens = []
    async for key in store.list_prefix(f"{COMMITS_PREFIX}/"):
        m = _COMMIT_NAME.match(key.rsplit("/", 1)[-1])
        if m:
            gens.append(int(m.group(1)))
    return sorted(gens)


def _invalidate(store: Store) -> None:
    fs = getattr(store, "fs", None)
    if fs is not None and hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()  # (s3fs caches listings: a reader must see the newest record)


def read_newest_commit(store: Store, legacy_key: str) -> bytes | None:
    """The newest commit record's bytes (highest generation under commits/), else `legacy_key`'s,
    else None."""
    proto = default_buffer_prototype()
    for _ in range(5):  # a record pruned between the listing and the get: list again
        _invalidate(store)
        gens = sync(_list_commits(store))
        if not gens:
            break
        buf = sync(store.get(commit_key(gens[-1]), prototype=proto))
        if buf is not None:
            return buf.to_bytes()
    buf = sync(store.get(legacy_key, prototype=proto))
    return None if buf is None else buf.to_bytes()


def write_commit(store: Store, generation: int, raw: bytes, where: str) -> None:
    """Publish a commit record as a new object, then prune the records KEEP_COMMITS behind it.
    StoreLockedError when that generation exists already with other content: another writer
    committed it (this one lost its lease), and nothing is overwritten."""
    objects = Objects(store)
    if not objects.create(commit_key(generation), raw):
        there = objects.get(commit_key(generation))
        if there is not None and there[0] == raw:
            return  # the same record again (a retried put that had landed): already published
        raise StoreLockedError(f"store {where}: commit generation {generation} was already written by another "
                               f"writer; this writer no longer holds the store (its lease expired and was taken "
                               f"over); nothing was committed: reopen the store", path=where, holder={})
    try:
        old = [g for g in sync(_list_commits(store)) if g < generation - KEEP_COMMITS]

        async def prune() -> None:
            await asyncio.gather(*(store.delete(commit_key(g)) for g in old))

        sync(prune())
    except OSError:
        pass  # the commit stands; the records left are pruned by a later commit
