"""Content-addressed object storage over any S3-compatible endpoint.

Keys are ``{namespace}/{sha256[:2]}/{sha256}{suffix}``, so writing the same bytes
twice is a no-op and a key names its content. Transient failures are retried
with backoff by botocore; an unreachable endpoint or rejected credentials
surface as a one-line :class:`StorageError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from components.errors import StorageError

_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def content_key(data: bytes, namespace: str, suffix: str = "") -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"{namespace}/{digest[:2]}/{digest}{suffix}"


class ObjectStore:
    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        max_attempts: int = 5,
        connect_timeout_s: float = 5.0,
    ):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout_s,
                read_timeout=60,
                s3={"addressing_style": "path"},
                signature_version="s3v4",
            ),
        )

    def _fail(self, action: str, exc: Exception) -> StorageError:
        where = self.endpoint_url or "AWS S3"
        if isinstance(exc, EndpointConnectionError):
            return StorageError(f"S3 endpoint {where} is unreachable while trying to {action} (is `aligndiff up` running?)")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _AUTH_CODES:
                return StorageError(
                    f"S3 endpoint {where} rejected our credentials while trying to {action} ({code}); "
                    "check ALIGNDIFF_S3_ACCESS_KEY_ID / ALIGNDIFF_S3_SECRET_ACCESS_KEY"
                )
            if code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist at {where} (run `aligndiff up` or create it)")
            return StorageError(f"S3 error while trying to {action} at {where}: {code} {exc}")
        return StorageError(f"S3 error while trying to {action} at {where}: {exc}")

    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _MISSING_CODES | {"NoSuchBucket"}:
                raise self._fail(f"check bucket {self.bucket}", exc) from None
        except BotoCoreError as exc:
            raise self._fail(f"check bucket {self.bucket}", exc) from None
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise self._fail(f"create bucket {self.bucket}", exc) from None
        except BotoCoreError as exc:
            raise self._fail(f"create bucket {self.bucket}", exc) from None

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return False
            raise self._fail(f"check {key}", exc) from None
        except BotoCoreError as exc:
            raise self._fail(f"check {key}", exc) from None

    def put_bytes(self, data: bytes, namespace: str, suffix: str = "", content_type: str | None = None) -> str:
        """Store bytes under their content hash; return the key. Skips the upload if present."""
        key = content_key(data, namespace, suffix)
        if self.exists(key):
            return key
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(f"put {key}", exc) from None
        return key

    def put_named(self, key: str, data: bytes) -> None:
        """Store bytes under a chosen key (progress records; content goes through put_bytes)."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(f"put {key}", exc) from None

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's batch limit
            try:
                self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise self._fail(f"delete {len(keys)} objects", exc) from None

    def put_file(self, path: str | Path, namespace: str, content_type: str | None = None) -> str:
        path = Path(path)
        return self.put_bytes(path.read_bytes(), namespace, path.suffix, content_type)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                raise StorageError(f"object {key!r} not found in bucket {self.bucket!r}") from None
            raise self._fail(f"get {key}", exc) from None
        except BotoCoreError as exc:
            raise self._fail(f"get {key}", exc) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(f"list {prefix or '/'}", exc) from None

    def presigned_get_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A URL anyone can GET until it expires (SigV4 caps expiry at 7 days)."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )
