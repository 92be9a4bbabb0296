"""Every HTTP route and WebSocket action of the deployment, and who the policy says may use it.

Routes come from the code, never from a list of ours: Django's URL resolver (the admin, the
pages, health), the API's OpenAPI schema (served by daphne), the ASGI-level ``/metrics`` and
``/ws/v1/``, and the WebSocket protocol's ``KNOWN_ACTIONS``. Each route must match a rule
below; one that matches none is *unknown* and fails the scenario, so a new route is never
left out of the matrix silently.

The expected answers come from the documented policy:
- the API's scopes from the endpoint table of docs/http-api.md (its ``scope`` column), with
  the session permissions of ``tickerproj/api_support.py`` (docs/http-api.md, "Authentication");
- the admin: staff only; what each ModelAdmin's own permission methods allow, but view-only
  staff never adds, changes or deletes anything, and custom views need the model's change
  permission (docs/security.md, M2);
- the pages: a login; the Kite login views: staff with ``accounts.change_kiteaccount``;
- ``/metrics`` and the details of ``/health``: active staff sessions (ops credentials are
  another scenario's business), never a token (docs/security.md, M1);
- WebSockets: a token with ``read`` or an active session; orders and positions of an account
  only for a superuser or a user it is granted to (docs/websocket-protocol.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faults.scenarios.security_identities import Identity

ALLOW, DENY = "allow", "deny"
LOGIN_PATHS = frozenset({"/accounts/login/", "/admin/login/"})
MISSING_ID = 999_999_999
"""An id no row has: writes through the API reach their permission check and then a 404."""
DENIED_API_CODES = frozenset({
    "unauthenticated", "invalid_token", "scope_required", "permission_required", "staff_required",
    "forbidden",
})  # fmt: skip
"""Envelope codes that mean "not for you"; any other answer got past the gate."""
API_DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"


@dataclass(frozen=True)
class Cell:
    """One request to make and the verdict the policy expects for one identity."""

    identity: str
    route: str  # the route's template or name, as reported
    method: str
    path: str
    expected: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    csrf: bool = True
    classify: str = "http"  # "http" | "api" | "health_details"


# --- the documented API policy -----------------------------------------------------------------


def api_scopes_from_docs(text: str) -> dict[tuple[str, str], str]:
    """``(METHOD, /api/v1/path)`` -> the scope column of docs/http-api.md's endpoint table."""
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE)` \| `(/api/v1/[^`]+)` \| ([^|]+) \|", text, re.M)
    return {(method, path): scope.strip() for method, path, scope in rows}


SESSION_PERMISSION_FOR_SCOPE = {
    "read": None,
    "subscribe": "subscriptions.change_subscription",
    "trade": "accounts.trade",
}


def api_expected(ident: Identity, scope_text: str) -> str | None:
    """The documented verdict of an API call with ``scope_text``; None for an unknown scope."""
    if scope_text.startswith("none"):
        return ALLOW
    if scope_text == "read or staff":
        if ident.kind == "token":
            return ALLOW if ident.has_scope("read") else DENY
        return ALLOW if ident.kind == "session" and ident.is_staff else DENY
    if scope_text not in SESSION_PERMISSION_FOR_SCOPE:
        return None
    if ident.kind == "token":
        return ALLOW if ident.has_scope(scope_text) else DENY
    if ident.kind == "session":
        perm = SESSION_PERMISSION_FOR_SCOPE[scope_text]
        return ALLOW if perm is None or ident.has_perm(perm) else DENY
    return DENY


API_QUERY_VALUES = {
    "instrument_token": str(MISSING_ID),
    "from": "2026-01-05T09:15:00+05:30",
    "to": "2026-01-05T10:15:00+05:30",
    "expiry": "2030-01-01",
}
"""Values for the required query parameters (valid, so the scope check is what answers)."""
API_PATH_VALUES = {"instrument_token": str(MISSING_ID), "order_id": str(MISSING_ID),
                   "account_id": str(MISSING_ID), "name": "NOPE"}
API_BODIES = {
    ("POST", "/api/v1/subscriptions"): {"instrument_token": MISSING_ID},
    ("POST", "/api/v1/subscriptions/bulk"): {"items": [{"instrument_token": MISSING_ID}]},
    ("POST", "/api/v1/subscriptions/chain"): {"underlying": "NOPE", "expiries": ["2030-01-01"]},
    ("PATCH", "/api/v1/subscriptions/{instrument_token}"): {"mode": "ltp"},
    ("POST", "/api/v1/orders"): {
        "account_id": MISSING_ID, "exchange": "NFO", "tradingsymbol": "NOPE26JAN1CE",
        "transaction_type": "BUY", "order_type": "LIMIT", "quantity": 1, "product": "NRML",
        "price": 1.0,
    },
    ("PATCH", "/api/v1/orders/{order_id}"): {"quantity": 1},
    ("POST", "/api/v1/kite/postback"): {},
}
"""Valid bodies naming nothing that exists: a write reaches its permission check and then
finds nothing, so the matrix never changes the deployment's data."""
API_EXTRA_HEADERS = {("POST", "/api/v1/orders"): {"Idempotency-Key": "security-matrix"}}


def api_cells(
    schema: dict[str, Any], identities: list[Identity], doc_text: str
) -> tuple[list[Cell], list[str]]:
    """The API's cells from its OpenAPI schema, and the operations no rule covers."""
    documented = api_scopes_from_docs(doc_text)
    cells: list[Cell] = []
    unknown: list[str] = []
    for path, item in sorted(schema.get("paths", {}).items()):
        for method, operation in sorted(item.items()):
            method = method.upper()
            if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                continue
            key = (method, path)
            concrete = _fill_api_path(path)
            query = _api_query(operation)
            needs_body = "requestBody" in operation and operation["requestBody"].get("required", True)
            if key not in documented or concrete is None or query is None or (
                needs_body and key not in API_BODIES
            ):
                unknown.append(f"{method} {path}")
                continue
            target = concrete + (f"?{query}" if query else "")
            for ident in identities:
                expected = api_expected(ident, documented[key])
                if expected is None:
                    unknown.append(f"{method} {path} (scope {documented[key]!r})")
                    break
                cells.append(Cell(ident.name, f"{method} {path}", method, target, expected,
                                  body=API_BODIES.get(key), headers=API_EXTRA_HEADERS.get(key, {}),
                                  classify="api"))
            # A browser's write without the CSRF token is refused, whatever its permissions.
            superuser = next((i for i in identities if i.is_superuser), None)
            if method != "GET" and superuser is not None and not documented[key].startswith("none"):
                cells.append(Cell(superuser.name, f"{method} {path} (no CSRF)", method, target, DENY,
                                  body=API_BODIES.get(key), headers=API_EXTRA_HEADERS.get(key, {}),
                                  csrf=False, classify="api"))
    return cells, unknown


def _fill_api_path(path: str) -> str | None:
    names = re.findall(r"{(\w+)}", path)
    if any(n not in API_PATH_VALUES for n in names):
        return None
    return re.sub(r"{(\w+)}", lambda m: API_PATH_VALUES[m.group(1)], path)


def _api_query(operation: dict[str, Any]) -> str | None:
    parts = []
    for param in operation.get("parameters", []):
        if param.get("in") != "query" or not param.get("required"):
            continue
        if param["name"] not in API_QUERY_VALUES:
            return None
        parts.append(f"{param['name']}={API_QUERY_VALUES[param['name']].replace('+', '%2B')}")
    return "&".join(parts)


# --- Django's routes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DjangoRoute:
    template: str  # the pattern as the resolver prints it, prefixes joined
    name: str | None  # "namespace:name"
    params: tuple[str, ...] = ()  # the path's parameters (route converters)


def django_routes() -> list[DjangoRoute]:
    """Every URL pattern of the resolver, except the API's operations (the schema has them)."""
    from django.urls import URLResolver, get_resolver

    def walk(resolver, prefix: str, namespaces: tuple[str, ...]) -> Iterator[DjangoRoute]:
        for pattern in resolver.url_patterns:
            if isinstance(pattern, URLResolver):
                ns = (*namespaces, pattern.namespace) if pattern.namespace else namespaces
                yield from walk(pattern, prefix + str(pattern.pattern), ns)
            else:
                name = ":".join((*namespaces, pattern.name)) if pattern.name else None
                params = tuple(getattr(pattern.pattern, "converters", {}))
                yield DjangoRoute(prefix + str(pattern.pattern), name, params)

    routes = []
    for route in walk(get_resolver(), "", ()):
        if route.name and route.name.startswith("api-v1:") and route.name not in API_DOC_ROUTES:
            continue
        routes.append(route)
    return routes


def is_admin_route(route: DjangoRoute) -> bool:
    return route.template.startswith("admin/")


API_DOC_ROUTES = frozenset({"api-v1:openapi-json", "api-v1:openapi-view"})
OBJECT_PARAMS = frozenset({"object_id", "id", "pk"})
POST_ONLY_ADMIN_VIEWS = frozenset({"process_import"})
"""Custom views that answer 405 to a GET before any permission check: tried with a POST."""


@dataclass
class AdminContext:
    """What the admin rules need from the database: each model's admin and one object's pk."""

    model_admins: dict[tuple[str, str], Any]  # (app_label, model_name) -> ModelAdmin
    sample_pk: dict[tuple[str, str], str]
    users: dict[int, Any]  # user id -> user (sessions only)
    kite_account_pk: str
    content_type_id: str


def admin_context(identities: list[Identity]) -> AdminContext:
    from django.contrib import admin
    from django.contrib.auth import get_user_model
    from django.contrib.contenttypes.models import ContentType

    from accounts.models import KiteAccount

    admins = {(m._meta.app_label, m._meta.model_name): ma for m, ma in admin.site._registry.items()}
    sample = {}
    for (app, model), ma in admins.items():
        pk = ma.model._default_manager.order_by("pk").values_list("pk", flat=True).first()
        sample[(app, model)] = str(pk) if pk is not None else str(MISSING_ID)
    ids = [i.user_id for i in identities if i.kind == "session"]
    users = {u.pk: u for u in get_user_model().objects.filter(pk__in=ids)}
    account = KiteAccount.objects.order_by("pk").values_list("pk", flat=True).first()
    return AdminContext(
        model_admins=admins, sample_pk=sample, users=users,
        kite_account_pk=str(account if account is not None else MISSING_ID),
        content_type_id=str(ContentType.objects.get_for_model(KiteAccount).pk),
    )  # fmt: skip


def _request_as(user, method: str = "GET"):
    from django.test import RequestFactory

    request = getattr(RequestFactory(), method.lower())("/admin/")
    request.user = user
    return request


def _staff_session(ident: Identity) -> bool:
    return ident.kind == "session" and ident.is_staff


WRITE_ACTIONS = ("add", "change", "delete")


def _view_only(ident: Identity) -> bool:
    """A session that holds no add, change or delete permission: it must never write."""
    return ident.kind == "session" and not ident.is_superuser and not any(
        perm.split(".", 1)[1].startswith(WRITE_ACTIONS) for perm in ident.permissions
    )


class DjangoRules:
    """The expected verdict of each Django route for each identity; unknown routes reported."""

    def __init__(self, ctx: AdminContext) -> None:
        self._ctx = ctx

    def expand_all(self, routes: list[DjangoRoute], identities: list[Identity]) -> tuple[list[Cell], list[str]]:
        cells: list[Cell] = []
        unknown: list[str] = []
        for route in routes:
            expansions = self._expand(route)
            if expansions is None:
                unknown.append(route.name or route.template)
                continue
            for path, rule, methods in expansions:
                for ident in identities:
                    for method in methods:
                        expected = rule(ident, method)
                        if expected is not None:
                            cells.append(Cell(ident.name, route.name or route.template, method, path,
                                              expected))
        return cells, unknown

    # Each rule: (identity, method) -> ALLOW / DENY / None (not requested).
    def _expand(self, route: DjangoRoute) -> list[tuple[str, Callable[[Identity, str], str | None], tuple[str, ...]]] | None:
        name, template = route.name, route.template
        public = lambda ident, method: ALLOW  # noqa: E731
        login = lambda ident, method: ALLOW if ident.kind == "session" else DENY  # noqa: E731
        staff = lambda ident, method: ALLOW if _staff_session(ident) else DENY  # noqa: E731
        fixed = {
            "accounts:login": ("/accounts/login/", public),
            # GET only: a POST would end the identity's session (GET answers 405).
            "accounts:logout": ("/accounts/logout/", public),
            "admin:logout": ("/admin/logout/", public),
            "admin:login": ("/admin/login/", public),
            "accounts:positions": ("/accounts/positions/", login),
            "streaming:chain": ("/", login),
            "streaming:health-live": ("/health/live", public),
            "streaming:health-ready": ("/health/ready", public),
            "streaming:health": ("/health", public),
            "subscriptions:history": (f"/api/history/{MISSING_ID}", public),  # 308 into the API
            "api-v1:openapi-json": ("/api/v1/openapi.json", login),
            "api-v1:openapi-view": ("/api/v1/docs", login),
            "admin:index": ("/admin/", staff),
            "admin:password_change": ("/admin/password_change/", staff),
            "admin:password_change_done": ("/admin/password_change/done/", staff),
            "admin:jsi18n": ("/admin/jsi18n/", staff),
            "admin:view_on_site": (
                f"/admin/r/{self._ctx.content_type_id}/{self._ctx.kite_account_pk}/", staff),
            # Without a field that uses autocomplete, every caller is refused (403 or login).
            "admin:autocomplete": ("/admin/autocomplete/", lambda ident, method: DENY),
        }
        if name in fixed:
            path, rule = fixed[name]
            return [(path, rule, ("GET",))]
        kite_login = lambda ident, method: (  # noqa: E731
            ALLOW if _staff_session(ident) and ident.has_perm("accounts.change_kiteaccount") else DENY
        )
        if name == "accounts:kite_login":
            return [(f"/accounts/{self._ctx.kite_account_pk}/kite/login/", kite_login, ("GET",))]
        if name == "accounts:kite_callback":
            return [("/accounts/kite/callback/", kite_login, ("GET",))]
        if name == "admin:app_list":
            labels = re.search(r"\(\?P<app_label>([^)]*)\)", template).group(1).split("|")
            return [(f"/admin/{label}/", self._app_index(label), ("GET",)) for label in labels]
        if name is None and template == "admin/(?P<url>.*)$":
            return [("/admin/no-such-page/", staff, ("GET",))]
        model_redirect = re.fullmatch(r"admin/([a-z_]+)/([a-z]+)/<path:object_id>/", template)
        if name is None and model_redirect:
            key = (model_redirect.group(1), model_redirect.group(2))
            if key not in self._ctx.model_admins:
                return None
            path = f"/admin/{key[0]}/{key[1]}/{self._ctx.sample_pk[key]}/"
            return [(path, staff, ("GET",))]
        for app, model in self._ctx.model_admins:
            prefix = f"admin:{app}_{model}_"
            if name and name.startswith(prefix):
                return self._model_view(app, model, name.removeprefix(prefix), route)
        return None

    def _user(self, ident: Identity):
        return self._ctx.users.get(ident.user_id) if _staff_session(ident) else None

    def _app_index(self, label: str):
        def rule(ident: Identity, method: str) -> str:
            user = self._user(ident)
            return ALLOW if user is not None and user.has_module_perms(label) else DENY
        return rule

    def _model_view(self, app: str, model: str, view: str, route: DjangoRoute):
        ma = self._ctx.model_admins.get((app, model))
        if ma is None:
            return None
        base = f"/admin/{app}/{model}/"
        pk = self._ctx.sample_pk[(app, model)]
        obj = ma.model._default_manager.filter(pk=pk).first() if pk != str(MISSING_ID) else None
        def gate(check: Callable[[Any], bool], *, writes: bool):
            def rule(ident: Identity, method: str) -> str | None:
                user = self._user(ident)
                allowed = user is not None and check(user) and not (writes and _view_only(ident))
                if method == "POST" and allowed:
                    return None  # a permitted POST would change data: not made
                return ALLOW if allowed else DENY
            return rule

        if view == "changelist":
            return [(base, gate(lambda u: ma.has_view_or_change_permission(_request_as(u)), writes=False),
                     ("GET",))]
        if view == "add":
            return [(f"{base}add/", gate(lambda u: ma.has_add_permission(_request_as(u)), writes=True),
                     ("GET", "POST"))]
        if view == "change":
            return [
                (f"{base}{pk}/change/",
                 gate(lambda u: ma.has_view_or_change_permission(_request_as(u), obj), writes=False), ("GET",)),
                (f"{base}{pk}/change/",
                 gate(lambda u: ma.has_change_permission(_request_as(u), obj), writes=True), ("POST",)),
            ]  # fmt: skip
        if view == "delete":
            return [(f"{base}{pk}/delete/",
                     gate(lambda u: ma.has_delete_permission(_request_as(u), obj), writes=True),
                     ("GET", "POST"))]  # fmt: skip
        if view == "history":
            return [(f"{base}{pk}/history/",
                     gate(lambda u: ma.has_view_or_change_permission(_request_as(u), obj), writes=False),
                     ("GET",))]  # fmt: skip
        # A custom view (refresh, password, import...): the model's change permission
        # (security.md, M2); django-import-export's views its import permission.
        from django.urls import NoReverseMatch, reverse

        if set(route.params) - OBJECT_PARAMS:
            return None
        try:
            path = reverse(route.name, kwargs={p: pk for p in route.params})
        except NoReverseMatch:
            return None
        methods = ("POST",) if view in POST_ONLY_ADMIN_VIEWS else ("GET",)
        if view in ("import", "process_import") and hasattr(ma, "has_import_permission"):
            return [(path, gate(lambda u: ma.has_import_permission(_request_as(u)), writes=True), methods)]
        change_perm = f"{app}.change_{model}"
        return [(path, gate(lambda u: u.has_perm(change_perm), writes=True), methods)]


# --- ASGI routes outside Django ----------------------------------------------------------------


def asgi_cells(identities: list[Identity]) -> list[Cell]:
    """``/metrics`` and the details of ``/health``: staff sessions only (no ops credential sent)."""
    cells = []
    for ident in identities:
        staff = ALLOW if _staff_session(ident) else DENY
        cells.append(Cell(ident.name, "asgi:/metrics", "GET", "/metrics", staff))
        cells.append(Cell(ident.name, "health details", "GET", "/health", staff,
                          classify="health_details"))
    return cells


# --- classification ----------------------------------------------------------------------------


def verdict(cell: Cell, status: int, location: str, body: bytes) -> str:
    """ALLOW or DENY as observed (5xx are counted apart by the caller)."""
    from urllib.parse import urlsplit

    if cell.classify == "health_details":
        import orjson

        try:
            return ALLOW if "engines" in orjson.loads(body) else DENY
        except orjson.JSONDecodeError:
            return "unreadable"
    if status in (301, 302, 303, 307, 308) and urlsplit(location).path in LOGIN_PATHS:
        return DENY
    if cell.classify == "api" and status in (401, 403):
        import orjson

        try:
            code = orjson.loads(body)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return DENY
        return DENY if code in DENIED_API_CODES else ALLOW
    return DENY if status in (401, 403) else ALLOW


def unknown_ws_actions(covered: set[str]) -> list[str]:
    """Actions the protocol knows that the WebSocket cases do not try."""
    from streaming.protocol import KNOWN_ACTIONS

    return [f"ws action {a}" for a in sorted(KNOWN_ACTIONS - covered)]
