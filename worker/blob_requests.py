"""A source photo's GET and a result's create-only PUT, sent through the SDK's own pipeline without its per-call
client objects; the SDK's errors for any other answer.

The SDK builds a `BlobClient` (URL parsing, configuration, a pipeline wrapper) for every call and runs its generated
operation's serializers and deserializers around it: 0.4–1.0 ms of CPU per image on the worker's two calls, about
a third of what it spends beyond a hand-written loop (bench/README.md, `bench/blob_calls.py`). The request goes
through the same pipeline the SDK's operations use — its policies sign it, retry it, set its headers and log it —
and an error answer becomes the very exception the SDK raises (`raise_storage_error`), so worker/storage.py
translates both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ResourceNotModifiedError,
    map_error,
)
from azure.core.rest import HttpRequest, HttpResponse
from azure.storage.blob import ContainerClient
from azure.storage.blob._shared.response_handlers import process_storage_error

# What the SDK's generated operations map these statuses to, before its refinement by x-ms-error-code.
STORAGE_ERROR_MAP: dict[int, type[HttpResponseError]] = {
    401: ClientAuthenticationError,
    404: ResourceNotFoundError,
    409: ResourceExistsError,
    304: ResourceNotModifiedError,
}


@dataclass(frozen=True)
class Fetched:
    """The first bytes of one blob version: the bytes, its etag and its whole size."""

    data: bytes
    etag: str
    size: int


def raise_storage_error(response: HttpResponse) -> NoReturn:
    """Raise what the SDK raises for this answer (ResourceNotFoundError, ResourceModifiedError for a failed
    condition, ClientAuthenticationError for a refused signature, …)."""
    try:
        map_error(status_code=response.status_code, response=response, error_map=STORAGE_ERROR_MAP)
        raise HttpResponseError(response=response)
    except HttpResponseError as error:
        process_storage_error(error)  # always raises


def blob_url(client: ContainerClient, blob: str) -> str:
    """The blob's URL, spelled as the SDK spells it (path quoted but for `~` and `/`; a SAS query kept)."""
    parts = urlsplit(client.url)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{quote(blob, safe='~/')}"))


def fetch_start(client: ContainerClient, blob: str, length: int) -> Fetched:
    """The blob's first `length` bytes (all of it when shorter) with its etag and size, in one GET."""
    request = HttpRequest("GET", blob_url(client, blob), headers={
        "x-ms-version": client.api_version, "x-ms-range": f"bytes=0-{length - 1}", "Accept": "application/xml",
    })
    # Streamed: the pipeline's ContentDecodePolicy would otherwise try to read the photo as text.
    response = client._pipeline.run(request, stream=True).http_response
    if response.status_code not in (200, 206):
        response.read()  # the error's XML body, for the SDK's message
        raise_storage_error(response)
    data = response.read()
    return Fetched(data, response.headers["ETag"], _whole_size(response, len(data)))


def _whole_size(response: HttpResponse, received: int) -> int:
    # "bytes 0-1023/5000": the size after the slash; a 200 (no range applied) carries the whole blob.
    content_range = response.headers.get("Content-Range", "")
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else received


def put_block_blob(
    client: ContainerClient, blob: str, body: bytes, content_type: str, metadata: dict[str, str],
    if_match: str | None,
) -> None:
    """Write the blob in one Put Blob: only if it does not exist (`if_match` None), else only over that etag."""
    headers: dict[str, Any] = {
        "x-ms-version": client.api_version, "x-ms-blob-type": "BlockBlob", "x-ms-blob-content-type": content_type,
        "Content-Type": "application/octet-stream", "Content-Length": str(len(body)), "Accept": "application/xml",
    }
    headers.update({f"x-ms-meta-{key}": value for key, value in metadata.items()})
    if if_match is None:
        headers["If-None-Match"] = "*"
    else:
        headers["If-Match"] = if_match
    response = client._pipeline.run(HttpRequest("PUT", blob_url(client, blob), headers=headers, content=body),
                                    stream=False).http_response
    if response.status_code != 201:
        raise_storage_error(response)
