"""Every endpoint fuzzed by schemathesis from the generated OpenAPI schema, authenticated:
no 5xx, and every 4xx in the error envelope.

History calls reach the loopback Kite simulator (its instruments are the registry here), so a
valid request is answered with candles rather than with a 503 for a missing Kite session.
"""

import json
from urllib.parse import urlencode, urlsplit

import orjson
import pytest
import schemathesis
from django.test import Client
from hypothesis import HealthCheck, settings

from accounts.services import apitoken_create
from tests.subscriptions.conftest import kite_settings as kite_settings
from tests.subscriptions.conftest import market as market
from tests.subscriptions.conftest import sim as sim
from tests.subscriptions.conftest import sim_account as sim_account
from tests.subscriptions.conftest import sim_instruments as sim_instruments
from tickerproj.api import api

schema = schemathesis.openapi.from_dict(api.get_openapi_schema())


@pytest.fixture
def fuzz_env(django_user_model, kite_settings, sim_instruments, sim_account, redis_client):
    user = django_user_model.objects.create_user("fuzz", is_staff=True)
    _, key = apitoken_create(user=user, name="fuzz", scopes=["read", "subscribe"])
    return {"client": Client(), "headers": {"Authorization": f"Token {key}"}}


def send(client: Client, case, headers: dict[str, str]):
    """The case through Django's test client (in the test's transaction, unlike a WSGI app)."""
    kw = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    url = urlsplit(kw["url"])
    query = urlencode(kw.get("params") or {}, doseq=True)
    if "json" in kw:
        body, content_type = json.dumps(kw["json"]), "application/json"
    else:
        body, content_type = kw.get("data") or b"", kw["headers"].get("Content-Type", "")
    return client.generic(
        kw["method"], url.path, data=body, content_type=content_type, QUERY_STRING=query,
        headers={k: v for k, v in kw["headers"].items() if k.lower() != "content-type"},
    )  # fmt: skip


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
def test_no_5xx_and_every_4xx_in_the_envelope(case, fuzz_env):
    response = send(fuzz_env["client"], case, fuzz_env["headers"])
    seen = (case.method, case.formatted_path, case.query, response.content[:300])
    assert response.status_code < 500, seen
    if response.status_code >= 400:
        assert response["Content-Type"] == "application/json", seen
        error = orjson.loads(response.content)["error"]
        assert {"code", "message", "request_id"} <= set(error), seen
        assert error["request_id"] == response["X-Request-ID"]
