"""List Blobs read by us: the request the SDK's pipeline sends, and the XML answer read into ListedBlob pages.

The SDK sends the request (signing, retries, its whole pipeline); we read the XML it returns. The SDK's generic
deserializer builds a model object per XML element, which was most of the producer's CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote
from xml.etree.ElementTree import Element, ParseError, fromstring

from azure.core.exceptions import DecodeError
from azure.core.rest import HttpRequest
from azure.storage.blob import ContainerClient

from worker.blob_requests import raise_storage_error
from worker.contracts import normalize_etag

ENCODED_TRUE = frozenset({"true", "1"})  # how the service (and the SDK's bool reader) spell Encoded="true"


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


def listing_request(
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


def _listing_xml(client: ContainerClient, request: HttpRequest) -> Element:
    """Send one listing request through the client's pipeline and return the answer's XML root."""
    # ContainerClient._pipeline is the pipeline the SDK's own operations run through: its policies sign the request,
    # retry it, set its headers and log it. Not streamed: the transport reads the body inside the pipeline, so the
    # retries cover a broken read, and its ContentDecodePolicy has parsed the XML already (reused, not parsed twice).
    answer = client._pipeline.run(request, stream=False)
    response = answer.http_response
    if response.status_code != 200:
        raise_storage_error(response)
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


def listing_pages(
    client: ContainerClient, prefix: str | None, marker: str | None, page_size: int | None, include: str | None
) -> Iterator[Element]:
    """The XML root of every page of a flat listing, from `marker` on."""
    while True:
        root = _listing_xml(client, listing_request(client, prefix, marker, page_size, include))
        yield root
        marker = next_marker(root)
        if marker is None:
            return


def next_marker(root: Element) -> str | None:
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


def listing_page(root: Element) -> ListingPage:
    """One listing page from its XML."""
    return ListingPage([_listed_blob(blob) for blob in _blob_elements(root)], next_marker(root))


def _blob_metadata(blob: Element) -> dict[str, str]:
    """The <Metadata> of one <Blob> entry (absent or empty: {}); an empty value is ''."""
    metadata = blob.find("Metadata")
    return {} if metadata is None else {entry.tag: entry.text or "" for entry in metadata}


def metadata_entries(root: Element) -> list[tuple[str, dict[str, str]]]:
    """(name, metadata) of every blob of one page listed with include=metadata."""
    return [(_blob_name(blob), _blob_metadata(blob)) for blob in _blob_elements(root)]
