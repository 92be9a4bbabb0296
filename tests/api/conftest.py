"""Fixtures for the HTTP API v1 tests: tokens of each scope and an instrument universe."""

import pytest
from django.core.cache import cache

from accounts.services import apitoken_create
from subscriptions.models import Instrument
from tests.streaming.wsutil import create_universe


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """The per-token rate limits count in Django's cache: each test starts from zero."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def trader(django_user_model):
    return django_user_model.objects.create_user(username="desk", password="pw-123456")


def auth(key: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Token {key}"}


@pytest.fixture
def read_key(trader) -> str:
    return apitoken_create(user=trader, name="reader", scopes=["read"])[1]


@pytest.fixture
def subscribe_key(trader) -> str:
    return apitoken_create(user=trader, name="desk-bot", scopes=["read", "subscribe"])[1]


@pytest.fixture
def universe(db) -> dict[int, Instrument]:
    """NIFTY index, a future and two 11-strike chains; nothing subscribed."""
    return create_universe(subscribe=False)
