"""The ``orders`` subscription over the real channels-redis layer and PostgreSQL.

Order changes are made the way production makes them, through ``order_apply_update``, whose
after-commit hook publishes the event; the clients are the project's ASGI application.
"""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from accounts.models import KiteAccount
from accounts.order_services import order_apply_update
from tests.streaming.wsutil import (
    ORIGIN,
    make_app,
    recv,
    recv_until,
    send,
    session_cookie_for,
    ws_connect,
)
from tests.streaming.wsutil import close_db_threads as close_db_threads
from tests.streaming.wsutil import redis_layer as redis_layer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_db_threads")]


def kite_order(order_id: str, *, status: str = "OPEN", filled: int = 0, at: str = "10:00:00") -> dict:
    return {
        "order_id": order_id, "status": status, "filled_quantity": filled,
        "pending_quantity": 75 - filled, "cancelled_quantity": 0,
        "average_price": 120.5 if filled else 0, "order_timestamp": "2026-12-04 10:00:00",
        "exchange_update_timestamp": f"2026-12-04 {at}", "exchange": "NFO",
        "tradingsymbol": "NIFTY26DEC24000CE", "transaction_type": "BUY", "order_type": "LIMIT",
        "product": "NRML", "quantity": 75, "price": 120.5,
    }  # fmt: skip


apply_update = sync_to_async(order_apply_update)


@pytest.fixture
def desk(django_user_model):
    """Two accounts, each traded by its own user, and a superuser who sees both."""
    alice = django_user_model.objects.create_user(username="alice", password="pw-123456")
    bob = django_user_model.objects.create_user(username="bob", password="pw-123456")
    boss = django_user_model.objects.create_superuser(username="boss", password="pw-123456")
    one = KiteAccount.objects.create(label="desk-1", api_key="k-one", api_secret="s-one")
    two = KiteAccount.objects.create(label="desk-2", api_key="k-two", api_secret="s-two")
    one.traders.add(alice)
    two.traders.add(bob)
    return {"alice": alice, "bob": bob, "boss": boss, "one": one, "two": two}


async def connect(app, user):
    cookie = await sync_to_async(session_cookie_for)(user)
    comm, _ = await ws_connect(app, headers=[ORIGIN, cookie])
    return comm


async def nothing_more(comm) -> None:
    """Nothing but the pong arrives before a ping's answer (frames keep their order)."""
    await send(comm, {"action": "ping", "id": "fence"})
    msg = await recv(comm)
    assert msg["type"] == "pong", msg


async def test_each_client_gets_the_orders_of_the_accounts_it_may_see_and_no_other(redis_layer, desk):
    app, _ = make_app()
    alice, bob, boss = [await connect(app, desk[u]) for u in ("alice", "bob", "boss")]
    for comm in (alice, bob, boss):
        await send(comm, {"action": "subscribe", "id": "o", "orders": True})
    one, two = desk["one"], desk["two"]
    assert (await recv(alice))["accounts"] == [{"id": one.pk, "label": "desk-1"}]
    assert (await recv(bob))["accounts"] == [{"id": two.pk, "label": "desk-2"}]
    assert [a["id"] for a in (await recv(boss))["accounts"]] == [one.pk, two.pk]

    await apply_update(account=two, update=kite_order("900002"), source="ticker")
    await apply_update(account=one, update=kite_order("900001", status="COMPLETE", filled=75),
                       source="ticker")

    frame = await recv(alice)
    assert frame["type"] == "order" and frame["account"] == one.pk
    assert frame["data"]["kite_order_id"] == "900001"
    assert frame["data"]["status"] == "COMPLETE" and frame["data"]["filled_quantity"] == 75
    await nothing_more(alice)
    frame = await recv(bob)
    assert (frame["account"], frame["data"]["kite_order_id"]) == (two.pk, "900002")
    await nothing_more(bob)
    got = {(await recv(boss))["data"]["kite_order_id"] for _ in range(2)}
    assert got == {"900001", "900002"}
    for comm in (alice, bob, boss):
        await comm.disconnect()


