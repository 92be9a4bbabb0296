"""Paper trading against the real engine: the simulator streams, the engine publishes over
channels-redis, the paper exchange reads live snapshots and the paper desk fills what rests;
every write goes through the order services into PostgreSQL. Nothing reaches the simulator's
order routes."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import orjson
import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model

from accounts.brokers import BrokerRejectedError, broker_for
from accounts.models import KiteAccount, Order, OrderPlacement, OrderStatus, Trade
from accounts.paper import PaperBroker, PaperExchange
from accounts.paper_desk import PaperDesk
from streaming import schema
from streaming.engine.market_hours import MarketHours
from streaming.market import SyntheticMarket
from streaming.snapshots import SnapshotReader
from tests.helpers import async_wait_until, epoch_at_ist, next_trading_day
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    instruments_from_market,
    make_account,
    subscribe,
)

pytestmark = pytest.mark.django_db(transaction=True)

ORDER_ROUTES = ("order.place", "order.modify", "order.cancel")


def trading_day_at(hour: int, minute: int) -> float:
    """An epoch on the next trading day (from tomorrow) at IST ``hour:minute``."""
    return epoch_at_ist(next_trading_day(dt.date.today()), hour, minute)


def running_clock(start: float):
    """A clock that starts at ``start`` and runs: the session is open whatever today is."""
    origin = time.time()
    return lambda: start + (time.time() - origin)


@pytest.fixture
def world(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    expiry = min(r["expiry"] for r in market.instruments
                 if r["name"] == "NIFTY" and r["instrument_type"] == "CE")
    chain = [r for r in market.instruments if r["name"] == "NIFTY" and r["expiry"] == expiry
             and r["instrument_type"] in ("CE", "PE")]
    future = [r["instrument_token"] for r in market.instruments
              if r["name"] == "NIFTY" and r["instrument_type"] == "FUT"]
    subscribe([market.index_token("NIFTY"), *future, *(r["instrument_token"] for r in chain)])
    make_account("acc1", api_key="k1", access_token="tok-acc1")
    paper = KiteAccount.objects.create(label="paper1", api_key="paper-key", api_secret="x",
                                       is_paper=True)
    user = get_user_model().objects.create_user(username="paper-trader", password="pw-123456")
    spot = market.spot("NIFTY")
    atm_call = min((r for r in chain if r["instrument_type"] == "CE"),
                   key=lambda r: abs(r["strike"] - spot))
    return {"paper": paper, "user": user, "call": atm_call, "group": schema.chain_group("NIFTY", expiry)}


def stored_order(*, account, user, params) -> Order:
    """What the placement service stores before it sends anything: the order and its tag."""
    tag = uuid.uuid4().hex[:20]
    placement = OrderPlacement.objects.create(
        user=user, account=account, idempotency_key=tag, fingerprint=tag, request=params
    )
    return Order.objects.create(account=account, placement=placement, tag=tag, request=params,
                                status=OrderStatus.PENDING, exchange=params["exchange"],
                                tradingsymbol=params["tradingsymbol"], quantity=params["quantity"])


def place(broker: PaperBroker, order: Order, params: dict) -> Order:
    broker.place_order(params={**params, "tag": order.tag})
    order.refresh_from_db()
    return order


class AskRecorder:
    """A listener in one group keeping every ask published for one token."""

    def __init__(self, layer, token: int) -> None:
        self.layer, self.token, self.asks = layer, token, set()

    async def run(self, group: str) -> None:
        channel = await self.layer.new_channel()
        await self.layer.group_add(group, channel)
        while True:
            message = await self.layer.receive(channel)
            if message["type"] != schema.SNAPSHOTS_BATCH_TYPE:
                continue  # a chain group also carries the chain's analytics
            for token, item in zip(message["tokens"], message["items"], strict=True):
                if token == self.token and (ask := orjson.loads(item)["ask"]) is not None:
                    self.asks.add(float(ask))


class RecordingQuotes:
    """The exchange's snapshot source, keeping each snapshot it handed out."""

    def __init__(self, reader: SnapshotReader) -> None:
        self._latest = async_to_sync(reader.latest)
        self.seen = []

    def __call__(self, tokens):
        got = self._latest(tokens)
        self.seen.extend(got.values())
        return got


def params_for(call, **fields) -> dict:
    return {"variety": "regular", "exchange": "NFO", "tradingsymbol": call["tradingsymbol"],
            "transaction_type": "BUY", "order_type": "MARKET", "product": "NRML", **fields}


