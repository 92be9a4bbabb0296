"""Who may see the service's internals (/metrics, the detailed /health): explicit access only.

Access is given to an active staff session, to a request carrying the bearer token of
``OPS_TOKEN``, or to a peer address inside ``OPS_ALLOWED_NETWORKS``. Nothing is inferred from
loopback: behind a reverse proxy on the same host every client is "loopback". Nothing is
inferred from a forwarded address either: a request that carries a forwarding header is
never let in by its address, because daphne's ``--proxy-headers`` (required behind a proxy)
makes the first ``X-Forwarded-For`` entry, which the client wrote, the request's "peer".
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Shortest OPS_TOKEN accepted: a bearer secret must not be guessable.
OPS_TOKEN_MIN_LENGTH = 32

FORWARDING_HEADERS = frozenset({"x-forwarded-for", "x-real-ip", "forwarded"})
"""Headers that name another client address than the TCP peer's (set by proxies, or forged)."""


def carries_forwarding(header_names: Iterable[str]) -> bool:
    """True when any of these header names is a forwarding header (any case)."""
    return any(name.lower() in FORWARDING_HEADERS for name in header_names)


def parse_networks(values: Iterable[str], *, setting: str = "OPS_ALLOWED_NETWORKS") -> tuple[Network, ...]:
    """CIDRs (or single addresses) as networks; a bad entry is a start-up error naming it."""
    networks = []
    for value in values:
        value = value.strip()
        if not value:
            continue
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise ImproperlyConfigured(f"{setting}: {value!r} is not an IP address or CIDR ({exc})") from exc
    return tuple(networks)


def validate_ops_token(token: str) -> str:
    if token and len(token) < OPS_TOKEN_MIN_LENGTH:
        raise ImproperlyConfigured(
            f"OPS_TOKEN must be at least {OPS_TOKEN_MIN_LENGTH} characters (got {len(token)})"
        )
    return token


@dataclass(frozen=True)
class OpsAccess:
    """The explicit credentials that open the service's internals; empty means staff only."""

    token: str = ""
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> OpsAccess:
        return cls(token=settings.OPS_TOKEN, allowed_networks=tuple(settings.OPS_ALLOWED_NETWORKS))

    def allows(
        self, *, user: Any, client_host: str | None, authorization: str | None, forwarded: bool
    ) -> bool:
        """True for an active staff user, the right bearer token or an allow-listed peer.

        ``client_host`` is the request's peer as the server reports it; ``forwarded`` says the
        request carries a forwarding header (:func:`carries_forwarding`), in which case the
        server may have taken ``client_host`` from it and the address proves nothing.
        ``authorization`` is the raw ``Authorization`` header, if any.
        """
        if user is not None and user.is_authenticated and user.is_active and user.is_staff:
            return True
        if self.token and authorization:
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credential.strip().encode(), self.token.encode()
            ):
                return True
        if self.allowed_networks and client_host and not forwarded:
            try:
                address = ipaddress.ip_address(client_host)
            except ValueError:
                return False
            return any(address in network for network in self.allowed_networks)
        return False
