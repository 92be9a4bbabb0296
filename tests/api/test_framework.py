"""The API's frame: schema and docs, authentication, scopes, the error envelope, request ids,
rate limits."""

import orjson
import pytest
from django.test import Client

from accounts.models import ApiToken
from accounts.services import apitoken_create, apitoken_revoke
from tests.api.conftest import auth
from tests.helpers import statement_cancelled_on_lock

pytestmark = pytest.mark.django_db


def error_of(response) -> dict:
    body = orjson.loads(response.content)
    assert set(body) == {"error"}, body
    assert {"code", "message", "request_id"} <= set(body["error"]), body
    return body["error"]


def test_schema_and_docs_are_for_logged_in_users(client, trader):
    assert client.get("/api/v1/openapi.json").status_code == 302
    client.force_login(trader)
    schema = orjson.loads(client.get("/api/v1/openapi.json").content)
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/subscriptions/bulk" in schema["paths"]
    assert client.get("/api/v1/docs").status_code == 200


def test_anonymous_is_401_in_the_envelope_with_a_request_id(client, universe):
    response = client.get("/api/v1/instruments")
    assert response.status_code == 401
    error = error_of(response)
    assert error["code"] == "unauthenticated"
    assert error["request_id"] == response["X-Request-ID"]
    assert response["WWW-Authenticate"] == "Token"


def test_a_request_id_offered_is_kept_and_a_bad_one_replaced(client, read_key, universe):
    response = client.get("/api/v1/instruments", HTTP_X_REQUEST_ID="desk-42.a", **auth(read_key))
    assert response["X-Request-ID"] == "desk-42.a"
    response = client.get("/api/v1/instruments", HTTP_X_REQUEST_ID="x" * 300, **auth(read_key))
    assert len(response["X-Request-ID"]) == 32


def test_revoked_and_unknown_tokens_are_401_and_use_is_recorded(client, trader, universe):
    token, key = apitoken_create(user=trader, name="bot")
    assert client.get("/api/v1/instruments", **auth(key)).status_code == 200
    token.refresh_from_db()
    assert token.last_used_at is not None
    apitoken_revoke(token=token)
    response = client.get("/api/v1/instruments", **auth(key))
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_token"
    assert client.get("/api/v1/instruments", **auth("x" * 500)).status_code == 401


def test_a_deactivated_users_token_is_refused(client, trader, read_key, universe):
    trader.is_active = False
    trader.save()
    assert client.get("/api/v1/instruments", **auth(read_key)).status_code == 401


def test_wrong_scope_is_403_naming_the_scope(client, read_key, universe):
    response = client.post(
        "/api/v1/subscriptions", {"instrument_token": 256265}, content_type="application/json",
        **auth(read_key),
    )
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "scope_required" and "'subscribe'" in error["message"]


def test_session_writes_need_the_csrf_token_and_the_permission(trader, universe, django_user_model):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(trader)
    body = orjson.dumps({"instrument_token": 256265})
    response = browser.post("/api/v1/subscriptions", body, content_type="application/json")
    assert response.status_code == 403 and "CSRF" in error_of(response)["message"]
    browser.get("/api/v1/docs")  # sets the csrftoken cookie
    csrf = browser.cookies["csrftoken"].value
    response = browser.post(
        "/api/v1/subscriptions", body, content_type="application/json", HTTP_X_CSRFTOKEN=csrf
    )
    assert response.status_code == 403 and error_of(response)["code"] == "permission_required"


def test_validation_errors_are_400_naming_the_field(client, subscribe_key, universe):
    response = client.post(
        "/api/v1/subscriptions", {"instrument_token": 256265, "mode": "loud"},
        content_type="application/json", **auth(subscribe_key),
    )
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_request" and error["field"] == "mode"


def test_the_history_rate_limit_is_a_429_with_retry_after(client, read_key, settings):
    per_minute = int(settings.API_HISTORY_RATE_LIMIT.split("/")[0])
    query = {"from": "2026-11-20", "to": "2026-11-20"}
    for _ in range(per_minute):
        assert client.get("/api/v1/history/1", query, **auth(read_key)).status_code == 404
    response = client.get("/api/v1/history/1", query, **auth(read_key))
    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1
    assert error_of(response)["code"] == "rate_limited"
    # Another token has its own budget.
    other = apitoken_create(user=ApiToken.objects.get().user, name="other")[1]
    assert client.get("/api/v1/history/1", query, **auth(other)).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/instruments/99999999999999999999999"),
        ("get", "/api/v1/history/99999999999999999999999?from=2026-11-20&to=2026-11-20"),
        ("delete", "/api/v1/subscriptions/99999999999999999999999"),
        ("get", "/api/v1/instruments/abc"),
        ("get", "/api/v1/nowhere"),
        ("put", "/api/v1/instruments"),
    ],
)
def test_odd_paths_and_methods_get_an_envelope_not_a_500(client, subscribe_key, universe, method, path):
    response = getattr(client, method)(path, **auth(subscribe_key))
    assert 400 <= response.status_code < 500, response.content[:300]
    assert error_of(response)["request_id"] == response["X-Request-ID"]


@pytest.mark.django_db(transaction=True)
def test_a_database_that_does_not_answer_is_a_503_with_retry_after_not_a_500(client, read_key, universe):
    """A real failure: another connection holds the instruments table locked and the
    request's waiting statement is cancelled, as a restarting server cancels it."""
    with statement_cancelled_on_lock("subscriptions_instrument"):
        response = client.get("/api/v1/underlyings", **auth(read_key))
    assert response.status_code == 503, response.content
    assert error_of(response)["code"] == "unavailable"
    assert response["Retry-After"] == "2"
