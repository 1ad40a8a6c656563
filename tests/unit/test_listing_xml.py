"""Our List Blobs reader (worker/storage.py) on XML samples: what it reads, and that the SDK reads the same."""

from __future__ import annotations

from typing import Any
from xml.etree.ElementTree import Element, fromstring

import pytest
from azure.storage.blob import ContainerClient
from azure.storage.blob._deserialize import get_blob_properties_from_generated_code
from azure.storage.blob._generated import models as generated_models
from azure.storage.blob._generated._utils.serialization import Deserializer
from azure.storage.blob._generated.operations._container_operations import build_list_blob_flat_segment_request

from deploy.local.azurite import connection_string
from worker.blob_listing import ListedBlob
from worker.blob_listing import listing_page as _listing_page
from worker.blob_listing import listing_request as _listing_request
from worker.blob_listing import metadata_entries as _metadata_entries

HEAD = '<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="https://acct.blob.core.windows.net/" ContainerName="c">'  # noqa: E501
STAMP = "Mon, 01 Jan 2024 00:00:00 GMT"


def blob(name: str, etag: str = "0x8DC0000000000001", length: str | None = "4096",
         content_type: str | None = "image/jpeg", metadata: str = "<Metadata />", encoded: bool = False) -> str:
    """One <Blob> entry with the properties a storage account sends for a block blob."""
    name_tag = '<Name Encoded="true">' if encoded else "<Name>"
    size = "" if length is None else f"<Content-Length>{length}</Content-Length>"
    kind = "<Content-Type />" if content_type is None else f"<Content-Type>{content_type}</Content-Type>"
    return (
        f"<Blob>{name_tag}{name}</Name><Properties><Creation-Time>{STAMP}</Creation-Time>"
        f"<Last-Modified>{STAMP}</Last-Modified><Etag>{etag}</Etag>{size}{kind}<Content-Encoding />"
        "<Content-Language /><Content-CRC64 /><Content-MD5>1B2M2Y8AsgTpgAmY7PhCfg==</Content-MD5><Cache-Control />"
        "<Content-Disposition /><BlobType>BlockBlob</BlobType><AccessTier>Hot</AccessTier>"
        "<AccessTierInferred>true</AccessTierInferred><LeaseStatus>unlocked</LeaseStatus>"
        f"<LeaseState>available</LeaseState><ServerEncrypted>true</ServerEncrypted></Properties>{metadata}</Blob>"
    )


def page(entries: str, next_marker: str | None = "", prefix: str = "") -> str:
    """An EnumerationResults document; next_marker None leaves the element out altogether."""
    marker = "" if next_marker is None else f"<NextMarker>{next_marker}</NextMarker>"
    return (f"{HEAD}<Prefix>{prefix}</Prefix><MaxResults>7</MaxResults><Blobs>{entries}</Blobs>{marker}"
            "</EnumerationResults>")


TYPICAL = page(
    blob("holiday photos/beach 01.jpg", etag='"0x8DC0000000000002"')
    + blob("caf\u00e9/\u65e5\u672c\u8a9e \U0001f600.JPG", content_type="image/pjpeg")
    + blob("a&amp;b &lt;c&gt; 'd' \"e\".jpeg", length="0", content_type=None)
    + blob("ctrl%01char%0A.jpg", encoded=True)
    + blob("percent%2520literal%20name.jpg", encoded=True)
    + blob("not%20encoded.jpg")
    + blob("no-length.jpg", length=None),
    next_marker="2!120!MDAwMDQ3IWhvbGlkYXkvYmVhY2ggMDEuanBnITAwMDAyOCE5OTk5LTEyLTMxVDIzOjU5OjU5Ljk5OTk5OTlaIQ--",
)
WITH_METADATA = page(
    blob("r/a.jpg.json", metadata="<Metadata><blobscore_status>ok</blobscore_status>"
         "<Source_Etag>&quot;0x1&quot;</Source_Etag><empty /></Metadata>")
    + blob("r/b.jpg.json", metadata="<Metadata />")
    + blob("r/c.jpg.json", metadata="")
    + blob("r%2Fd%01.json", encoded=True, metadata="<Metadata><k>v \u00e9</k></Metadata>"),
    next_marker=None,
)
EMPTY = page("", next_marker="")
EMPTY_NO_BLOBS = f"{HEAD}<Prefix>nothing/</Prefix><NextMarker /></EnumerationResults>"
EMPTY_BUT_CONTINUED = page("", next_marker="2!8!bWFya2Vy")
WITH_PREFIXES = f"{HEAD}<Blobs><BlobPrefix><Name>dir/</Name></BlobPrefix>{blob('dir.jpg')}</Blobs><NextMarker /></EnumerationResults>"  # noqa: E501

# Not EMPTY_NO_BLOBS: the service always sends <Blobs />, and the SDK fails on a page without it (we read none).
SAMPLES = {"typical": TYPICAL, "metadata": WITH_METADATA, "empty": EMPTY, "empty-but-continued": EMPTY_BUT_CONTINUED}


