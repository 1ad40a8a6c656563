"""Deployment identity: the account a connection string or URL names, and the namespace derived from it."""

import pytest
from azure.storage.blob import BlobServiceClient

from worker.deployment import (
    AccountRef,
    Deployment,
    account_from_connection_string,
    account_from_url,
    check_namespace,
    derive_namespace,
    normalize_endpoint,
)
from worker.errors import ConfigurationError
from worker.settings import Settings

AZURITE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
    "BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
)
CONNECTION_STRINGS = [
    "DefaultEndpointsProtocol=https;AccountName=myacct;AccountKey=a2V5;EndpointSuffix=core.windows.net",
    "DefaultEndpointsProtocol=https;AccountName=cnacct;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn",
    "BlobEndpoint=https://sasacct.blob.core.windows.net/;SharedAccessSignature=sv=2024-01-01&sig=c2ln",
    "UseDevelopmentStorage=true",
    AZURITE.format(port=10000),
    AZURITE.format(port=43117),
]


@pytest.mark.parametrize("connection_string", CONNECTION_STRINGS)
def test_the_account_matches_what_the_sdk_reads_from_the_connection_string(connection_string: str) -> None:
    # The SDK is the reference for what account a connection string reaches (no request is sent).
    client = BlobServiceClient.from_connection_string(connection_string)
    ours = account_from_connection_string(connection_string)
    assert ours.name == client.account_name
    assert ours.endpoint == normalize_endpoint(client.primary_endpoint.split("?", 1)[0])


def test_no_key_or_signature_survives_in_the_identity() -> None:
    for connection_string in CONNECTION_STRINGS:
        identity = account_from_connection_string(connection_string)
        assert "a2V5" not in str(identity)
        assert "sig" not in identity.endpoint


def test_endpoints_are_normalized() -> None:
    assert normalize_endpoint("https://MyAcct.blob.core.windows.net/") == "myacct.blob.core.windows.net"
    assert normalize_endpoint("https://myacct.blob.core.windows.net:443") == "myacct.blob.core.windows.net"
    assert normalize_endpoint("http://127.0.0.1:10000/devstoreaccount1/") == "127.0.0.1:10000/devstoreaccount1"
    assert account_from_url("https://acct.blob.core.windows.net") == AccountRef("acct", "acct.blob.core.windows.net")
    assert account_from_url("http://localhost:10000/dev1").name == "dev1"


def test_two_azurites_get_different_namespaces_and_one_account_always_the_same() -> None:
    first = derive_namespace(account_from_connection_string(AZURITE.format(port=10000)))
    second = derive_namespace(account_from_connection_string(AZURITE.format(port=43117)))
    assert first != second
    assert first.startswith("devstoreaccount1-")
    assert first == derive_namespace(account_from_connection_string(AZURITE.format(port=10000)))
    check_namespace(first)


def test_a_connection_string_without_an_account_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="names no account"):
        account_from_connection_string("garbage")


def test_namespaces_must_fit_queue_names_and_keys() -> None:
    for bad in ("", "Prod", "a b", "a:b", "-x", "x" * 64):
        with pytest.raises(ValueError, match="namespace"):
            check_namespace(bad)
    with pytest.raises(ValueError, match="namespace"):
        Settings(namespace="has:colon")


def test_a_deployment_owns_only_tasks_of_its_namespace_and_account() -> None:
    account = AccountRef("devstoreaccount1", "127.0.0.1:10000/devstoreaccount1")
    home = Deployment("ns-a", account)
    assert home.owns("ns-a", account.name)
    assert not home.owns("ns-b", account.name)
    assert not home.owns("ns-a", "other")


def test_settings_derive_queues_and_keys_from_the_account_unless_a_namespace_is_set() -> None:
    derived = Settings(blob_connection_string=AZURITE.format(port=10000))  # type: ignore[arg-type]
    namespace = derive_namespace(account_from_connection_string(AZURITE.format(port=10000)))
    assert derived.queue_for("local") == f"blobscore.{namespace}.local"
    assert derived.key_prefix == f"blobscore:{namespace}:"
    pinned = Settings(blob_connection_string=AZURITE.format(port=10000), namespace="staging")  # type: ignore[arg-type]
    assert pinned.queue_for("local") == "blobscore.staging.local"
    assert pinned.deployment == Deployment("staging", derived.account)
