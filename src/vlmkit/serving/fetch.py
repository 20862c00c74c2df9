"""SSRF-safe fetching of http(s) image URLs from an operator-approved host allowlist.

Each hop (the URL and every redirect) is checked the same way before any connection is made: scheme
http/https, no user-info, host (and port) on the allowlist, DNS resolved here and every address public
(none of IANA's special-purpose ranges: private, loopback, link-local, site-local, multicast, reserved,
protocol-assignment, documentation...; an IPv6 address embedding an IPv4 one — mapped, 6to4, NAT64 — is judged
by that IPv4 address).
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


# IANA's special-purpose address registries (RFC 6890 and its updates), blocks Python's ``is_global`` misses
# included (192.0.0.0/24 such as 192.0.0.8, site-local fec0::/10, 6to4 / NAT64 checked by their IPv4 below)
_SPECIAL_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24", "192.168.0.0/16", "192.175.48.0/24",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4"))  # fmt: skip
_SPECIAL_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8"))  # fmt: skip
# NAT64's well-known prefix: the last 32 bits are the IPv4 address the translator connects to
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses; an IPv6 address that carries an IPv4 one
    (``::ffff:10.0.0.1``, 6to4 ``2002:a00:1::``, NAT64 ``64:ff9b::10.0.0.1``) is judged by that IPv4 address."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        return is_public_address(embedded)
    special = _SPECIAL_V4 if ip.version == 4 else _SPECIAL_V6
    if any(ip in network for network in special):
        return False
    bad = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
           or ip.is_unspecified)  # fmt: skip
    return ip.is_global and not bad


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


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
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
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
