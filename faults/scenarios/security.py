"""Security scenarios of issue 15: access matrix, ops exposure, WebSocket origins, revocation,
WebSocket input abuse, history/API abuse and a canary secret swept across everything.

Each scenario connects from a loopback address of its own (security_client), so the limits
it trips per address stay its own. Helpers: security_identities (the eight callers),
security_policy (routes and the documented policy), security_matrix; the abuse and canary
scenarios are registered by security_abuse and security_canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
import urllib.request
from urllib.parse import urlsplit

from faults.registry import Outcome, Promise, scenario
from faults.scenarios.security_client import (
    Http,
    address_inside,
    public_listeners,
    ws_closed_code,
    ws_open,
    ws_recv,
)
from faults.scenarios.security_identities import Identity, identities_create
from faults.scenarios.security_matrix import (
    openapi_fetch,
    run_http_cells,
    run_ws_matrix,
    ws_cases,
)
from faults.scenarios.security_policy import (
    API_DOC,
    DjangoRules,
    admin_context,
    api_cells,
    asgi_cells,
    django_routes,
    is_admin_route,
    unknown_ws_actions,
)

MATRIX_IP = "127.0.0.21"
OPS_IP = "127.0.0.22"
ORIGINS_IP = "127.0.0.23"
REVOKE_IP = "127.0.0.24"

REVOKED_CLOSE_PROMISE_S = 1.0
"""docs/http-api.md: revoking a token closes its WebSockets "within a second"."""
REVOKE_ROUNDS = 5
REVOKE_WAIT_S = 30.0
"""How long a round waits for the close: past the promise, so a late close is measured."""


def allowed_origin(dep) -> str:
    """An Origin the deployment accepts: the first of WS_ALLOWED_ORIGINS, else its own."""
    listed = [o.strip() for o in dep.env.get("WS_ALLOWED_ORIGINS", "").split(",") if o.strip()]
    if listed:
        return listed[0]
    parts = urlsplit(dep.http_url)
    return f"{parts.scheme}://{parts.netloc}"


def _visible_accounts(identities: list[Identity], account_id: int) -> dict[str, bool]:
    """Per identity: may it see this account's orders and positions (a superuser, or granted)?"""
    from accounts.models import KiteAccount

    traders = set(KiteAccount.objects.get(pk=account_id).traders.values_list("pk", flat=True))
    return {i.name: i.kind != "anonymous" and not i.revoked and (i.is_superuser or i.user_id in traders)
            for i in identities}  # fmt: skip


def _ws_targets() -> tuple[int, dict, int]:
    """A real instrument, a real chain and a real account for the WebSocket cases."""
    from accounts.models import KiteAccount
    from subscriptions.models import Instrument

    option = Instrument.objects.filter(instrument_type=Instrument.Type.CALL).order_by("pk").first()
    instrument = option.pk if option else 256265
    chain = ({"underlying": option.name, "expiry": option.expiry.isoformat(), "strikes_around_atm": 2}
             if option else {"underlying": "NIFTY", "expiry": "2030-01-01"})
    return instrument, chain, KiteAccount.objects.order_by("pk").values_list("pk", flat=True).first()


def _matrix_outcome(started: float, identities, http, ws, unknown: list[str]) -> Outcome:
    wrong = [*http.wrong, *(ws.wrong if ws else [])]
    return Outcome(
        figures={
            "identities": len(identities), "http_cells": http.cells, "ws_cells": ws.cells if ws else 0,
            "wrong": len(wrong), "http_5xx": len(http.server_errors), "unknown_routes": len(unknown),
            "s": round(time.monotonic() - started, 1),
        },
        promises=[
            Promise("cells wrong = 0", held=not wrong, detail="; ".join(wrong[:5]) or "0"),
            Promise("5xx = 0", held=not http.server_errors,
                    detail="; ".join(http.server_errors[:5]) or "0"),
            Promise("every route and action has a policy", held=not unknown,
                    detail=", ".join(unknown[:10]) or "all known"),
        ],
    )  # fmt: skip


