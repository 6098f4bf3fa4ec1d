"""The S3 side of the binary cache (boto3): uploads, presigned URLs, reads, deletes.

Keys are relative to the ``store_uri`` prefix and use the layout of a Nix
binary cache (``<hash>.narinfo``, ``nar/<filehash>.nar.zst``,
``nix-cache-info``), so the bucket is itself a valid cache for clients that
speak S3.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from circus.common.config import CacheUploadSettings

#: what callers catch: every failure boto3 reports for a request
S3Error: tuple[type[Exception], ...] = (BotoCoreError, ClientError)


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, store_uri: str) -> Location:
        if not store_uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {store_uri!r}")
        bucket, _, prefix = store_uri[5:].partition("/")
        # query parameters of Nix's s3:// URIs (region, endpoint) live in [cache_upload.s3]
        bucket = bucket.partition("?")[0]
        prefix = prefix.partition("?")[0].strip("/")
        if not bucket:
            raise ValueError(f"no bucket in {store_uri!r}")
        return cls(bucket, prefix)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative


_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def _client(settings: CacheUploadSettings) -> Any:
    s3 = settings.s3
    identity = (s3.region, s3.endpoint_url, s3.access_key_id, s3.secret_access_key,
                s3.use_path_style, settings.retries, settings.upload_concurrency)
    with _clients_lock:
        client = _clients.get(identity)
        if client is None:
            config = Config(
                region_name=s3.region,
                signature_version="s3v4",
                s3={"addressing_style": "path" if s3.use_path_style else "auto"},
                retries={"total_max_attempts": settings.retries + 1, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=max(10, settings.upload_concurrency * 2),
            )
            # boto3's default session is not thread-safe; a private one per client is
            client = boto3.session.Session().client(
                "s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key_id,
                aws_secret_access_key=s3.secret_access_key, config=config)
            _clients[identity] = client
        return client


class S3Store:
    def __init__(self, settings: CacheUploadSettings) -> None:
        if not settings.store_uri:
            raise ValueError("cache_upload.store_uri is not set")
        self.location = Location.parse(settings.store_uri)
        self.client = _client(settings)
        self.concurrency = settings.upload_concurrency

    def key(self, relative: str) -> str:
        return self.location.key(relative)

    def upload_file(self, path: Path, relative: str, content_type: str) -> None:
        from boto3.s3.transfer import TransferConfig

        self.client.upload_file(
            str(path), self.location.bucket, self.key(relative),
            ExtraArgs={"ContentType": content_type},
            Config=TransferConfig(max_concurrency=self.concurrency))

    def put_bytes(self, relative: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.location.bucket, Key=self.key(relative), Body=data,
                               ContentType=content_type)

    def exists(self, relative: str) -> bool:
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=self.key(relative))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def open(self, relative: str) -> Any:
        """The object's body: a stream with ``read(n)``; close it when done."""
        return self.client.get_object(Bucket=self.location.bucket,
                                      Key=self.key(relative))["Body"]

    def copy(self, source: str, destination: str) -> None:
        self.client.copy_object(
            Bucket=self.location.bucket, Key=self.key(destination),
            CopySource={"Bucket": self.location.bucket, "Key": self.key(source)})

    def delete(self, relatives: Iterable[str]) -> None:
        keys = [self.key(r) for r in relatives]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.location.bucket,
                                       Delete={"Objects": batch, "Quiet": True})

    def presigned_get(self, relative: str, expires: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.location.bucket, "Key": self.key(relative)},
            ExpiresIn=expires)
        return url

    def presigned_put(self, relative: str, expires: int) -> str:
        url: str = self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.location.bucket, "Key": self.key(relative)},
            ExpiresIn=expires)
        return url