async def test_naming_an_account_one_may_not_see_subscribes_nothing(redis_layer, desk):
    app, _ = make_app()
    alice = await connect(app, desk["alice"])
    hidden, missing = desk["two"].pk, 10_000_000
    await send(alice, {"action": "subscribe", "id": 7, "orders": [desk["one"].pk, hidden, missing]})
    error = await recv(alice)
    assert error["type"] == "error" and error["code"] == "unknown_account" and error["id"] == 7
    assert error["accounts"] == [hidden, missing]
    await apply_update(account=desk["one"], update=kite_order("900011"), source="ticker")
    await apply_update(account=desk["two"], update=kite_order("900012"), source="ticker")
    await nothing_more(alice)
    await alice.disconnect()


async def test_orders_go_in_a_message_of_their_own(redis_layer, desk):
    app, _ = make_app()
    alice = await connect(app, desk["alice"])
    await send(alice, {"action": "subscribe", "orders": True, "instruments": [256265]})
    error = await recv(alice)
    assert error["code"] == "invalid_message" and "message of its own" in error["message"]
    await send(alice, {"action": "subscribe", "orders": []})
    assert (await recv(alice))["code"] == "invalid_message"
    await alice.disconnect()


async def test_a_replayed_or_older_update_sends_no_frame_and_nothing_goes_backwards(redis_layer, desk):
    app, _ = make_app()
    alice = await connect(app, desk["alice"])
    await send(alice, {"action": "subscribe", "orders": [desk["one"].pk]})
    assert (await recv(alice))["type"] == "orders_subscribed"
    one = desk["one"]
    await apply_update(account=one, update=kite_order("900021", at="10:00:00"), source="ticker")
    await apply_update(account=one, update=kite_order("900021", status="COMPLETE", filled=75,
                                                      at="10:00:02"), source="postback")
    # Kite's copies: the same COMPLETE again, then the OPEN that was overtaken.
    await apply_update(account=one, update=kite_order("900021", status="COMPLETE", filled=75,
                                                      at="10:00:02"), source="ticker")
    await apply_update(account=one, update=kite_order("900021", at="10:00:00"), source="postback")
    statuses = [(await recv(alice))["data"]["status"] for _ in range(2)]
    assert statuses == ["OPEN", "COMPLETE"]
    await nothing_more(alice)
    await alice.disconnect()


async def test_a_grant_taken_away_stops_the_events_within_the_recheck(redis_layer, desk):
    now = [1000.0]
    app, _ = make_app(clock=lambda: now[0])
    alice = await connect(app, desk["alice"])
    await send(alice, {"action": "subscribe", "orders": True})
    assert (await recv(alice))["type"] == "orders_subscribed"
    await sync_to_async(desk["one"].traders.remove)(desk["alice"])
    now[0] += 6.0  # past ORDERS_RECHECK_S
    await apply_update(account=desk["one"], update=kite_order("900031"), source="ticker")
    told = await recv(alice)
    assert told == {"type": "orders_unsubscribed", "id": None, "accounts": []}
    await apply_update(account=desk["one"], update=kite_order("900031", status="CANCELLED"),
                       source="ticker")
    await nothing_more(alice)
    await alice.disconnect()


async def test_unsubscribing_orders_stops_them_and_says_what_is_left(redis_layer, desk):
    app, _ = make_app()
    boss = await connect(app, desk["boss"])
    await send(boss, {"action": "subscribe", "orders": True})
    await recv_until(boss, lambda m: m["type"] == "orders_subscribed")
    await send(boss, {"action": "unsubscribe", "id": "u", "orders": [desk["two"].pk]})
    assert await recv(boss) == {"type": "orders_unsubscribed", "id": "u", "accounts": [desk["one"].pk]}
    await apply_update(account=desk["two"], update=kite_order("900041"), source="ticker")
    await apply_update(account=desk["one"], update=kite_order("900042"), source="ticker")
    assert (await recv(boss))["data"]["kite_order_id"] == "900042"
    await send(boss, {"action": "unsubscribe", "all": True})
    assert (await recv(boss))["type"] == "orders_unsubscribed"
    assert (await recv(boss))["type"] == "unsubscribed"
    await apply_update(account=desk["one"], update=kite_order("900043"), source="ticker")
    await nothing_more(boss)
    await boss.disconnect()
