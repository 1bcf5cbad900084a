"""SSRF guard for outgoing action requests.

A target URL is resolved once; every resolved address must be public (not loopback, private,
link-local, multicast, reserved, unspecified or otherwise non-global) unless an EgressAllowRule
names the host or a range holding the address. The caller then connects to the address that was
checked (never resolving again), so a DNS answer that changes between check and connect
("DNS rebinding") cannot smuggle a request to an internal address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")


class EgressRefused(Exception):
    """The URL may not be contacted; the message says why (it ends up in the run's last_error)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # as written in the URL, lower-cased, without IPv6 brackets
    port: int
    path: str  # path and query, at least "/"
    address: str  # the checked IP address to connect to

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class AllowList:
    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    def allows(self, host: str, address: IPAddress) -> bool:
        if host in self.hosts:
            return True
        address = _unmapped(address)
        return any(address.version == net.version and address in net for net in self.networks)


def parse_rule(value: str) -> IPNetwork | str:
    """An allow-list entry: an IP address or CIDR range, else a host name (lower-cased)."""
    value = value.strip().lower()
    if not value:
        raise ValueError("empty rule")
    try:
        return ipaddress.ip_network(value.strip("[]"), strict=False)
    except ValueError:
        pass
    if any(c in value for c in "/:@ ") or value.startswith("."):
        raise ValueError(f"{value!r} is neither an IP address, a CIDR range nor a host name")
    return value


def allow_list_from(rules: Iterable[str]) -> AllowList:
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for raw in rules:
        try:
            parsed = parse_rule(raw)
        except ValueError:
            continue  # a malformed rule allows nothing
        if isinstance(parsed, str):
            hosts.add(parsed)
        else:
            networks.append(parsed)
    return AllowList(frozenset(hosts), tuple(networks))


def validate_url(url: str) -> tuple[str, str, int, str]:
    """Syntax only (used at configuration time too): ``(scheme, host, port, path)``."""
    url = url.strip()
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise EgressRefused("the URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EgressRefused(f"invalid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise EgressRefused("only http and https URLs are allowed")
    if parts.username or parts.password:
        raise EgressRefused("credentials in the URL are not allowed; use the signing secret")
    host = (parts.hostname or "").lower()
    if not host:
        raise EgressRefused("the URL has no host")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _unmapped(address: IPAddress) -> IPAddress:
    """::ffff:127.0.0.1 is 127.0.0.1 on the wire: judge the IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: IPAddress) -> bool:
    address = _unmapped(address)
    return not (
        address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise EgressRefused(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    seen: list[IPAddress] = []
    for info in infos:
        # The scope id of a link-local IPv6 answer ("fe80::1%eth0") is not part of the address.
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    if not seen:
        raise EgressRefused(f"{host} resolves to no address")
    return seen


def check_url(url: str, *, allow: AllowList) -> Target:
    """Resolve ``url`` and refuse it unless every address is public or allow-listed."""
    scheme, host, port, path = validate_url(url)
    addresses = _resolve(host, port)
    for address in addresses:
        if not is_public(address) and not allow.allows(host, address):
            raise EgressRefused(
                f"refused: {host} resolves to {address}, a non-public address (loopback, private, link-local, "
                "multicast or reserved); an admin can allow it with an egress allow rule"
            )
    return Target(scheme=scheme, host=host, port=port, path=path, address=str(_unmapped(addresses[0])))