def parsed(xml: str) -> Element:
    """The XML root of one of the samples above."""
    return fromstring(xml)  # noqa: S314 - our own samples


def sdk_reading(xml: str) -> tuple[list[tuple[Any, ...]], str | None]:
    """What azure-storage-blob's own list_blobs makes of the same XML: its generated deserializer, its items."""
    models = {name: value for name, value in vars(generated_models).items() if isinstance(value, type)}
    response = Deserializer(models)("ListBlobsFlatSegmentResponse", xml, content_type="application/xml")
    items = [get_blob_properties_from_generated_code(item) for item in response.segment.blob_items]
    rows = [(item.name, str(item.etag).strip('"'), int(item.size or 0), item.content_settings.content_type,
             {key: value or "" for key, value in (item.metadata or {}).items()}) for item in items]
    return rows, response.next_marker or None


def our_reading(xml: str) -> tuple[list[tuple[Any, ...]], str | None]:
    """The same fields from our reader: ListedBlob pages and the metadata entries."""
    root = parsed(xml)
    listing = _listing_page(root)
    metadata = _metadata_entries(root)
    assert [name for name, _ in metadata] == [entry.name for entry in listing.blobs]
    rows = [(entry.name, entry.etag, entry.size, entry.content_type, meta)
            for entry, (_, meta) in zip(listing.blobs, metadata, strict=True)]
    return rows, listing.continuation


@pytest.mark.parametrize("xml", SAMPLES.values(), ids=SAMPLES.keys())
def test_we_read_what_the_sdk_reads(xml: str) -> None:
    assert our_reading(xml) == sdk_reading(xml)


def test_names_properties_and_the_continuation() -> None:
    listing = _listing_page(parsed(TYPICAL))
    assert listing.blobs == [
        ListedBlob("holiday photos/beach 01.jpg", "0x8DC0000000000002", 4096, "image/jpeg"),
        ListedBlob("caf\u00e9/\u65e5\u672c\u8a9e \U0001f600.JPG", "0x8DC0000000000001", 4096, "image/pjpeg"),
        ListedBlob("a&b <c> 'd' \"e\".jpeg", "0x8DC0000000000001", 0, None),
        ListedBlob("ctrl\x01char\n.jpg", "0x8DC0000000000001", 4096, "image/jpeg"),
        ListedBlob("percent%20literal name.jpg", "0x8DC0000000000001", 4096, "image/jpeg"),
        ListedBlob("not%20encoded.jpg", "0x8DC0000000000001", 4096, "image/jpeg"),
        ListedBlob("no-length.jpg", "0x8DC0000000000001", 0, "image/jpeg"),
    ]
    assert (listing.continuation or "").startswith("2!120!")


def test_metadata_entries() -> None:
    assert _metadata_entries(parsed(WITH_METADATA)) == [
        ("r/a.jpg.json", {"blobscore_status": "ok", "Source_Etag": '"0x1"', "empty": ""}),
        ("r/b.jpg.json", {}),
        ("r/c.jpg.json", {}),
        ("r/d\x01.json", {"k": "v \u00e9"}),
    ]


@pytest.mark.parametrize(
    "xml", [EMPTY, EMPTY_NO_BLOBS, page("", next_marker=None)], ids=["empty", "no-blobs", "no-marker"]
)
def test_an_empty_last_page(xml: str) -> None:
    listing = _listing_page(parsed(xml))
    assert listing.blobs == []
    assert listing.continuation is None
    assert _metadata_entries(parsed(xml)) == []


def test_an_empty_page_can_still_continue() -> None:
    # The service may end a page early (a partition boundary) with nothing in it but the marker.
    assert _listing_page(parsed(EMPTY_BUT_CONTINUED)).continuation == "2!8!bWFya2Vy"


def test_virtual_directories_are_not_blobs() -> None:
    assert [entry.name for entry in _listing_page(parsed(WITH_PREFIXES)).blobs] == ["dir.jpg"]


@pytest.mark.parametrize(
    ("prefix", "marker", "page_size", "include"),
    [
        (None, None, None, None),
        ("photos/", None, 5000, None),
        ("caf\u00e9 & co/+a=b?#%", "2!120!MDAwMDQ3IWhv/bGlk+YXk=", 7, "metadata"),
    ],
)
def test_the_request_is_the_one_the_sdk_sends(
    prefix: str | None, marker: str | None, page_size: int | None, include: str | None
) -> None:
    client = ContainerClient.from_connection_string(connection_string(10000), "photos-2024")
    ours = _listing_request(client, prefix, marker, page_size, include)
    theirs = build_list_blob_flat_segment_request(
        client.url, version=client.api_version, prefix=prefix, marker=marker, maxresults=page_size,
        include=[include] if include else None,
    )
    assert ours.method == theirs.method == "GET"
    assert sorted(ours.url.split("?")[1].split("&")) == sorted(theirs.url.split("?")[1].split("&"))
    assert ours.url.split("?")[0] == theirs.url.split("?")[0]
    assert {key.lower(): value for key, value in ours.headers.items()} == {
        key.lower(): value for key, value in theirs.headers.items()
    }
