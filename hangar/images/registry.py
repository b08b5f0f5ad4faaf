"""Pulling from a registry (the Distribution API, v2), with every connection checked.

hangar fetches manifests and blobs itself (httpx) rather than through skopeo, because a
tenant chooses the registry and skopeo follows redirects wherever they lead. Here:

- every hop (the registry, its token service, each redirect) goes to an address the
  :class:`~hangar.images.netpolicy.RegistryPolicy` allows, and to the address it checked;
- a redirect from HTTPS to plain HTTP is never followed; plain HTTP is spoken only to the
  operator's insecure registries; credentials never go to another host;
- nothing of what an upstream answered reaches the tenant: errors are short fixed reasons
  (not found, unreachable, too large, too slow);
- the whole pull has a deadline and can be cancelled at once (the machine was destroyed);
- every blob is checked against its digest and size as it arrives, and the image against
  the operator's compressed-size limit before any layer is fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from hangar.errors import ImageError
from hangar.images.layout import (
    ACCEPT,
    CHUNK,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    BlobSink,
    Descriptor,
    ImageManifest,
    bad_image,
    digest_of,
    media_type_of,
    parse_json,
    select_platform,
    too_large,
)
from hangar.images.netpolicy import RegistryPolicy, split_host_port, unreachable
from hangar.images.reference import ImageRef
from hangar.images.runner import Cancellation, Cancelled

MAX_HOPS = 5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
T = TypeVar("T")


@dataclass(frozen=True)
class PullLimits:
    max_compressed_bytes: int
    deadline_s: float


def not_found(ref: ImageRef) -> ImageError:
    return ImageError(f"image {ref} not found", ref=str(ref), reason="not_found")


def _ip_literal(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class RegistrySession:
    """One pull's HTTP conversation with a registry (and the hosts it sends us to)."""

    def __init__(self, ref: ImageRef, policy: RegistryPolicy, insecure: bool) -> None:
        self.ref = ref
        self.policy = policy
        self.authority = ref.registry
        self.insecure = insecure or policy.is_insecure(ref.registry)
        self._token: str | None = None
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            verify=policy.tls if policy.tls is not None else True,
        )

    async def close(self) -> None:
        await self._client.aclose()

    def _base(self) -> str:
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://{self.authority}/v2/{self.ref.repository}"

    @asynccontextmanager
    async def get(self, url: str, accept: str = "") -> AsyncIterator[httpx.Response]:
        """GET ``url`` (token auth, checked redirects); the response is open in the block."""
        headers = {"Accept": accept} if accept else {}
        response = await self._follow(url, headers)
        if response.status_code == 401 and self._token is None:
            challenge = response.headers.get("www-authenticate", "")
            await response.aclose()
            await self._authenticate(challenge)
            response = await self._follow(url, headers)
        try:
            yield response
        finally:
            await response.aclose()

    async def _follow(self, url: str, headers: dict[str, str]) -> httpx.Response:
        current = url
        for _hop in range(MAX_HOPS + 1):
            response = await self._send(current, headers)
            if response.status_code not in REDIRECTS:
                return response
            location = response.headers.get("location", "")
            await response.aclose()
            target = urljoin(current, location)
            if urlsplit(current).scheme == "https" and urlsplit(target).scheme != "https":
                raise ImageError(
                    f"registry {self.authority} redirected to plain HTTP; hangar does not "
                    "follow that",
                    registry=self.authority,
                    reason="redirect_refused",
                )
            current = target
        raise unreachable(self.authority)

    async def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        parts = urlsplit(url)
        authority = parts.netloc.rpartition("@")[2]
        if parts.scheme not in ("http", "https"):
            raise unreachable(self.authority)
        if parts.scheme == "http" and not (
            self.insecure and authority.lower() == self.authority.lower()
        ):
            raise ImageError(
                f"registry {self.authority}: hangar speaks plain HTTP only to the operator's "
                "insecure registries",
                registry=self.authority,
                reason="plain_http_refused",
            )
        default_port = 443 if parts.scheme == "https" else 80
        host, port = split_host_port(authority, default_port)
        addresses = self.policy.addresses(authority, default_port)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        sent_headers = dict(headers)
        sent_headers["Host"] = authority
        if self._token is not None and authority.lower() == self.authority.lower():
            sent_headers["Authorization"] = f"Bearer {self._token}"
        client = self._client
        for address in addresses:
            request = client.build_request(
                "GET",
                f"{parts.scheme}://{_ip_literal(str(address))}:{port}{path}",
                headers=sent_headers,
                extensions={"sni_hostname": host} if parts.scheme == "https" else {},
            )
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError:
                continue
            except httpx.HTTPError:
                raise unreachable(self.authority) from None
        raise unreachable(self.authority)

    async def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        values = dict(_CHALLENGE_PARAM.findall(params))
        realm = values.get("realm", "")
        if scheme.lower() != "bearer" or not realm:
            raise not_found(self.ref)
        query = {key: values[key] for key in ("service", "scope") if key in values}
        if "scope" not in query:
            query["scope"] = f"repository:{self.ref.repository}:pull"
        url = str(httpx.URL(realm, params=query))
        response = await self._follow(url, {})
        try:
            if response.status_code != 200:
                raise not_found(self.ref)
            body = parse_json(await _read_capped(response, MAX_MANIFEST_BYTES), "token")
        finally:
            await response.aclose()
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise not_found(self.ref)
        self._token = token

    async def manifest(self, reference: str, expected: str | None = None) -> tuple[bytes, str]:
        """The raw manifest (or index) ``reference`` names, and its media type."""
        async with self.get(f"{self._base()}/manifests/{reference}", ACCEPT) as response:
            self._check(response)
            raw = await _read_capped(response, MAX_MANIFEST_BYTES)
            declared = response.headers.get("content-type", "").split(";")[0].strip()
        if expected is not None and digest_of(raw) != expected:
            raise bad_image(f"manifest {reference} does not match its digest")
        return raw, declared

    async def blob(self, descriptor: Descriptor, sink: BlobSink) -> None:
        async with self.get(f"{self._base()}/blobs/{descriptor.digest}") as response:
            self._check(response)
            try:
                async for chunk in response.aiter_bytes(CHUNK):
                    sink.write(chunk)
            except httpx.HTTPError:
                sink.abort()
                raise unreachable(self.authority) from None
            except BaseException:
                sink.abort()
                raise
        sink.close()

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 200:
            return
        if response.status_code in (401, 403, 404):
            raise not_found(self.ref)
        raise unreachable(self.authority)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes(CHUNK):
            size += len(chunk)
            if size > limit:
                raise bad_image(f"an answer of the registry is larger than {limit} bytes")
            chunks.append(chunk)
    except httpx.HTTPError:
        raise unreachable(response.request.headers.get("host", "the registry")) from None
    return b"".join(chunks)