@scenario("security.access_matrix", group="security", quick=True)
def access_matrix(dep) -> Outcome:
    """Every API operation (OpenAPI schema), page, health route, /metrics and WebSocket action
    against 8 identities, each cell compared with the documented policy; unknown routes fail."""
    started = time.monotonic()
    identities = identities_create(tag=secrets.token_hex(3))
    superuser = next(i for i in identities if i.is_superuser)
    schema = openapi_fetch(dep.http_url, superuser, local_ip=MATRIX_IP)
    api, unknown_api = api_cells(schema, identities, API_DOC.read_text())
    routes = [r for r in django_routes() if not is_admin_route(r)]
    pages, unknown_routes = DjangoRules(admin_context(identities)).expand_all(routes, identities)
    instrument, chain, account_id = _ws_targets()
    visible = _visible_accounts(identities, account_id)

    http = asyncio.run(run_http_cells(dep.http_url, [*api, *pages, *asgi_cells(identities)],
                                      identities, local_ip=MATRIX_IP))
    ws = asyncio.run(run_ws_matrix(
        dep.ws_url, identities, ws_cases(instrument=instrument, chain=chain, account_id=account_id),
        origin=allowed_origin(dep), visible_accounts=visible, local_ip=MATRIX_IP,
    ))  # fmt: skip
    unknown_ws = unknown_ws_actions({c.action for c in ws_cases(instrument=0, chain={}, account_id=0)})
    return _matrix_outcome(started, identities, http, ws, [*unknown_api, *unknown_routes, *unknown_ws])


@scenario("security.admin_matrix", group="security")
def admin_matrix(dep) -> Outcome:
    """Every admin route of the URL resolver (each model's views, custom views, the site's
    own) against the same 8 identities: staff only, view-only staff never writes."""
    started = time.monotonic()
    identities = identities_create(tag=secrets.token_hex(3))
    routes = [r for r in django_routes() if is_admin_route(r)]
    cells, unknown = DjangoRules(admin_context(identities)).expand_all(routes, identities)
    http = asyncio.run(run_http_cells(dep.http_url, cells, identities, local_ip=MATRIX_IP))
    return _matrix_outcome(started, identities, http, None, unknown)


# --- /metrics and /health exposure ---------------------------------------------------------

PROXIED_NETWORK = "10.0.0.0/8"
PROXIED_START_TIMEOUT_S = 180.0


@contextlib.contextmanager
def _proxied_daphne(dep):
    """A second daphne as it runs behind a reverse proxy (``--proxy-headers``), with
    ``OPS_ALLOWED_NETWORKS`` set; stopped on exit. Its log sits beside the others."""
    from faults.deployment import Proc

    port = dep.ports.take()
    env = {**dep.env, "OPS_ALLOWED_NETWORKS": PROXIED_NETWORK}
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{base_url}/health/live", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    proc = Proc("daphne-proxied", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                   "--proxy-headers", "tickerproj.asgi:application"],
                env=env, cwd=dep.run_dir / "work", log_path=dep.logs_dir / "daphne-proxied.log",
                ready=ready)  # fmt: skip
    try:
        proc.start(timeout_s=PROXIED_START_TIMEOUT_S)
        yield base_url
    finally:
        proc.stop()


def _is_detailed(body: bytes) -> bool:
    import orjson

    try:
        return "engines" in orjson.loads(body)
    except orjson.JSONDecodeError:
        return False