async def test_paper_orders_fill_at_the_live_book_and_nothing_reaches_kite(world):
    call = world["call"]
    token, lot = call["instrument_token"], call["lot_size"]
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        h.sim.register_account(api_key="paper-key", api_secret="x", access_token="never-used")
        reader = SnapshotReader(h.layer, timeout_s=5.0)

        async def live_book():
            snap = (await reader.latest([token])).get(token)
            return snap if snap is not None and snap.ask_qty and snap.delta is not None else None

        await async_wait_until(live_book, timeout_s=90, what="a live book of the ATM call")
        quotes = RecordingQuotes(reader)
        exchange = PaperExchange(quotes=quotes, hours=MarketHours(),
                                 clock=running_clock(trading_day_at(11, 0)))
        broker = PaperBroker(account=world["paper"], exchange=exchange)
        recorder = AskRecorder(h.layer, token)
        recorder_task = asyncio.create_task(recorder.run(world["group"]), name="test-asks")
        desk = PaperDesk(channel_layer=h.layer, exchange=exchange, owner="test-desk",
                         refresh_s=0.2)
        desk_task = asyncio.create_task(desk.run(), name="test-paper-desk")
        try:
            # A market buy bigger than any level of the book: the shown ask quantity fills at
            # the ask at once, the rest rests and fills on later snapshots.
            quantity = 40 * lot + 32 * lot
            params = params_for(call, quantity=quantity)
            order = await database_sync_to_async(stored_order)(account=world["paper"], user=world["user"],
                                                      params=params)
            order = await database_sync_to_async(place)(broker, order, params)
            used = quotes.seen[-1]
            first = await database_sync_to_async(lambda: list(Trade.objects.filter(order=order)))()
            assert [(t.quantity, float(t.average_price)) for t in first] == [(used.ask_qty, used.ask)]
            assert order.status == OrderStatus.OPEN and order.filled_quantity == used.ask_qty
            assert order.kite_order_id.startswith("P") and order.instrument_token == token

            async def complete():
                o = await database_sync_to_async(Order.objects.get)(pk=order.pk)
                return o if o.status == OrderStatus.COMPLETE else None

            done = await async_wait_until(complete, timeout_s=90, what="the market order filled")
            trades = await database_sync_to_async(lambda: list(Trade.objects.filter(order=order).order_by("pk")))()
            assert sum(t.quantity for t in trades) == quantity == done.filled_quantity
            assert len(trades) >= 3  # 72 lots never fit in one level of 1-32 lots
            published_asks = recorder.asks | {used.ask}
            for t in trades:
                assert float(t.average_price) in published_asks and t.quantity <= 32 * lot
            assert float(done.average_price) == pytest.approx(
                sum(t.quantity * float(t.average_price) for t in trades) / quantity, abs=1e-4)

            # A limit below the book rests; moving the market down crosses it and it fills.
            now = await live_book()
            limit = round(now.ask * 0.5, 1)
            params = params_for(call, order_type="LIMIT", price=limit, quantity=lot)
            resting = await database_sync_to_async(stored_order)(account=world["paper"], user=world["user"],
                                                        params=params)
            resting = await database_sync_to_async(place)(broker, resting, params)
            assert resting.status == OrderStatus.OPEN and resting.filled_quantity == 0
            await asyncio.sleep(1.0)  # several snapshots: the book does not cross by itself
            assert (await database_sync_to_async(Order.objects.get)(pk=resting.pk)).filled_quantity == 0
            h.sim.market.set_spot("NIFTY", h.sim.market.spot("NIFTY") * 0.9)

            async def filled():
                o = await database_sync_to_async(Order.objects.get)(pk=resting.pk)
                return o if o.status == OrderStatus.COMPLETE else None

            filled_order = await async_wait_until(filled, timeout_s=90, what="the limit filled")
            assert float(filled_order.average_price) <= limit
        finally:
            for task in (desk_task, recorder_task):
                task.cancel()
            await asyncio.gather(desk_task, recorder_task, return_exceptions=True)
        # Nothing of the paper account ever reached the simulator's order routes.
        assert not any(h.sim.rest_requests.get(route) for route in ORDER_ROUTES)
        assert h.sim.orders("paper-key") == [] and h.sim.orders("k1") == []


