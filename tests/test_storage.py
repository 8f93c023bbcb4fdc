"""Object storage against the real embedded S3 server."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

import pytest

from components.errors import StorageError
from components.storage import ObjectStore
from tests.conftest import free_ports


def test_put_get_exists_list_is_content_addressed(stack_project):
    store = stack_project.object_store()
    data = b"\x89PNG fake image bytes " + bytes(range(256))
    key = store.put_bytes(data, "images", ".png", content_type="image/png")
    assert key == f"images/{hashlib.sha256(data).hexdigest()[:2]}/{hashlib.sha256(data).hexdigest()}.png"
    assert store.exists(key)
    assert store.get_bytes(key) == data
    assert store.put_bytes(data, "images", ".png") == key  # same bytes, same key, no second object
    assert list(store.list("images/")).count(key) == 1
    assert not store.exists("images/00/missing.png")
    with pytest.raises(StorageError, match="not found"):
        store.get_bytes("images/00/missing.png")


def test_presigned_url_is_fetchable_over_http_and_anonymous_access_is_refused(stack_project):
    store = stack_project.object_store()
    data = b"presigned payload"
    key = store.put_bytes(data, "test")
    with urllib.request.urlopen(store.presigned_get_url(key, expires_s=600), timeout=10) as resp:
        assert resp.read() == data

    anonymous = f"{stack_project.s3_endpoint}/{store.bucket}/{key}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=10)
    assert 400 <= refused.value.code < 500

    tampered = store.presigned_get_url(key, expires_s=600).replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError) as forged:
        urllib.request.urlopen(tampered, timeout=10)
    assert forged.value.code == 403


def test_wrong_credentials_give_a_clear_error(stack_project):
    store = ObjectStore(bucket=stack_project.params.services.s3.bucket, endpoint_url=stack_project.s3_endpoint,
                        access_key="WRONGKEY", secret_key="wrong-secret", max_attempts=1)
    with pytest.raises(StorageError, match="rejected our credentials"):
        store.put_bytes(b"x", "test")


def test_unreachable_endpoint_gives_a_clear_error():
    (port,) = free_ports(1)
    store = ObjectStore(bucket="aligndiff", endpoint_url=f"http://127.0.0.1:{port}",
                        access_key="k", secret_key="s", max_attempts=2, connect_timeout_s=1)
    with pytest.raises(StorageError, match=r"unreachable .*aligndiff up"):
        store.get_bytes("anything")


def test_buckets_were_created_by_up(stack_project):
    s3 = stack_project.params.services.s3
    for bucket in (s3.bucket, s3.dvc_bucket):
        stack_project.object_store(bucket).ensure_bucket()  # exists: no error, no-op
        assert (stack_project.state_dir / "s3" / bucket).is_dir()
