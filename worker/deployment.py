"""Which deployment a process belongs to: its storage account's identity and the namespace derived from it (pure).

Deployments that share one Redis (staging and production, two teams, two local stacks) must never see each
other's queues or keys, and a task must only ever be acted on by a worker of the account it was listed from.
The namespace is derived from the account alone — not from the default service — because a fleet's producer,
beat and regional workers often differ in their default service yet must share one namespace; the service is
already part of every queue name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from worker.errors import ConfigurationError

# Azurite's well-known development account (UseDevelopmentStorage=true).
DEV_ACCOUNT = "devstoreaccount1"
DEV_BLOB_ENDPOINT = "http://127.0.0.1:10000/devstoreaccount1"
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class AccountRef:
    """A storage account as tasks and job records name it: never a key or a SAS token.

    `endpoint` is the blob endpoint without scheme or default port, lower-cased: `myacct.blob.core.windows.net`
    or `127.0.0.1:10000/devstoreaccount1` (two Azurite instances share the account name, not the endpoint).
    """

    name: str
    endpoint: str

    def __str__(self) -> str:
        return f"{self.name} at {self.endpoint}"


@dataclass(frozen=True)
class Deployment:
    """One deployment: its namespace (queues and Redis keys) and its storage account."""

    namespace: str
    account: AccountRef

    def owns(self, namespace: str, account_name: str) -> bool:
        """True when a task stamped with these belongs to this deployment.

        The endpoint is not compared: one account may be reached through several (a private endpoint, a proxy),
        and account names are unique in Azure. It still tells two emulators apart, through the derived namespace.
        """
        return (namespace, account_name) == (self.namespace, self.account.name)


def normalize_endpoint(url: str) -> str:
    """`https://MyAcct.blob.core.windows.net/` -> `myacct.blob.core.windows.net` (scheme and default port dropped)."""
    parts = urlsplit(url.strip() if "://" in url else f"https://{url.strip()}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ConfigurationError(f"the blob endpoint {url!r} has no host name")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"the blob endpoint {url!r} has an invalid port") from exc
    netloc = host if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()) else f"{host}:{port}"
    path = parts.path.strip("/")
    return f"{netloc}/{path}" if path else netloc


def account_from_url(url: str) -> AccountRef:
    """The account behind a blob endpoint URL (public cloud, sovereign cloud, Azurite or a custom host)."""
    endpoint = normalize_endpoint(url)
    host, _, path = endpoint.partition("/")
    # Path-style endpoints (Azurite, IP addresses) name the account in the first path segment.
    name = path.split("/", 1)[0] if path else host.split(".", 1)[0].split(":", 1)[0]
    return AccountRef(name=name, endpoint=endpoint)


def account_from_connection_string(connection_string: str) -> AccountRef:
    """The account a connection string points at, read without its key or SAS (which are never returned)."""
    fields: dict[str, str] = {}
    for part in connection_string.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key:
            fields[key.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        return account_from_url(fields.get("developmentstorageproxyuri") or DEV_BLOB_ENDPOINT)
    if "blobendpoint" in fields:
        found = account_from_url(fields["blobendpoint"])
        return AccountRef(name=fields.get("accountname") or found.name, endpoint=found.endpoint)
    name = fields.get("accountname")
    if not name:
        raise ConfigurationError(
            "BLOBSCORE_BLOB_CONNECTION_STRING names no account: it needs AccountName=… or BlobEndpoint=… "
            "(copy it whole from the portal's Access keys page)"
        )
    suffix = fields.get("endpointsuffix", "core.windows.net")
    return AccountRef(name=name, endpoint=normalize_endpoint(f"https://{name}.blob.{suffix}"))


def derive_namespace(account: AccountRef) -> str:
    """`<account name>-<8 hex of the endpoint>`: stable for one account, different for two Azurites."""
    digest = hashlib.sha256(account.endpoint.encode("utf-8")).hexdigest()[:8]
    name = re.sub(r"[^a-z0-9-]", "-", account.name.lower()).strip("-")[:40] or "account"
    return f"{name}-{digest}"


def check_namespace(value: str) -> str:
    """A namespace is part of queue names and Redis keys: lower-case letters, digits and dashes only."""
    if not NAMESPACE_PATTERN.fullmatch(value):
        raise ValueError(
            f"namespace {value!r} must be 1-63 lower-case letters, digits or dashes, starting with a letter or digit"
        )
    return value
