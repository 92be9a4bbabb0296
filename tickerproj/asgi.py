"""ASGI entry point: HTTP to Django, WebSockets to Channels consumers.

``application`` is what ``daphne tickerproj.asgi:application`` serves. WebSockets at
``/ws/v1/`` go through API-token or session authentication (streaming/ws_auth.py; session
connections behind AllowedHostsOriginValidator) to streaming.consumers.TickerConsumer.
``/metrics`` serves this process's Prometheus metrics to staff users, to the bearer token
``OPS_TOKEN`` and to peers in ``OPS_ALLOWED_NETWORKS`` (tickerproj/access.py). The demo (``manage.py demo``) builds its own application with
:func:`build_application` so that the engine's metrics are served alongside.
"""

import os
import time
from collections.abc import Callable, Iterable

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tickerproj.settings")
# Django is set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.db import database_sync_to_async  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from prometheus_client import REGISTRY, CollectorRegistry  # noqa: E402
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest  # noqa: E402

from streaming.consumers import ConsumerSettings, WebSocketMetrics  # noqa: E402
from streaming.health import HealthCollector, RedisProbe  # noqa: E402
from streaming.origins import OriginAllowList  # noqa: E402
from streaming.routing import websocket_routes  # noqa: E402
from streaming.views import HealthViews  # noqa: E402
from streaming.ws_auth import ApiTokenOrSessionAuth  # noqa: E402
from tickerproj.access import OpsAccess, carries_forwarding  # noqa: E402

METRICS_PATH = "/metrics"


class MetricsEndpoint:
    """ASGI app serving Prometheus text for the given registries, to explicit ops access only."""

    def __init__(self, registries: Iterable[CollectorRegistry], *, access: OpsAccess) -> None:
        self._registries = tuple(registries)
        self._access = access

    async def __call__(self, scope, receive, send) -> None:
        client = scope.get("client")
        authorization = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"),
            None,
        )
        allowed = self._access.allows(
            user=scope.get("user"),
            client_host=client[0] if client else None,
            authorization=authorization,
            forwarded=carries_forwarding(k.decode("latin-1") for k, _ in scope.get("headers", ())),
        )
        if not allowed:
            await _respond(send, 403, b"text/plain", b"staff session, OPS_TOKEN or OPS_ALLOWED_NETWORKS only\n")
            return
        # A thread: collectors may query the database (the health gauges).
        body = await database_sync_to_async(self._render)()
        await _respond(send, 200, CONTENT_TYPE_LATEST.encode(), body)


    def _render(self) -> bytes:
        return b"".join(generate_latest(r) for r in self._registries)


async def _respond(send, status: int, content_type: bytes, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"cache-control", b"no-store")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _HttpRouter:
    """``/metrics`` to the metrics endpoint (with session auth), everything else to Django."""

    def __init__(self, django_app, metrics_app) -> None:
        self._django = django_app
        self._metrics = AuthMiddlewareStack(metrics_app)

    async def __call__(self, scope, receive, send):
        if scope["path"].rstrip("/") == METRICS_PATH:
            return await self._metrics(scope, receive, send)
        return await self._django(scope, receive, send)


def build_application(
    *,
    metrics: WebSocketMetrics,
    config: ConsumerSettings | None = None,
    extra_registries: Iterable[CollectorRegistry] = (),
    clock: Callable[[], float] = time.monotonic,
    ops_access: OpsAccess | None = None,
) -> ProtocolTypeRouter:
    """The whole ASGI application; settings are read here, once, unless ``config`` is given.

    ``clock`` is the consumers' rate-limit clock (monotonic seconds).
    """
    config = config or ConsumerSettings.from_settings(settings)
    ops_access = ops_access or OpsAccess.from_settings(settings)
    # The default registry carries the process collectors (RSS, CPU, open fds) and
    # django-prometheus's HTTP and database metrics; the health registry the /health gauges.
    health_registry = CollectorRegistry()
    health_registry.register(HealthCollector(HealthViews(redis_probe=RedisProbe()).business_report))
    registries = [REGISTRY, health_registry, metrics.registry, *extra_registries]
    return ProtocolTypeRouter(
        {
            "http": _HttpRouter(django_asgi_app, MetricsEndpoint(registries, access=ops_access)),
            "websocket": OriginAllowList(
                ApiTokenOrSessionAuth(
                    URLRouter(websocket_routes(config=config, metrics=metrics, clock=clock))
                ),
                allowed=settings.WS_ALLOWED_ORIGINS,
            ),
        }
    )


application = build_application(metrics=WebSocketMetrics(CollectorRegistry()))