@scenario("security.ops_exposure", group="security")
def ops_exposure(dep) -> Outcome:
    """Only explicit ops access opens /metrics and /health's details; loopback and forwarded
    headers never do (docs/security.md, M1), and the engines' metrics ports stay private."""
    ops_token = dep.env.get("OPS_TOKEN", "")
    networks = [n.strip() for n in dep.env.get("OPS_ALLOWED_NETWORKS", "").split(",") if n.strip()]
    inside = address_inside(networks)
    forged = {"X-Forwarded-For": inside or "10.0.0.1", "X-Real-IP": inside or "10.0.0.1",
              "Forwarded": f"for={inside or '10.0.0.1'}"}  # fmt: skip
    cases: list[tuple[str, str, dict[str, str], bool]] = [
        ("loopback, no credential", OPS_IP, {}, False),
        ("forwarded-for an allowed address", OPS_IP, forged, False),
        ("a wrong bearer token", OPS_IP, {"Authorization": "Bearer " + "x" * 40}, False),
        ("an API-token header", OPS_IP, {"Authorization": "Token " + "x" * 43}, False),
    ]
    if ops_token:
        cases.append(("the OPS_TOKEN bearer", OPS_IP, {"Authorization": f"Bearer {ops_token}"}, True))
        cases.append(("the OPS_TOKEN in lower case scheme", OPS_IP, {"Authorization": f"bearer {ops_token}"}, True))
        cases.append(("a prefix of OPS_TOKEN", OPS_IP, {"Authorization": f"Bearer {ops_token[:-1]}"}, False))
    if inside:
        cases.append(("a peer inside OPS_ALLOWED_NETWORKS", inside, {}, True))

    async def probe(base_url: str, cases) -> list[str]:
        wrong = []
        for label, ip, headers, open_expected in cases:
            async with Http(base_url, local_ip=ip) as http:
                metrics = await http.request("GET", "/metrics", headers=headers)
                health = await http.request("GET", "/health", headers=headers)
            metrics_open = metrics.status == 200
            health_open = _is_detailed(health.body)
            if metrics_open != open_expected or health_open != open_expected or health.status not in (200, 503):
                wrong.append(f"{label}: /metrics {metrics.status}, /health details {health_open} "
                             f"(expected {'open' if open_expected else 'closed'})")
        return wrong

    wrong = asyncio.run(probe(dep.http_url, cases))
    # Behind a proxy, as docs/security.md asks: daphne --proxy-headers with an allowed network.
    proxied_cases = [
        (f"--proxy-headers, {PROXIED_NETWORK} allowed, forged forwarding headers", OPS_IP,
         {"X-Forwarded-For": "10.0.0.1", "X-Real-IP": "10.0.0.1", "Forwarded": "for=10.0.0.1"}, False),
        ("--proxy-headers, forged X-Forwarded-For alone", OPS_IP, {"X-Forwarded-For": "10.0.0.1"}, False),
        ("--proxy-headers, no credential", OPS_IP, {}, False),
    ]
    if ops_token:
        proxied_cases.append(("--proxy-headers, the OPS_TOKEN bearer", OPS_IP,
                              {"Authorization": f"Bearer {ops_token}", "X-Forwarded-For": "203.0.113.9"}, True))
    with _proxied_daphne(dep) as base_url:
        wrong += asyncio.run(probe(base_url, proxied_cases))
    cases += proxied_cases
    public_ports = public_listeners(
        {name: proc.pid for name, proc in dep.procs.items() if name.startswith("runticker")}
    )
    return Outcome(
        figures={"cases": len(cases), "wrong": len(wrong), "engine_ports_public": len(public_ports),
                 "ops_token": bool(ops_token), "allowed_networks": len(networks)},
        promises=[
            Promise("explicit ops access only", held=not wrong, detail="; ".join(wrong) or "0 wrong"),
            Promise("engine metrics ports on private addresses", held=not public_ports,
                    detail=", ".join(public_ports) or "none public"),
        ],
    )  # fmt: skip


# --- WebSocket origins ---------------------------------------------------------------------


