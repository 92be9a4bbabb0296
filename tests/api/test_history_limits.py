"""M6: history requests are bounded: range, dates, rate (test_framework) and concurrency."""

import orjson
import pytest

from accounts.models import ApiToken
from subscriptions.api import ALL_CALLERS, history_concurrency, history_in_flight
from tests.api.conftest import auth
from tests.streaming.wsutil import NIFTY_INDEX

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("0001-01-01T00:00:00+14:00", "2026-11-20"),
        ("0001-01-01", "0001-01-01"),
        ("2026-11-20", "9999-12-31"),
        ("9999-12-31T23:59:59-12:00", "9999-12-31T23:59:59-12:00"),
        ("1900-01-01", "1900-01-02"),
        ("2026-11-20T10:00:00+99:00", "2026-11-20"),
        ("2026-02-30", "2026-03-01"),
    ],
)
def test_extreme_or_impossible_dates_are_a_400_never_a_500(client, read_key, universe, start, end):
    response = client.get(f"/api/v1/history/{NIFTY_INDEX}", {"from": start, "to": end}, **auth(read_key))
    assert response.status_code == 400, response.content
    assert orjson.loads(response.content)["error"]["code"] == "invalid_request"


def test_ten_years_of_minutes_is_a_400_that_says_the_limit(client, read_key, universe):
    response = client.get(
        f"/api/v1/history/{NIFTY_INDEX}", {"from": "2016-01-01", "to": "2025-12-31"}, **auth(read_key)
    )
    assert response.status_code == 400
    assert "at most 50000" in orjson.loads(response.content)["error"]["message"]


def test_a_caller_over_its_concurrency_limit_is_refused_at_once(client, read_key, settings):
    token = ApiToken.objects.get()
    caller = f"token:{token.pk}"
    query = {"from": "2026-11-20", "to": "2026-11-20"}
    held = 0
    try:
        while history_concurrency.enter(caller):  # as if that many were in flight
            held += 1
        assert held == settings.API_HISTORY_CONCURRENCY_PER_CALLER
        response = client.get("/api/v1/history/1", query, **auth(read_key))
        assert response.status_code == 429
        assert orjson.loads(response.content)["error"]["code"] == "too_many_concurrent"
    finally:
        for _ in range(held):
            history_concurrency.leave(caller)
    # Once they finish, the caller is served again (here: the instrument does not exist).
    assert client.get("/api/v1/history/1", query, **auth(read_key)).status_code == 404


def test_all_callers_together_are_capped_below_the_database_pool(client, read_key, settings):
    """20 tokens with a maximal range each took the whole pool (10): requests past the pool's
    wait were 500s (the fault suite's security.history_abuse). Past the process-wide cap the
    answer is 429 server_busy at once, and the caller's own count is released."""
    assert settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"] > settings.API_HISTORY_CONCURRENCY_TOTAL
    query = {"from": "2026-11-20", "to": "2026-11-20"}
    held = 0
    try:
        while history_in_flight.enter(ALL_CALLERS):  # as if other callers had these in flight
            held += 1
        assert held == settings.API_HISTORY_CONCURRENCY_TOTAL
        for _ in range(settings.API_HISTORY_CONCURRENCY_PER_CALLER + 1):
            response = client.get("/api/v1/history/1", query, **auth(read_key))
            assert response.status_code == 429
            assert orjson.loads(response.content)["error"]["code"] == "server_busy"
    finally:
        for _ in range(held):
            history_in_flight.leave(ALL_CALLERS)
    assert client.get("/api/v1/history/1", query, **auth(read_key)).status_code == 404
