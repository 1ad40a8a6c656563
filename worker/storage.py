"""Blob Storage adapter: capped downloads, create-only result writes, listings; SDK errors become ours."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, unquote
from xml.etree.ElementTree import Element, ParseError, fromstring

import requests
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ResourceNotModifiedError,
    ServiceRequestError,
    ServiceResponseError,
    map_error,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.core.pipeline.transport._bigger_block_size_http_adapters import BiggerBlockSizeHTTPAdapter
from azure.core.rest import HttpRequest, HttpResponse
from azure.storage.blob import BlobServiceClient, ContainerClient, ContentSettings, ExponentialRetry
from azure.storage.blob._shared.response_handlers import process_storage_error
from urllib3.util.retry import Retry

from worker import metrics
from worker.contracts import normalize_etag
from worker.errors import BlobscoreError, ConfigurationError, PermanentError, RejectionCode, TransientError
from worker.results import ExistingResult, existing_from_metadata
from worker.settings import Settings

# Statuses worth retrying: timeouts, throttling and server-side failures.
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
JSON_CONTENT = ContentSettings(content_type="application/json")
LISTING_PAGE_SIZE = 5000  # the most Blob Storage returns in one List Blobs call
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 30
DOWNLOAD_BLOCK_BYTES = 256 * 1024
# What the SDK's generated List Blobs operation maps these statuses to before its own error refinement.
LISTING_ERROR_MAP: dict[int, type[HttpResponseError]] = {
    401: ClientAuthenticationError,
    404: ResourceNotFoundError,
    409: ResourceExistsError,
    304: ResourceNotModifiedError,
}
ENCODED_TRUE = frozenset({"true", "1"})  # how the service (and the SDK's bool reader) spell Encoded="true"


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
    # with backoff and jitter already, so the SDK only smooths over a blip, quickly.
    session = _session(max(10, settings.worker_concurrency), settings.blob_use_env_proxies)
    return {
        "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=2),
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


@dataclass(frozen=True)
class ListingPage:
    """One page of a listing and the token that continues after it (None after the last page)."""

    blobs: list[ListedBlob]
    continuation: str | None


@dataclass(frozen=True)
class ListedBlob:
    """One entry of a container listing."""

    name: str
    etag: str
    size: int
    content_type: str | None


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
        if is_transient_status(exc.status_code):
            raise TransientError(f"{what}: Blob Storage answered {exc.status_code}") from exc
        raise BlobscoreError(f"{what}: Blob Storage answered {exc.status_code}: {exc.reason}") from exc
    except AzureError as exc:
        raise TransientError(f"{what}: {type(exc).__name__}") from exc


# ---------------------------------------------------------------------------------------------------------------
# List Blobs: the SDK sends the request (signing, retries, its whole pipeline); we read the XML it returns. The
# SDK's generic deserializer builds a model object per XML element, which was most of the producer's CPU.


def _listing_request(
    client: ContainerClient, prefix: str | None, marker: str | None, page_size: int | None, include: str | None
) -> HttpRequest:
    """A List Blobs (flat) request for one page, spelled as the SDK's generated operation spells it."""
    params = {"restype": "container", "comp": "list"}
    # The SDK quotes every query value itself (azure-core appends params as given) and signs the result.
    for name, value in (("prefix", prefix), ("marker", marker), ("include", include)):
        if value:
            params[name] = quote(value, safe="")
    if page_size is not None:
        params["maxresults"] = str(page_size)
    headers = {"x-ms-version": client.api_version, "Accept": "application/xml"}
    return HttpRequest("GET", client.url, params=params, headers=headers)


def _raise_listing_error(response: HttpResponse) -> NoReturn:
    """Raise what the SDK's own listing raises for this answer: ResourceNotFoundError for a missing container, …"""
    try:
        map_error(status_code=response.status_code, response=response, error_map=LISTING_ERROR_MAP)
        raise HttpResponseError(response=response)
    except HttpResponseError as error:
        # The SDK's refinement by x-ms-error-code (e.g. 403 AuthenticationFailed -> ClientAuthenticationError).
        process_storage_error(error)


def _listing_xml(client: ContainerClient, request: HttpRequest) -> Element:
    """Send one listing request through the client's pipeline and return the answer's XML root."""
    # ContainerClient._pipeline is the pipeline the SDK's own operations run through: its policies sign the request,
    # retry it, set its headers and log it. Not streamed: the transport reads the body inside the pipeline, so the
    # retries cover a broken read, and its ContentDecodePolicy has parsed the XML already (reused, not parsed twice).
    answer = client._pipeline.run(request, stream=False)
    response = answer.http_response
    if response.status_code != 200:
        _raise_listing_error(response)
    root = answer.context.get("deserialized_data")
    if not isinstance(root, Element):  # the body came without an XML content type
        try:
            # The body comes from our own storage account over the authenticated channel.
            root = fromstring(response.read())  # noqa: S314
        except ParseError as exc:
            raise DecodeError("List Blobs answered something that is not XML", response=response) from exc
    if root.tag != "EnumerationResults":
        raise DecodeError(f"List Blobs answered <{root.tag}>, not <EnumerationResults>", response=response)
    return root


def _listing_pages(
    client: ContainerClient, prefix: str | None, marker: str | None, page_size: int | None, include: str | None
) -> Iterator[Element]:
    """The XML root of every page of a flat listing, from `marker` on."""
    while True:
        root = _listing_xml(client, _listing_request(client, prefix, marker, page_size, include))
        yield root
        marker = _next_marker(root)
        if marker is None:
            return


