"""The Azure blob that holds an image: its URL (parsed once, HTTPS only, checked against the blob allowlist),
and async access through ``azure-storage-blob`` (ranged reads, 512-byte-aligned page writes, the lease).

Private blobs use the pod's identity credential (workload or managed identity, through
:class:`skr.identity.CredentialFactory`); public ones are read anonymously; a SAS in the URL is used as is.
Blob endpoints have their own allowlist (``SKR_ALLOWED_BLOB_ENDPOINTS``, default: the Azure storage
domains), separate from the sidecar's attestation / Key Vault allowlist.

Never logs a SAS, a token or a lease id's owner; error messages name the blob without its query.
"""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from skr.encfs.errors import BlobError, BlobLeased, EncfsConfigError
from skr.endpoints import DEFAULT_BLOB_ALLOWED, Allowlist, Endpoint, split_url
from skr.errors import BadRequest, Code

PAGE = 512
MAX_PUT_PAGE = 4 * 1024 * 1024
LEASE_SECONDS = 60
_TIMEOUTS = {"connection_timeout": 10, "read_timeout": 60}
#: The largest blob answer read at once: a LUKS2 header with its keyslot area (16 MiB by default) or a
#: cache block. Blob data is not an API answer, so SKR_MAX_UPSTREAM_BODY (MAA, Key Vault, KDS) is not its cap.
MAX_BLOB_READ = 64 * 1024 * 1024


def blob_transport_kwargs(factory: Any) -> dict[str, Any]:
    """skr's transport for Azure Storage (verified TLS, no redirects), capped at :data:`MAX_BLOB_READ`."""
    kwargs: dict[str, Any] = factory.transport_kwargs(service="Azure Storage", max_body=MAX_BLOB_READ)
    return kwargs


def blob_allowlist(env: Mapping[str, str]) -> Allowlist:
    """``SKR_ALLOWED_BLOB_ENDPOINTS`` (comma-separated patterns) or the Azure storage domains."""
    value = env.get("SKR_ALLOWED_BLOB_ENDPOINTS", "")
    return Allowlist(value.split(",")) if value.strip() else Allowlist(DEFAULT_BLOB_ALLOWED)


@dataclass(frozen=True)
class BlobUrl:
    """``https://<account host>/<container>/<blob>`` (or ``https://<ip>:<port>/<account>/<container>/<blob>``
    for emulators); ``sas``: the query string, kept out of reprs."""

    endpoint: Endpoint
    path: str
    sas: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"{self.endpoint.url}{self.path}"

    @property
    def url_with_sas(self) -> str:
        return f"{self.url}?{self.sas}" if self.sas else self.url

    def __str__(self) -> str:
        return self.url


def parse_blob_url(value: str, *, allowlist: Allowlist, what: str = "azure_url") -> BlobUrl:
    """Parse and check a blob URL: HTTPS, a container and a blob name, an allowed endpoint."""
    text = value.strip()
    if not text.lower().startswith("https://"):
        raise EncfsConfigError(f"{what} must be an https:// blob URL", hint="blob access is HTTPS only")
    try:
        endpoint, parts = split_url(text, what=what)
    except BadRequest as exc:
        raise EncfsConfigError(exc.message) from None
    except ValueError:
        raise EncfsConfigError(f"{what} is not a valid URL") from None
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 2 or parts.fragment:
        raise EncfsConfigError(
            f"{what} must name a container and a blob: https://<account>/<container>/<blob>"
        )
    if not allowlist.allows(endpoint):
        raise EncfsConfigError(
            f"{what} host {endpoint.authority} is not in the blob endpoint allowlist; no request was sent",
            hint="add it to SKR_ALLOWED_BLOB_ENDPOINTS if this storage account is really yours",
            code=Code.ENDPOINT_NOT_ALLOWED,
        )
    return BlobUrl(endpoint, parts.path, parts.query)


def proposed_lease_id(url: BlobUrl, mount_point: str) -> str:
    """The lease id this host proposes: stable across restarts of the same pod (so a crash never blocks
    the next start), different for another pod (which is refused)."""
    seed = f"{socket.gethostname()}\0{url.url}\0{mount_point}".encode()
    return str(uuid.UUID(bytes=hashlib.sha256(seed).digest()[:16], version=4))


def _describe(exc: Exception) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    first = str(message).strip().splitlines()
    return first[0] if first else type(exc).__name__


