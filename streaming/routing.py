"""WebSocket routes: the v1 API, and a polite refusal for every other path."""

import time
from collections.abc import Callable

from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from streaming.consumers import (
    ConnectionCounter,
    ConsumerSettings,
    TickerConsumer,
    WebSocketMetrics,
)
from streaming.layer_watch import LayerRestartWatch, layer_marker_key

WS_PATH = "/ws/v1/"


def websocket_routes(
    *,
    config: ConsumerSettings,
    metrics: WebSocketMetrics,
    clock: Callable[[], float] = time.monotonic,
) -> list:
    """URL patterns for the WebSocket router; the consumer's collaborators are passed in."""
    connections = ConnectionCounter(
        per_user=config.max_connections_per_user, per_ip=config.max_connections_per_ip
    )
    layer_watch = LayerRestartWatch(
        redis_url=config.layer_redis_url, key=layer_marker_key(config.layer_prefix),
        check_s=config.layer_check_s,
    )
    consumer = TickerConsumer.as_asgi(
        config=config, metrics=metrics, connections=connections, layer_watch=layer_watch,
        clock=clock,
    )
    return [
        re_path(r"^ws/v1/?$", consumer),
        # Unknown paths are refused at the handshake instead of raising in the router.
        re_path(r"", WebsocketDenier.as_asgi()),
    ]