@dataclass(frozen=True)
class ResolvedImage:
    """What a tag or digest names: the digest of the top-level manifest (or index) and the
    linux/amd64 image manifest."""

    digest: str
    manifest: ImageManifest


async def resolve(session: RegistrySession) -> ResolvedImage:
    ref = session.ref
    reference = ref.digest or ref.tag or "latest"
    raw, declared = await session.manifest(reference, expected=ref.digest)
    document = parse_json(raw, "manifest")
    digest = digest_of(raw)
    if media_type_of(document, declared) in INDEX_TYPES:
        platform = select_platform(document)
        raw, declared = await session.manifest(platform.digest, expected=platform.digest)
        document = parse_json(raw, "manifest")
    return ResolvedImage(digest, ImageManifest.parse(document))


def run_pull(
    work: Callable[[RegistrySession], Awaitable[T]],
    ref: ImageRef,
    policy: RegistryPolicy,
    limits: PullLimits,
    cancellation: Cancellation | None,
    insecure: bool = False,
) -> T:
    """Run ``work`` against ``ref``'s registry on an event loop of this (worker) thread,
    within the pull deadline; cancelled at once when ``cancellation`` is set."""

    async def main() -> T:
        session = RegistrySession(ref, policy, insecure)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None

        def cancel_from_any_thread() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to cancel
                loop.call_soon_threadsafe(task.cancel)

        undo = (
            cancellation.on_cancel(cancel_from_any_thread)
            if cancellation is not None
            else (lambda: None)
        )
        try:
            async with asyncio.timeout(limits.deadline_s):
                return await work(session)
        except TimeoutError:
            raise ImageError(
                f"image {ref} could not be pulled within {limits.deadline_s:g}s",
                ref=str(ref),
                reason="too_slow",
            ) from None
        except asyncio.CancelledError:
            if cancellation is not None and cancellation.cancelled:
                raise Cancelled(cancellation.reason) from None
            raise
        finally:
            undo()
            await session.close()

    return asyncio.run(main())


async def fetch_blobs(
    session: RegistrySession, manifest: ImageManifest, layout_sink: Callable[[Descriptor], BlobSink]
) -> None:
    for descriptor in manifest.blobs:
        await session.blob(descriptor, layout_sink(descriptor))


def check_compressed(manifest: ImageManifest, limit_bytes: int) -> None:
    if manifest.compressed_bytes() > limit_bytes:
        raise too_large("compressed", limit_bytes)
