"""SSRF guard for URLs that users give us (webhooks).

A URL passes only if every address its host resolves to is public. The caller
must then connect to one of the returned addresses, never resolve the name
again: a second lookup could answer differently (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Cloud instance metadata services: refused even when private addresses are allowed,
# because they hand out credentials.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, DigitalOcean, OpenStack
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # 0.x.x.x reaches the local host on Linux
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_RFC1918 = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d form

# Categories that SPOOL_WEBHOOK_ALLOW_PRIVATE=1 lets through (development, on-prem receivers).
_PRIVATE_KINDS = frozenset({"loopback", "private", "link-local", "shared", "special-purpose"})


class UnsafeURL(ValueError):
    """The URL is not allowed as a webhook target; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnresolvableHost(UnsafeURL):
    """The host name did not resolve (perhaps only for now: worth retrying later)."""


@dataclass(frozen=True)
class ResolvedTarget:
    """One checked address to connect to, with what the request itself needs."""

    scheme: str  # "http" or "https"
    host: str  # the name from the URL (IDNA ASCII, no brackets): Host header, SNI, cert check
    port: int
    address: str  # the checked IP address to connect to
    path: str  # request target: path and query, never empty

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"


def classify(addr: IPAddress) -> str | None:
    """The kind of a non-public address ("loopback", "metadata", …), or None if public."""
    if isinstance(addr, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that IPv4 address.
        embedded: ipaddress.IPv4Address | None = addr.ipv4_mapped
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is None and addr.sixtofour is not None:
            embedded = addr.sixtofour
        if embedded is not None:
            kind = classify(embedded)
            if kind is not None or addr.ipv4_mapped is not None:
                return kind
        elif addr in _IPV4_COMPATIBLE and not (addr.is_loopback or addr.is_unspecified):
            return "reserved"
        if addr.scope_id:  # a zone id (fe80::1%eth0) would defeat the comparisons below
            addr = ipaddress.IPv6Address(str(addr).split("%", 1)[0])
    if addr in _METADATA:
        return "metadata"
    if addr.is_unspecified or addr in _THIS_NETWORK:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_multicast:
        return "multicast"
    if addr.is_link_local:
        return "link-local"
    if addr.is_reserved:  # includes 240.0.0.0/4 and the broadcast address
        return "reserved"
    if addr in _SHARED:
        return "shared"
    if any(addr in net for net in _RFC1918):
        return "private"
    if not addr.is_global:
        return "special-purpose"  # documentation, benchmarking, protocol assignments…
    return None


def refusal(address: str | IPAddress, allow_private: bool = False) -> str | None:
    """Why ``address`` may not be connected to ("loopback", …), or None if it may."""
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    kind = classify(addr)
    if kind is None or (allow_private and kind in _PRIVATE_KINDS):
        return None
    hint = " (SPOOL_WEBHOOK_ALLOW_PRIVATE=1 allows it)" if kind in _PRIVATE_KINDS else ""
    return _DESCRIPTIONS[kind] + hint


_DESCRIPTIONS = {
    "metadata": "a cloud metadata endpoint",
    "unspecified": "unspecified (0.0.0.0 or ::)",
    "loopback": "loopback",
    "multicast": "multicast",
    "link-local": "link-local",
    "reserved": "reserved",
    "shared": "in the shared (carrier-grade NAT) range",
    "private": "private",
    "special-purpose": "a special-purpose, non-public address",
}


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"host {host!r} does not resolve: {exc}") from exc
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnresolvableHost(f"host {host!r} has no IPv4 or IPv6 address")
    return addresses


def check_url(url: str, allow_private: bool = False) -> list[ResolvedTarget]:
    """Check ``url`` and resolve its host; every address must be allowed.

    Returns one target per address, in resolver order. Raises :class:`UnsafeURL`
    (or its subclass :class:`UnresolvableHost`) with a message fit for a 422.
    """
    if not isinstance(url, str) or not url:
        raise UnsafeURL("URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"URL is longer than {MAX_URL_LENGTH} characters")
    # Whitespace and control characters are where URL parsers disagree; refuse them.
    if any(ch <= " " or ch == "\x7f" or ch == "\\" for ch in url):
        raise UnsafeURL("URL contains whitespace, control characters or a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"URL is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UnsafeURL(f"scheme {parts.scheme or '(none)'!r} is not allowed; use http or https")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("credentials in the URL are not allowed")
    hostname = parts.hostname
    if not hostname:
        raise UnsafeURL("URL has no host")
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    elif port == 0:
        raise UnsafeURL("port 0 is not allowed")

    literal: IPAddress | None
    try:
        literal = ipaddress.ip_address(hostname)
    except ValueError:
        literal = None
    if literal is not None:
        host = hostname
        addresses = [hostname]
    else:
        try:
            host = hostname.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UnsafeURL(f"host {hostname!r} is not a valid domain name") from exc
        addresses = _resolve(host, port)

    for address in addresses:
        why = refusal(address, allow_private)
        if why is None:
            continue
        if literal is not None:
            raise UnsafeURL(f"address {address} is {why}")
        raise UnsafeURL(f"host {host!r} resolves to {address}, which is {why}")

    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return [ResolvedTarget(scheme, host, port, address, path) for address in addresses]
