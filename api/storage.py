"""Object storage behind one interface: a local folder (served by the API itself) or S3 through
boto3 (any S3-compatible endpoint, presigned GET URLs).

Workers upload results to the API either way (PUT /api/v2/objects/KEY?expires=..&signature=..,
routes/status.py), which refuses a body over `max_upload_bytes` as it streams in. S3 could cap
an upload itself only with a presigned POST (`content-length-range`), a multipart form that
the AI Horde's workers, which PUT raw bytes to `r2_upload`, do not send; a presigned PUT cannot
bound its size at all. A result is a few MB at most, so relaying it costs little."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Protocol

from api.settings import Settings

_SAFE_KEY = re.compile(r"^[A-Za-z0-9._/-]+$")
# LocalStorage.older_keys looks at no more than this many entries per key it may return.
VISIT_FACTOR = 20


def check_key(key: str) -> str:
    if not _SAFE_KEY.fullmatch(key) or ".." in key or key.startswith("/"):
        raise ValueError(f"invalid object key: {key!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is no such object."""
        ...
    def copy(self, src: str, dst: str) -> None:
        """Store `src`'s bytes under `dst` too, replacing what was there."""
        ...
    def url(self, key: str) -> str: ...
    def older_keys(self, prefix: str, older_than: float, limit: int) -> list[str]:
        """Up to `limit` keys under `prefix` last written before `older_than` (epoch s)."""
        ...
    def upload_url(self, key: str, ttl: int) -> str:
        """A URL an HTTP worker can PUT the object's bytes to, valid for `ttl` seconds."""
        ...


def upload_signature(secret: str, key: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"PUT:{key}:{expires}".encode(), hashlib.sha256).hexdigest()


class SignedUploads:
    """The API's upload URLs for a storage: PUT /api/v2/objects/KEY, signed with `secret` for
    that key until `expires` (see the module's docstring)."""

    public_url: str
    secret: str

    def upload_url(self, key: str, ttl: int) -> str:
        expires = int(time.time()) + ttl
        sig = upload_signature(self.secret, check_key(key), expires)
        return f"{self.public_url}/api/v2/objects/{key}?expires={expires}&signature={sig}"

    def upload_allowed(self, key: str, expires: int, signature: str) -> bool:
        good = upload_signature(self.secret, check_key(key), expires)
        return expires >= time.time() and hmac.compare_digest(good, signature)


class LocalStorage(SignedUploads):
    """A folder. The API serves its objects (GET /api/v2/objects/KEY) and takes uploads to
    them on URLs signed with `secret` (PUT /api/v2/objects/KEY?expires=..&signature=..)."""

    def __init__(self, root: str | Path, public_url: str, secret: str = "rayhorde-default-salt"):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_url = public_url.rstrip("/")
        self.secret = secret

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _in_folder(self, target: Path, make):
        """`make()` (which creates a file in target's folder), the folder made first. A delete
        removing the folder as empty between the two (see delete) is met by making it again."""
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                return make()
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path(key)
        # Write then rename: a reader never sees half an image, even if this process dies.
        fd, tmp = self._in_folder(target, lambda: tempfile.mkstemp(dir=target.parent,
                                                                   prefix=".tmp-"))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        """Delete the object, then its folders up to the root that it leaves empty (one per
        request under images/, per job under uploads/): none are left for walks to step over."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:  # not empty (or already gone): its parents are not empty either
                break
            folder = folder.parent

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def copy(self, src: str, dst: str) -> None:
        source, target = self.path(src), self.path(dst)
        tmp = target.parent / f".tmp-{uuid.uuid4().hex}"

        def make() -> None:
            try:
                # A second name for the same file: instant, and a later put() to `src` (a new
                # file renamed over it) leaves this one's bytes alone.
                os.link(source, tmp)
            except FileNotFoundError:
                raise
            except OSError:
                if not source.is_file():
                    raise
                shutil.copyfile(source, tmp)

        if not source.is_file():
            raise FileNotFoundError(src)
        self._in_folder(target, make)
        os.replace(tmp, target)

    def url(self, key: str) -> str:
        return f"{self.public_url}/api/v2/objects/{check_key(key)}"

    def older_keys(self, prefix: str, older_than: float, limit: int) -> list[str]:
        """A bounded walk: it stops at `limit` keys found or `VISIT_FACTOR * limit` entries
        looked at, whichever comes first, so a pass never walks a whole large tree (what is
        not reached this pass is after the objects the sweep deletes, reached by a later one;
        delete leaves no empty folders to step over)."""
        base = self.path(prefix)
        found: list[str] = []
        budget = VISIT_FACTOR * limit
        folders = [base]
        while folders and len(found) < limit and budget > 0:
            try:
                entries = os.scandir(folders.pop())
            except (FileNotFoundError, NotADirectoryError):  # deleted meanwhile
                continue
            with entries:
                for entry in entries:
                    budget -= 1
                    if entry.name.startswith(".tmp-"):
                        pass
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append(Path(entry.path))
                    else:
                        try:
                            if entry.is_file(follow_symlinks=False) and \
                                    entry.stat().st_mtime < older_than:
                                found.append(Path(entry.path).relative_to(self.root).as_posix())
                        except FileNotFoundError:  # deleted meanwhile
                            pass
                    if len(found) >= limit or budget <= 0:
                        break
        return found

def _no_such_object(error) -> bool:
    """Whether a botocore ClientError says the object does not exist (HEAD answers a bare 404,
    GET and COPY NoSuchKey)."""
    return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Storage(SignedUploads):
    def __init__(self, bucket: str, endpoint_url: str | None, region: str, url_ttl: int,
                 public_url: str = "http://127.0.0.1:8000", secret: str = "rayhorde-default-salt"):
        import boto3

        self.bucket = bucket
        self.url_ttl = url_ttl
        self.public_url, self.secret = public_url.rstrip("/"), secret
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
        """The object's bytes; FileNotFoundError when there is none (as LocalStorage)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=check_key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(key) from None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=check_key(key))["ContentLength"]
        except ClientError as e:
            if _no_such_object(e):
                return None
            raise

    def copy(self, src: str, dst: str) -> None:  # server-side: the bytes never pass through here
        from botocore.exceptions import ClientError

        try:
            self.client.copy_object(Bucket=self.bucket, Key=check_key(dst),
                                    CopySource={"Bucket": self.bucket, "Key": check_key(src)})
        except ClientError as e:
            if _no_such_object(e):
                raise FileNotFoundError(src) from None
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def older_keys(self, prefix: str, older_than: float, limit: int) -> list[str]:
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=check_key(prefix) + "/", PaginationConfig={"PageSize": 1000})
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["LastModified"].timestamp() < older_than:
                    found.append(obj["Key"])
                    if len(found) >= limit:
                        return found
        return found

    def url(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)},
            ExpiresIn=self.url_ttl,
        )


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        return S3Storage(
            settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region, settings.s3_url_ttl,
            settings.public_url, settings.key_salt)
    return LocalStorage(settings.storage_dir, settings.public_url, settings.key_salt)
