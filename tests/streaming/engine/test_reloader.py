"""Live changes: notices coalesce into one reload, Redis and in-process notices both arrive,
and the diff sends only what changed."""

import asyncio
import contextlib
import threading
import time
import uuid

import pytest
from django.conf import settings

from accounts.models import KiteAccount
from streaming import schema
from streaming.control import ChangeNotifier, control_channel
from streaming.engine.reloader import (
    LocalNoticeListener,
    RedisNoticeListener,
    Reloader,
    ReloadTrigger,
    diff_subscriptions,
)
from streaming.engine.store import run_db
from streaming.market import SyntheticMarket
from subscriptions.models import Instrument, Subscription
from subscriptions.services import (
    subscription_activate,
    subscription_set_mode,
    subscriptions_set_status,
)
from tests.streaming.engine.runtime_helpers import (
    InProcessEngine,
    async_wait_until,
    instruments_from_market,
    make_account,
    subscribe,
)


class CountingReload:
    def __init__(self, delay_s=0.0):
        self.calls = []
        self.delay_s = delay_s

    async def __call__(self, reason):
        self.calls.append(reason)
        await asyncio.sleep(self.delay_s)


async def run_reloader(trigger, reload):
    task = asyncio.create_task(Reloader(trigger=trigger, reload=reload).run())
    await asyncio.sleep(0)
    return task


async def stop(*tasks):
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_burst_of_1000_notices_causes_one_reload():
    trigger = ReloadTrigger(debounce_s=0.2, max_delay_s=1.0, safety_interval_s=60)
    reload = CountingReload()
    task = await run_reloader(trigger, reload)
    try:
        for _ in range(1000):
            trigger.notify()
            if _ % 100 == 0:
                await asyncio.sleep(0.01)  # spread over ~0.1 s, as a bulk edit would
        await async_wait_until(lambda: reload.calls == ["start", "notice"])
        await asyncio.sleep(0.5)
        assert reload.calls == ["start", "notice"]
        assert trigger.notices == 1000
    finally:
        await stop(task)


async def test_continuous_notices_still_reload_within_the_max_delay():
    trigger = ReloadTrigger(debounce_s=0.2, max_delay_s=0.6, safety_interval_s=60)
    reload = CountingReload()
    task = await run_reloader(trigger, reload)
    try:
        await async_wait_until(lambda: reload.calls == ["start"])
        # Never quiet for the 200 ms debounce, so only the max delay can end the wait. Nothing
        # here is timed: a debounce that never fired would keep the loop going to the deadline.
        deadline = time.monotonic() + 30.0
        while len(reload.calls) < 2:
            assert time.monotonic() < deadline, "no reload while notices kept coming"
            trigger.notify()  # every 50 ms
            await asyncio.sleep(0.05)
        assert reload.calls == ["start", "notice"]
    finally:
        await stop(task)


async def test_notices_during_a_reload_cause_exactly_one_more():
    trigger = ReloadTrigger(debounce_s=0.05, max_delay_s=0.2, safety_interval_s=60)
    reload = CountingReload(delay_s=0.5)
    task = await run_reloader(trigger, reload)
    try:
        await async_wait_until(lambda: len(reload.calls) == 1)  # the start reload, running 0.5 s
        for _ in range(50):  # all while it runs
            trigger.notify()
        await async_wait_until(lambda: len(reload.calls) == 2)
        await asyncio.sleep(1.0)
        assert reload.calls == ["start", "notice"]
    finally:
        await stop(task)


async def test_periodic_safety_reload_without_notices():
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=0.2)
    reload = CountingReload()
    task = await run_reloader(trigger, reload)
    try:
        await async_wait_until(lambda: len(reload.calls) >= 3)
        assert reload.calls[0] == "start"
        assert set(reload.calls[1:]) == {"periodic"}
    finally:
        await stop(task)


