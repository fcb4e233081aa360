"""Object storage behind one interface: a local folder (served by the API itself) or S3 through
boto3 (any S3-compatible endpoint, presigned GET URLs)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from api.settings import Settings

_SAFE_KEY = re.compile(r"^[A-Za-z0-9._/-]+$")


def check_key(key: str) -> str:
    if not _SAFE_KEY.fullmatch(key) or ".." in key or key.startswith("/"):
        raise ValueError(f"invalid object key: {key!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def url(self, key: str) -> str: ...


class LocalStorage:
    def __init__(self, root: str | Path, public_url: str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_url = public_url.rstrip("/")

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half an image, even if this process dies.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def url(self, key: str) -> str:
        return f"{self.public_url}/api/v2/objects/{check_key(key)}"


class S3Storage:
    def __init__(self, bucket: str, endpoint_url: str | None, region: str, url_ttl: int):
        import boto3

        self.bucket = bucket
        self.url_ttl = url_ttl
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def ensure_bucket(self) -> None:
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type
        )

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"].read()

    def url(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)},
            ExpiresIn=self.url_ttl,
        )


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        return S3Storage(
            settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region, settings.s3_url_ttl
        )
    return LocalStorage(settings.storage_dir, settings.public_url)
