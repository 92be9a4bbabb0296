"""L11 (docs/security.md): WebSocket origins are allowed by exact scheme, host and port."""

import pytest
from channels.testing import WebsocketCommunicator

from accounts.services import apitoken_create
from streaming.origins import origin_key
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import make_app, session_cookie_for
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]


@pytest.fixture
def app(settings, redis_layer):
    settings.ALLOWED_HOSTS = ["127.0.0.1", "ticker.example.com"]
    settings.WS_ALLOWED_ORIGINS = ["http://127.0.0.1:8000", "https://ticker.example.com"]
    return make_app()[0]


@pytest.fixture
def cookie(user):
    return session_cookie_for(user)


@pytest.fixture
def key(user):
    return apitoken_create(user=user, name="prog")[1]


async def _accepted(app, headers) -> bool:
    comm = WebsocketCommunicator(app, "/ws/v1/", headers=headers)
    connected, _ = await comm.connect(timeout=5)
    if connected:
        await comm.disconnect()
    return connected


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        ("http://127.0.0.1:8000", True),
        ("https://ticker.example.com", True),
        ("https://ticker.example.com:443", True),
        ("http://127.0.0.1:8001", False),  # another application on the same host
        ("https://127.0.0.1:8000", False),  # another scheme
        ("http://ticker.example.com", False),
        ("null", False),
    ],
)
async def test_session_connections_need_an_exactly_allowed_origin(app, cookie, origin, accepted):
    assert await _accepted(app, [(b"origin", origin.encode()), cookie]) is accepted


async def test_programs_without_an_origin_still_connect_with_a_token(app, key):
    assert await _accepted(app, [(b"authorization", f"Token {key}".encode())])
    assert not await _accepted(app, [(b"origin", b"http://127.0.0.1:9999"),
                                     (b"authorization", f"Token {key}".encode())])


def test_origins_are_compared_with_explicit_ports():
    assert origin_key("HTTPS://Ticker.Example.com") == ("https", "ticker.example.com", 443)
    assert origin_key("http://[::1]:8000") == ("http", "::1", 8000)
    assert origin_key("ftp://x") is None and origin_key("http://x:99999") is None
