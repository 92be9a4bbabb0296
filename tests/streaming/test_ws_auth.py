"""WebSocket authentication: M7 (sockets closed when their credential goes), M8 (Origin before
the database, a per-IP connect limit) and the token's 'read' scope."""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.test import Client

from accounts.models import ApiToken
from accounts.services import apitoken_create, apitoken_revoke
from streaming.protocol import CloseCode
from tests.streaming.wsutil import (
    ORIGIN,
    expect_close,
    make_app,
    recv,
    session_cookie_for,
    ws_connect,
)
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import redis_layer as redis_layer
from tests.streaming.wsutil import user as user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]

CLOSE_WITHIN_S = 5


async def expect_revoked(comm) -> None:
    error = await recv(comm, wait_s=CLOSE_WITHIN_S)
    assert error["type"] == "error" and error["code"] == "unauthorized", error
    assert await expect_close(comm, wait_s=CLOSE_WITHIN_S) == CloseCode.UNAUTHORIZED


def token_header(key: str):
    return (b"authorization", f"Token {key}".encode())


@pytest.fixture
def api_token(user):
    return apitoken_create(user=user, name="bot")


async def test_revoking_a_token_closes_its_sockets_and_only_those(redis_layer, user, api_token):
    token, key = api_token
    _, other_key = await database_sync_to_async(apitoken_create)(user=user, name="other")
    app, _ = make_app()
    revoked, _ = await ws_connect(app, headers=[token_header(key)])
    kept, _ = await ws_connect(app, headers=[token_header(other_key)])
    await database_sync_to_async(apitoken_revoke)(token=token)
    await expect_revoked(revoked)
    assert await kept.receive_nothing(timeout=0.5)
    await kept.disconnect()


async def test_deleting_a_token_in_the_admin_closes_its_sockets(redis_layer, api_token):
    token, key = api_token
    app, _ = make_app()
    comm, _ = await ws_connect(app, headers=[token_header(key)])
    await database_sync_to_async(token.delete)()
    await expect_revoked(comm)


async def test_deactivating_a_user_closes_session_and_token_sockets(redis_layer, user, api_token):
    _, key = api_token
    app, _ = make_app()
    cookie = await database_sync_to_async(session_cookie_for)(user)
    by_session, _ = await ws_connect(app, headers=[ORIGIN, cookie])
    by_token, _ = await ws_connect(app, headers=[token_header(key)])
    user.is_active = False
    await database_sync_to_async(user.save)()
    await expect_revoked(by_session)
    await expect_revoked(by_token)


async def test_logging_out_closes_that_sessions_sockets(redis_layer, user):
    browser, other = Client(), Client()
    await database_sync_to_async(browser.force_login)(user)
    await database_sync_to_async(other.force_login)(user)
    name = django_settings.SESSION_COOKIE_NAME
    app, _ = make_app()

    def cookie_of(client):
        return (b"cookie", f"{name}={client.cookies[name].value}".encode())

    logged_out, _ = await ws_connect(app, headers=[ORIGIN, cookie_of(browser)])
    elsewhere, _ = await ws_connect(app, headers=[ORIGIN, cookie_of(other)])
    response = await database_sync_to_async(browser.post)("/accounts/logout/")
    assert response.status_code == 302
    await expect_revoked(logged_out)
    assert await elsewhere.receive_nothing(timeout=0.5)  # the user's other browser stays
    await elsewhere.disconnect()


async def test_a_token_without_the_read_scope_is_refused(redis_layer, user):
    _, key = await database_sync_to_async(apitoken_create)(user=user, name="sub", scopes=["subscribe"])
    app, _ = make_app()
    comm = WebsocketCommunicator(app, "/ws/v1/", headers=[token_header(key)])
    assert (await comm.connect())[0]
    error = await recv(comm)
    assert error["code"] == "unauthorized" and "'read'" in error["message"]
    assert await expect_close(comm) == CloseCode.UNAUTHORIZED


async def test_a_foreign_origin_never_reaches_the_token_lookup(redis_layer, api_token):
    """M8: refused on its Origin before the database is asked (last_used_at stays unset)."""
    token, key = api_token
    app, _ = make_app()
    comm = WebsocketCommunicator(
        app, "/ws/v1/", headers=[token_header(key), (b"origin", b"https://evil.example")]
    )
    assert not (await comm.connect())[0]
    await database_sync_to_async(token.refresh_from_db)()
    assert token.last_used_at is None
    assert await ApiToken.objects.filter(last_used_at__isnull=False).acount() == 0


async def test_connects_per_ip_are_limited_before_any_work(redis_layer, api_token, settings):
    """M8: a client IP past its connect rate is refused before the Origin or the token."""
    _, key = api_token
    settings.WS_MAX_CONNECTS_PER_IP_PER_MINUTE = 3
    app, _ = make_app()
    opened = []
    for _ in range(3):
        comm, _ = await ws_connect(app, headers=[token_header(key)])
        opened.append(comm)
    refused = WebsocketCommunicator(app, "/ws/v1/", headers=[token_header(key)])
    assert not (await refused.connect())[0]
    for comm in opened:
        await comm.disconnect()
