"""A Prometheus endpoint for processes that are not the web tier, behind the same ops access.

prometheus-client's own ``start_http_server`` serves anyone who reaches the port; this wraps
its WSGI app in :class:`~tickerproj.access.OpsAccess` so that a remote Prometheus scrapes with
the bearer token (or from an allow-listed address) and nobody else reads the metrics.
"""

from __future__ import annotations

import os
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector

from tickerproj.access import OpsAccess, carries_forwarding


class _QuietHandler(WSGIRequestHandler):
    """Scrapes every 15 s are not worth a log line each."""

    def log_message(self, format, *args):
        return


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What to serve: ``registry``, or every process's values in multiprocess mode.

    Celery's prefork children each count their own tasks; with PROMETHEUS_MULTIPROC_DIR set
    they write to files there and the serving process adds them up.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return registry
    merged = CollectorRegistry()
    MultiProcessCollector(merged)
    return merged


def serve_metrics(
    *, registry: CollectorRegistry, access: OpsAccess, port: int, addr: str
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` in a daemon thread; 403 without ops access."""
    metrics_app = make_wsgi_app(scrape_registry(registry))

    def app(environ, start_response):
        allowed = access.allows(
            user=None,
            client_host=environ.get("REMOTE_ADDR"),
            authorization=environ.get("HTTP_AUTHORIZATION"),
            forwarded=carries_forwarding(
                key[5:].replace("_", "-") for key in environ if key.startswith("HTTP_")
            ),
        )
        if not allowed:
            start_response("403 Forbidden", [("Content-Type", "text/plain")])
            return [b"OPS_TOKEN or OPS_ALLOWED_NETWORKS only\n"]
        return metrics_app(environ, start_response)

    server = make_server(addr, port, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    return server, thread
