"""The HTTP API v1 (django-ninja), assembled: routers, error handlers, schema and docs.

Mounted at ``/api/v1/`` (tickerproj/urls.py); the endpoints live with their domain
(``subscriptions/api.py``, ``streaming/api.py``) and share ``tickerproj/api_support.py``. The
OpenAPI schema is generated from the code at ``/api/v1/openapi.json``, the interactive docs
at ``/api/v1/docs``, both for logged-in users; docs/http-api.md describes every endpoint.
Every 4xx and 5xx is ``{"error": {"code", "message", "field"?, "request_id"}}``.
"""

import structlog
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import InterfaceError, OperationalError
from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, Throttled, ValidationError

from accounts.api import router as orders_router
from accounts.positions_api import router as positions_router
from accounts.postback import router as postback_router
from streaming.api import router as streaming_router
from subscriptions.api import router as subscriptions_router
from tickerproj.api_support import (
    ActiveSessionAuth,
    ApiError,
    CallerRateThrottle,
    OrjsonRenderer,
    TokenAuth,
    error_response,
)

log = structlog.get_logger(__name__)


def build_api() -> NinjaAPI:
    return NinjaAPI(
        title="tickerproj API",
        version="1.0.0",
        description="Instruments, subscriptions, history, bars, status and orders. See docs/http-api.md.",
        urls_namespace="api-v1",
        auth=[TokenAuth(), ActiveSessionAuth()],
        throttle=[CallerRateThrottle(settings.API_RATE_LIMIT)],
        renderer=OrjsonRenderer(),
        docs_decorator=login_required,
    )


api = build_api()


@api.exception_handler(ApiError)
def _api_error(request, exc: ApiError):
    return error_response(
        request, status=exc.status, code=exc.code, message=exc.message, field=exc.field,
        details=exc.details,
    )  # fmt: skip


@api.exception_handler(ValidationError)
def _validation_error(request, exc: ValidationError):
    first = exc.errors[0] if exc.errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path", "payload")]
    message = first.get("msg", "invalid request")
    if len(exc.errors) > 1:
        message = f"{message} (and {len(exc.errors) - 1} more)"
    return error_response(
        request, status=400, code="invalid_request", message=message, field=".".join(loc) or None
    )


@api.exception_handler(AuthenticationError)
def _unauthenticated(request, exc):
    response = error_response(
        request,
        status=401,
        code="unauthenticated",
        message="log in, or send 'Authorization: Token <key>'",
    )
    response["WWW-Authenticate"] = "Token"
    return response


@api.exception_handler(Throttled)
def _throttled(request, exc: Throttled):
    return error_response(
        request, status=429, code="rate_limited",
        message=f"too many requests; retry in {exc.wait or 1} s",
    )  # fmt: skip


@api.exception_handler(Http404)
def _not_found(request, exc):
    return error_response(request, status=404, code="not_found", message=str(exc) or "not found")


@api.exception_handler(HttpError)
def _http_error(request, exc: HttpError):
    code = {403: "forbidden", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(request, status=exc.status_code, code=code, message=str(exc))


@api.exception_handler(OperationalError)
@api.exception_handler(InterfaceError)
def _database_unavailable(request, exc: Exception):
    # The database is away (a restart, a failover, a dropped or timed-out connection): worth
    # retrying, and not a bug of ours, so a 503 with Retry-After rather than a 500.
    log.warning("api.database_unavailable", path=request.path, error=str(exc)[:200])
    response = error_response(
        request, status=503, code="unavailable", message="the database did not answer; retry shortly"
    )
    response["Retry-After"] = "2"
    return response


@api.exception_handler(Exception)
def _unexpected(request, exc: Exception):
    # Supervision boundary of one request: logged with its traceback, answered in the envelope.
    log.exception("api.unexpected_error", path=request.path)
    return error_response(request, status=500, code="internal_error", message="internal error")


api.add_router("/", subscriptions_router)
api.add_router("/", streaming_router)
api.add_router("/", orders_router)
api.add_router("/", postback_router)
api.add_router("/", positions_router)