async def test_redis_notices_reach_the_trigger_from_their_installation_only(redis_client):
    prefix = f"test_{uuid.uuid4().hex[:10]}"
    channel = control_channel(prefix)
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=60)
    listener = RedisNoticeListener(redis_url=settings.REDIS_URL, channel=channel, trigger=trigger)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), timeout=5)
        # Subscribing counts as a notice: changes while we were away must not be lost.
        await async_wait_until(lambda: trigger.notices == 1)
        # Pub/sub ignores Redis db numbers: another installation on this server publishes too.
        other = ChangeNotifier(redis_url=settings.REDIS_URL, channel=control_channel(f"{prefix}x"))
        ours = ChangeNotifier(redis_url=settings.REDIS_URL, channel=channel)
        for _ in range(3):
            await asyncio.to_thread(other.notify)
        for _ in range(3):
            await asyncio.to_thread(ours.notify)
        # Redis runs the PUBLISHes in order, so the other's would have arrived before ours.
        await async_wait_until(lambda: trigger.notices >= 4)
        assert trigger.notices == 4
        assert redis_client.pubsub_numsub(channel)[0][1] == 1
    finally:
        await stop(task)


def test_the_control_channel_is_named_by_the_channel_layer_prefix(settings):
    from streaming.engine.app import EngineConfig

    settings.CHANNEL_LAYER_PREFIX = "site-a"
    config = EngineConfig.from_settings(settings, engine_id="e1")
    assert config.control_channel == control_channel("site-a") == "site-a:engine:control"
    settings.CHANNEL_LAYER_PREFIX = "site-b"
    assert EngineConfig.from_settings(settings, engine_id="e1").control_channel != (
        config.control_channel
    )
    with pytest.raises(ValueError, match="control channel"):
        ChangeNotifier(redis_url=settings.REDIS_URL)
    with pytest.raises(ValueError, match="control channel"):
        EngineConfig(engine_id="e1", redis_url=settings.REDIS_URL)


async def test_in_process_notices_from_another_thread_reach_the_trigger():
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=60)
    trigger.bind_loop(asyncio.get_running_loop())
    notifier = ChangeNotifier(redis_url="")
    task = asyncio.create_task(LocalNoticeListener(notifier=notifier, trigger=trigger).run())
    await asyncio.sleep(0)
    try:
        thread = threading.Thread(target=notifier.notify)
        thread.start()
        thread.join()
        await async_wait_until(lambda: trigger.notices == 1)
    finally:
        await stop(task)
    # Unregistered when the listener stops.
    notifier.notify()
    await asyncio.sleep(0.05)
    assert trigger.notices == 1


async def test_a_crashed_reloader_reloads_at_once_when_restarted():
    trigger = ReloadTrigger(debounce_s=0.05, safety_interval_s=60)
    calls = []

    async def reload(reason):
        calls.append(reason)
        if len(calls) == 1:
            raise ConnectionError("database away")

    reloader = Reloader(trigger=trigger, reload=reload)
    with contextlib.suppress(ConnectionError):
        await reloader.run()
    task = asyncio.create_task(reloader.run())  # what the supervisor does after a crash
    try:
        await async_wait_until(lambda: calls == ["start", "start"])
        assert reloader.reloads == 1
    finally:
        await stop(task)


def test_diff_sends_only_changes():
    old = {1: "full", 2: "full", 3: "quote"}
    new = {1: "full", 3: "ltp", 4: "full"}
    diff = diff_subscriptions(old, new)
    assert diff.subscribe == {4: "full"}
    assert diff.unsubscribe == [2]
    assert diff.mode_changes == {3: "ltp"}
    assert diff_subscriptions(new, new).empty


# --- the running engine --------------------------------------------------------------------


@pytest.fixture
def market_world(transactional_db):
    market = SyntheticMarket(seed=0)
    instruments_from_market(market)
    tokens = sorted(r["instrument_token"] for r in market.instruments)
    account = make_account("acc1", api_key="k1", access_token="tok-acc1")
    return market, tokens, account


def nifty_chain_group(market):
    expiry = min(r["expiry"] for r in market.instruments if r["name"] == "NIFTY" and r["expiry"])
    return schema.chain_group("NIFTY", expiry), expiry