@scenario("security.ws_origins", group="security")
def ws_origins(dep) -> Outcome:
    """Cross-site WebSocket hijacking: a session socket from any Origin but an allowed one is
    refused at the handshake; a token socket may omit the Origin but not send a foreign one."""
    identities = identities_create(tag=secrets.token_hex(3))
    session = next(i for i in identities if i.name == "staff")
    token = next(i for i in identities if i.name == "token-read")
    allowed = allowed_origin(dep)
    parts = urlsplit(allowed)
    other_port = f"{parts.scheme}://{parts.hostname}:{(parts.port or 80) + 1}"
    other_scheme = f"{'https' if parts.scheme == 'http' else 'http'}://{parts.netloc}"
    exact_only = bool(dep.env.get("WS_ALLOWED_ORIGINS") or dep.env.get("CSRF_TRUSTED_ORIGINS"))
    cases = [
        ("session, allowed origin", session, allowed, True),
        ("session, foreign site", session, "https://evil.example", False),
        ("session, no origin", session, None, False),
        ("session, origin 'null'", session, "null", False),
        ("session, allowed host on another port", session, other_port, not exact_only),
        ("session, allowed host over another scheme", session, other_scheme, not exact_only),
        ("session, a suffix of the host", session, f"{parts.scheme}://{parts.hostname}.evil.example", False),
        ("token, no origin", token, None, True),
        ("token, allowed origin", token, allowed, True),
        ("token, foreign site", token, "https://evil.example", False),
    ]

    async def run() -> list[str]:
        wrong = []
        for label, ident, origin, accept in cases:
            opened = await ws_open(dep.ws_url, local_ip=ORIGINS_IP, headers=ident.headers(csrf=False),
                                   origin=origin)
            if hasattr(opened, "send"):
                first = await ws_recv(opened, timeout_s=10)
                got = first is not None and first.get("type") == "hello"
                await opened.close()
            else:
                got = False
            if got != accept:
                wrong.append(f"{label}: {'accepted' if got else 'refused'}")
        return wrong

    wrong = asyncio.run(run())
    return Outcome(
        figures={"cases": len(cases), "wrong": len(wrong), "exact_origins": exact_only},
        promises=[Promise("origin checks hold", held=not wrong, detail="; ".join(wrong) or "0 wrong")],
    )


# --- revocation ----------------------------------------------------------------------------


@scenario("security.revoked_socket_close", group="security")
def revoked_socket_close(dep) -> Outcome:
    """Seconds from a token's revocation (committed) until its open socket is closed 4401."""
    from django.contrib.auth import get_user_model

    from accounts.models import ApiToken
    from accounts.services import apitoken_create, apitoken_revoke

    user = get_user_model().objects.create_user(username=f"sec-revoke-{secrets.token_hex(3)}")
    times: list[float] = []
    codes: list[int | None] = []
    for _ in range(REVOKE_ROUNDS):
        token, key = apitoken_create(user=user, name="revocation", scopes=["read"])

        async def connect_and_wait(key: str):
            ws = await ws_open(dep.ws_url, local_ip=REVOKE_IP, headers={"Authorization": f"Token {key}"})
            if not hasattr(ws, "send"):
                return ws, None
            hello = await ws_recv(ws, timeout_s=10)
            return ws, hello

        loop = asyncio.new_event_loop()
        try:
            ws, hello = loop.run_until_complete(connect_and_wait(key))
            if not hasattr(ws, "send") or not hello or hello.get("type") != "hello":
                codes.append(None)
                continue
            revoked_at = time.monotonic()
            apitoken_revoke(token=ApiToken.objects.get(pk=token.pk))
            code = loop.run_until_complete(ws_closed_code(ws, timeout_s=REVOKE_WAIT_S))
            times.append(time.monotonic() - revoked_at)
            codes.append(code)
        finally:
            loop.close()
    worst = max(times) if times else None
    # The revocation reaches daphne through its channel-layer inbox, behind the streaming
    # traffic: the fleet's snapshot lag over the same seconds says how far behind it was.
    fleet_lag_p99_s = dep.clients.stats().get("lag_p99_s") if dep.clients is not None else None
    held = len(times) == REVOKE_ROUNDS and all(c == 4401 for c in codes) and worst <= REVOKED_CLOSE_PROMISE_S
    return Outcome(
        figures={"rounds": REVOKE_ROUNDS, "close_s_max": round(worst, 3) if worst is not None else None,
                 "close_s_median": round(sorted(times)[len(times) // 2], 3) if times else None,
                 "close_codes": sorted({str(c) for c in codes}), "fleet_lag_p99_s": fleet_lag_p99_s},
        promises=[Promise(f"revoked token's socket closed 4401 within {REVOKED_CLOSE_PROMISE_S} s",
                          held=held, detail=f"max {worst} s, codes {codes}")],
    )  # fmt: skip

