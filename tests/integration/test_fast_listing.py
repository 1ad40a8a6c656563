"""The producer's fast paths on the real services: our List Blobs reader against the SDK's own listing (Azurite),
its errors and the SDK pipeline it still runs through, and TaskPublisher's messages against Celery's send_task."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContentSettings, LinearRetry
from celery._state import _task_stack

import worker.storage as storage
from deploy.local.azurite import connection_string
from deploy.local.procs import free_port
from producer.publishing import TaskPublisher
from worker.celery_app import create_app
from worker.contracts import TASK_NAME, ImageTask, normalize_etag
from worker.errors import BlobscoreError, ConfigurationError, TransientError
from worker.settings import load_settings
from worker.storage import BlobNotFoundError, BlobStore, ListedBlob

pytestmark = pytest.mark.integration

PAGE = 7
SERVICE = "fastlist-svc"
# Names that need quoting in a URL, escaping in XML, or are not ASCII; metadata on some, content types varied.
ODD_NAMES = [
    "plain.jpg", "with space.jpg", "lead space .JPG", "tab\tinside.jpeg", "amp&lt<gt>.jpg", "quote'\"both.jpg",
    "q?uery#hash.jpg", "percent%20literal.jpg", "percent%2Fslash.jpg", "plus+sign=eq.jpg", "semi;colon,comma.jpg",
    "caf\u00e9.jpg", "\u65e5\u672c/\u5199\u771f.jpg", "emoji \U0001f600.jpg", "\u00c5ngstr\u00f6m/\u00e9t\u00e9.jpe",
    "deep/a/b/c/d/e.jpg", "dir \u00e9/one.jpg", "dir \u00e9/two.jpg", "dir \u00e9/sub/three.jfif", "dot./x.jpg",
    "UPPER/CASE.JPG", "no-extension", "notes.txt", "blobscore-results/svc/plain.jpg.json", "~tilde`back.jpg",
    "brackets[1](2){3}.jpg", "at@dollar$bang!.jpg", "star*caret^pipe|.jpg", "a" * 200 + ".jpg", "zz-last.jpg",
]


def odd_metadata(number: int) -> dict[str, str]:
    """Metadata of the `number`-th blob: none, one key, or several with odd values."""
    if number % 3 == 0:
        return {}
    if number % 3 == 1:
        return {"blobscore_status": "ok", "source_etag": f'"0x8DC{number:013X}"'}
    return {"k": f"v {number} caf\u00e9? & <x>", "Mixed_Case": "Value", "n": str(number)}


@pytest.fixture
def odd_container(blob_service: BlobServiceClient, tmp_container: str) -> str:
    """tmp_container holding the ODD_NAMES blobs, of varied sizes, content types and metadata."""
    container = blob_service.get_container_client(tmp_container)
    for number, name in enumerate(ODD_NAMES):
        kind = [None, "image/jpeg", "text/plain; charset=utf-8"][number % 3]
        container.upload_blob(name, b"x" * number, metadata=odd_metadata(number),
                              content_settings=ContentSettings(content_type=kind) if kind else None)
    return tmp_container


@pytest.fixture
def store(tmp_path: Path, azurite: Any) -> Iterator[BlobStore]:
    """A BlobStore configured as the product configures it (its transport, its retry policy)."""
    made = BlobStore.from_settings(load_settings(tmp_path, blob_connection_string=azurite.connection_string))
    yield made
    made.close()


def sdk_listing(blob_service: BlobServiceClient, container: str, prefix: str | None) -> list[tuple[Any, ...]]:
    """(name, etag, size, content type, metadata) of every blob, as the SDK's own list_blobs reads them."""
    client = blob_service.get_container_client(container)
    return [
        (item.name, normalize_etag(item.etag), int(item.size or 0), item.content_settings.content_type or None,
         {key: value or "" for key, value in (item.metadata or {}).items()})
        for item in client.list_blobs(name_starts_with=prefix, include=["metadata"])
    ]