class Blob:
    """One blob, opened with an async ``BlobClient`` (call inside the event loop; close with ``aclose``)."""

    def __init__(
        self,
        url: BlobUrl,
        *,
        credential: Any | None,
        transport_kwargs: Mapping[str, Any],
        lease_id: str | None = None,
    ) -> None:
        from azure.storage.blob.aio import BlobClient

        self.url = url
        self._client = BlobClient.from_blob_url(
            url.url_with_sas, credential=None if url.sas else credential, **{**_TIMEOUTS, **transport_kwargs}
        )
        self._lease: Any | None = None  # the lease this client took (and renews, and releases)
        self._lease_id = lease_id  # a lease held by another client of this process tree
        self.size = 0
        self.blob_type = ""

    async def aclose(self) -> None:
        await self._client.close()

    async def properties(self) -> None:
        """Size and type; a missing blob or a refusal is one clear :class:`BlobError`."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        try:
            props = await self._client.get_blob_properties()
        except ResourceNotFoundError:
            raise BlobError(f"the blob {self.url} does not exist", code=Code.BLOB_NOT_FOUND) from None
        except AzureError as exc:
            raise BlobError(f"the blob {self.url} could not be read: {_describe(exc)}") from None
        self.size = int(props.size)
        self.blob_type = str(getattr(props.blob_type, "value", props.blob_type))

    async def read(self, offset: int, length: int) -> bytes:
        from azure.core.exceptions import AzureError

        try:
            stream = await self._client.download_blob(offset=offset, length=length, **self._lease_kwargs())
            data: bytes = await stream.readall()
        except AzureError as exc:
            raise BlobError(
                f"reading {length} bytes at {offset} of {self.url} failed: {_describe(exc)}"
            ) from None
        return data

    async def write_pages(self, offset: int, data: bytes) -> None:
        """Upload 512-byte-aligned pages (at most 4 MiB per request), under the lease when one is held."""
        from azure.core.exceptions import AzureError

        if offset % PAGE or len(data) % PAGE:
            raise BlobError("page writes must be 512-byte aligned")
        try:
            for start in range(0, len(data), MAX_PUT_PAGE):
                chunk = data[start : start + MAX_PUT_PAGE]
                await self._client.upload_page(
                    chunk, offset=offset + start, length=len(chunk), **self._lease_kwargs()
                )
        except AzureError as exc:
            raise BlobError(f"writing pages at {offset} of {self.url} failed: {_describe(exc)}") from None

    def _lease_kwargs(self) -> dict[str, Any]:
        lease_id = self.lease_id
        return {"lease": lease_id} if lease_id is not None else {}

    async def acquire_lease(self, lease_id: str) -> None:
        from azure.core.exceptions import AzureError, HttpResponseError

        try:
            self._lease = await self._client.acquire_lease(lease_duration=LEASE_SECONDS, lease_id=lease_id)
        except AzureError as exc:
            if isinstance(exc, HttpResponseError) and exc.status_code == 409:
                raise BlobLeased(
                    f"the blob {self.url} is leased by another writer; a read-write mount needs it alone",
                    hint="stop the other pod, mount read-only, or wait a minute for a crashed writer's lease "
                    "to end",
                ) from None
            raise BlobError(f"leasing {self.url} failed: {_describe(exc)}") from None

    async def renew_lease(self) -> None:
        if self._lease is not None:
            await self._lease.renew()

    async def release_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()

    @property
    def lease_id(self) -> str | None:
        return self._lease_id if self._lease is None else str(self._lease.id)


async def upload_image(
    data_path: str, url: BlobUrl, *, page: bool, credential: Any | None, transport_kwargs: Mapping[str, Any]
) -> int:
    """Upload a local image as a page blob (read-write capable) or a block blob (read-only)."""
    import os

    from azure.core.exceptions import AzureError
    from azure.storage.blob.aio import BlobClient

    size = os.path.getsize(data_path)  # noqa: ASYNC240 - one stat before the upload
    if page and size % PAGE:
        raise EncfsConfigError(f"{data_path} is {size} bytes; a page blob needs a multiple of 512")
    client = BlobClient.from_blob_url(
        url.url_with_sas, credential=None if url.sas else credential, **{**_TIMEOUTS, **transport_kwargs}
    )
    try:
        with open(data_path, "rb") as f:  # noqa: ASYNC230 - sequential local reads between uploads
            if not page:
                await client.upload_blob(f, length=size, overwrite=True, max_concurrency=4)
                return size
            await client.create_page_blob(size)
            offset = 0
            while chunk := f.read(MAX_PUT_PAGE):
                if chunk.count(0) != len(chunk):  # all-zero pages are already zero: skip them
                    await client.upload_page(chunk, offset=offset, length=len(chunk))
                offset += len(chunk)
    except AzureError as exc:
        raise BlobError(f"uploading to {url} failed: {_describe(exc)}") from None
    finally:
        await client.close()
    return size