@pytest.mark.django_db(transaction=True)
async def test_subscription_changes_reach_kite_within_2s_without_touching_the_rest(market_world):
    market, tokens, _account = market_world
    group, expiry = nifty_chain_group(market)
    chain = sorted(
        r["instrument_token"] for r in market.instruments
        if r["name"] == "NIFTY" and r["expiry"] == expiry and r["instrument_type"] in ("CE", "PE")
    )
    removed, mode_changed, untouched = chain[:10], chain[10:15], chain[15:]
    others = [t for t in tokens if t not in chain]
    added, kept_others = others[:20], others[20:]
    await run_db(lambda: subscribe(chain + kept_others))

    async with InProcessEngine(accounts={"acc1": "k1"}) as h:
        listener = await h.listen(group)
        await async_wait_until(
            lambda: len(h.sim.subscriptions("k1")) == len(chain) + len(kept_others),
            timeout_s=15, what="initial subscriptions at the simulator",
        )
        await listener.until(lambda: set(untouched) <= set(listener.latest), timeout_s=10,
                             what="snapshots of the chain")
        connections_before = {c.id for c in h.sim.connections("k1")}

        def change():
            for token in added:
                subscription_activate(instrument=Instrument.objects.get(pk=token))
            subscriptions_set_status(
                subscription_ids=Subscription.objects.filter(instrument_id__in=removed)
                .values_list("pk", flat=True),
                status=Subscription.Status.INACTIVE,
            )
            for sub in Subscription.objects.filter(instrument_id__in=mode_changed):
                subscription_set_mode(subscription=sub, mode="ltp")

        await run_db(change)
        changed_at = time.monotonic()
        expected = {t: "full" for t in chain + kept_others + added}
        for t in removed:
            del expected[t]
        expected.update(dict.fromkeys(mode_changed, "ltp"))
        await async_wait_until(lambda: h.sim.subscriptions("k1") == expected, timeout_s=5,
                               what="the change at the simulator")
        assert time.monotonic() - changed_at < 2.0

        # Same sockets: nothing was reconnected or resubscribed to apply the change...
        assert {c.id for c in h.sim.connections("k1")} == connections_before
        # ...and the untouched instruments keep streaming through it, while the removed ones
        # stop (after what was already in flight when the change landed).
        await listener.drain(0.5)
        listener.received_at.clear()
        await listener.until(lambda: set(untouched) <= set(listener.received_at), timeout_s=5,
                             what="fresh snapshots of untouched instruments")
        assert not set(removed) & set(listener.received_at)

        # The admin shows where each subscription streams.
        rows = await run_db(lambda: {
            s.instrument_id: (s.assigned_account_id, s.streamed_mode)
            for s in Subscription.objects.filter(instrument_id__in=added + removed + mode_changed)
        })
        assert all(rows[t] == (_account.pk, "full") for t in added)
        assert all(rows[t] == (None, "") for t in removed)
        assert all(rows[t] == (_account.pk, "ltp") for t in mode_changed)


@pytest.mark.django_db(transaction=True)
async def test_an_expired_session_moves_its_instruments_to_another_account(market_world):
    _market, tokens, acc1 = market_world
    acc2 = await run_db(lambda: make_account("acc2", api_key="k2", access_token="tok-acc2"))
    await run_db(lambda: subscribe(tokens[:100]))
    async with InProcessEngine(accounts={"acc1": "k1", "acc2": "k2"}) as h:
        # Generous deadlines: each step is a reconnect, a reload and a database round trip,
        # which a loaded machine may stretch to seconds.
        await async_wait_until(
            lambda: len(h.sim.subscriptions("k1")) == 50 and len(h.sim.subscriptions("k2")) == 50,
            timeout_s=60, what="balanced subscriptions",
        )
        h.sim.expire_token("k1")  # closes k1's sockets; the reconnect gets HTTP 403
        await async_wait_until(lambda: len(h.sim.subscriptions("k2")) == 100, timeout_s=60,
                               what="acc1's instruments on acc2")
        await async_wait_until(lambda: h.sim.connection_count("k1") == 0, timeout_s=60,
                               what="no connection left on k1")

        async def only_acc2_assigned():
            assigned = await run_db(
                lambda: set(Subscription.objects.values_list("assigned_account_id", flat=True))
            )
            return assigned == {acc2.pk}

        await async_wait_until(only_acc2_assigned, timeout_s=60, what="every row assigned to acc2")
        status = await run_db(lambda: KiteAccount.objects.get(pk=acc1.pk).status)
        assert status == KiteAccount.Status.SESSION_EXPIRED
        await async_wait_until(
            lambda: h.engine.heartbeat_state()["accounts"]["acc1"]["state"] == "session_expired",
            timeout_s=30, what="acc1 reported session_expired",
        )
