"""The access matrix: every HTTP route and WebSocket action against the eight identities.

The cells come from security_policy (routes from the code, verdicts from the documented
policy); this module makes the requests, compares, and counts what was wrong and any 5xx.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.exceptions import ConnectionClosed

from faults.scenarios.security_client import Http, ws_open, ws_recv, ws_until
from faults.scenarios.security_identities import Identity
from faults.scenarios.security_policy import ALLOW, DENY, Cell, verdict

WS_REPLY_TIMEOUT_S = 10.0
WS_SEND_GAP_S = 0.08
"""Below the 20 messages a second a connection may send: the matrix tests access, not rates."""
HEALTH_PATHS = frozenset({"/health", "/health/ready"})
"""Their 503 is a documented answer (not ready, or degraded), not a server error."""
DENIED_WS_CODES = frozenset({"unauthorized", "unknown_account", "account_not_visible"})


@dataclass
class MatrixResult:
    cells: int = 0
    wrong: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)


async def run_http_cells(
    base_url: str, cells: list[Cell], identities: list[Identity], *, local_ip: str
) -> MatrixResult:
    """Each identity's cells in order, the identities side by side."""
    by_name = {i.name: i for i in identities}
    queues: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        queues[cell.identity].append(cell)
    result = MatrixResult()
    async with Http(base_url, local_ip=local_ip) as http:
        async def one_identity(name: str, own: list[Cell]) -> None:
            ident = by_name[name]
            for cell in own:
                headers = {**ident.headers(csrf=cell.csrf), **cell.headers}
                answer = await http.request(cell.method, cell.path, headers=headers, json=cell.body)
                result.cells += 1
                where = f"{cell.identity} {cell.method} {cell.path} [{cell.route}]"
                if answer.status >= 500 and not (answer.status == 503 and cell.path in HEALTH_PATHS):
                    result.server_errors.append(f"{where}: {answer.status}")
                    continue
                seen = verdict(cell, answer.status, answer.location, answer.body)
                if seen != cell.expected:
                    result.wrong.append(f"{where}: expected {cell.expected}, got {seen} "
                                        f"({answer.status} {urlsplit(answer.location).path})")

        await asyncio.gather(*(one_identity(n, own) for n, own in queues.items()))
    return result


def openapi_fetch(base_url: str, superuser: Identity, *, local_ip: str) -> dict[str, Any]:
    """The schema daphne serves (what is deployed, not what this process would build)."""
    async def fetch() -> dict[str, Any]:
        async with Http(base_url, local_ip=local_ip) as http:
            answer = await http.request("GET", "/api/v1/openapi.json", headers=superuser.headers())
        if answer.status != 200:
            raise RuntimeError(f"/api/v1/openapi.json as the superuser answered {answer.status}")
        return orjson.loads(answer.body)

    return asyncio.run(fetch())


# --- WebSocket ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WsCase:
    action: str
    label: str
    message: dict[str, Any]
    account_scoped: bool = False  # visible only to superusers and the account's traders


def ws_cases(*, instrument: int, chain: dict[str, Any], account_id: int) -> list[WsCase]:
    return [
        WsCase("subscribe", "instruments", {"action": "subscribe", "id": "s1", "instruments": [instrument]}),
        WsCase("subscribe", "chain", {"action": "subscribe", "id": "s2", "chain": chain}),
        WsCase("subscribe", "bars", {"action": "subscribe", "id": "s3", "bars": ["NIFTY"]}),
        WsCase("subscribe", "orders all", {"action": "subscribe", "id": "s4", "orders": True}),
        WsCase("subscribe", "orders of an account", {"action": "subscribe", "id": "s5",
                                                     "orders": [account_id]}, account_scoped=True),
        WsCase("ack", "ack", {"action": "ack", "seq": 0}),
        WsCase("ping", "ping", {"action": "ping", "id": "p1"}),
        WsCase("positions", "positions", {"action": "positions", "id": "q1"}),
        WsCase("positions", "positions of an account", {"action": "positions", "id": "q2",
                                                        "account_id": account_id}, account_scoped=True),
        WsCase("positions", "positions off", {"action": "positions", "id": "q3", "enabled": False}),
        WsCase("unsubscribe", "unsubscribe all", {"action": "unsubscribe", "id": "u1", "all": True}),
    ]


def ws_may_connect(ident: Identity) -> bool:
    return ident.has_scope("read") or ident.kind == "session"


async def _ws_case(ws, case: WsCase) -> str:
    """ALLOW when the server answered the request, DENY when it refused it or the socket."""
    request_id = case.message.get("id")
    try:
        await ws.send(orjson.dumps(case.message).decode())
        if request_id is None:  # an ack has no reply: a ping behind it shows it was taken
            await asyncio.sleep(WS_SEND_GAP_S)
            request_id = f"fence-{case.label}"
            await ws.send(orjson.dumps({"action": "ping", "id": request_id}).decode())
    except ConnectionClosed:
        return DENY
    reply, seen = await ws_until(
        ws, lambda m: m.get("id") == request_id and m.get("type") not in ("snapshots",),
        timeout_s=WS_REPLY_TIMEOUT_S,
    )
    if reply is None:
        return DENY if any(m.get("code") in DENIED_WS_CODES for m in seen) or ws.close_code else "no answer"
    if reply.get("type") == "error" and reply.get("code") in DENIED_WS_CODES:
        return DENY
    if case.message["action"] == "ack" and any(m.get("type") == "error" for m in seen):
        return f"error {[m.get('code') for m in seen if m.get('type') == 'error']}"
    return ALLOW


async def run_ws_matrix(
    ws_url: str, identities: list[Identity], cases: list[WsCase], *, origin: str,
    visible_accounts: dict[str, bool], local_ip: str,
) -> MatrixResult:
    """Connect as each identity, then try every case; compare with the policy."""
    result = MatrixResult()

    async def one(ident: Identity) -> None:
        headers = ident.headers(csrf=False)
        opened = await ws_open(ws_url, local_ip=local_ip, headers=headers,
                               origin=origin if ident.kind == "session" else None)
        expected_connect = ALLOW if ws_may_connect(ident) else DENY
        if not hasattr(opened, "send"):
            seen = DENY if opened.handshake_status in (401, 403) else f"handshake {opened.handshake_status} {opened.error}"
            ws = None
        else:
            ws = opened
            first = await ws_recv(ws, timeout_s=WS_REPLY_TIMEOUT_S)
            if first is not None and first.get("type") == "hello":
                seen = ALLOW
            elif first is not None and first.get("code") == "unauthorized":
                code = await _closed(ws)
                seen = DENY if code == 4401 else f"unauthorized then close {code}"
            else:
                seen = f"first message {str(first)[:80]}"
        result.cells += 1
        if seen != expected_connect:
            result.wrong.append(f"{ident.name} ws connect: expected {expected_connect}, got {seen}")
        for case in cases:
            expected = expected_connect
            if expected == ALLOW and case.account_scoped and not visible_accounts[ident.name]:
                expected = DENY
            observed = DENY if ws is None or seen != ALLOW else await _ws_case(ws, case)
            await asyncio.sleep(WS_SEND_GAP_S)
            result.cells += 1
            if observed != expected:
                result.wrong.append(f"{ident.name} ws {case.label}: expected {expected}, got {observed}")
        if ws is not None:
            await ws.close()

    await asyncio.gather(*(one(i) for i in identities))
    return result


async def _closed(ws) -> int | None:
    try:
        await asyncio.wait_for(ws.wait_closed(), WS_REPLY_TIMEOUT_S)
    except TimeoutError:
        return None
    return ws.close_code