def our_listing(store: BlobStore, container: str, prefix: str | None) -> list[tuple[Any, ...]]:
    """The same fields from list_pages (pages of 7) and list_metadata, checked to agree on the names."""
    pages = list(store.list_pages(container, prefix, None, PAGE))
    blobs = [entry for page in pages for entry in page.blobs]
    metadata = list(store.list_metadata(container, prefix or ""))
    assert [name for name, _ in metadata] == [entry.name for entry in blobs]
    return [(entry.name, entry.etag, entry.size, entry.content_type, meta)
            for entry, (_, meta) in zip(blobs, metadata, strict=True)]


def test_every_field_of_every_page_matches_the_sdk(
    store: BlobStore, blob_service: BlobServiceClient, odd_container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The metadata listing too goes page by page here, continuation tokens and all.
    monkeypatch.setattr(storage, "LISTING_PAGE_SIZE", PAGE)
    expected = sdk_listing(blob_service, odd_container, None)
    assert len(expected) == len(ODD_NAMES)
    assert sorted(row[0] for row in expected) == sorted(ODD_NAMES)
    assert our_listing(store, odd_container, None) == expected


@pytest.mark.parametrize("prefix", ["dir \u00e9/", "\u65e5\u672c/", "q?uery#", "percent%2", "plus+", "nothing/"])
def test_a_prefix_lists_what_the_sdk_lists(
    store: BlobStore, blob_service: BlobServiceClient, odd_container: str, prefix: str
) -> None:
    assert our_listing(store, odd_container, prefix) == sdk_listing(blob_service, odd_container, prefix)


def test_pages_of_seven_with_tokens_that_resume(store: BlobStore, odd_container: str) -> None:
    pages = list(store.list_pages(odd_container, None, None, PAGE))
    assert [len(page.blobs) for page in pages] == [7, 7, 7, 7, 2]
    assert all(page.continuation for page in pages[:-1])
    assert pages[-1].continuation is None
    resumed = list(store.list_pages(odd_container, None, pages[1].continuation, PAGE))
    assert resumed == pages[2:]
    assert list(store.list_blobs(odd_container, None)) == [entry for page in pages for entry in page.blobs]


def test_an_empty_container_and_a_missing_one(store: BlobStore, tmp_container: str) -> None:
    assert [page.blobs for page in store.list_pages(tmp_container, None, None, PAGE)] == [[]]
    assert list(store.list_metadata(tmp_container, "")) == []
    missing = f"missing-{uuid.uuid4().hex}"
    with pytest.raises(BlobNotFoundError) as pages:
        list(store.list_pages(missing, None, None, PAGE))
    with pytest.raises(BlobNotFoundError):
        list(store.list_metadata(missing, "r/"))
    assert isinstance(pages.value.__cause__, ResourceNotFoundError)
    assert getattr(pages.value.__cause__, "error_code", None) == "ContainerNotFound"


def test_a_wrong_key_fails_as_the_sdk_listing_fails(azurite: Any, tmp_container: str) -> None:
    wrong = azurite.connection_string.replace("AccountKey=Eby8", "AccountKey=Xby8")
    service = BlobServiceClient.from_connection_string(wrong, retry_policy=LinearRetry(retry_total=0))
    with pytest.raises(HttpResponseError) as sdk:
        list(service.get_container_client(tmp_container).list_blobs(include=["metadata"]))
    for listing in (lambda: BlobStore(service).list_pages(tmp_container, None, None, PAGE),
                    lambda: BlobStore(service).list_metadata(tmp_container, "")):
        with pytest.raises(BlobscoreError) as ours:
            list(listing())
        cause = ours.value.__cause__
        assert type(cause) is type(sdk.value)
        assert isinstance(cause, HttpResponseError)
        # (The storage SDK sets error_code on the errors it raises.)
        codes = [(error.status_code, getattr(error, "error_code", None)) for error in (cause, sdk.value)]
        assert codes == [(403, "AuthorizationFailure")] * 2


# ---------------------------------------------------------------------------------------------------------------
# A scripted endpoint: what the SDK's pipeline still does for us (signing, retries), and odd answers


@dataclass
class Scripted:
    """Answers requests with the scripted (status, headers, body) in turn; keeps every request's headers."""

    answers: list[tuple[int, dict[str, str], bytes]]
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, int]]:
    """A local HTTP server answering from a Scripted, and its port."""
    script = Scripted([])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            script.seen.append((self.path, dict(self.headers.items())))
            status, headers, body = script.answers.pop(0)
            self.send_response(status)
            for name, value in {**headers, "x-ms-version": "2025-01-05", "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield script, port
    server.shutdown()
    server.server_close()


def scripted_store(port: int, retries: int) -> BlobStore:
    """A BlobStore on the scripted endpoint, the SDK retrying `retries` times at once."""
    retry = LinearRetry(backoff=0, random_jitter_range=0, retry_total=retries)
    return BlobStore(BlobServiceClient.from_connection_string(connection_string(port), retry_policy=retry))


XML = {"Content-Type": "application/xml"}
ONE_BLOB = (
    b'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ContainerName="c"><Blobs><Blob>'
    b'<Name Encoded="true">a%01b.jpg</Name><Properties><Etag>0x1</Etag><Content-Length>3</Content-Length>'
    b"<Content-Type>image/jpeg</Content-Type></Properties></Blob></Blobs><NextMarker /></EnumerationResults>"
)


def test_requests_are_signed_and_retried_by_the_sdk(scripted: tuple[Scripted, int]) -> None:
    script, port = scripted
    script.answers = [(503, {"x-ms-error-code": "ServerBusy"}, b""), (200, XML, ONE_BLOB)]
    pages = list(scripted_store(port, retries=1).list_pages("c", "p \u00e9/", "m+1", 5))
    assert pages == [storage.ListingPage([ListedBlob("a\x01b.jpg", "0x1", 3, "image/jpeg")], None)]
    assert len(script.seen) == 2
    for path, headers in script.seen:
        assert path.startswith("/devstoreaccount1/c?")
        assert sorted(path.split("?")[1].split("&")) == sorted(
            ["restype=container", "comp=list", "prefix=p%20%C3%A9%2F", "marker=m%2B1", "maxresults=5"]
        )
        assert headers["Authorization"].startswith("SharedKey devstoreaccount1:")
        assert headers["x-ms-version"]
        assert headers["x-ms-date"]
        assert "azsdk-python-storage-blob" in headers["User-Agent"]


def test_a_busy_service_is_transient(scripted: tuple[Scripted, int]) -> None:
    script, port = scripted
    script.answers = [(503, {"x-ms-error-code": "ServerBusy"}, b"")]
    with pytest.raises(TransientError):
        list(scripted_store(port, retries=0).list_pages("c", None, None, 5))


def test_refused_credentials_are_a_configuration_error(scripted: tuple[Scripted, int]) -> None:
    # The SDK refines a 403 by its error code: AuthenticationFailed is ClientAuthenticationError.
    script, port = scripted
    error = b"<?xml version='1.0'?><Error><Code>AuthenticationFailed</Code><Message>no</Message></Error>"
    script.answers = [(403, {**XML, "x-ms-error-code": "AuthenticationFailed"}, error)]
    with pytest.raises(ConfigurationError):
        list(scripted_store(port, retries=0).list_metadata("c", "r/"))


@pytest.mark.parametrize(
    "answer",
    [(200, {"Content-Type": "text/plain"}, b"not xml at all"), (200, XML, b"<Error><Code>Odd</Code></Error>"),
     (200, XML, b"<EnumerationResults><Blobs>")],
    ids=["not-xml", "not-a-listing", "truncated"],
)
def test_an_answer_that_is_not_a_listing_is_an_error(
    scripted: tuple[Scripted, int], answer: tuple[int, dict[str, str], bytes]
) -> None:
    script, port = scripted
    script.answers = [answer] * 3
    with pytest.raises(BlobscoreError):
        list(scripted_store(port, retries=0).list_pages("c", None, None, 5))


# ---------------------------------------------------------------------------------------------------------------
# Publishing: TaskPublisher's messages are the ones Celery's send_task builds


def celery_publish(app: Any, queue: str, tasks: list[ImageTask]) -> None:
    """The reference: one send_task per task, as TaskPublisher did before it reused Celery's first message."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for task in tasks:
            app.send_task(TASK_NAME, args=[task.to_message()], queue=queue, producer=producer, serializer="json",
                          ignore_result=True, argsrepr=f"[{task.job_id}:{task.index}]", kwargsrepr="{}")


def queued(client: redis.Redis, queue: str) -> list[str]:
    """The queue's raw messages in publishing order, removed from the queue."""
    raw = client.lrange(queue, 0, -1)
    client.delete(queue)
    return [item.decode() if isinstance(item, bytes) else item for item in reversed(raw)]


def without_ids(raw: str) -> str:
    """The message with its task id and delivery tag replaced by placeholders (every other byte kept)."""
    envelope = json.loads(raw)
    headers, properties = envelope["headers"], envelope["properties"]
    assert headers["id"] == properties["correlation_id"]
    return raw.replace(headers["id"], "<task-id>").replace(properties["delivery_tag"], "<delivery-tag>")


@dataclass
class Publishing:
    """An app whose queue is private to one test, on the session's Redis."""

    app: Any
    queue: str
    client: redis.Redis

    def both_ways(self, tasks: list[ImageTask]) -> tuple[list[str], list[str]]:
        """The raw messages of `tasks` published by send_task, then by TaskPublisher."""
        celery_publish(self.app, self.queue, tasks)
        reference = queued(self.client, self.queue)
        TaskPublisher(self.app, self.queue)(tasks)
        return reference, queued(self.client, self.queue)


@pytest.fixture
def publishing(tmp_path: Path, redis_url: str, azurite: Any) -> Iterator[Publishing]:
    """A Publishing on a fresh queue, deleted afterwards."""
    settings = load_settings(tmp_path, broker_url=redis_url, queue=f"fastpub-{uuid.uuid4().hex[:8]}", service=SERVICE,
                             blob_connection_string=azurite.connection_string)
    client = redis.Redis.from_url(redis_url)
    made = Publishing(create_app(settings), settings.queue_for(SERVICE), client)
    yield made
    client.delete(made.queue)
    client.close()


def image_tasks(names: list[str]) -> list[ImageTask]:
    """Tasks of one job for blobs `names`."""
    return [
        ImageTask(namespace="ns", account="acct", endpoint="http://127.0.0.1:1/acct", job_id="job-1", index=index,
                  container="c", blob=name, etag=f'"0x{index}"', size=index, service=SERVICE,
                  results_container="r", results_prefix="blobscore-results/x/")
        for index, name in enumerate(names)
    ]


def test_published_messages_equal_celerys_apart_from_ids(publishing: Publishing) -> None:
    tasks = image_tasks(["a.jpg", "caf\u00e9 \U0001f600.jpg", 'q"uote\\back.jpg', "dir/x.jpeg"])
    reference, ours = publishing.both_ways(tasks)
    assert len(ours) == len(reference) == len(tasks)
    assert [without_ids(raw) for raw in ours] == [without_ids(raw) for raw in reference]
    headers = [json.loads(raw)["headers"] for raw in ours]
    assert len({header["id"] for header in headers}) == len(tasks)
    assert all(header["root_id"] == header["id"] for header in headers)
    bodies = [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in ours]
    assert bodies == [[[task.to_message()], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
                      for task in tasks]


def test_published_from_a_running_task_the_parent_is_kept(publishing: Publishing) -> None:
    # The scheduled run enqueues from inside a worker task: Celery names it as every message's parent and root.
    # (A stand-in for the running task: finalizing this app would meet the other tests' apps' shared tasks.)
    request = SimpleNamespace(id="parent-task", root_id="root-task", called_directly=False, delivery_info={})
    _task_stack.push(SimpleNamespace(request=request, add_trail=lambda _result: None))
    try:
        reference, ours = publishing.both_ways(image_tasks(["a.jpg", "b.jpg", "c.jpg"]))
    finally:
        _task_stack.pop()
    assert [without_ids(raw) for raw in ours] == [without_ids(raw) for raw in reference]
    assert {(header["parent_id"], header["root_id"]) for header in (json.loads(raw)["headers"] for raw in ours)} == {
        ("parent-task", "root-task")
    }
