"""Blob Storage adapter: capped downloads, create-only result writes, listings; SDK errors become ours.

The List Blobs request and the reading of its XML answer are worker/blob_listing.py's; the per-image GET and PUT
are worker/blob_requests.py's (the SDK's pipeline without its per-call client).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.core.pipeline.transport._bigger_block_size_http_adapters import BiggerBlockSizeHTTPAdapter
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings, ExponentialRetry
from urllib3.util.retry import Retry

from worker import metrics
from worker.blob_listing import ListedBlob, ListingPage, listing_page, listing_pages, metadata_entries, next_marker
from worker.blob_requests import fetch_start, put_block_blob
from worker.contracts import normalize_etag
from worker.errors import BlobscoreError, ConfigurationError, PermanentError, RejectionCode, TransientError
from worker.results import ExistingResult, existing_from_metadata
from worker.settings import Settings

# Statuses worth retrying: timeouts, throttling and server-side failures.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
JSON_CONTENT_TYPE = "application/json"
LISTING_PAGE_SIZE = 5000  # the most Blob Storage returns in one List Blobs call
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 20  # between two reads of one response, not for the whole body
DOWNLOAD_BLOCK_BYTES = 256 * 1024
# A command's first request to the account (container_exists): an answer takes milliseconds, so wait little.
CHECK_CONNECT_TIMEOUT_S = 5
CHECK_READ_TIMEOUT_S = 5
# Container clients kept for the per-image calls (a few per deployment in practice).
MAX_CONTAINER_CLIENTS = 256


def _session(pool_size: int, use_env_proxies: bool) -> requests.Session:
    """One HTTP session for the process, its pool as large as the threads sharing it.

    Without trust_env, requests skips looking for ~/.netrc and proxy variables on every call: a measurable
    share of a worker's CPU per image. The SDK's own transport retries nothing (its policies do).
    """
    session = requests.Session()
    session.trust_env = use_env_proxies
    no_retries = Retry(total=False, redirect=False, raise_on_status=False)
    adapter = BiggerBlockSizeHTTPAdapter(max_retries=no_retries, pool_connections=4, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _client_options(settings: Settings) -> dict[str, Any]:
    # The SDK's default retry waits 15 s, then 18 s, then 42 s inside one call; our task-level policy retries
    # with backoff and jitter already, so the SDK only smooths over a blip, quickly: one retry, so that a command
    # facing an endpoint that does not answer says so within ~40 s (it took 1 min 40 s with three tries of 30 s).
    session = _session(max(10, settings.worker_concurrency), settings.blob_use_env_proxies)
    return {
        "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=1),
        # Responses are read in blocks of this size: azure-core's 4 KB default made a 6 MB photo's download cost
        # 27 ms of CPU against 11 ms at 256 KB (bench/README.md, the photo corpus profile).
        "transport": RequestsTransport(
            session=session, session_owner=True, connection_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
            connection_data_block_size=DOWNLOAD_BLOCK_BYTES,
        ),
    }


class BlobNotFoundError(BlobscoreError):
    """The blob (or its container) does not exist."""


class ResultConflictError(TransientError):
    """Someone else wrote the result blob between our read and our write."""


@dataclass(frozen=True)
class Downloaded:
    """The bytes of one source blob version."""

    data: bytes
    etag: str
    size: int


def is_transient_status(status: int | None) -> bool:
    """True for HTTP statuses that a later retry may not see again."""
    return status is not None and status in TRANSIENT_HTTP_STATUSES


def _status_of(exc: BlobscoreError) -> int | None:
    cause = exc.__cause__
    return cause.status_code if isinstance(cause, HttpResponseError) else None


@metrics.counts_blob_errors
@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except ResourceNotFoundError as exc:
        raise BlobNotFoundError(f"{what}: not found") from exc
    except ClientAuthenticationError as exc:
        raise ConfigurationError(f"{what}: Blob Storage refused our credentials") from exc
    except (ServiceRequestError, ServiceResponseError) as exc:
        raise TransientError(f"{what}: Blob Storage unreachable ({type(exc).__name__})") from exc
    except HttpResponseError as exc:
        if exc.status_code == 403:  # a key, SAS, role or firewall that does not let us in: never the image's fault
            code = getattr(exc, "error_code", None) or "no error code"
            raise ConfigurationError(f"{what}: Blob Storage refused access (403 {code}): check the account's key, "
                                     "SAS, role assignment or firewall") from exc
        if is_transient_status(exc.status_code):
            raise TransientError(f"{what}: Blob Storage answered {exc.status_code}") from exc
        raise BlobscoreError(f"{what}: Blob Storage answered {exc.status_code}: {exc.reason}") from exc
    except AzureError as exc:
        raise TransientError(f"{what}: {type(exc).__name__}") from exc


class BlobStore:
    """The few Blob Storage operations blobscore needs, over one shared BlobServiceClient."""

    def __init__(self, service: BlobServiceClient) -> None:
        self._service = service
        # One client per container, shared by the threads: the per-image calls build no client of their own.
        self._containers: dict[str, ContainerClient] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> BlobStore:
        """A store for the configured account: connection string, or account URL + azure-identity credential."""
        if settings.blob_connection_string is not None:
            secret = settings.blob_connection_string.get_secret_value()
            return cls(BlobServiceClient.from_connection_string(secret, **_client_options(settings)))
        if settings.blob_account_url:
            from azure.identity import DefaultAzureCredential

            return cls(BlobServiceClient(
                settings.blob_account_url, credential=DefaultAzureCredential(), **_client_options(settings)
            ))
        raise ConfigurationError("set BLOBSCORE_BLOB_CONNECTION_STRING or BLOBSCORE_BLOB_ACCOUNT_URL")

    def close(self) -> None:
        """Release the HTTP session."""
        self._service.close()

    def _container(self, container: str) -> ContainerClient:
        client = self._containers.get(container)
        if client is None:
            if len(self._containers) >= MAX_CONTAINER_CLIENTS:  # a worker serving very many containers: start over
                self._containers.clear()
            client = self._containers.setdefault(container, self._service.get_container_client(container))
        return client

    def download(self, container: str, blob: str, max_bytes: int) -> Downloaded:
        """The blob's current bytes; one byte past the cap is fetched so an oversized blob is known without HEAD."""
        try:
            with _translated(f"download {container}/{blob}"):
                fetched = fetch_start(self._container(container), blob, max_bytes + 1)
        except BlobNotFoundError as exc:
            raise PermanentError(RejectionCode.SOURCE_MISSING, "the source blob no longer exists") from exc
        except BlobscoreError as exc:
            if _status_of(exc) == 416:  # Range not satisfiable: the blob is empty.
                return Downloaded(b"", self._etag(container, blob), 0)
            raise
        if len(fetched.data) > max_bytes:
            raise PermanentError(RejectionCode.TOO_LARGE, f"over the {max_bytes}-byte cap")
        return Downloaded(fetched.data, normalize_etag(fetched.etag), fetched.size)

    def source_etag(self, container: str, blob: str) -> str | None:
        """The source blob's current etag, or None when it is gone."""
        try:
            return self._etag(container, blob)
        except BlobNotFoundError:
            return None

    def _etag(self, container: str, blob: str) -> str:
        with _translated(f"properties of {container}/{blob}"):
            return normalize_etag(self._service.get_blob_client(container, blob).get_blob_properties().etag)

    def existing_result(self, container: str, name: str) -> tuple[ExistingResult | None, str | None]:
        """The stored result's metadata and the result blob's own etag, or (None, None) when there is none."""
        client = self._service.get_blob_client(container, name)
        try:
            with _translated(f"result {container}/{name}"):
                properties = client.get_blob_properties()
        except BlobNotFoundError:
            return None, None
        return existing_from_metadata(dict(properties.metadata or {})), str(properties.etag)

    def write_result(
        self, container: str, name: str, body: bytes, metadata: dict[str, str], replaces_etag: str | None
    ) -> None:
        """Create the result only if absent, or replace exactly the version we read; never overwrite blindly."""
        try:
            with _translated(f"write result {container}/{name}"):
                put_block_blob(self._container(container), name, body, JSON_CONTENT_TYPE, metadata, replaces_etag)
        except BlobscoreError as exc:
            if isinstance(exc.__cause__, ResourceExistsError | ResourceModifiedError):
                raise ResultConflictError(f"{container}/{name} was written by someone else") from exc
            raise

    def read(self, container: str, name: str) -> bytes:
        """A whole (small) blob, e.g. a result document."""
        with _translated(f"read {container}/{name}"):
            return self._service.get_blob_client(container, name).download_blob(max_concurrency=1).readall()

    def list_blobs(self, container: str, prefix: str | None) -> Iterator[ListedBlob]:
        """Every blob under `prefix`, with the properties a task needs."""
        for page in self.list_pages(container, prefix, None, LISTING_PAGE_SIZE):
            yield from page.blobs

    def list_pages(
        self, container: str, prefix: str | None, continuation: str | None, page_size: int
    ) -> Iterator[ListingPage]:
        """The listing page by page from `continuation`, each with the token that resumes after it."""
        client = self._service.get_container_client(container)
        with _translated(f"list {container}/{prefix or ''}"):
            for root in listing_pages(client, prefix or None, continuation or None, page_size, None):
                yield listing_page(root)

    def metadata_page(
        self, container: str, prefix: str, continuation: str | None, page_size: int = LISTING_PAGE_SIZE
    ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
        """One page of (name, metadata) under `prefix` from `continuation`, and the token after it (None: the end)."""
        client = self._service.get_container_client(container)
        with _translated(f"list {container}/{prefix}"):
            root = next(listing_pages(client, prefix or None, continuation or None, page_size, "metadata"))
            return list(metadata_entries(root)), next_marker(root)

    def list_metadata(self, container: str, prefix: str) -> Iterator[tuple[str, dict[str, str]]]:
        """(name, metadata) of every blob under `prefix`, in one listing rather than one request per blob."""
        client = self._service.get_container_client(container)
        with _translated(f"list {container}/{prefix}"):
            for root in listing_pages(client, prefix or None, None, LISTING_PAGE_SIZE, "metadata"):
                yield from metadata_entries(root)

    def upload(self, container: str, name: str, data: bytes, content_type: str | None = None) -> str:
        """Write a blob (overwriting), returning its new etag: for samples and tests, not for results."""
        settings = ContentSettings(content_type=content_type) if content_type else None
        with _translated(f"upload {container}/{name}"):
            reply = self._service.get_blob_client(container, name).upload_blob(
                data, overwrite=True, content_settings=settings
            )
            return normalize_etag(reply["etag"])

    def container_exists(self, container: str) -> bool:
        """Whether the container exists: one request, quick to give up — a command's first look at the account, so
        a wrong or unreachable endpoint is named within seconds, not after the workers' patient timeouts."""
        where = urlsplit(self._service.url).netloc  # the host only: a SAS query never reaches a message
        with _translated(f"look for container {container} at {where}"):
            return bool(self._service.get_container_client(container).exists(
                connection_timeout=CHECK_CONNECT_TIMEOUT_S, read_timeout=CHECK_READ_TIMEOUT_S, retry_total=0,
            ))

    def ensure_container(self, container: str) -> None:
        """Create the container if it does not exist."""
        try:
            with _translated(f"create container {container}"):
                self._service.create_container(container)
        except BlobscoreError as exc:
            if not isinstance(exc.__cause__, ResourceExistsError):
                raise