async def test_rejections_say_why(world):
    call = world["call"]
    token, lot = call["instrument_token"], call["lot_size"]
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        reader = SnapshotReader(h.layer, timeout_s=5.0)
        await async_wait_until(lambda: reader.latest([token]), timeout_s=90, what="live snapshots")

        def exchange(at: float, timeout_s: float = 5.0) -> PaperBroker:
            quotes = async_to_sync(SnapshotReader(h.layer, timeout_s=timeout_s).latest)
            return PaperBroker(account=world["paper"], exchange=PaperExchange(
                quotes=quotes, hours=MarketHours(), clock=running_clock(at)))

        def placed(broker, params) -> Order:
            order = stored_order(account=world["paper"], user=world["user"], params=params)
            return place(broker, order, params)

        params = params_for(call, quantity=lot)
        closed = await database_sync_to_async(placed)(exchange(trading_day_at(16, 0)), params)
        assert closed.status == OrderStatus.REJECTED and "market is closed" in closed.status_message
        unstreamed = {**params, "tradingsymbol": "NIFTYUNSTREAMED"}
        odd = {**params, "quantity": lot + 1}
        with pytest.raises(BrokerRejectedError, match="not a multiple of the lot size"):
            await database_sync_to_async(placed)(exchange(trading_day_at(11, 0)), odd)
        with pytest.raises(BrokerRejectedError, match="no instrument NFO:NIFTYUNSTREAMED"):
            await database_sync_to_async(placed)(exchange(trading_day_at(11, 0)), unstreamed)
        # Listed but streamed by no engine: no live price.
        other = await database_sync_to_async(_unsubscribed_option)(world)
        no_price = await database_sync_to_async(placed)(
            exchange(trading_day_at(11, 0), timeout_s=0.5),
            params_for(other, quantity=other["lot_size"]))
        assert no_price.status == OrderStatus.REJECTED and "no live price" in no_price.status_message
        assert not any(h.sim.rest_requests.get(route) for route in ORDER_ROUTES)


def _unsubscribed_option(world) -> dict:
    from subscriptions.models import Instrument, Subscription

    subscribed = Subscription.objects.values_list("instrument_id", flat=True)
    i = Instrument.objects.filter(name="BANKNIFTY", instrument_type="CE").exclude(
        instrument_token__in=subscribed).first()
    return {"tradingsymbol": i.tradingsymbol, "lot_size": i.lot_size}


def test_a_paper_account_gets_the_paper_broker(db):
    account = KiteAccount.objects.create(label="p", api_key="p", is_paper=True)
    assert isinstance(broker_for(account=account), PaperBroker)


async def test_a_paper_order_through_the_order_service_is_placed_once_and_filled(world):
    """The real placement path (idempotency, checks, limits, audit) with the paper broker."""
    from accounts.order_actions import OrderActor, OrderDesk, OrderLimits, OrderParams, order_place
    from accounts.order_models import OrderAudit
    from streaming.kite.rest import KiteOrderRateLimiter
    from tickerproj.redis_connection import redis_client

    call = world["call"]
    token, lot = call["instrument_token"], call["lot_size"]
    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        reader = SnapshotReader(h.layer, timeout_s=5.0)

        async def live_book():
            snap = (await reader.latest([token])).get(token)
            return snap if snap is not None and snap.ask_qty else None

        await async_wait_until(live_book, timeout_s=90, what="a live book of the ATM call")
        quotes = RecordingQuotes(reader)
        exchange = PaperExchange(quotes=quotes, hours=MarketHours(),
                                 clock=running_clock(trading_day_at(10, 0)))
        limits = OrderLimits.from_settings()
        desk = OrderDesk(
            broker_for=lambda account: PaperBroker(account=account, exchange=exchange),
            rate_limiter=KiteOrderRateLimiter(redis_client=redis_client(settings.REDIS_URL),
                                              windows=limits.windows()),
            limits=limits, schedule_resolution=lambda order_id, countdown_s: None,
        )
        params = OrderParams(account_id=world["paper"].pk, exchange="NFO",
                             tradingsymbol=call["tradingsymbol"], transaction_type="BUY",
                             order_type="MARKET", quantity=lot, product="NRML")

        def place_twice():
            world["paper"].traders.add(world["user"])
            actor = OrderActor(user=world["user"])
            first = order_place(actor=actor, account=world["paper"], idempotency_key="paper-1",
                                params=params, desk=desk)
            again = order_place(actor=actor, account=world["paper"], idempotency_key="paper-1",
                                params=params, desk=desk)
            return first, again, list(Order.objects.filter(account=world["paper"])), list(
                OrderAudit.objects.filter(account=world["paper"]).values_list("outcome", flat=True))

        first, again, orders, audits = await database_sync_to_async(place_twice)()
        assert first.status == 201 and again.body == first.body
        (order,) = orders
        used = quotes.seen[-1]
        # The service's own "accepted" news came after the fill and did not move it back.
        if used.ask_qty >= lot:
            assert order.status == OrderStatus.COMPLETE and float(order.average_price) == used.ask
        assert order.filled_quantity == min(lot, used.ask_qty)
        assert [h["source"] for h in order.status_history][:1] == ["paper"]
        assert audits == [OrderAudit.Outcome.OK]
        assert not any(h.sim.rest_requests.get(route) for route in ORDER_ROUTES)
