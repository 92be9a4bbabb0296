"""What every endpoint of the HTTP API v1 shares: authentication, scopes, errors, rate limits.

Who calls: a program with ``Authorization: Token <key>`` (its token's scopes decide what it
may do), or a browser with its session cookie and the CSRF token on writes (its Django
permissions decide). Endpoint modules import from here; ``tickerproj/api.py`` assembles them.
"""

from __future__ import annotations

from typing import Any

import orjson
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse
from ninja.pagination import CursorPagination
from ninja.renderers import BaseRenderer
from ninja.security import APIKeyHeader, SessionAuth
from ninja.throttling import SimpleRateThrottle

from accounts.auth import apitoken_authenticate, key_from_authorization
from accounts.models import ApiToken


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
    return HttpResponse(
        orjson.dumps({"error": body}), status=status, content_type="application/json"
    )


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




API_PREFIX = "/api/v1/"


class ApiEnvelopeMiddleware:
    """Wraps the API's errors that ninja's handlers never see in the envelope.

    Django's URL resolver (a path no route matches: 404) and ninja's method dispatch (405)
    answer before any API code runs; under ``/api/v1/`` their plain-text answers become
    envelopes too, so a client parses one shape for every error.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        return self._wrap(request, self.get_response(request))

    async def _acall(self, request):
        return self._wrap(request, await self.get_response(request))

    @staticmethod
    def _wrap(request, response):
        if (
            not request.path.startswith(API_PREFIX)
            or response.status_code < 400
            or response.get("Content-Type", "").split(";")[0] == "application/json"
        ):
            return response
        code = {404: "not_found", 405: "method_not_allowed"}.get(response.status_code, "http_error")
        envelope = error_response(
            request, status=response.status_code, code=code,
            message=f"{request.method} {request.path}: {response.reason_phrase.lower()}",
        )  # fmt: skip
        if response.has_header("Allow"):
            envelope["Allow"] = response["Allow"]
        return envelope


class RowCursorPagination(CursorPagination):
    """Ninja's cursor pagination over ``.values()`` rows (dicts) as well as model objects.

    Lists serialise plain rows into plain pydantic models: several times faster than model
    instances through ninja's attribute getter, for pages of hundreds.
    """

    def _get_position(self, item: Any) -> str:
        if isinstance(item, dict):
            return str(item[self._order_attribute])
        return super()._get_position(item)
