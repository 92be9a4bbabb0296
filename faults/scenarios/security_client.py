"""HTTP and WebSocket clients of the security scenarios, each bound to a source address.

Every scenario connects from its own loopback address (127.0.0.0/8 is all loopback on Linux),
so the per-address limits it trips (WebSocket connects per minute, connections per address)
never spill onto the 50 acknowledging clients or onto another scenario.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

REQUEST_TIMEOUT_S = 20.0
WS_OPEN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    location: str
    body: bytes
    ms: float


class Http:
    """An aiohttp session from ``local_ip``: no redirects followed, no cookie jar."""

    def __init__(self, base_url: str, *, local_ip: str, limit: int = 32,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._base = base_url.rstrip("/")
        connector = aiohttp.TCPConnector(local_addr=(local_ip, 0), limit=limit, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )  # fmt: skip

    async def __aenter__(self) -> Http:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, json: Any = None,
        data: bytes | None = None,
    ) -> HttpAnswer:
        headers = dict(headers or {})
        if json is not None:
            data = orjson.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        started = time.monotonic()
        async with self._session.request(
            method, self._base + path, headers=headers, data=data, allow_redirects=False
        ) as response:
            body = await response.read()
        return HttpAnswer(
            status=response.status, location=response.headers.get("Location", ""), body=body,
            ms=(time.monotonic() - started) * 1000,
        )  # fmt: skip


@dataclass
class WsOutcome:
    """How a WebSocket attempt ended: refused at the handshake, or open then closed/alive."""

    handshake_status: int | None = None  # HTTP status of a refused upgrade
    messages: list[dict[str, Any]] | None = None
    close_code: int | None = None
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.handshake_status is None and not self.error

    def codes(self) -> list[str]:
        return [m.get("code", "") for m in self.messages or () if m.get("type") == "error"]


async def ws_open(
    url: str, *, local_ip: str, headers: dict[str, str] | None = None, origin: str | None = None,
    subprotocols: Iterable[str] = ("tickerproj.v1",), max_size: int | None = 4 * 2**20,
) -> ClientConnection | WsOutcome:
    """An open connection, or the outcome of a refused handshake."""
    try:
        return await connect(
            url, additional_headers=headers or {}, origin=origin, subprotocols=list(subprotocols),
            open_timeout=WS_OPEN_TIMEOUT_S, max_size=max_size, local_addr=(local_ip, 0),
            ping_interval=None, compression=None, proxy=None, max_queue=None,
        )  # fmt: skip
    except InvalidStatus as exc:
        return WsOutcome(handshake_status=exc.response.status_code)
    except (OSError, TimeoutError) as exc:
        return WsOutcome(error=f"{type(exc).__name__}: {exc}"[:200])


async def ws_recv(ws: ClientConnection, *, timeout_s: float) -> dict[str, Any] | None:
    """The next JSON message, or None when the socket closed or nothing came in time."""
    try:
        raw = await asyncio.wait_for(ws.recv(), timeout_s)
    except (ConnectionClosed, TimeoutError):
        return None
    return orjson.loads(raw)


async def ws_until(
    ws: ClientConnection, predicate, *, timeout_s: float
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Read until ``predicate(message)``; (that message or None, every message read)."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        msg = await ws_recv(ws, timeout_s=left)
        if msg is None:
            break
        seen.append(msg)
        if predicate(msg):
            return msg, seen
    return None, seen


async def ws_closed_code(ws: ClientConnection, *, timeout_s: float) -> int | None:
    """Wait for the server to close; its close code (None if still open at the deadline)."""
    try:
        await asyncio.wait_for(ws.wait_closed(), timeout_s)
    except TimeoutError:
        return None
    return ws.close_code


def address_inside(networks: list[str]) -> str | None:
    """A loopback address inside one of ``networks`` this host can connect from, if any."""
    import ipaddress

    loopback = ipaddress.ip_network("127.0.0.0/8")
    for value in networks:
        net = ipaddress.ip_network(value, strict=False)
        if net.version == 4 and net.overlaps(loopback):
            for host in (net.network_address + 1, net.network_address + 2):
                if host in loopback and host in net:
                    return str(host)
    return None


def public_listeners(pids: dict[str, int]) -> list[str]:
    """TCP listeners of these processes bound to a wildcard or non-loopback address."""
    import ipaddress
    import os

    found = []
    for name, pid in pids.items():
        inodes = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as rows:
                next(rows)
                for row in rows:
                    cols = row.split()
                    if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                        continue
                    hex_ip, hex_port = cols[1].split(":")
                    raw = bytes.fromhex(hex_ip)
                    # /proc prints each 32-bit word in host (little-endian) order.
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    address = ipaddress.ip_address(raw)
                    mapped = getattr(address, "ipv4_mapped", None) or address
                    if not mapped.is_loopback:
                        found.append(f"{name} {address}:{int(hex_port, 16)}")
    return found