def _next_marker(root: Element) -> str | None:
    """The token that continues after this page, None after the last one."""
    return root.findtext("NextMarker") or None


def _blob_elements(root: Element) -> list[Element]:
    """The page's <Blob> entries (a flat listing has no <BlobPrefix>; any would be skipped)."""
    blobs = root.find("Blobs")
    return [] if blobs is None else blobs.findall("Blob")


def _blob_name(blob: Element) -> str:
    """The blob's name; names XML cannot carry come percent-encoded, marked Encoded="true" (the SDK unquotes)."""
    name = blob.find("Name")
    if name is None:
        raise DecodeError("a listed <Blob> has no <Name>")
    text = name.text or ""
    return unquote(text) if name.get("Encoded", "").lower() in ENCODED_TRUE else text


def _listed_blob(blob: Element) -> ListedBlob:
    """One <Blob> entry as a ListedBlob, with the SDK's readings: an empty Content-Type is None."""
    properties = blob.find("Properties")
    if properties is None:
        properties = Element("Properties")
    return ListedBlob(
        _blob_name(blob),
        normalize_etag(properties.findtext("Etag") or ""),
        int(properties.findtext("Content-Length") or 0),
        properties.findtext("Content-Type") or None,
    )


def _listing_page(root: Element) -> ListingPage:
    """One listing page from its XML."""
    return ListingPage([_listed_blob(blob) for blob in _blob_elements(root)], _next_marker(root))


def _blob_metadata(blob: Element) -> dict[str, str]:
    """The <Metadata> of one <Blob> entry (absent or empty: {}); an empty value is ''."""
    metadata = blob.find("Metadata")
    return {} if metadata is None else {entry.tag: entry.text or "" for entry in metadata}


def _metadata_entries(root: Element) -> list[tuple[str, dict[str, str]]]:
    """(name, metadata) of every blob of one page listed with include=metadata."""
    return [(_blob_name(blob), _blob_metadata(blob)) for blob in _blob_elements(root)]


class BlobStore:
    """The few Blob Storage operations blobscore needs, over one shared BlobServiceClient."""

    def __init__(self, service: BlobServiceClient) -> None:
        self._service = service

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

    def download(self, container: str, blob: str, max_bytes: int) -> Downloaded:
        """The blob's current bytes; one byte past the cap is fetched so an oversized blob is known without HEAD."""
        client = self._service.get_blob_client(container, blob)
        try:
            with _translated(f"download {container}/{blob}"):
                stream = client.download_blob(offset=0, length=max_bytes + 1, max_concurrency=1)
                data = stream.readall()
        except BlobNotFoundError as exc:
            raise PermanentError(RejectionCode.SOURCE_MISSING, "the source blob no longer exists") from exc
        except BlobscoreError as exc:
            if _status_of(exc) == 416:  # Range not satisfiable: the blob is empty.
                return Downloaded(b"", self._etag(container, blob), 0)
            raise
        properties = stream.properties
        size = int(properties.size)
        if len(data) > max_bytes:
            raise PermanentError(RejectionCode.TOO_LARGE, f"over the {max_bytes}-byte cap")
        return Downloaded(data, normalize_etag(properties.etag), size)

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
        client = self._service.get_blob_client(container, name)
        try:
            with _translated(f"write result {container}/{name}"):
                if replaces_etag is None:
                    client.upload_blob(
                        body, metadata=metadata, content_settings=JSON_CONTENT, overwrite=False
                    )
                else:
                    client.upload_blob(
                        body, metadata=metadata, content_settings=JSON_CONTENT, overwrite=True,
                        etag=replaces_etag, match_condition=MatchConditions.IfNotModified,
                    )
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
            for root in _listing_pages(client, prefix or None, continuation or None, page_size, None):
                yield _listing_page(root)

    def metadata_page(
        self, container: str, prefix: str, continuation: str | None, page_size: int = LISTING_PAGE_SIZE
    ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
        """One page of (name, metadata) under `prefix` from `continuation`, and the token after it (None: the end)."""
        client = self._service.get_container_client(container)
        with _translated(f"list {container}/{prefix}"):
            root = next(_listing_pages(client, prefix or None, continuation or None, page_size, "metadata"))
            return list(_metadata_entries(root)), _next_marker(root)

    def list_metadata(self, container: str, prefix: str) -> Iterator[tuple[str, dict[str, str]]]:
        """(name, metadata) of every blob under `prefix`, in one listing rather than one request per blob."""
        client = self._service.get_container_client(container)
        with _translated(f"list {container}/{prefix}"):
            for root in _listing_pages(client, prefix or None, None, LISTING_PAGE_SIZE, "metadata"):
                yield from _metadata_entries(root)

    def upload(self, container: str, name: str, data: bytes, content_type: str | None = None) -> str:
        """Write a blob (overwriting), returning its new etag: for samples and tests, not for results."""
        settings = ContentSettings(content_type=content_type) if content_type else None
        with _translated(f"upload {container}/{name}"):
            reply = self._service.get_blob_client(container, name).upload_blob(
                data, overwrite=True, content_settings=settings
            )
            return normalize_etag(reply["etag"])

    def container_exists(self, container: str) -> bool:
        """Whether the container exists (one request)."""
        with _translated(f"look for container {container}"):
            return bool(self._service.get_container_client(container).exists())

    def ensure_container(self, container: str) -> None:
        """Create the container if it does not exist."""
        try:
            with _translated(f"create container {container}"):
                self._service.create_container(container)
        except BlobscoreError as exc:
            if not isinstance(exc.__cause__, ResourceExistsError):
                raise
