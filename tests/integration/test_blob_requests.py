"""The worker's per-image GET and create-only PUT (worker/blob_requests.py) against Azurite, side by side with what
the SDK's own calls read and write: hostile names, the cap, empty and missing blobs, conditions, a refused key and
a SAS."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import (
    AccountSasPermissions,
    BlobServiceClient,
    ContainerClient,
    ResourceTypes,
    generate_account_sas,
)

from deploy.local.azurite import AZURITE_ACCOUNT, AZURITE_KEY
from worker.errors import ConfigurationError, PermanentError, RejectionCode
from worker.results import META_CODE, META_JOB, META_SOURCE_ETAG, META_STATUS
from worker.settings import load_settings
from worker.storage import BlobStore, ResultConflictError

pytestmark = pytest.mark.integration

# Names that need quoting in a URL path (the SDK keeps `~` and `/`), that are not ASCII, or look like a query.
NAMES = [
    "plain.jpg", "with space.jpg", "q?uery#hash.jpg", "percent%20literal.jpg", "percent%2Fslash.jpg",
    "plus+sign=eq;semi,comma.jpg", "caf\u00e9/\u65e5\u672c \U0001f600.jpg", "~tilde`back'quote\".jpg",
    "deep/a/b/c.jpg", "brackets[1](2){3}@$!*.jpg", "amp&lt<gt>.jpg", "a" * 200 + ".jpg",
]
METADATA = {META_STATUS: "rejected", META_SOURCE_ETAG: "0x8DC0123456789AB", META_JOB: "20261130T000000-abc",
            META_CODE: "truncated"}


def _store(tmp_path: Path, connection_string: str) -> BlobStore:
    return BlobStore.from_settings(load_settings(tmp_path, blob_connection_string=connection_string, queue="blobreq",
                                                 service="s"))


@pytest.fixture
def container(blob_service: BlobServiceClient) -> Iterator[ContainerClient]:
    client = blob_service.create_container(f"blobreq-{uuid.uuid4().hex[:12]}")
    yield client
    client.delete_container()


def test_downloads_and_result_writes_match_the_sdks_for_hostile_names(
    tmp_path: Path, azurite: Any, container: ContainerClient
) -> None:
    store = _store(tmp_path, azurite.connection_string)
    for number, name in enumerate(NAMES):
        data = os.urandom(3000 + number * 7919)
        container.upload_blob(name, data)
        sdk = container.get_blob_client(name).get_blob_properties()
        downloaded = store.download(container.container_name, name, max_bytes=10_000_000)
        assert downloaded.data == data, name
        assert (downloaded.etag, downloaded.size) == (sdk.etag.strip('"'), len(data)), name
        result = f"results/{name}.json"
        body = f'{{"blob": {number}}}'.encode()
        store.write_result(container.container_name, result, body, METADATA, replaces_etag=None)
        written = container.get_blob_client(result)
        properties = written.get_blob_properties()
        assert written.download_blob().readall() == body, result
        assert properties.content_settings.content_type == "application/json", result
        assert dict(properties.metadata) == METADATA, result
        assert properties.blob_type == "BlockBlob", result


def test_the_cap_an_empty_blob_and_a_missing_one(tmp_path: Path, azurite: Any, container: ContainerClient) -> None:
    store = _store(tmp_path, azurite.connection_string)
    name = container.container_name
    container.upload_blob("big.jpg", b"x" * 5000)
    assert store.download(name, "big.jpg", max_bytes=5000).size == 5000  # exactly the cap: accepted
    with pytest.raises(PermanentError) as over:
        store.download(name, "big.jpg", max_bytes=4999)
    assert over.value.code == RejectionCode.TOO_LARGE
    container.upload_blob("empty.jpg", b"")
    empty = store.download(name, "empty.jpg", max_bytes=100)
    assert (empty.data, empty.size) == (b"", 0)
    assert empty.etag == container.get_blob_client("empty.jpg").get_blob_properties().etag.strip('"')
    with pytest.raises(PermanentError) as missing:
        store.download(name, "never-there.jpg", max_bytes=100)
    assert missing.value.code == RejectionCode.SOURCE_MISSING


def test_a_result_is_created_once_and_replaced_only_over_the_version_read(
    tmp_path: Path, azurite: Any, container: ContainerClient
) -> None:
    store = _store(tmp_path, azurite.connection_string)
    name = container.container_name
    store.write_result(name, "r.json", b'{"v": 1}', METADATA, replaces_etag=None)
    with pytest.raises(ResultConflictError):
        store.write_result(name, "r.json", b'{"v": 2}', METADATA, replaces_etag=None)
    existing, etag = store.existing_result(name, "r.json")
    assert existing is not None
    assert (existing.status, existing.code, existing.source_etag) == ("rejected", "truncated", "0x8DC0123456789AB")
    assert etag is not None
    store.write_result(name, "r.json", b'{"v": 3}', METADATA, replaces_etag=etag)
    with pytest.raises(ResultConflictError):  # the version read is gone: never overwrite blindly
        store.write_result(name, "r.json", b'{"v": 4}', METADATA, replaces_etag=etag)
    assert container.get_blob_client("r.json").download_blob().readall() == b'{"v": 3}'


def test_a_refused_key_is_a_configuration_error(tmp_path: Path, azurite: Any, container: ContainerClient) -> None:
    container.upload_blob("a.jpg", b"abc")
    wrong = azurite.connection_string.replace(AZURITE_KEY, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=")
    store = _store(tmp_path, wrong)
    # Azurite answers 403 AuthorizationFailure, Azure 403 AuthenticationFailed: both name the setting to fix.
    with pytest.raises(ConfigurationError, match="refused"):
        store.download(container.container_name, "a.jpg", max_bytes=100)
    with pytest.raises(ConfigurationError, match="refused"):
        store.write_result(container.container_name, "a.json", b"{}", METADATA, replaces_etag=None)


def test_an_account_reached_with_a_sas_reads_and_writes(
    tmp_path: Path, azurite: Any, blob_service: BlobServiceClient, container: ContainerClient
) -> None:
    container.upload_blob("s p a c e.jpg", b"sas-bytes")
    sas = generate_account_sas(
        AZURITE_ACCOUNT, AZURITE_KEY, ResourceTypes(object=True, container=True),
        AccountSasPermissions(read=True, write=True, create=True, list=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    store = _store(tmp_path, f"BlobEndpoint={blob_service.url.rstrip('/')};SharedAccessSignature={sas}")
    assert store.download(container.container_name, "s p a c e.jpg", max_bytes=100).data == b"sas-bytes"
    store.write_result(container.container_name, "s p a c e.jpg.json", b"{}", METADATA, replaces_etag=None)
    assert dict(container.get_blob_client("s p a c e.jpg.json").get_blob_properties().metadata) == METADATA
