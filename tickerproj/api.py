"""The HTTP API v1 (django-ninja): authentication, scopes, the error envelope, rate limits.

Mounted at ``/api/v1/`` (tickerproj/urls.py); the endpoints live with their domain
(``subscriptions/api.py``, ``streaming/api.py``) and are added here as routers. The OpenAPI
schema is generated from the code at ``/api/v1/openapi.json``, the interactive docs at
``/api/v1/docs``, both for logged-in users. docs/http-api.md describes every endpoint.

Who calls: a program with ``Authorization: Token <key>`` (its token's scopes decide what it
may do), or a browser with its session cookie and the CSRF token on writes (its Django
permissions decide). Every 4xx and 5xx is ``{"error": {"code", "message", "field"?,
"request_id"}}``.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, Throttled, ValidationError
from ninja.renderers import BaseRenderer
from ninja.security import APIKeyHeader, SessionAuth
from ninja.throttling import SimpleRateThrottle

from accounts.auth import apitoken_authenticate, key_from_authorization
from accounts.models import ApiToken

log = structlog.get_logger(__name__)


class ApiError(Exception):
    """A refusal with a stable ``code`` that the envelope carries to the client."""

    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = details or {}


def error_response(
    request: HttpRequest, *, status: int, code: str, message: str, field: str | None = None,
    details: dict[str, Any] | None = None,
) -> HttpResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    body.update(details or {})
    body["request_id"] = getattr(request, "request_id", None)
    return api.create_response(request, {"error": body}, status=status)


# --- authentication and scopes -----------------------------------------------------------------


class TokenAuth(APIKeyHeader):
    """``Authorization: Token <key>``, through the one ``apitoken_authenticate``."""

    param_name = "Authorization"

    def authenticate(self, request: HttpRequest, key: str | None) -> ApiToken | None:
        raw = key_from_authorization(key or "")
        if raw is None:
            return None
        token = apitoken_authenticate(key=raw)
        if token is None:
            raise ApiError(401, "invalid_token", "invalid or revoked API token")
        return token


class ActiveSessionAuth(SessionAuth):
    """The Django session of an active user; ninja checks the CSRF token on unsafe methods."""

    def authenticate(self, request: HttpRequest, key: str | None):
        user = request.user
        return user if user.is_authenticated and user.is_active else None


SESSION_PERMISSION_FOR_SCOPE = {
    ApiToken.Scope.READ: None,
    ApiToken.Scope.SUBSCRIBE: "subscriptions.change_subscription",
    ApiToken.Scope.TRADE: "accounts.trade",
}
"""What a browser session needs for what a token's scope allows: ``read`` only a login."""


def require_scope(request: HttpRequest, scope: str) -> None:
    """Refuse with 403, naming the scope, unless the caller may act in ``scope``."""
    principal = request.auth
    if isinstance(principal, ApiToken):
        if not principal.has_scope(scope):
            raise ApiError(403, "scope_required", f"this API token lacks the '{scope}' scope")
        return
    permission = SESSION_PERMISSION_FOR_SCOPE[scope]
    if permission is not None and not principal.has_perm(permission):
        raise ApiError(
            403, "permission_required", f"'{scope}' needs the '{permission}' permission"
        )


def require_staff_or_scope(request: HttpRequest, scope: str) -> None:
    """Operations data: staff sessions, or a token with ``scope``."""
    principal = request.auth
    if isinstance(principal, ApiToken):
        require_scope(request, scope)
    elif not principal.is_staff:
        raise ApiError(403, "staff_required", "staff only (or an API token with the 'read' scope)")


def caller_user(request: HttpRequest):
    principal = request.auth
    return principal.user if isinstance(principal, ApiToken) else principal


# --- rate limits -------------------------------------------------------------------------------


class CallerRateThrottle(SimpleRateThrottle):
    """Per token (or per session user) requests per period, in Django's cache."""

    scope = "caller"

    def get_cache_key(self, request: HttpRequest) -> str:
        principal = request.auth
        if isinstance(principal, ApiToken):
            ident = f"token:{principal.pk}"
        elif principal is not None:
            ident = f"user:{principal.pk}"
        else:
            ident = f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


class OrjsonRenderer(BaseRenderer):
    """JSON via orjson: NaN becomes null, which is what the API promises for unknown values."""

    media_type = "application/json"

    def render(self, request, data, *, response_status):
        return orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS)


def build_api() -> NinjaAPI:
    return NinjaAPI(
        title="tickerproj API",
        version="1.0.0",
        description="Instruments, subscriptions, history, bars and status. See docs/http-api.md.",
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


@api.exception_handler(Exception)
def _unexpected(request, exc: Exception):
    # Supervision boundary of one request: logged with its traceback, answered in the envelope.
    log.exception("api.unexpected_error", path=request.path)
    return error_response(request, status=500, code="internal_error", message="internal error")


def _add_routers() -> None:
    from streaming.api import router as streaming_router
    from subscriptions.api import router as subscriptions_router

    api.add_router("/", subscriptions_router)
    api.add_router("/", streaming_router)


_add_routers()
