"""Who may see the service's internals (/metrics, /health details): staff, or this machine."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

#: A request carrying any of these came through a reverse proxy, so its peer address being
#: loopback says nothing about where the client is.
PROXY_HEADERS = frozenset({"x-forwarded-for", "x-real-ip", "forwarded"})


def is_staff_or_direct_loopback(
    *, user: Any, client_host: str | None, header_names: Iterable[str]
) -> bool:
    """True for an active staff user, or a client on this machine not behind a reverse proxy.

    ``header_names`` are the request's header names in any case (ASGI or Django spelling).
    """
    if user is not None and user.is_authenticated and user.is_active and user.is_staff:
        return True
    if not client_host or any(name.lower() in PROXY_HEADERS for name in header_names):
        return False
    try:
        return ipaddress.ip_address(client_host).is_loopback
    except ValueError:
        return False
