"""SSRF-safe fetching of http(s) image URLs from an operator-approved host allowlist.

Each hop (the URL and every redirect) is checked the same way before any connection is made: scheme
http/https, no user-info, host (and port) on the allowlist, DNS resolved here and every address public
(no private, loopback, link-local, multicast, reserved or unspecified ranges, IPv4-mapped IPv6 included).
The connection then goes to the checked IP (the Host header and TLS SNI/certificate check keep the
name), so a DNS answer cannot change between the check and the connect. Redirects are followed by hand,
re-checking each hop; bodies are capped in bytes and the whole fetch in time. Proxies from the
environment are ignored (they would connect on our behalf to unchecked addresses).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from vlmkit.serving.limits import parse_host_entry

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the IP address strings the name resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}


class FetchError(Exception):
    """A URL that is refused or could not be fetched; the message is safe to show the client."""

    def __init__(self, message: str, *, code: str = "invalid_image_url") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    bad = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
           or ip.is_unspecified)  # fmt: skip
    return ip.is_global and not bad


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver, off the event loop thread."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def host_allowed(*, host: str, port: int, scheme: str, allow_hosts: tuple[str, ...]) -> bool:
    """An entry without a port allows only the scheme's default port; ``*.domain`` allows its subdomains."""
    for entry in allow_hosts:
        name, entry_port = parse_host_entry(entry)
        if port != (entry_port if entry_port is not None else _DEFAULT_PORTS[scheme]):
            continue
        if host == name or (name.startswith("*.") and host.endswith(name[1:])):
            return True
    return False


@dataclass(frozen=True)
class Hop:
    """One checked request target: where to connect, and the name to present."""

    url: str
    host: str
    port: int
    scheme: str
    ip: IPAddress

    def connect_url(self, parts: SplitResult) -> str:
        ip = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return parts._replace(netloc=f"{ip}:{self.port}").geturl()

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == _DEFAULT_PORTS[self.scheme] else f"{name}:{self.port}"


@dataclass(frozen=True)
class URLFetcher:
    """Fetch image bytes from allowlisted hosts. ``resolver`` / ``address_allowed`` are injectable for tests."""

    allow_hosts: tuple[str, ...]
    max_bytes: int
    timeout_s: float = 10.0
    max_redirects: int = 3
    resolver: Resolver = system_resolver
    address_allowed: Callable[[IPAddress], bool] = is_public_address

    @property
    def enabled(self) -> bool:
        return bool(self.allow_hosts)

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (following allowed redirects), or ``FetchError``."""
        if not self.enabled:
            raise FetchError("http(s) image URLs are disabled on this server; send images as data: URLs")
        try:
            return await asyncio.wait_for(self._fetch(url), timeout=self.timeout_s)
        except TimeoutError:
            raise FetchError("timed out fetching the image URL", code="image_url_timeout") from None

    async def _fetch(self, url: str) -> bytes:
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout) as client:
            for _ in range(self.max_redirects + 1):
                hop = await self.check(url)
                location, body = await self._get(client, hop)
                if location is None:
                    return body
                url = urljoin(url, location)
        raise FetchError(f"the image URL redirected more than {self.max_redirects} times")

    async def check(self, url: str) -> Hop:
        """Everything about ``url`` that must hold before connecting; the address to connect to."""
        parts = _split(url)
        scheme, host, port = parts.scheme, _hostname(parts), _port(parts)
        if not host_allowed(host=host, port=port, scheme=scheme, allow_hosts=self.allow_hosts):
            raise FetchError(f"image URL host {host!r} is not on this server's allowlist")
        ips = await self._resolve(host, port)
        refused = [ip for ip in ips if not self.address_allowed(ip)]
        if refused or not ips:
            raise FetchError(f"image URL host {host!r} resolves to a non-public address")
        return Hop(url=url, host=host, port=port, scheme=scheme, ip=ips[0])

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        literal = _ip_or_none(host)
        if literal is not None:
            return [literal]
        try:
            found = await self.resolver(host, port)
        except (OSError, UnicodeError, LookupError):
            raise FetchError(f"image URL host {host!r} could not be resolved") from None
        ips = [_ip_or_none(str(ip).split("%")[0]) for ip in found]
        if any(ip is None for ip in ips):
            raise FetchError(f"image URL host {host!r} could not be resolved") from None
        return [ip for ip in ips if ip is not None]

    async def _get(self, client: httpx.AsyncClient, hop: Hop) -> tuple[str | None, bytes]:
        """One request to the checked IP: (redirect location, b"") or (None, body)."""
        extensions = {"sni_hostname": hop.host} if hop.scheme == "https" else {}
        headers = {"Host": hop.host_header, "Accept": "image/*", "Accept-Encoding": "identity"}
        request = client.build_request("GET", hop.connect_url(urlsplit(hop.url)), headers=headers,
                                       extensions=extensions)  # fmt: skip
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError:
            raise FetchError("could not connect to the image URL's host") from None
        try:
            if response.status_code in _REDIRECTS and "location" in response.headers:
                return response.headers["location"], b""
            if response.status_code != 200:
                raise FetchError(f"the image URL answered HTTP {response.status_code}")
            return None, await self._read_capped(response)
        finally:
            await response.aclose()

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        too_big = FetchError(
            f"the image at the URL is larger than {self.max_bytes} bytes", code="image_too_large"
        )
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_big
        chunks, size = [], 0
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_bytes:
                    raise too_big
                chunks.append(chunk)
        except httpx.HTTPError:
            raise FetchError("the connection broke while fetching the image URL") from None
        return b"".join(chunks)


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise FetchError("malformed image URL") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise FetchError("image URLs must be data:, http: or https: (file paths and file:// are never read)")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise FetchError("image URLs with user credentials are not allowed")
    return parts


def _hostname(parts: SplitResult) -> str:
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError("the image URL has no host")
    try:
        return host.encode("idna").decode("ascii").lower() if not host.isascii() else host.lower()
    except UnicodeError:
        raise FetchError("the image URL has an invalid host name") from None


def _port(parts: SplitResult) -> int:
    return parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]


def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
